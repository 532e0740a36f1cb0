"""`kwollect`: the umbrella command (demo, maintain)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence

import asyncpg

from kwollect.dbconn import DB_DEFAULTS, connect_kwargs
from kwollect.options import tool_options

log = logging.getLogger("kwollect.maintain")

MAINTAIN_DEFAULTS = {**DB_DEFAULTS, "every_seconds": 0, "log_level": "warning"}


async def maintain(conf: dict) -> None:
    """Run kwollect.maintain() once, or every `every_seconds` until stopped."""
    while True:
        try:
            conn = await asyncpg.connect(**connect_kwargs(conf))
            try:
                result = await conn.fetchval("SELECT kwollect.maintain()::text")
                log.info("maintenance: %s", result)
            finally:
                await conn.close()
        except (OSError, asyncpg.PostgresError) as exc:
            if not conf["every_seconds"]:
                raise
            log.error("maintenance failed, retrying in %s s: %s", conf["every_seconds"], exc)
        if not conf["every_seconds"]:
            return
        await asyncio.sleep(conf["every_seconds"])


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="kwollect", description=__doc__)
    parser.add_argument("command", choices=["demo", "maintain"])
    args, rest = parser.parse_known_args(argv[:1])
    if args.command == "demo":
        from kwollect.demo import main as demo_main

        return demo_main(argv[1:])
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
