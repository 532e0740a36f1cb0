"""available_metrics, insert_metrics, get_job_metrics, job_window and update_promoted_metrics."""

from __future__ import annotations

import json
import math
from datetime import datetime, timedelta

import asyncpg
import pytest

from tests.sqlapi import UTC, get_metrics, iso, load, series, settle_rollup


@pytest.fixture(scope="module")
def kwdb(each_storage):
    """Every test here runs on each storage (stock, TimescaleDB, Citus: tests/fixtures/kwdb.py)."""
    return each_storage


async def available(conn, at=None, params=None):
    rows = await conn.fetch("SELECT * FROM api.available_metrics(coalesce($1, now()), $2::jsonb)",
                            at, json.dumps(params or {}))
    return [(r["device_id"], r["metric_id"]) for r in rows]


@pytest.fixture(scope="module")
async def recent(kwdb):
    conn = await kwdb.connect("kwuser")
    now = datetime.now(UTC)
    rows = [(now - timedelta(seconds=20), dev, met, 1.0, None)
            for dev in ("av-10", "av-2", "av-1", "avswitch-1-eth1", "avswitch-1-eth0")
            for met in ("b_metric", "a_metric")]
    rows += [(now - timedelta(seconds=20), "av-port1", "w", 5.0, {"_device_alias": "av-node"}),
             (now - timedelta(minutes=10), "av-old", "m", 1.0, None)]
    await load(conn, rows)
    await conn.execute("INSERT INTO nodetime_per_job VALUES (8001, $1, NULL, 'av-2')",
                       now - timedelta(hours=1))
    await conn.close()
    return now


async def test_available_metrics_natural_order_without_collapsing(reader, recent):
    got = [pair for pair in await available(reader) if pair[0].startswith("av")]
    assert got == [
        ("av-1", "a_metric"), ("av-1", "b_metric"), ("av-2", "a_metric"), ("av-2", "b_metric"),
        ("av-10", "a_metric"), ("av-10", "b_metric"),
        ("av-node", "w"), ("av-port1", "w"),
        # the reference's DISTINCT ON kept only one of these two
        ("avswitch-1-eth0", "a_metric"), ("avswitch-1-eth0", "b_metric"),
        ("avswitch-1-eth1", "a_metric"), ("avswitch-1-eth1", "b_metric")]


async def test_available_metrics_filters(reader, recent):
    assert await available(reader, params={"devices": ["av-10", "av-node"]}) == [
        ("av-10", "a_metric"), ("av-10", "b_metric"), ("av-node", "w")]
    assert await available(reader, params={"job_id": "8001"}) == [
        ("av-2", "a_metric"), ("av-2", "b_metric")]
    assert ("av-old", "m") in await available(reader, at=recent - timedelta(minutes=9, seconds=30))
    with pytest.raises(asyncpg.InvalidParameterValueError, match="should be JSON array"):
        await available(reader, params={"devices": "av-1"})


async def test_insert_metrics_one_object_and_array(writer):
    one = await writer.fetch(
        "SELECT * FROM api.insert_metrics(device_id => 'in-1', metric_id => 'example_metric', "
        "\"timestamp\" => '2020-01-06 14:00:00', value => 42)")
    assert [(r["timestamp"], r["value"]) for r in one] == [
        (datetime(2020, 1, 6, 14, tzinfo=UTC), 42.0)]
    many = await writer.fetch("SELECT * FROM api.insert_metrics($1::jsonb)", json.dumps([
        {"device_id": "in-2", "metric_id": "example_metric1", "value": 42},
        {"device_id": "in-2", "metric_id": "example_metric2", "value": 22,
         "timestamp": 1578319200.5, "labels": {"unit": "W"}}]))
    assert [(r["metric_id"], r["value"]) for r in many] == [("example_metric1", 42.0),
                                                             ("example_metric2", 22.0)]
    rows = await get_metrics(writer, devices="in-2", start_time="1578319200",
                             end_time="1578319201")
    assert rows == [{"timestamp": datetime(2020, 1, 6, 14, 0, 0, 500000, tzinfo=UTC),
                     "device_id": "in-2", "metric_id": "example_metric2", "value": 22.0,
                     "labels": {"unit": "W"}}]


async def test_insert_metrics_array_is_atomic_and_names_the_bad_row(writer):
    rows = [{"device_id": "in-3", "metric_id": "m", "value": 1},
            {"device_id": "in-3", "value": 2}]
    with pytest.raises(asyncpg.InvalidParameterValueError, match="row 2 is invalid"):
        await writer.fetch("SELECT * FROM api.insert_metrics($1::jsonb)", json.dumps(rows))
    assert await writer.fetchval("SELECT count(*) FROM metrics WHERE device_id = 'in-3'") == 0


async def test_reader_cannot_write(reader):
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await reader.fetch("SELECT * FROM api.insert_metrics(device_id => 'x', metric_id => 'y')")
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await reader.execute("INSERT INTO metrics (device_id, metric_id) VALUES ('x', 'y')")
    for statement in ("INSERT INTO kwollect.samples VALUES (now(), 1, 1)",
                      "DELETE FROM kwollect.series", "INSERT INTO promoted_metrics VALUES ('a')",
                      "SELECT kwollect.ensure_partitions(ARRAY[now()])",
                      "CREATE TABLE public.evil (x int)", "SELECT * FROM kwollect.api_secret"):
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await reader.execute(statement)


async def test_every_public_view_is_readable_by_the_reader_and_the_writer(admin, reader,
                                                                        writer):
    """The compatibility views (metrics_by_job_summary_1h among them) are granted to both
    roles: a view added without its grant fails here, on each storage."""
    views = [r["name"] for r in await admin.fetch(
        "SELECT format('%I.%I', schemaname, viewname) AS name FROM pg_views "
        "WHERE schemaname = 'public' ORDER BY 1")]
    assert {"public.metrics_by_job_summary_1h", "public.metrics_by_device_summary_1h",
            "public.metrics_summary_1h", "public.metrics_by_job_summary"} <= set(views)
    for conn in (reader, writer):
        for view in views:  # names from the catalogue, quoted by format('%I')
            await conn.fetch(f"SELECT * FROM {view} WHERE false")  # noqa: S608


async def test_writer_is_not_owner(writer):
    for statement in ("CREATE TABLE public.evil (x int)", "DROP VIEW metrics",
                      "DELETE FROM kwollect.series", "SELECT * FROM kwollect.api_secret",
                      "TRUNCATE kwollect.samples"):
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await writer.execute(statement)


async def test_no_untrusted_language_is_trusted(admin):
    trusted_untrusted = await admin.fetch(
        "SELECT lanname FROM pg_language WHERE lanpltrusted AND lanname LIKE '%u'")
    assert trusted_untrusted == []


async def test_job_energy_and_requests(admin, writer, reader):
    start = datetime(2023, 5, 5, 10, 0, tzinfo=UTC)
    # node 1: constant 100 W for one hour; node 2: a ramp 0 -> 360 W (average 180 W)
    await load(writer, [(start + timedelta(seconds=60 * i), "je-1", "bmc_node_power_watt", 100.0,
                         None) for i in range(61)])
    await load(writer, [(start + timedelta(seconds=60 * i), "je-2", "bmc_node_power_watt",
                         6.0 * i, None) for i in range(61)])
    await writer.execute("INSERT INTO nodetime_per_job VALUES (9001, $1, $2, 'je-1'), "
                         "(9001, $1, $2, 'je-2')", start, start + timedelta(hours=1))
    await admin.execute("INSERT INTO kwollect.jobmetrics_requests VALUES "
                        "(1, 'SELECT max(value) AS jobnode_maxpower_watt FROM jobmetrics "
                        "WHERE metric_id = ''bmc_node_power_watt''')")
    try:
        result = json.loads(await reader.fetchval("SELECT api.get_job_metrics(9001)"))
    finally:
        await admin.execute("DELETE FROM kwollect.jobmetrics_requests")
    assert result["node_energy_watthour"] == pytest.approx({"je-1": 100.0, "je-2": 180.0})
    assert result["job_energy_watthour"] == pytest.approx(280.0)
    assert result["jobnode_maxpower_watt"] == 360.0
    assert result["method"] == "raw"  # under the row bound: the raw rows, exactly
    with pytest.raises(asyncpg.PostgresError, match="not found") as err:
        await reader.fetchval("SELECT api.get_job_metrics(9999999)")
    assert err.value.sqlstate == "PT404"


async def test_job_window_is_the_window_get_metrics_reads(writer, reader):
    """From the first node's start to the last node's stop; while a node runs, to now (the
    web view picks raw rows or a summary level by its length); an unknown job: PT404."""
    start = datetime(2023, 6, 1, 8, 0, tzinfo=UTC)
    await writer.execute(
        "INSERT INTO nodetime_per_job VALUES (9011, $1, $2, 'jw-1'), (9011, $3, $4, 'jw-2'), "
        "(9012, $1, $2, 'jw-1'), (9012, $3, NULL, 'jw-2')",
        start, start + timedelta(days=3), start + timedelta(minutes=1),
        start + timedelta(days=3, hours=2))
    done = await reader.fetch("SELECT * FROM api.job_window(9011)")
    assert [tuple(r) for r in done] == [(start, start + timedelta(days=3, hours=2), False)]
    before = await reader.fetchval("SELECT now()")
    running = await reader.fetchrow("SELECT * FROM api.job_window(job_id => 9012)")
    assert running["start_time"] == start and running["running"] is True
    assert running["end_time"] >= before
    with pytest.raises(asyncpg.PostgresError, match="job 9999999 not found") as err:
        await reader.fetch("SELECT * FROM api.job_window(9999999)")
    assert err.value.sqlstate == "PT404"


async def test_update_promoted_metrics_keeps_manual_rows(admin, writer):
    await writer.execute("DELETE FROM promoted_metrics")
    await writer.execute("INSERT INTO promoted_metrics (device_id, metric_id) VALUES ('pm-0', 'x')")
    await admin.execute(
        "CREATE OR REPLACE VIEW promoted_metrics_job AS "
        "SELECT * FROM (VALUES (1, 'pm-1', NULL), (2, 'pm-2', 'wattmetre.*')) "
        "AS v(job_id, node, metric_id)")
    try:
        rows = await writer.fetch("SELECT * FROM api.update_promoted_metrics()")
        assert sorted((r["device_id"], r["metric_id"], r["job_id"]) for r in rows) == [
            ("pm-0", "x", None), ("pm-1", ".*", 1), ("pm-2", "wattmetre.*", 2)]
        await admin.execute("CREATE OR REPLACE VIEW promoted_metrics_job AS "
                            "SELECT 2 AS job_id, 'pm-2' AS node, 'wattmetre.*' AS metric_id")
        await writer.fetch("SELECT * FROM api.update_promoted_metrics()")
        rows = await writer.fetch("SELECT device_id FROM promoted_metrics ORDER BY 1")
        assert [r["device_id"] for r in rows] == ["pm-0", "pm-2"]
    finally:
        await admin.execute("CREATE OR REPLACE VIEW promoted_metrics_job AS "
                            "SELECT NULL::integer AS job_id, NULL::text AS node, "
                            "NULL::text AS metric_id WHERE false")
        await writer.execute("DELETE FROM promoted_metrics")


async def test_site_replaces_nodetime_by_job(admin, writer, reader):
    start = datetime(2023, 6, 6, 10, 0, tzinfo=UTC)
    await load(writer, [(start + timedelta(minutes=i), "sj-1", "m", float(i), None)
                        for i in range(10)])
    await admin.execute(
        "CREATE TABLE site_jobs (id int, t0 timestamptz, t1 timestamptz, host text)")
    try:
        # the view keeps its owner (kwuser_owner), which reads the site's table
        await admin.execute("GRANT SELECT ON site_jobs TO kwuser_owner")
        await admin.execute("INSERT INTO site_jobs VALUES (555, $1, $2, 'sj-1.site')",
                            start + timedelta(minutes=2), start + timedelta(minutes=4))
        await admin.execute(
            "CREATE OR REPLACE VIEW nodetime_by_job AS SELECT job_id, start_time, stop_time, "
            "node FROM nodetime_per_job UNION ALL "
            "SELECT id, t0, t1, split_part(host, '.', 1) FROM site_jobs")
        rows = await get_metrics(reader, job_id=555)
        assert [r["value"] for r in rows] == [2.0, 3.0, 4.0]
        assert iso(rows[0]["timestamp"]) == iso(start + timedelta(minutes=2))
    finally:
        # setup's view again: the modules after this one (test_grafana) read jobs through it
        await admin.execute(
            "CREATE OR REPLACE VIEW nodetime_by_job AS SELECT job_id, start_time, stop_time, "
            "node FROM nodetime_per_job")
        await admin.execute("DROP TABLE site_jobs")


async def test_available_metrics_takes_plain_parameters(reader, recent):
    """?devices=...&job_id=... as get_metrics takes them, beside the reference's params JSON."""
    rows = await reader.fetch(
        "SELECT * FROM api.available_metrics(devices => 'av-10, av-node.site')")
    assert [(r["device_id"], r["metric_id"]) for r in rows] == [
        ("av-10", "a_metric"), ("av-10", "b_metric"), ("av-node", "w")]
    rows = await reader.fetch("SELECT * FROM api.available_metrics(job_id => 8001)")
    assert [(r["device_id"], r["metric_id"]) for r in rows] == [
        ("av-2", "a_metric"), ("av-2", "b_metric")]


async def test_job_energy_is_null_with_a_hint_without_power_data(writer, reader):
    """A job whose nodes stored no power: unknown energy, not 0 Wh, and why."""
    start = datetime(2024, 5, 1, 8, 0, tzinfo=UTC)
    await load(writer, [(start + timedelta(seconds=10 * i), "nopow-1", "temp_celsius", 40.0, None)
                        for i in range(30)]
               + [(start + timedelta(seconds=10 * i), "nopow-2", "bmc_node_power_watt", 100.0,
                   None) for i in range(30)])
    await writer.execute("INSERT INTO nodetime_per_job VALUES (8101, $1, $2, 'nopow-1')",
                         start, start + timedelta(minutes=5))
    result = json.loads(await reader.fetchval("SELECT api.get_job_metrics(8101)"))
    assert result["job_energy_watthour"] is None
    assert result["node_energy_watthour"] == {"nopow-1": None}
    assert "bmc_node_power_watt" in result["energy_hint"]
    await writer.execute("INSERT INTO nodetime_per_job VALUES (8101, $1, $2, 'nopow-2')",
                         start, start + timedelta(minutes=5))
    result = json.loads(await reader.fetchval("SELECT api.get_job_metrics(8101)"))
    assert result["node_energy_watthour"]["nopow-1"] is None
    assert result["node_energy_watthour"]["nopow-2"] == pytest.approx(100.0 * 290 / 3600)
    assert result["job_energy_watthour"] == pytest.approx(100.0 * 290 / 3600)
    assert "some nodes" in result["energy_hint"]


def power_w(i: int) -> float:
    """A node's power every 10 s: idle 95 W, a job's phases up to ~300 W, and jitter (a
    deterministic pattern of the shape BMC readings have: plateaus, ramps, noise)."""
    phase = (i // 1500) % 4  # about 4 h each
    base = (95.0, 180.0, 260.0, 140.0)[phase]
    return round(base + 25.0 * math.sin(i / 97.0) + (i * 7919 % 23) - 11.0, 1)


async def job_metrics(conn, job_id: int, max_rows: int | None = None) -> dict:
    async with conn.transaction():
        if max_rows is not None:
            await conn.execute("SELECT set_config('kwollect.max_rows', $1, true)", str(max_rows))
        return json.loads(await conn.fetchval("SELECT api.get_job_metrics($1)", job_id))


async def test_a_long_jobs_figures_come_from_the_summaries(admin, writer, reader):
    """A job of 3 days (about 26,000 samples per series) over a row bound of 5,000: the
    raw read is refused (413), the figures come from the 5-minute summaries with raw rows at
    the edges (method 'summary'), close to the raw figures (read without the bound); peaks,
    stored samples, periods and expected samples are exact.  Aliases are summed as
    get_metrics sums them; late rows (not summarized yet) are read raw."""
    first = datetime(2023, 8, 1, 10, 0, tzinfo=UTC)
    start = first + timedelta(minutes=2, seconds=13)
    stop = start + timedelta(days=3, minutes=7, seconds=31)
    count = 3 * 8640 + 300
    rows = series("jl-1", "bmc_node_power_watt", first, count, 10, power_w)
    rows += [r for r in series("jl-2", "bmc_node_power_watt", first, count, 10,
                               lambda i: power_w(i + 333))
             if not 9000 <= (r[0] - first).total_seconds() / 10 < 9200]  # a 33-minute gap
    rows += series("jl-2", "temp_celsius", first, count // 6, 60, lambda i: 40.0 + i % 5)
    for psu in (1, 2):  # jl-3's power: the sum of its two supplies (an alias)
        rows += series(f"jl-3-psu{psu}", "bmc_node_power_watt", first, count, 10,
                       lambda i, psu=psu: power_w(i + 50 * psu) / 2,
                       labels={"_device_alias": "jl-3"})
    await load(writer, rows)
    await writer.execute("INSERT INTO nodetime_per_job VALUES (9021, $1, $2, 'jl-1'), "
                         "(9021, $1, $2, 'jl-2'), (9021, $1, $2, 'jl-3')", start, stop)
    await settle_rollup(admin)
    # late rows in the middle of the job, not summarized yet: read raw
    await load(writer, series("jl-1", "late_metric", start + timedelta(days=1), 30, 60))

    raw = await job_metrics(reader, 9021)
    summary = await job_metrics(reader, 9021, max_rows=5000)
    for key in ("job_id", "start_time", "end_time", "energy_metric", "energy_hint"):
        assert summary[key] == raw[key]
    # energy and mean power: within 0.1 % (measured here: 0.0012 %, 0.017 % for the node
    # with a gap, 0.0009 % for the alias; docs/jobs.md)
    for key in ("node_energy_watthour", "node_mean_power_watt"):
        assert summary[key] == pytest.approx(raw[key], rel=1e-3)
    assert summary["job_energy_watthour"] == pytest.approx(raw["job_energy_watthour"], rel=1e-3)
    # peaks: the buckets' max, exact; an alias's, the sum of its sources' max (at least it)
    peaks = summary["node_peak_power_watt"]
    assert {n: peaks[n] for n in ("jl-1", "jl-2")} == {
        n: raw["node_peak_power_watt"][n] for n in ("jl-1", "jl-2")}
    assert peaks["jl-3"] >= raw["node_peak_power_watt"]["jl-3"]
    # completeness: samples stored (late rows included), periods and expected ones exact,
    # the longest gap to within a 5-minute bucket
    assert [(c["device_id"], c["metric_id"]) for c in summary["completeness"]] == [
        ("jl-1", "bmc_node_power_watt"), ("jl-1", "late_metric"), ("jl-2", "bmc_node_power_watt"),
        ("jl-2", "temp_celsius"), ("jl-3", "bmc_node_power_watt")]
    for s, r in zip(summary["completeness"], raw["completeness"], strict=True):
        assert s | {"max_gap_s": None} == r | {"max_gap_s": None}
        assert abs(s["max_gap_s"] - r["max_gap_s"]) < 300
    assert raw["completeness"][1]["stored"] == 30
    assert raw["completeness"][2]["max_gap_s"] == 2010.0
    with pytest.raises(asyncpg.PostgresError, match="not found") as err:
        await job_metrics(reader, 9999999, max_rows=5000)
    assert err.value.sqlstate == "PT404"


async def test_a_recent_jobs_minutes_past_the_summaries_are_read_raw(admin, writer, reader):
    """A job of 2 days that ended a minute ago: its last minutes are past the summary's
    watermark, read raw with the partial buckets at the edges; stored samples exact."""
    now = datetime.now(UTC).replace(microsecond=0)
    first = now - timedelta(days=2, minutes=10)
    count = int((now - first).total_seconds()) // 10
    await load(writer, series("jr-1", "bmc_node_power_watt", first, count, 10, power_w))
    await settle_rollup(admin)
    await writer.execute("INSERT INTO nodetime_per_job VALUES (9022, $1, $2, 'jr-1')",
                         first + timedelta(seconds=7), now - timedelta(minutes=1))
    watermark = await admin.fetchval("SELECT watermark FROM kwollect.summary_state")
    assert now - timedelta(minutes=1) > watermark > now - timedelta(minutes=15)
    raw = await job_metrics(reader, 9022)
    summary = await job_metrics(reader, 9022, max_rows=5000)
    assert (raw["method"], summary["method"]) == ("raw", "summary")
    assert summary["node_energy_watthour"]["jr-1"] == pytest.approx(
        raw["node_energy_watthour"]["jr-1"], rel=1e-3)
    assert summary["node_peak_power_watt"] == raw["node_peak_power_watt"]
    assert summary["completeness"] == raw["completeness"]
