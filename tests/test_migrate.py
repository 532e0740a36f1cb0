"""`kwollect migrate`: a Kwollect 1.x database (plain PostgreSQL layout, and the TimescaleDB
hypertable with compressed chunks where TimescaleDB is installed) copied into a kwollect
database: killed with SIGKILL halfway and resumed without duplicates, verified, every row
compared; a catch-up pass while the source is still written to."""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import pytest

from kwollect.dev.devcluster import missing_extension_reason
from kwollect.migrate.command import MIGRATE_DEFAULTS, migrate
from kwollect.store.setupdb import setup
from tests import kwollect1x as k1
from tests.fixtures.kwdb import WRITER_PASSWORD, setup_conf

ROOT = Path(__file__).parent.parent
TARGET_DB = "kwmig"
TARGET_USER = "kwmiguser"  # roles of its own: setup re-applies its roles' passwords


@pytest.fixture(scope="module")
def target_db(pg_cluster):
    """A kwollect database of its own, so verify sees only what the migrations wrote."""
    asyncio.run(setup(setup_conf(pg_cluster, kwollect_db_name=TARGET_DB,
                                 kwollect_user=TARGET_USER)))
    return TARGET_DB


@pytest.fixture
async def admin_conn(pg_cluster):
    conn = await asyncpg.connect(pg_cluster.dsn())
    yield conn
    await conn.close()


@pytest.fixture
async def target(pg_cluster, target_db):
    conn = await asyncpg.connect(pg_cluster.dsn(database=target_db))
    yield conn
    await conn.close()


@pytest.fixture
def secrets(tmp_path):
    source = tmp_path / "source.pw"
    source.write_text(k1.SOURCE_PASSWORD + "\n")
    writer = tmp_path / "writer.pw"
    writer.write_text(WRITER_PASSWORD)
    for path in (source, writer):
        path.chmod(0o600)
    return source, writer


def options(pg_cluster, source_db: str, secrets, **extra) -> dict:
    source_pw, writer_pw = secrets
    return {**MIGRATE_DEFAULTS, "db_host": "127.0.0.1", "db_port": pg_cluster.port,
            "db_name": TARGET_DB, "db_user": TARGET_USER, "db_password": WRITER_PASSWORD,
            "from": f"postgresql://{k1.SOURCE_ROLE}@127.0.0.1:{pg_cluster.port}/{source_db}",
            "from_password_file": str(source_pw), **extra}


def argv(conf: dict, *flags: str) -> list[str]:
    keys = ("db_host", "db_port", "db_name", "db_user", "from", "from_password_file",
            "range_minutes", "jobs")
    args = [a for key in keys for a in (f"--{key}", str(conf[key]))]
    return ["migrate", *args, "--db_password_file", conf["writer_pw"], *flags]


async def run(conf: dict) -> tuple[int, str]:
    out = io.StringIO()
    status = await migrate(conf, out)
    return status, out.getvalue()


async def assert_same_rows(source: asyncpg.Connection, target: asyncpg.Connection,
                           lo: datetime, hi: datetime, odd_labels: int = 0) -> int:
    """Every distinct source row is in the target once (except `odd_labels` rows whose
    labels were not a JSON object, compared by the caller)."""
    theirs = await k1.distinct_rows(source, "metrics", lo, hi)
    ours = await k1.distinct_rows(target, "metrics", lo, hi)
    if odd_labels:
        odd = [r for r in theirs if r[2] == "user_metric"]
        assert len(odd) == odd_labels
        theirs = [r for r in theirs if r[2] != "user_metric"]
        ours = [r for r in ours if r[2] != "user_metric"]
    assert len(ours) == len(theirs)
    assert ours == theirs
    # ... and each of them exactly once
    assert await target.fetchval('SELECT count(*) FROM metrics WHERE "timestamp" >= $1 '
                                 'AND "timestamp" < $2', lo, hi) == len(theirs) + odd_labels
    return len(theirs) + odd_labels


async def test_kill_9_halfway_then_resume_and_verify(pg_cluster, admin_conn, target, secrets):
    source = await k1.create_source(admin_conn, pg_cluster.dsn, "kw1x_plain", jobs_table=True)
    base = k1.rows()
    dups = k1.duplicates(base)
    await k1.load(source, base + dups)
    await source.execute("INSERT INTO metrics (device_id, metric_id, value) "
                         "SELECT 'node-9', 'no_time', 1 FROM generate_series(1, 3)")
    await source.execute("UPDATE metrics SET \"timestamp\" = NULL WHERE device_id = 'node-9'")
    await source.execute("INSERT INTO metrics VALUES ('2016-03-01 00:00:05+00', 'node-1', "
                         "'bmc_node_power_watt', 1, NULL)")  # NULL labels: the series {}
    await source.execute("INSERT INTO metrics VALUES ('2016-03-01 00:00:06+00', 'node-1', "
                         "'user_metric', 2, 'null'), ('2016-03-01 00:00:06+00', 'node-1', "
                         "'user_metric', 3, '[1, \"a\"]')")  # labels an API caller could send
    await source.execute("INSERT INTO promoted_metrics VALUES ('node-1', 'bmc_.*'), "
                         "('node-1', 'bmc_.*'), ('node-2', NULL)")
    conf = options(pg_cluster, "kw1x_plain", secrets, range_minutes=60, jobs=2, final=True)
    conf["writer_pw"] = str(secrets[1])

    process = subprocess.Popen([sys.executable, "-m", "kwollect.cli", *argv(conf, "--final")],
                               cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    done_query = "SELECT count(*) FROM kwollect.migrated_ranges WHERE range_start >= $1 " \
                 "AND range_start < $2"
    span = (k1.START, k1.START + timedelta(hours=31))
    try:
        for _ in range(6000):  # up to 60 s on a busy machine
            if await target.fetchval(done_query, *span) >= 6 or process.poll() is not None:
                break
            await asyncio.sleep(0.01)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        _, err = process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL, err.decode()
    await asyncio.sleep(0.2)  # the server notices the lost connection and rolls back
    halfway = await target.fetchval(done_query, *span)
    assert 0 < halfway < 30

    status, out = await run({**conf, "verify": True})
    assert status == 0, out
    assert f"({halfway} done by an earlier run)" in out
    assert f"{len(dups):,} duplicate rows of the source" in out
    assert "3 source rows have no timestamp" in out
    assert "verify: 2 days compared" in out and "0 series-days differ" in out
    assert "nodetime_by_job: 3 job rows added" in out and "1 without job_id, start_time" in out
    assert await target.fetchval(done_query, *span) == 30
    written = await assert_same_rows(source, target, *span, odd_labels=2)
    assert written == len(base) + 3  # + the NULL-labels row and the two user_metric rows
    assert sorted(tuple(r) for r in await target.fetch(
        "SELECT value, labels FROM metrics WHERE metric_id = 'user_metric'")) == \
        [(2.0, "{}"), (3.0, '{"_labels": [1, "a"]}')]
    totals = await target.fetchrow(
        "SELECT sum(source_rows) AS read, sum(written_rows) AS written "
        "FROM kwollect.migrated_ranges WHERE range_start >= $1 AND range_start < $2", *span)
    assert (totals["read"], totals["written"]) == (len(base) + len(dups) + 3, written)
    assert sorted(tuple(r) for r in await target.fetch(
        "SELECT device_id, metric_id FROM promoted_metrics WHERE device_id IN ('node-1', "
        "'node-2')")) == [("node-1", "bmc_.*"), ("node-2", None)]
    assert await target.fetchval("SELECT count(*) FROM nodetime_per_job WHERE job_id = 4242") == 2
    # the summaries will be recomputed for the migrated time
    assert await target.fetchval("SELECT count(*) FROM kwollect.summary_dirty "
                                 "WHERE lo >= $1 AND hi <= $2", *span) >= 30

    # a second run finds nothing to do and adds nothing
    status, out = await run(conf)
    assert status == 0 and "0 ranges copied (30 done by an earlier run)" in out
    assert "promoted_metrics: 0 rows added" in out
    await source.close()


async def test_catch_up_while_the_source_is_written(pg_cluster, admin_conn, target, secrets):
    source = await k1.create_source(admin_conn, pg_cluster.dsn, "kw1x_live")
    now = datetime.now(UTC).replace(microsecond=0)
    await k1.load(source, k1.rows(start=now - timedelta(hours=2), hours=2, step_s=30))
    conf = options(pg_cluster, "kw1x_live", secrets, range_minutes=10, settle_minutes=10)
    stop = asyncio.Event()

    async def reference_kwollector() -> int:
        """Goes on COPYing fresh rows into the source, as the reference does every second."""
        conn = await asyncpg.connect(pg_cluster.dsn(database="kw1x_live"))
        sent = 0
        while not stop.is_set():
            await conn.copy_records_to_table("metrics", columns=k1.COLUMNS, records=[
                (datetime.now(UTC), "node-live", "bmc_node_power_watt", float(sent), "{}")])
            sent += 1
            await asyncio.sleep(0.02)
        await conn.close()
        return sent

    writing = asyncio.create_task(reference_kwollector())
    status, out = await run(conf)
    stop.set()
    assert await writing > 0
    assert status == 0, out
    copied = await target.fetchval("SELECT max(range_end) FROM kwollect.migrated_ranges "
                                   "WHERE range_start >= $1", now - timedelta(hours=3))
    assert now - timedelta(minutes=30) <= copied <= now - timedelta(minutes=10)
    # the reference kwollectors go on writing, then are switched to the target
    await k1.load(source, k1.rows(start=now, hours=0.05, step_s=5))
    status, out = await run({**conf, "final": True, "verify": True})
    assert status == 0, out
    assert "every range (final pass)" in out and "0 series-days differ" in out
    await assert_same_rows(source, target, now - timedelta(hours=3), now + timedelta(hours=1))
    # nodetime_by_job is the reference's (empty) view: reported, not copied
    assert "nodetime_by_job: a view in the source" in out
    await source.close()


async def test_timescaledb_source_with_compressed_chunks(pg_cluster, admin_conn, target,
                                                         secrets):
    reason = missing_extension_reason("timescaledb")
    if reason or "timescaledb" not in pg_cluster.preloaded:
        pytest.skip(reason or "the test cluster does not preload timescaledb")
    source = await k1.create_source(admin_conn, pg_cluster.dsn, "kw1x_tsdb", hypertable=True)
    start = datetime(2017, 6, 1, tzinfo=UTC)
    base = k1.rows(start=start, hours=20, step_s=30)
    dups = k1.duplicates(base)
    await k1.load(source, base + dups)
    compressed = await source.fetchval(
        "SELECT count(compress_chunk(c)) FROM show_chunks('metrics') c")
    assert compressed >= 4
    status, out = await run({**options(pg_cluster, "kw1x_tsdb", secrets, range_minutes=120),
                             "final": True, "verify": True})
    assert status == 0, out
    assert f"{len(dups):,} duplicate rows" in out and "0 series-days differ" in out
    await assert_same_rows(source, target, start, start + timedelta(days=1))
    await source.close()


async def test_verify_reports_a_difference(pg_cluster, admin_conn, target, secrets):
    source = await k1.create_source(admin_conn, pg_cluster.dsn, "kw1x_diff")
    start = datetime(2014, 2, 1, tzinfo=UTC)
    await k1.load(source, k1.rows(start=start, hours=1, step_s=60))
    conf = {**options(pg_cluster, "kw1x_diff", secrets), "final": True}
    assert (await run(conf))[0] == 0
    await source.execute("INSERT INTO metrics VALUES ($1, 'node-1', 'late_metric', 5, '{}')",
                         start + timedelta(minutes=3))
    status, out = await run({**conf, "verify": True})
    assert status == 1
    assert ("DIFFERENT 2014-02-01 node-1 late_metric {}: source rows=1 values=1 sum=5.0 nan=0 "
            "inf=0, target absent") in out
    await source.close()


async def test_series_kwollect_cannot_hold_are_refused_and_the_rest_copied(
        pg_cluster, admin_conn, target, secrets):
    """Labels over 2000 bytes and ids over 255 characters (the reference took them) fail
    kwollect.series' limits: their rows are refused by name, every other row of their ranges
    is copied, and verify counts them apart."""
    source = await k1.create_source(admin_conn, pg_cluster.dsn, "kw1x_big")
    start = datetime(2015, 5, 1, tzinfo=UTC)
    base = k1.rows(start=start, hours=2, step_s=60)
    await k1.load(source, base)
    big = json.dumps({"note": "".join(f"{i:04x}" for i in range(600))})  # 2,4xx bytes
    odd = [(start + timedelta(minutes=m), "node-1", "annotated", 1.0, big) for m in range(90)]
    odd += [(start + timedelta(minutes=m), "x" * 300, "bmc_node_power_watt", 2.0, "{}")
            for m in range(0, 120, 7)]
    await k1.load(source, odd)
    conf = {**options(pg_cluster, "kw1x_big", secrets, range_minutes=30), "final": True,
            "verify": True}
    status, out = await run(conf)
    assert status == 0, out
    assert "4 ranges copied" in out
    assert f"{len(odd):,} source rows refused (not copied)" in out
    assert "REFUSED 90 rows of device_id 'node-1' metric_id 'annotated' labels " \
           "{\"note\": \"000000010002" in out and "labels larger than 2000 bytes" in out
    assert f"REFUSED 18 rows of device_id '{'x' * 80}' metric_id 'bmc_node_power_watt'" in out
    assert "device_id or metric_id longer than 255 characters" in out
    assert "duplicate rows" not in out
    assert "0 series-days differ, 2 series-days of refused series not compared" in out
    theirs = [r for r in await k1.distinct_rows(source, "metrics", start,
                                                start + timedelta(hours=2))
              if r[2] != "annotated" and len(r[1]) <= 255]
    assert await k1.distinct_rows(target, "metrics", start, start + timedelta(hours=2)) == theirs
    assert await target.fetchval(
        "SELECT sum(refused_rows) FROM kwollect.migrated_ranges WHERE range_start >= $1 "
        "AND range_start < $2", start, start + timedelta(hours=2)) == len(odd)
    await source.close()


def test_password_in_the_url_is_refused():
    result = subprocess.run(
        [sys.executable, "-m", "kwollect.cli", "migrate", "--from",
         "postgresql://kwuser:secret@127.0.0.1/kwdb"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2
    assert "must not contain a password" in result.stderr and "--from_password_file" in \
        result.stderr


async def test_a_database_without_kwollect_metrics_is_refused(pg_cluster, secrets):
    conf = options(pg_cluster, "postgres", secrets)
    conf["from"] = f"postgresql://postgres@/postgres?host={pg_cluster.socket_dir}" \
                   f"&port={pg_cluster.port}"
    with pytest.raises(Exception, match="no Kwollect 1.x metrics relation"):
        await run(conf)
