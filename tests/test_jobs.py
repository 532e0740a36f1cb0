"""Scheduler hooks (api.job_start / api.job_end), promotion that follows a job, per-job data
(get_metrics of a running job, get_job_metrics built-ins)."""

from __future__ import annotations

import json
from datetime import datetime, timedelta

import asyncpg
import pytest

from tests.sqlapi import UTC, get_metrics, load, series


@pytest.fixture
async def scheduler(kwdb):
    """The scheduler role, as kwollect-api (logged in as kwuser_api) runs a call made with
    the scheduler token."""
    conn = await kwdb.connect("kwuser_api")
    await conn.execute("SET ROLE kwuser_scheduler")
    yield conn
    await conn.close()


async def job_start(conn, job_id, nodes, start=None, promote=None):
    return json.loads(await conn.fetchval(
        "SELECT api.job_start(job_id => $1, nodes => $2, start_time => $3, promote => $4)",
        job_id, nodes, start, promote))


async def job_end(conn, job_id, stop=None):
    return json.loads(await conn.fetchval("SELECT api.job_end($1, $2)", job_id, stop))


async def promoted(conn, prefix):
    rows = await conn.fetch("SELECT device_id, metric_id, job_id FROM promoted_metrics "
                            "WHERE device_id LIKE $1 ORDER BY 1, 2, 3", prefix + "%")
    return [tuple(r) for r in rows]


async def test_hooks_record_the_job_and_promotion_follows_it(scheduler, writer):
    await writer.execute("INSERT INTO promoted_metrics (device_id, metric_id) "
                         "VALUES ('hk-1', 'operator_.*')")
    result = await job_start(scheduler, 71001, "hk-1.site.example,hk-2", "1700000000",
                             "bmc_.*")
    assert result["nodes"] == ["hk-1", "hk-2"] and result["promoted_rows_added"] == 2
    # another job on hk-2, promoting everything
    await job_start(scheduler, 71002, "hk-2", "1700000100", ".*")
    assert await promoted(writer, "hk-") == [
        ("hk-1", "bmc_.*", 71001), ("hk-1", "operator_.*", None),
        ("hk-2", ".*", 71002), ("hk-2", "bmc_.*", 71001)]
    rows = await writer.fetch("SELECT node, start_time, stop_time FROM nodetime_per_job "
                              "WHERE job_id = 71001 ORDER BY node")
    assert [(r["node"], r["start_time"].timestamp(), r["stop_time"]) for r in rows] == [
        ("hk-1", 1700000000.0, None), ("hk-2", 1700000000.0, None)]

    ended = await job_end(scheduler, 71001, "1700003600")
    assert ended["nodes_ended"] == 2 and ended["promoted_rows_removed"] == 2
    # the other job's and the operator's rows are untouched
    assert await promoted(writer, "hk-") == [("hk-1", "operator_.*", None),
                                             ("hk-2", ".*", 71002)]
    stops = await writer.fetch("SELECT DISTINCT stop_time FROM nodetime_per_job "
                               "WHERE job_id = 71001")
    assert [r["stop_time"].timestamp() for r in stops] == [1700003600.0]
    # the epilog may run twice: nothing changes
    again = await job_end(scheduler, 71001)
    assert again["nodes_ended"] == 0 and again["promoted_rows_removed"] == 0
    await job_end(scheduler, 71002)
    assert await promoted(writer, "hk-") == [("hk-1", "operator_.*", None)]
    await writer.execute("DELETE FROM promoted_metrics WHERE device_id LIKE 'hk-%'")


async def test_only_the_scheduler_role_may_call_the_hooks(writer, reader):
    for conn in (writer, reader):
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await job_start(conn, 71010, "hk-9")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await job_end(conn, 71010)
    assert await writer.fetchval("SELECT count(*) FROM nodetime_per_job WHERE job_id = 71010") == 0


async def test_hook_input_errors(scheduler):
    with pytest.raises(asyncpg.PostgresError, match="needs job_id and nodes") as err:
        await job_start(scheduler, 71020, " , ")
    assert err.value.sqlstate == "22023"
    with pytest.raises(asyncpg.PostgresError, match="invalid promote regex"):
        await job_start(scheduler, 71020, "hk-20", None, "bmc_(")
    with pytest.raises(asyncpg.PostgresError, match="invalid start_time"):
        await job_start(scheduler, 71020, "hk-20", "yesterday-ish")
    with pytest.raises(asyncpg.PostgresError, match="not found") as err:
        await job_end(scheduler, 71029)
    assert err.value.sqlstate == "PT404"
    await job_start(scheduler, 71021, "hk-21", "1700000000")
    with pytest.raises(asyncpg.PostgresError, match="before its start"):
        await job_end(scheduler, 71021, "1600000000")
    await job_end(scheduler, 71021, "1700000001")


async def test_a_requeued_job_keeps_both_runs(scheduler, reader):
    await job_start(scheduler, 71030, "hk-30", "1700000000")
    await job_start(scheduler, 71030, "hk-30", "1700001000")  # restarted by the scheduler
    await job_start(scheduler, 71030, "hk-30", "1700001000")  # the prolog retried
    await job_end(scheduler, 71030, "1700002000")
    rows = await reader.fetch("SELECT start_time, stop_time FROM nodetime_per_job "
                              "WHERE job_id = 71030 ORDER BY 1")
    assert [(r["start_time"].timestamp(), r["stop_time"].timestamp()) for r in rows] == [
        (1700000000.0, 1700001000.0), (1700001000.0, 1700002000.0)]


async def test_get_metrics_of_a_running_job_reaches_now(scheduler, writer, reader):
    now = datetime.now(UTC).replace(microsecond=0)
    start = now - timedelta(minutes=10)
    await load(writer, series("rj-1", "m", start - timedelta(minutes=5), 16, 60))
    await job_start(scheduler, 71040, "rj-1", start.isoformat())
    rows = await get_metrics(reader, job_id=71040)
    assert [r["value"] for r in rows] == [float(i) for i in range(5, 16)]
    await job_end(scheduler, 71040, (now - timedelta(minutes=2)).isoformat())
    rows = await get_metrics(reader, job_id=71040)
    assert [r["value"] for r in rows] == [float(i) for i in range(5, 14)]


async def test_get_job_metrics_energy_power_and_completeness(scheduler, writer, reader):
    start = datetime(2023, 7, 7, 10, 0, tzinfo=UTC)
    stop = start + timedelta(hours=1)
    # je3-1: 100 W then 200 W (half an hour each), every 10 s, complete
    await load(writer, series("je3-1", "bmc_node_power_watt", start, 361, 10,
                              lambda i: 100.0 if i < 180 else 200.0))
    # je3-2: a ramp 0 -> 360 W every 10 s, with a 10-minute gap in the middle
    await load(writer, [r for r in series("je3-2", "bmc_node_power_watt", start, 361, 10,
                                          lambda i: float(i)) if not 120 <= r[3] < 180])
    await load(writer, series("je3-2", "temp", start, 61, 60))
    await job_start(scheduler, 71050, "je3-1,je3-2", start.isoformat())
    await job_end(scheduler, 71050, stop.isoformat())
    result = json.loads(await reader.fetchval("SELECT api.get_job_metrics(71050)"))

    # the test's own trapezoids over the stored samples
    def energy(points):
        pairs = zip(points, points[1:], strict=False)
        return sum((a[1] + b[1]) / 2 * (b[0] - a[0]) for a, b in pairs) / 3600
    p1 = [(10 * i, 100.0 if i < 180 else 200.0) for i in range(361)]
    p2 = [(10 * i, float(i)) for i in range(361) if not 120 <= i < 180]
    assert result["node_energy_watthour"] == pytest.approx({"je3-1": energy(p1),
                                                            "je3-2": energy(p2)})
    assert result["job_energy_watthour"] == pytest.approx(energy(p1) + energy(p2))
    assert result["node_peak_power_watt"] == {"je3-1": 200.0, "je3-2": 360.0}
    assert result["job_peak_power_watt"] == 360.0
    assert result["node_mean_power_watt"]["je3-1"] == pytest.approx(energy(p1))  # 1 hour
    completeness = {(c["device_id"], c["metric_id"]): c for c in result["completeness"]}
    assert completeness[("je3-1", "bmc_node_power_watt")] | {} == {
        "device_id": "je3-1", "metric_id": "bmc_node_power_watt", "stored": 361,
        "expected": 361, "ratio": 1.0, "period_s": 10.0, "max_gap_s": 10.0}
    gap = completeness[("je3-2", "bmc_node_power_watt")]
    assert (gap["stored"], gap["expected"], gap["max_gap_s"]) == (301, 361, 610.0)
    assert completeness[("je3-2", "temp")]["expected"] == 61


async def test_a_job_starting_a_little_ahead_of_our_clock(scheduler, reader):
    """OAR stores whole seconds: a job that started 'now' may start after the server's now."""
    ahead = (datetime.now(UTC) + timedelta(seconds=2)).isoformat()
    await job_start(scheduler, 71060, "ahead-1", ahead)
    assert await get_metrics(reader, job_id=71060) == []
    await job_end(scheduler, 71060, ahead)
