"""Archive of compacted blocks and retention of raw samples (stock PostgreSQL): old blocks
move to the archive tablespace with their raw partition; kwollect-setup-db --retention_days N
drops raw partitions and blocks older than N days, keeping the 5-minute summaries and the
1-hour rollups, and get_metrics says so for raw rows before that."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from tests.sqlapi import iso, load
from tests.test_rollup import settle
from tests.test_setup_db import archive_dir, connect, run_setup

SUMMARY_ROWS = ("SELECT s.bucket, s.count, s.nan_count, s.avg, s.min, s.max, s.last "
                "FROM kwollect.{} s JOIN kwollect.series se USING (series_id) "
                "WHERE se.device_id = $1 ORDER BY s.bucket")


async def tablespace(conn: asyncpg.Connection, relation: str) -> str | None:
    return await conn.fetchval(
        "SELECT t.spcname FROM pg_class c LEFT JOIN pg_tablespace t ON t.oid = c.reltablespace "
        "WHERE c.oid = to_regclass($1)", f'kwollect_partitions."{relation}"')


def test_archive_moves_compacted_blocks_with_their_partition(pg_cluster, tmp_path):
    archive = archive_dir(pg_cluster)
    assert run_setup(pg_cluster, tmp_path, "--archive_path", str(archive), "--timescaledb", "off",
                     "--archive_after_hour", "24", database="kwdb_archive_blocks") == 0

    async def check():
        conn = await connect(pg_cluster, database="kwdb_archive_blocks")
        try:
            old = datetime(2020, 6, 6, 12, tzinfo=UTC)
            rows = [(old + timedelta(seconds=i), "arc-1", "m", i / 10, None) for i in range(600)]
            await load(conn, rows)
            part = "samples_20200606T120000"
            # compacted before it is archived (the usual order: 24 h, then 8 days)
            assert await conn.fetchval("SELECT kwollect.compact_partition($1)", part) == 600
            assert await tablespace(conn, "compact_20200606T120000") is None
            assert await conn.fetchval("SELECT kwollect.archive_partitions()") == part
            for relation in (part, "compact_20200606T120000"):
                assert await tablespace(conn, relation) == "kwollect_archive", relation
            assert await conn.fetchval(
                "SELECT count(*) FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid "
                "JOIN pg_tablespace t ON t.oid = i.reltablespace "
                "WHERE x.indrelid = to_regclass('kwollect_partitions.\"compact_20200606T120000\"') "
                "AND t.spcname = 'kwollect_archive'") == 2
            got = await conn.fetch(
                "SELECT timestamp, value FROM api.get_metrics(devices => 'arc-1', "
                "start_time => $1, end_time => $2)", iso(old), iso(old + timedelta(hours=1)))
            assert [(r["timestamp"], r["value"]) for r in got] == [(r[0], r[3]) for r in rows]
            # a late row merged by a later compaction stays in the archive
            await load(conn, [(old + timedelta(minutes=30, microseconds=5), "arc-1", "m", -1.0,
                               None)])
            assert await conn.fetchval("SELECT kwollect.compact_partition($1)", part) == 1
            assert await tablespace(conn, "compact_20200606T120000") == "kwollect_archive"
            assert await conn.fetchval("SELECT count(*) FROM metrics WHERE device_id = 'arc-1'") \
                == 601
        finally:
            await conn.close()

    asyncio.run(check())


def test_retention_drops_raw_data_and_keeps_summaries(pg_cluster, tmp_path):
    database = "kwdb_retention"
    assert run_setup(pg_cluster, tmp_path, "--timescaledb", "off", database=database) == 0
    now = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    old = now - timedelta(days=40)        # beyond a 30-day retention
    recent = now - timedelta(days=10)     # within it
    rows = [(t + timedelta(seconds=30 * i), "ret-1", "power", 100.0 + i % 7, None)
            for t in (old, recent) for i in range(240)]  # 2 hours each

    async def before() -> tuple[list, list]:
        conn = await connect(pg_cluster, database=database)
        try:
            await load(conn, rows)
            await settle(conn)  # summarized, rolled up, compacted (older than 24 h)
            assert await conn.fetchval(
                "SELECT count(*) FROM kwollect.partitions WHERE compacted_at IS NOT NULL "
                "AND range_start <= $1 AND range_end > $1", old) == 1
            return (await conn.fetch(SUMMARY_ROWS.format("summary"), "ret-1"),
                    await conn.fetch(SUMMARY_ROWS.format("summary_1h"), "ret-1"))
        finally:
            await conn.close()

    five, hourly = asyncio.run(before())
    assert len(five) == 2 * 24 and len(hourly) == 2 * 2
    # the option, on an existing database; setup's own maintenance applies it
    assert run_setup(pg_cluster, tmp_path, "--timescaledb", "off", "--retention_days", "30",
                     database=database) == 0

    async def after():
        conn = await connect(pg_cluster, database=database)
        try:
            state = await conn.fetchrow("SELECT * FROM kwollect.retention")
            assert state["rows_dropped"] == 240
            assert old < state["raw_dropped_before"] <= now - timedelta(days=30)
            assert await conn.fetchval(
                "SELECT count(*) FROM kwollect.partitions WHERE range_end <= $1",
                state["raw_dropped_before"]) == 0
            assert await conn.fetchval(
                "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE n.nspname = 'kwollect_partitions' AND c.relname LIKE 'compact\\_%' "
                "AND c.relname < $1", "compact_" + (now - timedelta(days=30)).strftime(
                    "%Y%m%dT%H%M%S")) == 0
            # summaries and rollups of the dropped range are kept, unchanged
            assert await conn.fetch(SUMMARY_ROWS.format("summary"), "ret-1") == five
            assert await conn.fetch(SUMMARY_ROWS.format("summary_1h"), "ret-1") == hourly
            assert await conn.fetchval("SELECT count(*) FROM metrics WHERE device_id = 'ret-1'") \
                == 240
            # raw rows before the horizon: refused, saying why (HTTP 410 over the API)
            with pytest.raises(asyncpg.PostgresError, match="dropped") as info:
                await conn.fetch("SELECT * FROM api.get_metrics(devices => 'ret-1', "
                                 "start_time => $1, end_time => $2)",
                                 iso(old), iso(old + timedelta(hours=1)))
            assert info.value.sqlstate == "PT410" and "summary=1h" in info.value.hint
            for level, count in (("true", 12), ("1h", 1)):
                assert len(await conn.fetch(
                    "SELECT * FROM api.get_metrics(devices => 'ret-1', start_time => $1, "
                    "end_time => $2, summary => $3::text)", iso(old),
                    iso(old + timedelta(minutes=59)), level)) == count
            assert len(await conn.fetch(  # both ends inclusive: 121 samples
                "SELECT * FROM api.get_metrics(devices => 'ret-1', start_time => $1, "
                "end_time => $2)", iso(recent), iso(recent + timedelta(hours=1)))) == 121

            # late rows for the dropped range: summaries unchanged, the rows dropped, counted
            await load(conn, [(old + timedelta(seconds=7), "ret-1", "power", 1e6, None)])
            await settle(conn)
            assert await conn.fetch(SUMMARY_ROWS.format("summary"), "ret-1") == five
            assert await conn.fetch(SUMMARY_ROWS.format("summary_1h"), "ret-1") == hourly
            assert await conn.fetchval("SELECT rows_dropped FROM kwollect.retention") == 241
            assert await conn.fetchval(
                "SELECT count(*) FROM metrics WHERE device_id = 'ret-1' AND timestamp < $1",
                now - timedelta(days=30)) == 0
        finally:
            await conn.close()

    asyncio.run(after())


def test_retention_days_must_not_be_negative(pg_cluster, tmp_path, capsys):
    assert run_setup(pg_cluster, tmp_path, "--retention_days", "-1",
                     database="kwdb_bad_retention") == 1
    assert "retention_days" in capsys.readouterr().err
