"""kwollect.client, `kwollect get` and `kwollect plot` against a running kwollect-api."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from kwollect.client import ApiCallError, Client
from kwollect.client.get import Progress
from tests.sqlapi import load_job, series, settle_rollup

T0 = datetime(2024, 3, 4, 10, 0, tzinfo=UTC)
JOB = 9201
COUNT = 120
WINDOW = {"start_time": T0.isoformat(), "end_time": (T0 + timedelta(minutes=30)).isoformat()}


@pytest.fixture(scope="module")
async def client_data(kwdb):
    """Job 9201 on cl-1 and cl-2 for 20 minutes: power every 10 s (alternating, so that a
    plotted line keeps every vertex), a labelled counter."""
    rows = series("cl-1", "bmc_node_power_watt", T0, COUNT, 10,
                  value=lambda i: 100.0 + 10 * (i % 2))
    rows += series("cl-2", "bmc_node_power_watt", T0, COUNT, 10,
                   value=lambda i: 199.0 + 2 * (i % 2))
    rows += series("cl-1", "net_bytes_total", T0, COUNT, 10, value=lambda i: 50.0 * i,
                   labels={"port": "eth0"})
    await load_job(kwdb, rows, JOB, ["cl-1", "cl-2"], T0, T0 + timedelta(seconds=10 * (COUNT - 1)))


def kwollect(*args: str, url: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kwollect.cli", *args, "--url", url],
                          capture_output=True, text=True, timeout=120)


def test_client_streams_samples_in_order_with_typed_values(gateway, client_data):
    rows = list(Client(gateway.url).get_metrics(devices=["cl-1", "cl-2"],
                                                metrics="bmc_node_power_watt", **WINDOW))
    assert len(rows) == 2 * COUNT
    assert [(r["timestamp"], r["device_id"]) for r in rows[:3]] == [
        (T0, "cl-1"), (T0, "cl-2"), (T0 + timedelta(seconds=10), "cl-1")]
    assert rows[2]["value"] == 110.0 and rows[2]["timestamp"].tzinfo is not None


def test_client_job_rates_and_dataframe(gateway, client_data):
    api = Client(gateway.url)
    rates = [r["value"] for r in api.get_metrics(job_id=JOB, metrics="net_bytes_total",
                                                 as_rate="auto") if r["value"] is not None]
    assert rates and all(rate == pytest.approx(5.0) for rate in rates)
    frame = api.dataframe(job_id=JOB, metrics="bmc_node_power_watt")
    assert list(frame.columns) == ["timestamp", "device_id", "metric_id", "value", "labels"]
    assert len(frame) == 2 * COUNT
    assert frame.groupby("device_id")["value"].mean().to_dict() == {
        "cl-1": pytest.approx(105.0), "cl-2": pytest.approx(200.0)}


def test_client_job_energy_and_available_metrics(gateway, client_data):
    api = Client(gateway.url)
    energy = api.job_metrics(JOB)
    hours = (COUNT - 1) * 10 / 3600
    assert energy["node_energy_watthour"]["cl-2"] == pytest.approx(200.0 * hours)
    assert api.available_metrics(devices=["cl-1"], at=T0 + timedelta(seconds=30)) == [
        ("cl-1", "bmc_node_power_watt"), ("cl-1", "net_bytes_total")]


def test_client_inserts_with_a_token_and_reports_refusals(gateway, kwdb):
    assert Client(gateway.url, kwdb.token).insert_metrics(
        [{"device_id": "cl-in", "metric_id": "m", "value": 4.5,
          "timestamp": T0.isoformat()}]) == 1
    assert [r["value"] for r in Client(gateway.url).get_metrics(devices="cl-in", **WINDOW)] == [4.5]
    with pytest.raises(ApiCallError) as err:
        Client(gateway.url).insert_metrics([{"device_id": "cl-in", "metric_id": "m", "value": 1}])
    assert err.value.status == 401
    with pytest.raises(ApiCallError) as err:
        list(Client(gateway.url).get_metrics(job_id=987654))
    assert err.value.status == 404 and "987654" in err.value.message


def test_client_says_when_the_server_is_unreachable():
    with pytest.raises(ApiCallError, match="cannot reach http://127.0.0.1:9"):
        list(Client("http://127.0.0.1:9", timeout=5).get_metrics(devices="x"))


@pytest.mark.parametrize("fmt", ["csv", "ndjson", "json"])
def test_kwollect_get_writes_every_row_in_each_format(gateway, client_data, tmp_path, fmt):
    out = tmp_path / f"job.{fmt}"
    done = kwollect("get", "--job", str(JOB), "--metrics", "bmc_node_power_watt",
                    "--format", fmt, "-o", str(out), url=gateway.url)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""  # no progress line when stderr is not a terminal
    text = out.read_text()
    if fmt == "csv":
        lines = text.splitlines()
        assert lines[0] == "timestamp,device_id,metric_id,value,labels"
        assert len(lines) == 1 + 2 * COUNT
    elif fmt == "ndjson":
        assert len([json.loads(line) for line in text.splitlines()]) == 2 * COUNT
    else:
        assert len(json.loads(text)) == 2 * COUNT
    assert not out.with_name(out.name + ".part").exists()


def test_kwollect_get_to_stdout_and_errors(gateway, client_data):
    done = kwollect("get", "--devices", "cl-2", "--metrics", "bmc_node_power_watt",
                    "--start", WINDOW["start_time"], "--end", WINDOW["end_time"],
                    "--format", "ndjson", url=gateway.url)
    assert done.returncode == 0 and len(done.stdout.splitlines()) == COUNT
    done = kwollect("get", "--job", "987654", url=gateway.url)
    assert done.returncode == 1
    assert "HTTP 404" in done.stderr and "987654" in done.stderr and "Traceback" not in done.stderr
    done = kwollect("get", "--devices", "cl-1,cl-typo", "--metrics", "bmc_node_power_wat",
                    "--start", WINDOW["start_time"], url=gateway.url)
    assert done.returncode == 0
    assert done.stdout.strip() == "timestamp,device_id,metric_id,value,labels"
    assert "never stored: device cl-typo, metric bmc_node_power_wat" in done.stderr
    done = kwollect("get", url=gateway.url)
    assert done.returncode != 0 and "--job or --devices" in done.stderr


async def test_kwollect_get_summaries_and_the_1h_rollup(gateway, kwdb, client_data):
    """--summary (5 minutes) and --summary 1h: one row per bucket, the mean of its samples."""
    admin = await kwdb.connect("admin")
    try:
        await settle_rollup(admin)
    finally:
        await admin.close()
    window = ("--start", WINDOW["start_time"], "--end", (T0 + timedelta(hours=1)).isoformat())
    for level, buckets in (([], 4), (["1h"], 1)):
        done = kwollect("get", "--devices", "cl-2", "--metrics", "bmc_node_power_watt", *window,
                        "--format", "ndjson", "--summary", *level, url=gateway.url)
        assert done.returncode == 0, done.stderr
        rows = [json.loads(line) for line in done.stdout.splitlines()]
        step = timedelta(hours=1) if level else timedelta(minutes=5)
        assert [(datetime.fromisoformat(r["timestamp"]), r["value"]) for r in rows] == [
            (T0 + step * i, 200.0) for i in range(buckets)]


def test_progress_line_counts_rows_on_a_terminal():
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    stream = Terminal()
    progress = Progress(stream)
    progress.update(10, final=True)
    assert stream.getvalue().startswith("\r10 rows, ") and stream.getvalue().endswith("rows/s\n")
    quiet = io.StringIO()
    Progress(quiet).update(10, final=True)
    assert quiet.getvalue() == ""


def test_kwollect_plot_draws_one_line_per_device(gateway, client_data, tmp_path):
    svg = tmp_path / "job.svg"
    done = kwollect("plot", "--job", str(JOB), "--metrics", "bmc_node_power_watt",
                    "-o", str(svg), url=gateway.url)
    assert done.returncode == 0, done.stderr
    text = svg.read_text()
    assert "cl-1" in text and "cl-2" in text
    # each device's line is one SVG path with one vertex per sample
    paths = [p for p in text.split("<path d=\"")[1:] if p.count("\nL ") == COUNT - 1]
    assert len(paths) >= 2
    png = tmp_path / "job.png"
    done = kwollect("plot", "--job", str(JOB), "--stacked", "-o", str(png), url=gateway.url)
    assert done.returncode == 0, done.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    done = kwollect("plot", "--job", "987654", "-o", str(png), url=gateway.url)
    assert done.returncode == 1 and "HTTP 404" in done.stderr


def test_kwollect_plot_refuses_other_picture_formats(tmp_path):
    done = subprocess.run([sys.executable, "-m", "kwollect.cli", "plot", "--job", "1",
                           "-o", str(Path(tmp_path) / "x.jpg")], capture_output=True, text=True)
    assert done.returncode == 2 and ".png or .svg" in done.stderr
