"""JSON-over-HTTP protocol against a local Redfish-shaped aiohttp server."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from urllib.parse import quote

import pytest

from kwollect import protocols
from kwollect.model import MetricDescription, Reading
from kwollect.protocols import httpjson
from kwollect.protocols.http_common import FetchError
from tests.fixtures.redfish import REDFISH_PASSWORD, REDFISH_USER

AUTH = f"{REDFISH_USER}:{quote(REDFISH_PASSWORD, safe='')}"
POWER = "/redfish/v1/Chassis/1/Power"
THERMAL = "/redfish/v1/Chassis/1/Thermal"


def desc(url: str, name: str = "bmc_power_watt", device_id: str = "node-1",
         **fields) -> MetricDescription:
    return MetricDescription(name=name, device_id=device_id, url=url, **fields)


async def collect(*descs: MetricDescription, timeout: float = 5.0) -> list[Reading]:
    collector = httpjson.open_collector(httpjson.target_key(descs[0]), timeout)
    try:
        return await collector.collect(descs)
    finally:
        await collector.close()


async def test_metrics_of_one_url_share_one_get(redfish_server):
    base = f"json+http://{AUTH}@{redfish_server.http}{POWER}"
    consumed = desc(f"{base}#PowerControl[0].PowerConsumedWatts", scale_factor=0.001,
                    name="bmc_power_kw", labels={"_device_alias": "node-1-bmc"})
    average = desc(f"{base}?jsonpath=%24.PowerControl%5B0%5D.PowerMetrics.AverageConsumedWatts",
                   name="bmc_power_avg_watt", device_id="node-2")
    key = httpjson.target_key(consumed)
    assert httpjson.target_key(average) == key
    hits = redfish_server.hits[POWER]
    before = time.time_ns() // 1000
    readings = await collect(consumed, average)
    after = time.time_ns() // 1000
    assert redfish_server.hits[POWER] == hits + 1
    assert [(r.device_id, r.metric_id, r.value, r.labels) for r in readings] == [
        ("node-1", "bmc_power_kw", 0.312, {"_device_alias": "node-1-bmc"}),
        ("node-2", "bmc_power_avg_watt", 305.5, {})]
    assert readings[0].timestamp_us == readings[1].timestamp_us
    assert before <= readings[0].timestamp_us <= after


async def test_wildcard_gives_one_labelled_reading_per_value(redfish_server):
    url = f"json+http://{AUTH}@{redfish_server.http}{THERMAL}#$.Temperatures[*].ReadingCelsius"
    readings = await collect(desc(url, name="bmc_temp_celsius", labels={"rack": "r1"}))
    # The null reading of "Absent Temp" is skipped.
    assert [(r.value, r.labels) for r in readings] == [
        (45, {"rack": "r1", "_jsonpath": "$['Temperatures'][0]['ReadingCelsius']"}),
        (22.5, {"rack": "r1", "_jsonpath": "$['Temperatures'][1]['ReadingCelsius']"})]


async def test_filter_query_keeps_its_label_with_one_match(redfish_server):
    url = (f"json+http://{AUTH}@{redfish_server.http}{THERMAL}"
           "#$.Temperatures[?@.Name=='Inlet Temp'].ReadingCelsius")
    readings = await collect(desc(url, name="inlet_celsius"))
    assert [(r.value, r.labels) for r in readings] == [
        (22.5, {"_jsonpath": "$['Temperatures'][1]['ReadingCelsius']"})]


async def test_strings_are_stored_as_nan_with_value_str(redfish_server):
    base = f"json+http://{AUTH}@{redfish_server.http}{POWER}"
    readings = await collect(desc(f"{base}#PowerSupplies[1].Status.Health", name="psu2_health"),
                             desc(f"{base}#PowerSupplies[*].PowerOutputWatts", name="psu_watt"))
    health = readings[0]
    assert math.isnan(health.value) and health.labels == {"value_str": "Warning"}
    assert [r.value for r in readings[1:]] == [150, 162]


async def test_no_value_warns_and_gives_no_reading(redfish_server, caplog):
    base = f"json+http://{AUTH}@{redfish_server.http}"
    missing = desc(f"{base}{POWER}#PowerControl[3].PowerConsumedWatts", name="missing_watt")
    null = desc(f"{base}{POWER}#PowerControl[0].Missing", name="null_or_missing")
    obj = desc(f"{base}{POWER}#PowerControl[0].PowerMetrics", name="object_watt")
    good = desc(f"{base}{POWER}#PowerControl[0].PowerConsumedWatts", name="good_watt")
    absent = desc(f"{base}{THERMAL}#Temperatures[2].ReadingCelsius", name="absent_celsius")
    with caplog.at_level(logging.WARNING, logger="kwollect.protocols.httpjson"):
        readings = await collect(missing, null, obj, good)
        assert await collect(absent) == []
    assert [r.metric_id for r in readings] == ["good_watt"]
    assert "no value for metric missing_watt of device node-1: its JSONPath matched nothing" \
        in caplog.text
    assert "object_watt of device node-1: its JSONPath matched an object" in caplog.text
    assert "absent_celsius of device node-1: its JSONPath matched null" in caplog.text
    assert REDFISH_PASSWORD not in caplog.text


async def test_bearer_token_and_forwarded_query(redfish_server):
    url = (f"json+http://{redfish_server.http}{POWER}?$select=PowerControl"
           f"&bearer_file={redfish_server.bearer_file}#PowerControl[0].PowerConsumedWatts")
    assert httpjson.target_key(desc(url)).url == (
        f"http://{redfish_server.http}{POWER}?$select=PowerControl")
    hits = redfish_server.hits[f"{POWER}?$select=PowerControl"]
    assert [r.value for r in await collect(desc(url))] == [312]
    assert redfish_server.hits[f"{POWER}?$select=PowerControl"] == hits + 1


async def test_https_with_ca_file_or_insecure(redfish_server, tls_cert):
    base = f"json+https://{AUTH}@{redfish_server.https}{POWER}"
    for options in (f"?ca_file={tls_cert.cert}", "?insecure=yes"):
        url = f"{base}{options}#PowerControl[0].PowerConsumedWatts"
        assert [r.value for r in await collect(desc(url))] == [312]
    with pytest.raises(FetchError, match="certificate"):
        await collect(desc(f"{base}#PowerControl[0].PowerConsumedWatts"))


async def test_auth_failures_raise_without_password(redfish_server):
    url = f"json+http://{REDFISH_USER}:not-the-password@{redfish_server.http}{POWER}#PowerControl"
    with pytest.raises(FetchError, match=f"json http://{redfish_server.http}{POWER}: HTTP 401"
                       ) as failure:
        await collect(desc(url))
    assert "not-the-password" not in str(failure.value)
    with pytest.raises(FetchError, match="HTTP 401"):
        await collect(desc(f"json+http://{redfish_server.http}{POWER}#PowerControl"))


async def test_slow_broken_and_invalid_endpoints_raise(redfish_server):
    base = f"json+http://{AUTH}@{redfish_server.http}/redfish/v1"
    with pytest.raises(FetchError, match="/slow: no complete answer within 0.3 s"):
        await asyncio.wait_for(collect(desc(f"{base}/slow#x"), timeout=0.3), 30)
    with pytest.raises(FetchError, match="/broken: HTTP 500 Internal Server Error"):
        await collect(desc(f"{base}/broken#x"))
    with pytest.raises(FetchError, match="/invalid: invalid JSON"):
        await collect(desc(f"{base}/invalid#x"))


def test_target_key_and_jsonpath_forms():
    key = httpjson.target_key(desc("json+https://u:pw@BMC/redfish/v1/Power#$.a"))
    assert key == httpjson.target_key(desc("json+https://u:pw@bmc/redfish/v1/Power?jsonpath=b"))
    assert key.url == "https://bmc:443/redfish/v1/Power"
    assert "pw" not in repr(key)
    assert key != httpjson.target_key(desc("json+https://u:pw@bmc/redfish/v1/Thermal#a"))
    assert httpjson.target_key(desc("json+http://bmc#[0]")).url == "http://bmc:80/"


def test_registered_schemes():
    for url in ("json+http://bmc/p#a", "json+https://bmc/p#a"):
        protocol, key = protocols.target_key(desc(url))
        assert (protocol, key) == ("httpjson", httpjson.target_key(desc(url)))
        assert isinstance(protocols.open_collector(protocol, key, 1.0), httpjson.JsonCollector)


@pytest.mark.parametrize(("url", "message"), [
    ("json+http://bmc/redfish/v1/Power", "no JSONPath"),
    ("json+http://bmc/p?jsonpath=a#b", "JSONPath given twice"),
    ("json+http://bmc/p#$.a[", "invalid JSONPath '\\$.a\\['"),
    ("json+http://bmc/p#a | b", "invalid JSONPath"),
    ("json+http:///p#a", "no host"),
    ("json+http://bmc/p?ca_file=/ca.pem#a", "only apply to https"),
    ("json+https://bmc/p?bearer_file=rel#a", "absolute path"),
    ("json://bmc/p#a", "not a JSON-over-HTTP URL scheme"),
])
def test_invalid_urls(url, message):
    with pytest.raises(ValueError, match=message):
        httpjson.target_key(desc(url))
