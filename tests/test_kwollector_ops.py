"""The kwollector as an operator runs it: stops during an outage, reloads with a typo,
the default spool.  Real snmpd, real PostgreSQL, the process driven by signals."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time

from kwollect.dev.simulators import free_port
from tests.fixtures.kwollector import Kwollector
from tests.sqlapi import wait_for
from tests.test_kwollector import OIDS, count_rows, rows, write_descriptions


def set_options(k: Kwollector, **options: object) -> None:
    """Change (or, with None, remove) lines of the kwollector's configuration file."""
    text = k.config.read_text()
    for key, value in options.items():
        text = re.sub(rf"^{key}: .*\n", "", text, flags=re.MULTILINE)
        if value is not None:
            text += f"{key}: {value}\n"
    k.config.write_text(text)


def timed_stop(k: Kwollector) -> tuple[int, float]:
    started = time.monotonic()
    code = k.stop()
    return code, time.monotonic() - started


async def wait_for_log(k: Kwollector, text: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while text not in k.log():
        assert time.monotonic() < deadline, f"{text!r} not logged:\n{k.log()}"
        await asyncio.sleep(0.2)


async def count_rows_at_least(kwdb, device: str, n: int) -> bool:
    return await count_rows(kwdb, device) >= n


async def stop_during_an_outage(k: Kwollector, **options: object) -> None:
    """Start `k` with its database away (a port nothing listens on), stop it a few seconds
    into that outage, and check the stop is fast."""
    set_options(k, db_port=free_port(), close_timeout_s=30, **options)
    k.start()
    await wait_for_log(k, "database unavailable")
    await asyncio.sleep(3)
    code, took = timed_stop(k)
    assert code == 0, k.log()
    assert took < 4, f"stop took {took:.1f} s during an outage:\n{k.log()}"


async def test_sigterm_during_an_outage_spools_and_exits_at_once(collector, snmp_agent, kwdb):
    """10 s into an outage a stop used to wait the whole 20 s close timeout.  Now what is
    in memory goes to the spool at once, and a later run delivers all of it."""
    k = collector("ops1")
    write_descriptions(k.metrics_dir, "pdu.yaml", [
        {"name": f"o{i}", "device_id": "ops1-pdu", "url": snmp_agent.url(oid)}
        for i, oid in enumerate(OIDS[:3])])
    await stop_during_an_outage(k)
    assert "dropped=0" in k.log()
    assert os.listdir(k.base / "spool")
    spooled = int(re.search(r"stopped: collected=(\d+)", k.log()).group(1))
    set_options(k, db_port=kwdb.cluster.port)  # the database is back
    k.start()
    await wait_for_log(k, "replaying them first")
    # until the spool is replayed (what the second run reads is flushed by its stop)
    await wait_for(lambda: count_rows_at_least(kwdb, "ops1-pdu", spooled), timeout=90, step=0.25)
    assert k.stop() == 0, k.log()
    collected = sum(int(m) for m in re.findall(r"stopped: collected=(\d+)", k.log()))
    assert collected == await count_rows(kwdb, "ops1-pdu") > 0


async def test_without_a_spool_the_stop_is_fast_and_the_loss_said(collector, snmp_agent):
    k = collector("ops2")
    write_descriptions(k.metrics_dir, "pdu.yaml", [
        {"name": "o0", "device_id": "ops2-pdu", "url": snmp_agent.url(OIDS[0])}])
    await stop_during_an_outage(k, spool_dir="none")
    log = k.log()
    assert "no spool (spool_dir: none)" in log  # said at start
    dropped = int(re.search(r"stopped: collected=\d+ .*dropped=(\d+)", log).group(1))
    assert dropped > 0 and "there is no spool" in log


async def test_default_spool_is_a_per_user_state_directory(collector, snmp_agent, kwdb,
                                                           tmp_path, monkeypatch):
    """Without spool_dir the kwollector is lossless anyway (the reference config has none)."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.delenv("STATE_DIRECTORY", raising=False)
    k = collector("ops3")
    write_descriptions(k.metrics_dir, "pdu.yaml", [
        {"name": "o0", "device_id": "ops3-pdu", "url": snmp_agent.url(OIDS[0])}])
    set_options(k, db_port=free_port(), spool_dir=None)
    k.start()
    await wait_for_log(k, "database unavailable")
    await asyncio.sleep(2)
    assert k.stop() == 0, k.log()
    spool = tmp_path / "state" / "kwollect" / "kwollector-kwollector"
    assert any(p.suffix == ".seg" for p in spool.iterdir()), k.log()
    assert "dropped=0" in k.log()


async def test_reload_keeps_the_last_good_description_of_a_broken_entry(collector, snmp_agent,
                                                                        writer):
    """A typo in one entry at a SIGHUP once stopped every metric of its file."""
    k = collector("ops4")
    entries = [{"name": f"m{i}", "device_id": "ops4-pdu", "url": snmp_agent.url(OIDS[i])}
               for i in range(3)]
    write_descriptions(k.metrics_dir, "pdu.yaml", entries)
    k.start()
    try:
        await wait_for_log(k, "metrics loaded")  # SIGHUP is handled from then on
        await asyncio.sleep(2)
        broken = (k.metrics_dir / "pdu.yaml").read_text().replace("update_every: 500\n",
                                                                  "update_evry: 500\n", 1)
        new = ("- name: m3\n  device_id: ops4-pdu\n"
               f"  url: '{snmp_agent.url(OIDS[3])}'\n  update_every: 500\n")
        (k.metrics_dir / "pdu.yaml").write_text(broken + new)
        k.signal(signal.SIGHUP)
        await wait_for_log(k, "is invalid now")
        reloaded_at = time.time()

        async def polled_since_the_reload() -> bool:
            return await writer.fetchval(
                "SELECT count(DISTINCT metric_id) = 4 FROM metrics WHERE device_id = 'ops4-pdu' "
                "AND timestamp > to_timestamp($1)", reloaded_at + 1)

        await wait_for(polled_since_the_reload, timeout=90, step=0.25)
    finally:
        assert k.stop() == 0, k.log()
    log = k.log()
    assert re.search(r"pdu\.yaml: entry 1 \(m0\): unknown field 'update_evry'", log)
    assert re.search(r"pdu\.yaml: entry 1 \(m0, device ops4-pdu\) is invalid now: its last "
                     r"good description is kept", log)
    for metric in ("m0", "m1", "m2", "m3"):  # kept, unchanged, unchanged, new
        stamps = [r["timestamp"].timestamp() for r in await rows(writer, "ops4-pdu", metric)]
        assert any(t > reloaded_at + 1 for t in stamps), (metric, log)
