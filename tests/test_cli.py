"""The umbrella command: `kwollect maintain` and `kwollect demo`."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from kwollect.cli import main
from tests.fixtures.kwdb import WRITER_PASSWORD


def test_maintain_runs_as_the_writer(kwdb, tmp_path):
    password_file = tmp_path / "pw"
    password_file.write_text(WRITER_PASSWORD)
    assert main(["maintain", "--db_host", "127.0.0.1", "--db_port", str(kwdb.cluster.port),
                 "--db_password_file", str(password_file)]) == 0


def test_maintain_reports_a_bad_password(kwdb, capsys):
    assert main(["maintain", "--db_host", "127.0.0.1", "--db_port", str(kwdb.cluster.port),
                 "--db_password", "wrong"]) == 1
    assert "password authentication failed" in capsys.readouterr().err


def run_demo(*args: str, timeout: float = 150) -> subprocess.CompletedProcess:
    """`kwollect demo`; on timeout it gets SIGTERM (so it stops what it started) first."""
    process = subprocess.Popen([sys.executable, "-m", "kwollect.cli", "demo", *args],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=60)
        pytest.fail(f"kwollect demo did not finish in {timeout} s:\n{out}\n{err}")
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def curl_outputs(stdout: str) -> dict[str, str]:
    """Each printed curl command's path (/rpc/name?...) -> the output printed under it."""
    outputs = {}
    for block in stdout.split("\n$ curl ")[1:]:
        command, _, rest = block.partition("\n")
        url = re.search(r"'?(http://127\.0\.0\.1:\d+)(/rpc/[^' ]*)", command)
        assert url, command
        outputs[url.group(2)] = rest.split("\n\n")[0]
    return outputs


def rows(output: str) -> list[dict]:
    """The rows of a JSON array as the demo prints it (one per line, cut after a few)."""
    return [json.loads(line.strip().rstrip(",")) for line in output.splitlines()
            if line.strip().startswith("{")]


def test_demo_runs_every_protocol_and_prints_working_curl_commands():
    result = run_demo("--no-wait")
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "kwollect database set up" in out

    # every protocol produced rows (the demo waits for them and prints the counts)
    counted = dict(re.findall(r"^  (.+?): +(\d+) \w+$", out, re.MULTILINE))
    for source in ("SNMP (PDU outlets)", "IPMI (BMCs)", "Redfish (json+http)",
                   "Prometheus (node exporter)", "Modbus (energy meter)",
                   "wattmetre (kwollector-wattmetre)", "optional metric promoted for job 1"):
        assert int(counted[source]) > 0, source

    outputs = curl_outputs(out)
    assert len(outputs) == 7, outputs.keys()

    def output(fragment: str) -> str:
        [text] = [text for path, text in outputs.items() if fragment in path]
        return text

    node1 = rows(output("get_metrics?devices=node-1&start_time"))
    assert node1 and {r["device_id"] for r in node1} == {"node-1"}
    job = rows(output("get_metrics?job_id=1"))
    assert job and {r["metric_id"] for r in job} <= {"bmc_node_power_watt",
                                                     "wattmetre_power_watt"}
    summary = rows(output("summary=true"))
    assert summary and {r["metric_id"] for r in summary} == {"bmc_node_power_watt"}
    rates = rows(output("as_rate=auto"))
    switches = [r["value"] for r in rates if r["metric_id"] == "prom_node_context_switches_total"]
    assert switches[0] is None and all(0 < v < 1e6 for v in switches[1:]), switches
    load = [r["value"] for r in rates if r["metric_id"] == "prom_node_load1"]
    assert load and None not in load  # not a counter: its values as they are
    available = rows(output("/rpc/available_metrics"))
    assert available and all({"device_id", "metric_id"} <= set(r) for r in available)
    inserted = rows(output("/rpc/insert_metrics"))
    assert [(r["device_id"], r["metric_id"], r["value"]) for r in inserted] == [
        ("node-1", "demo_annotation", 1)]
    assert "export KWOLLECT_TOKEN=ey" in out
    energy = json.loads(output("/rpc/get_job_metrics"))
    assert energy["job_id"] == 1 and energy["job_energy_watthour"] > 0
    assert set(energy["node_energy_watthour"]) == {"node-1", "node-2", "node-3"}

    # the psql query: everything node-3 gets, through _device_alias too
    for metric in ("bmc_node_power_watt", "meter_power_watt", "meter_power_raw_watt",
                   "pdu_outlet_power_watt", "wattmetre_power_watt"):
        assert re.search(rf"^ {metric} +\| +[1-9]", out, re.MULTILINE), metric

    # everything stopped and removed
    base = re.search(r"private PostgreSQL in (/\S+)/pg ", out).group(1)
    assert not Path(base).exists()
    api = re.search(r"kwollect-api \((http://127\.0\.0\.1:\d+)\)", out).group(1)
    with pytest.raises(OSError):
        urllib.request.urlopen(f"{api}/health", timeout=5)
    peers = re.findall(r" (?:http|tcp) 127\.0\.0\.1:(\d+)$", out, re.MULTILINE)
    assert len(peers) == 3  # node exporter, Redfish, Modbus
    for port in peers:
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", int(port)), timeout=5).close()
