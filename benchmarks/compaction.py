"""Long-term storage benchmark: bytes per sample raw and compacted, compaction rows/s, and the
issue's three reads, beside the reference layout in the same run.

Starts a private cluster, sets kwollect up, generates the issue's data set server-side
(benchmarks/dataset.sql, the anchor's generator: DEVICES x 10 metrics x 1 Hz x HOURS, jitter
0-19 ms, 2 metrics aliased), loads it into kwollect.samples and into the reference layout (a
plain table with text ids and Kwollect's (device_id, timestamp DESC) index), then prints:

- bytes per sample: kwollect raw, kwollect compacted, reference layout;
- compaction rows/s (kwollect.compact_partition over every partition);
- (1) one device, one metric, 1 h; (2) 20 devices, all metrics, 2 h; (3) 5-minute averages
  of one metric for every device over the whole window (summary=true): the time for all rows
  to reach the client (binary COPY into a sink, best of REPEAT), raw, compacted and
  reference (the reference answers (1) and (2) ordered by timestamp, and (3) by grouping
  its raw rows, which is what it has).

Usage: .venv/bin/python benchmarks/compaction.py [--devices 200] [--hours 6] [--repeat 3]
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import time
from pathlib import Path

import asyncpg

from kwollect.dev.devcluster import PrivateCluster
from kwollect.store.setupdb import DEFAULTS, setup

START = "2025-01-06 00:00:00+00"


class Sink:
    def __init__(self) -> None:
        self.size = 0

    async def write(self, data: bytes) -> None:
        self.size += len(data)


async def client_time(conn: asyncpg.Connection, query: str, repeat: int) -> float:
    """Best wall time for every row of `query` to reach the client (binary COPY)."""
    best = float("inf")
    for _ in range(repeat + 1):  # the first run warms the cache
        sink = Sink()
        t0 = time.perf_counter()
        await conn.copy_from_query(query, output=sink.write, format="binary")
        best = min(best, time.perf_counter() - t0)
    return best


def queries(devices: int, hours: int) -> dict[str, tuple[str, str]]:
    """(kwollect, reference) SQL of the three reads (built from integers only)."""
    twenty = ",".join(f"node-{d}" for d in range(1, min(20, devices) + 1))
    alldev = ",".join(f"node-{d}" for d in range(1, devices + 1))
    q2_hours = min(2, hours)
    end = f"(timestamptz '{START}' + interval '{hours} hours')"
    return {
        "(1) 1 device, 1 metric, 1 h": (
            "SELECT * FROM api.get_metrics(devices => 'node-1', metrics => "  # noqa: S608
            "'bmc_node_power_watt', start_time => '2025-01-06T00:00:00', "
            "end_time => '2025-01-06T00:59:59.999999')",
            "SELECT * FROM ref_metrics WHERE device_id = 'node-1' AND metric_id = "  # noqa: S608
            f"'bmc_node_power_watt' AND timestamp >= '{START}' AND timestamp < "
            f"timestamptz '{START}' + interval '1 hour' ORDER BY timestamp"),
        f"(2) 20 devices, all metrics, {q2_hours} h": (
            f"SELECT * FROM api.get_metrics(devices => '{twenty}', "  # noqa: S608
            "start_time => '2025-01-06T00:00:00', "
            f"end_time => '2025-01-06T0{q2_hours - 1}:59:59.999999')",
            f"SELECT * FROM ref_metrics WHERE device_id = ANY ('{{{twenty}}}'::text[]) "  # noqa: S608
            f"AND timestamp >= '{START}' AND timestamp < timestamptz '{START}' + "
            f"interval '{q2_hours} hours' ORDER BY timestamp"),
        f"(3) 5-min averages, 1 metric, {devices} devices, {hours} h": (
            f"SELECT * FROM api.get_metrics(devices => '{alldev}', "  # noqa: S608
            "metrics => 'bmc_node_power_watt', summary => true, "
            f"start_time => '2025-01-06T00:00:00', end_time => '2025-01-06T0{hours - 1}:59:59')",
            "SELECT date_bin('5 minutes', timestamp, timestamptz 'epoch') AS b, device_id, "  # noqa: S608
            "avg(value) FROM ref_metrics WHERE metric_id = 'bmc_node_power_watt' "
            f"AND timestamp >= '{START}' AND timestamp < {end} GROUP BY 1, 2 ORDER BY 1, 2"),
    }


async def relation_bytes(conn: asyncpg.Connection, sql: str) -> int:
    return int(await conn.fetchval(sql))


async def run(args: argparse.Namespace) -> None:
    cluster = PrivateCluster(settings={"shared_buffers": "2GB", "work_mem": "64MB",
                                       "maintenance_work_mem": "1GB", "max_wal_size": "20GB",
                                       "autovacuum": "off"})
    cluster.start()
    try:
        conf = {**DEFAULTS, "db_host": cluster.socket_dir, "db_port": cluster.port,
                "kwollect_password": "bench-writer", "chunk_interval_hour": 6}
        await setup(conf)
        dsn = cluster.dsn(database=conf["kwollect_db_name"])
        t0 = time.perf_counter()
        subprocess.run([str(cluster.bindir / "psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1",
                        "-v", f"devices={args.devices}", "-v", f"seconds={args.hours * 3600}",
                        "-d", dsn, "-f", str(Path(__file__).with_name("dataset.sql"))],
                       check=True, stdout=subprocess.DEVNULL)
        print(f"generated in {time.perf_counter() - t0:.0f} s")
        conn = await asyncpg.connect(dsn)
        rows = await conn.fetchval("SELECT count(*) FROM gen_rows")
        await conn.execute(
            "SELECT kwollect.series_ids(array_agg(device_id), array_agg(metric_id), "
            "array_agg(labels)) FROM (SELECT DISTINCT device_id, metric_id, labels "
            "FROM gen_rows) s")
        await conn.execute(
            "SELECT kwollect.ensure_partitions(ARRAY[min(timestamp), max(timestamp)]) "
            "FROM gen_rows")
        t0 = time.perf_counter()
        await conn.execute(
            "INSERT INTO kwollect.samples (ts, value, series_id) SELECT g.timestamp, g.value, "
            "s.series_id FROM gen_rows g JOIN kwollect.series s USING (device_id, metric_id, "
            "labels) ORDER BY g.timestamp")
        print(f"loaded into kwollect.samples: {rows / (time.perf_counter() - t0):,.0f} rows/s "
              "(INSERT ... SELECT; the writer's rate is in benchmarks/writer_throughput.py)")
        await conn.execute(
            "CREATE TABLE ref_metrics (timestamp timestamptz NOT NULL, device_id text NOT NULL,"
            " metric_id text NOT NULL, value double precision, labels jsonb DEFAULT '{}');"
            "CREATE INDEX ON ref_metrics (device_id, timestamp DESC);"
            "INSERT INTO ref_metrics SELECT * FROM gen_rows ORDER BY timestamp;"
            "DROP TABLE gen_rows, gen_dev, gen_metric")
        await conn.execute("SET kwollect.max_rows = 0")
        await conn.execute("SELECT kwollect.refresh_summary('1 hour')")
        await conn.execute("VACUUM ANALYZE")
        await conn.execute("CHECKPOINT")
        part_sql = ("SELECT sum(pg_total_relation_size(c.oid)) FROM pg_inherits i JOIN pg_class c"
                    " ON c.oid = i.inhrelid WHERE i.inhparent = 'kwollect.samples'::regclass")
        raw = await relation_bytes(conn, part_sql)
        ref = await relation_bytes(conn, "SELECT pg_total_relation_size('ref_metrics')")
        qs = queries(args.devices, args.hours)
        times: dict[str, dict[str, float]] = {name: {} for name in qs}
        for name, (ours, theirs) in qs.items():
            times[name]["reference"] = await client_time(conn, theirs, args.repeat)
            times[name]["raw"] = await client_time(conn, ours, args.repeat)
        parts = [r[0] for r in await conn.fetch(
            "SELECT name FROM kwollect.partitions p WHERE EXISTS (SELECT 1 FROM "
            "kwollect.samples s WHERE s.ts >= p.range_start AND s.ts < p.range_end) "
            "ORDER BY range_start")]
        t0 = time.perf_counter()
        for name in parts:
            await conn.execute("SELECT kwollect.compact_partition($1)", name)
        compaction = rows / (time.perf_counter() - t0)
        await conn.execute("SELECT kwollect.release_compacted()")
        await conn.execute("VACUUM ANALYZE")
        await conn.execute("CHECKPOINT")
        compact = (await relation_bytes(conn, part_sql)
                   + await relation_bytes(conn, "SELECT pg_total_relation_size("
                                                "'kwollect.samples_compact')"))
        for name, (ours, _) in qs.items():
            times[name]["compacted"] = await client_time(conn, ours, args.repeat)
        await conn.close()
        print(f"\n{rows:,} rows ({args.devices} devices x 10 metrics x {args.hours} h)")
        print(f"bytes/sample: reference layout {ref / rows:.1f}, kwollect raw {raw / rows:.1f}, "
              f"kwollect compacted {compact / rows:.2f}")
        print(f"compaction: {compaction:,.0f} rows/s")
        print("\nquery (all rows at the client)       reference    raw  compacted  (seconds)")
        for name, t in times.items():
            print(f"{name:<40} {t['reference']:8.3f} {t['raw']:6.3f} {t['compacted']:8.3f}")
    finally:
        cluster.destroy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=200)
    parser.add_argument("--hours", type=int, default=6)
    parser.add_argument("--repeat", type=int, default=3)
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
