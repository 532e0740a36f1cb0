"""Prometheus protocol against real exporters: node_exporter, prometheus_client, and an aiohttp
server of hand-written expositions (edge cases, malformed lines, auth, https)."""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
import urllib.request
from urllib.parse import quote

import pytest

from kwollect import protocols
from kwollect.model import MetricDescription, Reading
from kwollect.protocols import prometheus
from kwollect.protocols.http_common import FetchError
from tests.fixtures.prometheus import (
    BASIC_PASSWORD,
    BASIC_USER,
    EDGE_EXPOSITION,
    MALFORMED,
    free_port,
)

BASIC = f"{BASIC_USER}:{quote(BASIC_PASSWORD, safe='')}"


def desc(url: str, device_id: str = "node-1", **fields) -> MetricDescription:
    return MetricDescription(name=fields.pop("name", "prom"), device_id=device_id, url=url,
                             **fields)


async def collect(*descs: MetricDescription, timeout: float = 5.0) -> list[Reading]:
    collector = prometheus.open_collector(prometheus.target_key(descs[0]), timeout)
    try:
        return await collector.collect(descs)
    finally:
        await collector.close()


def by_series(readings: list[Reading]) -> dict[tuple, Reading]:
    """Readings keyed by (device, metric, labels); fails on duplicates."""
    table = {(r.device_id, r.metric_id, frozenset(r.labels.items())): r for r in readings}
    assert len(table) == len(readings)
    return table


def one(readings: list[Reading], metric_id: str, **labels: str) -> Reading:
    found = [r for r in readings if r.metric_id == metric_id
             and all(r.labels.get(k) == v for k, v in labels.items())]
    assert len(found) == 1, (metric_id, labels, found)
    return found[0]


# --- node_exporter --------------------------------------------------------------------------

async def test_node_exporter_all_metrics(textfile):
    textfile.write("pdu", '# TYPE test_pdu_outlet_watts gauge\n'
                          'test_pdu_outlet_watts{outlet="1"} 123.5\n'
                          'test_pdu_outlet_watts{outlet="2"} 99\n')
    before = time.time_ns() // 1000
    readings = await collect(desc(f"prometheus://{textfile.address}/"))
    after = time.time_ns() // 1000
    assert len(readings) > 100
    assert {r.device_id for r in readings} == {"node-1"}
    assert all(r.metric_id.startswith("prom_") for r in readings)
    assert all(before <= r.timestamp_us <= after for r in readings)
    assert len({r.timestamp_us for r in readings}) == 1  # one scrape, one midpoint
    load = one(readings, "prom_node_load1")
    assert load.labels == {} and load.value >= 0
    idle = [r for r in readings if r.metric_id == "prom_node_cpu_seconds_total"
            and r.labels.get("mode") == "idle"]
    assert idle and all(isinstance(r.labels["cpu"], str) for r in idle)
    assert one(readings, "prom_test_pdu_outlet_watts", outlet="1").value == 123.5
    assert one(readings, "prom_test_pdu_outlet_watts", outlet="2").value == 99


async def test_node_exporter_name_filter_and_scale(textfile):
    textfile.write("pdu", 'test_pdu_outlet_watts{outlet="1"} 123.5\n')
    url = f"prometheus://{textfile.address}/node_load1-node_load5-test_pdu_outlet_watts"
    readings = await collect(desc(url, scale_factor=0.5, labels={"_device_alias": "node-9"}))
    assert sorted(r.metric_id for r in readings) == [
        "prom_node_load1", "prom_node_load5", "prom_test_pdu_outlet_watts"]
    watts = one(readings, "prom_test_pdu_outlet_watts")
    assert watts.value == 61.75
    assert watts.labels == {"outlet": "1", "_device_alias": "node-9"}


async def test_kwollect_custom_emitted_only_when_its_timestamp_changes(textfile):
    url = f"prometheus://{textfile.address}/kwollect_custom"
    collector = prometheus.open_collector(prometheus.target_key(desc(url)), 5.0)
    description = desc(url, labels={"site": "lyon"})
    try:
        textfile.write("custom", (
            'kwollect_custom{_metric_id="my_metric", _timestamp="1606389005.1234", room="a"} 42\n'
            'kwollect_custom{_metric_id="live_gauge", room="a"} 7\n'
            'kwollect_custom{room="b"} 5\n'))
        first = by_series(await collector.collect([description]))
        before = time.time_ns() // 1000
        second = by_series(await collector.collect([description]))
        after = time.time_ns() // 1000
        textfile.write("custom", (
            'kwollect_custom{_metric_id="my_metric", _timestamp="1606389010.5", room="a"} 43\n'
            'kwollect_custom{_metric_id="live_gauge", room="a"} 8\n'))
        third = by_series(await collector.collect([description]))
    finally:
        await collector.close()

    origin = {"_metric_origin": "prom_kwollect_custom", "site": "lyon"}
    stamped = one(list(first.values()), "my_metric")
    assert (stamped.timestamp_us, stamped.value) == (1606389005123400, 42)
    assert stamped.labels == {"room": "a", **origin}
    assert one(list(first.values()), "prom_kwollect_custom").labels == {"room": "b", **origin}
    # Unchanged _timestamp: not emitted again; no _timestamp: a fresh reading every scrape.
    assert sorted(r.metric_id for r in second.values()) == ["live_gauge", "prom_kwollect_custom"]
    live = one(list(second.values()), "live_gauge")
    assert before <= live.timestamp_us <= after and live.labels == {"room": "a", **origin}
    assert "_metric_scrape_time" not in live.labels
    changed = one(list(third.values()), "my_metric")
    assert (changed.timestamp_us, changed.value) == (1606389010500000, 43)
    assert one(list(third.values()), "live_gauge").value == 8


async def test_kwollect_custom_bad_timestamp_skips_that_line(textfile, caplog):
    textfile.write("custom", (
        'kwollect_custom{_metric_id="bad_ts", _timestamp="yesterday"} 1\n'
        'kwollect_custom{_metric_id="good", _timestamp="1700000000"} 2\n'))
    with caplog.at_level(logging.WARNING, logger="kwollect.protocols.prometheus"):
        readings = await collect(desc(f"prometheus://{textfile.address}/kwollect_custom"))
    assert [(r.metric_id, r.timestamp_us, r.value) for r in readings] == [
        ("good", 1_700_000_000_000_000, 2)]
    assert "unparseable _timestamp 'yesterday'" in caplog.text


# --- prometheus_client exporter -------------------------------------------------------------

async def test_client_exporter_types(client_exporter):
    names = "pdu_outlet_watts-pdu_energy_joules_total-request_latency_seconds-job_duration_seconds"
    readings = await collect(desc(f"prometheus://{client_exporter}/{names}"))
    table = {(r.metric_id, tuple(sorted(r.labels.items()))): r.value for r in readings}
    assert table == {
        **{("prom_pdu_outlet_watts", (("outlet", str(o)), ("pdu", "pdu1"))): 100.0 + o
           for o in range(1, 5)},
        ("prom_pdu_energy_joules_total", (("outlet", "1"),)): 5.0,
        ("prom_request_latency_seconds_bucket", (("le", "0.1"),)): 1.0,
        ("prom_request_latency_seconds_bucket", (("le", "0.5"),)): 2.0,
        ("prom_request_latency_seconds_bucket", (("le", "+Inf"),)): 3.0,
        ("prom_request_latency_seconds_count", ()): 3.0,
        ("prom_request_latency_seconds_sum", ()): pytest.approx(2.35),
        ("prom_job_duration_seconds_count", ()): 1.0,
        ("prom_job_duration_seconds_sum", ()): 1.5,
    }


async def test_dead_exporter_raises(doomed_exporter):
    address, proc = doomed_exporter
    url = f"prometheus://{address}/pdu_outlet_watts"
    collector = prometheus.open_collector(prometheus.target_key(desc(url)), 2.0)
    try:
        assert len(await collector.collect([desc(url)])) == 4
        proc.terminate()
        proc.wait(5)
        with pytest.raises(FetchError, match=f"prometheus http://{address}/metrics: "):
            await asyncio.wait_for(collector.collect([desc(url)]), 30)
    finally:
        await collector.close()


async def test_connection_refused_raises():
    address = f"127.0.0.1:{free_port()}"
    with pytest.raises(FetchError, match=f"http://{address}/metrics: ClientConnectorError"):
        await asyncio.wait_for(collect(desc(f"prometheus://{address}/")), 30)


# --- hand-written expositions ---------------------------------------------------------------

async def test_exposition_corners_and_malformed_lines(prom_edge_server, caplog):
    url = f"prometheus://{prom_edge_server.http}/?path=/corners/metrics"  # its own log key
    collector = prometheus.open_collector(prometheus.target_key(desc(url)), 5.0)
    try:
        with caplog.at_level(logging.WARNING, logger="kwollect.protocols.prometheus"):
            readings = await collector.collect([desc(url)])
        assert collector.malformed_lines == len(MALFORMED)
    finally:
        await collector.close()
    values = {(r.metric_id, tuple(sorted(r.labels.items()))): r for r in readings}

    gauge = values[("prom_edge_gauge", (("msg", 'say "hi"'), ("multi", "a\nb"),
                                         ("path", "C:\\dir")))]
    assert gauge.value == 1.5
    stamped = values[("prom_edge_ts", (("a", "1"),))]
    assert (stamped.value, stamped.timestamp_us) == (7, 1609452000000000)
    assert values[("prom_ns:sub:metric", ())].value == 3
    assert math.isnan(values[("prom_edge_special", (("kind", "nan"),))].value)
    assert values[("prom_edge_special", (("kind", "pinf"),))].value == math.inf
    assert values[("prom_edge_special", (("kind", "ninf"),))].value == -math.inf
    assert values[("prom_edge_spaces", (("a", "x"), ("b", "y")))].value == 4
    assert values[("prom_edge_tab", ())].value == 5
    tab = values[("prom_edge_tab_ts", (("a", "t"),))]
    assert (tab.value, tab.timestamp_us) == (6, 1609452000123000)
    assert values[("prom_edge_empty_label", (("b", "keep"),))].value == 8
    assert values[("prom_edge_hist_bucket", (("le", "+Inf"),))].value == 3
    assert values[("prom_edge_hist_sum", ())].value == 0.7
    assert values[("prom_edge_sum", (("quantile", "0.5"),))].value == 0.2
    assert values[("prom_edge_last", ())].value == 11  # lines after the bad ones still count
    assert not {"prom_edge_missing_value", "prom_edge_bad_value", "prom_edge_dup",
                "prom_edge_unterminated", "prom_this"} & {r.metric_id for r in readings}
    assert len(readings) == 18
    assert f"skipped {len(MALFORMED)} malformed line(s)" in caplog.text


async def test_family_filter_keeps_histogram_and_summary_series(prom_edge_server):
    readings = await collect(desc(f"prometheus://{prom_edge_server.http}/edge_hist-edge_sum"))
    assert sorted(r.metric_id for r in readings) == [
        "prom_edge_hist_bucket", "prom_edge_hist_bucket", "prom_edge_hist_count",
        "prom_edge_hist_sum", "prom_edge_sum", "prom_edge_sum_count", "prom_edge_sum_sum"]
    only_sum = await collect(desc(f"prometheus://{prom_edge_server.http}/edge_hist_sum"))
    assert [r.metric_id for r in only_sum] == ["prom_edge_hist_sum"]


async def test_exposition_timestamp_sample_not_reemitted_unchanged(prom_edge_server):
    prom_edge_server.bodies["/stamped/metrics"] = "stamped 1 1609452000000\nplain 2\n"
    url = f"prometheus://{prom_edge_server.http}/?path=/stamped/metrics"
    collector = prometheus.open_collector(prometheus.target_key(desc(url)), 5.0)
    try:
        first = await collector.collect([desc(url)])
        # Same time, even with another value: the same sample, not stored twice.
        prom_edge_server.bodies["/stamped/metrics"] = "stamped 5 1609452000000\nplain 2\n"
        second = await collector.collect([desc(url)])
        prom_edge_server.bodies["/stamped/metrics"] = "stamped 1 1609452005000\nplain 2\n"
        third = await collector.collect([desc(url)])
    finally:
        await collector.close()
    assert sorted(r.metric_id for r in first) == ["prom_plain", "prom_stamped"]
    assert [r.metric_id for r in second] == ["prom_plain"]
    assert [(r.metric_id, r.timestamp_us) for r in third if r.metric_id == "prom_stamped"] == [
        ("prom_stamped", 1609452005000000)]


async def test_description_labels_merged_exporter_labels_win(prom_edge_server):
    url = f"prometheus://{prom_edge_server.http}/edge_ts-edge_last"
    readings = await collect(desc(url, labels={"a": "from-desc", "rack": "r1"}, scale_factor=10))
    assert by_series(readings).keys() == {
        ("node-1", "prom_edge_ts", frozenset({("a", "1"), ("rack", "r1")})),
        ("node-1", "prom_edge_last", frozenset({("a", "from-desc"), ("rack", "r1")}))}
    assert sorted(r.value for r in readings) == [70, 110]


async def test_two_descriptions_one_scrape(prom_edge_server):
    prom_edge_server.bodies["/two/metrics"] = (
        "edge_last 11\nedge_other 3\n"
        'kwollect_custom{_metric_id="job_energy", _timestamp="1700000000.25"} 99\n')
    base = f"prometheus://{prom_edge_server.http}"
    first = desc(f"{base}/edge_last-kwollect_custom?path=/two/metrics", "node-1")
    second = desc(f"{base}/edge_other-edge_last-kwollect_custom?path=/two/metrics", "node-2",
                  labels={"rack": "r1"}, scale_factor=2)
    key = prometheus.target_key(first)
    assert prometheus.target_key(second) == key
    collector = prometheus.open_collector(key, 5.0)
    hits = prom_edge_server.hits["/two/metrics"]
    try:
        readings = await collector.collect([first, second])
        again = await collector.collect([first, second])
    finally:
        await collector.close()
    assert prom_edge_server.hits["/two/metrics"] == hits + 2  # one scrape per collect
    assert sorted((r.device_id, r.metric_id, r.value) for r in readings) == [
        ("node-1", "job_energy", 99), ("node-1", "prom_edge_last", 11),
        ("node-2", "job_energy", 198), ("node-2", "prom_edge_last", 22),
        ("node-2", "prom_edge_other", 6)]
    assert all(r.labels.get("rack") == "r1" for r in readings if r.device_id == "node-2")
    assert all("rack" not in r.labels for r in readings if r.device_id == "node-1")
    # The unchanged custom sample is not emitted again, for either description.
    assert sorted((r.device_id, r.metric_id) for r in again) == [
        ("node-1", "prom_edge_last"), ("node-2", "prom_edge_last"), ("node-2", "prom_edge_other")]


async def test_unicode_line_separator_inside_a_label_value(prom_edge_server):
    prom_edge_server.bodies["/unicode/metrics"] = 'edge_unicode{v="a\u2028b \u00e9"} 13\n'
    readings = await collect(desc(f"prometheus://{prom_edge_server.http}/?path=/unicode/metrics"))
    assert [(r.metric_id, r.labels, r.value) for r in readings] == [
        ("prom_edge_unicode", {"v": "a\u2028b \u00e9"}, 13)]


async def test_openmetrics_answer_is_refused(prom_edge_server):
    url = f"prometheus://{prom_edge_server.http}/?path=/openmetrics/metrics"
    with pytest.raises(FetchError, match="answered OpenMetrics"):
        await collect(desc(url))


async def test_custom_path_and_forwarded_query(prom_edge_server):
    base = f"prometheus://{prom_edge_server.http}/"
    readings = await collect(desc(base + "?path=/custom/metrics"))
    assert [(r.metric_id, r.value) for r in readings] == [("prom_custom_path_metric", 1)]
    echoed = await collect(desc(base + "?path=/echo/metrics&module=if_mib&target=pdu-1"))
    assert echoed[0].labels == {"q": "module=if_mib&target=pdu-1"}


async def test_https_with_ca_file_or_insecure(prom_edge_server, tls_cert):
    base = f"prometheus+https://{prom_edge_server.https}/edge_last"
    for url in (f"{base}?ca_file={tls_cert.cert}", f"{base}?insecure=1"):
        readings = await collect(desc(url))
        assert [(r.metric_id, r.value) for r in readings] == [("prom_edge_last", 11)]
    with pytest.raises(FetchError, match="https://.*certificate"):
        await collect(desc(base))


async def test_basic_auth(prom_edge_server):
    url = f"prometheus://{BASIC}@{prom_edge_server.http}/edge_last?path=/basic/metrics"
    assert [r.value for r in await collect(desc(url))] == [11]
    wrong = f"prometheus://prom:wrong-pass@{prom_edge_server.http}/?path=/basic/metrics"
    with pytest.raises(FetchError, match="HTTP 401 Unauthorized") as failure:
        await collect(desc(wrong))
    assert "wrong-pass" not in str(failure.value)
    with pytest.raises(FetchError, match="HTTP 401"):
        await collect(desc(f"prometheus://{prom_edge_server.http}/?path=/basic/metrics"))


async def test_bearer_token_file(prom_edge_server, tmp_path):
    base = f"prometheus://{prom_edge_server.http}/edge_last?path=/bearer/metrics&bearer_file="
    assert [r.value for r in await collect(desc(base + str(prom_edge_server.bearer_file)))] == [11]
    with pytest.raises(FetchError, match="HTTP 401"):
        await collect(desc(base + str(prom_edge_server.wrong_bearer_file)))
    with pytest.raises(FetchError, match="cannot read bearer_file"):
        await collect(desc(base + str(tmp_path / "missing")))


async def test_timeout_500_and_redirect_raise(prom_edge_server):
    base = f"prometheus://{prom_edge_server.http}/"
    with pytest.raises(FetchError, match=r"/slow/metrics: no complete answer within 0.3 s"):
        await asyncio.wait_for(collect(desc(base + "?path=/slow/metrics"), timeout=0.3), 30)
    with pytest.raises(FetchError, match=r"/error/metrics: HTTP 500 Internal Server Error"):
        await collect(desc(base + "?path=/error/metrics"))
    with pytest.raises(FetchError, match="HTTP 302 Found to /metrics .redirects are not followed"):
        await collect(desc(base + "?path=/redirect/metrics"))


# --- URLs -----------------------------------------------------------------------------------

def test_target_key_groups_by_exporter_not_by_names():
    key = prometheus.target_key(desc("prometheus://u:pw@Host:9100/a-b"))
    assert key == prometheus.target_key(desc("prometheus://u:pw@host:9100/c"))
    assert key.url == "http://host:9100/metrics"
    assert "pw" not in repr(key) and "pw" not in str(key)
    others = ["prometheus://u:other@host:9100/", "prometheus://host:9100/",
              "prometheus+https://u:pw@host:9100/", "prometheus://u:pw@host:9101/",
              "prometheus://u:pw@host:9100/?path=/other", "prometheus://u:pw@host:9100/?x=1",
              "prometheus://host:9100/?bearer_file=/t"]
    assert all(prometheus.target_key(desc(url)) != key for url in others)
    assert prometheus.target_key(desc("prometheus+https://h/")).url == "https://h:443/metrics"


def test_registered_schemes():
    for url in ("prometheus://h:9100/", "prometheus+https://h/"):
        protocol, key = protocols.target_key(desc(url))
        assert (protocol, key) == ("prometheus", prometheus.target_key(desc(url)))
        assert isinstance(protocols.open_collector(protocol, key, 1.0),
                          prometheus.PrometheusCollector)


@pytest.mark.parametrize(("url", "message"), [
    ("prometheus:///", "no host"),
    ("prometheus://h:99999/", "invalid port"),
    ("prometheus://h:1/node_load1-bad.name", "invalid Prometheus metric name 'bad.name'"),
    ("prometheus://h:1/?bearer_file=token", "bearer_file must be an absolute path"),
    ("prometheus://h:1/?ca_file=/ca.pem", "only apply to https"),
    ("prometheus+https://h:1/?insecure=maybe", "insecure must be"),
    ("prometheus://u:p@h:1/?bearer_file=/t", "not both"),
    ("prometheus://h:1/?path=metrics", "path must start with '/'"),
    ("prometheus://h:1/?path=/a&path=/b", "given twice"),
    ("prometheus://h:1/#frag", "fragment"),
    ("http://h:1/", "not a Prometheus URL scheme"),
])
def test_invalid_urls(url, message):
    with pytest.raises(ValueError, match=message):
        prometheus.target_key(desc(url))


# --- parser ---------------------------------------------------------------------------------

def _outcome(parse, line):
    try:
        name, labels, value, timestamp = parse(line)
    except ValueError:
        return "error"
    return name, labels, "nan" if math.isnan(value) else value, timestamp


def test_fast_path_agrees_with_prometheus_client(node_exporter, client_exporter):
    """Every line the strict pattern reads must read the same through prometheus_client."""
    texts = [EDGE_EXPOSITION]
    for address in (node_exporter.address, client_exporter):
        with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as resp:
            texts.append(resp.read().decode())
    extra = ['a{b="x=",c="y"} 1', 'a{b="}"} 2', 'a{__b="1"} 3', 'a{b="1",} 4', "a 1_0",
             "a 1 2 3", "a nan", "a -Inf -5", 'a{b="1"}5', "a{} 6", 'a{b="1"c="2"} 7',
             'a{b="v,__w"} 8', "a 0x10", "a 1e3 1700000000000"]
    lines = [line.strip() for text in texts for line in text.split("\n")] + extra
    lines = [line for line in lines if line and not line.startswith("#")]
    assert len(lines) > 500
    for line in lines:
        assert _outcome(prometheus.parse_line, line) == _outcome(
            prometheus.library_parse_line, line), line


# --- hostile expositions ----------------------------------------------------------------

GOOD_SERIES = "".join(f'good_series{{i="{i}"}} {i}\n' for i in range(1000))


@pytest.mark.parametrize("stamp", ["inf", "+Inf", "-inf", "1e999", "-1e999", "nan",
                                   "99999999999999999999999"])
async def test_a_non_finite_timestamp_skips_its_line_not_the_scrape(prom_edge_server, stamp):
    path = f"/badstamp-{abs(hash(stamp))}/metrics"
    lines = GOOD_SERIES.splitlines(keepends=True)
    prom_edge_server.bodies[path] = "".join([*lines[:500], f"bad_stamp 1 {stamp}\n",
                                             *lines[500:]])
    url = f"prometheus://{prom_edge_server.http}/?path={path}"
    collector = prometheus.open_collector(prometheus.target_key(desc(url)), 5.0)
    try:
        readings = await collector.collect([desc(url)])
        assert collector.malformed_lines == 1
    finally:
        await collector.close()
    assert len(readings) == 1000 and {r.metric_id for r in readings} == {"prom_good_series"}


def test_duplicate_lines_are_kept_once_and_counted():
    text = ('dup{a="1",b="2"} 1\n'
            'dup{b="2",a="1"} 2\n'  # the same series, labels in another order
            'dup{a="1",b="2"} 3 1609452000000\n'  # another time: a sample of its own
            'dup{a="1",b="2"} 4 1609452000000\n'
            'dup{a="1"} 5\n')
    exposition = prometheus.parse_exposition(text)
    assert [(s.labels, s.value) for s in exposition.samples] == [
        ({"a": "1", "b": "2"}, 1.0), ({"a": "1", "b": "2"}, 3.0), ({"a": "1"}, 5.0)]
    assert (exposition.duplicates, exposition.malformed) == (2, 0)


async def test_duplicate_lines_stored_once_counted_by_the_collector(prom_edge_server, caplog):
    prom_edge_server.bodies["/dups/metrics"] = GOOD_SERIES * 2
    url = f"prometheus://{prom_edge_server.http}/?path=/dups/metrics"
    collector = prometheus.open_collector(prometheus.target_key(desc(url)), 5.0)
    try:
        with caplog.at_level(logging.WARNING, logger="kwollect.protocols.prometheus"):
            readings = await collector.collect([desc(url)])
        assert collector.duplicate_lines == 1000
    finally:
        await collector.close()
    assert len(by_series(readings)) == 1000
    assert "skipped 1000 line(s) repeating a series and time" in caplog.text


async def test_an_answer_over_max_bytes_is_refused_with_the_option_named(prom_edge_server):
    prom_edge_server.bodies["/big/metrics"] = GOOD_SERIES * 3  # about 60 KB
    url = f"prometheus://{prom_edge_server.http}/?path=/big/metrics&max_bytes=50000"
    with pytest.raises(FetchError, match=r"answer longer than 50000 bytes \(max_bytes\)"):
        await collect(desc(url))
    readings = await collect(desc(url.replace("max_bytes=50000", "max_bytes=100000")))
    assert len(readings) == 1000  # and the three copies of each line counted once
    prom_edge_server.bodies["/noline/metrics"] = "7" * (17 << 20)  # beyond the default
    with pytest.raises(FetchError, match="longer than 16777216 bytes"):
        await collect(desc(f"prometheus://{prom_edge_server.http}/?path=/noline/metrics"))
    with pytest.raises(ValueError, match=r"max_bytes must be an integer in 1\.\."):
        prometheus.target_key(desc(f"prometheus://{prom_edge_server.http}/?max_bytes=-1"))


def test_a_line_too_long_is_malformed_without_parsing():
    text = "x" * (prometheus.MAX_LINE_CHARS + 1) + "\nok 1\n"
    exposition = prometheus.parse_exposition(text)
    assert [s.name for s in exposition.samples] == ["ok"] and exposition.malformed == 1
    number, line, reason = exposition.errors[0]
    assert number == 1 and len(line) < 300 and "longer than" in reason


def test_fuzzed_expositions_never_raise_and_account_for_every_line():
    """2,000 mutations of the edge exposition (seeded): a bad line costs that line only."""
    rng = random.Random(16)
    pieces = ["{", "}", '"', "\\", "=", ",", " ", "\t", "#", "\n", "\x00", "\u2028", "e999",
              "inf", "-", "NaN", "1e-999", "9" * 30, "_", "le", "__name__", "\udc80", "é"]
    base = EDGE_EXPOSITION
    for _ in range(2000):
        text = list(base)
        for _ in range(rng.randint(1, 12)):
            where = rng.randrange(len(text))
            if rng.random() < 0.5:
                text[where] = rng.choice(pieces)
            else:
                del text[where]
        mutated = "".join(text)
        exposition = prometheus.parse_exposition(mutated)
        lines = [line.strip() for line in mutated.split("\n")]
        counted = sum(1 for line in lines if line and line[0] != "#")
        assert len(exposition.samples) + exposition.malformed + exposition.duplicates == counted
        for sample in exposition.samples:
            assert sample.timestamp_us is None or abs(sample.timestamp_us) < 1 << 63
