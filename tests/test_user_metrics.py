"""insert_user_metrics through kwollect-api: a node of a running job, named by its address
(127.0.0.x mapped to node names; X-Forwarded-For from a trusted proxy only), stores rows
under its own device_id; everyone else gets a clear 403; rows are bounded per job."""

from __future__ import annotations

import json

import aiohttp
import pytest

from kwollect.store.setupdb import make_token
from tests.fixtures.gateway import start_gateway

NODE_MAP = """# address  node
127.0.0.2  um-1.site.example
127.0.0.3  um-2
127.0.0.4  um-3   # never in a job
"""
PROXY = "127.0.0.5"


@pytest.fixture(scope="module")
def node_gateway(kwdb, tmp_path_factory):
    directory = tmp_path_factory.mktemp("node-gateway")
    node_map = directory / "nodes"
    node_map.write_text(NODE_MAP)
    server = start_gateway(directory, kwdb.postgrest_config,
                           extra=f'kwollect-node-map-file = "{node_map}"\n'
                                 f'kwollect-trusted-proxies = "{PROXY}/32"\n')
    yield server
    server.stop()


@pytest.fixture
async def job(kwdb):
    conn = await kwdb.connect("kwuser_api")
    await conn.execute("SET ROLE kwuser_scheduler")
    await conn.fetchval("SELECT api.job_start(72001, 'um-1,um-2', "
                        "(extract(epoch FROM now()) - 60)::text)")
    yield 72001
    await conn.fetchval("SELECT api.job_end(72001)")
    await conn.close()


async def post(server, source: str, body, headers=None):
    """POST /rpc/insert_user_metrics from the loopback address `source`."""
    connector = aiohttp.TCPConnector(local_addr=(source, 0))
    async with aiohttp.ClientSession(connector=connector) as http, \
            http.post(f"{server.url}/rpc/insert_user_metrics", json=body,
                      headers=headers or {}) as response:
        return response.status, await response.json(content_type=None)


async def test_a_job_node_stores_under_its_own_device_id(node_gateway, job, reader):
    status, rows = await post(node_gateway, "127.0.0.2", {"metric_id": "my_metric", "value": 42})
    assert status == 200, rows
    assert [(r["device_id"], r["metric_id"], r["value"], r["labels"]) for r in rows] == [
        ("um-1", "my_metric", 42.0, {"_job_id": job})]
    status, rows = await post(node_gateway, "127.0.0.3", [
        {"metric_id": "loss", "value": 0.5, "labels": {"epoch": "1"}},
        {"metric_id": "loss", "value": 0.25, "labels": {"epoch": "2"}}])
    assert status == 200 and [r["device_id"] for r in rows] == ["um-2", "um-2"]
    stored = await reader.fetch("SELECT value FROM metrics WHERE device_id = 'um-2' "
                                "AND metric_id = 'loss' ORDER BY value")
    assert [r["value"] for r in stored] == [0.25, 0.5]


async def test_no_caller_writes_under_another_device(node_gateway, job):
    status, body = await post(node_gateway, "127.0.0.2",
                              {"metric_id": "m", "value": 1, "device_id": "um-2"})
    assert status == 403 and "caller is node um-1" in body["message"]
    token = make_token(node_gateway.secret, "kwuser", 1)
    status, body = await post(node_gateway, "127.0.0.9", {"metric_id": "m", "value": 1},
                              {"Authorization": f"Bearer {token}"})
    assert status == 403 and body["code"] == "KW403"
    assert "127.0.0.9 is not a known node" in body["message"]


async def test_nodes_outside_a_running_job_are_refused(node_gateway, job):
    status, body = await post(node_gateway, "127.0.0.4", {"metric_id": "m", "value": 1})
    assert status == 403 and "um-3 is not in a running job" in body["message"]


async def test_forwarded_for_only_from_trusted_proxies(node_gateway, job):
    forwarded = {"X-Forwarded-For": "127.0.0.2"}
    status, rows = await post(node_gateway, PROXY, {"metric_id": "via_proxy"}, forwarded)
    assert status == 200 and rows[0]["device_id"] == "um-1"
    status, body = await post(node_gateway, "127.0.0.9", {"metric_id": "m"}, forwarded)
    assert status == 403 and "127.0.0.9" in body["message"]
    # what the client put before the proxy's own entry is not believed
    status, body = await post(node_gateway, PROXY, {"metric_id": "m"},
                              {"X-Forwarded-For": "127.0.0.2, 127.0.0.9"})
    assert status == 403 and "127.0.0.9" in body["message"]


async def test_bounds_per_call_per_minute_and_timestamps(node_gateway, job, admin):
    status, body = await post(node_gateway, "127.0.0.2",
                              [{"metric_id": "m", "value": i} for i in range(1001)])
    assert status == 413 and "over the limit of 1000" in body["message"]
    status, body = await post(node_gateway, "127.0.0.2",
                              {"metric_id": "m", "timestamp": "2001-01-01T00:00:00"})
    assert status == 400 and "outside job" in body["message"]
    status, body = await post(node_gateway, "127.0.0.2", {"metric_id": "bad id!"})
    assert status == 400
    await admin.execute("UPDATE kwollect.settings SET value = '3' "
                        "WHERE key = 'user_metrics_max_rows_per_minute'")
    await admin.execute("DELETE FROM kwollect.user_metrics_usage WHERE job_id = $1", job)
    try:
        status, _ = await post(node_gateway, "127.0.0.2", [{"metric_id": "r"}] * 3)
        assert status == 200
        status, body = await post(node_gateway, "127.0.0.3", {"metric_id": "r"})
        assert status == 429 and f"job {job} sends more than 3 rows" in body["message"]
    finally:
        await admin.execute("UPDATE kwollect.settings SET value = '6000' "
                            "WHERE key = 'user_metrics_max_rows_per_minute'")


async def test_reader_and_writer_cannot_fake_a_node_in_sql(reader):
    await reader.execute("SET kwollect.caller_node = 'um-1'")
    with pytest.raises(Exception, match="permission denied"):
        await reader.fetch("SELECT * FROM api.insert_user_metrics($1::jsonb)",
                           json.dumps({"metric_id": "m"}))
