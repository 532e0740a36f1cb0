"""`kwollect`: the umbrella command (demo, maintain, migrate, get, plot)."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence

import asyncpg

from kwollect.options import tool_options
from kwollect.store.maintain import MAINTAIN_DEFAULTS, maintain


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="kwollect", description=__doc__)
    parser.add_argument("command", choices=["demo", "maintain", "migrate", "get", "plot"])
    args, rest = parser.parse_known_args(argv[:1])
    if args.command == "get":
        from kwollect.client.get import main as get_main

        return get_main(argv[1:])
    if args.command == "plot":
        from kwollect.client.plot import main as plot_main

        return plot_main(argv[1:])
    if args.command == "demo":
        from kwollect.dev.demo import main as demo_main

        return demo_main(argv[1:])
    if args.command == "migrate":
        from kwollect.migrate.command import main as migrate_main

        return migrate_main(argv[1:])
    conf = tool_options("kwollect maintain", MAINTAIN_DEFAULTS, argv[1:] + rest)
    if conf is None:
        return 2
    try:
        asyncio.run(maintain(conf))
    except (OSError, asyncpg.PostgresError) as exc:
        print(f"kwollect maintain: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
