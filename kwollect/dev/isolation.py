"""Measuring isolation: live targets polled every second beside hostile ones, as counts.

Used by tests/test_isolation.py (asserted, 10 s) and benchmarks/soak_isolation.py (longer,
printed beside a baseline).  Live devices are named ``live-<i>``, hostile ones
``hostile-<name>``; each live target must be read at 1 s.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

from kwollect.collect.promotion import Promotions
from kwollect.collect.scheduler import Scheduler, TargetStats
from kwollect.model import MetricDescription, Reading


@dataclass
class IsolationRun:
    start: float
    stop: float
    stats: list[TargetStats]
    late: dict[str, list[float]] = field(default_factory=dict)
    """Per live device, how late each reading came after its tick, for the whole seconds
    of the window but the first and the last (the window may cut them)."""
    gaps: list[float] = field(default_factory=list)
    """Between consecutive readings of each live device."""
    flood: dict[str, int] = field(default_factory=dict)
    """Readings of each hostile device."""

    @property
    def expected(self) -> int:
        """Ticks each live target should have been read at."""
        return len(range(math.ceil(self.start + 1), math.ceil(self.stop - 1)))

    def polled(self, device_id: str) -> int:
        return len(self.late.get(device_id, ()))

    def lateness_quantile(self, q: float) -> float:
        lateness = sorted(x for values in self.late.values() for x in values)
        return lateness[min(len(lateness) - 1, int(len(lateness) * q))]

    def target_stats(self, scheme: str) -> list[TargetStats]:
        return [s for s in self.stats if s.name.startswith(scheme + "://")]


async def run_beside(descriptions: Sequence[MetricDescription], seconds: float,
                     timeout_s: float) -> IsolationRun:
    """Poll `descriptions` for `seconds`; keep live readings, count hostile ones (as a
    writer would take them)."""
    live: list[Reading] = []
    flood: dict[str, int] = defaultdict(int)

    def submit(batch: Sequence[Reading]) -> None:
        if batch[0].device_id.startswith("hostile-"):
            flood[batch[0].device_id] += len(batch)
        else:
            live.extend(batch)

    scheduler = Scheduler(submit, Promotions(), timeout_s=timeout_s)
    scheduler.apply(descriptions)
    start = time.time()
    try:
        await asyncio.sleep(seconds)
        stop = time.time()
        stats = list(scheduler.target_stats)
    finally:
        await scheduler.close()
    run = IsolationRun(start, stop, stats, flood=dict(flood))
    late: dict[str, list[float]] = defaultdict(list)
    stamps: dict[str, list[float]] = defaultdict(list)
    for reading in live:
        at = reading.timestamp_us / 1e6
        stamps[reading.device_id].append(at)
        tick = math.floor(at)
        if start + 1 <= tick < stop - 1:
            late[reading.device_id].append(at - tick)
    run.late = dict(late)
    for values in stamps.values():
        values.sort()
        run.gaps += [b - a for a, b in zip(values, values[1:], strict=False)]
    return run
