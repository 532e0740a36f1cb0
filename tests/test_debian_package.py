"""The README's production commands, run literally on this machine: build the Debian package,
install it, set up a fresh Debian PostgreSQL cluster, run the units' commands, query with
curl, stop the collector during a database outage and lose nothing.

It installs a package and creates a system user, so it runs only where that is allowed:
as root with KWOLLECT_PACKAGE_TEST=1 (CI sets it in .ci/run), and it removes everything it
made (package purged, user, cluster and state deleted).  This machine kind has no systemd
as PID 1, so `systemctl enable --now UNIT` runs what the installed unit says, as it says:
ExecStart with its specifiers, User= (DynamicUser=: nobody), StateDirectory= as
$STATE_DIRECTORY, LoadCredential= as $CREDENTIALS_DIRECTORY.  The rules of the test suite
adjust two things an operator would not: the cluster runs on a free port (set in the
configuration files as an operator of such a cluster would) and the API listens on
127.0.0.1 on a free port (the README's curl is pointed at it).
"""

from __future__ import annotations

import fcntl
import grp
import json
import os
import pwd
import re
import shlex
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kwollect.dev.simulators import free_port

ROOT = Path(__file__).parent.parent
CLUSTER = ("15", "kwollect_test")
UNIT_DIR = Path("/lib/systemd/system")
LOCK = Path("/run/lock/kwollect-package-test.lock")

pytestmark = [
    pytest.mark.skipif(os.environ.get("KWOLLECT_PACKAGE_TEST") != "1",
                       reason="installs a package on this machine: set KWOLLECT_PACKAGE_TEST=1 "
                              "(.ci/run does)"),
    pytest.mark.skipif(os.geteuid() != 0, reason="installs a package: needs root"),
    pytest.mark.skipif(not all(shutil.which(t) for t in ("dpkg-buildpackage", "dh_virtualenv",
                                                         "pg_createcluster", "curl")),
                       reason="needs debhelper, dh-virtualenv, postgresql-common and curl "
                              "(scripts/bootstrap.sh installs them)"),
]


def readme_commands() -> list[str]:
    """The commands of the README's production section, in order."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Install for production", 1)[1]
    block = section.split("```sh\n", 1)[1].split("```", 1)[0]
    return [line.strip() for line in block.splitlines() if line.strip()]


def sh(command: str, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(["bash", "-c", command], cwd=ROOT, capture_output=True, text=True,
                            **kwargs)
    assert result.returncode == 0, f"$ {command}\n{result.stdout}\n{result.stderr}"
    return result


def unit(name: str) -> dict[str, str]:
    """The [Service] settings of an installed unit (instance units from their template)."""
    template = re.sub(r"@[^.]+\.", "@.", name)
    settings: dict[str, str] = {}
    for line in (UNIT_DIR / template).read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            settings[key] = value
    return settings


def primary_group(user: str) -> str:
    return grp.getgrgid(pwd.getpwnam(user).pw_gid).gr_name


def user_environment(user: str) -> dict[str, str]:
    """What systemd sets for User=: HOME, USER, LOGNAME."""
    entry = pwd.getpwnam(user)
    return {"HOME": entry.pw_dir, "USER": user, "LOGNAME": user}


class Services:
    """`systemctl enable --now` without systemd: each unit's ExecStart, as its user."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.running: dict[str, subprocess.Popen] = {}
        self.made: list[Path] = []

    def log(self, name: str) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text() if path.exists() else ""

    def start(self, name: str) -> None:
        if name.endswith(".timer"):  # what the timer starts, once
            self.run_once(name.replace(".timer", ".service"))
            return
        settings = unit(name)
        instance = name.split("@", 1)[1].rsplit(".", 1)[0] if "@" in name else ""
        env = {**os.environ}
        env.pop("STATE_DIRECTORY", None)
        user = "nobody" if settings.get("DynamicUser") == "yes" else settings["User"]
        env.update(user_environment(user))
        if "StateDirectory" in settings:
            state = Path("/var/lib") / settings["StateDirectory"].replace("%i", instance)
            state.mkdir(parents=True, exist_ok=True)
            shutil.chown(state, user, primary_group(user))
            state.chmod(0o750)
            env["STATE_DIRECTORY"] = str(state)
        if "LoadCredential" in settings:
            credential, source = settings["LoadCredential"].split(":", 1)
            directory = Path("/run") / f"kwollect-test-credentials-{name}"
            shutil.rmtree(directory, ignore_errors=True)
            directory.mkdir(mode=0o700)
            self.made.append(directory)
            shutil.copy(source, directory / credential)
            for path in (directory, directory / credential):
                shutil.chown(path, user)
            env["CREDENTIALS_DIRECTORY"] = str(directory)
        command = settings["ExecStart"].replace("%i", instance).replace(
            "${CREDENTIALS_DIRECTORY}", env.get("CREDENTIALS_DIRECTORY", ""))
        with (self.logs / f"{name}.log").open("a") as log:
            self.running[name] = subprocess.Popen(
                ["setpriv", f"--reuid={user}", f"--regid={primary_group(user)}",
                 "--init-groups", "--",
                 *shlex.split(command)], env=env, stdout=log, stderr=log, cwd="/")

    def run_once(self, name: str) -> None:
        settings = unit(name)
        result = subprocess.run(["setpriv", f"--reuid={settings['User']}",
                                 f"--regid={settings['Group']}", "--init-groups", "--",
                                 *shlex.split(settings["ExecStart"])],
                                capture_output=True, text=True, cwd="/",
                                env={**os.environ, **user_environment(settings["User"])})
        assert result.returncode == 0, f"{name}: {result.stdout}{result.stderr}"

    def stop(self, name: str) -> tuple[int, float]:
        process = self.running.pop(name)
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        try:
            code = process.wait(timeout=60)
        finally:
            if process.poll() is None:
                process.kill()
        return code, time.monotonic() - started

    def stop_all(self) -> None:
        for name in list(self.running):
            self.stop(name)
        for path in self.made:
            shutil.rmtree(path, ignore_errors=True)


def remove_everything() -> None:
    """What the package, the setup and this test leave on the machine."""
    subprocess.run(["dpkg", "--purge", "kwollect"], capture_output=True)
    subprocess.run(["pg_dropcluster", "--stop", *CLUSTER], capture_output=True)
    shutil.rmtree("/var/lib/kwollect", ignore_errors=True)
    shutil.rmtree("/etc/kwollect", ignore_errors=True)
    subprocess.run(["userdel", "kwollect"], capture_output=True)
    subprocess.run(["groupdel", "kwollect"], capture_output=True)


@pytest.fixture
def machine(tmp_path) -> Iterator[Services]:
    LOCK.parent.mkdir(parents=True, exist_ok=True)
    with LOCK.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one run of this test on the machine at a time
        remove_everything()
        services = Services(tmp_path)
        try:
            yield services
        finally:
            services.stop_all()
            remove_everything()


def psql(port: int, sql: str) -> str:
    return subprocess.run(["runuser", "-u", "postgres", "--", "psql", "-p", str(port), "-d",
                           "kwdb", "-X", "-A", "-t", "-c", sql], capture_output=True,
                          text=True, check=True).stdout.strip()


def collected(log: str) -> int:
    return sum(int(n) for n in re.findall(r"stopped: collected=(\d+)", log))


def wait_for(predicate, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.5)


def test_readme_production_commands_on_a_fresh_debian_cluster(machine, snmp_agent):
    commands = readme_commands()
    assert commands[0] == "scripts/build-deb" and commands[1].startswith("apt-get install")
    port = free_port()
    api_port = free_port()
    for command in commands:
        if command.startswith("kwollect-setup-db"):
            # a fresh cluster of Debian's PostgreSQL, as pg_createcluster makes it (peer
            # authentication for local users, scram over TCP), on a free port
            sh(f"pg_createcluster {' '.join(CLUSTER)} -p {port} --start >/dev/null")
            sh(f"sed -i 's/^db_port: .*/db_port: {port}/' /etc/kwollect/setup-db.conf")
            for conf in ("kwollector.conf", "maintain.conf"):
                with open(f"/etc/kwollect/{conf}", "a") as out:
                    out.write(f"db_port: {port}\n")
            result = sh(command)
            assert "Next:" in result.stdout
            with open("/etc/kwollect/api.conf", "a") as out:
                out.write(f'server-host = "127.0.0.1"\nserver-port = {api_port}\n')
            # the operator describes a device
            pdu = Path("/etc/kwollect/metrics.d/pdu.yaml")
            oid = "1.3.6.1.2.1.1.3.0"
            pdu.write_text(f"- name: pdu_uptime\n  device_id: pdu-1\n"
                           f"  url: {snmp_agent.url(oid)}\n  update_every: 500\n")
            shutil.chown(pdu, "root", "kwollect")
            pdu.chmod(0o640)
        elif command.startswith("systemctl enable --now "):
            for name in command.split()[3:]:
                machine.start(name)
        elif command.startswith("curl "):
            url = command.split("'")[1].replace("localhost:3000", f"127.0.0.1:{api_port}")
            rows: list = []

            def answered(url=url, rows=rows) -> bool:
                got = subprocess.run(["curl", "-sf", url], capture_output=True, text=True)
                rows[:] = json.loads(got.stdout) if got.returncode == 0 else []
                return bool(rows)

            wait_for(answered, f"no rows from {url}:\n{machine.log('kwollect-api.service')}"
                               f"\n{machine.log('kwollector@kwollector.service')}")
            assert {r["device_id"] for r in rows} == {"pdu-1"}
            # the web view is served, with the chart library from the package's virtualenv
            for page in ("/ui/", "/ui/plotly.min.js"):
                got = subprocess.run(["curl", "-sf", "-o", "/dev/null", "-w", "%{http_code}",
                                      f"http://127.0.0.1:{api_port}{page}"],
                                     capture_output=True, text=True)
                assert got.stdout == "200", (page, got.stderr)
        else:
            result = sh(command, timeout=1200)
            if command.startswith("apt-get install"):
                check_installed_files()

    # a database outage: the collector is stopped in the middle of it and loses nothing
    collector = "kwollector@kwollector.service"
    sh(f"pg_ctlcluster {' '.join(CLUSTER)} stop -m fast")
    wait_for(lambda: "database unavailable" in machine.log(collector), "outage not seen")
    time.sleep(2)
    code, took = machine.stop(collector)
    log = machine.log(collector)
    assert code == 0 and took < 4, (took, log)
    assert "dropped=0" in log
    assert any(p.suffix == ".seg" for p in Path("/var/lib/kwollect/kwollector").iterdir())
    sh(f"pg_ctlcluster {' '.join(CLUSTER)} start")
    machine.start(collector)
    wait_for(lambda: "replaying them first" in machine.log(collector), "no replay")
    time.sleep(3)
    assert machine.stop(collector)[0] == 0
    log = machine.log(collector)
    stored = int(psql(port, "SELECT count(*) FROM metrics WHERE device_id = 'pdu-1'"))
    assert collected(log) == stored > 0, log


def check_installed_files() -> None:
    """What the package puts where the README says."""
    for command in ("kwollect", "kwollector", "kwollector-wattmetre", "kwollect-api",
                    "kwollect-setup-db", "kwollect-setup-db-oar"):
        assert Path(f"/usr/bin/{command}").resolve() == Path(f"/usr/lib/kwollect/bin/{command}")
    etc = Path("/etc/kwollect")
    for path, mode in ((etc, 0o750), (etc / "metrics.d", 0o750),
                       (etc / "kwollector.conf", 0o640), (etc / "setup-db.conf", 0o640)):
        info = path.stat()
        assert (info.st_mode & 0o777, info.st_uid) == (mode, 0), path
        assert Path("/etc/group").read_text().count("\nkwollect:") == 1
    assert not list(Path("/etc/systemd/system").glob("*.wants/kwollect*"))  # not enabled
    for name in ("kwollect-api.service", "kwollector@.service", "kwollect-maintain.timer"):
        assert (UNIT_DIR / name).exists()
    docs = Path("/usr/share/doc/kwollect")
    assert (docs / "README.md").exists() or (docs / "README.md.gz").exists()
    assert list((docs / "examples").rglob("pdu.yaml*"))
    assert Path("/usr/lib/sysusers.d/kwollect.conf").exists()
    # Grafana files where grafana/provisioning/dashboards/kwollect.yaml looks; the Slurm hook
    grafana = Path("/usr/share/kwollect/grafana")
    assert (grafana / "kwollect_dashboard.json").exists()
    assert (grafana / "provisioning/datasources/kwollect.yaml").exists()
    assert os.access("/usr/libexec/kwollect/kwollect-slurm-hook", os.X_OK)
