"""A small Python client for kwollect's HTTP API (kwollect-api or PostgREST).

Rows are streamed: `get_metrics` reads the API's NDJSON output line by line, so a job of
millions of samples never sits in memory unless the caller collects it (`dataframe` does,
with pandas when installed: `pip install 'kwollect-pg[client]'`). Only the standard
library's HTTP client is used, so an experimenter's notebook needs nothing beyond orjson,
which kwollect already depends on.

    from kwollect.client import Client
    api = Client("http://kwollect.site:3000")
    for row in api.get_metrics(job_id=1234, metrics="bmc_node_power_watt"):
        print(row["timestamp"], row["device_id"], row["value"])
"""

from __future__ import annotations

import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Iterator, Mapping
from datetime import datetime
from typing import IO, Any

import orjson

from kwollect.errors import KwollectError

FORMATS = {"json": "application/json", "ndjson": "application/x-ndjson", "csv": "text/csv"}


class ApiCallError(KwollectError):
    """The API refused a call: its HTTP status, PostgREST-style code, message and hint."""

    def __init__(self, status: int, code: str, message: str, hint: str | None = None) -> None:
        self.status, self.code, self.message, self.hint = status, code, message, hint
        text = (f"HTTP {status}: " if status else "") + message + (f" ({hint})" if hint else "")
        super().__init__(text)


def _param(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, (list, tuple, set)):
        return ",".join(str(v) for v in value)
    return str(value)


def query_string(params: Mapping[str, Any]) -> str:
    """URL parameters of an API call; None values are left out, lists are comma-joined."""
    return urllib.parse.urlencode({k: _param(v) for k, v in params.items() if v is not None})


class Client:
    """Calls `/rpc/<function>` of one API server; `token` is a JWT (needed to insert)."""

    def __init__(self, url: str = "http://localhost:3000", token: str | None = None,
                 timeout: float = 300.0) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout

    def open(self, function: str, params: Mapping[str, Any] | None = None,
             fmt: str = "ndjson", body: bytes | None = None) -> IO[bytes]:
        """The streaming HTTP response of one call; ApiCallError when it is refused."""
        url = f"{self.url}/rpc/{urllib.parse.quote(function)}"
        if params:
            url += "?" + query_string(params)
        headers = {"Accept": FORMATS[fmt]}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        if body is not None:
            headers["Content-Type"] = "application/json"
        request = urllib.request.Request(url, data=body, headers=headers)
        try:
            response: IO[bytes] = urllib.request.urlopen(request, timeout=self.timeout)  # noqa: S310
        except urllib.error.HTTPError as exc:
            raise _api_error(exc) from None
        except urllib.error.URLError as exc:
            raise ApiCallError(0, "connect", f"cannot reach {self.url}: {exc.reason}") from None
        return response

    def rows(self, function: str, **params: Any) -> Iterator[dict[str, Any]]:
        """The rows of a set-returning function, one dict at a time."""
        with self.open(function, params, "ndjson") as response:
            for line in response:
                if line.strip():
                    yield orjson.loads(line)

    def get_metrics(self, *, job_id: int | None = None, devices: Iterable[str] | str | None = None,
                    nodes: Iterable[str] | str | None = None,
                    metrics: Iterable[str] | str | None = None,
                    start_time: datetime | str | float | None = None,
                    end_time: datetime | str | float | None = None,
                    summary: bool | str = False,
                    as_rate: bool | str = False) -> Iterator[dict[str, Any]]:
        """Samples as dicts with `timestamp` a timezone-aware datetime and `value` a float.
        summary: True (or "5min") for 5-minute summaries, "1h" for 1-hour rollups."""
        params = {"job_id": job_id, "devices": devices, "nodes": nodes, "metrics": metrics,
                  "start_time": start_time, "end_time": end_time,
                  "summary": summary or None, "as_rate": as_rate or None}
        for row in self.rows("get_metrics", **params):
            row["timestamp"] = datetime.fromisoformat(row["timestamp"])
            value = row["value"]
            row["value"] = float(value) if isinstance(value, str) else value
            yield row

    def dataframe(self, **params: Any) -> Any:
        """get_metrics as a pandas DataFrame (timestamp, device_id, metric_id, value, labels)."""
        try:
            import pandas as pd
        except ImportError as exc:
            raise KwollectError("dataframe() needs pandas: pip install pandas") from exc
        frame = pd.DataFrame.from_records(
            list(self.get_metrics(**params)),
            columns=["timestamp", "device_id", "metric_id", "value", "labels"])
        frame["timestamp"] = pd.to_datetime(frame["timestamp"], utc=True)
        return frame

    def job_metrics(self, job_id: int) -> dict[str, Any]:
        """get_job_metrics: the job's energy per node and in total, and site requests."""
        with self.open("get_job_metrics", {"job_id": job_id}, "json") as response:
            result: dict[str, Any] = orjson.loads(response.read())
        return result

    def available_metrics(self, *, devices: Iterable[str] | None = None,
                          job_id: int | None = None, at: datetime | None = None
                          ) -> list[tuple[str, str]]:
        """(device_id, metric_id) pairs with data in the minute before `at` (default now)."""
        query = {"devices": list(devices) if devices is not None else None,
                 "job_id": job_id, "at": at}
        return [(r["device_id"], r["metric_id"])
                for r in self.rows("available_metrics", **query)]

    def unknown_ids(self, devices: Iterable[str] | str | None = None,
                    metrics: Iterable[str] | str | None = None) -> list[tuple[str, str]]:
        """(kind, id) of the named devices and metrics under which nothing was ever stored."""
        return [(r["kind"], r["id"])
                for r in self.rows("unknown_ids", devices=devices, metrics=metrics)]

    def insert_metrics(self, rows: Iterable[Mapping[str, Any]]) -> int:
        """Insert samples (device_id, metric_id, value, optional timestamp and labels);
        needs a writer token. Returns the number of rows stored."""
        body = orjson.dumps(list(rows), default=_param)
        with self.open("insert_metrics", None, "json", body=body) as response:
            return len(orjson.loads(response.read()) or [])


def _api_error(exc: urllib.error.HTTPError) -> ApiCallError:
    raw = exc.read(65536)
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        body = {}
    if not isinstance(body, dict):
        body = {}
    message = str(body.get("message") or raw.decode("utf-8", "replace").strip() or exc.reason)
    return ApiCallError(exc.code, str(body.get("code", "")), message, body.get("hint"))
