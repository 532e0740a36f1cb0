"""Soak: the writer through network partitions that hang instead of failing (not run by the
test suite; tests/test_writer.py::test_a_hung_link_spools_says_offline_and_reconnects is the
short, asserted version).

Starts a private PostgreSQL cluster (kwollect.dev.devcluster), puts a loopback TCP proxy
(kwollect.dev.simulators.tcp_proxy) between it and a writer with a spool, and submits
`rate` rows per second for `seconds`; every cycle the proxy stops forwarding for
`hang` seconds (connections stay open, bytes are held), then forwards again.  In the middle
of one partition the writer is stopped (as by SIGTERM) and a new one started on the same
spool, as a restarted kwollector would.  Prints collected vs stored, duplicates, rows
dropped, how long the writer took to say offline, and the peak RSS.

Usage: .venv/bin/python benchmarks/soak_partition.py [seconds] [rows/s] [hang seconds]
"""

from __future__ import annotations

import asyncio
import resource
import sys
import tempfile
import time
from pathlib import Path

import asyncpg

from kwollect.dev.devcluster import PrivateCluster
from kwollect.dev.simulators.tcp_proxy import TcpProxy
from kwollect.model import Reading
from kwollect.store.setupdb import DEFAULTS, setup
from kwollect.store.writer import Writer, WriterOptions

PASSWORD = "soak-partition"
DEVICES = 100


async def soak(cluster: PrivateCluster, spool: Path, seconds: int, rate: int,
               hang: float) -> None:
    proxy = await TcpProxy(cluster.port).start()
    kwargs = {"host": "127.0.0.1", "port": proxy.port, "database": "kwdb", "user": "kwuser",
              "password": PASSWORD, "ssl": False}
    options = WriterOptions(spool_dir=spool, batch_timeout_s=5.0, connect_timeout_s=5.0,
                            retry_max_s=2.0)
    writers = [Writer(kwargs, options)]
    await writers[0].start()
    labels = {"soak": "partition"}
    per_device = max(1, rate // DEVICES)
    submitted = 0
    offline_after: list[float] = []
    hung_at: float | None = None
    said = restarted = False
    start = time.time()
    base_us = int(start) * 1_000_000
    for tick in range(seconds):
        hanging = tick % (2 * hang) >= hang  # forwarding for `hang` s, then hung as long
        if hanging and hung_at is None:
            proxy.hang()
            hung_at, said = time.time(), False
        elif not hanging and hung_at is not None:
            proxy.resume()
            hung_at = None
        if hung_at is not None and not said and not writers[-1].stats()["online"]:
            offline_after.append(time.time() - hung_at)
            said = True
        if (hung_at is not None and not restarted and tick >= seconds / 2
                and time.time() - hung_at >= hang / 2):
            await writers[-1].close(timeout=1)  # SIGTERM mid-partition, then a restart
            writers.append(Writer(kwargs, options))
            await writers[-1].start()
            restarted, said = True, False
        writers[-1].submit([Reading(base_us + tick * 1_000_000 + k * (1_000_000 // per_device),
                                    f"soak-{d}", "soak_metric", float(tick), labels)
                            for d in range(DEVICES) for k in range(per_device)])
        submitted += DEVICES * per_device
        await asyncio.sleep(max(0.0, start + tick + 1 - time.time()))
    proxy.resume()
    last = writers[-1]
    deadline = time.time() + 300
    while time.time() < deadline and (last.stats()["spool_batches"]
                                      or last.stats()["queue_rows"]):
        await asyncio.sleep(0.5)
    await last.close(timeout=60)
    await proxy.close()
    conn = await asyncpg.connect(cluster.dsn(database="kwdb"))
    try:
        stored, distinct = await conn.fetchrow(
            "SELECT count(*), count(DISTINCT (timestamp, device_id)) FROM metrics "
            "WHERE metric_id = 'soak_metric'")
    finally:
        await conn.close()
    dropped = sum(w.stats()["dropped"] for w in writers)
    print(f"{seconds} s at {DEVICES * per_device} rows/s, link hung {hang:g} s of every "
          f"{2 * hang:g} s, one restart mid-partition")
    print(f"  collected {submitted}, stored {stored} ({distinct} distinct), duplicates "
          f"{stored - distinct}, lost {submitted - distinct}, dropped (counted) {dropped}")
    print(f"  offline said after the link hung: "
          f"{', '.join(f'{s:.1f} s' for s in offline_after) or 'never'} "
          f"(batch_timeout_s {options.batch_timeout_s:g})")
    print(f"  peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


async def run(seconds: int, rate: int, hang: float) -> None:
    cluster = PrivateCluster().start()
    try:
        conf = {**DEFAULTS, "db_host": cluster.socket_dir, "db_port": cluster.port,
                "kwollect_password": PASSWORD}
        await setup(conf)
        with tempfile.TemporaryDirectory() as tmp:
            await soak(cluster, Path(tmp) / "spool", seconds, rate, hang)
    finally:
        cluster.destroy()


def main() -> None:
    seconds = int(sys.argv[1]) if len(sys.argv) > 1 else 180
    rate = int(sys.argv[2]) if len(sys.argv) > 2 else 5000
    hang = float(sys.argv[3]) if len(sys.argv) > 3 else 30.0
    asyncio.run(run(seconds, rate, hang))


if __name__ == "__main__":
    main()
