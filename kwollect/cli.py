"""`kwollect <command> [options]`: the umbrella command.

Each command is a module with a `main(argv)`; `kwollect <command> --help` is that
command's own help (its options, with `kwollect <command>` as the program name).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

COMMANDS: dict[str, tuple[str, str]] = {
    "maintain": ("kwollect.store.maintain",
                 "database maintenance: partitions ahead, late rows, 5-minute summaries"),
    "get": ("kwollect.client.get", "a job's (or devices') metrics from the API to a file"),
    "plot": ("kwollect.client.plot", "plot a job's (or devices') metrics from the API"),
    "migrate": ("kwollect.migrate.command",
                "copy a reference Kwollect database's metrics into this one"),
    "demo": ("kwollect.dev.demo",
             "the whole chain on loopback with simulated devices, then working curl commands"),
}
"""command -> (module with main(argv), one-line summary)."""


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: kwollect <command> [options]   (kwollect <command> --help)", "",
             "commands:"]
    lines += [f"  {name:<{width}}  {summary}" for name, (_, summary) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"kwollect: unknown command {command!r}\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[command][0])
    return int(module.main(rest))


if __name__ == "__main__":
    sys.exit(main())
