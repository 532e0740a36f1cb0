"""Prometheus exporters: one scrape per exporter and period, shared by all its descriptions.

URL forms (``[...]`` is optional)::

    prometheus://[user:password@]host[:port]/[name1-name2-...][?options]
    prometheus+https://[user:password@]host[:port]/[name1-name2-...][?options]

- ``prometheus://`` scrapes over http (default port 80), ``prometheus+https://`` over https
  (default port 443); give the exporter's port (9100 for node_exporter).
- The path lists the metric names to keep, separated by ``-``; empty keeps every metric. A
  histogram or summary name (from its ``# TYPE`` line) also keeps its ``_bucket``, ``_sum``
  and ``_count`` samples.
- ``path=/custom/metrics`` scrapes that path instead of ``/metrics``.
- The text format (``text/plain;version=0.0.4``) is asked for; an OpenMetrics answer is an
  error (its timestamps are in seconds and would be misread).
- ``bearer_file``, ``ca_file``, ``insecure``, ``max_bytes`` (the largest answer read,
  16 MiB by default) and basic auth: see `http_common`. Any other
  query parameter is sent to the exporter (e.g. ``?module=if_mib&target=pdu-1`` for an
  snmp_exporter).

Several descriptions may name the same exporter (same scheme, host, port, path, query,
credentials and TLS options): it is scraped once per period and each description gets the
samples it selects, with its own ``device_id``, ``labels`` and ``scale_factor``.

Each sample is stored with ``metric_id = "prom_" + name`` and the exporter labels (strings)
merged over the description labels; empty label values are dropped (the exposition format
treats them as absent). The timestamp is the exposition timestamp when the line has one,
else the midpoint of the HTTP exchange.

``kwollect_custom{_metric_id="X", _timestamp="T"} V`` lines (e.g. written to node_exporter's
textfile directory) are stored as metric ``X`` (``prom_kwollect_custom`` without
``_metric_id``) at time ``T`` (epoch seconds), with label ``_metric_origin =
"prom_kwollect_custom"`` instead of ``_metric_id``/``_timestamp``. An unparseable
``_timestamp`` skips the line. ``scale_factor`` applies to every sample, custom ones included.

A sample whose time comes from the exporter (``_timestamp`` or an exposition timestamp) is
emitted only when its time differs from the one of the same series (metric id and labels)
in the previous scrape, so a static line is stored once, not at every scrape (a value
rewritten under the same time is not stored again); samples stamped with the scrape time
are emitted at every scrape.

A malformed line skips that line only (counted, and logged at most once a minute per
exporter): a timestamp that is not a finite number (``inf``, ``1e999``) or lies outside
years 1 to 9999, or a line over 65,536 characters, included.  A line repeating the series
(name and labels, in any order) and time of an earlier line of the same scrape is skipped
and counted (`PrometheusCollector.duplicate_lines`): one row per series and time.

Scrapes over 256 KiB are parsed in a worker thread (two at most), so that a large
exporter never holds back the polls of other targets; a poll that reaches its deadline
stops its worker within 1,000 lines.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import threading
from collections.abc import Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple
from urllib.parse import urlsplit

from prometheus_client.parser import text_string_to_metric_families

from kwollect.errors import KwollectError
from kwollect.logutil import RateLimitedLog, excerpt
from kwollect.model import MetricDescription, Reading, make_reading, midpoint_us
from kwollect.protocols.http_common import (
    FetchError,
    HttpClient,
    HttpTarget,
    http_target,
    read_http_url,
)
from kwollect.protocols.url import Option

SCHEMES = ("prometheus", "prometheus+https")

_ACCEPT = "text/plain;version=0.0.4"
_CUSTOM = "kwollect_custom"
_CUSTOM_ORIGIN = {"_metric_origin": "prom_kwollect_custom"}
_NAME_RE = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_FAMILY_SUFFIXES = frozenset({"bucket", "sum", "count"})

# Lines of the usual shape (legacy names, label values without backslash escapes, integer
# millisecond timestamp) are read by this strict pattern; every other line goes to
# prometheus_client's parser, which is the reference for what the pattern accepts
# (tests/test_prometheus.py checks that both agree).
_LABEL = r'[a-zA-Z_][a-zA-Z0-9_]*="[^"\\]*"'
_SIMPLE_LINE = re.compile(
    rf"([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{{((?:{_LABEL}(?:,{_LABEL})*,?)?)\}})?"
    r"[ \t]+([^ \t]+)(?:[ \t]+(-?[0-9]+))?")
_SIMPLE_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="([^"]*)"')

log = logging.getLogger(__name__)
_rlog = RateLimitedLog(log)
_PARSERS = ThreadPoolExecutor(max_workers=2, thread_name_prefix="kwollect-prometheus-parse")
"""Large scrapes are parsed here: two at a time at most, whatever the number of exporters."""


class _Cancelled(KwollectError):
    """The poll that wanted this scrape is gone (its deadline passed)."""


class Sample(NamedTuple):
    """One exposition line."""

    name: str
    family: str
    """The histogram/summary name for its _bucket/_sum/_count samples, else `name`."""
    labels: dict[str, str]
    value: float
    timestamp_us: int | None


class Exposition(NamedTuple):
    samples: list[Sample]
    errors: list[tuple[int, str, str]]
    """``(line number, line excerpt, reason)`` of the first malformed lines (`MAX_ERRORS`)."""
    malformed: int = 0
    """Malformed lines skipped, all of them."""
    duplicates: int = 0
    """Lines repeating a series and time already read in this exposition: skipped."""


MAX_LINE_CHARS = 65_536
"""A longer line is malformed without being parsed: its labels could never be stored (the
database keeps at most 2,000 bytes of labels per series)."""
MAX_ERRORS = 20
INLINE_BYTES = 256 << 10
"""Answers up to this size (about 4,000 lines, 10 ms of CPU) are parsed on the event loop;
larger ones in a worker thread (see `PrometheusCollector.collect`)."""
CANCEL_CHECK_LINES = 1_000
"""A worker parsing a scrape whose poll was cancelled stops within this many lines."""
_MIN_US, _MAX_US = -62_135_596_800_000_000, 253_402_300_799_999_999  # years 1 to 9999


def parse_line(line: str) -> tuple[str, dict[str, str], float, int | None]:
    """Parse one stripped sample line; raises ValueError when it is malformed."""
    match = _SIMPLE_LINE.fullmatch(line)
    if match is not None:
        name, label_text, value_text, ts_text = match.groups()
        pairs = _SIMPLE_LABEL.findall(label_text) if label_text else ()
        labels = dict(pairs)
        # "__" names are reserved: the library rejects them (a value holding ",__" only
        # costs a detour through the library).
        if ("_" not in value_text and len(labels) == len(pairs)
                and not (label_text and (label_text[:2] == "__" or ",__" in label_text))):
            timestamp_us = None if ts_text is None else _timestamp_us(int(ts_text) * 1000)
            return name, labels, float(value_text), timestamp_us
    return library_parse_line(line)


def _timestamp_us(timestamp_us: int) -> int:
    if not _MIN_US <= timestamp_us <= _MAX_US:
        raise ValueError("timestamp out of range (years 1 to 9999)")
    return timestamp_us


def library_parse_line(line: str) -> tuple[str, dict[str, str], float, int | None]:
    """Parse one sample line with prometheus_client; raises ValueError when malformed."""
    try:
        families = list(text_string_to_metric_families(line))
    except Exception as exc:  # odd input may raise more than ValueError: same meaning
        raise ValueError(str(exc) or type(exc).__name__) from exc
    if len(families) != 1 or len(families[0].samples) != 1:
        raise ValueError("not a sample line")
    sample = families[0].samples[0]
    timestamp = sample.timestamp
    if timestamp is not None:
        seconds = float(timestamp)
        if not math.isfinite(seconds):  # inf, -inf, 1e999: the line, not the scrape, is lost
            raise ValueError(f"timestamp is not a finite number: {excerpt(timestamp, 40)}")
        timestamp = _timestamp_us(round(seconds * 1_000_000))
    return sample.name, sample.labels, float(sample.value), timestamp


class _ExpositionParser:
    """Parses an exposition a slice of lines at a time, so that a worker can stop early."""

    def __init__(self, text: str) -> None:
        self.lines = text.split("\n")  # only \n ends a line (not U+2028)
        self.samples: list[Sample] = []
        self.errors: list[tuple[int, str, str]] = []
        self.malformed = 0
        self.duplicates = 0
        self._grouped: set[str] = set()
        self._seen: set[tuple[str, tuple[tuple[str, str], ...], int | None]] = set()

    def result(self) -> Exposition:
        return Exposition(self.samples, self.errors, self.malformed, self.duplicates)

    def _error(self, number: int, line: str, reason: str) -> None:
        self.malformed += 1
        if len(self.errors) < MAX_ERRORS:
            self.errors.append((number, excerpt(line), reason))

    def parse(self, start: int, stop: int) -> None:
        """Parse lines [start, stop) (0-based)."""
        samples, grouped, seen = self.samples, self._grouped, self._seen
        for number in range(start + 1, min(stop, len(self.lines)) + 1):
            line = self.lines[number - 1]
            if len(line) > MAX_LINE_CHARS:
                self._error(number, line, f"line longer than {MAX_LINE_CHARS} characters")
                continue
            line = line.strip()
            if not line:
                continue
            if line[0] == "#":
                words = line.split(None, 3)
                if (len(words) == 4 and words[1] == "TYPE"
                        and words[3] in ("histogram", "summary")):
                    grouped.add(words[2])
                continue
            try:
                name, labels, value, timestamp_us = parse_line(line)
            except (ValueError, OverflowError) as exc:
                self._error(number, line, excerpt(exc) or "malformed line")
                continue
            if "" in labels.values():
                labels = {key: val for key, val in labels.items() if val}
            key = (name, tuple(sorted(labels.items())), timestamp_us)
            if key in seen:  # the same series and time twice: one row, not two
                self.duplicates += 1
                continue
            seen.add(key)
            family = name
            if grouped:
                base, _, suffix = name.rpartition("_")
                if suffix in _FAMILY_SUFFIXES and base in grouped:
                    family = base
            samples.append(Sample(name, family, labels, value, timestamp_us))


def parse_exposition(text: str) -> Exposition:
    """Every well-formed sample of a text-format exposition; bad lines are listed, not fatal.

    A line repeating the series (name and labels) and time of an earlier line is skipped and
    counted in `duplicates`."""
    parser = _ExpositionParser(text)
    parser.parse(0, len(parser.lines))
    return parser.result()


def _names(desc: MetricDescription) -> frozenset[str] | None:
    """The metric names a description selects, None for all; ValueError if one is invalid."""
    path = urlsplit(desc.url).path.strip("/")
    if not path:
        return None
    names = frozenset(path.split("-"))
    for name in names:
        if not _NAME_RE.fullmatch(name):
            raise ValueError(f"invalid Prometheus metric name {name!r} in URL path")
    return names


def _path(text: str) -> str:
    if text.startswith("/"):
        return text
    raise ValueError("must start with '/'")


def target_key(desc: MetricDescription) -> HttpTarget:
    parts, options, forwarded = read_http_url(desc.url, SCHEMES, "Prometheus",
                                              (Option("path", _path),))
    if parts.fragment:
        raise parts.error("unexpected #fragment in Prometheus URL")
    _names(desc)
    return http_target(parts, parts.scheme == "prometheus+https",
                       options.get("path", "/metrics"), options, forwarded)


def open_collector(key: HttpTarget, timeout: float) -> PrometheusCollector:
    return PrometheusCollector(key, timeout)


class PrometheusCollector:
    """Scrapes one exporter and turns its samples into readings for each description."""

    def __init__(self, target: HttpTarget, timeout: float) -> None:
        self._client = HttpClient(target, timeout, "prometheus", {"Accept": _ACCEPT})
        self._where = f"prometheus {target}"
        self.malformed_lines = 0
        """Malformed lines skipped since the collector was opened."""
        self.duplicate_lines = 0
        """Lines skipped since the collector was opened for repeating a series and time."""
        self._names: dict[str, frozenset[str] | None] = {}
        self._stamped: dict[tuple[str, str, str], dict[Hashable, int]] = {}
        """Per description: last time of each series whose time the exporter gave."""

    async def collect(self, metrics: Sequence[MetricDescription]) -> list[Reading]:
        response = await self._client.get()
        if response.content_type == "application/openmetrics-text":
            # Its timestamps are seconds, not milliseconds: refuse rather than misdate.
            raise FetchError(f"{self._where}: answered OpenMetrics although {_ACCEPT} was "
                             "asked; only the Prometheus text format is supported")
        scrape_us = midpoint_us(response.start_ns, response.end_ns)
        if len(response.body) <= INLINE_BYTES:
            exposition, readings = self._build(response.body, metrics, scrape_us)
        else:
            # 100,000 lines parsed on the event loop held every other target's poll for
            # 0.3 s (0.9 s p99 skew, 3.4 % of their ticks missed); in a thread, the loop
            # gets the GIL back within sys.getswitchinterval() (5 ms) whenever it needs it.
            cancel = threading.Event()
            try:
                exposition, readings = await asyncio.get_running_loop().run_in_executor(
                    _PARSERS, self._build, response.body, metrics, scrape_us, cancel)
            except asyncio.CancelledError:
                cancel.set()  # the worker stops within CANCEL_CHECK_LINES lines
                raise
        self._report(exposition)
        return readings

    def _build(self, body: bytes, metrics: Sequence[MetricDescription], scrape_us: int,
               cancel: threading.Event | None = None) -> tuple[Exposition, list[Reading]]:
        """Parse a scrape and make the readings of each description (in a worker thread for
        large scrapes); raises _Cancelled once `cancel` is set."""
        parser = _ExpositionParser(body.decode("utf-8", "replace"))
        for start in range(0, len(parser.lines), CANCEL_CHECK_LINES):
            if cancel is not None and cancel.is_set():
                raise _Cancelled
            parser.parse(start, start + CANCEL_CHECK_LINES)
        exposition = parser.result()
        readings: list[Reading] = []
        for desc in metrics:
            if cancel is not None and cancel.is_set():
                raise _Cancelled
            readings.extend(self._readings(desc, exposition.samples, scrape_us))
        return exposition, readings

    def _report(self, exposition: Exposition) -> None:
        key = (self._where, "malformed")
        self.duplicate_lines += exposition.duplicates
        if exposition.duplicates:
            _rlog.warning((self._where, "duplicates"), "%s: skipped %d line(s) repeating a "
                          "series and time already in the scrape", self._where,
                          exposition.duplicates)
        if not exposition.malformed:
            _rlog.forget(key)
            return
        self.malformed_lines += exposition.malformed
        number, line, reason = exposition.errors[0]
        _rlog.warning(key, "%s: skipped %d malformed line(s), first at line %d %r: %s",
                      self._where, exposition.malformed, number, line, reason)

    def _readings(self, desc: MetricDescription, samples: Sequence[Sample],
                  scrape_us: int) -> list[Reading]:
        names = self._names.get(desc.url, ...)
        if names is ...:
            names = self._names[desc.url] = _names(desc)
        desc_key = (desc.device_id, desc.name, desc.url)
        previous = self._stamped.get(desc_key, {})
        stamped: dict[Hashable, int] = {}
        readings: list[Reading] = []
        for sample in samples:
            if names is not None and sample.name not in names and sample.family not in names:
                continue
            labels = sample.labels
            timestamp_us = sample.timestamp_us
            if sample.name == _CUSTOM:
                custom = self._custom(labels)
                if custom is None:
                    continue
                metric_id, labels, custom_us = custom
                timestamp_us = custom_us if custom_us is not None else timestamp_us
            else:
                metric_id = "prom_" + sample.name
            if timestamp_us is None:
                readings.append(make_reading(desc, scrape_us, sample.value, labels, metric_id))
                continue
            series = (metric_id, tuple(sorted(labels.items())))
            stamped[series] = timestamp_us
            if previous.get(series) != timestamp_us:
                readings.append(make_reading(desc, timestamp_us, sample.value, labels, metric_id))
        self._stamped[desc_key] = stamped
        return readings

    def _custom(self, labels: dict[str, str]) -> tuple[str, dict[str, str], int | None] | None:
        """(metric id, labels, time) of a kwollect_custom sample, None to skip it."""
        labels = dict(labels)
        metric_id = labels.pop("_metric_id", None) or "prom_kwollect_custom"
        stamp = labels.pop("_timestamp", None)
        labels.update(_CUSTOM_ORIGIN)
        if stamp is None:
            return metric_id, labels, None
        try:
            seconds = float(stamp)
            if not math.isfinite(seconds):
                raise ValueError("not a finite number")
        except ValueError:
            _rlog.warning((self._where, "custom_timestamp", metric_id),
                          "%s: kwollect_custom line for %r skipped: unparseable _timestamp %r",
                          self._where, metric_id, stamp)
            return None
        return metric_id, labels, round(seconds * 1_000_000)

    async def close(self) -> None:
        await self._client.close()
