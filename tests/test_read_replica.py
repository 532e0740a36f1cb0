"""kwollect-api with a read replica (db-read-uri): a primary set up by kwollect-setup-db and
a hot standby made from it by pg_basebackup -R (streaming replication over 127.0.0.1 with
primary_conninfo), both started by the test.  Reads are served by the standby, writes by
the primary (each call says where it ran: pg_is_in_recovery() from inside the call), and
the standby stopped mid-request either falls back to the primary or answers 503."""

from __future__ import annotations

import asyncio
import json
import os
import pwd
import subprocess
import time

import aiohttp
import pytest

from kwollect.dev.devcluster import PrivateCluster
from kwollect.dev.simulators import free_port
from kwollect.store.setupdb import make_token, setup
from tests.fixtures.gateway import config_value, start_gateway
from tests.fixtures.kwdb import setup_conf

REPLICATION_PASSWORD = "replication-secret-1"
# Every function says where it ran; a hot standby is the server in recovery.
WHERE_SQL = r"""
CREATE SCHEMA replica_test;
CREATE FUNCTION replica_test.where_am_i() RETURNS boolean LANGUAGE sql STABLE
    AS $$ SELECT pg_is_in_recovery() $$;
CREATE FUNCTION replica_test.write_here() RETURNS boolean LANGUAGE sql VOLATILE
    AS $$ SELECT pg_is_in_recovery() $$;
CREATE FUNCTION replica_test.slow_where(s float8) RETURNS boolean LANGUAGE sql STABLE
    AS $$ SELECT pg_sleep(s) IS NULL AND pg_is_in_recovery() $$;
GRANT USAGE ON SCHEMA replica_test TO PUBLIC;
"""
SMALL = {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "on",
         "shared_buffers": "64MB", "max_connections": "60", "timezone": "UTC"}


def make_standby(primary: PrivateCluster) -> PrivateCluster:
    """pg_basebackup -R of `primary` over TCP: standby.signal and primary_conninfo written."""
    standby = PrivateCluster(port=free_port(), settings=SMALL)
    standby.base.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        user = pwd.getpwnam("postgres")
        os.chown(standby.base, user.pw_uid, user.pw_gid)
    conninfo = (f"host=127.0.0.1 port={primary.port} user=kwrepl "
                f"password={REPLICATION_PASSWORD} application_name=kwollect_standby")
    subprocess.run(standby._cmd("pg_basebackup", "-d", conninfo, "-D", str(standby.datadir),
                                "-R", "-X", "stream", "-c", "fast"),
                   check=True, capture_output=True)
    auto_conf = (standby.datadir / "postgresql.auto.conf").read_text()
    assert "primary_conninfo" in auto_conf and f"port={primary.port}" in auto_conf
    return standby.start()


@pytest.fixture(scope="module")
def replicated():
    primary = PrivateCluster(settings=SMALL).start()
    standby = None
    try:
        primary.psql(f"CREATE ROLE kwrepl REPLICATION LOGIN PASSWORD '{REPLICATION_PASSWORD}'")
        config, _token = asyncio.run(setup(setup_conf(primary)))
        primary.psql(WHERE_SQL, database="kwdb")
        standby = make_standby(primary)
        yield primary, standby, config
    finally:
        if standby is not None:
            standby.destroy()
        primary.destroy()


def replica_config(config: str, primary: PrivateCluster, standby: PrivateCluster) -> str:
    uri = config_value(config, "db-uri")
    read_uri = uri.replace(f":{primary.port}/", f":{standby.port}/")
    assert read_uri != uri
    return (config.replace('db-schemas = "api"', 'db-schemas = "api, replica_test"')
            + f'db-read-uri = "{read_uri}"\n')


@pytest.fixture(scope="module")
def gateways(replicated, tmp_path_factory):
    """Two kwollect-api on the same pair: falling back to the primary (the default), and not."""
    primary, standby, config = replicated
    base = replica_config(config, primary, standby)
    servers = [start_gateway(tmp_path_factory.mktemp("api-fallback"), base),
               start_gateway(tmp_path_factory.mktemp("api-strict"), base,
                             extra="db-read-fallback = false\n")]
    try:
        yield servers
    finally:
        for server in servers:
            server.stop()


async def call(url: str, path: str, method: str = "GET", token: str | None = None,
               body: str | None = None) -> tuple[int, object]:
    headers = {"Content-Type": "application/json"}
    if not path.startswith(("/rpc/insert_metrics", "/rpc/get_metrics")):
        headers["Accept-Profile"] = headers["Content-Profile"] = "replica_test"
    if token:
        headers["Authorization"] = f"Bearer {token}"
    async with aiohttp.ClientSession() as http, \
            http.request(method, url + path, headers=headers, data=body,
                         timeout=aiohttp.ClientTimeout(total=60)) as resp:
        return resp.status, json.loads(await resp.read() or b"null")


async def test_reads_on_the_standby_writes_on_the_primary(gateways, replicated):
    server = gateways[0]
    token = make_token(server.secret, "kwuser", 1)
    assert await call(server.url, "/rpc/where_am_i") == (200, True)  # GET: the standby
    assert await call(server.url, "/rpc/where_am_i", "POST", token, "{}") == (200, True)
    assert await call(server.url, "/rpc/write_here", "POST", token, "{}") == (200, False)
    # the real API: a write through the primary, read back from the standby
    status, _ = await call(server.url, "/rpc/insert_metrics", "POST", token, json.dumps(
        {"timestamp": "2026-01-06 14:00:00", "device_id": "replica-1",
         "metric_id": "power_watt", "value": 42}))
    assert status == 200
    read = "/rpc/get_metrics?devices=replica-1&start_time=2026-01-06&end_time=2026-01-07"
    deadline = time.monotonic() + 30
    got: object = []
    while not got and time.monotonic() < deadline:
        status, got = await call(server.url, read)
        assert status == 200
        await asyncio.sleep(0.2)
    assert [(r["metric_id"], r["value"]) for r in got] == [("power_watt", 42)]  # type: ignore[union-attr]
    # where it ran: the standby holds the row too, and the primary's standby is in its stats
    primary, standby, _ = replicated
    assert standby.psql("SELECT count(*) FROM metrics WHERE device_id = 'replica-1'",
                        database="kwdb").strip() == "1"
    assert "kwollect_standby|streaming" in primary.psql(
        "SELECT application_name, state FROM pg_stat_replication")


async def test_health_shows_the_replica_and_its_lag(gateways):
    status, report = await call(gateways[0].url, "/health")
    assert status == 200, report
    assert isinstance(report, dict)
    assert report["status"] == "ok" and report["replica"] == "ok"
    assert isinstance(report["replica_lag_bytes"], int) and report["replica_lag_bytes"] >= 0
    assert report["replica_lag_s"] >= 0


async def test_standby_stopped_mid_request(gateways, replicated):
    """Both gateways are reading on the standby (a 3 s call) when it stops: the default
    gateway answers from the primary, the strict one a 503 that says why; /health says
    so; once the standby is back, reads return to it."""
    fallback, strict = gateways
    _, standby, _ = replicated
    slow = "/rpc/slow_where?s=3"
    calls = [asyncio.create_task(call(server.url, slow)) for server in gateways]
    # both calls running on the standby when it stops (a condition, not a fixed 1 s: on a
    # loaded machine they may take longer to get there)
    deadline = time.monotonic() + 30
    running = 0
    while running < 2 and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
        running = int(await asyncio.to_thread(
            standby.psql, "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' "
            "AND query LIKE '%slow\\_where%' AND pid <> pg_backend_pid()"))
    assert running == 2
    await asyncio.to_thread(standby.stop, "fast")
    try:
        assert await calls[0] == (200, False)  # served again, by the primary
        status, error = await calls[1]
        assert status == 503 and isinstance(error, dict)
        assert "read replica cannot be reached" in error["message"]
        assert await call(fallback.url, "/rpc/where_am_i") == (200, False)
        status, error = await call(strict.url, "/rpc/where_am_i")
        assert status == 503
        status, report = await call(fallback.url, "/health")
        assert status == 200 and report["replica"] != "ok"  # type: ignore[index]
        status, report = await call(strict.url, "/health")
        assert status == 503 and report["status"] == "unavailable"  # type: ignore[index]
        # writes never depended on the standby
        token = make_token(strict.secret, "kwuser", 1)
        assert await call(strict.url, "/rpc/write_here", "POST", token, "{}") == (200, False)
    finally:
        await asyncio.to_thread(standby.start)
    deadline = time.monotonic() + 30
    answers: list[tuple[int, object]] = []
    while time.monotonic() < deadline:
        answers = [await call(server.url, "/rpc/where_am_i") for server in gateways]
        if answers == [(200, True), (200, True)]:
            break
        await asyncio.sleep(0.5)
    assert answers == [(200, True), (200, True)]
    assert "read replica failed" in fallback.log_text()
