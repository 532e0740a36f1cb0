"""Partition cache: the time ranges the writer knows have a partition, so that a batch costs
no catalogue query unless it holds rows of a range not seen yet.

Ranges come from ``kwollect.partitions``, merged where they touch; a batch outside them has
its partitions created by ``kwollect.ensure_partitions`` first (one per chunk interval it
touches).  If that fails for a reason other than a lost connection, rows go to the default
partition (maintenance moves them) and creation is tried again a minute later.
"""

from __future__ import annotations

import time
from bisect import bisect_right
from collections.abc import Iterable
from datetime import datetime

import asyncpg

from kwollect.logutil import RateLimitedLog
from kwollect.store.writer.batching import Batch, datetime_to_us, us_to_datetime
from kwollect.store.writer.faults import describe

HOUR_US = 3_600_000_000
RETRY_AFTER_S = 60.0
_PARTITIONS_SQL = "SELECT range_start, range_end FROM kwollect.partitions ORDER BY range_start"
_CHUNK_SQL = "SELECT kwollect.setting('chunk_interval_hour')"
_ENSURE_SQL = "SELECT kwollect.ensure_partitions($1::timestamptz[])"


def merge_ranges(ranges: Iterable[tuple[datetime, datetime]]) -> tuple[list[int], list[int]]:
    """Sorted (start, end) ranges as the starts and ends (µs) of their merged union."""
    starts: list[int] = []
    ends: list[int] = []
    for start, end in ranges:
        lo, hi = datetime_to_us(start), datetime_to_us(end)
        if ends and lo <= ends[-1]:
            ends[-1] = max(ends[-1], hi)
        else:
            starts.append(lo)
            ends.append(hi)
    return starts, ends


class PartitionCache:
    """Known partitions, and the creation of those a batch needs."""

    def __init__(self, name: str, rate_log: RateLimitedLog) -> None:
        self._name = name
        self._rate_log = rate_log
        self._starts: list[int] = []
        self._ends: list[int] = []
        self._chunk_us: int | None = None
        self._retry_at = 0.0
        self.ensured = 0

    def covered(self, lo: int, hi: int) -> bool:
        """True if [lo, hi] (µs) lies in one known range."""
        i = bisect_right(self._starts, lo) - 1
        return i >= 0 and hi < self._ends[i]

    async def _load(self, conn: asyncpg.Connection, timeout: float) -> None:
        if self._chunk_us is None:
            hours = await conn.fetchval(_CHUNK_SQL, timeout=timeout)
            try:
                self._chunk_us = max(1, int(hours)) * HOUR_US
            except (TypeError, ValueError):
                self._chunk_us = HOUR_US
        self._starts, self._ends = merge_ranges(await conn.fetch(_PARTITIONS_SQL,
                                                                 timeout=timeout))

    async def ensure(self, conn: asyncpg.Connection, batch: Batch, timeout: float) -> None:
        """Create the partitions this batch needs and the writer has not seen yet.

        Failures other than a lost connection (lock timeout, a storage without
        kwollect.partitions...) are logged and the batch goes on: rows without a partition
        land in the default one, and maintenance moves them.
        """
        if self.covered(batch.lo, batch.hi) or time.monotonic() < self._retry_at:
            return
        wanted: dict[int, int] = {}
        try:
            await self._load(conn, timeout)
            if self.covered(batch.lo, batch.hi):
                return
            chunk = self._chunk_us or HOUR_US
            for ts in batch.ts:
                if ts // chunk not in wanted and not self.covered(ts, ts):
                    wanted[ts // chunk] = ts
            await conn.fetchval(_ENSURE_SQL, [us_to_datetime(ts) for ts in wanted.values()],
                                timeout=timeout)
            self.ensured += len(wanted)
            await self._load(conn, timeout)
        except asyncpg.PostgresError as exc:
            if isinstance(exc, asyncpg.PostgresConnectionError):
                raise
            self._retry_at = time.monotonic() + RETRY_AFTER_S
            self._rate_log.warning("partitions", "%s: cannot create partitions for %d time "
                                   "range(s) (%s); rows go to the default partition until "
                                   "maintenance moves them", self._name, len(wanted),
                                   describe(exc))
