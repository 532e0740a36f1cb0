"""`kwollect demo`: the whole chain on one machine, from simulated devices to curl.

It starts a private PostgreSQL set up by kwollect-setup-db's code, simulated devices of every
supported kind on loopback (`kwollect.dev.simulators.fleet`), the kwollector polling them, a
simulated wattmetre piped into kwollector-wattmetre, and kwollect-api; it records a job on
the demo's nodes, waits until every protocol's data is in the database, then prints curl
commands with their real output.  It keeps running until interrupted (or stops at once with
--no-wait), then stops every process it started, by pid, and removes its files.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlencode

import asyncpg
import yaml

from kwollect.dev.devcluster import PrivateCluster
from kwollect.dev.simulators import free_port, stop_process
from kwollect.dev.simulators.fleet import (
    METER_NODE,
    NODES,
    RAW_POWER_METRIC,
    WATTMETRE_ID,
    Fleet,
    start_fleet,
    wattmetre_command,
    wattmetre_ports,
    write_wattmetre_mapping,
)
from kwollect.errors import KwollectError
from kwollect.store.setupdb import DEFAULTS, setup

DEMO_PASSWORD = "demo-writer"
DEMO_READER_PASSWORD = "demo-reader"
JOB_ID = 1
HISTORY_MINUTES = 30
SHOWN_ROWS = 6
API_COMMAND = "import sys; from kwollect.gateway import main; sys.exit(main())"


@dataclass(frozen=True)
class Expected:
    """Rows the demo waits for: `metric` must have `rows` rows since the demo started."""

    source: str
    metric: str
    rows: int


EXPECTED = (
    Expected("SNMP (PDU outlets)", "pdu_outlet_power_watt", 3),
    Expected("IPMI (BMCs)", "bmc_node_power_watt", 2 * len(NODES)),
    Expected("Redfish (json+http)", "redfish_node_power_watt", 1),
    Expected("Prometheus (node exporter)", "prom_node_load1", 2),
    Expected("Modbus (energy meter)", "meter_power_watt", 1),
    Expected("wattmetre (kwollector-wattmetre)", "wattmetre_power_watt", 2 * len(NODES)),
    Expected(f"optional metric promoted for job {JOB_ID}", RAW_POWER_METRIC, 2),
)


class DemoError(KwollectError, RuntimeError):
    """Something the demo needs did not work; the message says what and where to look."""


def tail(path: Path, lines: int = 12) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return ""
    return "\n".join("    " + line for line in text)


class Processes:
    """The programs the demo runs itself, each logging to its own file; stopped by pid in
    reverse start order, so readers stop before what they read from."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.running: list[tuple[str, subprocess.Popen]] = []

    def log(self, name: str) -> Path:
        return self.log_dir / f"{name}.log"

    def start(self, name: str, argv: list[str], stdin: IO[Any] | int | None = None,
              stdout: IO[Any] | int | None = None) -> subprocess.Popen:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with self.log(name).open("ab") as log:
            process = subprocess.Popen(argv, stdin=stdin if stdin is not None else
                                       subprocess.DEVNULL, stdout=stdout or log, stderr=log)
        self.running.append((name, process))
        return process

    def check(self) -> None:
        """Raise if a program has exited, with the end of its log."""
        for name, process in self.running:
            if process.poll() is not None:
                raise DemoError(f"{name} exited with status {process.returncode}; the end of "
                                f"its log ({self.log(name)}):\n{tail(self.log(name))}")

    def stop_all(self) -> None:
        while self.running:
            name, process = self.running.pop()
            stop_process(process, timeout=30 if name == "kwollector" else 10)


# --- database ---------------------------------------------------------------------------------

def history_rows(end: datetime) -> list[tuple]:
    """Thirty minutes of what the nodes sent before the demo started (BMC power and the
    wattmetre ports), every 10 seconds, so that 5-minute summaries already exist."""
    rows = []
    start = end - timedelta(minutes=HISTORY_MINUTES)
    for step in range(HISTORY_MINUTES * 6):
        ts = start + timedelta(seconds=10 * step)
        for index, node in enumerate(NODES):
            power = round(252 + 20 * index + 15 * math.sin(step / 12 + index), 1)
            rows.append((ts, node, "bmc_node_power_watt", power, "{}"))
            labels = json.dumps({"_device_alias": node})
            for port in wattmetre_ports(node):
                rows.append((ts, port, "wattmetre_power_watt", round(power / 2 - 3, 2), labels))
    return rows


async def prepare_database(dsn: str, started: datetime) -> int:
    """History, then the demo's job on every node from `started`, asking for the raw power
    of one node (a promoted_metrics row, as a scheduler integration would add)."""
    conn = await asyncpg.connect(dsn)
    try:
        rows = history_rows(started)
        await conn.copy_records_to_table(
            "metrics", records=rows,
            columns=["timestamp", "device_id", "metric_id", "value", "labels"])
        await conn.execute("SELECT kwollect.maintain()")
        await conn.execute(
            "INSERT INTO nodetime_per_job (job_id, start_time, node) "
            "SELECT $1, $2, unnest($3::text[])", JOB_ID, started, list(NODES))
        await conn.execute("INSERT INTO promoted_metrics (device_id, metric_id, job_id) "
                           "VALUES ($1, NULL, NULL)", METER_NODE)
        return len(rows)
    finally:
        await conn.close()


async def row_counts(dsn: str, since: datetime) -> dict[str, int]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT metric_id, count(*) AS n FROM metrics WHERE timestamp >= $1 "
            "AND metric_id = ANY($2::text[]) GROUP BY metric_id",
            since, [e.metric for e in EXPECTED])
        return {r["metric_id"]: r["n"] for r in rows}
    finally:
        await conn.close()


def wait_for_data(dsn: str, since: datetime, processes: Processes,
                  timeout: float) -> dict[str, int]:
    """Poll the database until every protocol has rows (see EXPECTED); returns the counts."""
    deadline = time.monotonic() + timeout
    while True:
        processes.check()
        counts = asyncio.run(row_counts(dsn, since))
        missing = [e for e in EXPECTED if counts.get(e.metric, 0) < e.rows]
        if not missing:
            return counts
        if time.monotonic() > deadline:
            what = "; ".join(f"{e.source}: {counts.get(e.metric, 0)} of {e.rows} {e.metric} "
                             f"rows" for e in missing)
            raise DemoError(f"no data after {timeout:.0f} s from: {what}. The end of the "
                            f"kwollector's log:\n{tail(processes.log('kwollector'))}")
        time.sleep(0.5)


# --- programs ---------------------------------------------------------------------------------

def db_options(cluster: PrivateCluster, password_file: Path) -> dict[str, Any]:
    return {"db_host": "127.0.0.1", "db_port": cluster.port, "db_name": "kwdb",
            "db_user": "kwuser", "db_password_file": str(password_file)}


def start_collectors(base: Path, cluster: PrivateCluster, processes: Processes) -> None:
    """The kwollector on the fleet's metrics.d, and the wattmetre pipeline."""
    password_file = base / "db.password"
    password_file.write_text(DEMO_PASSWORD)
    password_file.chmod(0o600)
    conf = base / "kwollector.yaml"
    conf.write_text(yaml.safe_dump({
        "metrics_dir": str(base / "metrics.d"), **db_options(cluster, password_file),
        "spool_dir": str(base / "spool"), "self_device_id": "kwollector-demo",
        "self_metrics_every_s": 5, "log_level": "warning"}))
    processes.start("kwollector", [sys.executable, "-m", "kwollect.collect.kwollector", str(conf)])
    # maintenance every 30 s, as the systemd timer does every minute: summaries of what the
    # demo collects appear while it runs (summary=true answers for buckets older than the
    # summary lag, summary_lag_seconds, 60 s by default)
    maintain_conf = base / "maintain.yaml"
    maintain_conf.write_text(yaml.safe_dump({**db_options(cluster, password_file),
                                             "every_seconds": 30, "log_level": "warning"}))
    processes.start("kwollect-maintain",
                    [sys.executable, "-m", "kwollect.cli", "maintain", str(maintain_conf)])
    mapping = base / "wattmetre-mapping.yaml"
    write_wattmetre_mapping(mapping)
    wconf = base / "kwollector-wattmetre.yaml"
    wconf.write_text(yaml.safe_dump({
        "wattmetre_id": WATTMETRE_ID, "wattmetre_version": 2,
        "mapping_file_path": str(mapping), **db_options(cluster, password_file),
        "spool_dir": str(base / "spool-wattmetre"), "log_level": "warning"}))
    reader = processes.start(
        "kwollector-wattmetre",
        [sys.executable, "-m", "kwollect.collect.kwollector_wattmetre", str(wconf)],
        stdin=subprocess.PIPE)
    assert reader.stdin is not None
    processes.start("wattmetre-read", wattmetre_command(), stdout=reader.stdin)
    reader.stdin.close()


def start_api(config_path: Path, processes: Processes, timeout: float = 30) -> str:
    """kwollect-api on a free loopback port; returns its base URL once /health answers."""
    for attempt in range(3):
        port = free_port()
        name = f"kwollect-api-{attempt}" if attempt else "kwollect-api"
        process = processes.start(name, [sys.executable, "-c", API_COMMAND, str(config_path),
                                         "--server-host", "127.0.0.1", "--server-port",
                                         str(port), "--log-level", "warn"])
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + timeout
        while process.poll() is None and time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=2) as response:
                    if response.status == 200:
                        return base
            except OSError:
                pass
            time.sleep(0.2)
        if process.poll() is None:
            break
        processes.running.pop()  # exited (port taken meanwhile): try another port
    raise DemoError(f"kwollect-api did not answer on {base}/health; the end of its log:\n"
                    f"{tail(processes.log(name))}")


# --- what the demo prints ---------------------------------------------------------------------

def iso(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S")


def render(body: bytes) -> str:
    """The response, rows of a JSON array one per line and cut after SHOWN_ROWS."""
    text = body.decode(errors="replace")
    try:
        value = json.loads(text)
    except ValueError:
        return text[:2000]
    if not isinstance(value, list):
        return json.dumps(value)
    shown = ",\n".join(f"  {json.dumps(row)}" for row in value[:SHOWN_ROWS])
    more = f",\n  ... ({len(value)} rows in all)" if len(value) > SHOWN_ROWS else ""
    return f"[\n{shown}{more}\n]" if value else "[]"


def call(api: str, path: str, query: dict[str, Any] | None = None, body: Any = None,
         token: str | None = None) -> tuple[str, Any]:
    """Run one API call; returns the curl command line that does the same, and the decoded
    JSON answer (raising DemoError when the API answers an error)."""
    url = f"{api}{path}" + (f"?{urlencode(query, safe=':,')}" if query else "")
    headers = {}
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url, data=data, headers=headers,
                                     method="POST" if data else "GET")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            raw = response.read()
    except urllib.error.HTTPError as exc:
        raise DemoError(f"{request.method} {url} answered {exc.code}: "
                        f"{exc.read().decode(errors='replace')}") from None
    except OSError as exc:
        raise DemoError(f"{request.method} {url} failed: {exc}") from None
    words = ["curl", "-s"]
    if data is not None:
        words += ["-X", "POST", "-H", shlex.quote("Content-Type: application/json"),
                  "-d", shlex.quote(data.decode())]
    if token:
        words += ["-H", '"Authorization: Bearer $KWOLLECT_TOKEN"']
    command = " ".join(words + [shlex.quote(url)])
    print(f"$ {command}\n{render(raw)}\n")
    return command, json.loads(raw)


def show_api(api: str, token: str, started: datetime) -> list[tuple[str, Any]]:
    """The curl commands, each run for real, with its (truncated) output."""
    since = iso(started)
    calls = []

    def run(title: str, *args: Any, **kwargs: Any) -> None:
        print(f"# {title}")
        calls.append(call(api, *args, **kwargs))

    run("Everything about node-1 since the demo started, from every device that feeds or "
        "watches it (PDU outlet, wattmetre ports summed, BMC, node exporter)",
        "/rpc/get_metrics", {"devices": "node-1", "start_time": since})
    run(f"Job {JOB_ID}'s power from the BMCs and the wattmetre",
        "/rpc/get_metrics", {"job_id": JOB_ID,
                             "metrics": "bmc_node_power_watt,wattmetre_power_watt"})
    run(f"5-minute summaries of the {HISTORY_MINUTES} minutes before the demo started",
        "/rpc/get_metrics", {"devices": ",".join(NODES), "metrics": "bmc_node_power_watt",
                             "start_time": iso(started - timedelta(minutes=HISTORY_MINUTES)),
                             "end_time": iso(started), "summary": "true"})
    run("Counters (names ending in _total) as rates per second, other metrics as they are",
        "/rpc/get_metrics", {"devices": "node-1",
                             "metrics": "prom_node_context_switches_total,prom_node_load1",
                             "start_time": since, "as_rate": "auto"})
    run("Devices and metrics with data in the last minute", "/rpc/available_metrics")
    print(f"# Insert a value with the writer's token\nexport KWOLLECT_TOKEN={token}")
    calls.append(call(api, "/rpc/insert_metrics", body={
        "device_id": "node-1", "metric_id": "demo_annotation", "value": 1,
        "labels": {"note": "inserted with curl"}}, token=token))
    run(f"Job {JOB_ID}'s energy (trapezoids over bmc_node_power_watt)",
        "/rpc/get_job_metrics", {"job_id": JOB_ID})
    return calls


def show_psql(cluster: PrivateCluster) -> str:
    sql = ("SELECT metric_id, count(*) AS rows, round(avg(value)::numeric, 1) AS avg "
           "FROM metrics_by_device WHERE device_id = 'node-3' "
           "AND timestamp > now() - interval '1 minute' GROUP BY metric_id ORDER BY metric_id;")
    command = [str(cluster.bindir / "psql"), "-X", "-h", "127.0.0.1", "-p", str(cluster.port),
               "-U", "kwuser_ro", "-d", "kwdb", "-c", sql]
    print("# Everything node-3 got in the last minute, straight from SQL")
    print(f"$ PGPASSWORD={DEMO_READER_PASSWORD} {shlex.join(command[:-1])} \"{sql}\"")
    result = subprocess.run(command, capture_output=True, text=True,
                            env={**os.environ, "PGPASSWORD": DEMO_READER_PASSWORD,
                                 "PGTZ": "UTC"})
    if result.returncode:
        raise DemoError(f"psql failed: {result.stderr.strip()}")
    print(result.stdout)
    return result.stdout


def show_fleet(fleet: Fleet, metrics_dir: Path) -> None:
    print("Simulated devices (all on loopback):")
    for device, protocol, address in fleet.peers():
        print(f"  {device:<12} {protocol:<42} {address}")
    print(f"\nTheir metric descriptions are in {metrics_dir}, for example "
          f"{metrics_dir / 'meter-1.yaml'}:")
    print("    " + (metrics_dir / "meter-1.yaml").read_text().replace("\n", "\n    ").rstrip())


# --- the demo ---------------------------------------------------------------------------------

def _interrupt(_signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt


def demo(base: Path, no_wait: bool, timeout: float) -> None:
    cluster = PrivateCluster(base_dir=base / "pg")
    processes = Processes(base / "logs")
    fleet: Fleet | None = None
    try:
        print(f"Starting a private PostgreSQL in {cluster.base} (port {cluster.port}) ...")
        cluster.start()
        conf = {**DEFAULTS, "db_host": cluster.socket_dir, "db_port": cluster.port,
                "api_db_host": "127.0.0.1", "kwollect_password": DEMO_PASSWORD,
                "kwollect_password_ro": DEMO_READER_PASSWORD}
        config, token = asyncio.run(setup(conf))
        config_path = base / "kwollect-api.conf"
        config_path.touch(0o600)
        config_path.write_text(config)
        print(f"kwollect database set up; PostgREST / kwollect-api configuration written to "
              f"{config_path}.")
        fleet = start_fleet(base / "devices")
        fleet.write_metrics_dir(base / "metrics.d")
        show_fleet(fleet, base / "metrics.d")
        started = datetime.now(UTC)
        dsn = cluster.dsn(database="kwdb")
        history = asyncio.run(prepare_database(dsn, started))
        print(f"\n{history} rows of history inserted for the {HISTORY_MINUTES} minutes before "
              f"now; job {JOB_ID} runs on {', '.join(NODES)} from now on, and asks for "
              f"{METER_NODE}'s raw power ({RAW_POWER_METRIC} at 10 Hz, wattmetre ports at "
              "50 Hz).")
        start_collectors(base, cluster, processes)
        api = start_api(config_path, processes)
        print(f"kwollector, kwollector-wattmetre and kwollect-api ({api}) started; waiting for "
              "data from every protocol ...", flush=True)
        counts = wait_for_data(dsn, started, processes, timeout)
        print("Data is flowing. Rows stored so far, by protocol:")
        for expected in EXPECTED:
            print(f"  {expected.source + ':':<44} {counts[expected.metric]:>6} "
                  f"{expected.metric}")
        print()
        show_api(api, token, started)
        show_psql(cluster)
        if no_wait:
            return
        print(f"Everything keeps running (logs in {processes.log_dir}). Press Ctrl-C to stop "
              f"it and remove {base}.", flush=True)
        while True:
            time.sleep(1)
            processes.check()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):  # a second Ctrl-C must not cut the cleanup
            signal.signal(sig, signal.SIG_IGN)
        print("Stopping every process the demo started ...", flush=True)
        processes.stop_all()
        if fleet is not None:
            fleet.stop()
        cluster.destroy()


def run(no_wait: bool, timeout: float) -> int:
    base = Path(tempfile.mkdtemp(prefix="kwollect-demo-"))
    base.chmod(0o711)  # the cluster's directory inside belongs to the postgres user
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        demo(base, no_wait, timeout)
        return 0
    except KeyboardInterrupt:
        print("Stopped.")
        return 0
    except (DemoError, RuntimeError, OSError, subprocess.CalledProcessError,
            asyncpg.PostgresError) as exc:
        print(f"kwollect demo: {exc}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(base, ignore_errors=True)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kwollect demo", description=__doc__.splitlines()[0])
    parser.add_argument("--no-wait", action="store_true",
                        help="print the demo's output, then stop everything at once")
    parser.add_argument("--timeout", type=float, default=60,
                        help="seconds to wait for data from every protocol (default 60)")
    args = parser.parse_args(argv)
    return run(args.no_wait, args.timeout)
