"""Compaction of old partitions on stock PostgreSQL (sql/025_compaction.sql): lossless bit for
bit, invisible to every reader, late rows merged by the next maintenance, and atomic when
the server process doing it is killed."""

from __future__ import annotations

import asyncio
import math
import os
import random
import signal
import struct
from datetime import datetime, timedelta

import asyncpg
import pytest

from tests.sqlapi import UTC, load

START = datetime(2019, 3, 1, 4, 30, tzinfo=UTC)  # two hours across a partition boundary
END = START + timedelta(hours=2)
SPECIAL = [math.nan, math.inf, -math.inf, -0.0, 0.0, 0.1 + 0.2, 1e300, 1e-300, -1.5, 2.5]


def dataset(prefix: str, seed: int) -> list[tuple]:
    """Kwollect-shaped series with every kind of value and timestamp the encoder must keep."""
    rng = random.Random(seed)
    rows = []
    counter = 1e12 * rng.random()
    for s in range(0, 7200, 2):
        ts = START + timedelta(seconds=s, microseconds=rng.randrange(20_000))
        dev = f"{prefix}-1"
        counter += rng.randrange(10**6)
        rows += [(ts, dev, "power_watt", round(100 + rng.random() * 270, 1), None),
                 (ts, dev, "net_bytes_total", counter, None),
                 (ts, dev, "temp_celsius", float(rng.randrange(30, 60)), None),
                 (ts, dev, "odd_values", rng.choice(SPECIAL) * rng.choice([1, 3.7]), None),
                 (ts, f"{prefix}-port3", "wattmetre_power_watt", round(rng.random() * 50, 1),
                  {"_device_alias": f"{prefix}-9"}),
                 (ts, f"{prefix}-port4", "wattmetre_power_watt", 60.0,
                  {"_device_alias": f"{prefix}-9", "unit": "W"})]
        if s % 600 == 0:  # a duplicate timestamp, and an irregular extra sample
            rows.append((ts, dev, "power_watt", 1.0, None))
            rows.append((ts + timedelta(microseconds=333_333), dev, "power_watt", 2.0, None))
    # a sparse, irregular series with a long gap
    rows += [(START + timedelta(seconds=s * 37.000001), f"{prefix}-1", "sparse", float(s), None)
             for s in range(0, 200) if s % 50 < 40]
    return rows


def bits(value: float | None) -> bytes | None:
    return None if value is None else struct.pack(">d", value)


def ties_sorted(rows: list[tuple]) -> list[tuple]:
    """Rows in their order, except that samples of one series at one timestamp (whose order
    no reader defines) are put in the order of their value's bytes."""
    out: list[tuple] = []
    for row in rows:
        out.append(row)
        i = len(out) - 1
        while i > 0 and out[i - 1][:3] + out[i - 1][4:] == row[:3] + row[4:] \
                and (out[i - 1][3] or b"") > (row[3] or b""):
            out[i - 1], out[i] = out[i], out[i - 1]
            i -= 1
    return out


async def snapshot(conn: asyncpg.Connection, prefix: str) -> dict[str, list]:
    """Everything a user can read about the data set, values as their 8 bytes."""
    devices = f"{prefix}-1,{prefix}-port3,{prefix}-port4,{prefix}-9"
    window = (START.isoformat(), END.isoformat())
    out = {}
    for name, extra in [("raw", ""), ("summary", ", summary => true"),
                        # (power_watt has duplicate timestamps: their rates depend on
                        # an order of ties that no reader defines)
                        ("rate", ", as_rate => 'true', metrics => 'net_bytes_total,"
                                 "temp_celsius,odd_values,wattmetre_power_watt,sparse'")]:
        rows = await conn.fetch(
            "SELECT \"timestamp\", device_id, metric_id, value, labels FROM api.get_metrics("  # noqa: S608
            f"devices => $1, start_time => $2, end_time => $3{extra})",
            devices, *window)
        out[name] = ties_sorted([(r[0], r[1], r[2], bits(r[3]), r[4]) for r in rows])
    for view in ("metrics", "metrics_by_device", "metrics_by_device_summary"):
        rows = await conn.fetch(
            f"SELECT \"timestamp\", device_id, metric_id, value, labels FROM {view} "  # noqa: S608
            "WHERE device_id LIKE $1 ORDER BY 1, 2, 3, labels::text, float8send(value)",
            prefix + "-%")
        out[view] = [(r[0], r[1], r[2], bits(r[3]), r[4]) for r in rows]
    rows = await conn.fetch(
        "SELECT \"timestamp\", device_id, metric_id, value, labels FROM metrics_by_job "
        "WHERE job_id = $1 ORDER BY 1, 2, 3, labels::text, float8send(value)", job_id(prefix))
    out["metrics_by_job"] = [(r[0], r[1], r[2], bits(r[3]), r[4]) for r in rows]
    out["available"] = await conn.fetch(
        "SELECT * FROM api.available_metrics($1, '{}')", START + timedelta(minutes=30))
    return out


def job_id(prefix: str) -> int:
    return 7000 + sum(map(ord, prefix))


async def prepare(admin, writer, prefix: str, seed: int) -> list[str]:
    await load(writer, dataset(prefix, seed))
    await writer.execute(
        "INSERT INTO nodetime_per_job (job_id, start_time, stop_time, node) "
        "VALUES ($1, $2, $3, $4)", job_id(prefix), START + timedelta(minutes=20),
        START + timedelta(minutes=100), f"{prefix}-9")
    await admin.execute("SELECT kwollect.refresh_summary()")
    return [r[0] for r in await admin.fetch(
        "SELECT name FROM kwollect.partitions WHERE range_start < $2 AND range_end > $1 "
        "ORDER BY range_start", START, END)]


async def compacted_rows(admin, prefix: str) -> tuple[int, int]:
    """(samples in blocks, raw samples) of the data set's series."""
    return tuple(await admin.fetchrow(
        "SELECT (SELECT coalesce(sum(c.n), 0) FROM kwollect.samples_compact c "
        "        JOIN kwollect.series s USING (series_id) WHERE s.device_id LIKE $1), "
        "       (SELECT count(*) FROM kwollect.samples x "
        "        JOIN kwollect.series s USING (series_id) WHERE s.device_id LIKE $1)",
        prefix + "-%"))


async def test_compaction_is_lossless_and_transparent(admin, writer, reader):
    parts = await prepare(admin, writer, "cpa", 1)
    assert len(parts) == 2
    before = await snapshot(reader, "cpa")
    assert len(before["raw"]) > 20_000 and before["summary"] and before["metrics_by_job"]
    total = len(dataset("cpa", 1))
    assert await compacted_rows(admin, "cpa") == (0, total)

    for name in parts:
        await admin.execute("SELECT kwollect.compact_partition($1)", name)

    assert await compacted_rows(admin, "cpa") == (total, 0)
    assert await snapshot(reader, "cpa") == before
    # one block per series and hour; integers stored in a byte or two where they fit
    kinds = dict(await admin.fetch(
        "SELECT s.metric_id, max(coalesce(length((c.v_off).c::text), 0)) > 0 "
        "FROM kwollect.samples_compact c JOIN kwollect.series s USING (series_id) "
        "WHERE s.device_id = 'cpa-1' GROUP BY 1"))
    assert kinds["temp_celsius"] and not kinds["odd_values"]
    assert await admin.fetchval(
        "SELECT count(*) FROM kwollect.samples_compact c JOIN kwollect.series s "
        "USING (series_id) WHERE s.device_id = 'cpa-1' AND s.metric_id = 'power_watt'") == 3


async def test_late_rows_are_merged_by_the_next_maintenance(admin, writer, reader):
    parts = await prepare(admin, writer, "cpl", 2)
    before = await snapshot(reader, "cpl")
    for name in parts:
        await admin.execute("SELECT kwollect.compact_partition($1)", name)
    late = [(START + timedelta(minutes=10, microseconds=7), "cpl-1", "power_watt", -0.0, None),
            (START + timedelta(minutes=95), "cpl-1", "new_metric", 3.25, {"k": "v"})]
    await load(writer, late)
    await admin.execute("SELECT kwollect.refresh_summary()")
    with_late = await snapshot(reader, "cpl")
    assert len(with_late["raw"]) == len(before["raw"]) + 2
    assert await compacted_rows(admin, "cpl") == (len(dataset("cpl", 2)), 2)

    await admin.execute("SELECT kwollect.maintain()")

    assert await compacted_rows(admin, "cpl") == (len(dataset("cpl", 2)) + 2, 0)
    for name in parts:  # the emptied partitions gave their space back
        assert await admin.fetchval(
            "SELECT pg_total_relation_size(format('kwollect_partitions.%I', $1::text))",
            name) <= 16384
    assert await snapshot(reader, "cpl") == with_late
    assert await admin.fetchval(
        "SELECT count(*) FROM kwollect.samples_compact c JOIN kwollect.series s "
        "USING (series_id) WHERE s.device_id = 'cpl-1' AND s.metric_id = 'power_watt'") == 3


async def test_compaction_killed_midway_loses_and_duplicates_nothing(kwdb, admin, writer, reader):
    parts = await prepare(admin, writer, "cpk", 3)
    before = await snapshot(reader, "cpk")
    await reader.close()
    # The compacting backend blocks after it took the raw rows (uncommitted) and before it
    # writes the blocks: a lock held on samples_compact stops it there.
    blocker = await kwdb.connect("admin")
    tx = blocker.transaction()
    await tx.start()
    await blocker.execute("LOCK TABLE kwollect.samples_compact IN EXCLUSIVE MODE")
    worker = await kwdb.connect("admin")
    pid = await worker.fetchval("SELECT pg_backend_pid()")
    task = asyncio.ensure_future(worker.execute("SELECT kwollect.compact_partition($1)", parts[0]))
    for _ in range(200):
        waiting = await admin.fetchval(
            "SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = $1", pid)
        if waiting:
            break
        await asyncio.sleep(0.05)
    assert waiting, "the compaction never reached the blocks"
    locks = await admin.fetch(
        "SELECT relation::regclass::text AS rel, mode, granted FROM pg_locks "
        "WHERE pid = $1 AND locktype = 'relation'", pid)
    assert {"rel": f'kwollect_partitions."{parts[0]}"', "mode": "ShareRowExclusiveLock",
            "granted": True} in [dict(r) for r in locks], locks
    os.kill(pid, signal.SIGKILL)  # the postmaster restarts every backend after recovery
    with pytest.raises((asyncpg.PostgresError, ConnectionError, OSError)):
        await task
    for conn in (blocker, worker, admin, writer):
        conn.terminate()
    conn = None
    for _ in range(200):
        try:
            conn = await kwdb.connect("kwuser_ro")
            await conn.fetchval("SELECT 1")
            break
        except (OSError, asyncpg.PostgresError):
            await asyncio.sleep(0.1)
    assert conn is not None
    try:
        assert await snapshot(conn, "cpk") == before
        fresh_admin = await kwdb.connect("admin")
        try:
            assert await compacted_rows(fresh_admin, "cpk") == (0, len(dataset("cpk", 3)))
            for name in parts:  # restartable: a second run completes the work
                await fresh_admin.execute("SELECT kwollect.compact_partition($1)", name)
            assert await compacted_rows(fresh_admin, "cpk") == (len(dataset("cpk", 3)), 0)
        finally:
            await fresh_admin.close()
        assert await snapshot(conn, "cpk") == before
    finally:
        await conn.close()


async def test_maintenance_compacts_partitions_older_than_chunk_compress_hour(admin, writer):
    """Partitions whose range ended chunk_compress_hour (24) ago are compacted; recent
    ones are not."""
    recent = datetime.now(UTC) - timedelta(hours=1)
    await load(writer, [(recent, "cpm-1", "m", 1.0, None),
                        (START + timedelta(minutes=1), "cpm-1", "m", 2.0, None)])
    await admin.execute("SELECT kwollect.maintain()")
    raw = await admin.fetch(
        "SELECT x.ts FROM kwollect.samples x JOIN kwollect.series s USING (series_id) "
        "WHERE s.device_id = 'cpm-1'")
    assert [r[0] for r in raw] == [recent]
    assert await compacted_rows(admin, "cpm") == (1, 1)
