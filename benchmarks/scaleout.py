"""Scale-out: ingest and get_metrics with 1, 2 and 3 kwollectors sharing one metrics.d.

Starts a private PostgreSQL cluster set up by kwollect-setup-db, and an exporter farm in a
process of its own: TARGETS Prometheus exporters on 127.0.0.1 (one port each, so each is
one target of the shard split), each serving METRICS gauges.  For k = 1, 2, 3 it runs k
kwollector processes (`shard: i/k`) on the same metrics.d (a device prefix per run) for a
warm-up then a WINDOW, and prints per k:

- after every target's values arrive and a warm-up: offered and stored values/s in the
  window (rows whose timestamp falls in it, counted after the kwollectors flushed and
  stopped), and their ratio;
- CPU-s per 10,000 values of the kwollectors (all k together), of PostgreSQL and of the
  exporter farm, from /proc;
- WAL bytes written per stored row (what a standby replays, what archiving keeps);
- `get_metrics` latency during the ingest (median and worst of one call every 2 s, as the
  reader role over TCP: 10 devices x METRICS metrics over the last 10 s).

On this 2-core machine, PostgreSQL, the exporters and the kwollectors share the same two
cores: more kwollectors show the per-process overhead and whether the split is even, not
more throughput.  docs/scaling.md turns the per-core costs into deployment sizes.

With --citus it compares instead the storage on one node against a Citus coordinator and
two workers (`kwollect-setup-db --citus`, all on this machine), fed by the writer alone
(benchmarks/writer_throughput.py's data: DEVICES devices x 10 metrics at 1 Hz), and prints
per layout: ingest rows/s and CPU-s per 10,000 rows of the writer and of PostgreSQL (every
node added up), then `get_metrics` times (10 devices, every metric, the whole ingested
window; and its 5-minute summaries), and for Citus one COPY of the same batch through the
coordinator against straight into a worker (Citus routes it there too).

Usage: .venv/bin/python benchmarks/scaleout.py [--targets 100] [--metrics 100]
       [--period-ms 1000] [--warmup 10] [--window 30] [--kwollectors 1,2,3]
       .venv/bin/python benchmarks/scaleout.py --citus [--rows 1000000] [--devices 200]
       [--shard-count 32]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.writer_throughput import TICKS, build, cpu_postgres, cpu_self, feed  # noqa: E402
from kwollect.dev.devcluster import PrivateCluster, start_citus_cluster  # noqa: E402
from kwollect.dev.simulators import free_port  # noqa: E402
from kwollect.store.setupdb import DEFAULTS, setup  # noqa: E402
from kwollect.store.writer import Batch, Writer, WriterOptions  # noqa: E402
from kwollect.store.writer.copy_encoders import samples_copy  # noqa: E402

PASSWORD = "bench"
RO_PASSWORD = "bench-ro"


def cpu_of(pid: int) -> float:
    """CPU seconds of one process (and its waited-for children)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return sum(int(f) for f in fields[11:15]) / TICKS


async def serve(targets: int, metrics: int) -> None:
    """The exporter farm: prints its ports as one JSON line, then serves until killed."""
    page = "".join(f"# TYPE bench_value_{j} gauge\nbench_value_{j} {j * 1.5}\n"
                   for j in range(metrics)).encode()

    async def handler(_request: web.Request) -> web.Response:
        return web.Response(body=page, content_type="text/plain")

    app = web.Application()
    app.router.add_get("/metrics", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    ports = []
    for _ in range(targets):
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        ports.append(port)
    print(json.dumps(ports), flush=True)
    await asyncio.Event().wait()


def kwollector_config(base: Path, metrics_dir: Path, cluster: PrivateCluster, shard: str,
                      prefix: str) -> Path:
    (base / "db.pw").write_text(PASSWORD)
    config = base / f"kwollector-{shard.replace('/', 'of')}.conf"
    config.write_text(
        f"metrics_dir: {metrics_dir}\ndb_host: 127.0.0.1\ndb_port: {cluster.port}\n"
        f"db_name: kwdb\ndb_user: kwuser\ndb_password_file: {base / 'db.pw'}\n"
        f"spool_dir: {base / ('spool-' + shard.replace('/', 'of'))}\nlog_level: warning\n"
        f"self_device_id: {prefix}-self-{shard.replace('/', 'of')}\n"
        f"self_metrics_every_s: 3600\nshard: {shard}\n")
    return config


async def get_metrics_latency(cluster: PrivateCluster, devices: list[str],
                              stop: asyncio.Event) -> list[float]:
    reader = await read_connection(cluster)
    times = []
    while not stop.is_set():
        started = time.perf_counter()
        await reader.fetchval(
            "SELECT count(*) FROM api.get_metrics(devices => $1, "
            "start_time => (now() - interval '10 s')::text, end_time => now()::text)",
            ",".join(devices))
        times.append(time.perf_counter() - started)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 2.0)
    await reader.close()
    return times


async def read_connection(cluster: PrivateCluster) -> asyncpg.Connection:
    return await asyncpg.connect(host="127.0.0.1", port=cluster.port, database="kwdb",
                                 user="kwuser_ro", password=RO_PASSWORD)


async def one_run(k: int, args: argparse.Namespace, ports: list[int], work: Path,
                  cluster: PrivateCluster, farm: subprocess.Popen, postmaster: int) -> dict:
    prefix = f"k{k}"
    metrics_dir = work / f"metrics-{k}.d"
    metrics_dir.mkdir()
    (metrics_dir / "exporters.yaml").write_text("".join(
        f"- name: e\n  device_id: {prefix}-dev-{n}\n  url: 'prometheus://127.0.0.1:{port}/'\n"
        f"  update_every: {args.period_ms}\n" for n, port in enumerate(ports)))
    log = open(work / f"kwollectors-{k}.log", "ab")  # noqa: SIM115 (kept by the processes)
    processes = [subprocess.Popen(
        [sys.executable, "-m", "kwollect.collect.kwollector",
         str(kwollector_config(work, metrics_dir, cluster, f"{i}/{k}", prefix))],
        stdout=log, stderr=log) for i in range(1, k + 1)]
    reader = await read_connection(cluster)
    try:
        # a loaded machine takes seconds to start Python processes: wait until every
        # target's values arrive, then warm up
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and await reader.fetchval(
                "SELECT count(DISTINCT device_id) FROM metrics WHERE device_id LIKE $1 "
                "AND timestamp > now() - interval '5 s'", f"{prefix}-dev-%") < len(ports):
            await asyncio.sleep(1)
        await asyncio.sleep(args.warmup)
        window_start = datetime.now(UTC)
        wal0 = await reader.fetchval("SELECT pg_current_wal_lsn()::text")
        cpu0 = [sum(cpu_of(p.pid) for p in processes), cpu_postgres(postmaster),
                cpu_of(farm.pid)]
        stop = asyncio.Event()
        latency = asyncio.create_task(get_metrics_latency(
            cluster, [f"{prefix}-dev-{n}" for n in range(10)], stop))
        await asyncio.sleep(args.window)
        stop.set()
        cpu1 = [sum(cpu_of(p.pid) for p in processes), cpu_postgres(postmaster),
                cpu_of(farm.pid)]
        window_end = datetime.now(UTC)
        wal_bytes = await reader.fetchval(
            "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), $1::text::pg_lsn)", wal0)
        times = await latency
    finally:
        for p in processes:
            p.send_signal(signal.SIGTERM)
        for p in processes:
            p.wait(timeout=120)
        log.close()
    stored = await reader.fetchval(
        "SELECT count(*) FROM metrics WHERE device_id LIKE $1 AND timestamp >= $2 "
        "AND timestamp < $3", f"{prefix}-dev-%", window_start, window_end)
    duplicates = await reader.fetchval(
        "SELECT count(*) - count(DISTINCT (device_id, metric_id, timestamp)) FROM metrics "
        "WHERE device_id LIKE $1", f"{prefix}-dev-%")
    await reader.close()
    seconds = (window_end - window_start).total_seconds()
    offered = len(ports) * args.metrics * 1000 / args.period_ms
    used = [b - a for a, b in zip(cpu0, cpu1, strict=True)]
    per_10k = [u / max(stored, 1) * 10_000 for u in used]
    return {"kwollectors": k, "offered_per_s": offered, "stored_per_s": stored / seconds,
            "ratio": stored / seconds / offered, "duplicates": duplicates,
            "wal_bytes_per_row": float(wal_bytes) / max(stored, 1),
            "cpu_s_per_10k": {"kwollectors": per_10k[0], "postgresql": per_10k[1],
                              "exporters": per_10k[2]},
            "cores": {"kwollectors": used[0] / seconds, "postgresql": used[1] / seconds},
            "get_metrics_ms": {"median": statistics.median(times) * 1000 if times else None,
                               "max": max(times) * 1000 if times else None,
                               "calls": len(times)}}


async def run(args: argparse.Namespace) -> None:
    cluster = PrivateCluster(settings={"shared_buffers": "1GB"}).start()
    farm = None
    try:
        conf = {**DEFAULTS, "db_host": cluster.socket_dir, "db_port": cluster.port,
                "kwollect_password": PASSWORD, "kwollect_password_ro": RO_PASSWORD}
        await setup(conf)
        postmaster = int((cluster.datadir / "postmaster.pid").read_text().split()[0])
        farm = subprocess.Popen([sys.executable, __file__, "--serve", "--targets",
                                 str(args.targets), "--metrics", str(args.metrics)],
                                stdout=subprocess.PIPE, text=True)
        assert farm.stdout is not None
        ports = json.loads(farm.stdout.readline())
        print(f"# {args.targets} exporters x {args.metrics} metrics every {args.period_ms} ms; "
              f"load average {os.getloadavg()[0]:.1f}", flush=True)
        with tempfile.TemporaryDirectory(prefix="kwollect-scaleout-") as tmp:
            for k in args.kwollectors:
                result = await one_run(k, args, ports, Path(tmp), cluster, farm, postmaster)
                print(json.dumps(result), flush=True)
        print(f"# load average {os.getloadavg()[0]:.1f}")
    finally:
        if farm is not None:
            farm.kill()
            farm.wait()
        cluster.destroy()


BENCH_SETTINGS = {"shared_buffers": "1GB", "max_wal_size": "20GB", "checkpoint_timeout": "30min"}


def postmaster_of(node: PrivateCluster) -> int:
    return int((node.datadir / "postmaster.pid").read_text().split()[0])


async def timed(conn: asyncpg.Connection, query: str, *params, calls: int = 5) -> tuple[float, int]:
    """(median seconds, rows) of `calls` runs of a query."""
    times, rows = [], 0
    for _ in range(calls):
        started = time.perf_counter()
        rows = len(await conn.fetch(query, *params))
        times.append(time.perf_counter() - started)
    return statistics.median(times), rows


async def storage_run(layout: str, nodes: list[PrivateCluster], args: argparse.Namespace) -> dict:
    """Ingest through the writer, then reads, on one layout (one node, or Citus nodes)."""
    coordinator, *workers = nodes
    conf = {**DEFAULTS, "db_host": coordinator.socket_dir, "db_port": coordinator.port,
            "kwollect_password": PASSWORD, "kwollect_password_ro": RO_PASSWORD,
            "timescaledb": "off"}
    if workers:
        conf.update(citus=True, citus_shard_count=args.shard_count,
                    citus_coordinator=f"{coordinator.socket_dir}:{coordinator.port}",
                    citus_workers=",".join(f"127.0.0.1:{w.port}" for w in workers))
    await setup(conf)
    kwargs = {"host": "127.0.0.1", "port": coordinator.port, "database": "kwdb",
              "user": "kwuser", "password": PASSWORD}
    lists = build(args.devices, args.rows)
    writer = Writer(kwargs, WriterOptions(batch_max_rows=10_000, pool_size=2))
    await writer.start()
    writer.submit(lists[0])  # warm-up: series ids and partitions
    while writer.stats()["inserted"] < len(lists[0]):
        await asyncio.sleep(0.01)
    postmasters = [postmaster_of(node) for node in nodes]
    cpu0, pg0, t0 = cpu_self(), sum(map(cpu_postgres, postmasters)), time.perf_counter()
    await feed(writer, lists[1:], 0, 40_000)
    total = sum(map(len, lists))
    while writer.stats()["inserted"] < total:
        await asyncio.sleep(0.005)
    elapsed = time.perf_counter() - t0
    cpu, pg = cpu_self() - cpu0, sum(map(cpu_postgres, postmasters)) - pg0
    series = writer._series  # the ids the writer resolved, for the direct COPY below
    await writer.close()
    rows = total - len(lists[0])
    admin = await asyncpg.connect(host=coordinator.socket_dir, port=coordinator.port,
                                  user="postgres", database="kwdb")
    await admin.execute("SELECT kwollect.maintain()")
    reader = await read_connection(coordinator)
    devices = ",".join(f"node-{d + 1}" for d in range(10))
    window = ("2025-03-03T00:00:00", "2025-03-04T00:00:00")
    query = ("SELECT * FROM api.get_metrics(devices => $1, start_time => $2, end_time => $3"
             "{})")
    raw_s, raw_rows = await timed(reader, query.format(""), devices, *window)
    summary_s, summary_rows = await timed(reader, query.format(", summary => true"), devices,
                                          *window)
    result = {"layout": layout, "rows": rows, "rows_per_s": rows / elapsed,
              "writer_cpu_s_per_10k": cpu / rows * 10_000,
              "postgresql_cpu_s_per_10k": pg / rows * 10_000,
              "postgresql_cores": pg / elapsed,
              "get_metrics_ms": raw_s * 1000, "get_metrics_rows": raw_rows,
              "summary_ms": summary_s * 1000, "summary_rows": summary_rows}
    if workers:
        result["copy_100k"] = await direct_copy(lists, series, coordinator, workers[0])
    await reader.close()
    await admin.close()
    return result


async def direct_copy(lists: list, series, coordinator: PrivateCluster,
                      worker: PrivateCluster) -> dict:
    """One binary COPY of the same 100,000 rows (timestamps a day later: a fresh range of
    the same partition) through the coordinator, then straight into a worker."""
    readings = [r for readings in lists for r in readings][:100_000]
    handles = series.handles_of(readings)
    shifted = [r[0] + 3_600_000_000 for r in readings]
    batch = Batch(uuid.uuid4(), shifted, [r[3] for r in readings], handles)
    data = samples_copy(batch, series.sids)
    out = {}
    for name, node in (("coordinator", coordinator), ("worker", worker)):
        conn = await asyncpg.connect(host="127.0.0.1", port=node.port, database="kwdb",
                                     user="kwuser", password=PASSWORD)
        started = time.perf_counter()
        await conn.copy_to_table("samples", schema_name="kwollect", source=memoryview(data),
                                 columns=["ts", "value", "series_id"], format="binary")
        out[f"{name}_rows_per_s"] = len(readings) / (time.perf_counter() - started)
        await conn.close()
    return out


async def citus_comparison(args: argparse.Namespace) -> None:
    print(f"# writer only: {args.devices} devices x 10 metrics, {args.rows:,} rows; "
          f"{args.shard_count} shards; "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)
    for layout in ("one node", "coordinator + 2 workers"):
        nodes = ([PrivateCluster(settings=BENCH_SETTINGS).start()] if layout == "one node"
                 else start_citus_cluster(2, BENCH_SETTINGS))
        try:
            print(json.dumps(await storage_run(layout, nodes, args)), flush=True)
        finally:
            for node in nodes:
                node.destroy()
    print(f"# load average {os.getloadavg()[0]:.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", type=int, default=100)
    parser.add_argument("--metrics", type=int, default=100)
    parser.add_argument("--period-ms", type=int, default=1000)
    parser.add_argument("--warmup", type=float, default=10)
    parser.add_argument("--window", type=float, default=30)
    parser.add_argument("--kwollectors", type=lambda s: [int(x) for x in s.split(",")],
                        default=[1, 2, 3])
    parser.add_argument("--citus", action="store_true",
                        help="one node against a Citus coordinator and two workers")
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--shard-count", type=int, default=32)
    parser.add_argument("--devices", type=int, default=200)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.citus:
        asyncio.run(citus_comparison(args))
    elif args.serve:
        asyncio.run(serve(args.targets, args.metrics))
    else:
        asyncio.run(run(args))


if __name__ == "__main__":
    main()
