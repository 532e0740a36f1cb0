"""OAR: kwollect-setup-db-oar against a real OAR database; jobs synchronised incrementally
into nodetime_per_job; monitor types promote while the job runs; OAR outages and slowness
never break get_metrics; re-running the setups keeps everything."""

from __future__ import annotations

import asyncio
import json
from datetime import datetime, timedelta

import asyncpg
import pytest

from kwollect.store import setupdb_oar
from kwollect.store.setupdb import main as setup_db_main
from tests.fixtures.kwdb import READER_PASSWORD, WRITER_PASSWORD
from tests.fixtures.oar import FIRST_JOB_ID, link_args
from tests.sqlapi import UTC, get_metrics, load, series


@pytest.fixture(scope="module")
async def oar_linked(kwdb, oar_db, tmp_path_factory):
    args = link_args(kwdb, oar_db, tmp_path_factory.mktemp("oarlink"))
    assert await asyncio.to_thread(setupdb_oar.main, args) == 0
    conn = await kwdb.connect("admin")
    yield oar_db
    # whatever a failed test left running: OAR's jobs promote nothing any more
    await conn.execute("UPDATE kwollect.settings SET value = 'none' WHERE key = 'job_source'")
    await conn.execute("DELETE FROM kwollect.job_promote WHERE job_id >= $1", FIRST_JOB_ID)
    await conn.execute("DELETE FROM promoted_metrics WHERE job_id >= $1", FIRST_JOB_ID)
    await conn.close()


async def sync(conn) -> dict:
    return json.loads(await conn.fetchval("SELECT kwollect.sync_jobs()::text"))


async def job_rows(conn, job_id):
    rows = await conn.fetch("SELECT node, start_time, stop_time FROM nodetime_per_job "
                            "WHERE job_id = $1 ORDER BY node", job_id)
    return [(r["node"], r["start_time"], r["stop_time"]) for r in rows]


async def promoted(conn, job_id):
    rows = await conn.fetch("SELECT device_id, metric_id FROM promoted_metrics "
                            "WHERE job_id = $1 ORDER BY 1, 2", job_id)
    return [tuple(r) for r in rows]


async def test_oar_jobs_and_monitor_types(oar_linked, writer):
    oar = oar_linked
    waiting = oar.oarsub("nobody", ("monitor=bmc_.*",), nodes=2)
    plain = oar.oarsub("nobody", ("monitor",))
    lookalike = oar.oarsub("nobody", ("monitoring",))
    launching = oar.oarsub("nobody", ("monitor=prom_.*",))
    await writer.fetch("SELECT * FROM api.update_promoted_metrics()")
    assert await job_rows(writer, waiting) == []  # waiting jobs have no rows yet

    oar.start(waiting, ("oarnode-1.site.example", "oarnode-2.site.example"))
    oar.start(plain, ("oarnode-3.site.example",))
    oar.start(lookalike, ("oarnode-3.site.example",))
    oar.start(launching, ("oarnode-1.site.example",), state="Launching")
    await writer.fetch("SELECT * FROM api.update_promoted_metrics()")
    rows = await job_rows(writer, waiting)
    assert [(node, stop) for node, _, stop in rows] == [("oarnode-1", None), ("oarnode-2", None)]
    assert abs(rows[0][1] - datetime.now(UTC)) < timedelta(seconds=60)
    assert await promoted(writer, waiting) == [("oarnode-1", "bmc_.*"), ("oarnode-2", "bmc_.*")]
    assert await promoted(writer, plain) == [("oarnode-3", ".*")]
    assert await promoted(writer, lookalike) == []   # "monitoring" is not "monitor"
    assert await promoted(writer, launching) == [("oarnode-1", "prom_.*")]
    # the disk resource's host is not a node of any job
    assert await writer.fetchval("SELECT count(*) FROM nodetime_per_job "
                                 "WHERE node LIKE 'oardisk%'") == 0

    oar.end(waiting)
    oar.set_state(launching, "Running")
    oar.end(lookalike, state="Error")
    await writer.fetch("SELECT * FROM api.update_promoted_metrics()")
    rows = await job_rows(writer, waiting)
    assert all(stop is not None and stop >= start for _, start, stop in rows)
    assert await promoted(writer, waiting) == []
    assert (await job_rows(writer, lookalike))[0][2] is not None
    assert await promoted(writer, plain) == [("oarnode-3", ".*")]
    assert await promoted(writer, launching) == [("oarnode-1", "prom_.*")]

    # get_metrics by an OAR job, while OAR's tables are never read by it
    start = rows[0][1]
    await load(writer, series("oarnode-1", "m", start - timedelta(seconds=1), 3, 1))
    got = await get_metrics(writer, job_id=waiting)
    assert {r["device_id"] for r in got} == {"oarnode-1"} and got

    for job in (plain, launching):
        oar.end(job)
    await writer.fetch("SELECT * FROM api.update_promoted_metrics()")
    assert await promoted(writer, plain) == [] and await promoted(writer, launching) == []


async def test_synchronisation_is_incremental(oar_linked, admin):
    oar = oar_linked
    jobs = [oar.oarsub("nobody", ()) for _ in range(3)]
    for job in jobs:
        oar.start(job, ("oarnode-2.site.example",))
        oar.end(job)
    first = await sync(admin)
    assert first["jobs_read"] >= 3
    # finished jobs are not read again; a new waiting job stays open until it ends
    again = await sync(admin)
    assert again["jobs_read"] == again["open_jobs"] == 0
    waiting = oar.oarsub("nobody", ())
    assert (await sync(admin))["open_jobs"] == 1
    assert (await sync(admin))["jobs_read"] == 1
    oar.start(waiting, ("oarnode-2.site.example",))
    oar.end(waiting)
    await sync(admin)
    assert (await sync(admin))["jobs_read"] == 0
    assert len(await job_rows(admin, waiting)) == 1


async def test_oar_outage_and_slowness_never_break_get_metrics(oar_linked, kwdb, writer,
                                                               reader, admin):
    oar = oar_linked
    job = oar.oarsub("nobody", ("monitor",))
    oar.start(job, ("oarnode-1.site.example",))
    await sync(admin)
    await admin.execute("ALTER SERVER kwollect_oar OPTIONS (SET port '9')")
    try:
        result = await sync(admin)
        assert "error" in result
        state = await admin.fetchrow("SELECT last_error, last_error_at FROM "
                                     "kwollect.oar_sync_state")
        assert state["last_error"] and state["last_error_at"]
        # promotion and job queries keep working from the rows already copied
        rows = await writer.fetch("SELECT * FROM api.update_promoted_metrics()")
        assert ("oarnode-1", ".*", job) in [tuple(r) for r in rows]
        assert await get_metrics(reader, job_id=job) is not None
    finally:
        await admin.execute(f"ALTER SERVER kwollect_oar OPTIONS (SET port '{kwdb.cluster.port}')")
    # a slow OAR: its jobs table locked; the remote statement_timeout ends the wait
    await admin.execute("ALTER SERVER kwollect_oar OPTIONS (SET options "
                        "'-c statement_timeout=1s -c default_transaction_read_only=on')")
    locker = await asyncpg.connect(host=kwdb.cluster.socket_dir, port=kwdb.cluster.port,
                                   user="postgres", database=oar.name)
    try:
        async with locker.transaction():
            await locker.execute("LOCK TABLE jobs IN ACCESS EXCLUSIVE MODE")
            assert "error" in await sync(admin)
            assert await get_metrics(reader, job_id=job) is not None
    finally:
        await locker.close()
    oar.end(job)
    result = await sync(admin)
    assert "error" not in result
    assert (await job_rows(admin, job))[0][2] is not None
    assert await admin.fetchval("SELECT last_error FROM kwollect.oar_sync_state") is None


async def test_rerunning_both_setups_keeps_jobs(oar_linked, kwdb, admin, tmp_path, capsys):
    oar = oar_linked
    job = oar.oarsub("nobody", ("monitor=x_.*",))
    oar.start(job, ("oarnode-3.site.example",))
    await admin.fetch("SELECT * FROM api.update_promoted_metrics()")
    before = await admin.fetchval("SELECT count(*) FROM nodetime_per_job")
    assert await asyncio.to_thread(setup_db_main, [
        "--db_host", kwdb.cluster.socket_dir, "--db_port", str(kwdb.cluster.port),
        "--kwollect_password", WRITER_PASSWORD, "--kwollect_password_ro", READER_PASSWORD]) == 0
    assert await asyncio.to_thread(setupdb_oar.main, link_args(kwdb, oar, tmp_path)) == 0
    assert "OAR linked" in capsys.readouterr().out
    assert await admin.fetchval("SELECT count(*) FROM nodetime_per_job") == before
    assert await promoted(admin, job) == [("oarnode-3", "x_.*")]
    oar.end(job)
    await admin.fetch("SELECT * FROM api.update_promoted_metrics()")
    assert await promoted(admin, job) == []


def test_setup_db_oar_errors(kwdb, oar_db, tmp_path, capsys):
    assert setupdb_oar.main(["--db_host", kwdb.cluster.socket_dir, "--db_port",
                             str(kwdb.cluster.port), "--kwollect_db_name", kwdb.name]) == 1
    assert "oardb_password" in capsys.readouterr().err
    args = link_args(kwdb, oar_db, tmp_path)
    (tmp_path / "oardb_password").write_text("wrong-password")
    assert setupdb_oar.main(args) == 1
    err = capsys.readouterr().err
    assert "cannot be read" in err and "wrong-password" not in err
    assert setupdb_oar.main(link_args(kwdb, oar_db, tmp_path)) == 0
