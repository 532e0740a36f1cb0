"""`kwollect migrate` throughput, beside a plain copy of the same source table.

Starts a private PostgreSQL cluster holding both sides: a Kwollect 1.x source laid out as
kwollect-setup-db 1.3.1 creates it (a TimescaleDB hypertable with its compression settings
when TimescaleDB is installed, else the plain table plus the timestamp index TimescaleDB
would have created), loaded with ROWS rows of Kwollect shape (DEVICES devices x 10 metrics at
1 Hz), and a kwollect target.  It prints:

- `kwollect migrate` (JOBS workers, RANGE_MINUTES ranges): rows/s end to end;
- the baseline, a plain table-to-table copy of the same rows in one stream (binary
  `COPY (SELECT * FROM metrics) TO STDOUT` piped into `COPY ... FROM STDIN` of a table of
  the reference's shape without indexes, what a pg_dump | pg_restore of the data costs).

Then where a row's CPU goes, each stage alone in one stream over the whole span: the
source's read (its series per range, then its distinct rows sorted and mapped to series
ids as binary COPY), and the target's write of those bytes into kwollect.samples (in a
transaction rolled back).

Both sides share this machine's cores here; in a real migration the source is another host.
Besides rows/s it prints the CPU spent per row by the servers (every backend of the run, as
reaped by the postmaster) and by the client: on a machine shared with other work, CPU per
row is the stable figure, and 2 cores / CPU per row the rate of an idle 2-core machine.

Usage: .venv/bin/python benchmarks/migrate.py [--rows 2000000] [--jobs 2] [--range-minutes 2]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import resource
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import asyncpg

from kwollect.dev.devcluster import PrivateCluster, missing_extension_reason
from kwollect.migrate import source as src
from kwollect.migrate.command import MIGRATE_DEFAULTS, migrate
from kwollect.store.setupdb import DEFAULTS, setup

START = datetime(2023, 1, 2, tzinfo=UTC)
METRICS = [f"metric_{i}" for i in range(10)]
SOURCE_DDL = """
CREATE TABLE metrics ("timestamp" timestamptz DEFAULT now(), device_id text NOT NULL,
                      metric_id text NOT NULL, value double precision DEFAULT 'NaN',
                      labels jsonb DEFAULT '{}');
"""
PLAIN_TIME_INDEX = 'CREATE INDEX metrics_timestamp_idx ON metrics ("timestamp" DESC);'
HYPERTABLE = """
CREATE EXTENSION timescaledb;
SELECT create_hypertable('metrics', 'timestamp', chunk_time_interval => interval '6 hours');
"""
REFERENCE_INDEXES = """
CREATE INDEX metrics_device_idx ON metrics (device_id, "timestamp" DESC);
CREATE INDEX metrics_alias_idx ON metrics ((labels->>'_device_alias'), "timestamp" DESC)
    WHERE labels ? '_device_alias';
"""
COMPRESSION = """
ALTER TABLE metrics SET (timescaledb.compress,
                         timescaledb.compress_segmentby = 'device_id, metric_id, labels',
                         timescaledb.compress_orderby = '"timestamp" DESC');
"""


def csv_rows(devices: int, rows: int) -> bytes:
    out = io.StringIO()
    per_second = devices * len(METRICS)
    for i in range(rows):
        second, rest = divmod(i, per_second)
        device, metric = divmod(rest, len(METRICS))
        ts = START + timedelta(seconds=second, milliseconds=device % 20)
        labels = f'"{{""_device_alias"": ""node-{device}""}}"' if metric == 1 else "{}"
        out.write(f"{ts.isoformat()},node-{device},{METRICS[metric]},{(i % 9973) / 7!r},"
                  f"{labels}\n")
    return out.getvalue().encode()


def cluster_cpu(cluster: PrivateCluster) -> float:
    """CPU seconds of the postmaster's exited children (backends once their connection is
    closed) plus the client's own."""
    pid = int((cluster.datadir / "postmaster.pid").read_text().split()[0])
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    children = (int(fields[13]) + int(fields[14])) / os.sysconf("SC_CLK_TCK")
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return children + usage.ru_utime + usage.ru_stime


def client_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def plain_copy(source: asyncpg.Connection, target: asyncpg.Connection) -> float:
    await target.execute("CREATE TABLE plain_copy (\"timestamp\" timestamptz, device_id text, "
                         "metric_id text, value double precision, labels jsonb)")
    queue: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=16)

    async def chunks() -> AsyncIterator[bytes]:
        while (chunk := await queue.get()) is not None:
            yield chunk

    async def produce() -> None:
        await source.copy_from_query("SELECT * FROM metrics", output=queue.put, format="binary")
        await queue.put(None)

    t0 = time.perf_counter()
    await asyncio.gather(produce(), target.copy_to_table("plain_copy", source=chunks(),
                                                         format="binary"))
    return time.perf_counter() - t0


def server_cpu(cluster: PrivateCluster) -> float:
    """CPU seconds of the postmaster's exited children (backends and parallel workers)."""
    return cluster_cpu(cluster) - client_cpu()


class RolledBack(Exception):
    """Ends the target's measuring transaction."""


async def stages(cluster: PrivateCluster, rows: int) -> tuple[float, float]:
    """Server CPU per row of the source's read and of the target's write, each alone (the
    connections are closed after each stage, so that their CPU is counted)."""
    cpu0 = server_cpu(cluster)
    source = await src.connect(cluster.dsn(database="kw1x"), None)  # the command's settings
    target = await asyncpg.connect(cluster.dsn(database="kwdb"))
    chunks: list[bytes] = []
    try:
        lo = await source.fetchval('SELECT min("timestamp") FROM metrics')
        hi = await source.fetchval('SELECT max("timestamp") + interval \'1 second\' FROM metrics')
        groups = await source.fetch(src.RANGE_SERIES, lo, hi)
        ids = await target.fetchval(
            "SELECT kwollect.series_ids($1::text[], $2::text[], $3::jsonb[])",
            [g[0] for g in groups], [g[1] for g in groups], [g[2] for g in groups])

        async def keep(chunk: bytes) -> None:
            chunks.append(chunk)

        await source.copy_from_query(src.RANGE_COPY, [g[0] for g in groups],
                                     [g[1] for g in groups], [g[2] for g in groups], ids, lo, hi,
                                     output=keep, format="binary")
    finally:
        await source.close()
        await target.close()
    await asyncio.sleep(0.5)  # the backends exit and are reaped
    read = (server_cpu(cluster) - cpu0) / rows * 1e6

    async def replay() -> AsyncIterator[bytes]:
        for chunk in chunks:
            yield chunk

    cpu0 = server_cpu(cluster)
    target = await asyncpg.connect(cluster.dsn(database="kwdb"))
    try:
        async with target.transaction():
            await target.copy_to_table("samples", schema_name="kwollect", source=replay(),
                                       columns=["ts", "value", "series_id"], format="binary")
            raise RolledBack
    except RolledBack:
        pass
    finally:
        await target.close()
    await asyncio.sleep(0.5)
    return read, (server_cpu(cluster) - cpu0) / rows * 1e6


async def run(args: argparse.Namespace) -> None:
    hypertable = missing_extension_reason("timescaledb") is None and not args.plain
    # autovacuum off: its workers' CPU would be counted as the copies'
    cluster = PrivateCluster(settings={"shared_buffers": "1GB", "max_wal_size": "20GB",
                                       "checkpoint_timeout": "30min", "autovacuum": "off"},
                             preload=("timescaledb",) if hypertable else ()).start()
    try:
        conf = {**DEFAULTS, "db_host": cluster.socket_dir, "db_port": cluster.port,
                "kwollect_password": "bench"}
        await setup(conf)
        admin = await asyncpg.connect(cluster.dsn())
        await admin.execute("CREATE DATABASE kw1x")
        await admin.close()
        source = await asyncpg.connect(cluster.dsn(database="kw1x"))
        await source.execute(SOURCE_DDL + (HYPERTABLE if hypertable else PLAIN_TIME_INDEX)
                             + REFERENCE_INDEXES)
        t0 = time.perf_counter()
        await source.copy_to_table("metrics", source=io.BytesIO(csv_rows(args.devices, args.rows)),
                                   format="csv")
        if hypertable:
            await source.execute(COMPRESSION)
            if args.compress:
                await source.fetchval(
                    "SELECT count(compress_chunk(c)) FROM show_chunks('metrics') c")
        await source.execute("VACUUM ANALYZE metrics")
        kind = ("TimescaleDB hypertable" + (", chunks compressed" if args.compress else "")
                if hypertable else "plain table")
        print(f"source: {args.rows:,} rows, {kind}, loaded in {time.perf_counter() - t0:.0f} s")
        await source.close()
        await asyncio.sleep(1)  # the loading backend exits and is reaped before counting
        rate: dict[str, tuple[float, float, float]] = {}
        cpu0, client0 = cluster_cpu(cluster), client_cpu()
        source = await asyncpg.connect(cluster.dsn(database="kw1x"))
        target = await asyncpg.connect(cluster.dsn(database="kwdb"))
        elapsed = await plain_copy(source, target)
        await target.execute("DROP TABLE plain_copy")
        await source.close()
        await target.close()
        await asyncio.sleep(0.5)  # the backends exit and are reaped
        rate["baseline"] = (args.rows / elapsed, cluster_cpu(cluster) - cpu0,
                            client_cpu() - client0)
        out = io.StringIO()
        migrate_conf = {**MIGRATE_DEFAULTS, "db_host": cluster.socket_dir,
                        "db_port": cluster.port, "db_name": "kwdb", "db_user": "postgres",
                        "from": cluster.dsn(database="kw1x"), "final": True,
                        "jobs": args.jobs, "range_minutes": args.range_minutes}
        cpu0, client0 = cluster_cpu(cluster), client_cpu()
        t0 = time.perf_counter()
        await migrate(migrate_conf, out)
        elapsed = time.perf_counter() - t0
        await asyncio.sleep(0.5)
        rate["migrate"] = (args.rows / elapsed, cluster_cpu(cluster) - cpu0,
                           client_cpu() - client0)
        names = {"baseline": "baseline, plain table to table binary COPY, 1 stream",
                 "migrate": f"kwollect migrate, {args.jobs} workers, "
                            f"{args.range_minutes}-minute ranges"}
        for key, (rows_s, cpu, client) in rate.items():
            per_row = cpu / args.rows * 1e6
            print(f"{names[key]}: {rows_s:,.0f} rows/s; CPU {per_row:.2f} us/row "
                  f"(client {client / args.rows * 1e6:.2f}), i.e. {2e6 / per_row:,.0f} rows/s "
                  f"on 2 idle cores")
        print(out.getvalue().strip())
        read, write = await stages(cluster, args.rows)
        print(f"stages alone, server CPU per row: source read {read:.2f} us (series per range, "
              f"distinct rows sorted by series), target write {write:.2f} us (binary COPY into "
              f"kwollect.samples)")
        print(f"load average {os.getloadavg()[0]:.1f}")
    finally:
        cluster.destroy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--devices", type=int, default=200)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--range-minutes", type=int, default=2)
    parser.add_argument("--plain", action="store_true", help="plain table even with TimescaleDB")
    parser.add_argument("--compress", action="store_true", help="compress every chunk first")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
