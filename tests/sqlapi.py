"""Helpers shared by the SQL API tests: loading rows and calling api functions by name."""

from __future__ import annotations

import asyncio
import json
import time
from datetime import UTC, datetime, timedelta

import asyncpg

UTC = UTC
T0 = datetime(2021, 1, 1, 22, 0, tzinfo=UTC)

GET_METRICS_PARAMS = {"job_id": "integer", "nodes": "text", "devices": "text", "metrics": "text",
                      "start_time": "text", "end_time": "text", "summary": "boolean",
                      "as_rate": "text"}


async def load(conn: asyncpg.Connection, rows: list[tuple]) -> None:
    """COPY (timestamp, device_id, metric_id, value, labels) rows into the metrics view."""
    records = [(ts, dev, met, val, json.dumps(labels or {})) for ts, dev, met, val, labels in rows]
    await conn.copy_records_to_table(
        "metrics", records=records,
        columns=["timestamp", "device_id", "metric_id", "value", "labels"])


def series(device: str, metric: str, start: datetime, count: int, step_s: float,
           value=lambda i: float(i), labels: dict | None = None) -> list[tuple]:
    return [(start + timedelta(seconds=i * step_s), device, metric, value(i), labels)
            for i in range(count)]


async def get_metrics(conn: asyncpg.Connection, **params) -> list[dict]:
    """Call api.get_metrics with named, bound parameters; rows as dicts with parsed labels."""
    args = ", ".join(f"{name} => ${i}::{GET_METRICS_PARAMS[name]}"
                     for i, name in enumerate(params, 1))
    # parameter names come from the fixed GET_METRICS_PARAMS table; values are bound
    query = f"SELECT * FROM api.get_metrics({args})"  # noqa: S608
    rows = await conn.fetch(query, *params.values())
    return [{**dict(r), "labels": json.loads(r["labels"])} for r in rows]


def iso(ts: datetime) -> str:
    return ts.strftime("%Y-%m-%dT%H:%M:%S")


async def load_job(kwdb, rows: list[tuple], job_id: int, nodes: list[str], start: datetime,
                   stop: datetime | None = None) -> None:
    """Rows into metrics, and a job on `nodes` from start to stop (None: still running),
    as the writer role would store them."""
    writer = await kwdb.connect("kwuser")
    try:
        await load(writer, rows)
        await writer.executemany("INSERT INTO nodetime_per_job VALUES ($1, $2, $3, $4)",
                                 [(job_id, start, stop, node) for node in nodes])
    finally:
        await writer.close()


async def wait_for(condition, timeout: float = 60.0, step: float = 0.05):
    """Await `condition()` until it returns something true (returned), or TimeoutError."""
    deadline = time.monotonic() + timeout
    while True:
        result = await condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met")
        await asyncio.sleep(step)


async def settle_rollup(admin: asyncpg.Connection) -> None:
    """The summary and the rollup refreshed (as kwollect.maintain() does, without its
    compaction, which would change other tests' partitions) until the rollup covers every
    hour the 5-minute summary covers (each call works at most 30 s, a day at a time)."""
    for _ in range(50):
        await admin.execute("SELECT kwollect.refresh_summary()")
        await admin.execute("SELECT kwollect.refresh_rollup()")
        if await admin.fetchval(
                "SELECT rollup_watermark >= date_bin('1 hour', watermark, timestamptz 'epoch') "
                "FROM kwollect.summary_state"):
            return
    raise AssertionError("the rollup did not catch up with the summary")
