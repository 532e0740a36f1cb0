"""Several kwollectors on one metrics.d (`shard: i/n`): the split itself, then two real
kwollector processes against real snmpd agents and a node exporter, every target polled
by exactly one of them and every reading stored once."""

from __future__ import annotations

import asyncio
import re
import time
import urllib.request
from collections import Counter
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from kwollect.collect.kwollector import main as kwollector_main
from kwollect.collect.sharding import Shard, ShardError, bucket_of, jump_hash, shard_key
from kwollect.model import MetricDescription
from tests.fixtures.snmp import BULK, start_snmpd, stop_snmpd
from tests.test_kwollector import Kwollector, write_descriptions

TARGETS = [f"snmp://pdu-{i}.example.org:161" for i in range(5000)]


def desc(url: str, name: str = "m") -> MetricDescription:
    return MetricDescription(name=name, device_id="d", url=url, update_every_ms=1000)


def owners(targets: list[str], count: int) -> dict[str, int]:
    return {t: bucket_of(t, count) for t in targets}


@pytest.mark.parametrize("count", [1, 2, 3, 7, 16])
def test_shards_are_disjoint_complete_and_balanced(count):
    held = [[t for t in TARGETS if Shard(i, count).owns(t)] for i in range(1, count + 1)]
    assert sorted(t for shard in held for t in shard) == sorted(TARGETS)  # complete, disjoint
    expected = len(TARGETS) / count
    assert all(abs(len(shard) - expected) < 0.15 * expected for shard in held), \
        [len(s) for s in held]


@pytest.mark.parametrize("count", [1, 2, 3, 5, 10])
def test_adding_a_shard_moves_only_what_the_new_shard_takes(count):
    before, after = owners(TARGETS, count), owners(TARGETS, count + 1)
    moved = [t for t in TARGETS if before[t] != after[t]]
    assert all(after[t] == count + 1 for t in moved)  # nothing moves between old shards
    expected = len(TARGETS) / (count + 1)
    assert abs(len(moved) - expected) < 0.15 * expected
    # and removing it again moves back only its own targets
    assert {t for t in TARGETS if owners([t], count)[t] != after[t]} == set(moved)


def test_the_split_is_stable_across_processes_and_versions():
    """The bucket depends only on the name: these values are what every kwollector of any
    machine computes (a change would make two releases disagree during an upgrade)."""
    assert jump_hash(0, 1) == 0 and jump_hash(0, 1000) == 0
    assert [jump_hash(k, 10) for k in (1, 2, 3, 1 << 40, (1 << 64) - 1)] == [6, 6, 8, 9, 9]
    assert [bucket_of(t, 3) for t in TARGETS[:8]] == [3, 3, 1, 3, 3, 3, 3, 1]


def test_the_target_not_the_metric_is_sharded():
    """Every metric of one endpoint goes to one shard (it shares the connection); the
    credentials and OID do not matter."""
    same = [desc("snmp://public@10.0.0.1:161/1.3.6.1.2.1.1.3.0", "a"),
            desc("snmp://private@10.0.0.1:161/1.3.6.1.2.1.1.5.0", "b")]
    assert {shard_key(d) for d in same} == {"snmp://10.0.0.1:161"}
    for count in (2, 3, 4):
        picked = [Shard(i, count).select(same) for i in range(1, count + 1)]
        assert sorted(len(p) for p in picked) == [0] * (count - 1) + [2]


@pytest.mark.parametrize("text", ["0/2", "3/2", "1", "a/b", "1/0", "-1/2", "1/2/3", " / "])
def test_bad_shard_option(text, tmp_path, capsys):
    with pytest.raises(ShardError, match="shard"):
        Shard.parse(text)
    assert kwollector_main(["--metrics_dir", str(tmp_path), "--check", f"--shard={text}"]) == 2
    assert "kwollector: shard" in capsys.readouterr().err


def test_shard_parse():
    assert Shard.parse("") == Shard(1, 1) and Shard.parse("2/3") == Shard(2, 3)
    assert str(Shard.parse(" 1/4 ")) == "1/4"


def test_check_shows_the_targets_of_this_shard(tmp_path, capsys):
    targets = [f"snmp://public@pdu-{i}.example.org/1.3.6.1.2.1.1.3.0" for i in range(6)]
    write_descriptions(tmp_path, "pdus.yaml", [
        {"name": "uptime", "device_id": f"pdu-{i}", "url": url}
        for i, url in enumerate(targets)])
    seen = []
    for i in (1, 2):
        assert kwollector_main(["--metrics_dir", str(tmp_path), "--check",
                                "--shard", f"{i}/2"]) == 0
        out = capsys.readouterr().out
        polls = re.findall(r"^  polls (\S+)$", out, re.MULTILINE)
        assert out.startswith(f"shard {i}/2: {len(polls)} of 6 targets, {len(polls)} of 6 "
                              f"metrics from 1 files")
        assert all(Shard(i, 2).owns(t) for t in polls)
        seen += polls
    assert sorted(seen) == sorted(f"snmp://pdu-{i}.example.org" for i in range(6))


def shared_metrics_dir(tmp_path: Path, agents: list, prefix: str, period_ms: int = 500) -> Path:
    """One metrics.d for every kwollector of a test: one outlet per snmpd agent."""
    shared = tmp_path / "metrics.d"
    shared.mkdir()
    oid = sorted(BULK)[0]
    write_descriptions(shared, "pdus.yaml", [
        {"name": "outlet", "device_id": f"{prefix}-pdu-{n}", "url": agent.url(oid),
         "update_every": period_ms} for n, agent in enumerate(agents)])
    return shared


def shared_kwollector(tmp_path: Path, kwdb, shared: Path, i: int, prefix: str,
                      extra: str) -> Kwollector:
    """Kwollector number i on the shared metrics.d, with `extra` configuration lines."""
    (tmp_path / f"k{i}").mkdir()
    k = Kwollector(tmp_path / f"k{i}", kwdb, prefix)
    k.config.write_text(k.config.read_text().replace(
        f"metrics_dir: {k.metrics_dir}", f"metrics_dir: {shared}") + extra)
    return k


def prometheus_targets(k: Kwollector) -> set[str]:
    """The targets the kwollector has polled (none while it is still starting)."""
    port = re.search(r"prometheus_port: (\d+)", k.config.read_text()).group(1)
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics",
                                      timeout=5).read().decode()
    except OSError:
        return set()
    return {s.labels["target"] for family in text_string_to_metric_families(text)
            if family.name == "kwollector_polls" for s in family.samples if s.value > 0}


async def test_two_kwollectors_share_one_metrics_dir(tmp_path, kwdb, writer, node_exporter,
                                                     snmp_agent):
    """Two kwollectors (shard 1/2 and 2/2) on the same metrics.d: each polls only its own
    targets, together all of them, and no reading is stored twice."""
    agents, processes = [snmp_agent], []
    try:
        # real snmpd agents, one per port, until each shard has at least two targets
        while len(agents) < 12 and min(Counter(
                bucket_of(f"snmp://{a.host}:{a.port}", 2) for a in agents).get(i, 0)
                for i in (1, 2)) < 2:
            process, agent = start_snmpd(tmp_path / f"snmpd{len(agents)}")
            processes.append(process)
            agents.append(agent)
        shared = shared_metrics_dir(tmp_path, agents, "shard")
        write_descriptions(shared, "node.yaml", [
            {"name": "prom", "device_id": "shard-node",
             "url": f"prometheus://{node_exporter.address}/node_load1"}])
        kwollectors = [shared_kwollector(tmp_path, kwdb, shared, i, f"shard{i}",
                                         f"shard: {i}/2\n") for i in (1, 2)]
        every = {f"snmp://{a.host}:{a.port}" for a in agents} | \
            {f"prometheus://{node_exporter.address}"}
        try:
            for k in kwollectors:
                k.start()
            # a loaded machine can take seconds to start them: wait for every target's poll
            deadline = time.monotonic() + 90
            polled: list[set[str]] = [set(), set()]
            while polled[0] | polled[1] != every and time.monotonic() < deadline:
                await asyncio.sleep(1)
                polled = [await asyncio.to_thread(prometheus_targets, k) for k in kwollectors]
            await asyncio.sleep(2)
            polled = [await asyncio.to_thread(prometheus_targets, k) for k in kwollectors]
        finally:
            codes = [k.stop() for k in kwollectors]
        assert codes == [0, 0], [k.log() for k in kwollectors]
    finally:
        for process in processes:
            stop_snmpd(process)
    assert polled[0] | polled[1] == every
    assert not polled[0] & polled[1]
    assert all(Shard(i + 1, 2).owns(t) for i in (0, 1) for t in polled[i])
    devices = [f"shard-pdu-{n}" for n in range(len(agents))] + ["shard-node"]
    stored = await writer.fetch(
        "SELECT device_id, count(*) AS n, count(DISTINCT (timestamp, metric_id)) AS distinct_n "
        "FROM metrics WHERE device_id = ANY($1) GROUP BY device_id", devices)
    assert {r["device_id"] for r in stored} == set(devices)  # every target polled
    assert all(r["n"] == r["distinct_n"] for r in stored)  # none twice
    collected = sum(int(m) for k in kwollectors
                    for m in re.findall(r"stopped: collected=(\d+)", k.log()))
    assert collected == sum(r["n"] for r in stored)
    # each kwollector's self-metrics under its own device id
    for i in (1, 2):
        assert await writer.fetchval("SELECT count(*) FROM metrics WHERE device_id = $1",
                                     f"shard{i}-self")
