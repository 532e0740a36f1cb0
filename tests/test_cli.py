"""The umbrella command: `kwollect maintain` and `kwollect demo`."""

from __future__ import annotations

import subprocess
import sys

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


def test_demo_prints_working_queries():
    result = subprocess.run([sys.executable, "-m", "kwollect.cli", "demo", "--no-wait"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "kwollect database set up" in result.stdout
    assert "wattmetre_power_watt" in result.stdout and "_device_orig" in result.stdout
    assert "(9 rows)" in result.stdout
