"""JSON over HTTP (Redfish BMCs and similar): one GET per URL and period, a JSONPath per metric.

URL forms (``[...]`` is optional)::

    json+http://[user:password@]host[:port]/path[?query]#<jsonpath>
    json+https://[user:password@]host[:port]/path[?query]#<jsonpath>
    json+https://[user:password@]host[:port]/path?jsonpath=<percent-encoded jsonpath>[&query]

For example ``json+https://admin:pw@bmc-1/redfish/v1/Chassis/1/Power#PowerControl[0].PowerConsumedWatts``.

- The JSONPath (RFC 9535, read by the python-jsonpath library in strict mode) is the URL
  fragment, taken literally, or the ``jsonpath`` query parameter, percent-decoded. A leading
  ``$`` may be left out (``PowerControl[0].X`` means ``$.PowerControl[0].X``).
- All descriptions with the same URL up to the JSONPath (and the same credentials and TLS
  options) share one GET per period; each applies its own JSONPath to the document.
- ``bearer_file``, ``ca_file``, ``insecure`` and basic auth: see `http_common`. Any other
  query parameter is sent to the server (e.g. Redfish ``$select``).
- Values go through `make_reading`: numbers and booleans are scaled, strings are stored as
  NaN with ``labels.value_str``. Matched ``null`` values and objects/arrays give no reading;
  when a JSONPath yields no value at all, a warning is logged (at most once a minute per
  metric).
- A singular JSONPath (only names and indexes) gives at most one reading, with the
  description's labels. Any other JSONPath (wildcard, slice, filter, ``..``) gives one
  reading per matched value, each labelled ``_jsonpath`` with the RFC 9535 normalized path
  of that value, e.g. ``$['Temperatures'][1]['ReadingCelsius']``; the label is there even
  when a single value matches, so a series keeps its identity as matches come and go.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from functools import lru_cache

import orjson
from jsonpath import JSONPath, JSONPathEnvironment, JSONPathError

from kwollect.logutil import RateLimitedLog
from kwollect.model import MetricDescription, Reading, make_reading, midpoint_us
from kwollect.protocols.http_common import (
    FetchError,
    HttpClient,
    HttpTarget,
    http_target,
    read_http_url,
)
from kwollect.protocols.url import Option, any_text

SCHEMES = ("json+http", "json+https")

log = logging.getLogger(__name__)
_rlog = RateLimitedLog(log)
_jsonpath_env = JSONPathEnvironment(strict=True)
_JSON_TYPES = {dict: "an object", list: "an array"}


_OPTIONS = (Option("jsonpath", any_text),)


def _jsonpath_text(url: str) -> str:
    parts, options, _ = read_http_url(url, SCHEMES, "JSON-over-HTTP", _OPTIONS)
    if parts.fragment and "jsonpath" in options:
        raise parts.error("JSONPath given twice: as #fragment and as jsonpath= option")
    path = (parts.fragment or options.get("jsonpath", "")).strip()
    if not path:
        raise parts.error("no JSONPath: end the URL with #<jsonpath> or add ?jsonpath=")
    if not path.startswith("$"):
        path = ("$" if path.startswith("[") else "$.") + path
    return path


@lru_cache(maxsize=4096)
def _query(url: str) -> tuple[JSONPath, bool]:
    """The compiled JSONPath of a metric URL and whether it is singular."""
    text = _jsonpath_text(url)
    try:
        query = _jsonpath_env.compile(text)
    except JSONPathError as exc:
        first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ValueError(f"invalid JSONPath {text!r}: {first_line}") from None
    if not isinstance(query, JSONPath):
        raise ValueError(f"unsupported JSONPath {text!r}: compound paths are not RFC 9535")
    return query, query.singular_query()


def target_key(desc: MetricDescription) -> HttpTarget:
    _query(desc.url)
    parts, options, forwarded = read_http_url(desc.url, SCHEMES, "JSON-over-HTTP", _OPTIONS)
    return http_target(parts, parts.scheme == "json+https", parts.path or "/", options,
                       forwarded)


def open_collector(key: HttpTarget, timeout: float) -> JsonCollector:
    return JsonCollector(key, timeout)


class JsonCollector:
    """GETs one JSON document per period and applies each description's JSONPath to it."""

    def __init__(self, target: HttpTarget, timeout: float) -> None:
        self._client = HttpClient(target, timeout, "json", {"Accept": "application/json"})
        self._where = f"json {target}"

    async def collect(self, metrics: Sequence[MetricDescription]) -> list[Reading]:
        response = await self._client.get()
        timestamp_us = midpoint_us(response.start_ns, response.end_ns)
        try:
            document = orjson.loads(response.body)
        except orjson.JSONDecodeError as exc:
            raise FetchError(f"{self._where}: invalid JSON: {exc}") from exc
        readings: list[Reading] = []
        for desc in metrics:
            query, singular = _query(desc.url)
            matched: str | None = "nothing"
            for match in query.finditer(document):
                value = match.obj
                if value is None or isinstance(value, dict | list):
                    if matched is not None:
                        matched = "null" if value is None else _JSON_TYPES[type(value)]
                    continue
                matched = None
                labels = None if singular else {"_jsonpath": match.path}
                readings.append(make_reading(desc, timestamp_us, value, labels))
            fault_key = (self._where, desc.device_id, desc.name)
            if matched is None:
                _rlog.forget(fault_key)
            else:
                _rlog.warning(fault_key, "%s: no value for metric %s of device %s: its JSONPath "
                              "matched %s", self._where, desc.name, desc.device_id, matched)
        return readings

    async def close(self) -> None:
        await self._client.close()
