"""kwollect-setup-db: options, PostgREST configuration, token, idempotent re-runs."""

from __future__ import annotations

import asyncio
import os
import pwd
from datetime import datetime

import asyncpg
import jwt
import pytest

from kwollect.store.setupdb import main
from tests.fixtures.kwdb import READER_PASSWORD, WRITER_PASSWORD
from tests.sqlapi import UTC, load


def run_setup(pg_cluster, tmp_path, *extra: str, database: str = "kwdb_rerun") -> int:
    password_file = tmp_path / "writer.pw"
    password_file.write_text(WRITER_PASSWORD + "\n")
    return main(["--db_host", pg_cluster.socket_dir, "--db_port", str(pg_cluster.port),
                 "--kwollect_db_name", database, "--kwollect_password_file", str(password_file),
                 "--kwollect_password_ro", READER_PASSWORD, "--service_group", "none", *extra])


def parse_postgrest(text: str) -> dict[str, str]:
    pairs = (line.split(" = ", 1) for line in text.splitlines() if " = " in line)
    return {key: value.strip('"') for key, value in pairs}


async def connect(pg_cluster, database="kwdb_rerun", user="postgres", password=None):
    if user == "postgres":
        return await asyncpg.connect(host=pg_cluster.socket_dir, port=pg_cluster.port,
                                     user=user, database=database)
    return await asyncpg.connect(host="127.0.0.1", port=pg_cluster.port, user=user,
                                 password=password, database=database)


def test_setup_prints_postgrest_config_and_token(pg_cluster, tmp_path, capsys):
    assert run_setup(pg_cluster, tmp_path, "--token_expiry_days", "30") == 0
    out = capsys.readouterr().out
    config = parse_postgrest(out)
    assert config["db-schemas"] == "api" and config["db-anon-role"] == "kwuser_ro"
    assert config["db-uri"].endswith(f":{pg_cluster.port}/kwdb_rerun")
    assert WRITER_PASSWORD not in config["jwt-secret"] and len(config["jwt-secret"]) >= 32
    token = out.strip().splitlines()[-1]
    claims = jwt.decode(token, config["jwt-secret"], algorithms=["HS256"])
    assert claims["role"] == "kwuser"
    assert 29 * 86400 < claims["exp"] - claims["iat"] <= 30 * 86400


def test_rerun_keeps_data_integrations_and_secret(pg_cluster, tmp_path, capsys):
    config_file = tmp_path / "postgrest.conf"
    assert run_setup(pg_cluster, tmp_path, "--postgrest_config_path", str(config_file)) == 0
    first = parse_postgrest(config_file.read_text())
    assert oct(config_file.stat().st_mode & 0o777) == "0o600"

    async def populate():
        conn = await connect(pg_cluster, user="kwuser", password=WRITER_PASSWORD)
        await load(conn, [(datetime(2021, 1, 1, tzinfo=UTC), "rr-1", "m", 1.0, None)])
        await conn.execute("INSERT INTO nodetime_per_job VALUES (1, now(), NULL, 'rr-1')")
        await conn.execute("INSERT INTO promoted_metrics VALUES ('rr-1', '.*')")
        await conn.close()
        admin = await connect(pg_cluster)
        await admin.execute("CREATE OR REPLACE VIEW nodetime_by_job AS "
                            "SELECT job_id, start_time, stop_time, node FROM nodetime_per_job "
                            "WHERE job_id > 0")
        await admin.close()

    asyncio.run(populate())
    assert run_setup(pg_cluster, tmp_path, "--postgrest_config_path", str(config_file),
                     "--chunk_interval_hour", "12") == 0
    assert parse_postgrest(config_file.read_text())["jwt-secret"] == first["jwt-secret"]

    async def check():
        conn = await connect(pg_cluster)
        try:
            assert await conn.fetchval("SELECT count(*) FROM metrics WHERE device_id = 'rr-1'") == 1
            assert await conn.fetchval("SELECT count(*) FROM nodetime_per_job") == 1
            assert await conn.fetchval("SELECT count(*) FROM promoted_metrics") == 1
            view = await conn.fetchval("SELECT pg_get_viewdef('nodetime_by_job')")
            assert "job_id > 0" in view
            assert await conn.fetchval("SELECT value FROM kwollect.settings "
                                       "WHERE key = 'chunk_interval_hour'") == "12"
            assert await conn.fetchval("SELECT count(*) FROM kwollect.schema_version") >= 1
        finally:
            await conn.close()

    asyncio.run(check())


def test_missing_password_is_a_clear_error(pg_cluster, capsys):
    rc = main(["--db_host", pg_cluster.socket_dir, "--db_port", str(pg_cluster.port)])
    assert rc == 2 or rc == 1
    assert "kwollect_password" in capsys.readouterr().err


def test_bad_option_value_names_the_option(pg_cluster, tmp_path, capsys):
    assert run_setup(pg_cluster, tmp_path, "--chunk_interval_hour", "-3",
                     database="kwdb_bad") == 1
    assert "chunk_interval_hour" in capsys.readouterr().err


def test_unreadable_password_file(pg_cluster, tmp_path, capsys):
    """A missing password file is created (tests/test_setup_operator.py); one that cannot
    be read is an error naming the option."""
    rc = main(["--db_host", pg_cluster.socket_dir, "--kwollect_password_file", str(tmp_path)])
    assert rc == 2
    assert "kwollect_password_file" in capsys.readouterr().err


@pytest.mark.parametrize("role,password", [("kwuser", WRITER_PASSWORD),
                                           ("kwuser_ro", READER_PASSWORD)])
def test_roles_log_in_with_their_passwords(pg_cluster, kwdb, role, password):
    async def check():
        conn = await connect(pg_cluster, database="kwdb", user=role, password=password)
        timeout = await conn.fetchval("SHOW statement_timeout")
        await conn.close()
        assert timeout == "5min"

    asyncio.run(check())


def archive_dir(pg_cluster):
    """The archive tablespace's directory, beside the cluster's own files (pytest's tmp_path
    is private to root), owned by postgres; a tablespace is the cluster's, so every archive
    test (here, test_timescaledb.py, test_retention.py) uses this one directory."""
    archive = pg_cluster.base / "archive"
    archive.mkdir(exist_ok=True)
    if os.geteuid() == 0:
        user = pwd.getpwnam("postgres")
        os.chown(archive, user.pw_uid, user.pw_gid)
    return archive


def setup_archiving(pg_cluster, tmp_path, database: str, timescaledb: str) -> None:
    """A database set up with the archive tablespace (archive_dir) and archiving after 24 h."""
    assert run_setup(pg_cluster, tmp_path, "--archive_path", str(archive_dir(pg_cluster)),
                     "--timescaledb", timescaledb, "--archive_after_hour", "24",
                     database=database) == 0


def test_archive_moves_old_partitions(pg_cluster, tmp_path):
    setup_archiving(pg_cluster, tmp_path, "kwdb_archive", "off")

    async def check():
        conn = await connect(pg_cluster, database="kwdb_archive")
        try:
            old = datetime(2020, 5, 5, 12, tzinfo=UTC)
            await load(conn, [(old, "ar-1", "m", 5.0, None)])
            result = await conn.fetchval("SELECT kwollect.maintain()::text")
            assert "samples_20200505T120000" in result
            space = await conn.fetchval(
                "SELECT t.spcname FROM pg_class c JOIN pg_tablespace t ON t.oid = c.reltablespace "
                "WHERE c.relname = 'samples_20200505T120000'")
            assert space == "kwollect_archive"
            assert await conn.fetchval("SELECT value FROM metrics WHERE device_id = 'ar-1'") == 5.0
        finally:
            await conn.close()

    asyncio.run(check())
