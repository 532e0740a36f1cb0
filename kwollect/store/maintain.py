"""`kwollect maintain [CONFIG.yaml] [--option value ...]`: the database's own maintenance.

Partitions created ahead of time, late rows moved to their partition, 5-minute summaries:
all of it is SQL (kwollect.maintain(), sql/040_summary.sql); this command only calls it,
once (systemd's kwollect-maintain.timer runs it every minute) or every `every_seconds`.
Then, in a transaction of its own, kwollect.sync_jobs() copies new and changed jobs from
the linked scheduler's database (OAR, sql/070_oar.sql); it never raises.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Sequence

import asyncpg

from kwollect.options import tool_options
from kwollect.store.dbconn import DB_DEFAULTS, connect_kwargs

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
                jobs = await conn.fetchval("SELECT kwollect.sync_jobs()::text")
                log.info("jobs: %s", jobs)
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
    conf = tool_options("kwollect maintain", MAINTAIN_DEFAULTS, argv, description=__doc__)
    if conf is None:
        return 2
    try:
        asyncio.run(maintain(conf))
    except (OSError, asyncpg.PostgresError) as exc:
        print(f"kwollect maintain: {exc}", file=sys.stderr)
        return 1
    return 0
