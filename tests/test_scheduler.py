"""Scheduling against a real snmpd: per-metric periods on aligned ticks, isolation from a
dead target, promotion on and off, reload keeping unchanged groups."""

from __future__ import annotations

import asyncio
import logging
import statistics
import time

import pytest

from kwollect.collect import scheduler as scheduler_module
from kwollect.collect.promotion import Promotions
from kwollect.collect.scheduler import Scheduler
from kwollect.model import MetricDescription, Reading
from tests.fixtures.snmp import BULK

OIDS = sorted(BULK)


def period(seconds: float):
    """A median gap equal to the period, with room for scheduling jitter on a busy machine."""
    return pytest.approx(seconds, abs=0.05)


def desc(agent_url: str, name: str, period_ms: int, device: str = "sch-1",
         **kw) -> MetricDescription:
    return MetricDescription(name=name, device_id=device, url=agent_url,
                             update_every_ms=period_ms, **kw)


async def run_for(descriptions, seconds, promotions=None, timeout_s=2.0, during=None):
    """Readings and per-target stats of `seconds` of polling."""
    readings: list[Reading] = []
    scheduler = Scheduler(readings.extend, promotions or Promotions(), timeout_s=timeout_s)
    scheduler.apply(descriptions)
    try:
        if during:
            await during(scheduler, readings)
        await asyncio.sleep(seconds)
        stats = {s.name: s for s in scheduler.target_stats}
    finally:
        await scheduler.close()
    return readings, stats


def times(readings, name):
    return [r.timestamp_us / 1e6 for r in readings if r.metric_id == name]


def gaps(stamps):
    return [b - a for a, b in zip(stamps, stamps[1:], strict=False)]


async def test_each_metric_at_its_own_period_on_aligned_ticks(snmp_agent):
    fast = desc(snmp_agent.url(OIDS[0]), "fast", 200)
    slow = desc(snmp_agent.url(OIDS[1]), "slow", 1000)
    readings, _ = await run_for([fast, slow], 3.2)
    fast_t, slow_t = times(readings, "fast"), times(readings, "slow")
    assert len(slow_t) >= 2 and len(fast_t) >= 4 * len(slow_t)
    # one poll per tick, never two in one period; stamps sit just after the tick
    assert min(gaps(slow_t)) > 0.5 and statistics.median(gaps(slow_t)) == period(1.0)
    assert statistics.median(gaps(fast_t)) == period(0.2)
    assert statistics.median(t % 1.0 for t in slow_t) < 0.1


async def test_dead_target_does_not_delay_a_live_one(snmp_agent, silent_udp_port):
    live = desc(snmp_agent.url(OIDS[0]), "live", 200)
    dead = desc(f"snmp://public@127.0.0.1:{silent_udp_port}/{OIDS[0]}", "dead", 200,
                device="sch-dead")
    readings, stats = await run_for([live, dead], 2.2, timeout_s=5.0)
    live_t = times(readings, "live")
    assert times(readings, "dead") == []
    assert statistics.median(gaps(live_t)) == period(0.2)
    assert statistics.median(t % 0.2 for t in live_t) < 0.05
    dead_stats = stats[f"snmp://127.0.0.1:{silent_udp_port}"]
    assert dead_stats.timeouts + dead_stats.errors >= 5
    assert stats[f"snmp://127.0.0.1:{snmp_agent.port}"].errors == 0


async def test_same_target_and_period_share_one_request(snmp_agent):
    descriptions = [desc(snmp_agent.url(oid), f"m{i}", 500) for i, oid in enumerate(OIDS[:30])]
    readings, by_target = await run_for(descriptions, 1.2)
    (stats,) = by_target.values()
    assert stats.values == len(readings) == 30 * stats.polls and stats.polls >= 2
    # one request: every reading of a poll carries the same exchange midpoint
    first = {r.timestamp_us for r in readings[:30]}
    assert len(first) == 1


async def test_optional_metric_follows_promotion(snmp_agent):
    promotions = Promotions()
    always = desc(snmp_agent.url(OIDS[0]), "always", 200)
    optional = desc(snmp_agent.url(OIDS[1]), "bmc_fan_rpm", 200, optional=True,
                    labels={"_device_alias": "node-7"})

    async def during(scheduler, readings):
        await asyncio.sleep(0.7)
        assert times(readings, "bmc_fan_rpm") == []
        promotions.update([("node-7", "bmc_.*")])  # through the alias
        scheduler.promotions_changed()
        await asyncio.sleep(0.1)
        assert times(readings, "bmc_fan_rpm"), "a newly promoted metric is read at once"
        await asyncio.sleep(0.6)
        promotions.update([("node-7", "bmc_fan")])  # a prefix is not a full match
        scheduler.promotions_changed()
        demoted_at.append(time.time())

    demoted_at: list[float] = []
    readings, _ = await run_for([always, optional], 0.7, promotions, during=during)
    # a poll in flight at the demotion still delivers what it read (lossless); it ends by
    # its next tick, so any reading stamped a period after the demotion is from a later poll
    after = demoted_at[0] + 0.2
    assert [t for t in times(readings, "bmc_fan_rpm") if t > after] == []
    assert [t for t in times(readings, "always") if t > after]


async def test_optional_update_every_while_promoted(snmp_agent):
    promotions = Promotions()
    metric = desc(snmp_agent.url(OIDS[2]), "power", 1000, device="sch-9",
                  optional_update_every_ms=100)

    async def during(scheduler, readings):
        await asyncio.sleep(1.5)
        promotions.update([("sch-9", None)])
        scheduler.promotions_changed()
        readings.clear()

    readings, _ = await run_for([metric], 1.0, promotions, during=during)
    assert statistics.median(gaps(times(readings, "power"))) == period(0.1)


async def test_reload_keeps_unchanged_groups_running(snmp_agent):
    readings: list[Reading] = []
    scheduler = Scheduler(readings.extend, Promotions(), timeout_s=2.0)
    a = desc(snmp_agent.url(OIDS[0]), "a", 200)
    b = desc(snmp_agent.url(OIDS[1]), "b", 300)
    try:
        assert scheduler.apply([a, b]) == (2, 0, 0)
        task_a = scheduler._groups[next(k for k in scheduler._groups if k[2] == 200)].task
        c = desc(snmp_agent.url(OIDS[2]), "c", 300)
        assert scheduler.apply([a, c]) == (1, 1, 1)
        assert scheduler._groups[next(k for k in scheduler._groups if k[2] == 200)].task is task_a
        readings.clear()
        await asyncio.sleep(0.8)
        assert {r.metric_id for r in readings} == {"a", "c"}
    finally:
        await scheduler.close()


async def test_a_target_keeps_its_collector_while_a_group_reads_it(snmp_agent):
    """A reload that changes a target's group keeps its collector (and socket) open; the
    collector is closed once no group reads the target any more."""
    readings: list[Reading] = []
    scheduler = Scheduler(readings.extend, Promotions(), timeout_s=2.0)
    try:
        scheduler.apply([desc(snmp_agent.url(OIDS[0]), "a", 300)])
        (target,) = scheduler._targets.values()
        assert scheduler.apply([desc(snmp_agent.url(OIDS[1]), "b", 300)]) == (1, 0, 1)
        (kept,) = scheduler._targets.values()
        assert kept is target
        readings.clear()
        await asyncio.sleep(0.8)
        assert {r.metric_id for r in readings} == {"b"}
        assert scheduler.apply([]) == (0, 0, 1)
        assert scheduler._targets == {}
    finally:
        await scheduler.close()


async def test_a_pause_is_missed_ticks_not_device_timeouts(snmp_agent, caplog):
    """The process stalls 2.5 s (as under SIGSTOP or a swap storm): the ticks that went by
    are counted as missed, nobody is blamed with a negative time budget, polling resumes."""
    metric = desc(snmp_agent.url(OIDS[0]), "paused", 1000)

    async def during(scheduler, readings):
        await asyncio.sleep(1.2)
        time.sleep(2.5)  # the whole event loop stalls
        readings.clear()

    with caplog.at_level(logging.WARNING, logger="kwollect.collect.scheduler"):
        readings, stats = await run_for([metric], 2.2, during=during)
    (target,) = stats.values()
    assert target.timeouts == 0 and target.errors == 0
    assert target.missed_ticks >= 2
    assert "no answer within -" not in caplog.text and "tick(s) of 1 s missed" in caplog.text
    assert times(readings, "paused"), "polling resumes after the pause"


async def test_clock_stepped_back_realigns_instead_of_waiting(snmp_agent, monkeypatch):
    """The wall clock goes back an hour (an NTP step): ticks re-align on the new time at
    once instead of sleeping until the old time comes back."""
    metric = desc(snmp_agent.url(OIDS[0]), "stepped", 200)
    real = time.time
    offset = [0.0]
    monkeypatch.setattr(scheduler_module.time, "time", lambda: real() + offset[0])

    async def during(scheduler, readings):
        await asyncio.sleep(0.5)
        offset[0] = -3600.0
        readings.clear()

    readings, stats = await run_for([metric], 1.5, during=during)
    assert len(times(readings, "stepped")) >= 3
    assert next(iter(stats.values())).timeouts == 0


async def test_a_stop_in_the_turn_of_a_promotion_change_ends_every_group(snmp_agent):
    """close() cancels each group's task.  A cancel arriving just after the group's wake
    (a promotion change) but before its task resumed was swallowed by asyncio.wait_for on
    Python 3.11 (CPython gh-86296): the group polled on and close() never returned, so a
    kwollector given SIGTERM just after a promotion change never exited (seen as
    test_kwollector's promotion test failing after 60 s, about one run in five).  Every
    turn between the wake and the cancel is tried."""
    for turns in range(6):
        scheduler = Scheduler(lambda readings: None, Promotions(), timeout_s=2.0)
        scheduler.apply([desc(snmp_agent.url(OIDS[0]), "always", 10_000),
                         desc(snmp_agent.url(OIDS[1]), "fan", 10_000, optional=True)])
        await asyncio.sleep(0.05)  # the group waits for its tick or its wake
        scheduler.promotions_changed()
        for _ in range(turns):
            await asyncio.sleep(0)
        try:
            async with asyncio.timeout(10):
                await scheduler.close()
        except TimeoutError:
            pytest.fail(f"close() hung when cancelling {turns} turn(s) after the wake")
