"""api.get_metrics: the reference checklist (items 4-16 of the study) and our fixes."""

from __future__ import annotations

import json
import math
from datetime import datetime, timedelta

import asyncpg
import pytest

from kwollect.gateway.catalog import load_catalog
from tests.fixtures.citus import skip_on_citus
from tests.sqlapi import T0, UTC, get_metrics, iso, load, series, settle_rollup


@pytest.fixture(scope="module")
def kwdb(each_storage):
    """Every test here runs on each storage (stock, TimescaleDB, Citus: tests/fixtures/kwdb.py)."""
    return each_storage


@pytest.fixture(scope="module")
async def data(kwdb):
    """gm-1, gm-2: two metrics every 5 s from T0 for 2 h; one counter; aliased ports."""
    conn = await kwdb.connect("kwuser")
    rows = []
    for dev in ("gm-1", "gm-2"):
        rows += series(dev, "power_watt", T0 - timedelta(hours=1), 3 * 720, 5,
                       value=lambda i: 100.0 + i % 7)
        rows += series(dev, "temp_celsius", T0 - timedelta(hours=1), 3 * 720, 5)
    rows += series("gm-1", "net_bytes_total", T0, 20, 5, value=lambda i: 1000.0 * i)
    rows += series("gmw-port3", "wattmetre_power_watt", T0, 10, 1, value=lambda i: 50.0,
                   labels={"_device_alias": "gm-9"})
    rows += series("gmw-port4", "wattmetre_power_watt", T0, 10, 1, value=lambda i: 60.0,
                   labels={"_device_alias": "gm-9"})
    await load(conn, rows)
    await conn.execute(
        "INSERT INTO nodetime_per_job (job_id, start_time, stop_time, node) VALUES "
        "(901, $1, $2, 'gm-1'), (901, $1, $2, 'gm-2'), (902, $1, NULL, 'gm-2')",
        T0, T0 + timedelta(hours=1))
    await conn.close()


async def test_devices_window_inclusive_and_ordered(reader, data):
    rows = await get_metrics(reader, devices="gm-1,gm-2", start_time=iso(T0),
                             end_time=iso(T0 + timedelta(minutes=5)))
    assert {r["device_id"] for r in rows} == {"gm-1", "gm-2"}
    # 61 samples per series over 5 minutes at 5 s: both bounds are inclusive
    power = [r for r in rows if r["device_id"] == "gm-1" and r["metric_id"] == "power_watt"]
    assert len(power) == 61
    assert power[0]["timestamp"] == T0 and power[-1]["timestamp"] == T0 + timedelta(minutes=5)
    keys = [(r["timestamp"], r["device_id"], r["metric_id"]) for r in rows]
    assert keys == sorted(keys)
    assert list(rows[0]) == ["timestamp", "device_id", "metric_id", "value", "labels"]


async def test_nodes_synonym_and_site_suffix(reader, data):
    window = {"start_time": iso(T0), "end_time": iso(T0 + timedelta(seconds=10))}
    by_devices = await get_metrics(reader, devices="gm-1", **window)
    by_nodes = await get_metrics(reader, nodes="gm-1.lyon.grid5000.fr", **window)
    both = await get_metrics(reader, nodes="gm-1", devices="gm-2.nancy", **window)
    assert by_devices == by_nodes and len(by_devices) == 3 * 3
    assert {r["device_id"] for r in both} == {"gm-1", "gm-2"}


async def test_metrics_filter_is_exact(reader, data):
    rows = await get_metrics(reader, devices="gm-1", metrics="power_watt, temp_celsius",
                             start_time=iso(T0), end_time=iso(T0 + timedelta(seconds=5)))
    assert {r["metric_id"] for r in rows} == {"power_watt", "temp_celsius"}
    assert await get_metrics(reader, devices="gm-1", metrics="power", start_time=iso(T0)) == []


async def test_default_windows(reader, data):
    start_only = await get_metrics(reader, devices="gm-1", metrics="temp_celsius",
                                   start_time=iso(T0))
    assert start_only[0]["timestamp"] == T0
    assert start_only[-1]["timestamp"] == T0 + timedelta(minutes=5)
    end_only = await get_metrics(reader, devices="gm-1", metrics="temp_celsius",
                                 end_time=iso(T0))
    assert end_only[0]["timestamp"] == T0 - timedelta(minutes=5)
    assert end_only[-1]["timestamp"] == T0


async def test_no_times_means_last_five_minutes(writer, reader):
    now = datetime.now(UTC)
    await load(writer, [(now - timedelta(minutes=m), "gm-now", "m", float(m), None)
                        for m in (1, 4, 6, 30)])
    rows = await get_metrics(reader, devices="gm-now")
    assert [r["value"] for r in rows] == [4.0, 1.0]


async def test_times_epoch_naive_utc_and_offsets(reader, data):
    """The server runs in Europe/Paris: naive times must still be read as UTC."""
    expected = await get_metrics(reader, devices="gm-1", metrics="temp_celsius",
                                 start_time=iso(T0), end_time=iso(T0 + timedelta(seconds=10)))
    assert [r["timestamp"] for r in expected] == [T0 + timedelta(seconds=s) for s in (0, 5, 10)]
    epoch = await get_metrics(reader, devices="gm-1", metrics="temp_celsius",
                              start_time=str(T0.timestamp()),
                              end_time=str(T0.timestamp() + 10.5))
    offset = await get_metrics(reader, devices="gm-1", metrics="temp_celsius",
                               start_time="2021-01-01T23:00:00+01:00",
                               end_time="2021-01-01T22:00:10Z")
    assert epoch == expected == offset


async def test_bad_time_is_a_clear_error(reader, data):
    with pytest.raises(asyncpg.InvalidDatetimeFormatError, match="start_time") as err:
        await get_metrics(reader, devices="gm-1", start_time="yesterday-ish")
    assert "ISO 8601" in err.value.hint


async def test_start_after_end_is_an_error(reader, data):
    with pytest.raises(asyncpg.InvalidParameterValueError, match="after end_time"):
        await get_metrics(reader, devices="gm-1", start_time=iso(T0),
                          end_time=iso(T0 - timedelta(seconds=1)))


async def test_missing_devices_or_job(reader):
    with pytest.raises(asyncpg.InvalidParameterValueError, match="'devices', 'nodes' or 'job_id'"):
        await get_metrics(reader, start_time=iso(T0))


async def test_job_window_and_nodes(reader, data):
    rows = await get_metrics(reader, job_id=901, metrics="temp_celsius")
    assert {r["device_id"] for r in rows} == {"gm-1", "gm-2"}
    # an hour is read in many chunks: the order holds across them
    keys = [(r["timestamp"], r["device_id"]) for r in rows]
    assert keys == sorted(keys) and len(keys) == 2 * 721
    assert rows[0]["timestamp"] == T0 and rows[-1]["timestamp"] == T0 + timedelta(hours=1)
    narrowed = await get_metrics(reader, job_id=901, metrics="temp_celsius",
                                 start_time=iso(T0 + timedelta(minutes=59)))
    assert narrowed[0]["timestamp"] == T0 + timedelta(minutes=59)
    assert narrowed[-1]["timestamp"] == T0 + timedelta(hours=1)
    # explicit devices replace the job's nodes (reference semantics)
    replaced = await get_metrics(reader, job_id=901, devices="gm-1", metrics="temp_celsius")
    assert {r["device_id"] for r in replaced} == {"gm-1"}


async def test_running_job_ends_now(reader, data):
    rows = await get_metrics(reader, job_id=902, metrics="temp_celsius")
    assert {r["device_id"] for r in rows} == {"gm-2"}
    assert rows[0]["timestamp"] == T0
    assert rows[-1]["timestamp"] == T0 + timedelta(hours=2) - timedelta(seconds=5)


async def test_unknown_job_is_a_clear_error(reader, data):
    with pytest.raises(asyncpg.PostgresError, match="job 424242 not found") as err:
        await get_metrics(reader, job_id=424242)
    assert err.value.sqlstate == "PT404"  # HTTP 404 through PostgREST and kwollect-api


async def test_alias_rows_are_summed(reader, data):
    rows = await get_metrics(reader, devices="gm-9", start_time=iso(T0),
                             end_time=iso(T0 + timedelta(seconds=2)))
    assert [r["value"] for r in rows] == [110.0, 110.0, 110.0]
    assert rows[0] == {"timestamp": T0, "device_id": "gm-9", "metric_id": "wattmetre_power_watt",
                       "value": 110.0,
                       "labels": {"_device_orig": ["gmw-port3", "gmw-port4"]}}


async def test_summary_1h_of_a_job_an_alias_and_a_counter(admin, reader, data):
    """summary => '1h': one row per series and hour starting in the window (the job's here),
    in the raw rows' order; a counter's hour is its maximum, an alias' its sources summed."""
    await settle_rollup(admin)
    rows = await reader.fetch(
        "SELECT timestamp, device_id, metric_id, value, labels FROM api.get_metrics("
        "job_id => 901, metrics => 'power_watt,net_bytes_total', summary => '1h')")
    power = [sum(100.0 + i % 7 for i in range(h * 720, (h + 1) * 720)) / 720 for h in (1, 2)]
    assert [tuple(r) for r in rows] == [
        (T0, "gm-1", "net_bytes_total", 19000.0, "{}"),
        (T0, "gm-1", "power_watt", pytest.approx(power[0], rel=1e-12), "{}"),
        (T0, "gm-2", "power_watt", pytest.approx(power[0], rel=1e-12), "{}"),
        (T0 + timedelta(hours=1), "gm-1", "power_watt", pytest.approx(power[1], rel=1e-12), "{}"),
        (T0 + timedelta(hours=1), "gm-2", "power_watt", pytest.approx(power[1], rel=1e-12), "{}")]
    alias = await reader.fetch(
        "SELECT timestamp, device_id, value, labels FROM api.get_metrics(devices => 'gm-9', "
        "start_time => $1, end_time => $2, summary => '1h')",
        iso(T0), iso(T0 + timedelta(hours=1)))
    assert [tuple(r) for r in alias] == [
        (T0, "gm-9", 110.0, json.dumps({"_device_orig": ["gmw-port3", "gmw-port4"]}))]


async def test_physical_device_of_an_alias_has_alias_label_stripped(reader, data):
    rows = await get_metrics(reader, devices="gmw-port3", start_time=iso(T0),
                             end_time=iso(T0))
    assert rows == [{"timestamp": T0, "device_id": "gmw-port3",
                     "metric_id": "wattmetre_power_watt", "value": 50.0, "labels": {}}]


async def test_as_rate_counter(reader, data, writer):
    rows = await get_metrics(reader, devices="gm-1", metrics="net_bytes_total",
                             start_time=iso(T0), end_time=iso(T0 + timedelta(seconds=20)),
                             as_rate="true")
    assert rows[0]["value"] is None
    assert [r["value"] for r in rows[1:]] == [200.0] * 4
    # auto: only *_total metrics become rates
    auto = await get_metrics(reader, devices="gm-1", metrics="net_bytes_total,temp_celsius",
                             start_time=iso(T0 + timedelta(seconds=5)),
                             end_time=iso(T0 + timedelta(seconds=10)), as_rate="auto")
    by_metric = {(r["metric_id"], r["timestamp"]): r["value"] for r in auto}
    assert by_metric[("net_bytes_total", T0 + timedelta(seconds=10))] == 200.0
    assert by_metric[("temp_celsius", T0 + timedelta(seconds=10))] == 722.0  # not a rate


async def test_as_rate_across_counter_reset(writer, reader):
    values = [100.0, 600.0, 1100.0, 50.0, 550.0]
    await load(writer, [(T0 + timedelta(seconds=10 * i), "gm-reset", "c_total", v, None)
                        for i, v in enumerate(values)])
    rows = await get_metrics(reader, devices="gm-reset", start_time=iso(T0),
                             end_time=iso(T0 + timedelta(minutes=1)), as_rate="1")
    # after the reset: (running max 1100 - previous 1100 + 50) / 10 s
    assert [r["value"] for r in rows] == [None, 50.0, 50.0, 5.0, 50.0]


async def test_bad_as_rate(reader, data):
    with pytest.raises(asyncpg.InvalidParameterValueError, match="as_rate"):
        await get_metrics(reader, devices="gm-1", as_rate="sometimes")


async def test_nan_and_infinity_values(writer, reader):
    await load(writer, [(T0, "gm-nan", "m", math.nan, None),
                        (T0 + timedelta(seconds=1), "gm-nan", "m", math.inf, None)])
    rows = await get_metrics(reader, devices="gm-nan", start_time=iso(T0))
    assert math.isnan(rows[0]["value"]) and rows[1]["value"] == math.inf


async def test_order_ties_by_device_metric_labels(writer, reader):
    rows = [(T0, "gm-ord-b", "a", 1.0, {"k": "2"}), (T0, "gm-ord-b", "a", 2.0, {"k": "1"}),
            (T0, "gm-ord-a", "z", 3.0, None), (T0, "gm-ord-b", "0", 4.0, None)]
    await load(writer, rows)
    got = await get_metrics(reader, devices="gm-ord-b,gm-ord-a", start_time=iso(T0),
                            end_time=iso(T0))
    assert [r["value"] for r in got] == [3.0, 4.0, 2.0, 1.0]


@pytest.mark.parametrize("param", ["devices", "nodes", "metrics"])
async def test_injection_in_list_parameters_is_inert(reader, data, param):
    payloads = ["gm-1') OR ('1'='1", "gm-1'; DROP VIEW metrics; --", "x\") OR 1=1 --"]
    for payload in payloads:
        params = {"devices": "gm-1"} if param == "metrics" else {}
        params.update({param: payload, "start_time": iso(T0)})
        assert await get_metrics(reader, **params) == []
    assert await reader.fetchval("SELECT count(*) FROM metrics WHERE device_id = 'gm-1'") > 0


@pytest.mark.parametrize("param", ["start_time", "end_time", "as_rate"])
async def test_injection_in_other_parameters_is_rejected(reader, data, param):
    with pytest.raises(asyncpg.DataError):
        await get_metrics(reader, devices="gm-1", **{param: "2021-01-01' OR '1'='1"})


async def test_row_bound_refuses_before_sending(reader, data):
    await reader.execute("SET kwollect.max_rows = 100")
    with pytest.raises(asyncpg.PostgresError, match="over the limit of 100") as err:
        await get_metrics(reader, devices="gm-1,gm-2", start_time=iso(T0),
                          end_time=iso(T0 + timedelta(minutes=30)))
    assert "summary=true" in err.value.hint
    assert err.value.sqlstate == "PT413"  # HTTP 413 through PostgREST and kwollect-api
    # a small request and the summary still work under the same bound
    assert len(await get_metrics(reader, devices="gm-1", metrics="temp_celsius",
                                 start_time=iso(T0), end_time=iso(T0 + timedelta(minutes=1)))) == 13
    await get_metrics(reader, devices="gm-1,gm-2", start_time=iso(T0),
                      end_time=iso(T0 + timedelta(minutes=30)), summary=True)


def scanned_relations(node: dict) -> dict[str, str]:
    """Relations an EXPLAIN ANALYZE (JSON) plan really read, with the node type reading them."""
    found = {}
    if node.get("Relation Name") and node.get("Actual Loops", 0) > 0:
        found[node["Relation Name"]] = node["Node Type"]
    for child in node.get("Plans", []):
        found.update(scanned_relations(child))
    return found


def planned_relations(node: dict) -> set[str]:
    """Relations an EXPLAIN (JSON) plan holds a scan of, whether or not it runs."""
    found = {node["Relation Name"]} if node.get("Relation Name") else set()
    for child in node.get("Plans", []):
        found |= planned_relations(child)
    return found


NOT_ON_CITUS = ("the coordinator's plan is a Citus scan over the shards, and get_metrics a "
                "PL/pgSQL function there (sql/099_citus.sql)")


async def plan_of(reader, hours: float, options: str = "FORMAT JSON", **named: str) -> str:
    """EXPLAIN of get_metrics for gm-1 over `hours` from T0, with more named arguments."""
    extra = "".join(f", {name} => ${i}" for i, name in enumerate(named, 3))
    return await reader.fetchval(
        f"EXPLAIN ({options}) SELECT * FROM api.get_metrics(devices => 'gm-1', "  # noqa: S608
        f"start_time => $1, end_time => $2{extra})",
        iso(T0), iso(T0 + timedelta(hours=hours)), *named.values())


@pytest.mark.parametrize("summary", ["true", "1h"])
async def test_summary_reads_plan_no_raw_partition(kwdb, reader, data, summary):
    """A summary read does not plan the raw partitions: a year of 6-hour partitions made
    each summary call 48-89 ms of planning (docs/storage.md) where it now takes 1-2 ms."""
    skip_on_citus(kwdb, NOT_ON_CITUS)
    plan = await plan_of(reader, 2, summary=summary)
    relations = planned_relations(json.loads(plan)[0]["Plan"])
    assert "summaries" in relations or "summary_1h" in relations, relations
    raw = {name for name in relations
           if name.startswith(("samples_", "compact_", "_hyper_", "compress_hyper_"))
           and not name.endswith("_default")}
    assert not raw, relations
    # the same call reading raw samples plans the partition of its window
    plan = await plan_of(reader, 2, summary="false")
    assert any(name.startswith(("samples_2", "_hyper_"))
               for name in planned_relations(json.loads(plan)[0]["Plan"]))


@pytest.mark.parametrize("summary", ["true", "1h"])
async def test_summary_reads_through_the_gateway_plan_no_raw_partition(kwdb, reader, data,
                                                                       summary):
    """kwollect-api writes an enum argument that is one of its type's labels as that
    label: the planner sees a constant summary, so a summary read over HTTP plans no raw
    partition either.  Any other text goes by its setting, as every argument did."""
    skip_on_citus(kwdb, NOT_ON_CITUS)
    catalog = await load_catalog(reader, ["api"])
    values = {"devices": ["gm-1"], "start_time": [iso(T0)],
              "end_time": [iso(T0 + timedelta(hours=2))], "summary": [summary]}
    call = catalog.bind_text(catalog.resolve("api", "get_metrics", values), values)
    assert f"CAST('{summary}' AS api.summary_mode)" in call.query(as_json=False)
    async with reader.transaction():
        for name, value in call.settings():
            await reader.execute("SELECT set_config($1, $2, true)", name, value)
        plan = await reader.fetchval(f"EXPLAIN (FORMAT JSON) {call.query(as_json=False)}")
    relations = planned_relations(json.loads(plan)[0]["Plan"])
    assert not {name for name in relations
                if name.startswith(("samples_", "compact_", "_hyper_", "compress_hyper_"))
                and not name.endswith("_default")}, relations
    values["summary"] = ["true' OR '1"]
    call = catalog.bind_text(catalog.resolve("api", "get_metrics", values), values)
    assert "OR" not in call.query(as_json=False)


def relation_counts(node: dict) -> dict[str, int]:
    """How many scans of each relation an EXPLAIN (JSON) plan holds."""
    counts: dict[str, int] = {}
    if node.get("Relation Name"):
        counts[node["Relation Name"]] = 1
    for child in node.get("Plans", []):
        for name, n in relation_counts(child).items():
            counts[name] = counts.get(name, 0) + n
    return counts


@pytest.mark.parametrize("as_rate", ["false", "auto"])
async def test_raw_read_plans_each_partition_once(kwdb, reader, data, as_rate):
    """Planning a raw read lays out every partition of its scans (the window is known only
    when it runs): the rows of an own request are its only scans of the samples, so each
    partition is planned once, not five times (300-340 ms of planning per call with a year
    of 6-hour partitions, 68-72 ms now: docs/storage.md).  Rates and aliases are planned
    when such a read runs."""
    skip_on_citus(kwdb, NOT_ON_CITUS)
    plan = await plan_of(reader, 1, as_rate=as_rate)
    counts = {name: n for name, n in relation_counts(json.loads(plan)[0]["Plan"]).items()
              if name.startswith(("samples_", "compact_", "_hyper_"))}
    assert counts and set(counts.values()) == {1}, counts
    # and the rate of a counter still comes out of the function planned at run time
    rows = await get_metrics(reader, devices="gm-1", start_time=iso(T0),
                             end_time=iso(T0 + timedelta(minutes=1)), as_rate=as_rate)
    assert rows


async def test_plan_prunes_partitions_and_uses_the_index(kwdb, reader, data):
    skip_on_citus(kwdb, NOT_ON_CITUS)
    plan = await plan_of(reader, 1 / 6, "ANALYZE, FORMAT JSON")
    root = json.loads(plan)[0]["Plan"]
    scanned = scanned_relations(root)
    if await reader.fetchval("SELECT kwollect.storage()") == "timescaledb":
        # the chunk holding the window only, through its copy of the same index
        chunks = {name: kind for name, kind in scanned.items() if name.startswith("_hyper_")}
        assert len(chunks) == 1, scanned
        assert set(chunks.values()) <= {"Index Scan", "Bitmap Heap Scan"}, scanned
        assert f"{next(iter(chunks))}_samples_series_minute_idx" in plan
        assert '"Function Name": "get_metrics"' not in plan
        return
    samples = {name: kind for name, kind in scanned.items()
               if name.startswith("samples") and not name.startswith("samples_compact")}
    # only the partition holding the window is read, through the (series, minute) index
    # (and compacted blocks through theirs: tests/test_compaction.py)
    assert list(samples) == ["samples_20210101T180000"], scanned
    assert samples["samples_20210101T180000"] in ("Index Scan", "Bitmap Heap Scan")
    assert "samples_20210101T180000_series_id_minute_key_idx" in plan
    # the SQL function is inlined, so a cursor streams its rows instead of a materialised set
    assert '"Function Name": "get_metrics"' not in plan
