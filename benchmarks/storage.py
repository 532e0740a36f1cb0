"""Storage benchmark: ingest rows/s, bytes per sample and get_metrics time for a job.

Starts its own private PostgreSQL cluster, sets kwollect up in it, loads Kwollect-shaped
data (DEVICES devices x 10 metrics at 1 Hz with 0-19 ms jitter, 2 of the 10 metrics with an
alias label, as in shared/notes/timescaledb-anchor.md) and prints:

- ingest through the collectors' write path: binary COPY of (ts, value, series_id) straight
  into kwollect.samples, CONNECTIONS concurrent streams of BATCH rows;
- ingest through COPY into the `metrics` view (the reference-compatible path);
- bytes per sample on disk (heap + index + TOAST of every samples partition);
- api.get_metrics for a 20-node, 2-hour job with 10 metrics per node (1.44 M rows),
  warm, server side (count) and streamed to the client (COPY ... TO STDOUT).

Usage: .venv/bin/python benchmarks/storage.py [--hours 2] [--devices 200]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import random
import resource
import struct
import time
from datetime import UTC, datetime, timedelta

import asyncpg

from kwollect.dev.devcluster import PrivateCluster
from kwollect.store.setupdb import DEFAULTS, setup

METRICS = ["bmc_node_power_watt", "wattmetre_power_watt", "pdu_outlet_power_watt",
           "prom_node_network_receive_bytes_total", "prom_node_network_transmit_bytes_total",
           "prom_node_disk_read_bytes_total", "bmc_temp_cpu_celsius", "bmc_fan_speed_rpm",
           "bmc_psu_input_voltage_volt", "prom_node_memory_MemTotal_bytes"]
START = datetime(2025, 1, 6, tzinfo=UTC)
PG_EPOCH_US = 946_684_800_000_000
ROW = struct.Struct(">hiqidii")
HEADER = b"PGCOPY\n\xff\r\n\x00" + struct.pack(">ii", 0, 0)
TRAILER = struct.pack(">h", -1)


def labels_for(device: int, metric: int) -> str:
    if metric == 1:
        return f'{{"_device_alias": "wattmetre1-port{device}"}}'
    if metric == 2:
        return f'{{"_device_alias": "pdu-{device // 24}-port{device % 24}"}}'
    return "{}"


def encode_second(second: int, ids: list[list[int]], rng: random.Random) -> bytes:
    """One second of samples of every series, as binary COPY rows."""
    base_us = int(START.timestamp() * 1e6) + second * 1_000_000 - PG_EPOCH_US
    out = bytearray()
    for per_device in ids:
        ts = base_us + rng.randrange(20_000) // 1000 * 1000
        for metric, sid in enumerate(per_device):
            value = 100.0 + rng.randrange(2700) / 10 if metric < 3 else float(second * 1000 + sid)
            out += ROW.pack(3, 8, ts, 8, value, 4, sid)
    return bytes(out)


async def ingest_write_path(dsn: str, ids: list[list[int]], seconds: int, batch_s: int,
                            connections: int) -> tuple[float, float]:
    """Returns (rows/s wall, client CPU seconds spent encoding)."""
    rng = random.Random(42)
    queue: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=connections * 2)
    encode_cpu = 0.0

    async def produce() -> None:
        nonlocal encode_cpu
        for first in range(0, seconds, batch_s):
            t = time.process_time()
            chunk = HEADER + b"".join(encode_second(s, ids, rng)
                                      for s in range(first, min(first + batch_s, seconds)))
            encode_cpu += time.process_time() - t
            await queue.put(chunk + TRAILER)
        for _ in range(connections):
            await queue.put(None)

    async def consume() -> None:
        conn = await asyncpg.connect(dsn)
        await conn.execute("SELECT kwollect.ensure_partitions(ARRAY[$1::timestamptz, $2])",
                           START, START + timedelta(seconds=seconds))
        while (chunk := await queue.get()) is not None:
            await conn.copy_to_table("samples", schema_name="kwollect", source=io.BytesIO(chunk),
                                     columns=["ts", "value", "series_id"], format="binary")
        await conn.close()

    t0 = time.perf_counter()
    await asyncio.gather(produce(), *(consume() for _ in range(connections)))
    elapsed = time.perf_counter() - t0
    return len(ids) * len(METRICS) * seconds / elapsed, encode_cpu


async def ingest_view(dsn: str, rows: int) -> float:
    conn = await asyncpg.connect(dsn)
    start = START - timedelta(days=1)
    records = [(start + timedelta(milliseconds=10 * i), f"viewdev-{i % 50}", "view_metric",
                float(i), "{}") for i in range(rows)]
    t0 = time.perf_counter()
    await conn.copy_records_to_table("metrics", records=records,
                                     columns=["timestamp", "device_id", "metric_id", "value",
                                              "labels"])
    elapsed = time.perf_counter() - t0
    await conn.close()
    return rows / elapsed


async def bytes_per_sample(conn: asyncpg.Connection, rows: int) -> tuple[float, float, float]:
    await conn.execute("VACUUM ANALYZE kwollect.samples")
    await conn.execute("CHECKPOINT")
    heap, index, total = await conn.fetchrow(
        "SELECT sum(pg_relation_size(c.oid)), sum(pg_indexes_size(c.oid)), "
        "sum(pg_total_relation_size(c.oid)) FROM pg_inherits i JOIN pg_class c "
        "ON c.oid = i.inhrelid WHERE i.inhparent = 'kwollect.samples'::regclass")
    return heap / rows, index / rows, total / rows


async def query_times(conn: asyncpg.Connection, devices: str, hours: float) -> dict[str, float]:
    start = START.isoformat()
    end = (START + timedelta(hours=hours)).isoformat()
    count_sql = ("SELECT count(*) FROM api.get_metrics(devices => $1, start_time => $2, "
                 "end_time => $3)")
    copy_sql = "SELECT * FROM api.get_metrics(devices => $1, start_time => $2, end_time => $3)"
    await conn.execute("SET kwollect.max_rows = 0")
    results: dict[str, float] = {}
    for _ in range(2):  # warm the cache
        n = await conn.fetchval(count_sql, devices, start, end)
    t0 = time.perf_counter()
    for _ in range(3):
        await conn.fetchval(count_sql, devices, start, end)
    results["count_s"] = (time.perf_counter() - t0) / 3
    results["rows"] = n
    sink = _Sink()
    t0 = time.perf_counter()
    for _ in range(3):
        await conn.copy_from_query(copy_sql, devices, start, end, output=sink.write,
                                   format="csv")
    results["copy_s"] = (time.perf_counter() - t0) / 3
    return results


class _Sink:
    def __init__(self) -> None:
        self.size = 0

    async def write(self, data: bytes) -> None:
        self.size += len(data)


async def run(args: argparse.Namespace) -> None:
    cluster = PrivateCluster(settings={"shared_buffers": "2GB", "work_mem": "64MB",
                                       "maintenance_work_mem": "512MB", "max_wal_size": "20GB",
                                       "checkpoint_timeout": "30min"}).start()
    try:
        conf = {**DEFAULTS, "db_host": cluster.socket_dir, "db_port": cluster.port,
                "kwollect_password": "bench", "chunk_interval_hour": 6}
        await setup(conf)
        dsn = cluster.dsn(database="kwdb")
        conn = await asyncpg.connect(dsn)
        ids_flat = await conn.fetchval(
            "SELECT kwollect.series_ids($1, $2, $3::jsonb[])",
            [f"node-{d}" for d in range(1, args.devices + 1) for _ in METRICS],
            [m for _ in range(args.devices) for m in METRICS],
            [labels_for(d, m) for d in range(1, args.devices + 1) for m in range(len(METRICS))])
        ids = [ids_flat[i:i + len(METRICS)] for i in range(0, len(ids_flat), len(METRICS))]
        seconds = int(args.hours * 3600)
        rows = seconds * len(ids_flat)
        print(f"data: {args.devices} devices x {len(METRICS)} metrics x 1 Hz x {args.hours} h "
              f"= {rows:,} rows")
        cpu0 = resource.getrusage(resource.RUSAGE_SELF).ru_utime
        rate, encode_cpu = await ingest_write_path(dsn, ids, seconds, args.batch_seconds,
                                                   args.connections)
        client_cpu = resource.getrusage(resource.RUSAGE_SELF).ru_utime - cpu0
        print(f"write path (binary COPY into kwollect.samples, {args.connections} streams, "
              f"{args.batch_seconds} s batches): {rate:,.0f} rows/s; client CPU "
              f"{client_cpu:.1f} s ({encode_cpu:.1f} s encoding)")
        heap, index, total = await bytes_per_sample(conn, rows)
        print(f"bytes per sample: {total:.1f} (heap {heap:.1f}, index {index:.1f})")
        view_rate = await ingest_view(dsn, args.view_rows)
        print(f"COPY into the metrics view ({args.view_rows:,} rows): {view_rate:,.0f} rows/s")
        devices = ",".join(f"node-{d}" for d in range(1, 21))
        times = await query_times(conn, devices, args.hours)
        print(f"get_metrics, 20 nodes x {len(METRICS)} metrics x {args.hours} h "
              f"({times['rows']:,} rows), warm: {times['count_s']:.2f} s in SQL (count), "
              f"{times['copy_s']:.2f} s streamed as CSV to the client")
        await conn.close()
    finally:
        cluster.destroy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hours", type=float, default=2.0)
    parser.add_argument("--devices", type=int, default=200)
    parser.add_argument("--connections", type=int, default=2)
    parser.add_argument("--batch-seconds", type=int, default=5)
    parser.add_argument("--view-rows", type=int, default=200_000)
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
