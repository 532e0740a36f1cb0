"""CPU cost per value of the wattmetre line parser and aggregator (kwollect.protocols.wattmetre).

Budget: 20 wattmetres x 48 ports x 50 Hz = 48,000 values/s on one core, i.e. well under
~20 µs per value for the whole reader; parsing + aggregation should be a small part of it.
Lines come from tests/wattmetre_gen.py (the real v2/v3 formats), generated before timing.

    .venv/bin/python benchmarks/wattmetre_parse_cost.py [--ports 48] [--seconds 60]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from kwollect.protocols.wattmetre import WattmetreAggregator, parser_for

GENERATOR = Path(__file__).resolve().parent.parent / "tests" / "wattmetre_gen.py"


def generate(version: int, ports: int, seconds: int, missing_every: int) -> list[str]:
    command = [sys.executable, str(GENERATOR), "--version", str(version), "--ports", str(ports),
               "--rate", "50", "--seconds", str(seconds)]
    if missing_every:
        command += ["--missing-every", str(missing_every)]
    return subprocess.run(command, check=True, capture_output=True, text=True).stdout.splitlines()


def cpu_us_per_value(lines: list[str], ports: int, run: Callable[[list[str]], None]) -> float:
    best = float("inf")
    for _ in range(3):
        start = time.process_time()
        run(lines)
        best = min(best, time.process_time() - start)
    return best * 1e6 / (len(lines) * ports)


def parse_only(version: int) -> Callable[[list[str]], None]:
    parse = parser_for(version)

    def run(lines: list[str]) -> None:
        for line in lines:
            parse(line)
    return run


def aggregate(version: int, ports: int, promoted: list[str]) -> Callable[[list[str]], None]:
    mapping = {f"wm-port{port}": f"node-{port // 2}" for port in range(ports)}

    def run(lines: list[str]) -> None:
        agg = WattmetreAggregator("wm", version, mapping, ports=ports)
        agg.set_promoted(promoted)
        feed_line = agg.feed_line
        for line in lines:
            feed_line(line)
        agg.flush()
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ports", type=int, default=48)
    parser.add_argument("--seconds", type=int, default=60)
    args = parser.parse_args()
    ports = args.ports
    nodes = [f"node-{node}" for node in range((ports + 1) // 2)]  # two ports per node
    print(f"{ports} ports, 50 Hz, {args.seconds} s of frames; CPU µs per value (best of 3)")
    print(f"{'format':<8}{'input':<14}{'parse only':>12}{'1 Hz':>10}{'raw':>10}{'half raw':>10}")
    for version in (2, 3):
        for label, missing_every in (("all values", 0), ("1/3 gaps", 3)):
            lines = generate(version, ports, args.seconds, missing_every)
            runs = (parse_only(version), aggregate(version, ports, []),
                    aggregate(version, ports, nodes), aggregate(version, ports, nodes[::2]))
            figures = [cpu_us_per_value(lines, ports, run) for run in runs]
            print(f"v{version:<7}{label:<14}{figures[0]:>12.3f}"
                  + "".join(f"{value:>10.3f}" for value in figures[1:]))


if __name__ == "__main__":
    main()
