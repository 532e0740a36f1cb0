"""The systemd units: valid for systemd-analyze verify, hardened (systemd-analyze security at
most MEDIUM), secrets by file or credential, never on a command line."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
UNITS = sorted((ROOT / "systemd").iterdir())
SERVICES = [u for u in UNITS if u.suffix == ".service"]
COMMANDS = ("kwollect", "kwollector", "kwollector-wattmetre", "kwollect-api", "kwollect-setup-db")
LEVELS = ["OK", "MEDIUM", "EXPOSED", "UNSAFE"]

pytestmark = pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                                reason="systemd-analyze (Debian package systemd) is missing")


def system_root(tmp_path: Path, units: list[Path]) -> Path:
    """A root holding systemd's own units, ours, and the commands they run (stubs), so
    that `systemd-analyze verify --root` checks ours without installing anything."""
    root = tmp_path / "root"
    (root / "usr/bin").mkdir(parents=True)
    (root / "usr/lib/systemd").mkdir(parents=True)
    (root / "etc/systemd/system").mkdir(parents=True)
    for link in ("bin", "lib", "sbin"):
        (root / link).symlink_to(f"usr/{link}")
    (root / "usr/sbin").mkdir()
    shutil.copytree("/usr/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True)
    for command in (*COMMANDS, "kill", "sh", "wattmetre-read"):
        stub = root / "usr/bin" / command
        stub.write_text("#!/bin/sh\n")
        stub.chmod(0o755)
    for unit in units:
        shutil.copy(unit, root / "etc/systemd/system" / unit.name)
    return root


def verify(tmp_path: Path, units: list[Path]) -> subprocess.CompletedProcess:
    root = system_root(tmp_path, units)
    names = [u.name.replace("@.", "@test.") for u in units]
    return subprocess.run(["systemd-analyze", "verify", f"--root={root}", "--man=no", *names],
                          capture_output=True, text=True, timeout=60)


def test_units_verify_without_a_warning(tmp_path):
    result = verify(tmp_path, UNITS)
    assert result.returncode == 0 and result.stderr == "" and result.stdout == "", (
        result.stdout + result.stderr)


def test_verify_does_report_a_broken_unit(tmp_path):
    """The check above is not vacuous: a typo is reported."""
    broken = tmp_path / "kwollect-broken.service"
    broken.write_text((ROOT / "systemd/kwollect-api.service").read_text()
                      .replace("NoNewPrivileges=yes", "NoNewPrivilegez=yes"))
    result = verify(tmp_path, [broken])
    assert "NoNewPrivilegez" in result.stderr


@pytest.mark.parametrize("unit", SERVICES, ids=lambda u: u.name)
def test_exposure_is_at_most_medium(unit):
    result = subprocess.run(["systemd-analyze", "security", "--offline=true", str(unit)],
                            capture_output=True, text=True, timeout=60)
    level = re.search(r"Overall exposure level for \S+: ([\d.]+) (\w+)", result.stdout)
    assert level, result.stdout + result.stderr
    assert LEVELS.index(level.group(2)) <= LEVELS.index("MEDIUM"), level.group(0)


def directives(unit: Path) -> list[tuple[str, str]]:
    return [tuple(line.split("=", 1)) for line in unit.read_text().splitlines()
            if "=" in line and not line.startswith("#")]


@pytest.mark.parametrize("unit", SERVICES, ids=lambda u: u.name)
def test_secrets_by_file_or_credential_never_on_the_command_line(unit):
    for key, value in directives(unit):
        if key.startswith("Exec"):
            assert "password" not in value.replace("password_file", ""), value
            assert "--db_password " not in value


def test_the_api_gets_its_configuration_as_a_credential_and_many_descriptors():
    api = dict(directives(ROOT / "systemd/kwollect-api.service"))
    assert api["LoadCredential"] == "api.conf:/etc/kwollect/api.conf"
    assert "${CREDENTIALS_DIRECTORY}/api.conf" in api["ExecStart"]
    assert int(api["LimitNOFILE"]) >= 65536
    assert api["DynamicUser"] == "yes"


def test_the_collectors_spool_in_their_state_directory():
    collector = dict(directives(ROOT / "systemd/kwollector@.service"))
    assert collector["StateDirectory"] == "kwollect/%i"
    assert "spool_dir" not in collector["ExecStart"]  # $STATE_DIRECTORY is the default spool
    assert collector["User"] == "kwollect" and collector["DefaultInstance"] == "kwollector"
