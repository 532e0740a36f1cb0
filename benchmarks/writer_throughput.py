"""Writer throughput: rows/s sustained through Writer.submit -> PostgreSQL, and its CPU cost.

Starts its own private PostgreSQL cluster (as benchmarks/storage.py does), sets kwollect up
in it and feeds a `kwollect.store.writer.Writer` (logged in as the writer role over TCP) with
Kwollect-shaped readings: DEVICES devices x 10 metrics at 1 Hz with 0-19 ms jitter, 2 of
the 10 metrics with an alias label, submitted one device at a time (as a poller does).
The readings are built beforehand, so the figures are the writer's alone.  The feeder goes
as fast as the writer takes rows (it yields while more than two batches per connection
are queued), or at --rate rows/s.  Prints:

- rows/s from the first submit until the last row is committed;
- writer CPU (this process: submit, batching, encoding, asyncpg) per 10,000 rows, and
  PostgreSQL CPU per 10,000 rows (the postmaster and its children, from /proc);
- with --profile, where the writer's time goes (cProfile, top functions by own time);
- with --compare-encoders, client CPU and rows/s of the hand-encoded binary COPY the writer
  uses against asyncpg's copy_records_to_table with datetime objects.

Usage: .venv/bin/python benchmarks/writer_throughput.py [--rows 3000000] [--devices 200]
       [--batch-rows 10000] [--connections 2] [--rate 0] [--profile] [--compare-encoders]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import os
import pstats
import random
import resource
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import asyncpg

from kwollect.dev.devcluster import PrivateCluster
from kwollect.model import Reading
from kwollect.store.setupdb import DEFAULTS, setup
from kwollect.store.writer import Batch, Writer, WriterOptions, us_to_datetime
from kwollect.store.writer.copy_encoders import samples_copy

METRICS = ["bmc_node_power_watt", "wattmetre_power_watt", "pdu_outlet_power_watt",
           "prom_node_network_receive_bytes_total", "prom_node_network_transmit_bytes_total",
           "prom_node_disk_read_bytes_total", "bmc_temp_cpu_celsius", "bmc_fan_speed_rpm",
           "bmc_psu_input_voltage_volt", "prom_node_memory_MemTotal_bytes"]
START_US = int(datetime(2025, 3, 3, tzinfo=UTC).timestamp()) * 1_000_000
PASSWORD = "bench"
TICKS = os.sysconf("SC_CLK_TCK")


def labels_for(device: int, metric: int) -> dict:
    if metric == 1:
        return {"_device_alias": f"wattmetre1-port{device}"}
    if metric == 2:
        return {"_device_alias": f"pdu-{device // 24}-port{device % 24}"}
    return {}


def build(devices: int, rows: int) -> list[list[Reading]]:
    """Per-device reading lists, one per device and second, in time order."""
    rng = random.Random(42)
    labels = [[labels_for(d, m) for m in range(len(METRICS))] for d in range(devices)]
    names = [f"node-{d + 1}" for d in range(devices)]
    out = []
    for second in range(rows // (devices * len(METRICS))):
        base = START_US + second * 1_000_000
        for d in range(devices):
            ts = base + rng.randrange(20_000) // 1000 * 1000
            out.append([Reading(ts, names[d], metric, 100.0 + rng.randrange(2700) / 10,
                                labels[d][m]) for m, metric in enumerate(METRICS)])
    return out


def cpu_self() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def cpu_postgres(postmaster: int, reaped: bool = False) -> float:
    """CPU seconds of the postmaster and its live children (the backends); with `reaped`,
    also its children that exited (parallel workers), which a read's plan may start."""
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(entry.name) == postmaster and reaped:
            total += sum(int(f) for f in fields[11:15])  # utime, stime, cutime, cstime
        elif int(entry.name) == postmaster or int(fields[1]) == postmaster:
            total += int(fields[11]) + int(fields[12])
    return total / TICKS


async def feed(writer: Writer, lists: list[list[Reading]], rate: float, high_water: int) -> None:
    loop = asyncio.get_running_loop()
    started = loop.time()
    sent = 0
    for i, readings in enumerate(lists):
        writer.submit(readings)
        sent += len(readings)
        if i % 50 == 0:
            if rate:
                ahead = started + sent / rate - loop.time()
                if ahead > 0:
                    await asyncio.sleep(ahead)
            while writer.stats()["queue_rows"] > high_water:
                await asyncio.sleep(0.001)


async def throughput(args: argparse.Namespace, kwargs: dict, postmaster: int) -> None:
    lists = build(args.devices, args.rows)
    total = sum(map(len, lists))
    options = WriterOptions(batch_max_rows=args.batch_rows, pool_size=args.connections,
                            queue_max_rows=max(200_000, 8 * args.batch_rows * args.connections))
    writer = Writer(kwargs, options)
    await writer.start()
    # warm-up: series ids and partitions, not measured
    writer.submit(lists[0])
    while writer.stats()["inserted"] < len(lists[0]):
        await asyncio.sleep(0.01)
    profiler = cProfile.Profile() if args.profile else None
    cpu0, pg0, t0 = cpu_self(), cpu_postgres(postmaster), time.perf_counter()
    if profiler:
        profiler.enable()
    await feed(writer, lists[1:], args.rate, 2 * args.batch_rows * args.connections)
    target = total
    while writer.stats()["inserted"] < target:
        await asyncio.sleep(0.005)
    if profiler:
        profiler.disable()
    elapsed = time.perf_counter() - t0
    cpu, pg = cpu_self() - cpu0, cpu_postgres(postmaster) - pg0
    rows = total - len(lists[0])
    stats = writer.stats()
    await writer.close()
    print(f"data: {args.devices} devices x {len(METRICS)} metrics, {rows:,} rows measured, "
          f"batches of {args.batch_rows}, {args.connections} connection(s)"
          + (f", paced at {args.rate:,.0f} rows/s" if args.rate else ", as fast as possible"))
    print(f"throughput: {rows / elapsed:,.0f} rows/s ({elapsed:.1f} s); mean COPY batch "
          f"latency {stats['copy_latency_avg_s'] * 1000:.0f} ms")
    print(f"writer CPU: {cpu / rows * 10_000 * 1000:.1f} ms per 10,000 rows "
          f"({cpu / elapsed:.0%} of a core); PostgreSQL CPU: {pg / rows * 10_000 * 1000:.1f} "
          f"ms per 10,000 rows ({pg / elapsed:.0%} of a core)")
    assert stats["dropped"] == 0 and stats["spooled"] == 0, stats
    if profiler:
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(14)
        print("where the writer's time goes (cProfile, own time):")
        print("\n".join(line for line in out.getvalue().splitlines()[6:] if line.strip()))


async def compare_encoders(args: argparse.Namespace, kwargs: dict) -> None:
    """Hand-encoded binary COPY (the writer's) against asyncpg's record encoder."""
    lists = build(args.devices, args.compare_rows)
    rows = [r for readings in lists for r in readings]
    writer = Writer(kwargs)
    await writer.start()
    writer.submit(rows[:len(METRICS) * args.devices])
    while writer.stats()["inserted"] < len(METRICS) * args.devices:
        await asyncio.sleep(0.01)
    await writer.close()
    conn = await asyncpg.connect(**kwargs)
    series = writer._series
    handles = series.handles_of(rows)
    batch = Batch(uuid.uuid4(), [r[0] for r in rows], [r[3] for r in rows], handles)
    sids = [series.sids[h] for h in handles]
    for name in ("hand-encoded binary COPY", "copy_records_to_table"):
        cpu0, t0 = cpu_self(), time.perf_counter()
        async with conn.transaction():
            if name.startswith("hand"):
                data = samples_copy(batch, series.sids)
                await conn.copy_to_table("samples", schema_name="kwollect",
                                         source=memoryview(data),
                                         columns=["ts", "value", "series_id"], format="binary")
            else:
                records = [(us_to_datetime(t), v, s)
                           for t, v, s in zip(batch.ts, batch.values, sids, strict=True)]
                await conn.copy_records_to_table("samples", schema_name="kwollect",
                                                 columns=["ts", "value", "series_id"],
                                                 records=records)
            cpu, elapsed = cpu_self() - cpu0, time.perf_counter() - t0
        print(f"{name}: {len(rows) / elapsed:,.0f} rows/s, client CPU "
              f"{cpu / len(rows) * 10_000 * 1000:.1f} ms per 10,000 rows")
    await conn.close()


async def run(args: argparse.Namespace) -> None:
    cluster = PrivateCluster(settings={"shared_buffers": "2GB", "work_mem": "64MB",
                                       "max_wal_size": "20GB",
                                       "checkpoint_timeout": "30min"}).start()
    try:
        conf = {**DEFAULTS, "db_host": cluster.socket_dir, "db_port": cluster.port,
                "kwollect_password": PASSWORD, "chunk_interval_hour": 6}
        await setup(conf)
        kwargs = {"host": "127.0.0.1", "port": cluster.port, "database": "kwdb",
                  "user": "kwuser", "password": PASSWORD}
        postmaster = int((cluster.datadir / "postmaster.pid").read_text().split()[0])
        await throughput(args, kwargs, postmaster)
        if args.compare_encoders:
            await compare_encoders(args, kwargs)
    finally:
        cluster.destroy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=3_000_000)
    parser.add_argument("--devices", type=int, default=200)
    parser.add_argument("--batch-rows", type=int, default=10_000)
    parser.add_argument("--connections", type=int, default=2)
    parser.add_argument("--rate", type=float, default=0.0, help="rows/s; 0: as fast as possible")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--compare-encoders", action="store_true")
    parser.add_argument("--compare-rows", type=int, default=500_000)
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
