"""`kwollect demo`: a private PostgreSQL with kwollect set up and sample metrics in it.

It prints the commands to query it and keeps running until interrupted (or exits at once
with --no-wait), then stops the server and removes its files.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import shlex
import subprocess
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

import asyncpg

from kwollect.devcluster import PrivateCluster
from kwollect.setupdb import DEFAULTS, setup

DEMO_PASSWORD = "demo-writer"
DEMO_READER_PASSWORD = "demo-reader"


def sample_rows(now: datetime, minutes: int = 15) -> list[tuple]:
    """Fifteen minutes of what a small cluster sends: BMC power, temperatures, and two
    wattmetre ports feeding node-3 (an alias), every 5 seconds."""
    rows = []
    start = now - timedelta(minutes=minutes)
    for step in range(minutes * 12):
        ts = start + timedelta(seconds=5 * step)
        for node in (1, 2, 3):
            power = 150 + 40 * node + 20 * math.sin(step / 10 + node)
            rows.append((ts, f"node-{node}", "bmc_node_power_watt", round(power, 1), "{}"))
            rows.append((ts, f"node-{node}", "bmc_temp_cpu_celsius", 40.0 + node, "{}"))
        for port, share in ((3, 0.45), (4, 0.55)):
            rows.append((ts, f"wattmetre1-port{port}", "wattmetre_power_watt",
                         round(300 * share, 1), '{"_device_alias": "node-3"}'))
    return rows


async def populate(dsn: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        rows = sample_rows(datetime.now(UTC))
        await conn.copy_records_to_table(
            "metrics", records=rows,
            columns=["timestamp", "device_id", "metric_id", "value", "labels"])
        await conn.execute("SELECT kwollect.maintain()")
        return len(rows)
    finally:
        await conn.close()


def psql_command(cluster: PrivateCluster, sql: str) -> list[str]:
    return [str(cluster.bindir / "psql"), "-X", "-h", cluster.socket_dir, "-p",
            str(cluster.port), "-U", "kwuser_ro", "-d", "kwdb", "-c", sql]


def run(no_wait: bool) -> int:
    cluster = PrivateCluster()
    print(f"Starting a private PostgreSQL in {cluster.base} (port {cluster.port}) ...")
    cluster.start()
    try:
        conf = {**DEFAULTS, "db_host": cluster.socket_dir, "db_port": cluster.port,
                "kwollect_password": DEMO_PASSWORD, "kwollect_password_ro": DEMO_READER_PASSWORD}
        config, token = asyncio.run(setup(conf))
        count = asyncio.run(populate(cluster.dsn(database="kwdb")))
        print(f"kwollect database set up; {count} sample metrics inserted.\n")
        print("PostgREST / kwollect-api configuration printed by kwollect-setup-db:")
        print(config)
        queries = [
            "SELECT timestamp, device_id, metric_id, value FROM metrics_by_device "
            "WHERE device_id = 'node-3' AND timestamp > now() - interval '20 seconds' "
            "ORDER BY timestamp, metric_id;",
            "SELECT * FROM api.get_metrics(devices => 'node-1,node-3', "
            "metrics => 'bmc_node_power_watt,wattmetre_power_watt', summary => true, "
            "start_time => (now() - interval '15 minutes')::text);",
        ]
        for sql in queries:
            command = psql_command(cluster, sql)
            print("$ " + shlex.join(command))
            result = subprocess.run(command, capture_output=True, text=True,
                                    env={"PGPASSWORD": DEMO_READER_PASSWORD, "PGTZ": "UTC"})
            print(result.stdout or result.stderr)
        if no_wait:
            return 0
        print("The database keeps running for you to try more queries (PGPASSWORD="
              f"{DEMO_READER_PASSWORD}). Press Ctrl-C to stop it and remove its files.")
        try:
            while True:
                asyncio.run(asyncio.sleep(3600))
        except KeyboardInterrupt:
            print("\nStopping.")
        return 0
    finally:
        cluster.destroy()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kwollect demo", description=__doc__.splitlines()[0])
    parser.add_argument("--no-wait", action="store_true",
                        help="print the demo's output and stop at once")
    return run(parser.parse_args(argv).no_wait)
