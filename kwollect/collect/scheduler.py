"""Polling: every metric at its own period, on wall-clock-aligned ticks, targets isolated.

Descriptions are grouped by (protocol, target, period): a group is one asyncio task that
reads all its active metrics with one `collect` call per tick.  A group whose previous
poll is still running skips the tick (counted as an overrun) instead of queueing, a poll
never outlives its period, and every group has its own task, so a slow or dead target
delays nobody else.  Groups of one target share its collector and a per-target
concurrency limit.

Optional metrics are active while promoted.  A metric with `optional_update_every` is read
at `update_every` normally and at `optional_update_every` (only) while promoted.  When
the promoted set changes, newly active metrics are read at once, then on their ticks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial

from kwollect import protocols
from kwollect.collect.promotion import Promotions
from kwollect.logutil import RateLimitedLog
from kwollect.model import Collector, MetricDescription, Reading
from kwollect.protocols.contract import TargetKey
from kwollect.protocols.sharing import SharedRegistry
from kwollect.protocols.url import target_name

log = logging.getLogger("kwollect.collect.scheduler")


@dataclass(frozen=True)
class Entry:
    """A description as scheduled in one group."""

    desc: MetricDescription
    promoted_only: bool = False
    unless_promoted: bool = False

    def active(self, promotions: Promotions) -> bool:
        if not (self.promoted_only or self.unless_promoted):
            return True
        alias = self.desc.labels.get("_device_alias")
        promoted = promotions.is_promoted(self.desc.device_id, alias, self.desc.name)
        return promoted if self.promoted_only else not promoted


def schedule_entries(desc: MetricDescription) -> list[tuple[int, Entry]]:
    """(period in ms, entry) pairs under which a description is read."""
    if desc.optional:
        return [(desc.optional_update_every_ms or desc.update_every_ms,
                 Entry(desc, promoted_only=True))]
    if desc.optional_update_every_ms:
        return [(desc.update_every_ms, Entry(desc, unless_promoted=True)),
                (desc.optional_update_every_ms, Entry(desc, promoted_only=True))]
    return [(desc.update_every_ms, Entry(desc))]


GroupKey = tuple[str, TargetKey, int]
"""(protocol, target key, period in ms)."""


@dataclass
class TargetStats:
    """Counters of one target, read by the self-metrics."""

    name: str
    polls: int = 0
    values: int = 0
    errors: int = 0
    timeouts: int = 0
    overruns: int = 0
    missed_ticks: int = 0
    """Ticks not polled because the kwollector itself ran a period late or more."""
    last_latency_s: float = 0.0


@dataclass
class _Target:
    collector: Collector
    limit: asyncio.Semaphore
    stats: TargetStats


@dataclass
class _Group:
    key: GroupKey
    entries: tuple[Entry, ...]
    target: _Target
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task | None = None
    poll: asyncio.Task | None = None
    last_active: frozenset[int] = frozenset()

    @property
    def period_s(self) -> float:
        return self.key[2] / 1000

    @property
    def promotion_dependent(self) -> bool:
        return any(e.promoted_only or e.unless_promoted for e in self.entries)


class Scheduler:
    def __init__(self, submit: Callable[[Sequence[Reading]], None], promotions: Promotions,
                 timeout_s: float = 10.0, target_concurrency: int = 1) -> None:
        self._submit = submit
        self._promotions = promotions
        self._timeout_s = timeout_s
        self._concurrency = target_concurrency
        self._targets: SharedRegistry[tuple[str, TargetKey], _Target] = SharedRegistry()
        self._groups: dict[GroupKey, _Group] = {}
        self._log = RateLimitedLog(log, 60)
        self.values_collected = 0

    @property
    def target_stats(self) -> list[TargetStats]:
        return [t.stats for t in self._targets.values()]

    @property
    def needs_promotions(self) -> bool:
        return any(g.promotion_dependent for g in self._groups.values())

    def apply(self, descriptions: Sequence[MetricDescription]) -> tuple[int, int, int]:
        """Start, keep or stop groups to match `descriptions`; returns (started, kept,
        stopped).  Unchanged groups keep running, and their collectors stay open."""
        wanted: dict[GroupKey, list[Entry]] = {}
        for desc in descriptions:
            protocol, key = protocols.target_key(desc)
            for period, entry in schedule_entries(desc):
                wanted.setdefault((protocol, key, period), []).append(entry)
        stopped = [self._groups.pop(k) for k, g in list(self._groups.items())
                   if tuple(wanted.get(k, ())) != g.entries]
        for group in stopped:
            self._cancel(group)
        started = 0
        for gkey, entries in wanted.items():
            if gkey in self._groups:
                continue
            target = self._targets.acquire(gkey[:2], partial(self._open, gkey, entries[0].desc))
            group = _Group(gkey, tuple(entries), target)
            group.task = asyncio.create_task(self._run(group), name=f"poll {target.stats.name}")
            self._groups[gkey] = group
            started += 1
        # released after the new groups took theirs: a target whose groups changed keeps
        # its collector (and its connections)
        for group in stopped:
            last = self._targets.release(group.key[:2])
            if last is not None:
                asyncio.create_task(last.collector.close())
        return started, len(wanted) - started, len(stopped)

    def promotions_changed(self) -> None:
        for group in self._groups.values():
            if group.promotion_dependent:
                group.wake.set()

    async def close(self) -> None:
        for group in self._groups.values():
            self._cancel(group)
        tasks = [t for g in self._groups.values() for t in (g.task, g.poll) if t]
        await asyncio.gather(*tasks, return_exceptions=True)
        self._groups.clear()
        await asyncio.gather(*(t.collector.close() for t in self._targets.values()),
                             return_exceptions=True)
        self._targets.clear()

    def _open(self, gkey: GroupKey, desc: MetricDescription) -> _Target:
        collector = protocols.open_collector(gkey[0], gkey[1], self._timeout_s)
        return _Target(collector, asyncio.Semaphore(self._concurrency),
                       TargetStats(target_name(desc.url)))

    @staticmethod
    def _cancel(group: _Group) -> None:
        for task in (group.task, group.poll):
            if task:
                task.cancel()

    def _active(self, group: _Group) -> frozenset[int]:
        return frozenset(i for i, e in enumerate(group.entries) if e.active(self._promotions))

    async def _run(self, group: _Group) -> None:
        period = group.period_s
        while True:
            now = time.time()
            tick = (math.floor(now / period) + 1) * period
            woken = False
            # asyncio.timeout, not asyncio.wait_for: on Python 3.11 wait_for swallows a
            # cancel that arrives just after the wake (CPython gh-86296), and close() then
            # waited for this task forever
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(tick - now):
                    await group.wake.wait()
                woken = True
            if woken:
                group.wake.clear()
                active = self._active(group)
                new = active - group.last_active
                group.last_active = active
                if new and not (group.poll and not group.poll.done()):
                    group.poll = asyncio.create_task(self._poll(group, new, time.time() + period))
                continue
            # asyncio may wake up a hair early: never poll before the tick itself
            while 0 < (early := tick - time.time()) <= period:
                await asyncio.sleep(early)
            if early > period:  # the clock was stepped back: align on the new time
                self._log.warning(("clock", group.key), "%s: the wall clock went back by "
                                  "%.3g s: ticks re-aligned on it", group.target.stats.name,
                                  early)
                continue
            late = -early
            if late >= period:  # a pause (SIGSTOP, suspend, load) or a clock step forward
                self._missed(group, int(late // period) + 1, late)
                continue
            active = self._active(group)
            group.last_active = active
            if not active:
                continue
            if group.poll and not group.poll.done():
                group.target.stats.overruns += 1
                self._log.warning(("overrun", group.key), "%s: poll of %d metrics every %g s "
                                  "still running at the next tick: tick skipped",
                                  group.target.stats.name, len(group.entries), period)
                continue
            group.poll = asyncio.create_task(self._poll(group, active, tick + period))

    def _missed(self, group: _Group, ticks: int, late: float) -> None:
        """Ticks whose whole period went by before the group could run: missed, not polled.

        They are the kwollector's fault, not the device's: counted as missed ticks, never
        as timeouts (a poll started then would have had a negative time budget)."""
        group.target.stats.missed_ticks += ticks
        self._log.warning(("missed", group.key), "%s: %d tick(s) of %g s missed: the "
                          "kwollector ran %.3g s late (paused, overloaded, or the clock "
                          "was stepped forward)", group.target.stats.name, ticks,
                          group.period_s, late)

    async def _poll(self, group: _Group, active: frozenset[int], deadline: float) -> None:
        """One collect call, ended by the target timeout or by the group's next tick."""
        stats = group.target.stats
        metrics = [group.entries[i].desc for i in sorted(active)]
        started = time.monotonic()
        budget = min(self._timeout_s, deadline - time.time())
        if budget <= 0:  # the loop stalled between the tick and this task's first step
            self._missed(group, 1, -budget)
            return
        try:
            async with asyncio.timeout(budget):
                async with group.target.limit:
                    readings = await group.target.collector.collect(metrics)
        except TimeoutError:
            stats.timeouts += 1
            self._log.warning(("timeout", group.key), "%s: no answer within %.3g s",
                              stats.name, budget)
            return
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a collector's fault must never stop its group
            stats.errors += 1
            self._log.warning(("error", group.key), "%s: poll failed: %s", stats.name, exc)
            return
        latency = time.monotonic() - started
        stats.polls += 1
        stats.values += len(readings)
        stats.last_latency_s = latency
        self.values_collected += len(readings)
        self._log.forget(("timeout", group.key))
        self._log.forget(("error", group.key))
        if readings:
            self._submit(readings)
