"""Retention benchmark: what kwollect.apply_retention() costs to drop old raw samples, per
storage, and how long it holds its locks (until maintain() commits).

Starts a private cluster (TimescaleDB preloaded where installed) and, for stock PostgreSQL
and TimescaleDB, a database holding DEVICES devices x 10 metrics at 1 Hz over two 6-hour
ranges (partitions or chunks) of January 2025.  The first range is compacted (stock) or
compressed (TimescaleDB), the second left raw.  The summary watermarks are set by hand (the
summaries' own cost is in benchmarks/summary.py), first to the end of the first range, then
past the second, with retention_days = 30: each apply_retention() call then drops one range,
timed from the client in its own transaction (the locks are held until it commits), with
the server CPU of its backend (no parallel workers).

Usage: nice -n 10 .venv/bin/python benchmarks/retention.py [--devices 20]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kwollect.dev.devcluster import PrivateCluster, missing_extension_reason  # noqa: E402
from kwollect.store.setupdb import DEFAULTS, setup  # noqa: E402

START = datetime(2025, 1, 6, tzinfo=UTC)
METRICS = 10


def backend_cpu_s(pid: int) -> float:
    """User + system CPU of the backend `pid`, from /proc (the cluster runs on this host)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


async def measure(cluster: PrivateCluster, storage: str, devices: int) -> list[str]:
    name = f"retention_{storage}"
    conf = {**DEFAULTS, "db_host": cluster.socket_dir, "db_port": cluster.port,
            "kwollect_password": "bench-writer", "kwollect_db_name": name,
            "chunk_interval_hour": 6, "timescaledb": "on" if storage == "timescaledb" else "off"}
    await setup(conf)
    conn = await asyncpg.connect(cluster.dsn(database=name))
    try:
        await conn.execute("SELECT kwollect.series_ids(array_agg('node-' || d), "
                           "array_agg('m' || m), array_agg('{}'::jsonb)) "
                           "FROM generate_series(1, $1) d, generate_series(1, $2) m",
                           devices, METRICS)
        await conn.execute("SELECT kwollect.ensure_partitions(ARRAY[$1::timestamptz, "
                           "$1::timestamptz + interval '6 hours'])", START)
        t0 = time.perf_counter()
        await conn.execute(
            "INSERT INTO kwollect.samples (ts, value, series_id) "
            "SELECT $1::timestamptz + s * interval '1 second' "
            "+ floor(random() * 20) * interval '1 millisecond', "
            "round((100 + random() * 270)::numeric, 1)::float8, series_id "
            "FROM generate_series(0, 12 * 3600 - 1) s, kwollect.series", START)
        rows = await conn.fetchval("SELECT count(*) FROM kwollect.samples")
        print(f"{storage}: {rows:,} rows generated in {time.perf_counter() - t0:.0f} s",
              flush=True)
        if storage == "timescaledb":
            await conn.execute(
                "SELECT public.compress_chunk(format('%I.%I', chunk_schema, chunk_name)) "
                "FROM timescaledb_information.chunks WHERE hypertable_name = 'samples' "
                "AND range_start = $1::timestamptz", START)
        else:
            await conn.execute("SELECT kwollect.compact_partition(name) FROM kwollect.partitions "
                               "WHERE range_start = $1::timestamptz", START)
        await conn.execute("VACUUM ANALYZE")
        await conn.execute("UPDATE kwollect.settings SET value = '30' "
                           "WHERE key = 'retention_days'")
        # one process: the backend's CPU is then all of the call's (count(*) of a raw
        # partition would otherwise be shared with parallel workers)
        await conn.execute("SET max_parallel_workers_per_gather = 0")
        pid = conn.get_server_pid()
        lines = []
        for kind, covered in (("compressed" if storage == "timescaledb" else "compacted",
                               "$1::timestamptz + interval '6 hours'"),
                              ("raw", "$1::timestamptz + interval '12 hours'")):
            await conn.execute(f"UPDATE kwollect.summary_state SET watermark = {covered}, "  # noqa: S608
                               f"rollup_watermark = {covered}", START)
            cpu0, t0 = backend_cpu_s(pid), time.perf_counter()
            async with conn.transaction():
                done = json.loads(await conn.fetchval("SELECT kwollect.apply_retention()"))
            held = time.perf_counter() - t0
            cpu = backend_cpu_s(pid) - cpu0
            lines.append(f"| {storage} | {kind} | {done['rows']:,} | {held * 1000:,.0f} ms "
                         f"| {cpu * 1000:,.0f} ms |")
        return lines
    finally:
        await conn.close()


async def run(args: argparse.Namespace) -> None:
    cluster = PrivateCluster(settings={"shared_buffers": "1GB", "work_mem": "64MB",
                                       "maintenance_work_mem": "512MB", "max_wal_size": "10GB",
                                       "autovacuum": "off"}, preload=("timescaledb",))
    storages = ["stock"] + (["timescaledb"] if cluster.preloaded else [])
    if not cluster.preloaded:
        print(f"TimescaleDB left out: {missing_extension_reason('timescaledb')}")
    cluster.start()
    try:
        lines = [line for storage in storages
                 for line in await measure(cluster, storage, args.devices)]
    finally:
        cluster.destroy()
    print("| storage | range dropped | rows | apply_retention() until commit | backend CPU |")
    print("|---|---|---|---|---|")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=20)
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
