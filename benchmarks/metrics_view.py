"""Writing through the `metrics` view against plain Kwollect-shaped tables, side by side.

Starts a private PostgreSQL cluster with a kwollect database and, in a second database, the
two tables a reference kwollector may write into:

- `bare`: the reference's `metrics` columns with no index at all (the issue's "plain table");
- `reference`: the table exactly as Kwollect 1.3.1's kwollect-setup-db lays it out on plain
  PostgreSQL (timestamp index as TimescaleDB creates it, metrics_device_idx,
  metrics_alias_idx): what a reference kwollector really writes into.

Each round writes ROWS rows of Kwollect shape (DEVICES devices x 5 metrics at 1 Hz, one
metric in five with an _device_alias label, a new time range each round) into each target,
in turn, by three statements: the reference kwollector's binary COPY (asyncpg
copy_records_to_table), a text COPY (psql \\copy, CSV), and multi-row INSERTs of 1,000
rows.  It prints the median rows/s and the server CPU per row (read from /proc for the
backend), which is robust to other load on the machine.

Then, for the binary COPY, where a row's cost goes (the ceiling of any trigger design):
kwollect.samples written directly with the series ids known (the storage's own cost, what
the collectors pay), the view with a row trigger that only returns NEW (the cheapest
INSTEAD OF trigger: rows dropped), the view with the row trigger parking rows but no
statement trigger, and the view as it is.  The trigger variants are swapped in inside a
transaction that is rolled back.

Usage: .venv/bin/python benchmarks/metrics_view.py [--rows 300000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import io
import json
import os
import statistics
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta

import asyncpg

from kwollect.dev.devcluster import PrivateCluster
from kwollect.store.setupdb import DEFAULTS, setup

COLUMNS = ["timestamp", "device_id", "metric_id", "value", "labels"]
METRICS = ["bmc_node_power_watt", "wattmetre_power_watt", "prom_node_load1",
           "bmc_temp_cpu_celsius", "prom_node_network_receive_bytes_total"]
START = datetime(2024, 3, 1, tzinfo=UTC)
REFERENCE_DDL = """
CREATE TABLE bare ("timestamp" timestamptz DEFAULT now(), device_id text NOT NULL,
                   metric_id text NOT NULL, value double precision DEFAULT 'NaN',
                   labels jsonb DEFAULT '{}');
CREATE TABLE reference (LIKE bare INCLUDING DEFAULTS);
CREATE INDEX reference_timestamp_idx ON reference ("timestamp" DESC);
CREATE INDEX metrics_device_idx ON reference (device_id, "timestamp" DESC);
CREATE INDEX metrics_alias_idx ON reference ((labels->>'_device_alias'), "timestamp" DESC)
    WHERE labels ? '_device_alias';
"""
INSERT_ROWS = 1000
ROW_TRIGGER_ONLY = """
CREATE OR REPLACE FUNCTION kwollect.metrics_insert_row() RETURNS trigger
LANGUAGE plpgsql AS $$ BEGIN RETURN NEW; END $$;
CREATE OR REPLACE FUNCTION kwollect.metrics_insert_statement() RETURNS trigger
LANGUAGE plpgsql AS $$ BEGIN RETURN NULL; END $$;
"""
NO_STATEMENT_TRIGGER = """
CREATE OR REPLACE FUNCTION kwollect.metrics_insert_statement() RETURNS trigger
LANGUAGE plpgsql AS $$ BEGIN RETURN NULL; END $$;
"""


def make_rows(devices: int, count: int, first_second: int) -> list[tuple]:
    rows = []
    per_second = devices * len(METRICS)
    for i in range(count):
        second, rest = divmod(i, per_second)
        device, metric = divmod(rest, len(METRICS))
        labels = {"_device_alias": f"node-{device}"} if metric == 1 else {}
        rows.append((START + timedelta(seconds=first_second + second, milliseconds=device % 20),
                     f"wattmetre1-port{device}" if metric == 1 else f"node-{device}",
                     METRICS[metric], 100.0 + (i % 997) / 10, json.dumps(labels)))
    return rows


def backend_cpu(pid: int) -> float | None:
    """User + system CPU seconds of a server process (None when /proc is not readable)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def as_csv(rows: list[tuple]) -> bytes:
    out = io.StringIO()
    csv.writer(out).writerows((ts.isoformat(), device, metric, repr(value), labels)
                              for ts, device, metric, value, labels in rows)
    return out.getvalue().encode()


async def copy_binary(conn: asyncpg.Connection, table: str, rows: list[tuple]) -> None:
    await conn.copy_records_to_table(table, records=rows, columns=COLUMNS)


async def copy_csv(conn: asyncpg.Connection, table: str, rows: list[tuple]) -> None:
    await conn.copy_to_table(table, source=io.BytesIO(as_csv(rows)), columns=COLUMNS,
                             format="csv")


async def insert_multi(conn: asyncpg.Connection, table: str, rows: list[tuple]) -> None:
    values = ", ".join(f"(${5 * i + 1}, ${5 * i + 2}, ${5 * i + 3}, ${5 * i + 4}, ${5 * i + 5})"
                       for i in range(INSERT_ROWS))
    # table comes from this file's fixed list of targets; values are bound parameters
    statement = await conn.prepare(f'INSERT INTO {table} ("timestamp", device_id, metric_id, '  # noqa: S608
                                   f"value, labels) VALUES {values}")
    for first in range(0, len(rows) - INSERT_ROWS + 1, INSERT_ROWS):
        await statement.fetch(*[v for row in rows[first:first + INSERT_ROWS] for v in row])


METHODS: dict[str, Callable[[asyncpg.Connection, str, list[tuple]], Awaitable[None]]] = {
    "binary COPY (reference kwollector)": copy_binary,
    "CSV COPY": copy_csv,
    f"multi-row INSERT ({INSERT_ROWS} rows)": insert_multi,
}


async def measure(conn: asyncpg.Connection, table: str, method: str,
                  rows: list[tuple]) -> tuple[float, float | None]:
    pid = await conn.fetchval("SELECT pg_backend_pid()")
    cpu0 = backend_cpu(pid)
    t0 = time.perf_counter()
    async with conn.transaction():
        await METHODS[method](conn, table, rows)
    elapsed = time.perf_counter() - t0
    cpu1 = backend_cpu(pid)
    cpu = None if cpu0 is None or cpu1 is None else (cpu1 - cpu0) / len(rows) * 1e6
    return len(rows) / elapsed, cpu


class RolledBack(Exception):
    """Ends a measuring transaction whose changes must not stay."""


async def floor_step(conn: asyncpg.Connection, swap: str | None,
                     records: list[tuple]) -> float | None:
    """Server CPU per row of a binary COPY into the view (`swap` replaces trigger functions
    for the transaction only), or into kwollect.samples when records are narrow."""
    pid = await conn.fetchval("SELECT pg_backend_pid()")
    cpu0 = backend_cpu(pid)
    cpu1 = None
    try:
        async with conn.transaction():
            if swap:
                await conn.execute(swap)
            if len(records[0]) == 3:
                await conn.copy_records_to_table("samples", schema_name="kwollect",
                                                 records=records,
                                                 columns=["ts", "value", "series_id"])
            else:
                await conn.copy_records_to_table("metrics", records=records, columns=COLUMNS)
            cpu1 = backend_cpu(pid)
            raise RolledBack
    except RolledBack:
        pass
    return None if cpu0 is None or cpu1 is None else (cpu1 - cpu0) / len(records) * 1e6


async def floor(kw: asyncpg.Connection, ref: asyncpg.Connection, args: argparse.Namespace,
                rows_count: int, offset: int) -> None:
    rows = make_rows(args.devices, rows_count, offset)
    keys = sorted({(d, m, lab) for _, d, m, _, lab in rows})
    ids = await kw.fetchval("SELECT kwollect.series_ids($1::text[], $2::text[], $3::jsonb[])",
                            [k[0] for k in keys], [k[1] for k in keys], [k[2] for k in keys])
    series = dict(zip(keys, ids, strict=True))
    narrow = [(ts, value, series[(d, m, lab)]) for ts, d, m, value, lab in rows]
    await kw.execute("SELECT kwollect.ensure_partitions($1::timestamptz[])",
                     [rows[0][0], rows[-1][0]])
    steps: dict[str, list[float]] = {}
    for _ in range(args.rounds):
        for name, conn, swap, records in (
                ("bare table", ref, None, None),
                ("kwollect.samples, series ids known (collectors' path)", kw, None, narrow),
                ("view, row trigger returning NEW only (rows dropped)", kw, ROW_TRIGGER_ONLY,
                 rows),
                ("view, row trigger parking rows, no statement trigger", kw,
                 NO_STATEMENT_TRIGGER, rows),
                ("view as it is", kw, "", rows)):
            if records is None:
                pid = await conn.fetchval("SELECT pg_backend_pid()")
                cpu0 = backend_cpu(pid)
                await copy_binary(conn, "bare", rows)
                cpu1 = backend_cpu(pid)
                cpu = None if cpu0 is None or cpu1 is None else (cpu1 - cpu0) / len(rows) * 1e6
            else:
                cpu = await floor_step(conn, swap, records)
            if cpu is not None:
                steps.setdefault(name, []).append(cpu)
    print("\nbinary COPY, where a row's server CPU goes (median):")
    for name, cpus in steps.items():
        print(f"  {name:58s} {statistics.median(cpus):6.2f} us/row")


async def run(args: argparse.Namespace) -> None:
    cluster = PrivateCluster(settings={"shared_buffers": "1GB", "max_wal_size": "20GB",
                                       "checkpoint_timeout": "30min"}).start()
    try:
        conf = {**DEFAULTS, "db_host": cluster.socket_dir, "db_port": cluster.port,
                "kwollect_password": "bench"}
        await setup(conf)
        admin = await asyncpg.connect(cluster.dsn())
        await admin.execute("CREATE DATABASE kwref")
        await admin.close()
        ref = await asyncpg.connect(cluster.dsn(database="kwref"))
        await ref.execute(REFERENCE_DDL)
        kw = await asyncpg.connect(cluster.dsn(database="kwdb"))
        targets = [("bare table", ref, "bare"), ("reference layout", ref, "reference"),
                   ("kwollect metrics view", kw, "metrics")]
        rows_count = args.rows - args.rows % INSERT_ROWS
        per_second = args.devices * len(METRICS)
        results: dict[tuple[str, str], list[tuple[float, float | None]]] = {}
        offset = 0
        for _ in range(args.rounds):
            for method in METHODS:
                rows = make_rows(args.devices, rows_count, offset)
                offset += rows_count // per_second + 1
                for name, conn, table in targets:
                    results.setdefault((method, name), []).append(
                        await measure(conn, table, method, rows))
        print(f"{rows_count:,} rows per statement kind and target, {args.rounds} rounds, "
              f"median; load average {os.getloadavg()[0]:.1f}")
        for method in METHODS:
            print(f"\n{method}")
            bare = statistics.median(r for r, _ in results[(method, "bare table")])
            for name, _, _ in targets:
                runs = results[(method, name)]
                rate = statistics.median(r for r, _ in runs)
                cpus = [c for _, c in runs if c is not None]
                cpu = f"{statistics.median(cpus):6.2f} us/row" if cpus else "n/a"
                print(f"  {name:22s} {rate:10,.0f} rows/s  ({rate / bare:4.0%} of bare)  "
                      f"server CPU {cpu}")
        await floor(kw, ref, args, rows_count, offset)
        await kw.close()
        await ref.close()
    finally:
        cluster.destroy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=300_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--devices", type=int, default=200)
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
