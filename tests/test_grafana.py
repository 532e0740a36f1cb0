"""The Grafana dashboard's SQL, interpolated as Grafana does, run as the read-only role.

Grafana itself cannot run here: tests/grafana_interpolate.py reproduces its variable,
global and macro substitution, and every query of grafana/kwollect_dashboard.json is run
against a populated database with the role the provisioned datasource uses.
"""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml

from tests.grafana_interpolate import Variable, interpolate, template
from tests.sqlapi import load_job, series, settle_rollup


@pytest.fixture(scope="module")
def kwdb(each_storage):
    """Every test here runs on each storage (stock, TimescaleDB, Citus: tests/fixtures/kwdb.py)."""
    return each_storage


GRAFANA = Path(__file__).parent.parent / "grafana"
DASHBOARD = json.loads((GRAFANA / "kwollect_dashboard.json").read_text())
JOB = 9101
STEP_S = 10


def query(panel_title: str, ref: str) -> str:
    for panel in DASHBOARD["panels"]:
        if panel["title"] == panel_title:
            return next(t["rawSql"] for t in panel["targets"] if t["refId"] == ref)
    raise KeyError(panel_title)


def variable_query(name: str) -> str:
    return next(v["query"] for v in DASHBOARD["templating"]["list"] if v["name"] == name)


@pytest.fixture(scope="module")
async def grafana_data(kwdb):
    """Job 9101 on gf-1 and gf-2 since a 5-minute boundary 50 minutes ago, still running."""
    now = datetime.now(UTC).replace(microsecond=0)
    start = now - timedelta(minutes=50)
    start = start.replace(minute=start.minute - start.minute % 5, second=0)
    count = int((now - start).total_seconds()) // STEP_S
    rows = series("gf-1", "bmc_node_power_watt", start, count, STEP_S,
                  value=lambda i: 90.0 if i % 2 == 0 else 110.0)
    rows += series("gf-2", "bmc_node_power_watt", start, count, STEP_S, value=lambda i: 200.0)
    for port in ("eth0", "eth1"):
        rows += series("gf-1", "net_bytes_total", start, count, STEP_S,
                       value=lambda i: 1000.0 * i, labels={"port": port})
    rows += series("gf-3", "bmc_node_power_watt", start, count, STEP_S, value=lambda i: 50.0)
    await load_job(kwdb, rows, JOB, ["gf-1", "gf-2"], start)
    admin = await kwdb.connect("admin")
    await admin.execute("SELECT kwollect.maintain()")
    await admin.close()
    return {"now": now, "start": start, "count": count}


async def run(kwdb, sql: str, variables: dict[str, Variable], start: datetime,
              end: datetime) -> list[dict]:
    conn = await kwdb.connect("kwuser_ro")
    try:
        return [dict(r) for r in await conn.fetch(interpolate(sql, variables, start, end))]
    finally:
        await conn.close()


def variables(job: str = "", devices: list[str] | None = None,
              metric: str = "bmc_node_power_watt") -> dict[str, Variable]:
    return {"job": Variable(job), "device_id": Variable(devices or [], multi=True),
            "metric_id": Variable(metric, multi=True)}


def by_series(rows: list[dict]) -> dict[str, list[tuple[datetime, float]]]:
    out: dict[str, list[tuple[datetime, float]]] = {}
    for row in rows:
        out.setdefault(row["metric"], []).append((row["time"], row["value"]))
    return out


def numbers(points: list[tuple[datetime, float]]) -> list[float]:
    """The values Grafana draws: NULL (a counter's first sample) and NaN are gaps."""
    return [value for _, value in points if value is not None and not math.isnan(value)]


def test_dashboard_json_carries_what_grafana_requires():
    assert DASHBOARD["uid"] == "kwollect" and DASHBOARD["title"]
    assert isinstance(DASHBOARD["schemaVersion"], int) and DASHBOARD["schemaVersion"] >= 36
    assert {"from", "to"} <= DASHBOARD["time"].keys()
    ids = [p["id"] for p in DASHBOARD["panels"]]
    assert len(ids) == len(set(ids))
    for panel in DASHBOARD["panels"]:
        assert panel["type"] in {"timeseries", "table", "stat"}
        assert {"x", "y", "w", "h"} <= panel["gridPos"].keys()
        assert panel["datasource"]["type"] == "grafana-postgresql-datasource"
        for target in panel["targets"]:
            assert target["refId"] and target["rawQuery"] and target["rawSql"].strip()
            assert target["format"] in {"time_series", "table"}
    names = [v["name"] for v in DASHBOARD["templating"]["list"]]
    assert names == ["datasource", "job", "device_id", "metric_id"]
    repeated = [p for p in DASHBOARD["panels"] if p.get("repeat")]
    assert [p["repeat"] for p in repeated] == ["metric_id"]


def test_provisioning_uses_the_read_only_role_and_no_password_in_clear():
    source = yaml.safe_load((GRAFANA / "provisioning/datasources/kwollect.yaml").read_text())
    ds = source["datasources"][0]
    assert ds["user"] == "kwuser_ro" and ds["type"] == "grafana-postgresql-datasource"
    assert ds["secureJsonData"]["password"].startswith("$__file{")
    provider = yaml.safe_load((GRAFANA / "provisioning/dashboards/kwollect.yaml").read_text())
    assert provider["providers"][0]["type"] == "file"


async def test_device_variable_lists_a_jobs_nodes_in_natural_order(kwdb, grafana_data):
    end = grafana_data["now"]
    rows = await run(kwdb, variable_query("device_id"), variables(job=str(JOB)),
                     end - timedelta(minutes=15), end)
    assert [r["device_id"] for r in rows] == ["gf-1", "gf-2"]


async def test_metric_variable_follows_the_selected_devices(kwdb, grafana_data):
    end = grafana_data["now"]
    rows = await run(kwdb, variable_query("metric_id"), variables(devices=["gf-1"]),
                     end - timedelta(minutes=15), end)
    assert [r["metric_id"] for r in rows] == ["bmc_node_power_watt", "net_bytes_total"]
    rows = await run(kwdb, variable_query("metric_id"), variables(devices=["gf-3"]),
                     end - timedelta(minutes=15), end)
    assert [r["metric_id"] for r in rows] == ["bmc_node_power_watt"]


async def test_short_range_plots_raw_samples_one_series_per_device(kwdb, grafana_data):
    end = grafana_data["now"]
    begin = end - timedelta(minutes=15)
    v = variables(devices=["gf-1", "gf-2"])
    got = by_series(await run(kwdb, query("$metric_id", "A"), v, begin, end))
    assert sorted(got) == ["gf-1", "gf-2"]
    assert {value for _, value in got["gf-1"]} == {90.0, 110.0}
    assert {value for _, value in got["gf-2"]} == {200.0}
    times = [t for t, _ in got["gf-2"]]
    assert times == sorted(times) and begin <= times[0] and times[-1] <= end
    assert len(times) >= 15 * 60 // STEP_S - 2
    assert await run(kwdb, query("$metric_id", "B"), v, begin, end) == []


async def test_counters_are_rates_and_labels_name_the_series(kwdb, grafana_data):
    end = grafana_data["now"]
    v = variables(devices=["gf-1"], metric="net_bytes_total")
    got = by_series(await run(kwdb, query("$metric_id", "A"), v, end - timedelta(minutes=10),
                              end))
    assert sorted(got) == ['gf-1 {"port": "eth0"}', 'gf-1 {"port": "eth1"}']
    rates = numbers(got['gf-1 {"port": "eth0"}'])
    assert rates and all(rate == pytest.approx(1000.0 / STEP_S) for rate in rates)


async def test_long_range_plots_summaries_with_min_and_max(kwdb, grafana_data):
    end = grafana_data["now"]
    begin = grafana_data["start"]
    v = variables(devices=["gf-1"])
    avg = by_series(await run(kwdb, query("$metric_id", "A"), v, begin, end))
    band = by_series(await run(kwdb, query("$metric_id", "B"), v, begin, end))
    assert list(avg) == ["gf-1 avg"]
    assert sorted(band) == ["gf-1 max", "gf-1 min"]
    full = [(t, value) for t, value in avg["gf-1 avg"] if t + timedelta(minutes=5) < end]
    assert len(full) >= 8
    assert all(t.minute % 5 == 0 and t.second == 0 for t, _ in full)
    assert all(value == pytest.approx(100.0) for _, value in full)
    assert {value for _, value in band["gf-1 min"]} == {90.0}
    assert {value for _, value in band["gf-1 max"]} == {110.0}


HOURLY = datetime(2022, 3, 1, tzinfo=UTC)


@pytest.fixture(scope="module")
async def hourly_data(kwdb):
    """gf-h1: power alternating 90 and 110 W and a counter, every 30 s for 3 hours from
    HOURLY, summarized and rolled up."""
    rows = series("gf-h1", "bmc_node_power_watt", HOURLY, 360, 30,
                  value=lambda i: 90.0 if i % 2 == 0 else 110.0)
    rows += series("gf-h1", "net_bytes_total", HOURLY, 360, 30, value=lambda i: 1000.0 * i)
    await load_job(kwdb, rows, JOB + 1, ["gf-h1"], HOURLY, HOURLY + timedelta(hours=3))
    admin = await kwdb.connect("admin")
    try:
        await settle_rollup(admin)
    finally:
        await admin.close()


@pytest.mark.parametrize(("days", "level"), [(7, "5min"), (7.01, "1h"), (92, "1h")])
async def test_ranges_over_a_week_plot_the_1h_rollup(kwdb, hourly_data, days, level):
    """Up to 7 days: 5-minute summaries (2,016 points per series at most); beyond, the 1-hour
    rollup, with its min and max band from metrics_summary_1h and counters as rates."""
    end = HOURLY + timedelta(hours=3)
    begin = end - timedelta(days=days)
    v = variables(devices=["gf-h1"])
    avg = by_series(await run(kwdb, query("$metric_id", "A"), v, begin, end))
    five = by_series(await run(kwdb, query("$metric_id", "B"), v, begin, end))
    hour = by_series(await run(kwdb, query("$metric_id", "C"), v, begin, end))
    step = timedelta(hours=1) if level == "1h" else timedelta(minutes=5)
    buckets = [HOURLY + step * i for i in range(timedelta(hours=3) // step)]
    assert avg == {"gf-h1 avg": [(t, 100.0) for t in buckets]}
    band = hour if level == "1h" else five
    assert band == {"gf-h1 max": [(t, 110.0) for t in buckets],
                    "gf-h1 min": [(t, 90.0) for t in buckets]}
    assert (five if level == "1h" else hour) == {}
    rates = by_series(await run(kwdb, query("$metric_id", "A"),
                                variables(devices=["gf-h1"], metric="net_bytes_total"), begin, end))
    assert list(rates) == ["gf-h1"]
    assert numbers(rates["gf-h1"]) == [pytest.approx(1000.0 / 30)] * (len(buckets) - 1)


async def test_a_job_alone_selects_its_nodes_and_window(kwdb, grafana_data):
    end = grafana_data["now"]
    rows = await run(kwdb, query("$metric_id", "A"), variables(job=f" {JOB} "),
                     end - timedelta(minutes=10), end)
    assert sorted(by_series(rows)) == ["gf-1", "gf-2"]
    band = await run(kwdb, query("$metric_id", "B"), variables(job=str(JOB)),
                     grafana_data["start"] - timedelta(hours=1), end)
    assert sorted(by_series(band)) == ["gf-1 max", "gf-1 min", "gf-2 max", "gf-2 min"]


async def test_energy_panel_gives_each_nodes_watt_hours(kwdb, grafana_data):
    end = grafana_data["now"]
    title = next(p["title"] for p in DASHBOARD["panels"] if p["type"] == "table")
    rows = await run(kwdb, query(title, "A"), variables(job=str(JOB)),
                     end - timedelta(minutes=15), end)
    hours = (grafana_data["count"] - 1) * STEP_S / 3600
    got = {r["node"]: float(r["energy (Wh)"]) for r in rows}
    assert got == {"gf-1": pytest.approx(100.0 * hours, abs=1e-3),
                   "gf-2": pytest.approx(200.0 * hours, abs=1e-3)}
    assert await run(kwdb, query(title, "A"), variables(job=""), end - timedelta(minutes=5),
                     end) == []
    assert await run(kwdb, query(title, "A"), variables(job="424242"),
                     end - timedelta(minutes=5), end) == []


@pytest.mark.parametrize("job", ["1'; DROP TABLE nodetime_per_job; --", "$$", "${job}", "1 OR 1=1"])
async def test_the_job_textbox_cannot_inject_sql(kwdb, grafana_data, job):
    end = grafana_data["now"]
    for sql in (query("$metric_id", "A"), variable_query("device_id")):
        rows = await run(kwdb, sql, variables(job=job), end - timedelta(minutes=5), end)
        assert rows == [] or "device_id" in rows[0]


def test_variable_formats_quote_as_grafana_does():
    v = {"d": Variable(["a'b", "c"], multi=True), "j": Variable("1'2")}
    assert template("ARRAY[$d]", v) == "ARRAY['a''b','c']"
    assert template("${j:sqlstring} $j ${d:csv}", v) == "'1''2' 1'2 a'b,c"


async def test_kwollect_1x_dashboard_query_shape_still_works(kwdb, grafana_data):
    """The reference dashboard's panel query: boolean summary and as_rate arguments."""
    legacy = """SELECT timestamp AS time, CONCAT(device_id, ' ', labels - '_metric_scrape_time')
                AS metric, value
         FROM api.get_metrics(
             job_id => nullif('$job_str', '')::int,
             devices => '${device_id:csv}', metrics => '$metric_id',
             start_time => to_timestamp($__unixEpochFrom())::text,
             end_time => to_timestamp($__unixEpochTo())::text,
             summary => (($__unixEpochTo() - $__unixEpochFrom()) / (30 * 60))::boolean,
             as_rate => '$metric_id' LIKE '%_total')
         ORDER BY 1"""
    end = grafana_data["now"]
    v = {"job_str": Variable(""), "device_id": Variable(["gf-1"], multi=True),
         "metric_id": Variable("net_bytes_total")}
    got = by_series(await run(kwdb, legacy, v, end - timedelta(minutes=10), end))
    assert sorted(got) == ['gf-1 {"port": "eth0"}', 'gf-1 {"port": "eth1"}']
    rates = numbers(got['gf-1 {"port": "eth0"}'])
    assert rates and all(rate == pytest.approx(1000.0 / STEP_S) for rate in rates)


async def test_the_1x_arguments_work_over_http_too(module_gateway, grafana_data):
    """The seven arguments the 1.x dashboards pass, as text over HTTP (as_rate=false)."""
    import aiohttp

    end = grafana_data["now"]
    params = {"job_id": str(JOB), "devices": "gf-2", "metrics": "bmc_node_power_watt",
              "start_time": str(int((end - timedelta(minutes=2)).timestamp())),
              "end_time": str(int(end.timestamp())), "summary": "false", "as_rate": "false"}
    async with aiohttp.ClientSession() as http, \
            http.get(f"{module_gateway.url}/rpc/get_metrics", params=params) as response:
        assert response.status == 200, await response.text()
        rows = await response.json()
    assert rows and {r["value"] for r in rows} == {200.0}


async def test_the_dashboards_1h_rows_over_http(module_gateway, kwdb, hourly_data):
    """What the panel draws over a quarter is what /rpc/get_metrics?summary=1h answers (the
    web view and `kwollect get --summary 1h` take that path)."""
    import aiohttp

    end = HOURLY + timedelta(hours=3)
    begin = end - timedelta(days=92)
    panel = await run(kwdb, query("$metric_id", "A"), variables(job=str(JOB + 1)), begin, end)
    params = {"job_id": str(JOB + 1), "metrics": "bmc_node_power_watt", "summary": "1h",
              "start_time": str(int(begin.timestamp())), "end_time": str(int(end.timestamp()))}
    async with aiohttp.ClientSession() as http, \
            http.get(f"{module_gateway.url}/rpc/get_metrics", params=params) as response:
        assert response.status == 200, await response.text()
        rows = await response.json()
    assert [(datetime.fromisoformat(r["timestamp"]), r["value"]) for r in rows] == \
        [(r["time"], r["value"]) for r in panel]
    assert len(rows) == 3
