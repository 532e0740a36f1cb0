"""The 1-hour rollup (kwollect.summary_1h), built by kwollect.maintain() from the 5-minute
summary: its values against a direct computation over the raw rows, late rows and compacted
partitions, and how users reach it (get_metrics summary=1h, metrics_by_device_summary_1h,
metrics_by_job_summary_1h), on each storage (stock, TimescaleDB, Citus)."""

from __future__ import annotations

import math
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import aiohttp
import asyncpg
import pytest

from tests.sqlapi import get_metrics, iso, load

BASE = datetime(2019, 5, 5, 10, 0, tzinfo=UTC)
HUGE = [1e308, 1.5e308, -1e308, 1.7e308]  # averages times counts overflow double precision


@pytest.fixture(scope="module")
def kwdb(each_storage):
    """Every test here runs on each storage (stock, TimescaleDB, Citus: tests/fixtures/kwdb.py)."""
    return each_storage


def power(i: int) -> float:
    return math.nan if i % 17 == 5 else 100.0 + (i * 7919 % 2700) / 10


def tiny(i: int) -> float:
    """5e-324 for 30 min, then zeros: the hour's weighted mean is below the smallest double."""
    return 5e-324 if i < 90 else 0.0


SERIES = {  # metric -> value of sample i (one every 20 s for 3 h)
    "ru_power": power,
    "ru_bytes_total": lambda i: 1000.0 * i,
    "ru_tiny": tiny,
    "ru_huge": lambda i: HUGE[i % 4],
    "ru_nan": lambda i: math.nan,
}


def rows_of(device: str, start: datetime, count: int, step_s: int) -> list[tuple]:
    return [(start + timedelta(seconds=step_s * i), device, metric, value(i), None)
            for metric, value in SERIES.items() for i in range(count)]


def expected_hours(rows: list[tuple]) -> dict[tuple[str, datetime], dict]:
    """Per (metric, hour): count, nan_count, avg, min, max, last, from the raw rows."""
    hours: dict[tuple[str, datetime], list[tuple[datetime, float]]] = defaultdict(list)
    for ts, _, metric, value, _ in rows:
        hours[metric, ts.replace(minute=0, second=0, microsecond=0)].append((ts, value))
    out = {}
    for key, samples in hours.items():
        nums = [v for _, v in sorted(samples, key=lambda s: s[0]) if not math.isnan(v)]
        mean = float(sum(Decimal(v) for v in nums) / len(nums)) if nums else None
        out[key] = {"count": len(nums), "nan_count": len(samples) - len(nums), "avg": mean,
                    "min": min(nums, default=None), "max": max(nums, default=None),
                    "last": nums[-1] if nums else None}
    return out


async def settle(admin: asyncpg.Connection) -> None:
    """maintain() until the rollup covers every hour the 5-minute summary covers."""
    for _ in range(50):
        await admin.execute("SELECT kwollect.maintain()")
        if await admin.fetchval(
                "SELECT rollup_watermark >= date_bin('1 hour', watermark, timestamptz 'epoch') "
                "FROM kwollect.summary_state"):
            return
    raise AssertionError("the rollup did not catch up with the summary")


async def rollup(conn: asyncpg.Connection, device: str) -> dict[tuple[str, datetime], dict]:
    rows = await conn.fetch(
        "SELECT metric_id, timestamp, count, nan_count, avg, min, max, last "
        "FROM metrics_summary_1h WHERE device_id = $1", device)
    return {(r["metric_id"], r["timestamp"]): {k: r[k] for k in
                                               ("count", "nan_count", "avg", "min", "max", "last")}
            for r in rows}


def assert_matches(got: dict, expected: dict) -> None:
    assert sorted(got) == sorted(expected)
    for key, want in expected.items():
        have = dict(got[key])
        if want["avg"] is None or have["avg"] is None:
            assert have["avg"] == want["avg"], key
        else:
            assert have["avg"] == pytest.approx(want["avg"], rel=1e-12, abs=0), key
        assert {k: v for k, v in have.items() if k != "avg"} == \
            {k: v for k, v in want.items() if k != "avg"}, key


@pytest.fixture(scope="module")
async def hours(kwdb):
    """Three hours of five series on ru-1, maintained: the raw rows loaded."""
    writer, admin = await kwdb.connect("kwuser"), await kwdb.connect("admin")
    try:
        rows = rows_of("ru-1", BASE, 540, 20)
        await load(writer, rows)
        await settle(admin)
        return rows
    finally:
        await writer.close()
        await admin.close()


async def test_rollup_values_match_a_direct_computation_over_raw_rows(reader, hours):
    """avg weighted by counts (overflowing and underflowing ones too), min, max, last (the
    last number of the hour, NaN skipped), counts of numbers and of NaN."""
    expected = expected_hours(hours)
    got = await rollup(reader, "ru-1")
    assert_matches(got, expected)
    assert got["ru_tiny", BASE]["avg"] == 0.0 and got["ru_huge", BASE]["avg"] == 8e307
    assert got["ru_nan", BASE] == {"count": 0, "nan_count": 180, "avg": None, "min": None,
                                   "max": None, "last": None}


async def test_late_rows_update_their_hour_only(admin, writer, reader, hours):
    """Rows written late into rolled-up hours are rolled up by the next maintenance, from the
    dirty marks: the hour they fall in changes, the others are not recomputed."""
    versions = ("SELECT su.bucket, se.metric_id, su.xmin::text AS x FROM kwollect.summary_1h su "
                "JOIN kwollect.series se USING (series_id) WHERE se.device_id = 'ru-1'")
    before = await admin.fetch(versions)
    late = [(BASE + timedelta(hours=1, seconds=7), "ru-1", "ru_power", -5.0, None),
            (BASE + timedelta(hours=1, minutes=59, seconds=59), "ru-1", "ru_power", 1234.5, None)]
    await load(writer, late)
    await settle(admin)
    assert_matches(await rollup(reader, "ru-1"), expected_hours(hours + late))
    after = {(r["bucket"], r["metric_id"]): r["x"] for r in await admin.fetch(versions)}
    changed = {r["bucket"] for r in before if after[r["bucket"], r["metric_id"]] != r["x"]}
    assert changed == {BASE + timedelta(hours=1)}
    hours.extend(late)


async def test_rollup_of_compacted_partitions_and_late_rows_into_them(admin, writer, reader,
                                                                      hours):
    """Compaction (TimescaleDB: its compression) changes nothing; a late row into a compacted
    hour is rolled up (from the 5-minute summary recomputed over blocks and raw rows)."""
    window = (BASE, BASE + timedelta(hours=3))
    if await admin.fetchval("SELECT kwollect.storage()") == "timescaledb":
        chunks = ("FROM timescaledb_information.chunks WHERE hypertable_name = 'samples' "
                  "AND range_start < $2 AND range_end > $1")
        await admin.execute("SELECT compress_chunk(format('%I.%I', chunk_schema, chunk_name), "
                            "if_not_compressed => true) " + chunks, *window)
        assert await admin.fetchval("SELECT bool_and(is_compressed) " + chunks, *window)
    else:
        parts = [r["name"] for r in await admin.fetch(
            "SELECT name FROM kwollect.partitions WHERE range_start < $2 AND range_end > $1",
            *window)]
        for name in parts:
            await admin.execute("SELECT kwollect.compact_partition($1)", name)
        assert await admin.fetchval(
            "SELECT count(*) FROM kwollect.samples_compact c JOIN kwollect.series s "
            "USING (series_id) WHERE s.device_id = 'ru-1'")
    late = [(BASE + timedelta(hours=2, minutes=30, seconds=1), "ru-1", "ru_power", 9999.0, None)]
    await load(writer, late)
    await settle(admin)
    assert_matches(await rollup(reader, "ru-1"), expected_hours(hours + late))
    hours.extend(late)


async def test_get_metrics_summary_levels(reader, hours):
    """summary: false/true (booleans, as Kwollect 1.x dashboards send), '5min', '1h'."""
    window = {"devices": "ru-1", "metrics": "ru_power,ru_bytes_total",
              "start_time": iso(BASE), "end_time": iso(BASE + timedelta(hours=3))}
    hourly = await reader.fetch(
        "SELECT timestamp, metric_id, value FROM api.get_metrics(devices => $1, metrics => $2, "
        "start_time => $3, end_time => $4, summary => '1h')", *window.values())
    assert [(r["timestamp"], r["metric_id"]) for r in hourly] == [
        (BASE + timedelta(hours=h), m) for h in range(3) for m in ("ru_bytes_total", "ru_power")]
    expected = expected_hours(hours)
    for r in hourly:
        want = expected[r["metric_id"], r["timestamp"]]
        assert r["value"] == pytest.approx(
            want["max"] if r["metric_id"].endswith("_total") else want["avg"], rel=1e-12)
    five = await get_metrics(reader, **window, summary=True)
    assert len(five) == 2 * 36  # 5-minute buckets of 3 hours
    assert [r["timestamp"] for r in five] == sorted(r["timestamp"] for r in five)
    assert await reader.fetchval(
        "SELECT count(*) FROM api.get_metrics(devices => $1, metrics => $2, start_time => $3, "
        "end_time => $4, summary => '5min')", *window.values()) == len(five)
    rates = await reader.fetch(
        "SELECT value FROM api.get_metrics(devices => 'ru-1', metrics => 'ru_bytes_total', "
        "start_time => $1, end_time => $2, summary => '1h', as_rate => true)",
        iso(BASE), iso(BASE + timedelta(hours=3)))
    assert [r["value"] for r in rates] == [None, pytest.approx(50.0), pytest.approx(50.0)]


async def test_a_bad_summary_word_is_refused_with_the_choices(reader):
    with pytest.raises(asyncpg.InvalidParameterValueError, match="summary") as info:
        await reader.fetch("SELECT * FROM api.get_metrics(devices => 'ru-1', "
                           "summary => 'weekly'::text)")
    assert "1h" in info.value.hint


async def test_http_summary_1h_and_the_grafana_view(module_gateway, reader, writer, admin, hours):
    """Over HTTP (any case), and metrics_by_device_summary_1h with aliases summed."""
    await load(writer, [(BASE + timedelta(seconds=20 * i), f"ru-port{p}", "ru_w", 10.0 * p,
                         {"_device_alias": "ru-node"}) for i in range(180) for p in (1, 2)])
    await settle(admin)
    url = (f"{module_gateway.url}/rpc/get_metrics?devices=ru-1,ru-node&metrics=ru_power,ru_w"
           f"&start_time={iso(BASE)}&end_time={iso(BASE + timedelta(minutes=30))}&summary=1H")
    async with aiohttp.ClientSession() as http, http.get(url) as resp:
        assert resp.status == 200, await resp.text()
        body = await resp.json()
    assert [(r["device_id"], r["metric_id"]) for r in body] == [("ru-1", "ru_power"),
                                                                ("ru-node", "ru_w")]
    assert body[1]["value"] == 30.0 and body[1]["labels"]["_device_orig"] == ["ru-port1",
                                                                              "ru-port2"]
    view = await reader.fetch("SELECT timestamp, value, labels FROM metrics_by_device_summary_1h "
                              "WHERE device_id = 'ru-node' AND metric_id = 'ru_w'")
    assert [(r["timestamp"], r["value"]) for r in view] == [(BASE, 30.0)]


async def test_metrics_by_job_summary_1h_gives_the_hours_of_a_job(writer, reader, hours):
    """A job's hours from the hour it started in to its stop time (a running one: to the
    last hour rolled up), per node and metric, as metrics_by_device_summary_1h has them."""
    await writer.executemany(
        "INSERT INTO nodetime_per_job VALUES ($1, $2, $3, 'ru-1')",
        [(12001, BASE + timedelta(minutes=40), BASE + timedelta(hours=2, minutes=10)),
         (12002, BASE + timedelta(hours=2, minutes=5), None)])
    job = ("SELECT timestamp, metric_id, value, labels, start_time, stop_time "
           "FROM metrics_by_job_summary_1h WHERE job_id = $1 "
           "ORDER BY timestamp, metric_id")
    device = ("SELECT timestamp, metric_id, value, labels FROM metrics_by_device_summary_1h "
              "WHERE device_id = 'ru-1' AND timestamp >= $1 ORDER BY timestamp, metric_id")
    done = await reader.fetch(job, 12001)
    assert [(r["timestamp"], r["metric_id"]) for r in done] == [
        (BASE + timedelta(hours=h), m) for h in range(3) for m in sorted(SERIES)]
    same = [(r["timestamp"], r["metric_id"], repr(r["value"]), r["labels"])  # NaN == NaN
            for r in await reader.fetch(device, BASE)]
    assert [(r["timestamp"], r["metric_id"], repr(r["value"]), r["labels"]) for r in done] == same
    assert {(r["start_time"], r["stop_time"]) for r in done} == {
        (BASE + timedelta(minutes=40), BASE + timedelta(hours=2, minutes=10))}
    expected = expected_hours(hours)
    by_key = {(r["metric_id"], r["timestamp"]): r["value"] for r in done}
    hour = BASE + timedelta(hours=1)
    assert by_key["ru_power", hour] == pytest.approx(expected["ru_power", hour]["avg"],
                                                     rel=1e-12)
    assert by_key["ru_bytes_total", hour] == expected["ru_bytes_total", hour]["max"]
    assert math.isnan(by_key["ru_nan", hour])
    running = await reader.fetch(job, 12002)
    assert [(r["timestamp"], r["metric_id"]) for r in running] == [
        (BASE + timedelta(hours=2), m) for m in sorted(SERIES)]


@pytest.mark.parametrize(("level", "view", "width"), [
    ("5min", "metrics_by_job_summary", timedelta(minutes=5)),
    ("1h", "metrics_by_job_summary_1h", timedelta(hours=1))])
async def test_get_metrics_and_the_job_views_agree_on_a_jobs_first_partial_bucket(
        writer, reader, hours, level, view, width):
    """A job that starts inside a bucket: get_metrics(job_id, summary) and the job's
    summary view both give that first, partial bucket (it overlaps the job), then the same
    rows to the end, on every storage."""
    job = 12003 if level == "5min" else 12004
    start = BASE + timedelta(minutes=42, seconds=30)
    await writer.execute("INSERT INTO nodetime_per_job VALUES ($1, $2, $3, 'ru-1')",
                         job, start, BASE + timedelta(hours=2, minutes=20))
    api = await reader.fetch(
        "SELECT timestamp, metric_id, value, labels FROM api.get_metrics(job_id => $1, "
        "summary => $2::text)", job, level)
    rows = await reader.fetch(
        f"SELECT timestamp, metric_id, value, labels FROM {view} "  # noqa: S608 (fixed names)
        "WHERE job_id = $1 ORDER BY timestamp, metric_id", job)
    first = BASE + (start - BASE) // width * width
    assert api[0]["timestamp"] == first < start
    assert [(r["timestamp"], r["metric_id"], repr(r["value"]), r["labels"]) for r in api] == \
        [(r["timestamp"], r["metric_id"], repr(r["value"]), r["labels"]) for r in rows]
    # a window that starts on a bucket's start begins with that bucket, not the one before
    aligned = await reader.fetch(
        "SELECT timestamp FROM api.get_metrics(devices => 'ru-1', metrics => 'ru_power', "
        "start_time => $1, end_time => $2, summary => $3::text)",
        iso(first), iso(first + width), level)
    assert [r["timestamp"] for r in aligned] == [first, first + width]


async def test_months_through_the_1h_rollup(admin, writer, reader):
    """Two days of half-hourly samples in each month of a quarter, read over the quarter:
    one row per hour with data, in order.  (Days, not the whole quarter: 360 partitions
    of 6 h took 70 s to create and maintain on Citus.)"""
    start = datetime(2018, 1, 1, tzinfo=UTC)
    days = (0, 1, 44, 45, 88, 89)
    halves = [start + timedelta(days=d, minutes=30 * i) for d in days for i in range(48)]
    rows = [(ts, "ru-q", "ru_temp", float(i % 40), None) for i, ts in enumerate(halves)]
    await load(writer, rows)
    await settle(admin)
    got = await reader.fetch(
        "SELECT timestamp, value FROM api.get_metrics(devices => 'ru-q', start_time => $1, "
        "end_time => $2, summary => '1h')", iso(start), iso(start + timedelta(days=90)))
    assert [r["timestamp"] for r in got] == halves[::2]
    assert [r["value"] for r in got] == [((2 * h) % 40 + (2 * h + 1) % 40) / 2
                                         for h in range(len(halves) // 2)]
