"""Stand-in for OmegaWatt's `wattmetre-read`, run as a script by the tests and benchmarks.

The program is `kwollect.dev.simulators.wattmetre` (see its docstring for the values it prints
and its fault-injection options).
"""

import sys

from kwollect.dev.simulators.wattmetre import run

if __name__ == "__main__":
    sys.exit(run())
