"""The kwollector program end to end: real snmpd and node exporter, real PostgreSQL,
the process started, reloaded and stopped by signals, and a database outage."""

from __future__ import annotations

import asyncio
import math
import os
import re
import signal
import time
import urllib.request
from datetime import UTC, datetime

from prometheus_client.parser import text_string_to_metric_families

from kwollect.collect.kwollector import main as kwollector_main
from kwollect.collect.selfmetrics import prometheus_text, self_readings
from tests.fixtures.kwollector import Kwollector
from tests.fixtures.snmp import BULK
from tests.sqlapi import wait_for

OIDS = sorted(BULK)
REFERENCE_FILE = """\
- name: idrac_power_watt
  device_id: node-1
  url: snmp://public@node-1-admin.domain.com/1.3.6.1.4.1.674.10892.5.4.600.30.1.6.1.3
  update_every: 5000
"""


def test_writer_online_state_is_exported():
    """kwollector_writer_online: 0 while the database is away, in the stored self-metrics
    and on the Prometheus endpoint alike."""
    stats = {"inserted": 5, "online": False, "last_error": "TimeoutError"}
    assert "kwollector_writer_online 0.0\n" in prometheus_text(0, stats, [])
    stored = {r.metric_id: r.value for r in self_readings("k", 1, 0, stats, [])}
    assert stored["kwollector_writer_online"] == 0.0
    assert "kwollector_writer_last_error" not in stored


def test_check_prints_the_polling_plan(tmp_path, capsys):
    (tmp_path / "node-1.yaml").write_text(REFERENCE_FILE)
    assert kwollector_main(["--metrics_dir", str(tmp_path), "--check"]) == 0
    out = capsys.readouterr().out
    assert "1 metrics from 1 files (0 skipped), 1 polling groups" in out
    assert "snmp://node-1-admin.domain.com every 5000 ms: node-1/idrac_power_watt" in out
    (tmp_path / "bad.yaml").write_text("- {name: x}\n")
    assert kwollector_main(["--metrics_dir", str(tmp_path), "--check"]) == 1
    assert "bad.yaml: entry 1 (x): device_id: required" in capsys.readouterr().err


def write_descriptions(directory, name, entries):
    lines = []
    for e in entries:
        lines.append(f"- name: {e['name']}\n  device_id: {e['device_id']}\n  url: '{e['url']}'\n"
                     f"  update_every: {e.get('update_every', 500)}\n"
                     + ("  optional: true\n" if e.get("optional") else ""))
    (directory / name).write_text("".join(lines))


async def count_rows(kwdb, device):
    conn = await kwdb.connect("kwuser")
    try:
        return await conn.fetchval("SELECT count(*) FROM metrics WHERE device_id = $1", device)
    finally:
        await conn.close()


async def count_distinct_metrics(conn, device, at_least):
    n = await conn.fetchval("SELECT count(DISTINCT metric_id) FROM metrics WHERE device_id = $1",
                            device)
    return n >= at_least


async def rows(conn, device, metric=None):
    return await conn.fetch(
        "SELECT timestamp, metric_id, value FROM metrics WHERE device_id = $1 "
        "AND ($2::text IS NULL OR metric_id = $2) ORDER BY timestamp", device, metric)


async def test_collects_snmp_and_prometheus_into_the_database(collector, snmp_agent, node_exporter,
                                                              writer):
    k = collector("kw1")
    write_descriptions(k.metrics_dir, "pdu.yaml", [
        {"name": f"oid{i}", "device_id": "kw1-pdu", "url": snmp_agent.url(oid)}
        for i, oid in enumerate(OIDS[:5])])
    write_descriptions(k.metrics_dir, "node.yaml", [
        {"name": "prom", "device_id": "kw1-node",
         "url": f"prometheus://{node_exporter.address}/node_load1-node_boot_time_seconds"}])
    k.start()
    # every target polled and written at least once (no fixed sleep: a loaded machine may
    # take seconds to start the process)
    await wait_for(lambda: count_distinct_metrics(writer, "kw1-pdu", 5), timeout=90, step=0.5)
    await wait_for(lambda: rows(writer, "kw1-node"), timeout=90, step=0.5)
    # the kwollector's own health, as a Prometheus endpoint
    port = re.search(r"prometheus_port: (\d+)", k.config.read_text()).group(1)
    exposition = await asyncio.to_thread(
        lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read())
    families = {f.name: f for f in text_string_to_metric_families(exposition.decode())}
    assert families["kwollector_values_collected"].type == "counter"
    assert families["kwollector_writer_online"].samples[0].value == 1.0  # to alert on
    polls = {s.labels["target"]: s.labels for s in families["kwollector_polls"].samples}
    snmp_target = f"snmp://127.0.0.1:{snmp_agent.port}"
    assert polls[snmp_target] == {"target": snmp_target, "credentials": "1"}
    # SIGHUP: a new file is picked up without a restart
    write_descriptions(k.metrics_dir, "more.yaml", [
        {"name": "late", "device_id": "kw1-late", "url": snmp_agent.url(OIDS[9])}])
    k.signal(signal.SIGHUP)
    await wait_for(lambda: rows(writer, "kw1-late", "late"), timeout=90, step=0.5)
    await wait_for(lambda: rows(writer, "kw1-self"), timeout=90, step=0.5)
    assert k.stop() == 0, k.log()
    pdu = await rows(writer, "kw1-pdu")
    assert {r["metric_id"] for r in pdu} == {f"oid{i}" for i in range(5)}
    assert {r["value"] for r in pdu if r["metric_id"] == "oid0"} == {float(BULK[OIDS[0]][1])}
    node = {r["metric_id"] for r in await rows(writer, "kw1-node")}
    assert node == {"prom_node_load1", "prom_node_boot_time_seconds"}
    assert await rows(writer, "kw1-late", "late")
    self_metrics = {r["metric_id"] for r in await rows(writer, "kw1-self")}
    assert "kwollector_values_collected_total" in self_metrics


async def test_promotion_from_the_database(collector, snmp_agent, writer):
    k = collector("kw2")
    write_descriptions(k.metrics_dir, "opt.yaml", [
        {"name": "always", "device_id": "kw2-node", "url": snmp_agent.url(OIDS[0])},
        {"name": "fan_rpm", "device_id": "kw2-node", "url": snmp_agent.url(OIDS[1]),
         "optional": True}])
    k.start()
    try:
        # running and polling: the always-on metric is stored, the optional one is not
        await wait_for(lambda: rows(writer, "kw2-node", "always"), timeout=90, step=0.5)
        await asyncio.sleep(2)
        assert await rows(writer, "kw2-node", "fan_rpm") == []
        promoted_at = datetime.now(UTC)
        await writer.execute("INSERT INTO promoted_metrics (device_id, metric_id) "
                             "VALUES ('kw2-node', 'fan_.*')")
        # picked up from the notification, without a restart; no bound on how soon (a
        # loaded machine delays it), but nothing was collected before the promotion
        got = await wait_for(lambda: rows(writer, "kw2-node", "fan_rpm"), timeout=90, step=0.5)
        assert got[0]["timestamp"] >= promoted_at
    finally:
        await writer.execute("DELETE FROM promoted_metrics WHERE device_id = 'kw2-node'")
        assert k.stop() == 0, k.log()


COLLECTED = "kwollector_values_collected_total"
ONLINE = "kwollector_writer_online"
FIRST_RUN_POLLS, SECOND_RUN_POLLS = 24, 44
"""Polls of each run of the outage test before it is stopped (12 s and 22 s of its 500 ms
period), so that its window (up to 1 s before the stop) holds at least 20 and 40 ticks: one
and two skipped ticks are tolerated (5 %), as with the fixed sleeps at low load."""


async def health(k: Kwollector) -> dict[str, float]:
    """The kwollector's unlabelled health samples from its Prometheus endpoint (served by the
    process itself, so also during a database outage); {} while nothing listens there."""
    port = re.search(r"prometheus_port: (\d+)", k.config.read_text()).group(1)
    try:
        text = await asyncio.to_thread(lambda: urllib.request.urlopen(
            f"http://127.0.0.1:{port}/metrics", timeout=5).read())
    except OSError:
        return {}
    return {s.name: s.value for f in text_string_to_metric_families(text.decode())
            for s in f.samples if not s.labels}


async def wait_for_health(k: Kwollector, condition) -> dict[str, float]:
    async def check() -> dict[str, float] | None:
        samples = await health(k)
        return samples if samples and condition(samples) else None
    return await wait_for(check, timeout=120, step=0.25)


async def test_database_outage_and_restart_lose_nothing(collector, snmp_agent, writer, kwdb):
    """PostgreSQL stops during collection; the kwollector is restarted in the middle of the
    outage; afterwards every tick of every running period is stored once.  Each step waits
    for what it needs (rows stored, polls made during the outage, everything replayed) as
    the kwollector reports it, not for a fixed time: a loaded machine takes seconds to
    start the process, and the fixed 41 s this test slept were sometimes not enough."""
    k = collector("kw3")
    write_descriptions(k.metrics_dir, "pdu.yaml", [
        {"name": f"o{i}", "device_id": "kw3-pdu", "url": snmp_agent.url(oid)}
        for i, oid in enumerate(OIDS[:3])])
    k.start()
    runs = [time.time()]
    await wait_for(lambda: rows(writer, "kw3-pdu"), timeout=120, step=0.25)
    await writer.close()
    kwdb.cluster.stop()
    try:
        # the first run polls on, offline, its readings held in memory ...
        await wait_for_health(k, lambda s: s[ONLINE] == 0
                              and s[COLLECTED] >= 3 * FIRST_RUN_POLLS)
        assert k.stop() == 0, k.log()  # SIGTERM mid-outage: buffered rows go to the spool
        runs.append(time.time())
        k.start()
        runs.append(time.time())
        # ... the second starts offline and polls a few seconds before the database is back
        held = await wait_for_health(k, lambda s: s[ONLINE] == 0 and s[COLLECTED] >= 3 * 6)
    finally:
        kwdb.cluster.start()
    spooled = int(re.search(r"stopped: collected=(\d+)", k.log()).group(1))

    async def replayed() -> bool:
        """Online again, what both runs read during the outage stored, enough polls."""
        samples = await health(k)
        return (bool(samples) and samples[ONLINE] == 1
                and samples[COLLECTED] >= 3 * SECOND_RUN_POLLS
                and samples[COLLECTED] > held[COLLECTED]
                and await count_rows(kwdb, "kw3-pdu") >= spooled + held[COLLECTED])

    await wait_for(replayed, timeout=120, step=0.25)
    runs.append(time.time())
    assert k.stop() == 0, k.log()
    conn = await kwdb.connect("kwuser")
    try:
        stored = await rows(conn, "kw3-pdu", "o0")
        duplicates = await conn.fetchval(
            "SELECT count(*) - count(DISTINCT (timestamp, metric_id)) FROM metrics "
            "WHERE device_id = 'kw3-pdu'")
    finally:
        await conn.close()
    assert duplicates == 0
    # lossless: every value either run read is stored, exactly once
    collected = sum(int(m) for m in re.findall(r"stopped: collected=(\d+)", k.log()))
    assert collected == await count_rows(kwdb, "kw3-pdu") > 0
    # and each run read (nearly) every tick from its first poll on, through the outage: a
    # tick can be skipped on a loaded machine; how long the process took to start (3 s of
    # imports under a load of 10 on 2 cores) is not what this checks
    stamps = [r["timestamp"].timestamp() for r in stored]
    ticks = {round(t * 2) for t in stamps}  # 500 ms period: one reading per half second
    # (a window begins at the first tick after its run started: rounded down, it took in the
    # first run's last tick when the restart came less than 500 ms after it, and the second
    # run's start-up then counted as missed ticks, 3 to 6 on a loaded machine)
    for start, stop in (runs[0:2], runs[2:4]):
        window = range(math.ceil(start * 2), int((stop - 1) * 2))
        first = min(tick for tick in ticks if tick in window)
        expected = set(range(first, window.stop))
        assert len(expected) >= 10, (start, stop, first)
        assert len(expected - ticks) <= len(expected) // 20, (start, stop, expected - ticks)
    assert "spool" in k.log().lower()
    assert os.path.isdir(k.base / "spool")
