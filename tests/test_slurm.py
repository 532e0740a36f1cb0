"""Slurm: the shipped PrologSlurmctld/EpilogSlurmctld hook, run by a real slurmctld for a
real two-node job, records the job and its promotion through kwollect-api, and removes the
promotion at the job's end; a kwollect outage never holds a job."""

from __future__ import annotations

import time

import pytest

from tests.fixtures.slurm import sbatch, start_slurm_with_hook
from tests.sqlapi import wait_for

NODES = ("slurmnode-1", "slurmnode-2")


@pytest.fixture(scope="module")
def slurm(slurm_binaries, gateway):
    cluster = start_slurm_with_hook(gateway, NODES)
    yield cluster
    cluster.stop()



async def job_ended_without_promotion(writer, job: int) -> None:
    """Wait until every node of the job has a stop time; then no promotion may remain."""
    async def ended():
        return await writer.fetchval("SELECT bool_and(stop_time IS NOT NULL) FROM "
                                     "nodetime_per_job WHERE job_id = $1", job)
    await wait_for(ended)
    assert await writer.fetchval("SELECT count(*) FROM promoted_metrics WHERE job_id = $1",
                                 job) == 0

async def test_slurm_job_rows_and_promotion_follow_the_job(slurm, writer):
    submitted = time.monotonic()
    job = sbatch(slurm, "-N2", "--comment", "monitor=bmc_.* other-word", "--wrap", "sleep 4")

    async def running():
        rows = await writer.fetch("SELECT node, stop_time FROM nodetime_per_job "
                                  "WHERE job_id = $1 ORDER BY node", job)
        return rows if len(rows) == 2 else None
    rows = await wait_for(running)
    assert [(r["node"], r["stop_time"]) for r in rows] == [(n, None) for n in NODES]
    promoted = await writer.fetch("SELECT device_id, metric_id FROM promoted_metrics "
                                  "WHERE job_id = $1 ORDER BY 1", job)
    assert [tuple(r) for r in promoted] == [(n, "bmc_.*") for n in NODES]
    started = time.monotonic() - submitted
    await job_ended_without_promotion(writer, job)
    window = await writer.fetchrow("SELECT min(start_time) AS t0, max(stop_time) AS t1 "
                                   "FROM nodetime_per_job WHERE job_id = $1", job)
    assert 3 <= (window["t1"] - window["t0"]).total_seconds() <= 30
    print(f"sbatch -> job rows and promotion: {started:.2f} s")


async def test_a_job_without_monitor_promotes_nothing(slurm, writer):
    job = sbatch(slurm, "-N1", "--comment", "monitoring please", "--wrap", "sleep 1")
    await job_ended_without_promotion(writer, job)


async def test_kwollect_down_never_holds_a_job(slurm, writer):
    conf = slurm.directory / "kwollect-slurm-hook.conf"
    saved = conf.read_text()
    conf.write_text(saved + "KWOLLECT_API=http://127.0.0.1:9\nKWOLLECT_TIMEOUT=2\n")
    try:
        job = sbatch(slurm, "-N1", "--wrap", "sleep 1")

        async def completed():
            out = slurm.run("scontrol", "show", "job", str(job))
            return "JobState=COMPLETED" in out
        await wait_for(completed)
    finally:
        conf.write_text(saved)
    assert await writer.fetchval("SELECT count(*) FROM nodetime_per_job WHERE job_id = $1",
                                 job) == 0
    log = (slurm.directory / "hook.log").read_text()  # the token is never logged
    assert f"job {job}: job_start failed" in log and "Bearer" not in log
