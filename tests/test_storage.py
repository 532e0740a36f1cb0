"""Storage: the metrics view accepts the reference's INSERT and COPY, partitions appear on
demand for any timestamp, and summaries are maintained incrementally and NaN-aware."""

from __future__ import annotations

import math
from datetime import datetime, timedelta

import asyncpg
import pytest

from tests.sqlapi import T0, UTC, get_metrics, iso, load


async def test_reference_insert_with_defaults(writer):
    await writer.execute(
        "INSERT INTO metrics(timestamp, device_id, metric_id, value, labels) "
        "VALUES ('2020-01-06 14:00:00+00', 'st-3', 'example_metric', 42, "
        "'{\"_device_alias\": \"st-3-admin\"}')")
    await writer.execute("INSERT INTO metrics(device_id, metric_id) VALUES ('st-3', 'bare')")
    rows = await writer.fetch("SELECT * FROM metrics WHERE device_id = 'st-3' ORDER BY metric_id")
    bare, example = rows
    assert math.isnan(bare["value"]) and bare["labels"] == "{}"
    assert abs(bare["timestamp"] - datetime.now(UTC)) < timedelta(minutes=5)
    assert example["value"] == 42 and example["labels"] == '{"_device_alias": "st-3-admin"}'


async def test_null_identity_is_refused_with_context(writer):
    with pytest.raises(asyncpg.NotNullViolationError, match="device_id"):
        await writer.execute("INSERT INTO metrics(metric_id, value) VALUES ('m', 1)")


@pytest.mark.parametrize("when", [datetime(1970, 1, 2, tzinfo=UTC),
                                  datetime(2003, 6, 1, 12, 34, tzinfo=UTC),
                                  datetime(2099, 12, 31, 23, 59, tzinfo=UTC)])
async def test_far_past_and_future_rows_get_a_partition(admin, writer, when):
    await load(writer, [(when, "st-far", "m", 1.0, None)])
    name = await writer.fetchval(
        "SELECT name FROM kwollect.partitions WHERE range_start <= $1 AND range_end > $1", when)
    assert name is not None
    assert await admin.fetchval(
        "SELECT count(*) FROM kwollect_partitions.samples_default") == 0
    rows = await get_metrics(writer, devices="st-far", start_time=iso(when), end_time=iso(when))
    assert [r["timestamp"] for r in rows] == [when]


async def test_rows_in_the_default_partition_are_relocated(admin, writer):
    """A writer's COPY straight into samples never fails: unknown ranges land in the
    default partition, and maintenance gives them a partition of their own."""
    when = datetime(2011, 3, 4, 5, 6, 7, tzinfo=UTC)
    sid = await writer.fetchval("SELECT (kwollect.series_ids('{st-def}', '{m}', '{\"{}\"}'))[1]")
    await writer.copy_records_to_table("samples", schema_name="kwollect",
                                       records=[(when, 7.0, sid)],
                                       columns=["ts", "value", "series_id"])
    assert await admin.fetchval("SELECT count(*) FROM kwollect_partitions.samples_default") == 1
    await admin.execute("SELECT kwollect.maintain()")
    assert await admin.fetchval("SELECT count(*) FROM kwollect_partitions.samples_default") == 0
    rows = await get_metrics(writer, devices="st-def", start_time=iso(when), end_time=iso(when))
    assert [(r["timestamp"], r["value"]) for r in rows] == [(when, 7.0)]


async def test_maintenance_creates_partitions_ahead(admin):
    await admin.execute("SELECT kwollect.maintain()")
    ahead = datetime.now(UTC) + timedelta(hours=2 * 6)
    assert await admin.fetchval("SELECT kwollect.partition_exists($1)", ahead)


async def test_copy_into_metrics_view(writer):
    rows = [(T0 + timedelta(seconds=i), "st-copy", "m", float(i), '{"k": "v"}') for i in range(500)]
    await writer.copy_records_to_table(
        "metrics", records=rows, columns=["timestamp", "device_id", "metric_id", "value", "labels"])
    got = await get_metrics(writer, devices="st-copy", start_time=iso(T0),
                            end_time=iso(T0 + timedelta(hours=1)))
    assert [r["value"] for r in got] == [float(i) for i in range(500)]
    assert got[0]["labels"] == {"k": "v"}


async def summary_rows(conn, device):
    return await conn.fetch(
        "SELECT timestamp, metric_id, count, avg, min, max, last FROM metrics_summary "
        "WHERE device_id = $1 ORDER BY metric_id, timestamp", device)


async def test_summary_stats_nan_aware_and_incremental(admin, writer):
    base = datetime(2022, 2, 2, 10, 0, tzinfo=UTC)
    values = [1.0, 5.0, math.nan, 3.0, 2.0] * 12  # 60 samples, one every 10 s: 2 buckets
    await load(writer, [(base + timedelta(seconds=10 * i), "st-sum", "m", v, None)
                        for i, v in enumerate(values)])
    await load(writer, [(base + timedelta(seconds=10 * i), "st-sum", "s", math.nan,
                         {"value_str": "on"}) for i in range(3)])
    await admin.execute("SELECT kwollect.maintain()")
    rows = await summary_rows(writer, "st-sum")
    m_rows = [r for r in rows if r["metric_id"] == "m"]
    assert [r["timestamp"] for r in m_rows] == [base, base + timedelta(minutes=5)]
    first = m_rows[0]
    assert (first["count"], first["min"], first["max"], first["last"]) == (24, 1.0, 5.0, 2.0)
    assert first["avg"] == pytest.approx(2.75)
    nan_only = [r for r in rows if r["metric_id"] == "s"]
    assert nan_only[0]["count"] == 0 and nan_only[0]["avg"] is None

    # a late row (e.g. replayed after an outage) makes its bucket recomputed
    await load(writer, [(base + timedelta(seconds=1), "st-sum", "m", 100.0, None)])
    await admin.execute("SELECT kwollect.maintain()")
    first = (await summary_rows(writer, "st-sum"))[0]
    assert (first["count"], first["max"]) == (25, 100.0)


async def test_summary_through_get_metrics(admin, writer, reader):
    base = datetime(2022, 3, 3, 10, 0, tzinfo=UTC)
    await load(writer, [(base + timedelta(seconds=10 * i), "st-gs", "power", float(i % 2), None)
                        for i in range(30)])
    await load(writer, [(base + timedelta(seconds=10 * i), "st-gs", "bytes_total", 10.0 * i, None)
                        for i in range(30)])
    for port, watts in (("st-gs-p1", 50.0), ("st-gs-p2", 60.0)):
        await load(writer, [(base + timedelta(seconds=10 * i), port, "w", watts,
                             {"_device_alias": "st-gs-node"}) for i in range(30)])
    await admin.execute("SELECT kwollect.maintain()")
    rows = await get_metrics(reader, devices="st-gs,st-gs-node", start_time=iso(base),
                             end_time=iso(base + timedelta(minutes=10)), summary=True)
    got = {(r["device_id"], r["metric_id"], r["timestamp"]): r for r in rows}
    assert got[("st-gs", "power", base)]["value"] == 0.5
    assert got[("st-gs", "bytes_total", base)]["value"] == 290.0  # counters: max
    node = got[("st-gs-node", "w", base)]
    assert node["value"] == 110.0 and node["labels"]["_device_orig"] == ["st-gs-p1", "st-gs-p2"]


async def test_summary_view_shape(reader):
    rows = await reader.fetch("SELECT * FROM metrics_by_device_summary LIMIT 1")
    assert rows == [] or list(rows[0].keys()) == ["timestamp", "device_id", "metric_id", "value",
                                                   "labels"]


async def test_metrics_by_device_and_by_job_views(writer, reader):
    base = datetime(2022, 4, 4, 10, 0, tzinfo=UTC)
    await load(writer, [(base + timedelta(seconds=i), f"st-v-p{p}", "w", 10.0 * p,
                         {"_device_alias": "st-v-node"}) for i in range(5) for p in (1, 2)])
    await writer.execute("INSERT INTO nodetime_per_job VALUES (7001, $1, $2, 'st-v-node')",
                         base + timedelta(seconds=1), base + timedelta(seconds=3))
    by_device = await reader.fetch(
        "SELECT timestamp, value, labels FROM metrics_by_device WHERE device_id = 'st-v-node' "
        "AND timestamp >= $1 ORDER BY timestamp", base)
    assert [r["value"] for r in by_device] == [30.0] * 5
    assert by_device[0]["labels"] == '{"_device_orig": ["st-v-p1", "st-v-p2"]}'
    by_job = await reader.fetch(
        "SELECT timestamp FROM metrics_by_job WHERE job_id = 7001 ORDER BY timestamp")
    assert [r["timestamp"] for r in by_job] == [base + timedelta(seconds=s) for s in (1, 2, 3)]


async def test_summary_survives_values_whose_sum_overflows(admin, writer):
    """A device reporting values near the float8 limit must not stop every summary."""
    base = datetime(2022, 5, 5, 10, 0, tzinfo=UTC)
    await load(writer, [(base + timedelta(seconds=i), "st-huge", "m", 1.5e308, None)
                        for i in range(3)])
    await load(writer, [(base, "st-small", "m", 2.0, None)])
    await admin.execute("SELECT kwollect.maintain()")
    huge = await summary_rows(writer, "st-huge")
    assert [(r["count"], r["max"]) for r in huge] == [(3, 1.5e308)]
    assert huge[0]["avg"] == pytest.approx(1.5e308)
    assert (await summary_rows(writer, "st-small"))[0]["avg"] == 2.0
