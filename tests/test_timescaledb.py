"""The TimescaleDB storage (kwollect-setup-db --timescaledb): choice of storage, native
compression driven by kwollect.maintain(), archive of chunks, the Apache-only fallback, and
switching an existing database between storages without losing a sample.

The API itself is tested on every storage by the modules that override `kwdb` with
`each_storage` (tests/test_get_metrics.py, test_api_functions.py, test_grafana.py).
"""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest

from kwollect.dev.devcluster import PrivateCluster, missing_extension_reason
from kwollect.store.setupdb import DEFAULTS, choose_storage
from tests.fixtures.kwdb import WRITER_PASSWORD
from tests.sqlapi import load
from tests.test_compaction import START, compacted_rows, dataset, prepare, snapshot
from tests.test_setup_db import connect, run_setup, setup_archiving

needs_timescaledb = pytest.mark.skipif(missing_extension_reason("timescaledb") is not None,
                                       reason=str(missing_extension_reason("timescaledb")))

EVERY_SAMPLE = ("SELECT s.device_id, s.metric_id, s.labels::text, x.ts, float8send(x.value) "
                "FROM kwollect.samples_all x JOIN kwollect.series s USING (series_id) "
                "ORDER BY 1, 2, 3, 4, 5")


def conf(**overrides) -> dict:
    return {**DEFAULTS, **overrides}


def test_the_choice_of_storage():
    """auto: TimescaleDB when the server can, never a silent switch of an existing database;
    on: TimescaleDB or a clear error; a switch only when asked for."""
    no = "the TimescaleDB extension is not installed on the database server"
    assert choose_storage(conf(), None, None) == "timescaledb"
    assert choose_storage(conf(), None, no) == "stock"
    assert choose_storage(conf(), "stock", None) == "stock"
    assert choose_storage(conf(timescaledb="off"), None, None) == "stock"
    assert choose_storage(conf(timescaledb="on", switch_storage=True), "stock", None) \
        == "timescaledb"
    with pytest.raises(RuntimeError, match="--timescaledb on: the TimescaleDB extension"):
        choose_storage(conf(timescaledb="on"), None, no)
    with pytest.raises(RuntimeError, match="run again with --switch_storage"):
        choose_storage(conf(timescaledb="off"), "timescaledb", None)
    with pytest.raises(ValueError, match="expected auto, on or off"):
        choose_storage(conf(timescaledb="yes"), None, None)
    with pytest.raises(ValueError, match="switch_storage"):
        choose_storage(conf(switch_storage=True), "stock", None)


def test_on_fails_clearly_where_the_server_does_not_load_timescaledb(stock_cluster, tmp_path,
                                                                      capsys):
    if missing_extension_reason("timescaledb"):
        pytest.skip(str(missing_extension_reason("timescaledb")))
    # installed but not in shared_preload_libraries
    assert run_setup(stock_cluster, tmp_path, "--timescaledb", "on", database="kwdb_on") == 1
    err = capsys.readouterr().err
    assert "--timescaledb on: TimescaleDB cannot be created" in err and "preloaded" in err
    assert run_setup(stock_cluster, tmp_path, database="kwdb_on") == 0  # auto: stock
    assert "samples in stock PostgreSQL partitions" in capsys.readouterr().out


@needs_timescaledb
def test_auto_makes_a_compressed_hypertable(pg_cluster, tmp_path, capsys):
    assert run_setup(pg_cluster, tmp_path, database="kwdb_auto") == 0
    assert "samples in a TimescaleDB hypertable" in capsys.readouterr().out

    async def check():
        conn = await connect(pg_cluster, database="kwdb_auto")
        try:
            assert await conn.fetchval("SELECT kwollect.storage()") == "timescaledb"
            settings = dict(await conn.fetch(
                "SELECT attname, coalesce(segmentby_column_index, 0) "
                "FROM timescaledb_information.compression_settings "
                "WHERE hypertable_schema = 'kwollect' AND hypertable_name = 'samples'"))
            assert settings == {"series_id": 1, "ts": 0}
            assert await conn.fetchval(
                "SELECT time_interval FROM timescaledb_information.dimensions "
                "WHERE hypertable_name = 'samples'") == timedelta(hours=6)
            assert await conn.fetchval("SELECT count(*) FROM timescaledb_information.jobs "
                                       "WHERE hypertable_name = 'samples'") == 0
        finally:
            await conn.close()

    asyncio.run(check())


@pytest.fixture(scope="module")
def tsdb(storage_kwdb):
    return storage_kwdb("timescaledb")


async def test_compression_is_lossless_and_transparent(tsdb):
    """Chunks older than chunk_compress_hour are compressed by maintain(); every row of
    get_metrics (raw, summary, as_rate), the views and available_metrics is the same, bit
    for bit; late rows into a compressed chunk are read at once and merged next time."""
    admin, writer, reader = [await tsdb.connect(r) for r in ("admin", "kwuser", "kwuser_ro")]
    try:
        await prepare(admin, writer, "tsc", 11)
        before = await snapshot(reader, "tsc")
        assert len(before["raw"]) > 20_000 and before["summary"] and before["metrics_by_job"]
        chunks = ("SELECT c.is_compressed, cc.status FROM timescaledb_information.chunks c "
                  "JOIN _timescaledb_catalog.chunk cc ON cc.table_name = c.chunk_name "
                  "WHERE c.hypertable_name = 'samples' AND c.range_start < $2 "
                  "AND c.range_end > $1 ORDER BY c.range_start")
        window = (START, START + timedelta(hours=2))
        assert [r[0] for r in await admin.fetch(chunks, *window)] == [False, False]

        result = await writer.fetchval("SELECT kwollect.maintain()")  # the writer's right
        assert '"compacted_rows": ' in result and '"compacted_rows": 0' not in result
        assert [tuple(r) for r in await admin.fetch(chunks, *window)] == [(True, 1), (True, 1)]
        assert await compacted_rows(admin, "tsc") == (0, len(dataset("tsc", 11)))
        assert await snapshot(reader, "tsc") == before

        late = [(START + timedelta(minutes=10, microseconds=7), "tsc-1", "power_watt", -0.0,
                 None),
                (START + timedelta(minutes=95), "tsc-1", "new_metric", 3.25, {"k": "v"})]
        await load(writer, late)
        await admin.execute("SELECT kwollect.refresh_summary()")
        with_late = await snapshot(reader, "tsc")
        assert len(with_late["raw"]) == len(before["raw"]) + 2
        assert all(status & 8 for _, status in await admin.fetch(chunks, *window))  # partial
        await admin.execute("SELECT kwollect.maintain()")
        assert [tuple(r) for r in await admin.fetch(chunks, *window)] == [(True, 1), (True, 1)]
        assert await snapshot(reader, "tsc") == with_late
    finally:
        for conn in (admin, writer, reader):
            await conn.close()


@needs_timescaledb
def test_archive_moves_old_chunks_with_their_compressed_data(pg_cluster, tmp_path):
    setup_archiving(pg_cluster, tmp_path, "kwdb_archive_ts", "on")

    async def check():
        conn = await connect(pg_cluster, database="kwdb_archive_ts")
        try:
            await load(conn, [(START, "ar-1", "m", 5.0, None)])
            moved = [await conn.fetchval("SELECT kwollect.maintain() ->> 'archived'")
                     for _ in range(2)]
            assert moved[0] and moved[0].startswith("_hyper_") and moved[1] is None
            spaces = await conn.fetch(
                "SELECT c.relname, t.spcname FROM pg_class c "
                "LEFT JOIN pg_tablespace t ON t.oid = c.reltablespace "
                "WHERE c.relnamespace = '_timescaledb_internal'::regnamespace "
                "AND c.relkind IN ('r', 'i') AND (c.relname LIKE $1 || '%' "
                "OR c.relname LIKE 'compress_hyper_%')", moved[0])
            assert {r[0] for r in spaces} >= {moved[0], f"{moved[0]}_samples_series_minute_idx"}
            assert {r[1] for r in spaces} == {"kwollect_archive"}, spaces
            assert await conn.fetchval("SELECT value FROM metrics WHERE device_id = 'ar-1'") == 5.0
        finally:
            await conn.close()

    asyncio.run(check())


@needs_timescaledb
def test_apache_only_build_falls_back_to_our_compaction(tmp_path, capsys):
    """A server whose TimescaleDB runs with timescaledb.license = apache has no native
    compression: auto keeps the samples on stock PostgreSQL (compacted by kwollect), on says
    why it cannot."""
    cluster = PrivateCluster(preload=("timescaledb",),
                             settings={"timescaledb.license": "apache"}).start()
    try:
        assert run_setup(cluster, tmp_path, "--timescaledb", "on", database="kwdb_apache") == 1
        err = capsys.readouterr().err
        assert "Apache-2 build only (timescaledb.license = apache)" in err, err
        assert "kwollect's compaction" in err
        assert run_setup(cluster, tmp_path, database="kwdb_apache") == 0
        assert "samples in stock PostgreSQL partitions" in capsys.readouterr().out
        assert cluster.psql("SELECT kwollect.storage()", database="kwdb_apache").strip() == "stock"
    finally:
        cluster.destroy()


@needs_timescaledb
def test_switching_storages_both_ways_loses_nothing(pg_cluster, tmp_path, capsys):
    """stock (raw rows and compacted blocks) -> TimescaleDB (then compressed) -> stock:
    every sample, bit for bit, and everything the API answers, stay the same."""
    name = "kwdb_switch"
    assert run_setup(pg_cluster, tmp_path, "--timescaledb", "off", database=name) == 0

    async def state() -> tuple[list, dict, str]:
        admin = await connect(pg_cluster, database=name)
        try:
            rows = [tuple(r) for r in await admin.fetch(EVERY_SAMPLE)]
            return rows, await snapshot(admin, "sw"), await admin.fetchval(
                "SELECT kwollect.storage()")
        finally:
            await admin.close()

    async def populate() -> None:
        admin = await connect(pg_cluster, database=name)
        writer = await connect(pg_cluster, database=name, user="kwuser",
                               password=WRITER_PASSWORD)
        try:
            parts = await prepare(admin, writer, "sw", 5)
            await admin.execute("SELECT kwollect.compact_partition($1)", parts[0])
            await load(writer, [(START + timedelta(minutes=3), "sw-1", "late", 1.5, None)])
            await admin.execute("SELECT kwollect.refresh_summary()")
            assert (await compacted_rows(admin, "sw"))[0] > 0  # blocks and raw rows both
        finally:
            await admin.close()
            await writer.close()

    asyncio.run(populate())
    rows, api, storage = asyncio.run(state())
    assert storage == "stock" and len(rows) == len(dataset("sw", 5)) + 1

    assert run_setup(pg_cluster, tmp_path, "--timescaledb", "on", database=name) == 1
    assert "run again with --switch_storage" in capsys.readouterr().err
    assert asyncio.run(state()) == (rows, api, "stock")  # refused: nothing changed

    assert run_setup(pg_cluster, tmp_path, "--timescaledb", "on", "--switch_storage",
                     database=name) == 0
    assert f"{len(rows)} samples copied" in capsys.readouterr().out
    assert asyncio.run(state()) == (rows, api, "timescaledb")
    assert pg_cluster.psql("SELECT count(*) FROM kwollect.samples_compact",
                           database=name).strip() == "0"
    assert pg_cluster.psql(  # old chunks were compressed by the setup's maintain()
        "SELECT bool_or(is_compressed) FROM timescaledb_information.chunks",
        database=name).strip() == "t"
    assert run_setup(pg_cluster, tmp_path, database=name) == 0  # auto keeps it
    assert asyncio.run(state()) == (rows, api, "timescaledb")

    assert run_setup(pg_cluster, tmp_path, "--timescaledb", "off", "--switch_storage",
                     database=name) == 0
    assert asyncio.run(state()) == (rows, api, "stock")
    assert pg_cluster.psql("SELECT count(*) FROM kwollect.samples_compact",
                           database=name).strip() != "0"  # compacted again by maintain()
