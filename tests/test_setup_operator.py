"""kwollect-setup-db as an operator runs it: as root against peer authentication (stock
Debian), password files it creates, private configuration files, no default passwords,
a clear account of what was done when something fails, the next commands."""

from __future__ import annotations

import asyncio
import grp
import os
import stat
import subprocess

import asyncpg
import pytest

from kwollect.dev.devcluster import PrivateCluster
from kwollect.store.setupdb import main

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="setup as root: needs root")


@pytest.fixture(scope="module")
def peer_cluster():
    """A cluster that, like Debian's, lets local users in by peer authentication only."""
    cluster = PrivateCluster()
    cluster.init()
    (cluster.datadir / "pg_hba.conf").write_text(
        "local all all peer\nhost all all 127.0.0.1/32 scram-sha-256\n")
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.destroy()


def setup_args(cluster: PrivateCluster, *extra: str, database: str) -> list[str]:
    return ["--db_host", cluster.socket_dir, "--db_port", str(cluster.port),
            "--kwollect_db_name", database, *extra]


async def can_log_in(cluster: PrivateCluster, role: str, password: str, database: str) -> bool:
    try:
        conn = await asyncpg.connect(host="127.0.0.1", port=cluster.port, user=role,
                                     password=password, database=database)
    except asyncpg.InvalidPasswordError:
        return False
    await conn.close()
    return True


def mode_and_group(path) -> tuple[str, str]:
    info = path.stat()
    return oct(stat.S_IMODE(info.st_mode)), grp.getgrgid(info.st_gid).gr_name


def test_root_on_peer_authentication_creates_password_files_and_private_config(
        peer_cluster, tmp_path, capsys):
    """Once: `Peer authentication failed for user "postgres"` as root, password files had
    to exist, and a 0644 API configuration kept its mode while receiving the secrets."""
    etc = tmp_path / "etc"
    etc.mkdir()
    api_conf = etc / "api.conf"
    api_conf.write_text("old\n")
    api_conf.chmod(0o644)
    writer_file, reader_file = etc / "db.password", etc / "db-ro.password"
    args = setup_args(peer_cluster, "--kwollect_password_file", str(writer_file),
                      "--kwollect_password_ro_file", str(reader_file),
                      "--postgrest_config_path", str(api_conf), "--service_group", "postgres",
                      database="kwdb_root")
    assert main(args) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    for path in (writer_file, reader_file, api_conf):
        assert mode_and_group(path) == ("0o640", "postgres"), path
        assert f"{path} (0640 root:postgres)" in out
    writer_pw = writer_file.read_text().strip()
    reader_pw = reader_file.read_text().strip()
    assert len(writer_pw) >= 40 and len(reader_pw) >= 40 and writer_pw != reader_pw
    assert "db-uri" in api_conf.read_text() and "old" not in api_conf.read_text()
    assert writer_pw not in out and reader_pw not in out
    assert "systemctl enable --now kwollect-api.service" in out  # the next commands
    assert asyncio.run(can_log_in(peer_cluster, "kwuser", writer_pw, "kwdb_root"))
    assert asyncio.run(can_log_in(peer_cluster, "kwuser_ro", reader_pw, "kwdb_root"))

    # a re-run keeps the files' passwords, and makes a loosened file private again
    api_conf.chmod(0o644)
    assert main([*args, "--service_group", "none"]) == 0
    assert writer_file.read_text().strip() == writer_pw
    assert mode_and_group(api_conf)[0] == "0o600"
    assert asyncio.run(can_log_in(peer_cluster, "kwuser", writer_pw, "kwdb_root"))


def test_no_default_password_for_the_read_only_role(peer_cluster, tmp_path, capsys):
    """Once kwuser_ro logged in with the undocumented default password `ro`."""
    password = tmp_path / "db.password"
    args = setup_args(peer_cluster, "--kwollect_password_file", str(password),
                      "--kwollect_user", "kwnodef", database="kwdb_nodef")
    assert main(args) == 0
    out = capsys.readouterr().out
    printed = out.split("Password of the read-only role kwnodef_ro")[1].split("\n")[1]
    assert len(printed) >= 40
    assert not asyncio.run(can_log_in(peer_cluster, "kwnodef_ro", "ro", "kwdb_nodef"))
    assert asyncio.run(can_log_in(peer_cluster, "kwnodef_ro", printed, "kwdb_nodef"))
    # a re-run keeps that password (Grafana uses it) ...
    assert main(args) == 0
    assert "Password of the read-only role" not in capsys.readouterr().out
    assert asyncio.run(can_log_in(peer_cluster, "kwnodef_ro", printed, "kwdb_nodef"))
    # ... but an earlier release's default `ro` is replaced at upgrade
    subprocess.run(["runuser", "-u", "postgres", "--", str(peer_cluster.bindir / "psql"), "-X",
                    "-h", peer_cluster.socket_dir, "-p", str(peer_cluster.port), "-c",
                    "ALTER ROLE kwnodef_ro PASSWORD 'ro'"], check=True, capture_output=True)
    assert asyncio.run(can_log_in(peer_cluster, "kwnodef_ro", "ro", "kwdb_nodef"))
    assert main(args) == 0
    assert "Password of the read-only role" in capsys.readouterr().out
    assert not asyncio.run(can_log_in(peer_cluster, "kwnodef_ro", "ro", "kwdb_nodef"))


def test_peer_authentication_refused_says_what_to_do(peer_cluster, tmp_path, capsys):
    args = setup_args(peer_cluster, "--kwollect_password", "x" * 20, "--db_admin",
                      "kwollect_no_such_admin", database="kwdb_refused")
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "Peer authentication failed" in err and "db_admin_password_file" in err
    assert "Nothing was changed." in err


def test_a_failure_after_the_database_says_what_was_done(peer_cluster, tmp_path, capsys):
    """Once a raw PermissionError traceback after the database was set up, and no token."""
    args = setup_args(peer_cluster, "--kwollect_password_file", str(tmp_path / "pw"),
                      "--kwollect_password_ro", "r" * 20, "--postgrest_config_path",
                      str(tmp_path / "missing-dir" / "api.conf"), database="kwdb_half")
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "No such file or directory" in err and "Traceback" not in err
    done = err.split("Done before the failure:")[1]
    assert f"created {tmp_path / 'pw'}" in done and "schema" in done
    assert "run the same command again" in err
    assert main(args[:-2] + ["--postgrest_config_path", str(tmp_path / "api.conf")]) == 0
