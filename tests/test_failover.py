"""Failover of kwollectors through leases in PostgreSQL (`failover_groups`): three real
kwollector processes share one metrics.d of real snmpd agents; one is killed with
SIGKILL; the two others take its target groups over.  The gap on its targets is measured
and bounded, and no reading is stored twice."""

from __future__ import annotations

import asyncio
import signal
import time
from datetime import UTC, datetime

import pytest

from kwollect.collect.kwollector import main as kwollector_main
from kwollect.collect.sharding import group_of
from tests.fixtures.snmp import start_snmpd, stop_snmpd
from tests.sqlapi import wait_for
from tests.test_kwollector import Kwollector
from tests.test_sharding import shared_kwollector, shared_metrics_dir

GROUPS = 6
TTL_S = 3.0
PERIOD_MS = 500


@pytest.mark.parametrize("extra, message", [
    (["--shard=1/2", "--failover_groups=4"], "shard and failover_groups exclude each other"),
    (["--failover_groups=-1"], "failover_groups must be an integer"),
    (["--failover_groups=4", "--lease_ttl_s=1"], "lease_ttl_s must be between 3 and 3600"),
])
def test_failover_options_checked(extra, message, tmp_path, capsys):
    assert kwollector_main(["--metrics_dir", str(tmp_path), "--check", *extra]) == 2
    assert message in capsys.readouterr().err


async def test_lease_groups_share_and_expire(writer, admin):
    """The SQL side alone: members share the groups, a silent member's groups are claimed
    once its leases expired, never before."""
    await admin.execute("DELETE FROM kwollect.collector_leases; "
                         "DELETE FROM kwollect.collector_members")
    lease = "SELECT kwollect.lease_groups($1, $2, $3)"
    assert await writer.fetchval(lease, "a", 4, 60.0) == [0, 1, 2, 3]
    assert await writer.fetchval(lease, "b", 4, 60.0) == []  # a holds all of them yet
    assert await writer.fetchval(lease, "a", 4, 60.0) == [0, 1]  # a sees b: releases two
    assert await writer.fetchval(lease, "b", 4, 60.0) == []  # released, not yet claimable
    await admin.execute("UPDATE kwollect.collector_leases SET expires_at = now() "
                         "WHERE released")
    assert await writer.fetchval(lease, "b", 4, 60.0) == [2, 3]
    # a falls silent: its leases (and its membership) expire, b takes everything
    await admin.execute("UPDATE kwollect.collector_leases SET expires_at = now() "
                         "WHERE holder = 'a'; UPDATE kwollect.collector_members "
                         "SET expires_at = now() WHERE holder = 'a'")
    assert await writer.fetchval(lease, "b", 4, 60.0) == [0, 1, 2, 3]
    await admin.execute("DELETE FROM kwollect.collector_leases; "
                         "DELETE FROM kwollect.collector_members")


async def test_kill_one_of_three_kwollectors(tmp_path, kwdb, writer, admin, snmp_agent):
    await admin.execute("DELETE FROM kwollect.collector_leases; "
                         "DELETE FROM kwollect.collector_members")
    agents, processes = [snmp_agent], []
    kwollectors: list[Kwollector] = []
    try:
        for n in range(1, 6):
            process, agent = start_snmpd(tmp_path / f"snmpd{n}")
            processes.append(process)
            agents.append(agent)
        shared = shared_metrics_dir(tmp_path, agents, "fo", PERIOD_MS)
        device_of = {f"snmp://{a.host}:{a.port}": f"fo-pdu-{n}" for n, a in enumerate(agents)}
        for i in (1, 2, 3):
            k = shared_kwollector(tmp_path, kwdb, shared, i, f"fo{i}",
                                  f"failover_groups: {GROUPS}\nlease_ttl_s: {TTL_S}\n")
            kwollectors.append(k)
            k.start()
        # wait for three members sharing the groups two by two, all targets polled
        deadline = time.monotonic() + 120
        holders: dict[int, str] = {}
        while time.monotonic() < deadline:
            await asyncio.sleep(1)
            rows = await writer.fetch("SELECT group_no, holder FROM kwollect.collector_leases "
                                      "WHERE NOT released AND expires_at > now()")
            holders = {r["group_no"]: r["holder"] for r in rows}
            polled = await writer.fetchval(
                "SELECT count(DISTINCT device_id) FROM metrics WHERE device_id LIKE 'fo-pdu-%' "
                "AND timestamp > now() - interval '2 s'")
            if len(holders) == GROUPS and len(set(holders.values())) == 3 \
                    and polled == len(agents):
                break
        assert len(set(holders.values())) == 3, (holders, [k.log() for k in kwollectors])
        # the victim: the kwollector holding the most targets
        targets_of: dict[str, list[str]] = {}
        for target, device in device_of.items():
            targets_of.setdefault(holders[group_of(target, GROUPS)], []).append(device)
        victim_holder = max(targets_of, key=lambda h: len(targets_of[h]))
        victim = next(k for k in kwollectors
                      if k.process and victim_holder.endswith(f":{k.process.pid}"))
        victim_devices = targets_of[victim_holder]
        await asyncio.sleep(2)
        assert victim.process is not None
        victim.process.send_signal(signal.SIGKILL)
        victim.process.wait()
        killed_at = datetime.now(UTC)
        # until the survivors hold its groups and have polled each of its targets since the
        # kill (a condition: the fixed TTL_S * 3 + 3 s of sleep was 12 s, most of it idle)
        await wait_for(lambda: writer.fetchval(
            "SELECT NOT EXISTS (SELECT FROM kwollect.collector_leases WHERE holder = $1) "
            "AND (SELECT count(DISTINCT device_id) FROM metrics WHERE device_id = ANY($2) "
            "AND timestamp > $3) = cardinality($2)", victim_holder, victim_devices, killed_at),
            timeout=120, step=0.25)
        survivors = [k for k in kwollectors if k is not victim]
        codes = [k.stop() for k in survivors]
        assert codes == [0, 0], [k.log() for k in survivors]
    finally:
        for k in kwollectors:
            if k.process and k.process.poll() is None:
                k.process.kill()
        for process in processes:
            stop_snmpd(process)
    leases = await writer.fetch("SELECT holder FROM kwollect.collector_leases")
    assert victim_holder not in {r["holder"] for r in leases}  # its groups were taken over
    gaps = {}
    for device in victim_devices:
        stamps = [r["timestamp"].timestamp() for r in await writer.fetch(
            "SELECT timestamp FROM metrics WHERE device_id = $1 ORDER BY timestamp", device)]
        gaps[device] = max(b - a for a, b in zip(stamps, stamps[1:], strict=False))
        assert stamps[-1] > time.time() - TTL_S * 3  # polled again, by a survivor
    # the bound of docs/scaling.md (ttl + ttl/3 + a period), with room for a loaded machine
    bound = TTL_S + TTL_S / 3 + PERIOD_MS / 1000
    print(f"gap on the killed kwollector's targets: {gaps} (bound {bound:.1f} s)")
    assert max(gaps.values()) < bound + 6, gaps
    duplicates = await writer.fetchval(
        "SELECT count(*) - count(DISTINCT (device_id, metric_id, timestamp)) FROM metrics "
        "WHERE device_id LIKE 'fo-pdu-%'")
    assert duplicates == 0
    await admin.execute("DELETE FROM kwollect.collector_leases; "
                         "DELETE FROM kwollect.collector_members")
