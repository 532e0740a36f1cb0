"""get_metrics read speed (issue 12, "Reads first"), side by side with the reference layout.

The issue's read: 20 devices x 10 metrics x 2 h at 1 Hz (1.44 M rows) from a store holding
DEVICES devices, all rows at the client.  Starts a private cluster, sets kwollect up,
generates the issue's data set (benchmarks/dataset.sql), loads it into kwollect.samples and
into the reference layout (a plain table with text ids and Kwollect's
(device_id, timestamp DESC) index, answering the same rows ORDER BY timestamp), and reads:
the reference, kwollect's raw partitions, then (after compacting every partition,
sql/025_compaction.sql) the reference again and kwollect's compacted blocks.

Each read is a binary COPY of the query's output into a sink (what a client receives). The
reference and kwollect alternate, REPEAT times after a warm-up, so both see the same load;
printed: the best wall time of each, the ratio of those bests and the median ratio of the
pairs, and the server CPU per row (the backend's, plus that of the parallel workers it
started, which the reference's plans use; read from /proc).  On a machine shared with other
work the ratios of one run and the CPU per row are the figures to compare.

Then the floors of any read of these rows in PostgreSQL, measured in the same run: the
output alone (a binary COPY of a table holding exactly the 1.44 M output rows, less the scan
of that table), and the selection and ordering alone (the requested series' narrow rows,
each chunk sorted by timestamp only, counted in the server: no names, no output; from the
raw partitions with their index, or decoded from the compacted blocks).  Their sum, against
the reference, is how close to the issue's 0.6x any layout of these rows can come.

Usage: .venv/bin/python benchmarks/reads.py [--devices 200] [--hours 2] [--repeat 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import asyncpg

from kwollect.dev.devcluster import PrivateCluster

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.compaction import START_TS, Sink, kwollect_db, queries  # noqa: E402


def cpu_seconds(pid: int, children: bool = False) -> float:
    """CPU seconds of a process, or of its exited children (parallel workers, once reaped by
    the postmaster)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    first = 13 if children else 11  # cutime, cstime or utime, stime
    return (int(fields[first]) + int(fields[first + 1])) / os.sysconf("SC_CLK_TCK")


class Reader:
    """Times queries on one connection: wall time to the last byte, server CPU."""

    def __init__(self, conn: asyncpg.Connection, postmaster: int, backend: int) -> None:
        self.conn, self.postmaster, self.backend = conn, postmaster, backend

    def server_cpu(self) -> float:
        return cpu_seconds(self.backend) + cpu_seconds(self.postmaster, children=True)

    async def read(self, query: str) -> tuple[float, float]:
        sink = Sink()
        cpu0 = self.server_cpu()
        t0 = time.perf_counter()
        await self.conn.copy_from_query(query, output=sink.write, format="binary")
        return time.perf_counter() - t0, self.server_cpu() - cpu0

    async def side_by_side(self, ours: str, theirs: str, repeat: int,
                           label: str) -> dict[str, list[tuple[float, float]]]:
        runs: dict[str, list[tuple[float, float]]] = {"reference": [], label: []}
        for i in range(repeat + 1):  # the first round warms the caches
            ref, own = await self.read(theirs), await self.read(ours)
            if i:
                runs["reference"].append(ref)
                runs[label].append(own)
        return runs


# The requested series' rows, narrow (ts, value, series_id), each chunk sorted by timestamp
# alone: the cheapest order a read of several series can have (get_metrics also breaks ties
# by series), with nothing named and nothing sent.  Minute chunks from the raw partitions
# (get_metrics' chunk there), hours of decoded blocks from the compacted ones.
SELECT_ORDER = {
    "raw": """SELECT count(*) FROM generate_series(
                  kwollect.minute_key($1::timestamptz), kwollect.minute_key($2::timestamptz) - 1) k,
              LATERAL (SELECT x.ts, x.value, x.series_id FROM kwollect.samples x
                       WHERE x.series_id = ANY ($3) AND kwollect.minute_key(x.ts) = k
                       ORDER BY x.ts) r""",
    "compacted": """SELECT count(*) FROM generate_series(
                  $1::timestamptz, $2::timestamptz - interval '1 hour', interval '1 hour') h,
              LATERAL (SELECT d.ts, d.value, c.series_id FROM kwollect.samples_compact c
                       CROSS JOIN LATERAL kwollect.block_decode(
                           c.n, c.t0, c.t_unit, c.t_period, c.t_gap, c.t_jit, c.v_div,
                           c.v_first, c.v_last, c.v_off, c.v_raw) d
                       WHERE c.series_id = ANY ($3) AND c.block_start > h - interval '1 hour'
                         AND c.block_start < h + interval '1 hour'
                         AND d.ts >= h AND d.ts < h + interval '1 hour'
                       ORDER BY d.ts) r""",
}


async def floors(conn: asyncpg.Connection, reader: Reader, ours: str, storage: str,
                 hours: int, repeat: int) -> tuple[float, float]:
    """Best wall times of the output alone and of the selection and ordering alone."""
    await conn.execute(f"CREATE TEMP TABLE read_rows AS {ours}; ANALYZE read_rows")
    output = []
    for _ in range(repeat + 1):
        t0 = time.perf_counter()
        await conn.fetchval("SELECT count(*) FROM read_rows")  # the table's own scan
        scan = time.perf_counter() - t0
        copy, _cpu = await reader.read("SELECT * FROM read_rows")
        output.append(copy - scan)
    ids = await conn.fetchval("SELECT array_agg(s.series_id) FROM kwollect.series s "
                              "WHERE s.device_id IN (SELECT device_id FROM read_rows)")
    await conn.execute("DROP TABLE read_rows")
    start = START_TS
    end = start + timedelta(hours=min(2, hours))
    select = []
    for _ in range(repeat + 1):
        t0 = time.perf_counter()
        await conn.fetchval(SELECT_ORDER[storage], start, end, ids)
        select.append(time.perf_counter() - t0)
    return min(output[1:]), min(select[1:])


def report_floors(runs: dict[str, list[tuple[float, float]]], output: float,
                  select: float) -> None:
    ref = min(runs["reference"])[0]
    print(f"  floor: the output alone {output:.3f} s ({output / ref:.2f}x the reference), "
          f"selecting and ordering alone {select:.3f} s ({select / ref:.2f}x): together "
          f"{output + select:.3f} s = {(output + select) / ref:.2f}x the reference "
          "(the issue's goal: 0.6x)")


def report(runs: dict[str, list[tuple[float, float]]], label: str, rows: int) -> None:
    ref, own = runs["reference"], runs[label]
    for name, measured in (("reference layout", ref), (f"kwollect {label}", own)):
        wall, cpu = min(measured)
        print(f"  {name:<22} best {wall:7.3f} s   server CPU {cpu / rows * 1e6:5.2f} us/row"
              f"   (walls: {', '.join(f'{w:.2f}' for w, _ in measured)})")
    ratios = [o[0] / r[0] for r, o in zip(ref, own, strict=True)]
    print(f"  ratio kwollect/reference: best {min(own)[0] / min(ref)[0]:.2f}, "
          f"median of pairs {statistics.median(ratios):.2f}; "
          f"CPU per row {min(own)[1] / min(ref)[1]:.2f}")


async def run(args: argparse.Namespace) -> None:
    cluster = PrivateCluster(settings={"shared_buffers": "2GB", "work_mem": "64MB",
                                       "maintenance_work_mem": "1GB", "max_wal_size": "20GB",
                                       "autovacuum": "off"})
    cluster.start()
    try:
        dsn = await kwollect_db(cluster, "kw_reads", "stock")
        subprocess.run([str(cluster.bindir / "psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1",
                        "-v", f"devices={args.devices}", "-v", f"seconds={args.hours * 3600}",
                        "-d", dsn, "-f", str(Path(__file__).with_name("dataset.sql"))],
                       check=True, stdout=subprocess.DEVNULL)
        conn = await asyncpg.connect(dsn)
        await conn.execute(
            "SELECT kwollect.series_ids(array_agg(device_id), array_agg(metric_id), "
            "array_agg(labels)) FROM (SELECT DISTINCT device_id, metric_id, labels "
            "FROM gen_rows) s;"
            "SELECT kwollect.ensure_partitions(ARRAY[min(timestamp), max(timestamp)]) "
            "FROM gen_rows;"
            "INSERT INTO kwollect.samples (ts, value, series_id) SELECT g.timestamp, g.value, "
            "s.series_id FROM gen_rows g JOIN kwollect.series s USING (device_id, metric_id, "
            "labels) ORDER BY g.timestamp;"
            "CREATE TABLE ref_metrics (timestamp timestamptz NOT NULL, device_id text NOT NULL,"
            " metric_id text NOT NULL, value double precision, labels jsonb DEFAULT '{}');"
            "CREATE INDEX ON ref_metrics (device_id, timestamp DESC);"
            "INSERT INTO ref_metrics SELECT * FROM gen_rows ORDER BY timestamp;"
            "DROP TABLE gen_rows, gen_dev, gen_metric;"
            "SET kwollect.max_rows = 0")
        await conn.execute("VACUUM ANALYZE")
        await conn.execute("CHECKPOINT")
        ours, theirs = next(q for name, q in queries(args.devices, args.hours).items()
                            if name.startswith("(2)"))
        rows = await conn.fetchval(f"SELECT count(*) FROM ({theirs}) q")  # noqa: S608
        postmaster = int((cluster.datadir / "postmaster.pid").read_text().split()[0])
        reader = Reader(conn, postmaster, await conn.fetchval("SELECT pg_backend_pid()"))
        loads = [os.getloadavg()[0]]
        raw = await reader.side_by_side(ours, theirs, args.repeat, "raw")
        raw_floors = await floors(conn, reader, ours, "raw", args.hours, args.repeat)
        for (part,) in await conn.fetch("SELECT name FROM kwollect.partitions "
                                        "ORDER BY range_start"):
            await conn.execute("SELECT kwollect.compact_partition($1)", part)
        await conn.execute("SELECT kwollect.release_compacted()")
        await conn.execute("VACUUM ANALYZE")
        await conn.execute("CHECKPOINT")
        loads.append(os.getloadavg()[0])
        compacted = await reader.side_by_side(ours, theirs, args.repeat, "compacted")
        compacted_floors = await floors(conn, reader, ours, "compacted", args.hours,
                                        args.repeat)
        loads.append(os.getloadavg()[0])
        await conn.close()
    finally:
        cluster.destroy()
    print(f"\nget_metrics, 20 devices x 10 metrics x {min(2, args.hours)} h = {rows:,} rows, "
          f"from a store of {args.devices} devices x {args.hours} h; {args.repeat} rounds; "
          f"load average {', '.join(f'{x:.1f}' for x in loads)} on {os.cpu_count()} CPUs")
    print("raw partitions:")
    report(raw, "raw", rows)
    report_floors(raw, *raw_floors)
    print("compacted blocks:")
    report(compacted, "compacted", rows)
    report_floors(compacted, *compacted_floors)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=200)
    parser.add_argument("--hours", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3)
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
