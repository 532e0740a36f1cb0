"""kwollect-api under load on a stock PostgreSQL: 55 clients, p50/p99, errors, RSS, connections.

Starts a private cluster with PostgreSQL's stock settings (jit on, fsync on; only the
time zone is set), sets kwollect up in it, loads 20 devices x 10 metrics x 1 hour at 1 Hz,
starts kwollect-api (db-pool 10, as installed), then runs CLIENTS concurrent clients for
DURATION seconds each, looping over small `get_metrics` reads (one device, one metric,
one minute: 60 rows), `available_metrics` and `get_job_metrics`.  Three rounds, side by
side in one run:

- "stock, jit on": the database's `jit = off` (which setup sets) removed, i.e. what a
  stock server gave before setup set it;
- "setup (jit off)": the database as kwollect-setup-db leaves it;
- "+12 stalled": the same, with 12 of the 55 clients asking for a 100,000-row export
  and never reading it (they held 10 of 10 connections before responses were spooled);
  all from one address, so kwollect-max-exports-per-client (4) refuses 8 with a 429.

Printed per round: requests/s, p50 and p99 latency, errors by status, the gateway's peak
RSS (sampled every 50 ms), and the peak number of database connections the gateway held.

Usage: .venv/bin/python benchmarks/api_load.py [--clients 55] [--duration 30]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import socket
import statistics
import sys
import tempfile
import time
import urllib.parse
from datetime import datetime, timedelta
from pathlib import Path

import aiohttp
import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.gateway_stream import START, load, proc_status, start_gateway  # noqa: E402
from kwollect.dev.devcluster import PrivateCluster  # noqa: E402
from kwollect.store.setupdb import DEFAULTS, setup  # noqa: E402


def requests_for(url: str, i: int) -> str:
    minute = START + timedelta(minutes=i % 50)
    device = f"node-{1 + i % 20}"
    kind = i % 10
    if kind == 8:
        return f"{url}/rpc/available_metrics?at={quote(minute + timedelta(seconds=30))}"
    if kind == 9:
        return f"{url}/rpc/get_job_metrics?job_id=1"
    end = minute + timedelta(seconds=59)
    return (f"{url}/rpc/get_metrics?devices={device}&metrics=bmc_node_power_watt"
            f"&start_time={quote(minute)}&end_time={quote(end)}")


def quote(moment: datetime) -> str:
    return urllib.parse.quote(moment.isoformat())


async def client(session: aiohttp.ClientSession, url: str, offset: int, stop: float,
                 latencies: list[float], statuses: collections.Counter) -> None:
    i = offset
    while time.monotonic() < stop:
        started = time.perf_counter()
        try:
            async with session.get(requests_for(url, i),
                                   timeout=aiohttp.ClientTimeout(total=60)) as resp:
                await resp.read()
                statuses[resp.status] += 1
        except (aiohttp.ClientError, TimeoutError) as exc:
            statuses[type(exc).__name__] += 1
        latencies.append(time.perf_counter() - started)
        i += 7


async def sample(pid: int, admin: asyncpg.Connection, stop: float, peaks: dict) -> None:
    while time.monotonic() < stop:
        peaks["rss_kb"] = max(peaks["rss_kb"], proc_status(pid).get("VmRSS", 0))
        peaks["connections"] = max(peaks["connections"], await admin.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'kwollect-api'"))
        await asyncio.sleep(0.05)


def stalled_exports(url: str, count: int) -> list[socket.socket]:
    """Clients asking for 100,000 rows (12 MB of JSON) and never reading their socket."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    devices = "node-1,node-2"
    request = (f"GET /rpc/get_metrics?devices={devices}&start_time={quote(START)}"
               f"&end_time={quote(START + timedelta(hours=2))} HTTP/1.1\r\n"
               f"Host: {host}\r\n\r\n").encode()
    socks = []
    for _ in range(count):
        sock = socket.create_connection((host, int(port)))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.sendall(request)
        socks.append(sock)
    return socks


def answered(socks: list[socket.socket]) -> collections.Counter:
    """How the stalled exports were answered: streaming (200) or refused by a cap (429)."""
    statuses: collections.Counter = collections.Counter()
    for sock in socks:
        sock.settimeout(1)
        try:
            statuses[sock.recv(12).decode(errors="replace")[9:12] or "closed"] += 1
        except OSError:
            statuses["no answer"] += 1
    return statuses


async def round_(name: str, url: str, pid: int, admin: asyncpg.Connection,
                 clients: int, duration: float) -> None:
    latencies: list[float] = []
    statuses: collections.Counter = collections.Counter()
    peaks = {"rss_kb": 0, "connections": 0}
    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector) as session:
        stop = time.monotonic() + duration
        started = time.monotonic()
        await asyncio.gather(sample(pid, admin, stop, peaks),
                             *(client(session, url, n, stop, latencies, statuses)
                               for n in range(clients)))
        elapsed = time.monotonic() - started
    cuts = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else [0.0] * 99
    errors = {k: v for k, v in statuses.items() if k != 200}
    print(f"{name:>17} {len(latencies) / elapsed:>9.1f} {cuts[49] * 1000:>8.0f} "
          f"{cuts[98] * 1000:>8.0f} {sum(errors.values()):>7} {peaks['rss_kb'] / 1024:>8.0f} "
          f"{peaks['connections']:>6}   {dict(errors) or ''}")


async def run(args: argparse.Namespace) -> None:
    cluster = PrivateCluster(settings={"timezone": "Europe/Paris"}, stock=True).start()
    work = Path(tempfile.mkdtemp(prefix="kwollect-api-load-"))
    process = None
    try:
        conf = {**DEFAULTS, "db_host": cluster.socket_dir, "db_port": cluster.port,
                "kwollect_password": "bench", "kwollect_password_ro": "bench-ro"}
        config, _ = await setup(conf)
        dsn = cluster.dsn(database="kwdb")
        await load(dsn)
        admin = await asyncpg.connect(dsn)
        await admin.execute("INSERT INTO nodetime_per_job SELECT 1, $1::timestamptz, "
                            "$1::timestamptz + interval '20 minutes', node "
                            "FROM unnest(ARRAY['node-1', 'node-2']) node", START)
        process, url, _ = start_gateway(config, work)
        print(f"{args.clients} clients, {args.duration:g} s per round, stock PostgreSQL "
              f"settings, db-pool 10; load average {os.getloadavg()[0]:.1f} at the start\n")
        print(f"{'database':>17} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7} "
              f"{'RSS MB':>8} {'conns':>6}")
        for name, jit, stalled in (("stock, jit on", "on", 0), ("setup (jit off)", "off", 0),
                                   ("+12 stalled", "off", 12)):
            await admin.execute(f"ALTER DATABASE kwdb SET jit = {jit}")
            # new sessions take the database setting: restart the gateway's pool
            process.terminate()
            process.wait(timeout=30)
            process, url, _ = start_gateway(config, work)
            socks = stalled_exports(url, stalled)
            try:
                await round_(name, url, process.pid, admin, args.clients - stalled,
                             args.duration)
                if socks:
                    print(f"{'':>17} the stalled exports: {dict(answered(socks))} "
                          "(429: refused by kwollect-max-exports-per-client)")
            finally:
                for sock in socks:
                    sock.close()
        await admin.execute("ALTER DATABASE kwdb SET jit = off")
        await admin.close()
        print(f"\nload average {os.getloadavg()[0]:.1f} at the end")
    finally:
        if process is not None and process.poll() is None:
            process.terminate()
            process.wait(timeout=30)
        cluster.destroy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=55)
    parser.add_argument("--duration", type=float, default=30.0)
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
