"""get_job_metrics of a job over the row bound: its figures from the 5-minute summaries
(method 'summary') against the same figures from every raw row (method 'raw').

Starts a private cluster with a stock database holding benchmarks/dataset.sql (DEVICES
devices x 10 metrics x 1 sample/s with 0-19 ms of jitter, from 2025-01-06 00:00 UTC for
HOURS hours), summarized, and a job on the first two devices from 00:03:17.5 to 51 minutes
and 2 s before the data's end (partial buckets at both edges).  get_job_metrics is called
three times without a row bound below the job's rows (method raw) and three times with
kwollect.max_rows = 10,000 (method summary); the last call of each is timed from the client
with its backend's CPU.  Prints both timings and, per node, the relative difference of the
energy and mean power, and whether peaks and completeness figures are equal.

Usage: nice -n 10 .venv/bin/python benchmarks/job_metrics.py [--devices 2] [--hours 12]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kwollect.dev.devcluster import PrivateCluster  # noqa: E402
from kwollect.store.setupdb import DEFAULTS, setup  # noqa: E402

START = datetime(2025, 1, 6, tzinfo=UTC)
JOB = 9901


def backend_cpu_s(pid: int) -> float:
    """User + system CPU of the backend `pid`, from /proc (the cluster runs on this host)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


async def job_metrics(conn: asyncpg.Connection, max_rows: int | None) -> tuple[dict, float, float]:
    """get_job_metrics(JOB) under `max_rows` (None: the setting), with its wall-clock and
    backend CPU seconds."""
    pid = conn.get_server_pid()
    cpu0, t0 = backend_cpu_s(pid), time.perf_counter()
    async with conn.transaction():
        if max_rows is not None:
            await conn.execute("SELECT set_config('kwollect.max_rows', $1, true)", str(max_rows))
        result = json.loads(await conn.fetchval("SELECT api.get_job_metrics($1)", JOB))
    return result, time.perf_counter() - t0, backend_cpu_s(pid) - cpu0


async def run(args: argparse.Namespace) -> None:
    cluster = PrivateCluster(settings={"shared_buffers": "1GB", "work_mem": "64MB",
                                       "autovacuum": "off"})
    cluster.start()
    try:
        name = "job_metrics"
        await setup({**DEFAULTS, "db_host": cluster.socket_dir, "db_port": cluster.port,
                     "kwollect_password": "bench-writer", "kwollect_db_name": name,
                     "timescaledb": "off"})
        dsn = cluster.dsn(database=name)
        proc = subprocess.run(
            [str(cluster.bindir / "psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1",
             "-v", f"devices={args.devices}", "-v", f"seconds={args.hours * 3600}",
             "-d", dsn, "-f", str(Path(__file__).with_name("dataset.sql"))],
            stdout=subprocess.DEVNULL, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"benchmarks/dataset.sql failed (psql exit {proc.returncode})")
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute("INSERT INTO metrics SELECT * FROM gen_rows")
            while await conn.fetchval("SELECT kwollect.refresh_summary()"):
                pass
            await conn.execute("VACUUM ANALYZE")
            stop = START + timedelta(hours=args.hours) - timedelta(minutes=51, seconds=2)
            await conn.execute(
                "INSERT INTO nodetime_per_job SELECT $1, $2, $3, 'node-' || d "
                "FROM generate_series(1, 2) d", JOB, START + timedelta(minutes=3, seconds=17.5),
                stop)
            rows = await conn.fetchval("SELECT count(*) FROM api.get_metrics(job_id => $1)", JOB)
            out = {}
            for bound in (None, 10_000):
                for _ in range(3):
                    result, wall, cpu = await job_metrics(conn, bound)
                out[result["method"]] = result
                print(f"method {result['method']}: {wall:.3f} s, backend CPU {cpu:.3f} s")
        finally:
            await conn.close()
    finally:
        cluster.destroy()
    raw, summary = out["raw"], out["summary"]
    print(f"job of {rows:,} raw rows; load average {os.getloadavg()[0]:.2f}")
    for key in ("node_energy_watthour", "node_mean_power_watt"):
        for node, value in raw[key].items():
            print(f"{key} {node}: raw {value:.4f}, summary {summary[key][node]:.4f}, "
                  f"relative difference {summary[key][node] / value - 1:+.2e}")
    print("peaks equal:", summary["node_peak_power_watt"] == raw["node_peak_power_watt"])
    fields = ("stored", "expected", "period_s", "ratio")
    print("stored, expected, period_s, ratio equal:",
          [{f: c[f] for f in fields} for c in summary["completeness"]]
          == [{f: c[f] for f in fields} for c in raw["completeness"]])
    gaps = [abs(s["max_gap_s"] - r["max_gap_s"])
            for s, r in zip(summary["completeness"], raw["completeness"], strict=True)]
    print(f"max_gap_s: largest difference {max(gaps):.3f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--hours", type=int, default=12)
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
