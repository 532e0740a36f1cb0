"""kwollector-wattmetre ingest: values/s and CPU per 10,000 values, 48 ports x 50 Hz raw.

Starts its own private PostgreSQL cluster, sets kwollect up, promotes every port (so every
50 Hz sample is stored raw) and runs the real `kwollector-wattmetre` program on lines from
tests/wattmetre_gen.py (the real v2 format), in two ways:

- paced (default): INSTANCES programs, each fed by the generator in --realtime at SPEEDUP
  times the wattmetre's 50 frames/s.  The project's goal is 20 wattmetres (48,000 values/s)
  within one core: run ``--instances 20 --speedup 1`` or ``--instances 1 --speedup 20``;
- --max: one program fed as fast as it reads from a pre-generated file through a pipe.

For each program it reads the CPU time (user + system, from wait4) and prints values/s,
CPU per 10,000 values and the share of a core; it then checks that every value is stored.

Usage: .venv/bin/python benchmarks/wattmetre_ingest.py [--instances 1] [--speedup 20]
       [--seconds 20] [--max --max-seconds 600]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import asyncpg

from kwollect.dev.devcluster import PrivateCluster
from kwollect.store.setupdb import DEFAULTS, setup

GENERATOR = Path(__file__).resolve().parent.parent / "tests" / "wattmetre_gen.py"
PROGRAM = [sys.executable, "-m", "kwollect.collect.kwollector_wattmetre"]
PORTS = 48
RATE = 50
PASSWORD = "bench"
TICKS = os.sysconf("SC_CLK_TCK")
WARMUP_S = 4


def write_conf(directory: Path, cluster: PrivateCluster, wattmetre_id: str) -> Path:
    (directory / "password").write_text(PASSWORD)
    path = directory / f"{wattmetre_id}.yaml"
    path.write_text(f"wattmetre_id: {wattmetre_id}\nwattmetre_version: 2\n"
                    f"db_host: 127.0.0.1\ndb_port: {cluster.port}\ndb_name: kwdb\n"
                    f"db_user: kwuser\ndb_password_file: {directory / 'password'}\n"
                    f"spool_dir: {directory / ('spool-' + wattmetre_id)}\n"
                    f"log_level: warning\n")
    return path


def start(conf: Path, feeder: list[str] | Path) -> tuple[subprocess.Popen, subprocess.Popen]:
    """feeder | kwollector-wattmetre conf; a Path feeder is a file given through `cat`."""
    command = ["cat", str(feeder)] if isinstance(feeder, Path) else feeder
    source = subprocess.Popen(command, stdout=subprocess.PIPE)
    program = subprocess.Popen([*PROGRAM, str(conf)], stdin=source.stdout)
    assert source.stdout is not None
    source.stdout.close()
    return source, program


def cpu_of(program: subprocess.Popen) -> float:
    """Wait for the program; its CPU seconds (user + system)."""
    _, status, usage = os.wait4(program.pid, 0)
    program.returncode = os.waitstatus_to_exitcode(status)
    if program.returncode:
        raise SystemExit(f"kwollector-wattmetre exited with {program.returncode}")
    return usage.ru_utime + usage.ru_stime


async def promote(conn: asyncpg.Connection, wattmetre_ids: list[str]) -> None:
    await conn.executemany("INSERT INTO promoted_metrics (device_id, metric_id) VALUES ($1, NULL)",
                           [(f"{wid}-port{p}",) for wid in wattmetre_ids for p in range(PORTS)])


async def stored(conn: asyncpg.Connection, wattmetre_id: str) -> int:
    return await conn.fetchval(
        "SELECT count(*) FROM kwollect.samples s JOIN kwollect.series se USING (series_id) "
        "WHERE se.device_id LIKE $1", f"{wattmetre_id}-port%")


def report(label: str, values: int, wall: float, cpu: float) -> None:
    print(f"{label}: {values:,} values in {wall:.1f} s = {values / wall:,.0f} values/s; "
          f"CPU {cpu:.1f} s = {cpu / values * 10_000 * 1000:.1f} ms per 10,000 values, "
          f"{cpu / wall:.0%} of a core")


def cpu_now(pid: int) -> float:
    """CPU seconds (user + system) a running process used so far, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


async def paced(args: argparse.Namespace, cluster: PrivateCluster, conn: asyncpg.Connection,
                work: Path) -> None:
    ids = [f"bench-wm{i}" for i in range(args.instances)]
    await promote(conn, ids)
    rate = RATE * args.speedup
    runs = [start(write_conf(work, cluster, wid),
                  [sys.executable, str(GENERATOR), "--ports", str(PORTS), "--rate", str(rate),
                   "--seconds", str(args.seconds), "--realtime"]) for wid in ids]
    t0 = time.perf_counter()
    # steady state: from WARMUP s after the start to 1 s before the input ends
    await asyncio.sleep(WARMUP_S)
    steady0 = sum(cpu_now(program.pid) for _, program in runs), time.perf_counter()
    await asyncio.sleep(args.seconds - WARMUP_S - 1)
    steady1 = sum(cpu_now(program.pid) for _, program in runs), time.perf_counter()
    cpus = [cpu_of(program) for _, program in runs]
    wall = time.perf_counter() - t0
    for source, _ in runs:
        source.wait()
    values = args.instances * PORTS * rate * args.seconds
    for wid in ids:
        assert await stored(conn, wid) == PORTS * rate * args.seconds, wid
    label = f"{args.instances} instance(s) x {args.speedup} x 50 Hz x {PORTS} ports, raw"
    report(f"{label}, whole run (startup included)", values, wall, sum(cpus))
    span = steady1[1] - steady0[1]
    report(f"{label}, steady state", int(args.instances * PORTS * rate * span), span,
           steady1[0] - steady0[0])


async def as_fast_as_possible(args: argparse.Namespace, cluster: PrivateCluster,
                              conn: asyncpg.Connection, work: Path) -> None:
    await promote(conn, ["bench-max"])
    lines = work / "lines.csv"
    with open(lines, "wb") as out:
        subprocess.run([sys.executable, str(GENERATOR), "--ports", str(PORTS), "--seconds",
                        str(args.max_seconds)], stdout=out, check=True)
    source, program = start(write_conf(work, cluster, "bench-max"), lines)
    t0 = time.perf_counter()
    cpu = cpu_of(program)
    wall = time.perf_counter() - t0
    source.wait()
    values = PORTS * RATE * args.max_seconds
    assert await stored(conn, "bench-max") == values
    report(f"as fast as possible, one instance, {args.max_seconds} s of 50 Hz x {PORTS} ports "
           f"(startup and final flush included)", values, wall, cpu)


async def run(args: argparse.Namespace) -> None:
    cluster = PrivateCluster(settings={"shared_buffers": "1GB", "max_wal_size": "20GB",
                                       "checkpoint_timeout": "30min"}).start()
    try:
        await setup({**DEFAULTS, "db_host": cluster.socket_dir, "db_port": cluster.port,
                     "kwollect_password": PASSWORD})
        conn = await asyncpg.connect(cluster.dsn(database="kwdb"))
        with tempfile.TemporaryDirectory(prefix="kwollect-wm-bench-") as tmp:
            if args.max:
                await as_fast_as_possible(args, cluster, conn, Path(tmp))
            else:
                await paced(args, cluster, conn, Path(tmp))
        await conn.close()
    finally:
        cluster.destroy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=1)
    parser.add_argument("--speedup", type=int, default=20)
    parser.add_argument("--seconds", type=int, default=20)
    parser.add_argument("--max", action="store_true")
    parser.add_argument("--max-seconds", type=int, default=600)
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
