"""kwollect-api streaming benchmark: rows/s to the last byte, and peak memory, at 100k and 1M rows.

Starts a private PostgreSQL cluster, sets kwollect up in it, loads DEVICES devices x 10
metrics at 1 Hz with a fast binary COPY into kwollect.samples, starts the real kwollect-api
process, then GETs /rpc/get_metrics for 100,000 and 1,000,000 rows in each format.  For
each request it prints rows/s measured to the last byte received, and the peak resident
memory (sampled every 10 ms from /proc) of the gateway process and of the database backend
serving it (its private memory, RssAnon, and its total RSS, which also counts the shared
buffers it touched).

It also prints the database backend's CPU time per million rows for the two ways of
making JSON considered: PostgreSQL's text output of each column, which the gateway turns
into JSON (what kwollect-api does), and row_to_json() in the backend.

Usage: .venv/bin/python benchmarks/gateway_stream.py [--repeat 3] [--formats json,ndjson,csv]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import random
import re
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
import asyncpg

from kwollect.dev.devcluster import PrivateCluster
from kwollect.store.setupdb import DEFAULTS, setup

DEVICES = 20
METRICS = ["bmc_node_power_watt", "wattmetre_power_watt", "pdu_outlet_power_watt",
           "prom_node_network_receive_bytes_total", "prom_node_network_transmit_bytes_total",
           "prom_node_disk_read_bytes_total", "bmc_temp_cpu_celsius", "bmc_fan_speed_rpm",
           "bmc_psu_input_voltage_volt", "prom_node_memory_MemTotal_bytes"]
START = datetime(2025, 1, 6, tzinfo=UTC)
SECONDS = 5_000                         # 20 x 10 x 5000 = 1,000,000 rows
PG_EPOCH_US = 946_684_800_000_000
ROW = struct.Struct(">hiqidii")
HEADER = b"PGCOPY\n\xff\r\n\x00" + struct.pack(">ii", 0, 0)
TRAILER = struct.pack(">h", -1)
ACCEPT = {"json": "application/json", "ndjson": "application/x-ndjson", "csv": "text/csv"}


def encode(seconds: range, ids: list[int], rng: random.Random) -> bytes:
    """Binary COPY rows (ts, value, series_id) for every series, one sample per second."""
    out = bytearray(HEADER)
    base = int(START.timestamp() * 1e6) - PG_EPOCH_US
    for second in seconds:
        ts = base + second * 1_000_000 + rng.randrange(20) * 1000
        for sid in ids:
            out += ROW.pack(3, 8, ts, 8, 100.0 + rng.randrange(2700) / 10, 4, sid)
    return bytes(out + TRAILER)


async def load(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    ids = await conn.fetchval(
        "SELECT kwollect.series_ids($1, $2, $3::jsonb[])",
        [f"node-{d}" for d in range(1, DEVICES + 1) for _ in METRICS],
        [m for _ in range(DEVICES) for m in METRICS], ["{}"] * DEVICES * len(METRICS))
    await conn.execute("SELECT kwollect.ensure_partitions(ARRAY[$1::timestamptz, $2])",
                       START, START + timedelta(seconds=SECONDS))
    rng = random.Random(7)
    for first in range(0, SECONDS, 500):
        await conn.copy_to_table("samples", schema_name="kwollect", format="binary",
                                 source=io.BytesIO(encode(range(first, first + 500), ids, rng)),
                                 columns=["ts", "value", "series_id"])
    await conn.execute("VACUUM ANALYZE kwollect.samples")
    await conn.close()


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssShmem in kB."""
    values = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssShmem"):
                values[key] = int(rest.split()[0])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return values


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100


class Sampler:
    """Peak RSS (every 10 ms) and CPU time of the gateway and of the backends serving it."""

    def __init__(self, gateway_pid: int, admin: asyncpg.Connection) -> None:
        self.gateway_pid = gateway_pid
        self.admin = admin
        self.gateway_peak = 0
        self.backend_peak = {"RssAnon": 0, "VmRSS": 0}
        self.gateway_cpu = 0.0
        self.backend_cpu = 0.0
        self._task: asyncio.Task | None = None
        self._stop = False
        self._cpu0: dict[int, float] = {}

    async def _backends(self) -> set[int]:
        rows = await self.admin.fetch(
            "SELECT pid FROM pg_stat_activity WHERE application_name = 'kwollect-api'")
        return {r["pid"] for r in rows}

    async def _run(self) -> None:
        while not self._stop:
            self.gateway_peak = max(self.gateway_peak,
                                    proc_status(self.gateway_pid).get("VmRSS", 0))
            for pid in await self._backends():
                status = proc_status(pid)
                for key in self.backend_peak:
                    self.backend_peak[key] = max(self.backend_peak[key], status.get(key, 0))
            await asyncio.sleep(0.01)

    async def __aenter__(self) -> Sampler:
        self._cpu0 = {pid: cpu_seconds(pid) for pid in await self._backends()}
        self._cpu0[self.gateway_pid] = cpu_seconds(self.gateway_pid)
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._stop = True
        await self._task   # the admin connection is free again
        self.gateway_cpu = cpu_seconds(self.gateway_pid) - self._cpu0[self.gateway_pid]
        self.backend_cpu = sum(cpu_seconds(pid) - self._cpu0.get(pid, 0.0)
                               for pid in await self._backends())


async def stream(session: aiohttp.ClientSession, url: str, accept: str) -> tuple[int, float]:
    """(bytes, seconds to the last byte)."""
    size = 0
    started = time.perf_counter()
    async with session.get(url, headers={"Accept": accept}) as resp:
        resp.raise_for_status()
        async for chunk in resp.content.iter_any():
            size += len(chunk)
    return size, time.perf_counter() - started


def start_gateway(config: str, directory: Path) -> tuple[subprocess.Popen, str, Path]:
    path = directory / "api.conf"
    path.write_text(config + 'server-host = "127.0.0.1"\nserver-port = 0\n'
                    'log-level = "info"\nkwollect-max-rows = 0\n')
    log = directory / "api.log"
    command = [str(Path(sys.executable).parent / "kwollect-api"), str(path)]
    with open(log, "wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        match = re.search(r"listening on (http://\S+?)[, ]", log.read_text())
        if match:
            return process, match.group(1), log
        if process.poll() is not None:
            break
        time.sleep(0.05)
    process.kill()
    raise RuntimeError(f"kwollect-api did not start:\n{log.read_text()}")


async def backend_json_cost(dsn: str, devices: str, end: str) -> dict[str, float]:
    """Backend CPU seconds per 1M rows for column text output vs row_to_json (COPY, UTC)."""
    conn = await asyncpg.connect(dsn, server_settings={"TimeZone": "UTC"})
    await conn.execute("SET kwollect.max_rows = 0")
    pid = await conn.fetchval("SELECT pg_backend_pid()")
    args = (devices, START.isoformat(), end)
    variants = {
        "count(*) only (the query itself)":
            "SELECT count(*) FROM api.get_metrics(devices => $1, start_time => $2, "
            "end_time => $3)",
        "column text output (kwollect-api)":
            "SELECT t.* FROM api.get_metrics(devices => $1, start_time => $2, "
            "end_time => $3) t",
        "row_to_json(t) in the backend":
            "SELECT row_to_json(t) FROM api.get_metrics(devices => $1, start_time => $2, "
            "end_time => $3) t"}
    results = {}
    rows = await conn.fetchval(variants["count(*) only (the query itself)"], *args)

    async def discard(_: bytes) -> None:
        return None

    for name, query in variants.items():
        best = float("inf")
        for _ in range(2):
            before = cpu_seconds(pid)
            if query.startswith("SELECT count"):
                await conn.fetchval(query, *args)
            else:
                await conn.copy_from_query(query, *args, output=discard, format="csv",
                                           quote="\x01", delimiter="\x02")
            best = min(best, cpu_seconds(pid) - before)
        results[name] = best * 1e6 / rows
    await conn.close()
    return results


async def run(args: argparse.Namespace) -> None:
    cluster = PrivateCluster(settings={"shared_buffers": "512MB", "max_wal_size": "4GB",
                                       "fsync": "off", "synchronous_commit": "off"}).start()
    work = Path(tempfile.mkdtemp(prefix="kwollect-gw-bench-"))
    process = None
    try:
        conf = {**DEFAULTS, "db_host": cluster.socket_dir, "db_port": cluster.port,
                "kwollect_password": "bench"}
        config, _ = await setup(conf)
        dsn = cluster.dsn(database="kwdb")
        t0 = time.perf_counter()
        await load(dsn)
        print(f"loaded {DEVICES * len(METRICS) * SECONDS:,} rows in "
              f"{time.perf_counter() - t0:.1f} s")
        process, url, _ = start_gateway(config, work)
        admin = await asyncpg.connect(dsn)
        devices = ",".join(f"node-{d}" for d in range(1, DEVICES + 1))
        sizes = {100_000: 500, 1_000_000: SECONDS}
        async with aiohttp.ClientSession() as session:
            await stream(session, f"{url}/rpc/get_metrics?devices=node-1", "application/json")
            print(f"\n{'rows':>10} {'format':>7} {'MB':>5} {'rows/s (median, best)':>22} "
                  f"{'gateway RSS':>12} {'backend RssAnon':>16} {'backend RSS':>12} "
                  f"{'rows per CPU-second: gateway, backend':>38}")
            for rows, seconds in sizes.items():
                end = (START + timedelta(seconds=seconds - 1)).isoformat()
                query = (f"{url}/rpc/get_metrics?devices={devices}"
                         f"&start_time={START.isoformat()}&end_time={end}")
                for fmt in args.formats.split(","):
                    rates = []
                    async with Sampler(process.pid, admin) as sampler:
                        for _ in range(args.repeat):
                            size, elapsed = await stream(session, query.replace("+", "%2B"),
                                                         ACCEPT[fmt])
                            rates.append(rows / elapsed)
                    total = rows * args.repeat
                    print(f"{rows:>10,} {fmt:>7} {size / 1e6:>5.0f} "
                          f"{statistics.median(rates):>11,.0f} {max(rates):>10,.0f} "
                          f"{sampler.gateway_peak / 1024:>9.0f} MB "
                          f"{sampler.backend_peak['RssAnon'] / 1024:>13.0f} MB "
                          f"{sampler.backend_peak['VmRSS'] / 1024:>9.0f} MB "
                          f"{total / sampler.gateway_cpu:>20,.0f} "
                          f"{total / sampler.backend_cpu:>16,.0f}")
        print(f"\ngateway peak RSS over the whole run (VmHWM): "
              f"{proc_status(process.pid).get('VmHWM', 0) / 1024:.0f} MB")
        await admin.close()
        print("\ndatabase backend CPU per 1M rows of get_metrics "
              f"({DEVICES} devices x {len(METRICS)} metrics), COPY to a discarding client:")
        costs = await backend_json_cost(dsn, devices,
                                        (START + timedelta(seconds=SECONDS - 1)).isoformat())
        for name, cost in costs.items():
            print(f"  {name:<36} {cost:.2f} s  (at most {1 / cost * 1e6:,.0f} rows/s "
                  f"on one core)")
    finally:
        if process is not None:
            process.terminate()
            process.wait(timeout=30)
        cluster.destroy()
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--formats", default="json,ndjson,csv")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
