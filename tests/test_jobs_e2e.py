"""End to end, through kwollect-api and a kwollector polling a real snmpd: a job on two
nodes asks for monitor=bmc_fan.* (a real Slurm job through the shipped hook, or a real OAR
database's job through update_promoted_metrics); the optional metric appears at its fast
period within 2 s of the promotion, stops after the job, and get_metrics?job_id= and
get_job_metrics?job_id= return the job's rows and the energy the test computes from them."""

from __future__ import annotations

import asyncio
import json
import statistics
from datetime import UTC, datetime, timedelta

import aiohttp
import pytest

from kwollect.store import setupdb_oar
from kwollect.store.setupdb import make_token
from tests.fixtures.oar import link_args
from tests.fixtures.slurm import sbatch, start_slurm_with_hook
from tests.sqlapi import wait_for
from tests.test_kwollector import OIDS, Kwollector

POWER_MS = 1000
FAN_MS = 250


def descriptions(snmp_agent, nodes) -> str:
    text = ""
    for i, node in enumerate(nodes):
        text += (f"- name: bmc_node_power_watt\n  device_id: {node}\n"
                 f"  url: '{snmp_agent.url(OIDS[i])}'\n  update_every: {POWER_MS}\n"
                 f"- name: bmc_fan_rpm\n  device_id: {node}\n"
                 f"  url: '{snmp_agent.url(OIDS[2 + i])}'\n  update_every: 5000\n"
                 f"  optional: true\n  optional_update_every: {FAN_MS}\n")
    return text


async def api(http, gateway, name, params, token=None):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    method = http.post if token else http.get
    kwargs = {"json": params} if token else {"params": params}
    async with method(f"{gateway.url}/rpc/{name}", headers=headers, **kwargs) as response:
        assert response.status == 200, await response.text()
        return await response.json()


def trapezoid_wh(points) -> float:
    pairs = zip(points, points[1:], strict=False)
    return sum((a[1] + b[1]) / 2 * (b[0] - a[0]).total_seconds() for a, b in pairs) / 3600


class SlurmJobs:
    nodes = ("e2e-1", "e2e-2")

    def __init__(self, gateway) -> None:
        self.cluster = start_slurm_with_hook(gateway, self.nodes)
        self.started: list[int] = []

    async def start(self, http, gateway) -> int:
        job = sbatch(self.cluster, "-N2", "--comment", "monitor=bmc_fan.*", "--wrap", "sleep 8")
        self.started.append(job)
        return job

    async def end(self, http, gateway, job) -> None:
        """Slurm ends the job by itself; the epilog records the end."""

    def stop(self) -> None:
        self.cluster.stop()


class OarJobs:
    nodes = ("oarnode-1", "oarnode-2")

    def __init__(self, oar_db, kwdb) -> None:
        self.oar = oar_db
        self.kwdb = kwdb
        self.started: list[int] = []

    async def start(self, http, gateway) -> int:
        job = self.oar.oarsub("nobody", ("monitor=bmc_fan.*",), nodes=2)
        self.started.append(job)
        self.oar.start(job, ("oarnode-1.site.example", "oarnode-2.site.example"))
        # OAR's server prologue calls the reference endpoint with the writer token
        await api(http, gateway, "update_promoted_metrics", {},
                  make_token(gateway.secret, "kwuser", 1))
        return job

    async def end(self, http, gateway, job) -> None:
        await asyncio.sleep(5)  # the job runs for a while
        self.oar.end(job)
        await api(http, gateway, "update_promoted_metrics", {},
                  make_token(gateway.secret, "kwuser", 1))

    def stop(self) -> None:
        pass


@pytest.fixture(params=["slurm", "oar"])
async def scheduler(request, gateway, kwdb):
    if request.param == "slurm":
        request.getfixturevalue("slurm_binaries")
        jobs = SlurmJobs(gateway)
    else:
        oar_db = request.getfixturevalue("oar_db")
        args = link_args(kwdb, oar_db, request.getfixturevalue("tmp_path"))
        assert await asyncio.to_thread(setupdb_oar.main, args) == 0
        jobs = OarJobs(oar_db, kwdb)
    yield jobs
    jobs.stop()
    admin = await kwdb.connect("admin")
    await admin.execute("UPDATE kwollect.settings SET value = 'none' WHERE key = 'job_source'")
    # a failed test's job must not keep promoting for the tests after this one
    await admin.execute("DELETE FROM kwollect.job_promote WHERE job_id = ANY($1)", jobs.started)
    await admin.execute("DELETE FROM promoted_metrics WHERE job_id = ANY($1)", jobs.started)
    await admin.close()


async def test_a_job_from_start_to_end(scheduler, gateway, snmp_agent, kwdb, writer, tmp_path):
    nodes = scheduler.nodes
    k = Kwollector(tmp_path, kwdb, "e2e")
    (k.metrics_dir / "nodes.yaml").write_text(descriptions(snmp_agent, nodes))
    k.start()
    async with aiohttp.ClientSession() as http:
        try:
            await wait_for(lambda: writer.fetchval(
                "SELECT count(DISTINCT device_id) = 2 FROM metrics WHERE device_id = ANY($1) "
                "AND metric_id = 'bmc_node_power_watt' AND timestamp > now() - interval '5 s'",
                list(nodes)), timeout=30)
            job = await scheduler.start(http, gateway)
            promoted = await wait_for(lambda: writer.fetchval(
                "SELECT clock_timestamp() FROM promoted_metrics WHERE job_id = $1 "
                "HAVING count(*) = 2", job), timeout=30)
            first_fan = await wait_for(lambda: writer.fetchval(
                "SELECT min(timestamp) FROM metrics WHERE device_id = $1 "
                "AND metric_id = 'bmc_fan_rpm'", nodes[0]), timeout=10)
            latency = (first_fan - promoted).total_seconds()
            assert latency < 2.0, latency
            await scheduler.end(http, gateway, job)
            await wait_for(lambda: writer.fetchval(
                "SELECT bool_and(stop_time IS NOT NULL) FROM nodetime_per_job "
                "WHERE job_id = $1", job), timeout=60)
            stop = await writer.fetchval("SELECT max(stop_time) FROM nodetime_per_job "
                                         "WHERE job_id = $1", job)
            await wait_for(lambda: writer.fetchval(
                "SELECT count(*) = 0 FROM promoted_metrics WHERE job_id = $1", job))
            ended = datetime.now(UTC)
            await asyncio.sleep(3)
            late_fan = await writer.fetchval(
                "SELECT count(*) FROM metrics WHERE device_id = ANY($1) "
                "AND metric_id = 'bmc_fan_rpm' AND timestamp > $2",
                list(nodes), ended + timedelta(seconds=1.5))
            assert late_fan == 0  # collection is back to normal
            power_after = await writer.fetchval(
                "SELECT count(*) FROM metrics WHERE device_id = $1 "
                "AND metric_id = 'bmc_node_power_watt' AND timestamp > $2", nodes[0], ended)
            assert power_after >= 2

            rows = await api(http, gateway, "get_metrics", {"job_id": job})
            metrics = await api(http, gateway, "get_job_metrics", {"job_id": job})
        finally:
            assert k.stop() == 0, k.log()

    start = min(datetime.fromisoformat(r["timestamp"]) for r in rows)
    assert {r["device_id"] for r in rows} == set(nodes)
    assert all(datetime.fromisoformat(r["timestamp"]) <= stop for r in rows)
    fan = sorted(datetime.fromisoformat(r["timestamp"]) for r in rows
                 if r["device_id"] == nodes[0] and r["metric_id"] == "bmc_fan_rpm")
    period = statistics.median((b - a).total_seconds() for a, b in zip(fan, fan[1:],
                                                                         strict=False))
    assert period == pytest.approx(FAN_MS / 1000, abs=0.05)
    # the rows are those stored for the job's nodes in its window
    stored = await writer.fetchval(
        "SELECT count(*) FROM metrics WHERE device_id = ANY($1) AND timestamp BETWEEN "
        "(SELECT min(start_time) FROM nodetime_per_job WHERE job_id = $2) AND $3",
        list(nodes), job, stop)
    assert len(rows) == stored and start >= stop - timedelta(minutes=5)
    for node in nodes:
        power = [(datetime.fromisoformat(r["timestamp"]), r["value"]) for r in rows
                 if r["device_id"] == node and r["metric_id"] == "bmc_node_power_watt"]
        assert len(power) >= 5
        assert metrics["node_energy_watthour"][node] == pytest.approx(trapezoid_wh(power))
        assert metrics["node_peak_power_watt"][node] == max(v for _, v in power)
    assert metrics["job_energy_watthour"] == pytest.approx(
        sum(metrics["node_energy_watthour"].values()))
    complete = {(c["device_id"], c["metric_id"]): c for c in metrics["completeness"]}
    assert complete[(nodes[0], "bmc_node_power_watt")]["ratio"] >= 0.8
    print(f"{type(scheduler).__name__}: promotion -> first fast sample {latency:.2f} s; "
          f"fast period {period:.3f} s; {json.dumps(metrics['node_energy_watthour'])}")
