"""Long-term storage benchmark, per storage: bytes per sample raw and compacted (or
compressed), ingest rows/s through the writer, compaction rows/s, and the issue's three reads,
beside the reference layout in the same run.

Starts a private cluster (preloading TimescaleDB where it is installed) and sets one kwollect
database up per storage (stock PostgreSQL; TimescaleDB when available).  The issue's data set
is generated once, server-side, in the stock database (benchmarks/dataset.sql, the anchor's
generator: DEVICES x 10 metrics x 1 Hz x HOURS, jitter 0-19 ms, 2 metrics aliased), loaded
into kwollect.samples (INSERT ... SELECT in time order) and into the reference layout (a
plain table with text ids and Kwollect's (device_id, timestamp DESC) index); the TimescaleDB
database receives the same series (same ids) and samples by binary COPY: generating the full
data set (43.2 M rows) a second time cost minutes for nothing.  Then it prints per layout
(reference; stock raw, stock compacted; TimescaleDB hypertable, TimescaleDB compressed):

- bytes per sample (partitions or chunks, indexes, TOAST, compacted blocks);
- ingest rows/s through kwollect's Writer (binary COPY, 2 connections, 10,000-row batches;
  INGEST_ROWS rows of benchmarks/writer_throughput.py's readings, into a fresh database);
- compaction rows/s (kwollect.compact_partition over every partition; on TimescaleDB
  kwollect.compress_chunks, its native compression);
- (1) one device, one metric, 1 h; (2) 20 devices, all metrics, 2 h; (3) 5-minute averages
  of one metric for every device over the whole window (summary=true): the time for all rows
  to reach the client (binary COPY into a sink, best of REPEAT), through api.get_metrics
  (the reference answers (1) and (2) ordered by timestamp, and (3) by grouping its raw rows,
  which is what it has);
- the 5-minute summary refresh time on each storage, and on TimescaleDB a continuous
  aggregate of the same statistics (refresh time, query (3) read from it) for comparison.

Each step prints when it starts and how long it took (the full-size run lasts about an hour
on a shared 2-core machine).  --together compacts and compresses both storages at the same
time, for a machine with a core to spare.

Usage: .venv/bin/python benchmarks/compaction.py [--devices 200] [--hours 6] [--repeat 3]
       [--ingest-rows 1000000] [--together]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import asyncpg

from kwollect.dev.devcluster import PrivateCluster, missing_extension_reason
from kwollect.store.setupdb import DEFAULTS, setup
from kwollect.store.writer import Writer, WriterOptions

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.writer_throughput import build, cpu_postgres, feed  # noqa: E402

START = "2025-01-06 00:00:00+00"
START_TS = datetime(2025, 1, 6, tzinfo=UTC)
WRITER_PASSWORD = "bench-writer"


@contextlib.contextmanager
def step(storage: str, what: str) -> Iterator[None]:
    """Print when a step starts and how long it took: the full-size run (43.2 M rows) lasts
    more than an hour on a shared machine, and its log says where it is."""
    print(f"{datetime.now(UTC):%H:%M:%S} [{storage}] {what} ...", flush=True)
    t0 = time.perf_counter()
    yield
    print(f"{datetime.now(UTC):%H:%M:%S} [{storage}] {what}: {time.perf_counter() - t0:.1f} s",
          flush=True)


class Sink:
    def __init__(self) -> None:
        self.size = 0

    async def write(self, data: bytes) -> None:
        self.size += len(data)


async def client_time(conn: asyncpg.Connection, query: str, repeat: int,
                      postmaster: int) -> tuple[float, float]:
    """Best wall time for every row of `query` to reach the client (binary COPY), and the
    least server CPU time of a run: on a machine shared with other work the wall time
    follows the load of the moment (the same read varied 2x between two runs at load 3-6);
    the server's CPU seconds leave out the time its processes waited for a core."""
    best, best_cpu = float("inf"), float("inf")
    for _ in range(repeat + 1):  # the first run warms the cache
        sink = Sink()
        cpu0 = cpu_postgres(postmaster, reaped=True)
        t0 = time.perf_counter()
        await conn.copy_from_query(query, output=sink.write, format="binary")
        best = min(best, time.perf_counter() - t0)
        best_cpu = min(best_cpu, cpu_postgres(postmaster, reaped=True) - cpu0)
    return best, best_cpu


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


def tree_sql(parent: str) -> str:
    """Bytes of every partition under `parent` (pg_total_relation_size of a partitioned table
    itself is 0)."""
    return ("SELECT coalesce(sum(pg_total_relation_size(relid)), 0) "  # noqa: S608
            f"FROM pg_partition_tree('{parent}') WHERE isleaf")


PART_SQL = tree_sql("kwollect.samples")
HYPER_SQL = "SELECT public.hypertable_size('kwollect.samples')"
COMPACT_SQL = tree_sql("kwollect.samples_compact")


async def samples_bytes(conn: asyncpg.Connection, storage: str) -> int:
    """Every byte of the samples: partitions or chunks (compressed ones included), their
    indexes and TOAST, and the compacted blocks."""
    await conn.execute("VACUUM ANALYZE")
    await conn.execute("CHECKPOINT")
    return (await relation_bytes(conn, PART_SQL if storage == "stock" else HYPER_SQL)
            + await relation_bytes(conn, COMPACT_SQL))


async def kwollect_db(cluster: PrivateCluster, name: str, storage: str) -> str:
    conf = {**DEFAULTS, "db_host": cluster.socket_dir, "db_port": cluster.port,
            "kwollect_password": WRITER_PASSWORD, "chunk_interval_hour": 6,
            "kwollect_db_name": name, "timescaledb": "on" if storage == "timescaledb" else "off"}
    await setup(conf)
    return cluster.dsn(database=name)


async def writer_ingest(cluster: PrivateCluster, storage: str, args: argparse.Namespace) -> float:
    """Rows/s through kwollect's Writer (binary COPY, 2 connections) into a fresh database."""
    name = f"ingest_{storage}"
    await kwollect_db(cluster, name, storage)
    lists = build(args.devices, args.ingest_rows)
    writer = Writer({"host": "127.0.0.1", "port": cluster.port, "database": name,
                     "user": "kwuser", "password": WRITER_PASSWORD},
                    WriterOptions(batch_max_rows=10_000, pool_size=2, queue_max_rows=400_000))
    await writer.start()
    writer.submit(lists[0])  # series ids and partitions: not measured
    while writer.stats()["inserted"] < len(lists[0]):
        await asyncio.sleep(0.01)
    rows = sum(map(len, lists[1:]))
    t0 = time.perf_counter()
    await feed(writer, lists[1:], 0, 40_000)
    while writer.stats()["inserted"] < rows + len(lists[0]):
        await asyncio.sleep(0.005)
    elapsed = time.perf_counter() - t0
    assert writer.stats()["dropped"] == 0
    await writer.close()
    return rows / elapsed


async def generate(cluster: PrivateCluster, dsn: str, args: argparse.Namespace) -> None:
    """benchmarks/dataset.sql into table gen_rows of `dsn` (server-side, through psql)."""
    proc = await asyncio.create_subprocess_exec(
        str(cluster.bindir / "psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1",
        "-v", f"devices={args.devices}", "-v", f"seconds={args.hours * 3600}",
        "-d", dsn, "-f", str(Path(__file__).with_name("dataset.sql")),
        stdout=subprocess.DEVNULL)
    if await proc.wait() != 0:
        raise RuntimeError(f"benchmarks/dataset.sql failed (psql exit {proc.returncode})")


async def load_stock(cluster: PrivateCluster, args: argparse.Namespace, res: dict,
                     export: Path) -> asyncpg.Connection:
    """Generate the data set once, load it into kwollect.samples of the stock database
    (series ids first, then one INSERT ... SELECT in time order, as collectors write), copy
    the series and samples out to `export` for the TimescaleDB database, and build the
    reference layout from the same rows."""
    dsn = await kwollect_db(cluster, "kw_stock", "stock")
    with step("stock", f"generate {args.devices} devices x 10 metrics x {args.hours} h"):
        await generate(cluster, dsn, args)
    conn = await asyncpg.connect(dsn)
    res["rows"] = rows = await conn.fetchval("SELECT count(*) FROM gen_rows")
    await conn.execute(
        "SELECT kwollect.series_ids(array_agg(device_id), array_agg(metric_id), "
        "array_agg(labels)) FROM (SELECT DISTINCT device_id, metric_id, labels "
        "FROM gen_rows) s")
    await conn.execute(
        "SELECT kwollect.ensure_partitions(ARRAY[min(timestamp), max(timestamp)]) "
        "FROM gen_rows")
    with step("stock", f"load {rows:,} rows into kwollect.samples"):
        t0 = time.perf_counter()
        await conn.execute(
            "INSERT INTO kwollect.samples (ts, value, series_id) SELECT g.timestamp, g.value, "
            "s.series_id FROM gen_rows g JOIN kwollect.series s USING (device_id, metric_id, "
            "labels) ORDER BY g.timestamp")
        res["load"] = rows / (time.perf_counter() - t0)
    with step("stock", "copy series and samples out for TimescaleDB"):
        await conn.copy_from_query("SELECT series_id, device_id, metric_id, labels FROM "
                                   "kwollect.series", output=f"{export}.series", format="binary")
        await conn.copy_from_query("SELECT ts, value, series_id FROM kwollect.samples",
                                   output=f"{export}.samples", format="binary")
    with step("stock", "reference layout"):
        await conn.execute(
            "CREATE TABLE ref_metrics (timestamp timestamptz NOT NULL, device_id text NOT NULL,"
            " metric_id text NOT NULL, value double precision, labels jsonb DEFAULT '{}');"
            "CREATE INDEX ON ref_metrics (device_id, timestamp DESC);"
            "INSERT INTO ref_metrics SELECT * FROM gen_rows ORDER BY timestamp")
        res["ref_bytes"] = await relation_bytes(
            conn, "SELECT pg_total_relation_size('ref_metrics')")
    await conn.execute("DROP TABLE gen_rows, gen_dev, gen_metric")
    return conn


async def load_timescaledb(cluster: PrivateCluster, hours: int, res: dict,
                           export: Path) -> asyncpg.Connection:
    """The same series (same ids) and samples into the TimescaleDB database: COPY of what the
    stock database holds, rather than generating 43.2 M rows a second time."""
    conn = await asyncpg.connect(await kwollect_db(cluster, "kw_timescaledb", "timescaledb"))
    with step("timescaledb", "copy series and samples in"):
        await conn.copy_to_table("series", schema_name="kwollect", source=f"{export}.series",
                                 columns=["series_id", "device_id", "metric_id", "labels"],
                                 format="binary")
        await conn.execute("SELECT setval(pg_get_serial_sequence('kwollect.series', "
                           "'series_id'), max(series_id)) FROM kwollect.series")
        await conn.execute(
            "SELECT kwollect.ensure_partitions(ARRAY[$1::timestamptz, $1::timestamptz "
            "+ make_interval(hours => $2) - interval '1 second'])", START_TS, hours)
        t0 = time.perf_counter()
        await conn.copy_to_table("samples", schema_name="kwollect", source=f"{export}.samples",
                                 columns=["ts", "value", "series_id"], format="binary")
        elapsed = time.perf_counter() - t0
        res["rows"] = await conn.fetchval("SELECT count(*) FROM kwollect.samples")
        res["load"] = res["rows"] / elapsed
    for suffix in (".series", ".samples"):
        Path(f"{export}{suffix}").unlink()
    return conn


async def summarize_and_size(conn: asyncpg.Connection, storage: str, res: dict) -> None:
    """The 5-minute summary of the whole data set (query (3) reads it), then the raw size."""
    await conn.execute("SET kwollect.max_rows = 0")
    # setup's maintain() summarized the empty present: start again from the data set
    await conn.execute("UPDATE kwollect.summary_state SET watermark = NULL")
    with step(storage, "5-minute summary refresh"):
        t0 = time.perf_counter()
        summary_rows = await conn.fetchval("SELECT kwollect.refresh_summary('1 hour')")
        res["summary"] = (summary_rows, time.perf_counter() - t0)
    with step(storage, "VACUUM ANALYZE and size"):
        res["raw_bytes"] = await samples_bytes(conn, storage)


async def read_all(conn: asyncpg.Connection, storage: str, args: argparse.Namespace,
                   res: dict, kind: str) -> None:
    """The three reads through get_metrics (`kind`: raw or compacted), and on the stock
    database before compaction the reference layout's."""
    qs = queries(args.devices, args.hours)
    times = res.setdefault("times", {name: {} for name in qs})
    for name, (ours, theirs) in qs.items():
        if storage == "stock" and kind == "raw":
            with step("reference", name):
                times[name]["reference"] = await client_time(conn, theirs, args.repeat,
                                                             args.postmaster)
        with step(storage, f"{name}, {kind}"):
            times[name][kind] = await client_time(conn, ours, args.repeat, args.postmaster)


async def compact(conn: asyncpg.Connection, storage: str, res: dict) -> None:
    """Compaction of every partition (stock) or TimescaleDB's compression of every chunk."""
    with step(storage, "compaction" if storage == "stock" else "compression"):
        t0 = time.perf_counter()
        if storage == "stock":
            for (part,) in await conn.fetch(
                    "SELECT name FROM kwollect.partitions p WHERE EXISTS (SELECT 1 FROM "
                    "kwollect.samples s WHERE s.ts >= p.range_start AND s.ts < p.range_end) "
                    "ORDER BY range_start"):
                await conn.execute("SELECT kwollect.compact_partition($1)", part)
        else:
            await conn.execute("SELECT kwollect.compress_chunks('1 day')")
        res["compaction"] = res["rows"] / (time.perf_counter() - t0)
    with step(storage, "release, VACUUM ANALYZE and size"):
        await conn.execute("SELECT kwollect.release_compacted()")
        res["compact_bytes"] = await samples_bytes(conn, storage)


async def continuous_aggregate(
        conn: asyncpg.Connection, args: argparse.Namespace) -> tuple[float, tuple[float, float]]:
    """The alternative to kwollect.summary on TimescaleDB, on the same (compressed) data: a
    continuous aggregate of the same 5-minute statistics (count, avg, min, max per series),
    its refresh time, and query (3) read from it as get_metrics reads our summary."""
    await conn.execute(
        "CREATE MATERIALIZED VIEW bench_cagg WITH (timescaledb.continuous) AS "
        "SELECT series_id, public.time_bucket('5 minutes', ts) AS bucket, count(value) AS n, "
        "avg(value) AS avg, min(value) AS min, max(value) AS max FROM kwollect.samples "
        "GROUP BY 1, 2 WITH NO DATA")
    t0 = time.perf_counter()
    await conn.execute(f"CALL public.refresh_continuous_aggregate('bench_cagg', '{START}', "
                       f"timestamptz '{START}' + interval '{args.hours} hours')")
    refresh = time.perf_counter() - t0
    read = await client_time(
        conn, "SELECT c.bucket, s.device_id, s.metric_id, c.avg, s.labels FROM bench_cagg c "  # noqa: S608
              "JOIN kwollect.series s USING (series_id) WHERE s.metric_id = "
              f"'bmc_node_power_watt' AND c.bucket >= '{START}' AND c.bucket < "
              f"timestamptz '{START}' + interval '{args.hours} hours' ORDER BY 1, 2",
        args.repeat, args.postmaster)
    return refresh, read


async def run(args: argparse.Namespace) -> None:
    cluster = PrivateCluster(settings={"shared_buffers": "2GB", "work_mem": "64MB",
                                       "maintenance_work_mem": "1GB", "max_wal_size": "20GB",
                                       "autovacuum": "off"}, preload=("timescaledb",))
    storages = ["stock"] + (["timescaledb"] if cluster.preloaded else [])
    if not cluster.preloaded:
        print(f"TimescaleDB rows left out: {missing_extension_reason('timescaledb')}")
    cluster.start()
    args.postmaster = int((cluster.datadir / "postmaster.pid").read_text().split()[0])
    out: dict[str, dict] = {storage: {} for storage in storages}
    export = cluster.base / "dataset"
    try:
        ingest = {}
        for storage in storages:
            with step(storage, f"writer ingest of {args.ingest_rows:,} rows"):
                ingest[storage] = await writer_ingest(cluster, storage, args)
        conns = {"stock": await load_stock(cluster, args, out["stock"], export)}
        if "timescaledb" in storages:
            conns["timescaledb"] = await load_timescaledb(cluster, args.hours,
                                                          out["timescaledb"], export)
        for storage in storages:
            await summarize_and_size(conns[storage], storage, out[storage])
        for storage in storages:
            await read_all(conns[storage], storage, args, out[storage], "raw")
        if args.together:
            await asyncio.gather(*(compact(conns[storage], storage, out[storage])
                                   for storage in storages))
        else:
            for storage in storages:
                await compact(conns[storage], storage, out[storage])
        for storage in storages:
            await read_all(conns[storage], storage, args, out[storage], "compacted")
        if "timescaledb" in storages:
            with step("timescaledb", "continuous aggregate"):
                out["timescaledb"]["cagg"] = await continuous_aggregate(conns["timescaledb"],
                                                                        args)
        for conn in conns.values():
            await conn.close()
    finally:
        cluster.destroy()
    rows = out["stock"]["rows"]
    print(f"\n{rows:,} rows ({args.devices} devices x 10 metrics x {args.hours} h); writer "
          f"ingest measured on {args.ingest_rows:,} rows")
    names = {"stock": ("stock raw", "stock compacted"),
             "timescaledb": ("TimescaleDB hypertable", "TimescaleDB compressed")}
    print(f"\n{'layout':<26}{'B/sample':>9}{'ingest (writer)':>17}{'compaction':>12}"
          + "".join(f"{q[:3]:>9}" for q in out["stock"]["times"]) + "   (rows/s; query s)")
    print(f"{'reference layout':<26}{out['stock']['ref_bytes'] / rows:9.1f}{'':>29}"
          + "".join(f"{t['reference'][0]:9.3f}" for t in out["stock"]["times"].values()))
    for storage in storages:
        res = out[storage]
        raw, compacted = names[storage]
        print(f"{raw:<26}{res['raw_bytes'] / rows:9.1f}{ingest[storage]:17,.0f}{'':>12}"
              + "".join(f"{t['raw'][0]:9.3f}" for t in res["times"].values()))
        print(f"{compacted:<26}{res['compact_bytes'] / rows:9.2f}{'':>17}"
              f"{res['compaction']:12,.0f}"
              + "".join(f"{t['compacted'][0]:9.3f}" for t in res["times"].values()))
    print(f"\nserver CPU of the reads (s, least of a run){'':>21}"
          + "".join(f"{q[:3]:>9}" for q in out["stock"]["times"]))
    print(f"{'reference layout':<64}"
          + "".join(f"{t['reference'][1]:9.2f}" for t in out["stock"]["times"].values()))
    for storage in storages:
        for kind, name in zip(("raw", "compacted"), names[storage], strict=True):
            print(f"{name:<64}"
                  + "".join(f"{t[kind][1]:9.2f}" for t in out[storage]["times"].values()))
    print("\nqueries: " + "; ".join(out["stock"]["times"]))
    for storage in storages:
        n, seconds = out[storage]["summary"]
        print(f"5-minute summary refresh ({storage}, raw): {n:,} rows in {seconds:.1f} s "
              f"(load, {'INSERT ... SELECT' if storage == 'stock' else 'binary COPY'}: "
              f"{out[storage]['load']:,.0f} rows/s)")
    if "timescaledb" in out:
        refresh, (read, cpu) = out["timescaledb"]["cagg"]
        print(f"continuous aggregate instead (TimescaleDB, compressed): refresh {refresh:.1f} s; "
              f"query (3) from it {read:.3f} s (server CPU {cpu:.2f} s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=200)
    parser.add_argument("--hours", type=int, default=6)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--ingest-rows", type=int, default=1_000_000)
    parser.add_argument("--together", action="store_true",
                        help="compact and compress the two storages at the same time (two "
                             "server processes: each rate is then measured beside the other)")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
