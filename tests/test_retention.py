"""Archive of compacted blocks (stock PostgreSQL) and retention of raw samples on each
storage: old blocks move to the archive tablespace with their raw partition;
kwollect-setup-db --retention_days N drops raw partitions and blocks (chunks of a hypertable,
compressed or not) older than N days, keeping the 5-minute summaries and the 1-hour rollups,
and get_metrics says so for raw rows before that."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta

import aiohttp
import asyncpg
import pytest

from kwollect.dev.devcluster import PrivateCluster, missing_extension_reason
from kwollect.store.setupdb import setup
from tests.fixtures.gateway import start_gateway
from tests.fixtures.kwdb import STORAGES, KwDb, setup_conf
from tests.sqlapi import iso, load
from tests.test_rollup import settle
from tests.test_setup_db import connect, run_setup, setup_archiving

# Statistics as their float8 bytes: kept bit for bit, not only equal as numbers.
SUMMARY_ROWS = ("SELECT s.bucket, s.count, s.nan_count, float8send(s.avg) AS avg, "
                "float8send(s.min) AS min, float8send(s.max) AS max, float8send(s.last) AS last "
                "FROM kwollect.{} s JOIN kwollect.series se USING (series_id) "
                "WHERE se.device_id = $1 ORDER BY s.bucket")


async def tablespace(conn: asyncpg.Connection, relation: str) -> str | None:
    return await conn.fetchval(
        "SELECT t.spcname FROM pg_class c LEFT JOIN pg_tablespace t ON t.oid = c.reltablespace "
        "WHERE c.oid = to_regclass($1)", f'kwollect_partitions."{relation}"')


@pytest.fixture
def storage_base(request, pg_cluster, storage: str) -> tuple[PrivateCluster, dict]:
    """Where and how to set up a database of its own on `storage` (retention changes what
    the shared databases hold for every later test): the test cluster, or the session's
    Citus coordinator with its workers."""
    if storage == "citus":
        base = request.getfixturevalue("citus_kwdb")
        return base.cluster, base.conf
    if storage == "timescaledb" and (reason := missing_extension_reason("timescaledb")):
        pytest.skip(reason)
    return pg_cluster, setup_conf(pg_cluster, timescaledb="on" if storage == "timescaledb"
                                  else "off")


async def new_database(base: tuple[PrivateCluster, dict], name: str) -> KwDb:
    cluster, conf = base
    conf = {**conf, "kwollect_db_name": name}
    config, token = await setup(conf)
    return KwDb(cluster, name, config, token, conf)


async def chunks_before(admin: asyncpg.Connection, horizon: datetime) -> int:
    """Chunks of the hypertable that start before `horizon`."""
    return await admin.fetchval(
        "SELECT count(*) FROM timescaledb_information.chunks WHERE hypertable_schema = "
        "'kwollect' AND hypertable_name = 'samples' AND range_start < $1", horizon)


def test_archive_moves_compacted_blocks_with_their_partition(pg_cluster, tmp_path):
    setup_archiving(pg_cluster, tmp_path, "kwdb_archive_blocks", "off")

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


@pytest.mark.parametrize("storage", STORAGES)
async def test_retention_drops_raw_data_and_keeps_summaries(storage_base, storage, tmp_path):
    now = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    old = now - timedelta(days=40)        # beyond a 30-day retention
    recent = now - timedelta(days=10)     # within it
    rows = [(t + timedelta(seconds=30 * i), "ret-1", "power", 100.0 + i % 7 + i / 1e3, None)
            for t in (old, recent) for i in range(240)]  # 2 hours each
    kwdb = await new_database(storage_base, f"kwdb_retention_{storage}")
    admin = await kwdb.connect("admin")
    try:
        await load(admin, rows)
        await settle(admin)  # summarized, rolled up, compacted or compressed (older than 24 h)
        assert await admin.fetchval(
            "SELECT count(*) FROM kwollect.partitions WHERE compacted_at IS NOT NULL "
            "AND range_start <= $1 AND range_end > $1", old) == 1
        if storage == "timescaledb":
            assert await admin.fetchval(
                "SELECT bool_and(is_compressed) FROM timescaledb_information.chunks "
                "WHERE hypertable_schema = 'kwollect' AND hypertable_name = 'samples' "
                "AND range_end <= $1", now - timedelta(days=1))
        five = await admin.fetch(SUMMARY_ROWS.format("summary"), "ret-1")
        hourly = await admin.fetch(SUMMARY_ROWS.format("summary_1h"), "ret-1")
        assert len(five) == 2 * 24 and len(hourly) == 2 * 2
    finally:
        await admin.close()

    # the option, on an existing database; setup's own maintenance applies it
    await setup({**kwdb.conf, "retention_days": 30})

    admin = await kwdb.connect("admin")
    try:
        state = await admin.fetchrow("SELECT * FROM kwollect.retention")
        horizon = state["raw_dropped_before"]
        assert state["rows_dropped"] == 240
        assert old < horizon <= now - timedelta(days=30)
        assert await admin.fetchval(
            "SELECT count(*) FROM kwollect.partitions WHERE range_end <= $1", horizon) == 0
        if storage == "timescaledb":  # the compressed chunks are gone, the recent one stays
            assert await chunks_before(admin, horizon) == 0
            # by maintain(), not by a TimescaleDB policy
            assert await admin.fetchval("SELECT count(*) FROM timescaledb_information.jobs "
                                        "WHERE hypertable_name IS NOT NULL") == 0
            assert await chunks_before(admin, now) == len(  # 6-hour chunks
                {int(r[0].timestamp()) // 21600 for r in rows if r[0] >= recent})
        else:
            assert await admin.fetchval(
                "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE n.nspname = 'kwollect_partitions' AND c.relname LIKE 'compact\\_%' "
                "AND c.relname < $1", "compact_" + (now - timedelta(days=30)).strftime(
                    "%Y%m%dT%H%M%S")) == 0
        # summaries and rollups of the dropped range are kept, bit for bit
        assert await admin.fetch(SUMMARY_ROWS.format("summary"), "ret-1") == five
        assert await admin.fetch(SUMMARY_ROWS.format("summary_1h"), "ret-1") == hourly
        assert await admin.fetchval(
            "SELECT count(*) FROM metrics WHERE device_id = 'ret-1'") == 240

        reader = await kwdb.connect("kwuser_ro")
        try:
            # raw rows before the horizon: refused, saying why (HTTP 410 over the API)
            with pytest.raises(asyncpg.PostgresError, match="dropped") as info:
                await reader.fetch("SELECT * FROM api.get_metrics(devices => 'ret-1', "
                                   "start_time => $1, end_time => $2)",
                                   iso(old), iso(old + timedelta(hours=1)))
            assert info.value.sqlstate == "PT410"
            assert "(retention of 30 days); their 5-minute summaries and 1-hour rollups are " \
                "kept" in info.value.message
            assert "summary=1h" in info.value.hint
            # the summaries of the dropped range are served, as before
            for level, count, stored in (("true", 12, five[:12]), ("1h", 1, hourly[:1])):
                got = await reader.fetch(
                    "SELECT timestamp, value FROM api.get_metrics(devices => 'ret-1', "
                    "start_time => $1, end_time => $2, summary => $3::text)", iso(old),
                    iso(old + timedelta(minutes=59)), level)
                assert [r["timestamp"] for r in got] == [r["bucket"] for r in stored]
                assert len(got) == count
            summary_1h = got
            assert len(await reader.fetch(  # both ends inclusive: 121 samples
                "SELECT * FROM api.get_metrics(devices => 'ret-1', start_time => $1, "
                "end_time => $2)", iso(recent), iso(recent + timedelta(hours=1)))) == 121
        finally:
            await reader.close()
        # and over HTTP, through kwollect-api: 410 with the message, the summaries served
        window = f"devices=ret-1&start_time={iso(old)}&end_time={iso(old + timedelta(minutes=59))}"
        with start_gateway(tmp_path / "api", kwdb.postgrest_config) as gateway:
            async with aiohttp.ClientSession() as http:
                async with http.get(f"{gateway.url}/rpc/get_metrics?{window}") as resp:
                    assert resp.status == 410
                    error = await resp.json()
                assert error["code"] == "PT410" and "were dropped" in error["message"]
                async with http.get(f"{gateway.url}/rpc/get_metrics?{window}&summary=1h") as resp:
                    assert resp.status == 200
                    assert [r["value"] for r in await resp.json()] == [
                        r["value"] for r in summary_1h]

        # late rows for the dropped range: stored and readable until the next maintenance,
        # which drops them (counted) without changing the summaries
        await load(admin, [(old + timedelta(seconds=7), "ret-1", "power", 1e6, None)])
        assert await admin.fetchval(
            "SELECT count(*) FROM metrics WHERE device_id = 'ret-1' AND timestamp < $1",
            horizon) == 1
        await settle(admin)
        assert await admin.fetch(SUMMARY_ROWS.format("summary"), "ret-1") == five
        assert await admin.fetch(SUMMARY_ROWS.format("summary_1h"), "ret-1") == hourly
        assert await admin.fetchrow(
            "SELECT raw_dropped_before, rows_dropped FROM kwollect.retention") == (horizon, 241)
        assert await admin.fetchval(
            "SELECT count(*) FROM metrics WHERE device_id = 'ret-1' AND timestamp < $1",
            horizon) == 0
        if storage == "timescaledb":
            assert await chunks_before(admin, horizon) == 0
    finally:
        await admin.close()


@pytest.mark.parametrize("storage", STORAGES)
async def test_retention_stops_where_late_rows_wait(storage_base, storage):
    """The horizon never passes a range whose late rows are not summarized yet (they would
    never be: refresh_summary recomputes nothing before it); the next run goes on.  Here
    the ranges were never compacted or compressed (chunk_compress_hour beyond them): raw
    partitions and chunks are dropped alike."""
    now = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    first, second, third = (now - timedelta(days=d) for d in (50, 40, 35))
    kwdb = await new_database(storage_base, f"kwdb_retention_late_{storage}")
    admin = await kwdb.connect("admin")
    try:
        await admin.execute("UPDATE kwollect.settings SET value = '2000' "
                            "WHERE key = 'chunk_compress_hour'")
        await load(admin, [(t + timedelta(minutes=i), "late-1", "m", float(i), None)
                           for t in (first, second, third) for i in range(60)])
        await settle(admin)
        assert await admin.fetchval(
            "SELECT count(*) FROM kwollect.partitions WHERE compacted_at IS NOT NULL") == 0
        await admin.execute("UPDATE kwollect.settings SET value = '30' "
                            "WHERE key = 'retention_days'")
        # a late row in the second range, not summarized yet: the third waits too
        await admin.execute("INSERT INTO kwollect.summary_dirty VALUES ($1, $1)",
                            second + timedelta(minutes=5))
        assert json.loads(await admin.fetchval("SELECT kwollect.apply_retention()")) == \
            {"partitions": 1, "rows": 60}
        horizon = await admin.fetchval("SELECT raw_dropped_before FROM kwollect.retention")
        assert first < horizon <= second
        assert await admin.fetchval("SELECT count(*) FROM metrics WHERE device_id = 'late-1'") \
            == 120
        await admin.execute("SELECT kwollect.maintain()")
        assert await admin.fetchrow(
            "SELECT rows_dropped, raw_dropped_before > $1 FROM kwollect.retention",
            third) == (180, True)
    finally:
        await admin.close()


def test_retention_days_must_not_be_negative(pg_cluster, tmp_path, capsys):
    assert run_setup(pg_cluster, tmp_path, "--retention_days", "-1",
                     database="kwdb_bad_retention") == 1
    assert "retention_days" in capsys.readouterr().err
