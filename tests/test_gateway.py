"""kwollect-api against the real database, through a real HTTP client.

The server is the real kwollect-api process (tests/fixtures/gateway.py).  What PostgREST
would answer is computed in SQL from a UTC session (row_to_json, PostgREST's own encoding),
and the gateway's bytes must match it.
"""

from __future__ import annotations

import asyncio
import base64
import csv
import io
import json
import re
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from pathlib import Path
from urllib.parse import quote

import aiohttp
import jwt
import orjson
import pytest

from kwollect.gateway import config
from kwollect.gateway.auth import Authenticator
from kwollect.gateway.errors import ApiError
from kwollect.options import OptionError
from kwollect.store.setupdb import make_token
from tests.fixtures.gateway import GATEWAY_MAX_ROWS, gateway_command, start_gateway
from tests.sqlapi import UTC, load, series

T0 = datetime(2020, 1, 6, 13, 35, tzinfo=UTC)      # the README's window
T_BIG = datetime(2020, 2, 1, tzinfo=UTC)
JOB = 71234
WINDOW = "start_time=2020-01-06T13:35:00&end_time=2020-01-06T14:35:00"
BIG_METRICS = ("m_a", "m_b", "m_c")
BIG_SECONDS = 8_000
ERROR_KEYS = {"code", "details", "hint", "message"}
TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,6})?\+00:00$")
TEST_PROFILE = {"Accept-Profile": "gw_test"}


def special(i: int) -> float:
    return {3: float("nan"), 4: float("inf"), 5: float("-inf")}.get(i, 20.0 + i / 4)


@pytest.fixture(scope="module")
async def data(kwdb):
    conn = await kwdb.connect("kwuser")
    rows = []
    for dev in ("gw-1", "gw-2"):
        rows += series(dev, "bmc_node_power_watt", T0, 361, 10, value=lambda i: 100.0 + i % 9)
    rows += series("gw-2", "temp_celsius", T0 + timedelta(microseconds=123456), 60, 60,
                   value=special, labels={"unit": "°C", "note": 'a "quoted" \\ value\n'})
    rows += series("gw-1", "fan_rpm", T0 + timedelta(milliseconds=500), 30, 120)
    for metric in BIG_METRICS:
        rows += series("gw-big", metric, T_BIG, BIG_SECONDS, 1, value=lambda i: i * 0.5)
    now = datetime.now(UTC)
    rows += [(now - timedelta(seconds=20), "gw-av-1", "gw_metric", 1.0, None),
             (now - timedelta(seconds=20), "gw-av-2", "gw_metric", 2.0, None)]
    # available_metrics looks at the minute before `at`: the tests pass at = now - 10 s
    await load(conn, rows)
    await conn.execute("INSERT INTO nodetime_per_job VALUES ($1, $2, $3, 'gw-1'), "
                       "($1, $2, $3, 'gw-2')", JOB, T0 + timedelta(minutes=10),
                       T0 + timedelta(minutes=20))
    await conn.close()
    return now


@pytest.fixture(scope="module")
async def http():
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture(scope="module")
def token(gateway):
    return make_token(gateway.secret, "kwuser", 1)


@pytest.fixture
async def utc(kwdb):
    """A reader session in UTC: what PostgREST's database-side encoding gives."""
    conn = await kwdb.connect("kwuser_ro")
    await conn.execute("SET TimeZone = 'UTC'; SET DateStyle = 'ISO, YMD'")
    yield conn
    await conn.close()


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def fetch(http, gateway, path, *, method="GET", headers=None, **kwargs):
    async with http.request(method, gateway.url + path, headers=headers, **kwargs) as resp:
        return resp.status, resp.headers, await resp.read()


async def row_json(conn, query: str, *args) -> list[str]:
    """row_to_json of each row of `query`, as PostgreSQL writes it."""
    rows = await conn.fetch(f"SELECT row_to_json(_r)::text FROM ({query}) _r", *args)  # noqa: S608
    return [r[0] for r in rows]


def as_array(texts: list[str]) -> bytes:
    return ("[" + ",\n".join(texts) + "]").encode()


def assert_error(status, body, expected_status, code=None):
    assert status == expected_status, body
    error = json.loads(body)
    assert set(error) == ERROR_KEYS
    if code:
        assert error["code"] == code, error
    return error


# -- the README's curl examples ------------------------------------------------------------

async def test_get_metrics_by_devices_is_written_like_postgrest(gateway, http, data, utc):
    status, headers, body = await fetch(
        http, gateway, f"/rpc/get_metrics?devices=gw-1,gw-2&{WINDOW}")
    assert status == 200 and headers["Content-Type"] == "application/json; charset=utf-8"
    expected = await row_json(utc, "SELECT * FROM api.get_metrics(devices => 'gw-1,gw-2', "
                              "start_time => '2020-01-06T13:35:00', "
                              "end_time => '2020-01-06T14:35:00')")
    assert body == as_array(expected)
    rows = json.loads(body)
    assert len(rows) == 2 * 361 + 60 + 30
    assert list(rows[0]) == ["timestamp", "device_id", "metric_id", "value", "labels"]
    assert all(TIMESTAMP.match(r["timestamp"]) for r in rows)
    temps = [r for r in rows if r["metric_id"] == "temp_celsius"]
    assert temps[0]["timestamp"] == "2020-01-06T13:35:00.123456+00:00"
    assert [t["value"] for t in temps[3:6]] == ["NaN", "Infinity", "-Infinity"]
    assert temps[0]["labels"] == {"unit": "°C", "note": 'a "quoted" \\ value\n'}
    fans = [r for r in rows if r["metric_id"] == "fan_rpm"]
    assert fans[0]["timestamp"] == "2020-01-06T13:35:00.5+00:00"


async def test_get_metrics_by_job(gateway, http, data, utc):
    status, _, body = await fetch(http, gateway, f"/rpc/get_metrics?job_id={JOB}")
    assert status == 200
    assert body == as_array(await row_json(
        utc, "SELECT * FROM api.get_metrics(job_id => $1)", JOB))
    rows = json.loads(body)
    assert {r["device_id"] for r in rows} == {"gw-1", "gw-2"}
    assert rows[0]["timestamp"] == "2020-01-06T13:45:00+00:00"
    assert rows[-1]["timestamp"] == "2020-01-06T13:55:00+00:00"
    status, _, body = await fetch(http, gateway, f"/rpc/get_metrics?job_id={JOB}&summary=true")
    assert status == 200
    assert body == as_array(await row_json(
        utc, "SELECT * FROM api.get_metrics(job_id => $1, summary => true)", JOB))


async def test_get_job_metrics_is_a_scalar_object(gateway, http, data, utc):
    status, _, body = await fetch(http, gateway, f"/rpc/get_job_metrics?job_id={JOB}")
    assert status == 200
    result = json.loads(body)
    assert result == json.loads(await utc.fetchval("SELECT api.get_job_metrics($1)", JOB))
    assert result["job_id"] == JOB and result["job_energy_watthour"] > 0


async def test_insert_one_object_with_token(gateway, http, token, data):
    status, _, body = await fetch(http, gateway, "/rpc/insert_metrics", method="POST",
                                  headers={**auth(token), "Content-Type": "application/json"},
                                  data='{"timestamp": "2020-01-06 14:00:00", "device_id": '
                                       '"gw-in-1", "metric_id": "example_metric", "value": 42}')
    assert status == 200, body
    assert json.loads(body) == [{"timestamp": "2020-01-06T14:00:00+00:00", "device_id": "gw-in-1",
                                 "metric_id": "example_metric", "value": 42, "labels": {}}]
    _, _, stored = await fetch(http, gateway, f"/rpc/get_metrics?devices=gw-in-1&{WINDOW}")
    assert [r["value"] for r in json.loads(stored)] == [42]


async def test_insert_array_in_one_transaction(gateway, http, token, data):
    headers = {**auth(token), "Content-Type": "application/json"}
    rows = [{"device_id": "gw-in-2", "metric_id": "example_metric1", "value": 42,
             "timestamp": 1578318000},
            {"device_id": "gw-in-2", "metric_id": "example_metric2", "value": 22,
             "timestamp": 1578318000.5, "labels": {"unit": "W"}}]
    status, _, body = await fetch(http, gateway, "/rpc/insert_metrics", method="POST",
                                  headers=headers, data=json.dumps(rows))
    assert status == 200, body
    assert [(r["metric_id"], r["value"]) for r in json.loads(body)] == [
        ("example_metric1", 42), ("example_metric2", 22)]
    bad = [{"device_id": "gw-in-3", "metric_id": "m", "value": 1},
           {"device_id": "gw-in-3", "value": 2}]
    status, _, body = await fetch(http, gateway, "/rpc/insert_metrics", method="POST",
                                  headers=headers, data=json.dumps(bad))
    assert "row 2 is invalid" in assert_error(status, body, 400, "22023")["message"]
    _, _, stored = await fetch(http, gateway, f"/rpc/get_metrics?devices=gw-in-3&{WINDOW}")
    assert json.loads(stored) == []


async def test_update_promoted_metrics_needs_a_token(gateway, http, token):
    status, _, body = await fetch(http, gateway, "/rpc/update_promoted_metrics", method="POST")
    assert_error(status, body, 401, "42501")
    status, _, body = await fetch(http, gateway, "/rpc/update_promoted_metrics", method="POST",
                                  headers=auth(token))
    assert status == 200 and isinstance(json.loads(body), list)


async def test_available_metrics_get_and_post(gateway, http, data):
    at = (data - timedelta(seconds=10)).isoformat()
    params = quote(json.dumps({"devices": ["gw-av-2", "gw-av-1"]}))
    status, _, body = await fetch(http, gateway,
                                  f"/rpc/available_metrics?at={quote(at)}&params={params}")
    assert status == 200
    expected = [{"device_id": "gw-av-1", "metric_id": "gw_metric"},
                {"device_id": "gw-av-2", "metric_id": "gw_metric"}]
    assert json.loads(body) == expected
    status, _, body = await fetch(http, gateway, "/rpc/available_metrics", method="POST",
                                  json={"at": at, "params": {"devices": ["gw-av-1", "gw-av-2"]}})
    assert status == 200 and json.loads(body) == expected


# -- formats ---------------------------------------------------------------------------------

async def test_csv_has_a_header_and_iso_timestamps(gateway, http, data, utc):
    status, headers, body = await fetch(http, gateway, f"/rpc/get_metrics?devices=gw-2&{WINDOW}",
                                        headers={"Accept": "text/csv"})
    assert status == 200 and headers["Content-Type"] == "text/csv; charset=utf-8"
    table = list(csv.reader(io.StringIO(body.decode())))
    assert table[0] == ["timestamp", "device_id", "metric_id", "value", "labels"]
    expected = await utc.fetch("SELECT to_json(timestamp) #>> '{}', device_id, metric_id, "
                               "value::text, "
                               "labels::text FROM api.get_metrics(devices => 'gw-2', "
                               "start_time => '2020-01-06T13:35:00', "
                               "end_time => '2020-01-06T14:35:00')")
    assert table[1:] == [list(r) for r in expected]
    assert table[1][0] == "2020-01-06T13:35:00+00:00"   # as in JSON, not PostgreSQL's text


async def test_ndjson_one_object_per_line(gateway, http, data):
    _, _, array = await fetch(http, gateway, f"/rpc/get_metrics?devices=gw-1,gw-2&{WINDOW}")
    status, headers, body = await fetch(http, gateway,
                                        f"/rpc/get_metrics?devices=gw-1,gw-2&{WINDOW}",
                                        headers={"Accept": "application/x-ndjson"})
    assert status == 200 and headers["Content-Type"].startswith("application/x-ndjson")
    assert body.endswith(b"}\n")
    assert [json.loads(line) for line in body.splitlines()] == json.loads(array)


async def test_accept_negotiation(gateway, http, data):
    url = f"/rpc/get_metrics?devices=gw-1&{WINDOW}"
    _, headers, _ = await fetch(http, gateway, url, headers={
        "Accept": "text/csv;q=0.5, application/x-ndjson"})
    assert headers["Content-Type"].startswith("application/x-ndjson")
    _, headers, _ = await fetch(http, gateway, url, headers={"Accept": "text/*"})
    assert headers["Content-Type"].startswith("text/csv")
    status, _, body = await fetch(http, gateway, url, headers={"Accept": "application/xml"})
    assert_error(status, body, 406, "PGRST107")


async def test_values_of_every_type_are_written_like_postgresql(gateway, http, utc):
    query = "SELECT * FROM gw_test.values_table()"
    expected = await row_json(utc, query)
    status, _, body = await fetch(http, gateway, "/rpc/values_table", headers=TEST_PROFILE)
    assert status == 200
    rows = body[1:-1].split(b",\n")
    assert [orjson.loads(r) for r in rows] == [orjson.loads(e) for e in expected]
    # byte for byte, except raw whitespace inside a json value (made spaces, for NDJSON)
    for got, want in zip(rows, expected, strict=True):
        if "\n" not in want:
            assert got.decode() == want
    row2 = orjson.loads(rows[1])
    assert row2["ts"] == "2020-12-31T22:00:00.123456+00:00"
    assert row2["t"] == 'quote " backslash \\ newline \n tab \t ctrl \x01\x02 é ☃'
    assert orjson.loads(rows[3])["ts"] == "0044-03-15T12:00:00+00:00 BC"
    _, _, ndjson = await fetch(http, gateway, "/rpc/values_table",
                               headers={**TEST_PROFILE, "Accept": "application/x-ndjson"})
    assert [orjson.loads(line) for line in ndjson.splitlines()] == [orjson.loads(r) for r in rows]
    # rows 1, 4 and 5 hold no value that COPY quotes: they take the bulk path
    _, _, bulk = await fetch(http, gateway, "/rpc/values_table?ids=%7B1,4,5%7D",
                             headers=TEST_PROFILE)
    assert bulk == as_array([expected[0], expected[3], expected[4]])
    # CSV: PostgreSQL's text, but timestamps in the ISO 8601 form of the JSON output
    sink = io.BytesIO()
    await utc.copy_from_query("SELECT i, big, f, n, b, t, to_json(ts) #>> '{}' AS ts, "
                              "to_json(tsn) #>> '{}' AS tsn, d, j, jb, arr, u, iv "
                              "FROM gw_test.values_table()", output=sink, format="csv",
                              header=True)
    _, _, csv_body = await fetch(http, gateway, "/rpc/values_table",
                                 headers={**TEST_PROFILE, "Accept": "text/csv"})
    assert csv_body == sink.getvalue()


async def test_result_shapes(gateway, http, token):
    async def get(path, **kw):
        status, _, body = await fetch(http, gateway, path, headers=TEST_PROFILE, **kw)
        assert status == 200, body
        return json.loads(body)

    assert await get("/rpc/greeting?name=kw%22o") == 'hello kw"o'
    assert await get("/rpc/numbers?n=3") == [1, 2, 3]
    assert await get("/rpc/numbers?n=0") == []
    assert await get("/rpc/one_row?x=4") == [{"x": 4, "label": "row 4"}]
    assert await get("/rpc/pair_of?a=1") == {"a": 1, "b": "b1"}
    assert await get("/rpc/sum_of?xs=%7B1,2,3%7D") == 6
    assert await get("/rpc/sum_of?xs=1&xs=2") == 3
    status, _, body = await fetch(http, gateway, "/rpc/sum_of", method="POST",
                                  json={"xs": [1, 2, 3, 4]},
                                  headers={"Content-Profile": "gw_test"})
    assert status == 200 and json.loads(body) == 10
    status, _, body = await fetch(http, gateway, "/rpc/touch", method="POST",
                                  json={"note": "x"},
                                  headers={**auth(token), "Content-Profile": "gw_test"})
    assert status == 204 and body == b""


async def test_form_body_is_accepted(gateway, http, data):
    status, _, body = await fetch(http, gateway, "/rpc/get_metrics", method="POST",
                                  data={"devices": "gw-1", "start_time": "2020-01-06T13:35:00",
                                        "end_time": "2020-01-06T13:36:00"})
    assert status == 200, body
    assert len(json.loads(body)) == 7 + 1   # power every 10 s, and the fan at 13:35:00.5


# -- streaming -------------------------------------------------------------------------------

async def test_a_result_many_chunks_long_streams_complete_and_in_order(gateway, http, data,
                                                                      utc):
    end = T_BIG + timedelta(seconds=5_999)
    url = (f"/rpc/get_metrics?devices=gw-big&start_time={T_BIG.timestamp()}"
           f"&end_time={end.timestamp()}")
    chunks = []
    # HTTP chunks of the server's framing (not the client's reads, which coalesce under
    # load): the rows leave in pieces of about FLUSH_BYTES as they come from PostgreSQL,
    # whose own batching varies with load, hence a low bound.
    http_chunks = 0
    async with http.get(gateway.url + url) as resp:
        assert resp.status == 200
        assert resp.headers.get("Transfer-Encoding") == "chunked"
        async for chunk, end_of_http_chunk in resp.content.iter_chunks():
            chunks.append(chunk)
            http_chunks += end_of_http_chunk
    assert http_chunks > 2
    rows = json.loads(b"".join(chunks))
    assert len(rows) == 3 * 6_000
    keys = [(r["timestamp"], r["metric_id"]) for r in rows]
    assert keys == sorted(keys)
    assert rows[-1] == {"timestamp": "2020-02-01T01:39:59+00:00", "device_id": "gw-big",
                        "metric_id": "m_c", "value": 2999.5, "labels": {}}
    assert [r["value"] for r in rows[:6]] == [0, 0, 0, 0.5, 0.5, 0.5]
    status, _, ndjson = await fetch(http, gateway, url, headers={"Accept": "application/x-ndjson"})
    assert status == 200 and len(ndjson.splitlines()) == 3 * 6_000


async def test_row_bound_refuses_before_the_first_row(gateway, http, data):
    url = "/rpc/get_metrics?devices=gw-big&start_time=2020-02-01T00:00:00&end_time=2020-02-02"
    status, _, body = await fetch(http, gateway, url)
    # SQLSTATE PT413: HTTP 413, as PostgREST maps PTxyz codes
    error = assert_error(status, body, 413, "PT413")
    assert f"limit of {GATEWAY_MAX_ROWS} rows" in error["message"] and "summary" in error["hint"]


async def test_error_after_streaming_started_cuts_the_response(gateway, http):
    with pytest.raises(aiohttp.ClientPayloadError):
        async with http.get(gateway.url + "/rpc/fail_after?n=100000",
                            headers=TEST_PROFILE) as resp:
            assert resp.status == 200
            await resp.read()
    status, _, body = await fetch(http, gateway, "/rpc/numbers?n=2", headers=TEST_PROFILE)
    assert status == 200 and json.loads(body) == [1, 2]
    status, _, body = await fetch(http, gateway, "/rpc/fail_after?n=3", headers=TEST_PROFILE)
    assert_error(status, body, 400, "22012")


async def test_client_going_away_stops_the_query_and_frees_the_connection(gateway, http,
                                                                          kwdb):
    async with http.get(gateway.url + "/rpc/slow_rows?n=10000000",
                        headers=TEST_PROFILE) as resp:
        assert resp.status == 200
        await resp.content.read(100)
        resp.connection.transport.abort()
    admin = await kwdb.connect("admin")
    try:
        deadline = time.monotonic() + 10
        while await admin.fetchval("SELECT count(*) FROM pg_stat_activity WHERE query LIKE "
                                   "'%slow_rows%' AND pid <> pg_backend_pid()"):
            assert time.monotonic() < deadline, "the backend kept running"
            await asyncio.sleep(0.1)
    finally:
        await admin.close()
    for _ in range(4):  # more requests than pooled connections
        status, _, body = await fetch(http, gateway, "/rpc/numbers?n=1", headers=TEST_PROFILE)
        assert status == 200


async def test_concurrent_requests(gateway, http, data):
    urls = [f"/rpc/get_metrics?devices=gw-1,gw-2&{WINDOW}", f"/rpc/get_metrics?job_id={JOB}",
            f"/rpc/get_job_metrics?job_id={JOB}",
            f"/rpc/get_metrics?devices=gw-big&start_time={T_BIG.timestamp()}"
            f"&end_time={T_BIG.timestamp() + 2000}"] * 3
    sequential = [await fetch(http, gateway, url) for url in urls]
    concurrent = await asyncio.gather(*(fetch(http, gateway, url) for url in urls))
    assert [(s, b) for s, _, b in concurrent] == [(s, b) for s, _, b in sequential]
    assert all(s == 200 for s, _, _ in concurrent)


# -- authentication --------------------------------------------------------------------------

def unsigned_token(claims: dict) -> str:
    def part(value: dict) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()
    return f"{part({'alg': 'none', 'typ': 'JWT'})}.{part(claims)}."


async def test_jwt_rules(gateway, http, token, data):
    read = f"/rpc/get_metrics?devices=gw-1&{WINDOW}"
    write = "/rpc/insert_metrics"
    body = {"device_id": "gw-jwt", "metric_id": "m", "value": 1, "timestamp": "2020-01-06"}
    assert (await fetch(http, gateway, read))[0] == 200
    status, headers, reply = await fetch(http, gateway, write, method="POST", json=body)
    assert_error(status, reply, 401, "42501")
    assert headers["WWW-Authenticate"] == "Bearer"
    status, _, reply = await fetch(http, gateway, write, method="POST", json=body,
                                   headers=auth(token))
    assert status == 200, reply
    now = int(time.time())
    bad_tokens = {
        "expired": jwt.encode({"role": "kwuser", "exp": now - 3600}, gateway.secret, "HS256"),
        "signature": jwt.encode({"role": "kwuser"}, gateway.secret + "x", "HS256"),
        "alg none": unsigned_token({"role": "kwuser"}),
        "garbage": "not-a-token",
    }
    for name, bad in bad_tokens.items():
        status, headers, reply = await fetch(http, gateway, read, headers=auth(bad))
        error = assert_error(status, reply, 401, "PGRST301")
        assert headers["WWW-Authenticate"].startswith('Bearer error="invalid_token"'), name
        if name == "expired":
            assert error["message"] == "JWT expired"
    owner = jwt.encode({"role": "kwuser_owner"}, gateway.secret, "HS256")
    status, _, reply = await fetch(http, gateway, read, headers=auth(owner))
    assert_error(status, reply, 403, "42501")
    no_role = jwt.encode({"sub": "someone"}, gateway.secret, "HS512")
    status, _, reply = await fetch(http, gateway, write, method="POST", json=body,
                                   headers=auth(no_role))
    assert_error(status, reply, 403, "42501")   # anonymous role, but authenticated


async def test_role_claims_headers_and_address_reach_sql(gateway, http, token):
    status, _, body = await fetch(http, gateway, "/rpc/whoami?tag=t%C3%A9",
                                  headers={**TEST_PROFILE, **auth(token), "X-Kw-Test": "yes"})
    assert status == 200
    seen = json.loads(body)
    assert seen["user"] == "kwuser" and seen["tag"] == "té"
    assert seen["claims"]["role"] == "kwuser" and "exp" in seen["claims"]
    assert seen["headers"]["x-kw-test"] == "yes"
    assert seen["headers"]["authorization"] == f"Bearer {token}"
    assert seen["client_addr"] == "127.0.0.1"
    assert (seen["method"], seen["path"]) == ("GET", "/rpc/whoami")
    assert seen["read_only"] == "on" and seen["timezone"] == "UTC"
    assert seen["search_path"] == '"gw_test", "public"'   # as PostgREST sets it
    status, _, body = await fetch(http, gateway, "/rpc/whoami", method="POST", json={},
                                  headers={"Content-Profile": "gw_test"})
    seen = json.loads(body)
    assert seen["user"] == "kwuser_ro" and seen["claims"] == {"role": "kwuser_ro"}
    assert seen["read_only"] == "on"   # POST to a STABLE function: read only, as PostgREST


async def test_role_does_not_leak_between_requests(gateway, http, token):
    for _ in range(2 * 3):
        status, _, _ = await fetch(http, gateway, "/rpc/touch", method="POST",
                                   json={"note": "a"},
                                   headers={**auth(token), "Content-Profile": "gw_test"})
        assert status == 204
        status, _, body = await fetch(http, gateway, "/rpc/touch", method="POST",
                                      json={"note": "a"}, headers={"Content-Profile": "gw_test"})
        assert_error(status, body, 401, "42501")


# -- errors ----------------------------------------------------------------------------------

async def test_errors_are_postgrest_shaped(gateway, http, token, data):
    cases = [
        ("/rpc/no_such_function", {}, 404, "PGRST202"),
        ("/rpc/get_metrics?devices=gw-1&bogus=1", {}, 400, "PGRST202"),
        ("/rpc/get_metrics?job_id=abc", {}, 400, "22P02"),
        ("/rpc/get_metrics?devices=gw-1&start_time=soon", {}, 400, "22007"),
        ("/rpc/get_metrics?devices=gw-1&as_rate=maybe", {}, 400, "22023"),
        ("/rpc/get_metrics?start_time=2020-01-01", {}, 400, "22023"),
        # SQLSTATE PT404: HTTP 404, as PostgREST maps PTxyz codes
        ("/rpc/get_metrics?job_id=987654321", {}, 404, "PT404"),
        ("/rpc/get_job_metrics", {}, 400, "PGRST202"),
        ("/rpc/pay", TEST_PROFILE, 402, "PT402"),
        ("/rpc/whoami", {"Accept-Profile": "kwollect"}, 406, "PGRST106"),
        ("/rpc/insert_metrics?device_id=a&metric_id=b", auth(token), 405, "PGRST101"),
        ("/nowhere", {}, 404, "HTTP404"),
    ]
    for path, headers, status_wanted, code in cases:
        status, _, body = await fetch(http, gateway, path, headers=headers)
        error = assert_error(status, body, status_wanted, code)
        if code == "PGRST202" and status_wanted == 400 and "bogus" in path:
            assert error["details"] == "unknown parameter(s): bogus"
            assert "devices text" in error["hint"]
    for data_, content_type, code in [("{not json", "application/json", "PGRST102"),
                                      ('"a string"', "application/json", "PGRST102"),
                                      ("<x/>", "text/xml", "PGRST107")]:
        status, _, body = await fetch(http, gateway, "/rpc/get_metrics", method="POST",
                                      data=data_, headers={"Content-Type": content_type})
        assert_error(status, body, 415 if code == "PGRST107" else 400, code)
    status, _, body = await fetch(http, gateway, "/rpc/get_metrics", method="PUT")
    assert_error(status, body, 405, "PGRST101")


# -- service ---------------------------------------------------------------------------------

async def test_health_and_openapi(gateway, http, token):
    status, _, body = await fetch(http, gateway, "/health")
    assert status == 200 and json.loads(body)["database"] == "ok"
    status, headers, body = await fetch(http, gateway, "/")
    assert status == 200 and headers["Content-Type"].startswith("application/openapi+json")
    document = json.loads(body)
    paths = document["paths"]
    assert {"/rpc/get_metrics", "/rpc/available_metrics", "/rpc/get_job_metrics"} <= set(paths)
    assert "/rpc/insert_metrics" not in paths   # the anonymous role may not execute it
    parameters = {p["name"]: p for p in paths["/rpc/get_metrics"]["get"]["parameters"]}
    assert list(parameters) == ["job_id", "nodes", "devices", "metrics", "start_time",
                                "end_time", "summary", "as_rate"]
    assert parameters["job_id"]["schema"]["type"] == "integer"
    assert not parameters["devices"]["required"]
    _, _, body = await fetch(http, gateway, "/", headers=auth(token))
    paths = json.loads(body)["paths"]
    assert set(paths["/rpc/insert_metrics"]) == {"post"}


@contextmanager
def socket_port() -> Iterator[int]:
    """A loopback port that refuses connections (bound, never listening) while held."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


async def test_dead_database_is_reported(tmp_path, http, kwdb):
    with socket_port() as port:
        conf = re.sub(r"@localhost:\d+/", f"@127.0.0.1:{port}/", kwdb.postgrest_config)
        server = start_gateway(tmp_path, conf)
        try:
            status, _, body = await fetch(http, server, "/health")
            assert status == 503 and json.loads(body)["status"] == "unavailable"
            status, _, body = await fetch(http, server, "/rpc/get_metrics?job_id=1")
            assert_error(status, body, 503, "PGRST002")
            assert server.process.poll() is None
        finally:
            server.stop()
    assert "cannot load the schema cache" in server.log_text()


# -- configuration and tokens, without a server ---------------------------------------------

def test_postgrest_configuration_file(tmp_path, monkeypatch):
    secret_file = tmp_path / "secret"
    secret_file.write_text("s" * 40 + "\n")
    conf_file = tmp_path / "api.conf"
    conf_file.write_text(
        '# written by kwollect-setup-db\n'
        'db-uri = "postgres://kwuser:$(GW_TEST_PW)@db.example:5433/kwdb"\n'
        'db-schema = "api"\n'
        'db-anon-role = "kwuser_ro"\n'
        f'jwt-secret = "@{secret_file}"\n'
        'server-port = 3001\n'
        'kwollect-max-rows = 1000\n'
        'app.settings.site = "nancy"\n'
        'openapi-server-proxy-uri = "http://x"\n')
    monkeypatch.setenv("GW_TEST_PW", "p@ss")
    monkeypatch.setenv("PGRST_DB_ANON_ROLE", "web_anon")
    settings = config.load([str(conf_file), "--log-level", "warn", "--server-host", "!6"])
    assert settings.db_uri == "postgres://kwuser:p@ss@db.example:5433/kwdb"
    assert settings.schemas == ("api",) and settings.anon_role == "web_anon"
    assert settings.jwt_secret == b"s" * 40 and settings.server_port == 3001
    assert settings.server_host == "::" and settings.max_rows == 1000
    assert settings.app_settings == {"app.settings.site": "nancy"}
    defaults = config.load([])
    assert defaults.server_port == 3000 and defaults.server_host == "0.0.0.0"  # noqa: S104
    conf_file.write_text('jwt-secret = "short"\n')
    with pytest.raises(OptionError, match="at least 32"):
        config.load([str(conf_file)])
    with pytest.raises(SystemExit):   # secrets are never taken from argv
        config.parser().parse_args(["--jwt-secret", "x" * 40])


def test_role_claim_key_and_audience():
    secret = b"k" * 32
    nested = Authenticator(secret, "anon", "kwollect",
                           config.parse_role_claim_key('."https://kw.org/claims".roles[1]'))
    token = jwt.encode({"https://kw.org/claims": {"roles": ["a", "writer"]}, "aud": "kwollect"},
                       secret, "HS256")
    identity = nested.identify(f"Bearer {token}")
    assert identity.role == "writer" and identity.authenticated
    other = jwt.encode({"role": "writer", "aud": "elsewhere"}, secret, "HS256")
    with pytest.raises(ApiError, match="audience"):
        nested.identify(f"bearer {other}")
    assert nested.identify(None).role == "anon"
    closed = Authenticator(secret, None, None, (".role",))
    with pytest.raises(ApiError) as err:
        closed.identify("Basic abc")
    assert (err.value.status, err.value.code) == (401, "PGRST302")


def test_systemd_unit_is_hardened():
    unit = (Path(__file__).parent.parent / "systemd" / "kwollect-api.service").read_text()
    for line in ("Restart=on-failure", "DynamicUser=yes", "NoNewPrivileges=yes",
                 "ProtectSystem=strict", "ExecStart="):
        assert line in unit


@pytest.mark.parametrize("accept", [None, "*/*", "application/json"])
async def test_default_format_is_json(gateway, http, data, accept):
    headers = {"Accept": accept} if accept else None
    status, response_headers, _ = await fetch(http, gateway, f"/rpc/get_metrics?devices=gw-1&"
                                              f"{WINDOW}", headers=headers)
    assert status == 200 and response_headers["Content-Type"].startswith("application/json")


async def test_unknown_schema_functions_are_found_after_creation(gateway, http, kwdb):
    """A function created after start-up is found (the cache is re-read on a miss)."""
    admin = await kwdb.connect("admin")
    try:
        await admin.execute("CREATE OR REPLACE FUNCTION gw_test.late() RETURNS integer "
                            "LANGUAGE sql IMMUTABLE AS 'SELECT 7'; "
                            "GRANT EXECUTE ON FUNCTION gw_test.late() TO kwuser_ro")
        deadline = time.monotonic() + 15
        while True:
            status, _, body = await fetch(http, gateway, "/rpc/late", headers=TEST_PROFILE)
            if status == 200 or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.5)
        assert status == 200 and json.loads(body) == 7
    finally:
        await admin.execute("DROP FUNCTION gw_test.late()")
        await admin.close()


async def test_bad_connection_settings_fail_cleanly(tmp_path):
    conf = tmp_path / "bad.conf"
    conf.write_text('jwt-secret = "short"\n')
    process = await asyncio.create_subprocess_exec(
        *gateway_command(), str(conf), stderr=asyncio.subprocess.PIPE)
    _, stderr = await process.communicate()
    assert process.returncode == 2 and b"at least 32 characters" in stderr


async def test_csv_of_a_json_object_is_a_key_value_table(gateway, http, data):
    """get_job_metrics as CSV: one row per (dotted) key, not one cell holding the object."""
    status, _, body = await fetch(http, gateway, "/rpc/greeting?name=x",
                                  headers={**TEST_PROFILE, "Accept": "text/csv"})
    assert status == 200 and body.decode().splitlines() == ["greeting", "hello x"]
    status, _, body = await fetch(http, gateway, "/rpc/whoami?tag=a",
                                  headers={**TEST_PROFILE, "Accept": "text/csv"})
    assert status == 200
    table = list(csv.reader(io.StringIO(body.decode())))
    assert table[0] == ["key", "value"]
    cells = dict(table[1:])
    assert cells["tag"] == "a" and cells["method"] == "GET"
    assert cells["headers.accept"] == "text/csv"
