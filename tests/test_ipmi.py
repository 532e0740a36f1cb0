"""IPMI sensors through FreeIPMI's ipmi-sensors, against OpenIPMI's ipmi_sim on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import re
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from kwollect.model import MetricDescription
from kwollect.protocols import ipmi, open_collector, target_key
from tests.fixtures.ipmi import (
    ADMIN,
    FAN_SENSOR_NUMBER,
    INLET_TEMP_2,
    ODD,
    RECORD_IDS,
    IpmiSim,
    children_named,
    free_port,
)

ALL_NAMES = ("CPU Temp", "Pwr Consumption", "Fan1", "Vcore")


def metric(url: str, name: str = "m", **fields) -> MetricDescription:
    return MetricDescription(name=name, device_id="node-1", url=url, source="test", **fields)


@contextlib.asynccontextmanager
async def collector(desc: MetricDescription, timeout: float = 3.0) -> AsyncIterator:
    protocol, key = target_key(desc)
    assert protocol == "ipmi"
    coll = open_collector(protocol, key, timeout)
    try:
        yield coll
    finally:
        await coll.close()


def dead_url(password: str = ADMIN[1], sensor: str = "2") -> str:
    """A BMC address where nothing answers (a free UDP port on loopback)."""
    return (f"ipmisensor://admin:{password}@127.0.0.1:{free_port()}/{sensor}"
            "?workaround-flags=opensesspriv")


class ProcWatcher:
    """Samples this process's ipmi-sensors children (argv, environment) in a thread."""

    def __init__(self) -> None:
        self.seen: dict[int, tuple[bytes, bytes]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for pid in children_named("ipmi-sensors"):
                if pid not in self.seen:
                    with contextlib.suppress(OSError):
                        self.seen[pid] = (Path(f"/proc/{pid}/cmdline").read_bytes(),
                                          Path(f"/proc/{pid}/environ").read_bytes())
            time.sleep(0.002)

    def __enter__(self) -> ProcWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def argvs(self) -> list[list[str]]:
        return [cmdline.decode().split("\0")[:-1] for cmdline, _ in self.seen.values()]


# --- URL and target key ----------------------------------------------------------------------

def test_target_key_groups_sensors_of_one_bmc():
    by_id = target_key(metric("ipmisensor://root:calvin@bmc-1.example.com/20"))
    by_name = target_key(metric("ipmisensor://root:calvin@BMC-1.example.com:623/CPU%20Temp"))
    other_user = target_key(metric("ipmisensor://admin:calvin@bmc-1.example.com/20"))
    other_port = target_key(metric("ipmisensor://root:calvin@bmc-1.example.com:624/20"))
    assert by_id == by_name
    assert by_id != other_user and by_id != other_port
    key = by_id[1]
    assert (key.host, key.port, key.user, key.password) == ("bmc-1.example.com", 623, "root",
                                                            "calvin")
    assert "calvin" not in repr(key) and "calvin" not in str(key)


def test_url_sensor_by_id_or_name_and_percent_decoding():
    target, ref = ipmi.parse_url("ipmisensor://us%40er:p%23ss%2Fw@10.0.0.7:6230/CPU%20Temp")
    assert (target.user, target.password, target.port, ref) == ("us@er", "p#ss/w", 6230,
                                                                "CPU Temp")
    assert ipmi.parse_url("ipmisensor://u:p@10.0.0.7/0042")[1] == 42
    assert ipmi.parse_url("ipmisensor://u:p@10.0.0.7/Temp 1")[1] == "Temp 1"
    target, _ = ipmi.parse_url("ipmisensor://@10.0.0.7/1")
    assert (target.user, target.password) == ("", "")


@pytest.mark.parametrize(("url", "complaint"), [
    ("snmp://u:hunter2@h/1", "scheme"),
    ("ipmisensor://u:hunter2@/1", "host"),
    ("ipmisensor://u:hunter2@[::1]/1", "host"),
    ("ipmisensor://u:hunter2@node[1-3]/1", "malformed"),
    ("ipmisensor://u:hunter2@h:99999/1", "port"),
    ("ipmisensor://u:hunter2@h:abc/1", "port"),
    ("ipmisensor://u:hunter2@h/", "sensor"),
    ("ipmisensor://u:hunter2@h", "sensor"),
    ("ipmisensor://u:hunter2@h/1?color=red", "unknown option 'color'"),
    ("ipmisensor://u:hunter2@h/1?workaround-flags=a;rm", "bad value"),
    ("ipmisensor://u:hunter2@h/1?privilege-level=root", "bad value"),
    ("ipmisensor://u:hunter2@h/1?cipher-suite-id=3&cipher-suite-id=3", "twice"),
    ("ipmisensor://u:hunter2%0A@h/1", "control character"),
    ("ipmisensor://u:hunter2hunter2hunter2x@h/1", "longer than IPMI's 20 bytes"),
    ("ipmisensor://seventeen-chars-xx:hunter2@h/1", "longer than IPMI's 16 bytes"),
])
def test_bad_urls_are_rejected_without_showing_the_password(url, complaint):
    with pytest.raises(ValueError, match=complaint) as info:
        ipmi.target_key(metric(url))
    assert "hunter2" not in str(info.value)


def test_options_are_part_of_the_key():
    plain = target_key(metric("ipmisensor://u:p@h/1"))
    tuned = target_key(metric("ipmisensor://u:p@h/1?privilege-level=USER&cipher-suite-id=17"))
    assert plain != tuned
    assert tuned[1].options == (("cipher-suite-id", "17"), ("privilege-level", "USER"))


# --- output parsing --------------------------------------------------------------------------

def test_parse_row():
    assert ipmi.parse_row("2,CPU Temp,Temperature,45.00,C,0000h").value() == 45.0
    assert ipmi.parse_row("12,Temp, inlet,Temperature,-3.50,C,0000h") == ipmi.Row(
        12, "Temp, inlet", "-3.50", "C", "0000h")
    discrete = ipmi.parse_row("7,PSU1 Status,Power Supply,N/A,N/A,0003h")
    assert discrete.value() == 3
    assert ipmi.parse_row("8,Exhaust Temp,Temperature,N/A,C,N/A").value() is None
    assert ipmi.parse_row("9,Odd,Temperature,N/A,C,0001h").value() is None
    assert ipmi.parse_row("Sensor Record ID '99' not found") is None
    assert ipmi.parse_row("x,CPU Temp,Temperature,45.00,C,0000h") is None
    assert ipmi.parse_row("2,CPU Temp,45.00") is None


def test_config_quoting_escapes_what_freeipmi_would_interpret():
    assert ipmi._conf_quote('a b#c"d\\e') == '"a b\\#c\\"d\\\\e"'


# --- reading a real BMC ------------------------------------------------------------------------

async def test_values_by_id_and_by_name_in_metric_order(ipmi_sim: IpmiSim):
    descs = [metric(ipmi_sim.url("Pwr Consumption"), "power"),
             metric(ipmi_sim.url(RECORD_IDS["CPU Temp"]), "cpu"),
             metric(ipmi_sim.url("Fan1"), "fan"),
             metric(ipmi_sim.url(RECORD_IDS["Vcore"]), "vcore", labels={"rack": "r1"})]
    async with collector(descs[0]) as coll:
        for _ in range(2):  # the first poll lists all sensors, the next reads only these
            before = time.time_ns() // 1000
            readings = await coll.collect(descs)
            after = time.time_ns() // 1000
            assert [(r.metric_id, r.value) for r in readings] == [
                ("power", 252.0), ("cpu", 45.0), ("fan", 4800.0), ("vcore", 1.2)]
            assert {r.device_id for r in readings} == {"node-1"}
            assert readings[3].labels == {"rack": "r1"}
            assert len({r.timestamp_us for r in readings}) == 1
            assert before <= readings[0].timestamp_us <= after


async def test_scale_factor(ipmi_sim: IpmiSim):
    desc = metric(ipmi_sim.url("Pwr Consumption"), "kw", scale_factor=0.001)
    async with collector(desc) as coll:
        [reading] = await coll.collect([desc])
    assert reading.value == pytest.approx(0.252)


async def test_not_available_reading_is_skipped(ipmi_sim: IpmiSim):
    descs = [metric(ipmi_sim.url("Exhaust Temp"), "exhaust"),
             metric(ipmi_sim.url(RECORD_IDS["Exhaust Temp"]), "exhaust_by_id"),
             metric(ipmi_sim.url("CPU Temp"), "cpu")]
    async with collector(descs[0]) as coll:
        for _ in range(2):
            assert [r.metric_id for r in await coll.collect(descs)] == ["cpu"]


async def test_discrete_sensor_is_stored_as_its_event_bitmask(ipmi_sim: IpmiSim):
    desc = metric(ipmi_sim.url("PSU1 Status"), "psu")
    async with collector(desc) as coll:
        [reading] = await coll.collect([desc])
    assert reading.value == 1.0 and not math.isnan(reading.value)
    assert "value_str" not in reading.labels


async def test_sensor_value_changes_are_seen(ipmi_sim: IpmiSim):
    desc = metric(ipmi_sim.url("Fan1"), "fan")
    async with collector(desc) as coll:
        assert [r.value for r in await coll.collect([desc])] == [4800.0]
        ipmi_sim.set_raw(FAN_SENSOR_NUMBER, 32)
        try:
            assert [r.value for r in await coll.collect([desc])] == [3200.0]
        finally:
            ipmi_sim.set_raw(FAN_SENSOR_NUMBER, 48)
        assert [r.value for r in await coll.collect([desc])] == [4800.0]


async def test_duplicate_name_reads_first_and_warns_once(ipmi_sim: IpmiSim, caplog):
    query = "workaround-flags=opensesspriv&privilege-level=admin"  # a key of its own
    descs = [metric(ipmi_sim.url("Inlet Temp", query=query), "inlet"),
             metric(ipmi_sim.url(INLET_TEMP_2, query=query), "inlet2")]
    with caplog.at_level(logging.WARNING, logger=ipmi.__name__):
        async with collector(descs[0]) as coll:
            for _ in range(2):
                assert [(r.metric_id, r.value) for r in await coll.collect(descs)] == [
                    ("inlet", 22.0), ("inlet2", 30.0)]
            await coll.collect(descs)
    warnings = [r.getMessage() for r in caplog.records if "Inlet Temp" in r.getMessage()]
    assert len(warnings) == 1
    assert "record ids 5, 6" in warnings[0]


async def test_unknown_sensors_are_reported_once_and_others_still_read(ipmi_sim: IpmiSim,
                                                                        caplog):
    query = "workaround-flags=opensesspriv&cipher-suite-id=3"  # a key of its own
    descs = [metric(ipmi_sim.url("No Such Sensor", query=query), "ghost"),
             metric(ipmi_sim.url(4242, query=query), "ghost_id"),
             metric(ipmi_sim.url("CPU Temp", query=query), "cpu")]
    with caplog.at_level(logging.WARNING, logger=ipmi.__name__):
        async with collector(descs[0]) as coll:
            for _ in range(3):
                assert [r.metric_id for r in await coll.collect(descs)] == ["cpu"]
            only_unknown = await coll.collect(descs[:2])
    assert only_unknown == []
    messages = [r.getMessage() for r in caplog.records]
    assert sum("'No Such Sensor'" in m for m in messages) == 1
    assert sum("4242" in m for m in messages) == 1


async def test_password_with_config_syntax_characters(ipmi_sim: IpmiSim):
    desc = metric(ipmi_sim.url("CPU Temp", user=ODD[0], password=ODD[1]), "cpu")
    async with collector(desc) as coll:
        assert [r.value for r in await coll.collect([desc])] == [45.0]


async def test_wrong_password_is_an_error_naming_the_host(ipmi_sim: IpmiSim, caplog):
    desc = metric(ipmi_sim.url("CPU Temp", password="Wr0ngPassw0rd"), "cpu")
    with caplog.at_level(logging.DEBUG):
        async with collector(desc) as coll:
            for _ in range(2):
                with pytest.raises(ipmi.IpmiError, match="password invalid") as info:
                    await coll.collect([desc])
                assert f"127.0.0.1:{ipmi_sim.port}" in str(info.value)
                assert "Wr0ngPassw0rd" not in str(info.value)
    assert "Wr0ngPassw0rd" not in caplog.text


async def test_unknown_user_is_an_error(ipmi_sim: IpmiSim):
    desc = metric(ipmi_sim.url("CPU Temp", user="nobody"), "cpu")
    async with collector(desc) as coll:
        with pytest.raises(ipmi.IpmiError, match="username invalid"):
            await coll.collect([desc])


# --- faults, processes, secrets ----------------------------------------------------------------

async def test_dead_bmc_times_out_naming_the_host_and_leaves_no_process():
    password = "Dead-BMC-pw-77"
    desc = metric(dead_url(password), "cpu")
    host = desc.url.split("@")[1].split("/")[0]
    async with collector(desc, timeout=1.0) as coll:
        cache_dir = Path(coll.cache_file).parent.parent.parent
        with ProcWatcher() as watcher, pytest.raises(TimeoutError, match=re.escape(host)) as info:
            # wait_for only guards against a hang: its own TimeoutError names no host
            await asyncio.wait_for(coll.collect([desc]), 30)
    assert password not in str(info.value)
    assert children_named("ipmi-sensors") == []
    assert watcher.seen, "the watcher never saw ipmi-sensors running"
    for argv in watcher.argvs():
        # FreeIPMI gives up before the collector's 1 s deadline
        [session_timeout] = [a for a in argv if a.startswith("--session-timeout=")]
        assert int(session_timeout.split("=")[1]) < 1000
        # credentials come through stdin; the SDR cache is kept, rebuilt only when stale
        assert "--config-file=/dev/stdin" in argv
        assert f"--sdr-cache-directory={cache_dir}" in argv
        assert "--sdr-cache-recreate" in argv
        assert "--flush-cache" not in argv
    for cmdline, environ in watcher.seen.values():
        assert password.encode() not in cmdline
        assert password.encode() not in environ
    assert any(f"-h\0{host}\0".encode() in cmdline for cmdline, _ in watcher.seen.values())


async def test_cancelled_poll_kills_ipmi_sensors():
    desc = metric(dead_url(), "cpu")
    async with collector(desc, timeout=30.0) as coll:
        task = asyncio.create_task(coll.collect([desc]))
        for _ in range(500):
            if children_named("ipmi-sensors"):
                break
            await asyncio.sleep(0.01)
        assert children_named("ipmi-sensors")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(100):  # the batch task reaps the killed process right after
            if not children_named("ipmi-sensors"):
                break
            await asyncio.sleep(0.01)
        assert children_named("ipmi-sensors") == []


async def test_hard_timeout_kills_the_whole_process_group(tmp_path, monkeypatch):
    """An ipmi-sensors that ignores its own timeouts (and has a child) is killed at the deadline.

    A real ipmi-sensors gives up by itself before the deadline, so a stand-in script plays a
    hung one: it ignores SIGTERM and starts a grandchild in its process group.
    """
    pidfile = tmp_path / "pids"
    script = tmp_path / "ipmi-sensors"
    script.write_text(f"#!/bin/sh\ntrap '' TERM\nsleep 60 &\necho $$ $! > {pidfile}\nwait\n")
    script.chmod(0o700)
    monkeypatch.setattr(ipmi.pool, "_executable", str(script))
    desc = metric(dead_url(), "cpu")
    async with collector(desc, timeout=1.0) as coll:
        with pytest.raises(TimeoutError, match="no complete answer within 1 s"):
            await coll.collect([desc])
    pids = [int(p) for p in pidfile.read_text().split()]
    assert len(pids) == 2
    for _ in range(100):  # SIGKILL is delivered, the grandchild may need a moment to die
        if not any(_alive(pid) for pid in pids):
            break
        await asyncio.sleep(0.01)
    assert [pid for pid in pids if _alive(pid)] == []


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


async def test_batched_bmcs_share_a_process_and_a_hung_one_delays_no_other(
        ipmi_sim: IpmiSim, tmp_path):
    """Polls of BMCs with the same credentials share one ipmi-sensors; answers come as they are
    in.  The hung BMC times out, its SDR cache is dropped and rebuilt once it answers again."""
    other = IpmiSim(tmp_path / "other")
    other.start()
    try:
        live = metric(ipmi_sim.url("CPU Temp"), "cpu")
        hung = metric(other.url("CPU Temp"), "cpu")  # same sensors: same ipmi-sensors -r
        async with collector(live, timeout=2.0) as c_live, \
                collector(hung, timeout=2.0) as c_hung:
            assert [r.value for r in await c_live.collect([live])] == [45.0]
            assert [r.value for r in await c_hung.collect([hung])] == [45.0]
            hung_cache = Path(c_hung.cache_file)
            assert hung_cache.exists()
            other.pause()
            try:
                with ProcWatcher() as watcher:
                    t_live = asyncio.create_task(c_live.collect([live]))
                    t_hung = asyncio.create_task(c_hung.collect([hung]))
                    done, _ = await asyncio.wait([t_live, t_hung],
                                                 return_when=asyncio.FIRST_COMPLETED)
                    assert done == {t_live}
                    assert [r.value for r in t_live.result()] == [45.0]
                    with pytest.raises(TimeoutError, match=f"127.0.0.1:{other.port}"):
                        await t_hung
            finally:
                other.resume()
            assert not hung_cache.exists()
            hosts = {f"127.0.0.1:{ipmi_sim.port}", f"127.0.0.1:{other.port}"}
            assert [set(argv[argv.index("-h") + 1].split(",")) for argv in watcher.argvs()] == [
                hosts]
            assert [r.value for r in await c_hung.collect([hung])] == [45.0]
            assert hung_cache.exists()
    finally:
        other.stop()
    assert children_named("ipmi-sensors") == []


async def test_sdr_cache_is_kept_between_polls_and_removed_on_close(ipmi_sim: IpmiSim):
    desc = metric(ipmi_sim.url("CPU Temp"), "cpu")
    async with collector(desc) as coll:
        await coll.collect([desc])
        cache = Path(coll.cache_file)
        first = (cache.stat().st_ino, cache.read_bytes())
        for _ in range(3):
            await coll.collect([desc])
        assert (cache.stat().st_ino, cache.read_bytes()) == first
        cache_dir = cache.parent.parent.parent
        assert (cache_dir.stat().st_mode & 0o777) == 0o700
        for path in cache_dir.rglob("*"):
            assert not path.is_file() or ADMIN[1].encode() not in path.read_bytes()
    assert not cache_dir.exists()


async def test_invalid_sdr_cache_is_rebuilt(ipmi_sim: IpmiSim):
    desc = metric(ipmi_sim.url("Fan1"), "fan")
    async with collector(desc) as coll:
        await coll.collect([desc])
        cache = Path(coll.cache_file)
        good = cache.read_bytes()
        cache.write_bytes(b"not an SDR cache")
        assert [r.value for r in await coll.collect([desc])] == [4800.0]
        assert cache.read_bytes() == good


async def test_closed_collector_refuses_to_poll(ipmi_sim: IpmiSim):
    desc = metric(ipmi_sim.url("Fan1"), "fan")
    async with collector(desc) as coll:
        pass
    with pytest.raises(ipmi.IpmiError, match="closed"):
        await coll.collect([desc])


def test_no_process_or_pool_left_after_the_module():
    assert children_named("ipmi-sensors") == []
    assert ipmi._pools == {}
