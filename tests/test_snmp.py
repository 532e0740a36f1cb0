"""SNMP protocol module against a real snmpd (v1, v2c, v3) and scripted agents for faults."""

from __future__ import annotations

import asyncio
import logging
import math
import random
import struct
import time

import pytest
from puresnmp.pdu import GetResponse, PDUContent
from puresnmp.varbind import VarBind
from x690.types import Integer, ObjectIdentifier, OctetString, Sequence

from kwollect.model import MetricDescription, make_reading
from kwollect.protocols import snmp
from kwollect.protocols.snmp import SnmpError, SnmpTimeout, SnmpUnreachable
from kwollect.protocols.snmp import codec as snmp_codec
from tests.fixtures.snmp import (
    COUNTER64_OID,
    COUNTER64_VALUE,
    IPADDRESS_OID,
    LONG_STRING,
    LONG_STRING_OID,
    MIN_INT_OID,
    OUTLETS,
    PDU_TABLE,
    ROWS_TABLE,
    V3_USERS,
    free_udp_port,
    response,
)

# puresnmp-crypto's AES/DES use cryptography APIs that warn they are moving (they still work)
pytestmark = pytest.mark.filterwarnings(
    "ignore::cryptography.utils.CryptographyDeprecationWarning")

LOGGER = "kwollect.protocols.snmp"
IF_DESCR = "1.3.6.1.2.1.2.2.1.2"
IF_INDEX = "1.3.6.1.2.1.2.2.1.1"
IF_IN_OCTETS = "1.3.6.1.2.1.2.2.1.10"


def metric(name: str, url: str, **kwargs) -> MetricDescription:
    return MetricDescription(name=name, device_id="pdu-1", url=url, **kwargs)


async def collect(metrics: list[MetricDescription], timeout: float = 2.0, polls: int = 1):
    """Readings of the last of `polls` polls by one collector, by metric name."""
    collector = snmp.open_collector(snmp.target_key(metrics[0]), timeout)
    try:
        for _ in range(polls):
            readings = await asyncio.wait_for(collector.collect(metrics), 30)
    finally:
        await collector.close()
    return {reading.metric_id: reading for reading in readings}


def warnings_about(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and text in r.getMessage()]


# --- URLs and target keys -------------------------------------------------------------------

def test_target_key_groups_by_version_host_port_and_credentials():
    def key(url: str) -> snmp.SnmpTarget:
        return snmp.target_key(metric("m", url))

    same = key("snmp://public@pdu-1/1.3.6.1.2.1.1.5.0")
    assert key("snmp://public@pdu-1:161/.1.3.6.1.2.1.1.3.0") == same
    assert same.port == 161 and same.version == 2 and same.max_varbinds == 50
    others = ["snmp://private@pdu-1/1.3.6.1", "snmp://public@pdu-2/1.3.6.1",
              "snmp://public@pdu-1:1161/1.3.6.1", "snmpv1://public@pdu-1/1.3.6.1",
              "snmpv3://public@pdu-1/1.3.6.1", "snmp://public@pdu-1/1.3.6.1?max_varbinds=10"]
    assert len({key(url) for url in others} | {same}) == len(others) + 1
    assert key("snmp://public@[::1]:1161/1.3.6.1").host == "::1"


def test_v3_url_forms():
    def key(url: str) -> snmp.SnmpTarget:
        return snmp.target_key(metric("m", url))

    full = key("snmpv3://ops:authkey123:privkey123@pdu-1:1161/1.3.6.1?auth=md5&priv=des")
    assert (full.user, full.auth, full.priv, full.port) == ("ops", "MD5", "DES", 1161)
    defaults = key("snmpv3://ops:authkey123:privkey123@pdu-1/1.3.6.1")
    assert (defaults.auth, defaults.priv) == ("SHA", "AES")
    assert (key("snmpv3://ops:authkey123@pdu-1/1.3.6.1").priv, key(
        "snmpv3://ops@pdu-1/1.3.6.1").auth) == ("", "")
    assert key("snmpv3://ops:a%3Ab%40cdefgh@pdu-1/1.3.6.1").auth_key == "a:b@cdefgh"
    for text in (repr(full), str(full)):
        assert "authkey123" not in text and "privkey123" not in text


@pytest.mark.parametrize(("url", "message"), [
    ("snmp://pdu-1/1.3.6.1", "no credentials"),
    ("snmp://public:secret@pdu-1/1.3.6.1", "no password part"),
    ("snmp://public@pdu-1/1.3.six.1", "decimal"),
    ("snmp://public@pdu-1/5.3.6.1", "out of range"),
    ("snmp://public@pdu-1/", "invalid OID"),
    ("snmp://public@pdu-1:99999/1.3.6.1", "port"),
    ("snmp://public@pdu-1/1.3.6.1?max_varbind=5", "unknown option"),
    ("snmp://public@pdu-1/1.3.6.1?max_varbinds=0", "max_varbinds"),
    ("snmp://public@pdu-1/1.3.6.1?resolve_every=soon", "resolve_every"),
    ("snmp://public@pdu-1/1.3.6.1?auth=SHA", "unknown option"),
    ("ftp://public@pdu-1/1.3.6.1", "scheme"),
    ("snmp://public@pdu-1/1.3.6.{{ 1.3.6.1 eth0 }}", "template"),
    ("snmp://public@pdu-1/1.3.6.{{ 1.3.6.1 == eth0 }}.x", "after the template"),
    ("snmpv3://ops:short:privkey123@pdu-1/1.3.6.1", "at least 8"),
    ("snmpv3://ops:authkey123:privkey123@pdu-1/1.3.6.1?auth=SHA512", "auth must be"),
    ("snmpv3://ops:authkey123:privkey123@pdu-1/1.3.6.1?priv=3DES", "priv must be"),
    ("snmpv3://ops@pdu-1/1.3.6.1?auth=SHA", "without its key"),
    ("snmpv3://ops:authkey123:privkey123:more@pdu-1/1.3.6.1", "credentials read"),
])
def test_bad_urls_are_rejected_with_reason_and_no_secret(url: str, message: str):
    with pytest.raises(ValueError, match=message) as raised:
        snmp.target_key(metric("m", url))
    for secret in ("secret", "privkey123", "authkey123"):
        assert secret not in str(raised.value)
    assert ":public@" not in str(raised.value) and "//public@" not in str(raised.value)


def test_template_urls_parse_literally():
    _, spec = snmp.parse_url("snmp://public@pdu-1/.1.3.6.1.4.1.9.{{ .1.3.6.1.2 == a/b? c }}.3")
    assert spec == snmp.OidSpec((1, 3, 6, 1, 4, 1, 9), (1, 3, 6, 1, 2), "a/b? c", (3,))


def test_safe_url_hides_communities_and_keys():
    assert snmp.safe_url("snmp://public@pdu-1:161/1.3") == "snmp://***@pdu-1:161/1.3"
    assert snmp.safe_url("snmpv3://ops:k1k1k1k1:k2k2k2k2@pdu-1/1.3") == "snmpv3://ops:***@pdu-1/1.3"


# --- the codec, checked against puresnmp's x690 encoder -------------------------------------

@pytest.mark.parametrize("value", [0, 1, 127, 128, 255, 256, -1, -128, -129, 2**31 - 1, -2**31,
                                   2**63, -2**63 - 1])
def test_integer_encoding_matches_x690(value: int):
    assert snmp_codec.encode_integer(value) == bytes(Integer(value))


@pytest.mark.parametrize("oid", ["1.3.6.1.2.1.1.5.0", "1.3.6.1.4.1.534.6.6.7.6.5.1.3.0.24",
                                 "1.3.6.1.4.1.99999.4294967295.16383.16384", "0.39"])
def test_oid_encoding_matches_x690_and_round_trips(oid: str):
    encoded = snmp_codec.encode_oid(snmp_codec.parse_oid(oid))
    assert encoded == bytes(ObjectIdentifier(oid))
    assert snmp_codec.oid_text(snmp_codec.decode_oid(encoded[2:])) == oid


def test_oid_with_large_first_subidentifier():
    # the X.690 example: 2.999.3 has a first subidentifier (2 * 40 + 999) above 127
    assert snmp_codec.encode_oid((2, 999, 3)) == b"\x06\x03\x88\x37\x03"
    assert snmp_codec.decode_oid(b"\x88\x37\x03") == (2, 999, 3)


@pytest.mark.parametrize(("size", "header"), [
    (127, b"\x04\x7f"), (128, b"\x04\x81\x80"), (255, b"\x04\x81\xff"),
    (256, b"\x04\x82\x01\x00"), (70000, b"\x04\x83\x01\x11\x70")])
def test_lengths_use_the_short_form_below_128_and_the_long_form_above(size: int, header: bytes):
    assert snmp_codec.encode_tlv(0x04, b"x" * size) == header + b"x" * size


def test_non_minimal_long_lengths_decode():
    # x690 writes 127 as 0x81 0x7f; BER allows it and the decoder must accept it
    message = bytes(Sequence([Integer(1), OctetString(b"public"), GetResponse(PDUContent(
        2**24, [VarBind(ObjectIdentifier("1.3.6.1.2.1.1.5.0"), OctetString(b"y" * 127))]))]))
    header = snmp_codec.parse_response_header(message, snmp_codec.message_prefix(1, b"public"))
    oid = snmp_codec.encode_oid(snmp_codec.parse_oid("1.3.6.1.2.1.1.5.0"))
    assert header.request_id == 2**24
    assert snmp_codec.decode_get_values(message, header, [oid]) == [b"y" * 127]


def test_opaque_floats_decode():
    assert snmp_codec.decode_value(0x44, b"\x9f\x78\x04\x3f\xc0\x00\x00") == 1.5
    assert snmp_codec.decode_value(0x44, b"\x9f\x79\x08\x40\x09\x21\xfb\x54\x44\x2d\x18") \
        == pytest.approx(math.pi)
    refused = snmp_codec.decode_value(0x44, b"\x01\x02")  # once "0102", then stored as 102.0
    assert isinstance(refused, snmp_codec.Refused) and "not a float" in refused.reason


@pytest.mark.parametrize("data", [b"", b"\x30", b"\x30\x84\xff\xff\xff\xff", b"\x02\x01\x00",
                                  b"\x30\x03\x02\x01\x01", b"\x30\x80\x00\x00"])
def test_garbage_is_a_ber_error(data: bytes):
    with pytest.raises(snmp_codec.BerError):
        snmp_codec.parse_response_header(data, snmp_codec.message_prefix(1, b"public"))


# --- against snmpd --------------------------------------------------------------------------

async def test_values_types_labels_and_scale(snmp_agent):
    base = "1.3.6.1.4.1.99999.1"
    metrics = [
        metric("integer", snmp_agent.url(f"{base}.1.0"), labels={"outlet": 3}),
        metric("scaled", snmp_agent.url(f".{base}.1.0"), scale_factor=0.5),
        metric("negative", snmp_agent.url(f"{base}.3.0")),
        metric("numeric_text", snmp_agent.url(f"{base}.4.0")),
        metric("counter32", snmp_agent.url(f"{base}.5.0")),
        metric("gauge32", snmp_agent.url(f"{base}.6.0")),
        metric("timeticks", snmp_agent.url(f"{base}.7.0")),
        metric("oid_value", snmp_agent.url(f"{base}.8.0")),
        metric("text", snmp_agent.url(f"{base}.2.0"), labels={"outlet": 3}, scale_factor=2),
        metric("sysname", snmp_agent.url("1.3.6.1.2.1.1.5.0")),
        metric("counter64", snmp_agent.url(COUNTER64_OID)),
        metric("ipaddress", snmp_agent.url(IPADDRESS_OID)),
        metric("long_text", snmp_agent.url(LONG_STRING_OID)),
        metric("min_int", snmp_agent.url(MIN_INT_OID)),
        metric("watts", snmp_agent.url(f"{PDU_TABLE}.3.0.24")),
    ]
    before = time.time_ns() // 1000
    got = await collect(metrics)
    after = time.time_ns() // 1000
    assert got["integer"].value == 42 and got["integer"].labels == {"outlet": 3}
    assert got["integer"].device_id == "pdu-1"
    assert got["scaled"].value == 21
    assert got["negative"].value == -123456
    assert got["numeric_text"].value == 12.5
    assert got["counter32"].value == 4294967295
    assert got["gauge32"].value == 3000000000
    assert got["timeticks"].value == 12345
    assert got["counter64"].value == float(COUNTER64_VALUE)
    assert got["min_int"].value == -2147483648
    assert 100 + 10 * 24 - 20 <= got["watts"].value <= 100 + 10 * 24 + 20
    strings = {"text": "hello", "sysname": "test-pdu", "ipaddress": "10.1.2.3",
               "oid_value": "1.3.6.1.4.1.99999.200.1", "long_text": LONG_STRING}
    for name, text in strings.items():
        assert math.isnan(got[name].value) and got[name].labels["value_str"] == text
    assert got["text"].labels["outlet"] == 3
    assert len(got) == len(metrics)
    assert all(before <= r.timestamp_us <= after for r in got.values())


async def test_numbers_read_exactly_as_make_reading_builds_them(snmp_agent):
    metrics = [metric("plain", snmp_agent.url("1.3.6.1.4.1.99999.1.1.0"), labels={"u": "W"}),
               metric("scaled", snmp_agent.url("1.3.6.1.4.1.99999.1.3.0"), scale_factor=0.1),
               metric("big", snmp_agent.url(COUNTER64_OID), scale_factor=2)]
    got = await collect(metrics)
    raw = {"plain": 42, "scaled": -123456, "big": COUNTER64_VALUE}
    for desc in metrics:
        reading = got[desc.name]
        assert reading == make_reading(desc, reading.timestamp_us, raw[desc.name])
        assert reading.labels is desc.labels


@pytest.mark.parametrize("query", ["", "max_varbinds=7&max_inflight=1"])
async def test_many_oids_in_several_gets(snmp_agent, query):
    metrics = [metric(f"{col}.{n}", snmp_agent.url(f"{PDU_TABLE}.{col}.0.{n}", query=query))
               for col in (2, 3, 4) for n in range(1, OUTLETS + 1)]
    metrics.append(metric("sysname", snmp_agent.url("1.3.6.1.2.1.1.5.0", query=query)))
    collector = snmp.open_collector(snmp.target_key(metrics[0]), 2.0)
    try:
        readings = await collector.collect(metrics)
    finally:
        await collector.close()
    assert [r.metric_id for r in readings] == [m.name for m in metrics]
    size = 7 if query else 50
    for start in range(0, len(readings), size):
        assert len({r.timestamp_us for r in readings[start:start + size]}) == 1
    watts = {r.metric_id: r.value for r in readings}
    for n in range(1, OUTLETS + 1):
        assert watts[f"2.{n}"] - 5 - 3 <= watts[f"3.{n}"] <= watts[f"2.{n}"] - 5 + 3
        assert watts[f"4.{n}"] >= 1000 * n


async def test_same_oid_in_two_metrics_reads_into_both(snmp_agent):
    url = snmp_agent.url("1.3.6.1.4.1.99999.1.1.0")
    got = await collect([metric("a", url), metric("b", url, labels={"x": 1})])
    assert got["a"].value == got["b"].value == 42 and got["b"].labels == {"x": 1}


async def test_template_on_string_and_integer_columns(snmp_agent):
    got = await collect([
        metric("lo_in", snmp_agent.url(f"{IF_IN_OCTETS}.{{{{ {IF_DESCR} == lo }}}}")),
        metric("descr_1", snmp_agent.url(f"{IF_DESCR}.{{{{ .{IF_INDEX} == 1 }}}}")),
        metric("plain", snmp_agent.url("1.3.6.1.4.1.99999.1.1.0")),
    ], polls=2)
    assert got["lo_in"].value >= 0 and not math.isnan(got["lo_in"].value)
    assert got["descr_1"].labels["value_str"] == "lo"
    assert got["plain"].value == 42


async def test_unresolved_template_skips_only_its_metric_and_is_reported_once(snmp_agent, caplog):
    caplog.set_level(logging.WARNING, logger=LOGGER)
    got = await collect([
        metric("nowhere", snmp_agent.url(f"{IF_IN_OCTETS}.{{{{ {IF_DESCR} == no-such-if }}}}")),
        metric("plain", snmp_agent.url("1.3.6.1.4.1.99999.1.1.0")),
    ], polls=3)
    assert set(got) == {"plain"}
    assert len(warnings_about(caplog, "nowhere")) == 1
    assert "no-such-if" in warnings_about(caplog, "nowhere")[0]


async def test_template_re_resolved_after_no_such_instance(snmp_agent):
    snmp_agent.set_rows({"0.7": ("outletA", 700, 70), "0.8": ("outletB", 800, 80)})
    metrics = [metric("a", snmp_agent.url(f"{ROWS_TABLE}.2.{{{{ {ROWS_TABLE}.1 == outletA }}}}",
                                          query="resolve_every=3600"))]
    collector = snmp.open_collector(snmp.target_key(metrics[0]), 2.0)
    try:
        assert [r.value for r in await collector.collect(metrics)] == [700]
        snmp_agent.set_rows({"0.8": ("outletB", 800, 80), "0.9": ("outletA", 900, 90)})
        assert await collector.collect(metrics) == []  # 0.7 is gone: noSuchInstance
        assert [r.value for r in await collector.collect(metrics)] == [900]
        assert [r.value for r in await collector.collect(metrics)] == [900]
    finally:
        await collector.close()


async def test_template_re_resolved_periodically(snmp_agent):
    snmp_agent.set_rows({"3": ("outletB", 300, 30), "4": ("outletC", 400, 40)})
    metrics = [metric("b", snmp_agent.url(f"{ROWS_TABLE}.2.{{{{ {ROWS_TABLE}.1 == outletB }}}}",
                                          query="resolve_every=0")),
               metric("by_id", snmp_agent.url(f"{ROWS_TABLE}.1.{{{{ {ROWS_TABLE}.3 == 40 }}}}",
                                              query="resolve_every=0"))]
    collector = snmp.open_collector(snmp.target_key(metrics[0]), 2.0)
    try:
        first = {r.metric_id: r for r in await collector.collect(metrics)}
        assert first["b"].value == 300 and first["by_id"].labels["value_str"] == "outletC"
        snmp_agent.set_rows({"3": ("outletC", 301, 40), "4": ("outletB", 401, 30)})
        second = {r.metric_id: r for r in await collector.collect(metrics)}
        assert second["b"].value == 401 and second["by_id"].labels["value_str"] == "outletC"
    finally:
        await collector.close()


async def test_missing_oid_reported_once_and_again_after_it_came_back(snmp_agent, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    snmp_agent.set_rows({})
    metrics = [metric("gone", snmp_agent.url(f"{ROWS_TABLE}.2.5")),
               metric("object", snmp_agent.url("1.3.6.1.4.1.99999.77.1.0")),
               metric("plain", snmp_agent.url("1.3.6.1.4.1.99999.1.1.0"))]
    collector = snmp.open_collector(snmp.target_key(metrics[0]), 2.0)
    try:
        for _ in range(3):
            assert [r.metric_id for r in await collector.collect(metrics)] == ["plain"]
        assert len(warnings_about(caplog, "noSuchInstance")) == 1
        assert len(warnings_about(caplog, "noSuchObject (metric object)")) == 1
        snmp_agent.set_rows({"5": ("five", 5, 5)})
        assert [r.value for r in await collector.collect(metrics)] == [5, 42]
        snmp_agent.set_rows({})
        await collector.collect(metrics)
        assert len(warnings_about(caplog, "noSuchInstance")) == 2
    finally:
        await collector.close()


async def test_v1_values_and_no_such_name(snmp_agent, caplog):
    caplog.set_level(logging.WARNING, logger=LOGGER)
    metrics = [metric("integer", snmp_agent.url("1.3.6.1.4.1.99999.1.1.0", "snmpv1")),
               metric("missing", snmp_agent.url("1.3.6.1.4.1.99999.77.1.0", "snmpv1")),
               metric("text", snmp_agent.url("1.3.6.1.4.1.99999.1.2.0", "snmpv1")),
               metric("lo_in", snmp_agent.url(f"{IF_IN_OCTETS}.{{{{ {IF_DESCR} == lo }}}}",
                                              "snmpv1"))]
    collector = snmp.open_collector(snmp.target_key(metrics[0]), 2.0)
    try:
        for _ in range(2):
            got = {r.metric_id: r for r in await collector.collect(metrics)}
            assert set(got) == {"integer", "text", "lo_in"}
            assert got["integer"].value == 42 and got["text"].labels["value_str"] == "hello"
    finally:
        await collector.close()
    assert len(warnings_about(caplog, "noSuchName")) == 1


@pytest.mark.parametrize("user", sorted(V3_USERS))
async def test_v3_security_levels(snmp_agent, user):
    got = await collect([
        metric("integer", snmp_agent.v3_url(user, "1.3.6.1.4.1.99999.1.1.0")),
        metric("text", snmp_agent.v3_url(user, "1.3.6.1.2.1.1.5.0")),
        metric("counter64", snmp_agent.v3_url(user, COUNTER64_OID)),
        metric("timeticks", snmp_agent.v3_url(user, "1.3.6.1.4.1.99999.1.7.0")),
        metric("ipaddress", snmp_agent.v3_url(user, IPADDRESS_OID)),
        metric("oid_value", snmp_agent.v3_url(user, "1.3.6.1.4.1.99999.1.8.0")),
        metric("lo_in", snmp_agent.v3_url(user, f"{IF_IN_OCTETS}.{{{{ {IF_DESCR} == lo }}}}")),
        metric("missing", snmp_agent.v3_url(user, "1.3.6.1.4.1.99999.77.1.0")),
    ], polls=2)
    assert got["integer"].value == 42 and got["text"].labels["value_str"] == "test-pdu"
    assert got["counter64"].value == float(COUNTER64_VALUE)
    assert got["timeticks"].value == 12345
    assert got["ipaddress"].labels["value_str"] == "10.1.2.3"
    assert got["oid_value"].labels["value_str"] == "1.3.6.1.4.1.99999.200.1"
    assert got["lo_in"].value >= 0 and "missing" not in got


async def test_v3_wrong_key_is_an_error_without_keys(snmp_agent):
    url = f"snmpv3://kwsha:wrong-auth-key:wrong-priv-key@127.0.0.1:{snmp_agent.port}/1.3.6.1.2.1.1.5.0"
    with pytest.raises(SnmpError) as raised:
        await collect([metric("m", url)])
    text = str(raised.value)
    assert f"kwsha@127.0.0.1:{snmp_agent.port}" in text
    assert "wrong-auth-key" not in text and "wrong-priv-key" not in text


# --- dead or silent agents ------------------------------------------------------------------

async def test_wrong_community_times_out(snmp_agent):
    url = f"snmp://not-the-community@127.0.0.1:{snmp_agent.port}/1.3.6.1.2.1.1.5.0"
    with pytest.raises(SnmpTimeout) as raised:
        await collect([metric("m", url)], timeout=0.3)
    assert f"127.0.0.1:{snmp_agent.port}" in str(raised.value)
    assert "not-the-community" not in str(raised.value)


@pytest.mark.parametrize("credentials", ["snmp://public", "snmpv3://ops:auth-key-1:priv-key-1"])
async def test_silent_agent_times_out_naming_the_target_only(silent_udp_port, credentials):
    # 120 OIDs: several GETs, yet one timeout ends the poll; a template's walk times out too
    base = f"{credentials}@127.0.0.1:{silent_udp_port}"
    metrics = [metric(f"m{n}", f"{base}/1.3.6.1.2.1.1.5.{n}") for n in range(120)]
    templated = [metric("t", f"{base}/{IF_IN_OCTETS}.{{{{ {IF_DESCR} == lo }}}}")]
    for polled in (metrics, templated):
        with pytest.raises(SnmpTimeout, match=f"127.0.0.1:{silent_udp_port}") as raised:
            await collect(polled, timeout=0.3)
        for secret in ("public", "auth-key-1", "priv-key-1"):
            assert secret not in str(raised.value)


async def test_closed_port_is_unreachable():
    port = free_udp_port()
    url = f"snmp://public@127.0.0.1:{port}/1.3.6.1.2.1.1.5.0"
    with pytest.raises(SnmpUnreachable, match=f"127.0.0.1:{port}"):
        await collect([metric("m", url)], timeout=1.0)


# --- scripted agents: what snmpd never does -------------------------------------------------

def values_for(request) -> list:
    return [Integer(int(oid.rsplit(".", 1)[1])) for oid in request.oids]


async def test_requests_hold_at_most_max_varbinds(scripted_agent):
    scripted_agent.script = lambda request: [response(request, values_for(request))]
    metrics = [metric(f"m{n}", scripted_agent.url(f"1.3.6.1.4.1.99999.5.{n}"))
               for n in range(1, 121)]
    got = await collect(metrics)
    assert [got[f"m{n}"].value for n in range(1, 121)] == list(range(1, 121))
    assert sorted(len(r.oids) for r in scripted_agent.requests) == [20, 50, 50]
    assert {r.pdu_type for r in scripted_agent.requests} == {"GetRequest"}
    assert {r.community for r in scripted_agent.requests} == {b"public"}


async def test_too_big_splits_the_get(scripted_agent):
    def script(request):
        if len(request.oids) > 13:
            return [response(request, [], error_status=1)]
        return [response(request, values_for(request))]

    scripted_agent.script = script
    metrics = [metric(f"m{n}", scripted_agent.url(f"1.3.6.1.4.1.99999.5.{n}"))
               for n in range(1, 51)]
    got = await collect(metrics)
    assert [got[f"m{n}"].value for n in range(1, 51)] == list(range(1, 51))
    assert {len(r.oids) for r in scripted_agent.requests} == {50, 25, 13, 12}


async def test_gen_err_on_one_oid_drops_only_that_oid(scripted_agent, caplog):
    caplog.set_level(logging.WARNING, logger=LOGGER)

    def script(request):
        if "1.3.6.1.4.1.99999.5.3" in request.oids:
            return [response(request, [], error_status=5,
                             error_index=request.oids.index("1.3.6.1.4.1.99999.5.3") + 1)]
        return [response(request, values_for(request))]

    scripted_agent.script = script
    metrics = [metric(f"m{n}", scripted_agent.url(f"1.3.6.1.4.1.99999.5.{n}"))
               for n in range(1, 6)]
    got = await collect(metrics)
    assert sorted(got) == ["m1", "m2", "m4", "m5"]
    assert len(warnings_about(caplog, "genErr")) == 1


async def test_stray_and_garbage_datagrams_are_ignored(scripted_agent):
    def script(request):
        good = response(request, values_for(request))
        return [b"\x00garbage", good[: len(good) // 2],
                response(request, [Integer(-1)] * len(request.oids), request_id=12345),
                response(request, [Integer(-2)] * len(request.oids), community=b"other"),
                good, response(request, [Integer(-3)] * len(request.oids))]

    scripted_agent.script = script
    metrics = [metric(f"m{n}", scripted_agent.url(f"1.3.6.1.4.1.99999.5.{n}"))
               for n in range(1, 4)]
    collector = snmp.open_collector(snmp.target_key(metrics[0]), 2.0)
    try:
        for _ in range(3):
            assert [r.value for r in await collector.collect(metrics)] == [1, 2, 3]
    finally:
        await collector.close()


async def test_late_reply_is_not_taken_for_the_next_one(scripted_agent):
    held: list[bytes] = []

    def script(request):
        answer = response(request, [Integer(len(scripted_agent.requests))])
        if len(scripted_agent.requests) == 1:
            held.append(answer)  # answered only after the timeout, with the next reply
            return []
        return [*held, answer]

    scripted_agent.script = script
    metrics = [metric("m", scripted_agent.url("1.3.6.1.4.1.99999.5.1"))]
    collector = snmp.open_collector(snmp.target_key(metrics[0]), 0.3)
    try:
        with pytest.raises(SnmpTimeout):
            await collector.collect(metrics)
        assert [r.value for r in await collector.collect(metrics)] == [2]
    finally:
        await collector.close()


async def test_reply_for_other_oids_is_reported_not_used(scripted_agent, caplog):
    caplog.set_level(logging.WARNING, logger=LOGGER)

    def script(request):
        if request.oids[0].endswith(".1"):
            request.oids = [oid + ".9" for oid in request.oids]
        return [response(request, values_for(request))]

    scripted_agent.script = script
    metrics = [metric(f"m{n}", scripted_agent.url(f"1.3.6.1.4.1.99999.5.{n}", query=query))
               for n in (1, 2) for query in ["max_varbinds=1"]]
    assert {name: r.value for name, r in (await collect(metrics)).items()} == {"m2": 2}
    assert len(warnings_about(caplog, "malformed response")) == 1
    with pytest.raises(SnmpError, match="malformed response"):
        await collect(metrics[:1])  # nothing at all could be read: the poll fails


async def test_v1_v2c_exception_values_do_not_become_readings(scripted_agent):
    from puresnmp.pdu import EndOfMibView, NoSuchInstance, NoSuchObject

    scripted_agent.script = lambda request: [response(
        request, [NoSuchObject(b""), NoSuchInstance(b""), EndOfMibView(b""), Integer(7)])]
    metrics = [metric(f"m{n}", scripted_agent.url(f"1.3.6.1.4.1.99999.5.{n}"))
               for n in range(1, 5)]
    assert {name: r.value for name, r in (await collect(metrics)).items()} == {"m4": 7}


async def test_values_snmp_cannot_hold_are_refused_one_by_one(scripted_agent, caplog):
    """An INTEGER of 167 bytes, an Opaque that is no float, a type SNMP does not define:
    each is refused and counted, the other values of the same poll are kept."""
    from puresnmp.types import Counter64, NsapAddress, Opaque

    caplog.set_level(logging.WARNING, logger=LOGGER)
    values = [Integer(10 ** 400), Integer(7), Opaque(b"\x01\x02"), NsapAddress(258),
              Opaque(b"\x9f\x78\x04" + struct.pack(">f", 1.5)),
              Opaque(b"\x9f\x79\x08" + struct.pack(">d", -2.25)), Counter64(2 ** 64 - 1),
              Integer(-(10 ** 30))]
    scripted_agent.script = lambda request: [response(request, values)]
    metrics = [metric(f"m{n}", scripted_agent.url(f"1.3.6.1.4.1.99999.5.{n}"))
               for n in range(1, len(values) + 1)]
    collector = snmp.open_collector(snmp.target_key(metrics[0]), 2.0)
    try:
        readings = {r.metric_id: r.value for r in await collector.collect(metrics)}
        assert collector.refused_values == 4
    finally:
        await collector.close()
    assert readings == {"m2": 7.0, "m5": 1.5, "m6": -2.25, "m7": float(2 ** 64 - 1)}
    refused = warnings_about(caplog, "value refused")
    assert any("INTEGER of 167 bytes: wider than 64 bits" in m for m in refused)
    assert any("Opaque of 2 bytes that is not a float or double" in m for m in refused)
    assert any("type 0x45, which SNMP does not define" in m for m in refused)
    assert any("INTEGER of 13 bytes" in m for m in refused)


def test_fuzzed_replies_are_ber_errors_or_values_never_crashes():
    """1,500 mutated GetResponses (seeded): each is refused as a BerError, or decodes to
    values a reading can be made of (numbers, bytes, text, Missing, Refused)."""
    from puresnmp.types import Counter64, Gauge, Opaque, TimeTicks

    oids = [f"1.3.6.1.4.1.99999.5.{n}" for n in range(1, 7)]
    values = [Integer(-5), OctetString(b"12.5"), Counter64(2 ** 63), Gauge(7), TimeTicks(9),
              Opaque(b"\x9f\x78\x04" + struct.pack(">f", 2.5))]
    message = bytes(Sequence([Integer(1), OctetString(b"public"), GetResponse(PDUContent(
        77, [VarBind(ObjectIdentifier(oid), value) for oid, value in zip(oids, values,
                                                                           strict=True)]))]))
    prefix = snmp_codec.message_prefix(1, b"public")
    oid_tlvs = [snmp_codec.encode_oid(snmp_codec.parse_oid(oid)) for oid in oids]
    rng = random.Random(16)
    decoded = 0
    for _ in range(1500):
        data = bytearray(message)
        for _ in range(rng.randint(1, 4)):
            where = rng.randrange(len(data))
            choice = rng.random()
            if choice < 0.6:
                data[where] = rng.randrange(256)
            elif choice < 0.8:
                del data[where]
            else:
                data[where:where] = bytes([rng.randrange(256)] * rng.randint(1, 200))
        try:
            header = snmp_codec.parse_response_header(bytes(data), prefix)
            got = snmp_codec.decode_get_values(bytes(data), header, oid_tlvs)
        except snmp_codec.BerError:
            continue
        decoded += 1
        for value in got:
            if isinstance(value, int):
                assert -(2 ** 63) <= value < 2 ** 72 and math.isfinite(float(value))
            elif not isinstance(value, float):
                assert isinstance(value, bytes | str | snmp_codec.Missing | snmp_codec.Refused)
    assert decoded > 20  # the mutations also leave decodable replies
