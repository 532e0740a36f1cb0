"""Copying a Kwollect 1.x `metrics` relation into kwollect.samples, range by time range.

Ranges are cells of a fixed grid (`range_minutes`, aligned on the epoch), so a resumed run
cuts time exactly as the interrupted one did.  Only cells holding rows are visited: the next
cell is found with an index look-up of the source's first timestamp after the previous one,
so a stray row in 1970 does not cost half a million empty ranges.

Each range is copied by one worker in one target transaction:
1. the source's series of the range (device, metric, labels) are mapped to target series
   ids, created when new (one query per range on each side);
2. its partitions are created (a short transaction of its own: partition creation is
   serialised, and must not wait behind another worker's long COPY);
3. the source streams `COPY (SELECT DISTINCT timestamp, value, series_id ...) TO STDOUT`
   in binary, which is byte for byte the binary COPY input of kwollect.samples: the bytes go
   from one connection to the other through a bounded queue without being decoded, so memory
   stays flat and the client costs almost nothing per row;
4. the checkpoint row (source rows, rows written) and the range's mark for the summaries are
   written in the same transaction as the samples: after a crash or kill -9 a range is either
   entirely there with its checkpoint or absent, and a resumed run copies it again.
Duplicates (identical rows: the reference had no unique key) are dropped by the DISTINCT and
counted as source rows minus rows written and rows refused.  Rows of a series kwollect cannot
hold (labels larger than 2000 bytes, ids longer than 255 characters: source.REFUSED) are
refused: left out of the copy, counted in the checkpoint, reported by series; the rest of
their range is copied.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import asyncpg

from kwollect.migrate import source as src
from kwollect.migrate.progress import Progress

log = logging.getLogger("kwollect.migrate")

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
BINARY_ROW_BYTES = 34  # 2 (field count) + 3 x 4 (lengths) + 8 + 8 + 4: for the progress only
QUEUE_CHUNKS = 16      # chunks of asyncpg's COPY stream buffered between source and target
SERIES_CACHE = 200_000  # series ids remembered by a worker (about 40 MB)


@dataclass
class Totals:
    ranges: int = 0
    skipped: int = 0
    source_rows: int = 0
    written_rows: int = 0
    # (device_id, metric_id, start of the labels, reason) -> rows refused by this run
    refused: dict[tuple[str, str, str, str], int] = field(default_factory=dict)


def cell_of(ts: datetime, step: timedelta) -> datetime:
    """The start of the grid cell holding `ts`."""
    return EPOCH + (ts - EPOCH) // step * step


class RangeCopier:
    """One worker's connections and the series ids it already knows."""

    def __init__(self, source: asyncpg.Connection, target: asyncpg.Connection, name: str,
                 progress: Progress, totals: Totals) -> None:
        self.source = source
        self.target = target
        self.name = name
        self.progress = progress
        self.totals = totals
        self.series: dict[tuple[str, str, str], int] = {}

    async def series_ids(self, groups: list[asyncpg.Record]) -> list[int]:
        keys = [(g["device_id"], g["metric_id"], g["labels"]) for g in groups]
        unknown = list({k for k in keys if k not in self.series})
        if len(self.series) + len(unknown) > SERIES_CACHE:
            self.series.clear()  # per-scrape labels can make millions of series: stay flat
            unknown = list(set(keys))
        if unknown:
            ids = await self.target.fetchval(
                "SELECT kwollect.series_ids($1::text[], $2::text[], $3::jsonb[])",
                [k[0] for k in unknown], [k[1] for k in unknown], [k[2] for k in unknown])
            self.series.update(zip(unknown, ids, strict=True))
        return [self.series[k] for k in keys]

    async def copy(self, lo: datetime, hi: datetime) -> tuple[int, int]:
        """Copy [lo, hi); returns (source rows, rows written)."""
        groups = await self.source.fetch(src.RANGE_SERIES, lo, hi)
        source_rows = sum(g["n"] for g in groups)
        refused = [g for g in groups if g["refused"] is not None]
        for g in refused:
            key = (g["device_id"][:80], g["metric_id"][:80], g["labels"][:80], g["refused"])
            if key not in self.totals.refused:  # once per series, not once per range
                log.warning("from %s: rows of device_id %.80r metric_id %.80r refused: %s",
                            lo.isoformat(), g["device_id"], g["metric_id"], g["refused"])
            self.totals.refused[key] = self.totals.refused.get(key, 0) + g["n"]
        groups = [g for g in groups if g["refused"] is None]
        ids = await self.series_ids(groups)
        # partitions are whole hours: one point per hour of the range, and its last instant
        points = [lo + timedelta(hours=h) for h in range((hi - lo) // timedelta(hours=1) + 1)]
        points = [p for p in points if p < hi] + [hi - timedelta(microseconds=1)]
        await self.target.execute("SELECT kwollect.ensure_partitions($1::timestamptz[])", points)
        async with self.target.transaction():
            written = 0
            if groups:
                written = await self._stream(groups, ids, lo, hi)
            await self.target.execute(
                "INSERT INTO kwollect.migrated_ranges "
                "(source, range_start, range_end, source_rows, written_rows, refused_rows) "
                "VALUES ($1, $2, $3, $4, $5, $6)", self.name, lo, hi, source_rows, written,
                sum(g["n"] for g in refused))
            await self.target.execute("SELECT kwollect.mark_late($1, $2)", lo, hi)
        return source_rows, written

    async def _stream(self, groups: list[asyncpg.Record], ids: list[int], lo: datetime,
                      hi: datetime) -> int:
        queue: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=QUEUE_CHUNKS)
        progress = self.progress

        async def received(chunk: bytes) -> None:
            await queue.put(chunk)
            progress.update(len(chunk) // BINARY_ROW_BYTES)

        async def chunks() -> AsyncIterator[bytes]:
            while (chunk := await queue.get()) is not None:
                yield chunk

        async def produce() -> str:
            try:
                return await self.source.copy_from_query(
                    src.RANGE_COPY, [g["device_id"] for g in groups],
                    [g["metric_id"] for g in groups], [g["labels"] for g in groups], ids, lo, hi,
                    output=received, format="binary")
            finally:
                await queue.put(None)

        async with asyncio.TaskGroup() as group:
            produced = group.create_task(produce())
            group.create_task(self.target.copy_to_table(
                "samples", schema_name="kwollect", source=chunks(),
                columns=["ts", "value", "series_id"], format="binary"))
        status = produced.result()
        return int(status.split()[-1])


async def done_ranges(target: asyncpg.Connection, name: str) -> dict[datetime, datetime]:
    rows = await target.fetch("SELECT range_start, range_end FROM kwollect.migrated_ranges "
                              "WHERE source = $1", name)
    return {r["range_start"]: r["range_end"] for r in rows}


def check_grid(done: dict[datetime, datetime], step: timedelta) -> None:
    """Earlier ranges of this source must lie on the same grid, or a resume would overlap."""
    for lo, hi in done.items():
        if hi - lo != step or cell_of(lo, step) != lo:
            minutes = int((hi - lo).total_seconds() // 60)
            raise src.SourceError(
                f"an earlier run on this source used ranges of {minutes} minutes "
                f"({lo.isoformat()} .. {hi.isoformat()}): resume with --range_minutes {minutes}")


async def plan(source: asyncpg.Connection, done: dict[datetime, datetime], step: timedelta,
               until: datetime | None, totals: Totals,
               emit: Callable[[datetime, datetime, float], Awaitable[None]]) -> None:
    """Visit the cells holding rows, oldest first, that end before `until` (all when None);
    `emit` gets the cells not done yet, with the share of the time span covered so far."""
    first = await src.next_timestamp(source, None)
    last = await src.last_timestamp(source)
    if first is None or last is None:
        return
    end = min(last, until) if until is not None else last
    span = max((end - first).total_seconds(), 1.0)
    cursor: datetime | None = None
    while (ts := await src.next_timestamp(source, cursor)) is not None:
        lo = cell_of(ts, step)
        hi = lo + step
        if until is not None and hi > until:
            return
        if lo in done:
            totals.skipped += 1
        else:
            await emit(lo, hi, (min(hi, end) - first).total_seconds() / span)
        cursor = hi
