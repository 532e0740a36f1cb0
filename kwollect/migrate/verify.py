"""`kwollect migrate --verify`: per series and UTC day, the source's distinct rows against the
target's samples: row count, non-null values, sum of finite values, NaN and infinite counts.

Series the migration refuses (source.REFUSED) are expected to be absent from the target: they
are counted apart, not reported as differences.

Days are compared one at a time, so memory stays bounded by one day's series.  Target rows
written by other means in the same days (collectors switched to the target) show up as
differences of the days they fall in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timedelta

import asyncpg

from kwollect.migrate import source as src
from kwollect.migrate.copy import cell_of

DAY = timedelta(days=1)

TARGET_DAY_SUMMARY = """
SELECT se.device_id, se.metric_id, se.labels::text AS labels, count(*) AS n,
       count(s.value) AS valued,
       sum(s.value) FILTER (WHERE s.value NOT IN ('NaN', 'Infinity', '-Infinity')) AS total,
       count(*) FILTER (WHERE s.value = 'NaN') AS nan,
       count(*) FILTER (WHERE s.value IN ('Infinity', '-Infinity')) AS inf
FROM kwollect.samples_between($1, $2) s  -- raw and compacted samples of [$1, $2)
JOIN kwollect.series se ON se.series_id = s.series_id
GROUP BY se.series_id
"""


@dataclass(frozen=True)
class Difference:
    day: datetime
    series: tuple[str, str, str]
    source: tuple | None
    target: tuple | None

    def __str__(self) -> str:
        def show(stats: tuple | None) -> str:
            if stats is None:
                return "absent"
            n, valued, total, nan, inf = stats
            return f"rows={n} values={valued} sum={total!r} nan={nan} inf={inf}"
        device, metric, labels = self.series
        return (f"{self.day.date()} {device} {metric} {labels}: source {show(self.source)}, "
                f"target {show(self.target)}")


def _stats(rows: list[asyncpg.Record]) -> dict[tuple[str, str, str], tuple]:
    return {(r["device_id"], r["metric_id"], r["labels"]):
            (r["n"], r["valued"], r["total"], r["nan"], r["inf"]) for r in rows}


def _same(a: tuple, b: tuple) -> bool:
    if a[:2] != b[:2] or a[3:] != b[3:]:
        return False
    if a[2] is None or b[2] is None:
        return a[2] is None and b[2] is None
    return math.isclose(a[2], b[2], rel_tol=1e-9, abs_tol=1e-9)


async def compare(source: asyncpg.Connection, target: asyncpg.Connection,
                  until: datetime | None = None) -> tuple[int, list[Difference], int]:
    """(days compared, differences, refused series-days) over the source's time span, up to
    `until`."""
    first = await src.next_timestamp(source, None)
    last = await src.last_timestamp(source)
    if first is None or last is None:
        return 0, [], 0
    if until is not None:
        last = min(last, until)
    differences = []
    compared = refused = 0
    cursor: datetime | None = first
    while cursor is not None and cursor <= last:
        day = cell_of(cursor, DAY)
        upper = min(day + DAY, until) if until is not None else day + DAY
        rows = await source.fetch(src.DAY_SUMMARY, day, upper)
        theirs = _stats([r for r in rows if r["refused"] is None])
        ours = _stats(await target.fetch(TARGET_DAY_SUMMARY, day, upper))
        refused += len(rows) - len(theirs)
        compared += 1
        for key in sorted(theirs.keys() | ours.keys()):
            a, b = theirs.get(key), ours.get(key)
            if a is None or b is None or not _same(a, b):
                differences.append(Difference(day, key, a, b))
        cursor = await src.next_timestamp(source, day + DAY)
    return compared, differences, refused
