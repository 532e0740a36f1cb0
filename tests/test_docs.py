"""Every command of the experimenter guide (docs/experimenter.md), run as written.

The guide's examples name a site `http://kwollect.host:3000`, job 1234 on node-1 and
node-2 from 2026-11-30 10:00 to 10:30 UTC; the fixture stores that job and its samples,
the commands run with the real kwollect-api's address in place of the site's, and each must
succeed (curl with --fail-with-body from a private .curlrc, so an API error fails it).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tests.sqlapi import load_job, series

GUIDE = Path(__file__).parent.parent / "docs" / "experimenter.md"
SITE = "http://kwollect.host:3000"
START = datetime(2026, 11, 30, 10, 0, tzinfo=UTC)
COUNT = 181   # 30 minutes every 10 s, both ends


def blocks(language: str, text: str | None = None) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", text or GUIDE.read_text(), flags=re.S)


def shell_commands() -> list[str]:
    """The commands of the guide's sh blocks; a command goes on while a quote is open."""
    commands = []
    for block in blocks("sh"):
        pending = ""
        for line in block.replace("\\\n", " ").splitlines():
            if not pending and (not line.strip() or line.lstrip().startswith("#")):
                continue
            pending = f"{pending}\n{line}" if pending else line.strip()
            try:
                shlex.split(pending)
            except ValueError:
                continue
            commands.append(pending)
            pending = ""
    return commands


@pytest.fixture(scope="module")
async def guide_job(kwdb):
    rows = []
    for node, watts in (("node-1", 180.0), ("node-2", 220.0)):
        rows += series(node, "bmc_node_power_watt", START, COUNT, 10,
                       value=lambda i, w=watts: w + (i % 3))
        rows += series(node, "net_bytes_total", START, COUNT, 10, value=lambda i: 1e6 * i)
    await load_job(kwdb, rows, 1234, ["node-1", "node-2"], START,
                   START.replace(minute=30))
    admin = await kwdb.connect("admin")
    await admin.execute("SELECT kwollect.maintain()")
    await admin.close()


@pytest.fixture
def guide_env(gateway, kwdb, tmp_path):
    (tmp_path / ".curlrc").write_text("silent\nshow-error\nfail-with-body\n")
    bin_dir = str(Path(sys.executable).parent)
    return {**os.environ, "CURL_HOME": str(tmp_path), "TOKEN": kwdb.token,
            "PATH": f"{bin_dir}:{os.environ.get('PATH', '/usr/bin:/bin')}"}


def test_the_guide_has_commands_of_every_kind():
    commands = shell_commands()
    assert sum(c.startswith("curl") for c in commands) >= 9
    assert any(c.startswith("kwollect get") for c in commands)
    assert any(c.startswith("kwollect plot") for c in commands)
    assert blocks("python")


@pytest.mark.parametrize("command", shell_commands())
def test_every_shell_command_of_the_guide_works(gateway, guide_job, guide_env, tmp_path,
                                                command):
    done = subprocess.run(["bash", "-c", command.replace(SITE, gateway.url)], cwd=tmp_path,
                          env=guide_env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"{command}\n{done.stdout}\n{done.stderr}"
    if command.startswith("curl"):
        assert done.stdout.strip() not in ("", "[]"), command
    written = [p for p in tmp_path.iterdir() if p.name.startswith("job-1234")]
    if "-o job-1234" in command:
        assert written and written[0].stat().st_size > 1000


def test_the_python_examples_of_the_guide_work(gateway, guide_job, guide_env):
    for code in blocks("python"):
        done = subprocess.run([sys.executable, "-c", code.replace(SITE, gateway.url)],
                              env=guide_env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert "node-1" in done.stdout and "node-2" in done.stdout
        assert "nod-2" in done.stdout   # unknown_ids names the typo


def test_the_metricsd_reference_example_is_valid(tmp_path):
    from kwollect.collect.metricsd import load_metrics_dir

    guide = (Path(__file__).parent.parent / "docs" / "metricsd.md").read_text()
    example = re.findall(r"```yaml\n(.*?)```", guide, flags=re.S)[0]
    (tmp_path / "node-1.yaml").write_text(example)
    result = load_metrics_dir(tmp_path, strict=True)
    [metric] = result.descriptions
    assert (metric.name, metric.device_id, metric.update_every_ms) == (
        "bmc_node_power_watt", "node-1", 5000)
    assert metric.optional_update_every_ms == 1000
    assert metric.labels == {"_device_alias": "node-1"}


def test_the_operator_guides_grafana_commands_name_files_that_exist():
    """The files its Grafana block copies exist, and land where the provisioning looks."""
    import yaml

    root = Path(__file__).parent.parent
    guide = (root / "docs" / "operator.md").read_text()
    block = next(b for b in blocks("sh", guide) if "grafana" in b)
    copies = re.findall(r"^cp (\S+) (\S+)$", block, flags=re.M)
    copies += re.findall(r"&& cp (\S+) (\S+)$", block, flags=re.M)
    assert len(copies) == 3
    for source, _ in copies:
        assert (root / source).is_file(), source
    provider = yaml.safe_load((root / "grafana/provisioning/dashboards/kwollect.yaml").read_text())
    dashboard_dir = provider["providers"][0]["options"]["path"]
    assert any(dest.rstrip("/") == dashboard_dir for _, dest in copies)
    datasource = (root / "grafana/provisioning/datasources/kwollect.yaml").read_text()
    installed = re.search(r"install -o grafana -m 0400 \S+ (\S+)", block)
    assert installed and f"$__file{{{installed.group(1)}}}" in datasource
