"""kwollect-setup-db --citus on a coordinator and two workers (tests/fixtures/citus.py): the
tables distributed and co-located, maintenance (partitions, default rows, summaries,
compaction) on the distributed tables, the writer's COPY through the coordinator, and the
combinations setup refuses.  The API and Grafana queries run on Citus in
tests/test_get_metrics.py, test_api_functions.py and test_grafana.py."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta

import pytest

from kwollect.model import Reading
from kwollect.options import OptionError
from kwollect.store import citus
from kwollect.store.setupdb import DEFAULTS, setup
from kwollect.store.writer import Writer, WriterOptions, datetime_to_us
from tests.fixtures.kwdb import setup_conf
from tests.sqlapi import UTC, get_metrics, load, series


def conf_with(**overrides) -> dict:
    return {**DEFAULTS, "db_host": "/tmp", "kwollect_password": "x", **overrides}


@pytest.mark.parametrize(("overrides", "message"), [
    ({"citus": True, "citus_workers": "w1:5432", "timescaledb": "on", "citus_coordinator": "c:1"},
     "--citus and --timescaledb=on exclude each other: a TimescaleDB hypertable cannot be"),
    ({"citus": True, "citus_workers": "w1:5432", "switch_storage": True,
      "citus_coordinator": "c:1"}, "--citus and --switch_storage exclude each other"),
    ({"citus": True, "citus_workers": "w1", "citus_coordinator": "c", "archive_path": "/a"},
     "--citus and archive_path exclude each other: a tablespace belongs to one server"),
    ({"citus": True}, "--citus needs citus_workers"),
    ({"citus": True, "citus_workers": "w1:x"}, "citus_workers: expected host:port"),
    ({"citus": True, "citus_workers": "w1"}, "unix-socket db_host needs citus_coordinator"),
    ({"citus_workers": "w1:5432"}, "citus_workers is given without --citus"),
])
def test_setup_refuses_what_cannot_combine_before_changing_anything(overrides, message):
    with pytest.raises(OptionError, match=message.replace("-", r"\-")):
        citus.check_combination(conf_with(**overrides))


def test_timescaledb_auto_means_off_on_citus():
    conf = conf_with(citus=True, citus_workers="w1,w2:5433", citus_coordinator="c",
                     timescaledb="auto")
    citus.check_combination(conf)
    assert conf["timescaledb"] == "off"
    assert citus.parse_nodes(conf["citus_workers"], "x") == [("w1", 5432), ("w2", 5433)]


def test_setup_refuses_a_server_without_citus(pg_cluster):
    """The test cluster does not preload Citus: refused, and nothing made."""
    conf = setup_conf(pg_cluster, citus=True, citus_workers=f"127.0.0.1:{pg_cluster.port}",
                      citus_coordinator=f"127.0.0.1:{pg_cluster.port}",
                      kwollect_db_name="kwdb_citus_refused")
    with pytest.raises(OptionError, match=r"this server does not load Citus .*put citus first "
                                          r"in shared_preload_libraries"):
        asyncio.run(setup(conf))
    assert pg_cluster.psql("SELECT count(*) FROM pg_database "
                           "WHERE datname = 'kwdb_citus_refused'").strip() == "0"


def test_setup_keeps_a_databases_storage(citus_kwdb):
    """A Citus database is not set up again without --citus, nor a one-server database
    turned into a Citus one (a new database and `kwollect migrate` do that); re-running
    setup --citus is safe."""
    with pytest.raises(OptionError, match="distributed with Citus: run setup with --citus"):
        asyncio.run(setup({**citus_kwdb.conf, "citus": False, "citus_workers": ""}))
    plain = setup_conf(citus_kwdb.cluster, kwollect_db_name="kwdb_one_server")
    asyncio.run(setup(plain))
    with pytest.raises(OptionError, match="already holds samples on one server"):
        asyncio.run(setup({**citus_kwdb.conf, "kwollect_db_name": "kwdb_one_server"}))
    asyncio.run(setup(dict(citus_kwdb.conf)))
    assert citus_kwdb.cluster.psql("SELECT count(*) FROM pg_dist_node", citus_kwdb.name) \
        .strip() == "3"


async def test_tables_are_distributed_by_series_and_colocated(citus_kwdb):
    admin = await citus_kwdb.connect("admin")
    try:
        kinds = {r["t"]: (r["partmethod"], r["colocationid"]) for r in await admin.fetch(
            "SELECT logicalrelid::regclass::text AS t, partmethod::text, colocationid "
            "FROM pg_dist_partition")}
        workers = await admin.fetchval("SELECT count(DISTINCT nodeport) FROM citus_shards "
                                       "WHERE table_name = 'kwollect.samples'::regclass")
    finally:
        await admin.close()
    assert kinds["kwollect.series"][0] == "n"  # reference table: a copy on every node
    hashed = {t: kinds[t] for t in ("kwollect.samples", "kwollect.summary",
                                    "kwollect.samples_compact",
                                    "kwollect_partitions.samples_default")}
    assert {method for method, _ in hashed.values()} == {"h"}
    assert len({colocation for _, colocation in hashed.values()}) == 1, hashed
    partitions = [t for t in kinds if t.startswith('kwollect_partitions."samples_2')]
    assert partitions and all(kinds[t] == hashed["kwollect.samples"] for t in partitions)
    assert workers == 2


async def test_maintenance_on_distributed_tables(citus_kwdb):
    """Rows of a range without partition wait in the default partition (the view does not
    create partitions on Citus); maintain() gives them a distributed partition, summarizes
    them and compacts the old partition; every reader answers the same before and after."""
    start = datetime(2020, 6, 1, 10, 0, tzinfo=UTC)
    rows = series("ci-1", "power_watt", start, 720, 5, value=lambda i: 100.0 + i % 7)
    rows += series("ci-2", "net_bytes_total", start, 720, 5, value=lambda i: 1000.0 * i)
    writer = await citus_kwdb.connect("kwuser")
    admin = await citus_kwdb.connect("admin")
    try:
        await load(writer, rows)
        in_default = await admin.fetchval(
            "SELECT count(*) FROM kwollect_partitions.samples_default")
        assert in_default == len(rows)
        window = {"devices": "ci-1,ci-2", "start_time": start.isoformat(),
                  "end_time": (start + timedelta(hours=1)).isoformat()}
        before = await get_metrics(writer, **window)
        assert len(before) == len(rows)

        await admin.execute("UPDATE kwollect.summary_state SET watermark = NULL")
        await admin.execute("SELECT kwollect.maintain()")
        assert await admin.fetchval(
            "SELECT count(*) FROM kwollect_partitions.samples_default") == 0
        part = await admin.fetchval(
            "SELECT name FROM kwollect.partitions WHERE range_start <= $1 AND range_end > $1",
            start)
        assert await admin.fetchval(
            "SELECT partmethod::text FROM pg_dist_partition "
            "WHERE logicalrelid = format('kwollect_partitions.%I', $1::text)::regclass",
            part) == "h"
        summary = await get_metrics(writer, summary=True, **window)
        assert {(r["device_id"], r["metric_id"]) for r in summary} == {
            ("ci-1", "power_watt"), ("ci-2", "net_bytes_total")}
        assert len(summary) == 2 * 12
        # the partition is years old: maintain() compacted it into blocks on the workers
        blocks = await admin.fetchval(
            "SELECT coalesce(sum(c.n), 0) FROM kwollect.samples_compact c "
            "JOIN kwollect.series s USING (series_id) WHERE s.device_id LIKE 'ci-%'")
        assert blocks == len(rows)
        assert await get_metrics(writer, **window) == before
        assert await get_metrics(writer, summary=True, **window) == summary
    finally:
        await writer.close()
        await admin.close()


async def test_writer_copies_through_the_coordinator_to_every_worker(citus_kwdb):
    now = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=5)
    t0 = datetime_to_us(now)
    readings = [Reading(t0 + i * 1_000_000, f"cw-{d}", "m", float(i), {})
                for d in range(20) for i in range(50)]
    writer = Writer(citus_kwdb.connect_kwargs("kwuser"),
                    WriterOptions(flush_interval_s=0.05))
    await writer.start()
    writer.submit(readings)
    await writer.close(timeout=60)
    assert writer.stats()["inserted"] == len(readings)
    admin = await citus_kwdb.connect("admin")
    try:
        per_worker = await admin.fetch(
            "SELECT nodeport, count(*) FROM (SELECT get_shard_id_for_distribution_column("
            "'kwollect.samples', s.series_id) AS shardid FROM kwollect.series s "
            "WHERE s.device_id LIKE 'cw-%') x JOIN citus_shards USING (shardid) GROUP BY 1")
        stored = await admin.fetchval(
            "SELECT count(*) FROM kwollect.samples x JOIN kwollect.series s USING (series_id) "
            "WHERE s.device_id LIKE 'cw-%'")
    finally:
        await admin.close()
    assert stored == len(readings)
    assert len(per_worker) == 2, per_worker  # the 20 series are spread over both workers
