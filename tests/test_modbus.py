"""Modbus collector against a real pymodbus server (tests/fixtures/modbus.py) on loopback."""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from kwollect.logutil import RateLimitedLog
from kwollect.model import MetricDescription, now_us
from kwollect.protocols import modbus
from tests.fixtures.modbus import (
    COILS_1,
    DISCRETE_1,
    EXCEPTION_UNIT,
    HOLDING_1,
    HOLDING_1_AFTER_HOLE,
    INPUT_1,
    SILENT_UNIT,
    UNREACHABLE_UNIT,
    ModbusServer,
    start_modbus_server,
)

READ_COILS, READ_DISCRETE, READ_HOLDING, READ_INPUT = 1, 2, 3, 4
SHORT_TIMEOUT = 0.3
"""For peers that never answer."""
MIXED_TIMEOUT = 0.6
"""For tests where live units must answer in time too, even on a loaded machine."""

OpenCollector = Callable[..., modbus.ModbusCollector]


def metric(name: str, url: str, **fields: object) -> MetricDescription:
    return MetricDescription(name=name, device_id="meter-1", url=url, **fields)  # type: ignore[arg-type]


def values(readings: list) -> dict[str, float]:
    return {r.metric_id: r.value for r in readings}


def blocks(requests: list) -> list[tuple[int, int, int, int]]:
    return [(r.unit, r.function, r.address, r.count) for r in requests]


@pytest.fixture(autouse=True)
def fresh_fault_log(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test sees its own first warnings, not ones rate-limited by an earlier test."""
    monkeypatch.setattr(modbus, "_faults", RateLimitedLog(modbus.logger))


@pytest.fixture
async def open_collector() -> AsyncIterator[OpenCollector]:
    opened: list[modbus.ModbusCollector] = []

    def open_(key: tuple[str, int], timeout: float = 2.0) -> modbus.ModbusCollector:
        collector = modbus.open_collector(key, timeout)
        opened.append(collector)
        return collector

    yield open_
    for collector in opened:
        await collector.close()
    assert not modbus._gateways, "a collector of the test kept its gateway open"


def typed_metrics(server: ModbusServer) -> list[MetricDescription]:
    found = [metric(f"holding_{a}_{t}_{o}", server.url(1, a, type=t, order=o))
             for a, t, o, _regs, _v in HOLDING_1]
    found += [metric(f"input_{a}_{t}_{o}", server.url(1, a, kind="input", type=t, order=o))
              for a, t, o, _regs, _v in INPUT_1]
    found += [metric(f"coil_{a}", server.url(1, a, kind="coil")) for a in (0, 1, 2, 3, 15)]
    found += [metric(f"discrete_{a}", server.url(1, a, kind="discrete"))
              for a in range(DISCRETE_1)]
    return found


def typed_expected() -> dict[str, float]:
    expected = {f"holding_{a}_{t}_{o}": float(v) for a, t, o, _regs, v in HOLDING_1}
    expected |= {f"input_{a}_{t}_{o}": float(v) for a, t, o, _regs, v in INPUT_1}
    expected |= {f"coil_{a}": float(a % 3 == 0) for a in (0, 1, 2, 3, 15)}
    expected |= {f"discrete_{a}": float(a % 2) for a in range(DISCRETE_1)}
    return expected


def test_fixture_registers_match_struct_encoding() -> None:
    """The hand-written registers of the fixture are what they claim to be."""
    codes = {"int16": "h", "uint16": "H", "int32": "i", "uint32": "I", "float32": "f",
             "int64": "q", "uint64": "Q", "float64": "d"}
    for _a, typ, order, regs, value in HOLDING_1 + INPUT_1:
        wire = struct.pack(f">{codes[typ]}", value)
        words = [wire[i:i + 2] for i in range(0, len(wire), 2)]
        if order in ("BADC", "DCBA"):
            words = [w[::-1] for w in words]
        if order in ("CDAB", "DCBA"):
            words.reverse()
        assert [int.from_bytes(w, "big") for w in words] == regs, (typ, order)


async def test_every_type_and_order_decodes(modbus_server: ModbusServer,
                                            open_collector: OpenCollector) -> None:
    collector = open_collector(modbus_server.key)
    before = now_us()
    readings = await collector.collect(typed_metrics(modbus_server))
    after = now_us()
    assert values(readings) == typed_expected()
    assert all(r.device_id == "meter-1" and before <= r.timestamp_us <= after for r in readings)


async def test_registers_of_a_unit_are_read_in_few_requests(
        modbus_server: ModbusServer, open_collector: OpenCollector) -> None:
    collector = open_collector(modbus_server.key)
    mark = modbus_server.mark()
    readings = await collector.collect(typed_metrics(modbus_server))
    assert len(readings) == len(typed_expected())
    assert sorted(blocks(modbus_server.requests(mark))) == [
        (1, READ_COILS, 0, 16), (1, READ_DISCRETE, 0, 16),
        (1, READ_HOLDING, 0, 39), (1, READ_INPUT, 0, 6)]
    stamps = {f: {r.timestamp_us for r in readings if r.metric_id.startswith(f)}
              for f in ("holding", "input", "coil", "discrete")}
    assert all(len(s) == 1 for s in stamps.values()), "one request, one timestamp"
    assert len({s.pop() for s in stamps.values()}) == 4, "each request has its own midpoint"


async def test_scale_applies_before_scale_factor(modbus_server: ModbusServer,
                                                 open_collector: OpenCollector) -> None:
    collector = open_collector(modbus_server.key)
    readings = await collector.collect([
        metric("amps", modbus_server.url(1, 0, type="int16", scale="0.01")),
        metric("watts", modbus_server.url(1, 0, type="int16", scale="0.01"), scale_factor=10.0),
        metric("state", modbus_server.url(1, 0, kind="coil", scale="5")),
    ])
    got = values(readings)
    assert got["amps"] == pytest.approx(-12.34)
    assert got["watts"] == pytest.approx(-123.4)
    assert got["state"] == 5.0


async def test_gap_limit_decides_whether_reads_are_joined(
        modbus_server: ModbusServer, open_collector: OpenCollector) -> None:
    collector = open_collector(modbus_server.key)
    apart = [metric("a", modbus_server.url(1, 100)), metric("b", modbus_server.url(1, 120))]
    mark = modbus_server.mark()
    assert values(await collector.collect(apart)) == {"a": 20100, "b": 20120}
    assert blocks(modbus_server.requests(mark)) == [(1, READ_HOLDING, 100, 1),
                                                    (1, READ_HOLDING, 120, 1)]
    joined = [metric("a", modbus_server.url(1, 100, max_gap=19)),
              metric("b", modbus_server.url(1, 120, max_gap=19))]
    mark = modbus_server.mark()
    assert values(await collector.collect(joined)) == {"a": 20100, "b": 20120}
    assert blocks(modbus_server.requests(mark)) == [(1, READ_HOLDING, 100, 21)]


async def test_reads_are_split_at_the_span_limit(modbus_server: ModbusServer,
                                                 open_collector: OpenCollector) -> None:
    collector = open_collector(modbus_server.key)
    addresses = (100, 150, 224, 225, 300, 399)
    metrics = [metric(f"r{a}", modbus_server.url(1, a, max_gap=125)) for a in addresses]
    mark = modbus_server.mark()
    readings = await collector.collect(metrics)
    assert values(readings) == {f"r{a}": 20000 + a for a in addresses}
    assert blocks(modbus_server.requests(mark)) == [
        (1, READ_HOLDING, 100, 125), (1, READ_HOLDING, 225, 76), (1, READ_HOLDING, 399, 1)]

    # A value is never cut in two, and the smallest max_span of a block wins.
    metrics = [metric("u", modbus_server.url(1, 100, max_gap=125)),
               metric("f", modbus_server.url(1, 123, type="uint32", max_gap=125)),
               metric("v", modbus_server.url(1, 130, max_span=10, max_gap=125))]
    mark = modbus_server.mark()
    got = values(await collector.collect(metrics))
    assert got == {"u": 20100, "f": (20123 << 16) + 20124, "v": 20130}
    assert blocks(modbus_server.requests(mark)) == [(1, READ_HOLDING, 100, 25),
                                                    (1, READ_HOLDING, 130, 1)]


async def test_coil_reads_are_split_at_2000_bits(modbus_server: ModbusServer,
                                                 open_collector: OpenCollector) -> None:
    collector = open_collector(modbus_server.key)
    addresses = (0, 1999, 2000, 2001, COILS_1 - 1)
    metrics = [metric(f"c{a}", modbus_server.url(1, a, kind="coil", max_gap=2000))
               for a in addresses]
    mark = modbus_server.mark()
    assert values(await collector.collect(metrics)) == {f"c{a}": float(a % 3 == 0)
                                                        for a in addresses}
    assert blocks(modbus_server.requests(mark)) == [(1, READ_COILS, 0, 2000),
                                                    (1, READ_COILS, 2000, 100)]


async def test_refused_joined_read_is_split_for_good(modbus_server: ModbusServer,
                                                     open_collector: OpenCollector,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    """Registers 39..49 do not exist: the joined read 37..50 fails, its parts do not."""
    collector = open_collector(modbus_server.key)
    hole_after, hole_value = HOLDING_1_AFTER_HOLE
    metrics = [metric("before", modbus_server.url(1, 37, type="uint32", order="BADC")),
               metric("same", modbus_server.url(1, 38)),
               metric("after", modbus_server.url(1, hole_after))]
    expected = {"before": 3000000000, "same": 0x005E, "after": hole_value}
    mark = modbus_server.mark()
    with caplog.at_level(logging.INFO, logger=modbus.__name__):
        assert values(await collector.collect(metrics)) == expected
    assert blocks(modbus_server.requests(mark)) == [
        (1, READ_HOLDING, 37, 14), (1, READ_HOLDING, 37, 2), (1, READ_HOLDING, hole_after, 1)]
    assert "split into 2 reads" in caplog.text
    mark = modbus_server.mark()
    assert values(await collector.collect(metrics)) == expected
    assert blocks(modbus_server.requests(mark)) == [(1, READ_HOLDING, 37, 2),
                                                    (1, READ_HOLDING, hole_after, 1)]


async def test_exception_from_one_unit_spares_the_others(
        modbus_server: ModbusServer, open_collector: OpenCollector,
        caplog: pytest.LogCaptureFixture) -> None:
    collector = open_collector(modbus_server.key)
    metrics = [metric("good2", modbus_server.url(2, 0, type="int16")),
               metric("bad", modbus_server.url(EXCEPTION_UNIT, 1, type="float32")),
               metric("bad_coil", modbus_server.url(EXCEPTION_UNIT, 0, kind="coil")),
               metric("good5", modbus_server.url(5, 1, type="float32"))]
    with caplog.at_level(logging.WARNING, logger=modbus.__name__):
        readings = await collector.collect(metrics)
        assert values(readings) == {"good2": -2, "good5": -1.25}
        assert f"unit {EXCEPTION_UNIT}: holding read 1+2 answered exception 4" in caplog.text
        assert f"unit {EXCEPTION_UNIT}: coil read 0+1 answered exception 4" in caplog.text
        caplog.clear()
        assert values(await collector.collect(metrics)) == {"good2": -2, "good5": -1.25}
        assert "exception" not in caplog.text, "repeating faults are rate-limited"


async def test_unit_the_gateway_cannot_reach_is_not_asked_again_this_round(
        modbus_server: ModbusServer, open_collector: OpenCollector,
        caplog: pytest.LogCaptureFixture) -> None:
    collector = open_collector(modbus_server.key)
    metrics = [metric("gone", modbus_server.url(UNREACHABLE_UNIT, 0)),
               metric("gone_too", modbus_server.url(UNREACHABLE_UNIT, 0, kind="input")),
               metric("good", modbus_server.url(2, 0, kind="input"))]
    mark = modbus_server.mark()
    with caplog.at_level(logging.WARNING, logger=modbus.__name__):
        assert values(await collector.collect(metrics)) == {"good": 7}
    assert "exception 11 (gateway target failed to respond)" in caplog.text
    assert blocks(modbus_server.requests(mark)) == [(2, READ_INPUT, 0, 1),
                                                    (UNREACHABLE_UNIT, READ_HOLDING, 0, 1)]


async def test_silent_unit_spares_the_others_and_goes_last(
        modbus_server: ModbusServer, open_collector: OpenCollector,
        caplog: pytest.LogCaptureFixture) -> None:
    collector = open_collector(modbus_server.key, timeout=MIXED_TIMEOUT)
    metrics = [metric("good2", modbus_server.url(2, 3)),
               metric("silent", modbus_server.url(SILENT_UNIT, 3)),
               metric("silent_too", modbus_server.url(SILENT_UNIT, 0, kind="input")),
               metric("good5", modbus_server.url(5, 0, kind="input"))]
    mark = modbus_server.mark()
    with caplog.at_level(logging.WARNING, logger=modbus.__name__):
        assert values(await collector.collect(metrics)) == {"good2": 2, "good5": 7}
    assert f"unit {SILENT_UNIT}: no answer" in caplog.text
    # The silent unit's second read was skipped; next round it is read after the others.
    assert [r.unit for r in modbus_server.requests(mark)] == [2, SILENT_UNIT, 5]
    mark = modbus_server.mark()
    assert values(await collector.collect(metrics)) == {"good2": 2, "good5": 7}
    assert [r.unit for r in modbus_server.requests(mark)] == [2, 5, SILENT_UNIT]


async def test_collectors_of_a_gateway_share_one_connection_one_request_at_a_time(
        modbus_server: ModbusServer, open_collector: OpenCollector) -> None:
    fast = open_collector(modbus_server.key)
    slow = open_collector(modbus_server.key)
    fast_metrics = [metric("h", modbus_server.url(1, 7, type="float32")),
                    metric("c", modbus_server.url(1, 0, kind="coil"))]
    slow_metrics = [metric(f"r{a}", modbus_server.url(2, a)) for a in range(4)] + [
        metric("i", modbus_server.url(5, 0, kind="input"))]
    mark = modbus_server.mark()
    rounds = await asyncio.gather(*(c.collect(m) for _ in range(10)
                                    for c, m in ((fast, fast_metrics), (slow, slow_metrics))))
    assert all(values(r) == {"h": 230.5, "c": 1.0} for r in rounds[0::2])
    assert all(values(r) == {"r0": 0xFFFE, "r1": 0xBFA0, "r2": 0, "r3": 2, "i": 7}
               for r in rounds[1::2])
    requests = modbus_server.requests(mark)
    assert len(requests) == 10 * 4
    assert max(r.in_flight for r in requests) == 1
    assert modbus_server.connections(mark) == 1


async def test_unreachable_gateway_raises(open_collector: OpenCollector) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nothing listens here once the socket is closed
    collector = open_collector(("127.0.0.1", port), timeout=SHORT_TIMEOUT)
    url = f"modbus://127.0.0.1:{port}/1/0"
    with pytest.raises(ConnectionError, match=f"127.0.0.1:{port}: cannot connect"):
        await asyncio.wait_for(collector.collect([metric("m", url)]), 30)


async def _silent_peer(reply: Callable[[bytes], bytes | None]) -> asyncio.Server:
    """A TCP peer that reads Modbus requests and answers what `reply` returns (None: nothing)."""
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                header = await reader.readexactly(7)
                body = await reader.readexactly(int.from_bytes(header[4:6], "big") - 1)
                answer = reply(header + body)
                if answer is not None:
                    writer.write(answer)
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0)


async def test_gateway_that_never_answers_raises_after_two_units(
        open_collector: OpenCollector) -> None:
    seen: list[int] = []
    server = await _silent_peer(lambda frame: seen.append(frame[6]))
    port = server.sockets[0].getsockname()[1]
    try:
        collector = open_collector(("127.0.0.1", port), timeout=SHORT_TIMEOUT)
        metrics = [metric(f"u{unit}", f"modbus://127.0.0.1:{port}/{unit}/0")
                   for unit in (1, 2, 3)]
        with pytest.raises(TimeoutError, match="units 1 and 2 gave no answer"):
            await asyncio.wait_for(collector.collect(metrics), 30)
        assert seen == [1, 2], "unit 3 is not waited for once the gateway looks dead"
        with pytest.raises(TimeoutError, match="unit 1 gave no answer"):
            await asyncio.wait_for(collector.collect(metrics[:1]), 30)
    finally:
        server.close()


async def test_short_reply_is_dropped_not_misread(open_collector: OpenCollector,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    def one_register(frame: bytes) -> bytes:
        # Always answers one register (value 7), whatever count was asked for.
        return frame[:4] + (5).to_bytes(2, "big") + frame[6:8] + bytes([2, 0, 7])

    server = await _silent_peer(one_register)
    port = server.sockets[0].getsockname()[1]
    try:
        collector = open_collector(("127.0.0.1", port), timeout=SHORT_TIMEOUT)
        metrics = [metric("a", f"modbus://127.0.0.1:{port}/1/0"),
                   metric("b", f"modbus://127.0.0.1:{port}/1/1"),
                   metric("c", f"modbus://127.0.0.1:{port}/2/5")]
        with caplog.at_level(logging.WARNING, logger=modbus.__name__):
            assert values(await collector.collect(metrics)) == {"c": 7}
        assert "holding read 0+2 returned only 1 values" in caplog.text
    finally:
        server.close()


async def test_undecodable_reply_costs_only_its_unit(open_collector: OpenCollector) -> None:
    """Unit 1 answers an unknown function code: pymodbus drops the connection; unit 2 is
    still read (over a new connection), and first in the next round."""
    seen: list[int] = []

    def reply(frame: bytes) -> bytes:
        seen.append(frame[6])
        if frame[6] == 1:
            return frame[:4] + (4).to_bytes(2, "big") + bytes([1, 0x63, 1, 2])
        return frame[:4] + (5).to_bytes(2, "big") + frame[6:8] + bytes([2, 0, 9])

    server = await _silent_peer(reply)
    port = server.sockets[0].getsockname()[1]
    try:
        collector = open_collector(("127.0.0.1", port), timeout=MIXED_TIMEOUT)
        metrics = [metric("garbled", f"modbus://127.0.0.1:{port}/1/0"),
                   metric("fine", f"modbus://127.0.0.1:{port}/2/0")]
        assert values(await collector.collect(metrics)) == {"fine": 9}
        assert values(await collector.collect(metrics)) == {"fine": 9}
        assert seen == [1, 2, 2, 1]
    finally:
        server.close()


async def test_reconnects_after_gateway_restart(tmp_path: Path,
                                                open_collector: OpenCollector) -> None:
    server = start_modbus_server(tmp_path / "first")
    try:
        collector = open_collector(server.key, timeout=MIXED_TIMEOUT)
        metrics = [metric("m", server.url(2, 0, type="int16"))]
        assert values(await collector.collect(metrics)) == {"m": -2}
        server.stop()
        with pytest.raises(OSError, match=f"127.0.0.1:{server.port}"):
            await asyncio.wait_for(collector.collect(metrics), 30)
        server = start_modbus_server(tmp_path / "second", port=server.port)
        assert values(await collector.collect(metrics)) == {"m": -2}
    finally:
        server.stop()


def test_target_key_is_the_gateway() -> None:
    keys = {modbus.target_key(metric("m", url)) for url in (
        "modbus://10.0.0.1/1/0", "modbus://10.0.0.1:502/2/7?kind=input&type=float32",
        "MODBUS://10.0.0.1/3/0x10?kind=coil")}
    assert keys == {("10.0.0.1", 502)}
    assert modbus.target_key(metric("m", "modbus://Meter.Example:1502/1/0")) == (
        "meter.example", 1502)


@pytest.mark.parametrize(("url", "named"), [
    ("modbus://h:0/1/0", "port"),
    ("modbus://h:70000/1/0", "port"),
    ("modbus:///1/0", "host"),
    ("modbus://h/1", "path"),
    ("modbus://h/1/0/9", "path"),
    ("modbus://h/x/0", "unit"),
    ("modbus://h/256/0", "unit"),
    ("modbus://h/1/65536", "address"),
    ("modbus://h/1/-1", "address"),
    ("modbus://h/1/65535?type=float32", "address"),
    ("modbus://h/1/0?kind=register", "kind"),
    ("modbus://h/1/0?type=float16", "type"),
    ("modbus://h/1/0?kind=coil&type=int16", "type"),
    ("modbus://h/1/0?order=ABDC", "order"),
    ("modbus://h/1/0?kind=discrete&order=ABCD", "order"),
    ("modbus://h/1/0?scale=abc", "scale"),
    ("modbus://h/1/0?scale=inf", "scale"),
    ("modbus://h/1/0?max_span=126", "max_span"),
    ("modbus://h/1/0?kind=coil&max_span=2001", "max_span"),
    ("modbus://h/1/0?type=float64&max_span=3", "max_span"),
    ("modbus://h/1/0?max_gap=-1", "max_gap"),
    ("modbus://h/1/0?wordorder=little", "wordorder"),
    ("modbus://h/1/0?type=int16&type=int32", "type"),
    ("modbus://user:secret@h/1/0", "credentials"),
])
def test_bad_url_names_the_parameter(url: str, named: str) -> None:
    with pytest.raises(ValueError, match=named) as error:
        modbus.target_key(metric("m", url))
    assert "secret" not in str(error.value)

