"""kwollect-api: the aiohttp server that calls the SQL API's functions and streams results.

Each /rpc call runs in one transaction on a pooled connection: READ ONLY unless it is a
POST to a VOLATILE function; set_config() (bound parameters) sets the role, the JWT
claims, the request headers, the client address and the call's argument values; then
COPY (SELECT ... FROM api.<function>(...)) TO STDOUT streams the rows.  The status line
is sent only once the first `hold_bytes` of output (or the whole result) are there, so
errors raised before (bad parameter, unknown job, row bound) are proper HTTP errors.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import re
import resource
import signal
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import IO, Any
from urllib.parse import parse_qsl

import asyncpg
import orjson
from aiohttp import web

import kwollect
from kwollect.errors import KwollectError
from kwollect.gateway import config, openapi, webui
from kwollect.gateway.auth import Authenticator, Identity
from kwollect.gateway.callers import NodeResolver
from kwollect.gateway.catalog import Call, Catalog, Shape, load_catalog, quote_ident
from kwollect.gateway.errors import ApiError, from_postgres, unavailable
from kwollect.gateway.formats import DELIMITER, QUOTE, Format, Framing, negotiate
from kwollect.gateway.limits import (
    DEPTH_SCAN_MAX,
    ExportCap,
    check_headers,
    check_json_depth,
    too_large,
)
from kwollect.logutil import RateLimitedLog, RateLimitFilter, excerpt
from kwollect.options import OptionError

log = logging.getLogger("kwollect.api")
access_log = logging.getLogger("kwollect.api.access")

FLUSH_BYTES = 64 * 1024
# Past the first COALESCE_AFTER bytes, a small chunk means the gateway keeps up with the
# backend: waiting a little lets the socket gather more rows, for fewer, larger chunks
# (measured: half the gateway's CPU per row for CSV, a tenth less for JSON).
COALESCE_AFTER = 256 * 1024
COALESCE_BYTES = 32 * 1024
COALESCE_WAIT_S = 0.002
RELOAD_ON_MISS_S = 5.0
PRIVILEGE_CACHE_S = 60.0
PRIVILEGE_CACHE_MAX = 10_000
# A response the client reads slower than the database produces it goes to a spool (in
# memory up to SPOOL_MEMORY, then a temporary file), so the database connection is
# released when the query ends, not when the slowest client has read everything.
SPOOL_MEMORY = 1024 * 1024
SPOOL_CHUNK = 256 * 1024
RETRY_CATALOG_S = 2.0
HEALTH_TIMEOUT_S = 2.0
REPLICA_RETRY_S = 5.0
"""After the read replica failed a call, read-only calls go straight to the primary for
this long (with db-read-fallback) rather than each waiting for the replica to fail."""
SESSION = {"application_name": "kwollect-api", "TimeZone": "UTC", "DateStyle": "ISO, YMD"}
OPENAPI_MEDIA = "application/openapi+json"
FORM_MEDIA = "application/x-www-form-urlencoded"
# A JSON-array body over COPY_BODY_BYTES for a VOLATILE function goes to PostgreSQL by
# COPY (_copy_body), in COPY_PIECE pieces, rather than as a bound parameter.  Below it the
# gateway also checks the JSON's depth, and one round trip is cheaper than three.
COPY_BODY_BYTES = DEPTH_SCAN_MAX
COPY_PIECE = 1024 * 1024
BODY_TABLE = "kwollect_api_body"
VALUE_ENCODING = 3
_COPY_ESCAPES = ((b"\\", b"\\\\"), (b"\n", b"\\n"), (b"\r", b"\\r"), (b"\t", b"\\t"))
_JSON_SPACE = re.compile(rb"[ \t\r\n]*")
# Called without a token from a job's node: run as the node role, for the node the
# caller's address names (kwollect.caller_node), whatever Authorization says.
NODE_FUNCTIONS = frozenset({"insert_user_metrics"})


class ReplicaFailed(KwollectError):
    """The read replica failed a call before anything was sent: it may run on the primary."""


# Errors that say the server, not the call, failed: connection exceptions (class 08),
# shutdown or crash of the server (57P01-57P03).  A query a standby cancels on conflict
# with recovery (40001) is the call's error, answered as such, not retried here.
_SERVER_GONE = ("08", "57P01", "57P02", "57P03")


def server_gone(exc: BaseException) -> bool:
    """The database server went away (rather than refusing this call)."""
    if isinstance(exc, asyncpg.PostgresError):
        return str(exc.sqlstate or "").startswith(_SERVER_GONE)
    return isinstance(exc, (OSError, asyncpg.InterfaceError, TimeoutError))


def lsn_bytes(text: str) -> int:
    """A pg_lsn's text form (``16/B374D848``) as a byte position."""
    high, _, low = text.partition("/")
    return (int(high, 16) << 32) + int(low, 16)


class StreamBroken(KwollectError):
    """The response was already under way when the call failed: the connection is cut."""

    def __init__(self, message: str, response: web.StreamResponse | None) -> None:
        super().__init__(message)
        self.response = response


class ClientStalled(KwollectError, ConnectionError):
    """The client did not read its response for send_timeout seconds: it is cut off."""


class ClientGone(KwollectError):
    """The client closed the connection while its response was being written."""

    def __init__(self, response: web.StreamResponse | None) -> None:
        super().__init__("client went away")
        self.response = response


class ResultStream:
    """Receives COPY chunks, encodes them, holds the first bytes, then streams."""

    def __init__(self, request: web.Request, fmt: Format, framing: Framing | None,
                 hold_bytes: int, send_timeout: float = 30.0,
                 spool_bytes: int = 256 << 20) -> None:
        self.request = request
        self.fmt = fmt
        self.framing = framing
        self.hold_bytes = hold_bytes
        self.send_timeout = send_timeout
        self.spool_bytes = spool_bytes
        self.on_stall: Callable[[], None] | None = None
        self._queue: collections.deque[bytes] = collections.deque()
        self._queued = 0
        self._spool: IO[bytes] | None = None
        self._filed = 0
        self._read_at = 0
        self._write_at = 0
        self._room = asyncio.Event()
        self._drainer: asyncio.Task | None = None
        self.response: web.StreamResponse | None = None
        self.pending: list[bytes] = []
        self.pending_size = 0
        self.rows = 0
        self.sent = 0
        self.fed = False
        self.failure: BaseException | None = None
        self.received = 0
        self._cap: tuple[ExportCap, str, str] | None = None
        self._counted = False

    def count_against(self, cap: ExportCap, role: str, client: str) -> None:
        """Once the output outgrows hold_bytes, this response counts as one of `cap`'s
        exports (or is refused with its 429) until it ends."""
        self._cap = (cap, role, client)

    @property
    def started(self) -> bool:
        return self.response is not None

    async def feed(self, chunk: bytes) -> None:
        self.received += len(chunk)
        if self.framing is not None:
            data, count = self.framing.encoder.encode(chunk)
            self.rows += count
            if not self.fed:
                data = self.framing.head + data
        else:
            data = chunk
        self.fed = True
        self.pending.append(data)
        self.pending_size += len(data)
        if self.response is None:
            if self.pending_size > self.hold_bytes:
                if self._cap is not None:
                    cap, role, client = self._cap
                    cap.enter(role, client)
                    self._counted = True
                self.response = web.StreamResponse(headers={"Content-Type": self.fmt.value})
                await self.response.prepare(self.request)
                await self._flush()
        elif self.pending_size >= FLUSH_BYTES:
            await self._flush()

    async def _flush(self) -> None:
        """Queue the pending output for the drainer task, the only writer to the client.

        The database side never waits for the client (a write to a client that does not
        read would wait for send_timeout while holding the connection): output queues in
        memory up to SPOOL_MEMORY, then in a temporary file, up to spool_bytes; only past
        that does the database side wait, for send_timeout at most.
        """
        data = b"".join(self.pending)
        self.pending.clear()
        self.pending_size = 0
        if not data:
            return
        self.sent += len(data)
        while self._queued + self._filed and \
                self._queued + self._filed + len(data) > self.spool_bytes:
            self._room.clear()
            try:
                async with asyncio.timeout(self.send_timeout):
                    await self._room.wait()
            except TimeoutError:
                raise ClientStalled("the client read too slowly") from None
            if self.failure is not None:
                raise self.failure
        if self._filed == 0 and self._queued + len(data) <= SPOOL_MEMORY:
            self._queue.append(data)
            self._queued += len(data)
        else:
            if self._spool is None:
                # closed by close(), when the response ends
                self._spool = tempfile.TemporaryFile()  # noqa: SIM115
            self._spool.seek(self._write_at)
            self._spool.write(data)
            self._write_at += len(data)
            self._filed += len(data)
        if not self._draining:
            self._drainer = asyncio.create_task(self._drain())

    @property
    def _draining(self) -> bool:
        return self._drainer is not None and not self._drainer.done()

    async def _write(self, data: bytes) -> None:
        """Send, or cut the connection when the client accepts nothing for send_timeout."""
        assert self.response is not None
        try:
            async with asyncio.timeout(self.send_timeout):
                await self.response.write(data)
        except TimeoutError:
            if self.request.transport is not None:
                self.request.transport.abort()
            raise ClientStalled(f"the client read nothing for {self.send_timeout:g} s") \
                from None

    def _next_chunk(self) -> bytes:
        if self._queue:
            chunk = self._queue.popleft()
            self._queued -= len(chunk)
            return chunk
        assert self._spool is not None
        self._spool.seek(self._read_at)
        chunk = self._spool.read(min(self._filed, SPOOL_CHUNK))
        self._read_at += len(chunk)
        self._filed -= len(chunk)
        if self._filed == 0:
            self._spool.seek(0)
            self._spool.truncate()
            self._read_at = self._write_at = 0
        return chunk

    async def _drain(self) -> None:
        try:
            while self._queued or self._filed:
                chunk = self._next_chunk()
                self._room.set()
                await self._write(chunk)
        except (ConnectionError, OSError) as exc:
            self.failure = exc if isinstance(exc, ConnectionError) else ConnectionError(exc)
            self._room.set()
            if self.on_stall is not None:
                self.on_stall()
            raise

    def close(self) -> None:
        """Drop the spool (and its drainer) of a response that will not complete."""
        if self._draining:
            assert self._drainer is not None
            self._drainer.cancel()
        elif self._drainer is not None and not self._drainer.cancelled():
            self._drainer.exception()  # retrieved: the failure was handled through .failure
        if self._spool is not None:
            self._spool.close()
        self._queue.clear()
        if self._counted and self._cap is not None:
            cap, role, client = self._cap
            cap.leave(role, client)
            self._counted = False

    def _tail(self) -> bytes:
        if self.framing is None:
            return b""
        return self.framing.tail if self.fed else self.framing.empty

    async def finish(self) -> web.StreamResponse:
        self.pending.append(self._tail())
        if self.response is None:
            body = b"".join(self.pending)
            self.sent = len(body)
            return web.Response(body=body, headers={"Content-Type": self.fmt.value})
        await self._flush()
        while self._draining:
            assert self._drainer is not None
            await self._drainer
        if self.failure is not None:
            raise self.failure
        await self.response.write_eof()
        self.close()
        return self.response


def _guarded_sink(conn: asyncpg.Connection, stream: ResultStream
                  ) -> Callable[[bytes], Awaitable[None]]:
    """A COPY output callback that never raises.

    asyncpg leaves a connection stuck when the callback of copy_from_query raises (the
    cancellation it then requests is never acknowledged), so a failure (the client went
    away, or the task is cancelled) is recorded and the connection is closed instead, which
    also stops the backend's query.
    """
    async def sink(chunk: bytes) -> None:
        if stream.failure is not None:
            return
        try:
            await stream.feed(bytes(chunk))
            if stream.received > COALESCE_AFTER and len(chunk) < COALESCE_BYTES:
                await asyncio.sleep(COALESCE_WAIT_S)
        except BaseException as exc:  # noqa: BLE001 - re-raised by _execute
            stream.failure = exc
            conn.terminate()
    return sink


async def _copy_body(conn: asyncpg.Connection, setting: str, body: bytes | bytearray) -> None:
    """Give a large body to its argument's setting through COPY, in COPY_PIECE pieces.

    Sent as a bound parameter, a writer's 48 MB body raised the gateway's peak by 4.8
    times its size (its text, the driver's argument buffer, its Bind message, the socket's
    send buffer: tests/test_security_memory.py); by COPY it costs its own bytes and one
    piece.  The temporary table belongs to the gateway's login (created before the role
    is set, so every role a connection serves finds it usable; PUBLIC's default TEMPORARY
    privilege on the database), one per connection, emptied at each commit.
    """
    await conn.execute(f"CREATE TEMP TABLE IF NOT EXISTS {BODY_TABLE} (body text) "
                       "ON COMMIT DELETE ROWS")
    await conn.copy_to_table(BODY_TABLE, schema_name="pg_temp", source=_copy_text(body),
                             format="text")
    await conn.fetchval("SELECT set_config($1, body, true) IS NOT NULL "  # noqa: S608
                        f"FROM pg_temp.{BODY_TABLE}", setting)


async def _copy_text(body: bytes | bytearray) -> AsyncIterator[bytes]:
    """`body` as one value of COPY's text format (its four special bytes escaped)."""
    view = memoryview(body)
    for start in range(0, len(view), COPY_PIECE):
        piece = bytes(view[start:start + COPY_PIECE])
        for special, escaped in _COPY_ESCAPES:
            piece = piece.replace(special, escaped)
        yield piece
    yield b"\n"  # the end of the one row


def _copy_rows(status: str | None) -> int | None:
    parts = (status or "").split()
    return int(parts[1]) if len(parts) == 2 and parts[1].isdigit() else None


def _pool_kwargs(settings: config.Settings, uri: str) -> dict[str, Any]:
    """asyncpg arguments from db-uri (or db-read-uri): a URI, or libpq's key=value form."""
    kwargs: dict[str, Any] = {}
    if "://" in uri:
        kwargs["dsn"] = uri
    else:
        names = {"host": "host", "port": "port", "user": "user", "password": "password",
                 "dbname": "database"}
        for item in uri.split():
            key, _, value = item.partition("=")
            if key in names:
                kwargs[names[key]] = value.strip("'")
    if settings.db_password is not None:
        kwargs["password"] = settings.db_password
    return kwargs


class Gateway:
    """The application's state: settings, connection pool, schema cache, authenticator."""

    def __init__(self, settings: config.Settings) -> None:
        self.settings = settings
        self.auth = Authenticator(settings.jwt_secret, settings.anon_role, settings.jwt_aud,
                                  settings.role_claim_path)
        self.pool: asyncpg.Pool | None = None
        self.read_pool: asyncpg.Pool | None = None
        """The hot standby's connections (db-read-uri), for read-only calls."""
        self._replica_retry_at = 0.0
        self.catalog: Catalog | None = None
        self.callers = NodeResolver(settings.node_map, settings.node_reverse_dns,
                                    settings.trusted_proxies)
        self.node_role = settings.node_role
        self._loaded_at = 0.0
        self._miss_reload_at = 0.0
        self._miss_reload: asyncio.Task | None = None
        self._allowed: dict[tuple[str, str, str], tuple[bool, float]] = {}
        self._reload_lock = asyncio.Lock()
        self._retry_task: asyncio.Task | None = None
        self._faults = RateLimitedLog(log)
        self.version = kwollect.version()
        self.exports = ExportCap(settings.max_exports_per_role, settings.max_exports_per_client)

    # -- lifecycle -----------------------------------------------------------------
    async def start(self) -> None:
        self.pool = await asyncpg.create_pool(
            min_size=0, max_size=self.settings.pool_size, server_settings=SESSION,
            max_inactive_connection_lifetime=300,
            **_pool_kwargs(self.settings, self.settings.db_uri))
        if self.settings.db_read_uri:
            self.read_pool = await asyncpg.create_pool(
                min_size=0, max_size=self.settings.pool_size, server_settings=SESSION,
                max_inactive_connection_lifetime=300,
                **_pool_kwargs(self.settings, self.settings.db_read_uri))
        if not await self.reload():
            self._retry_task = asyncio.create_task(self._retry_catalog())

    async def stop(self) -> None:
        if self._retry_task:
            self._retry_task.cancel()
        for pool in (self.pool, self.read_pool):
            if pool is not None:
                await pool.close()

    async def _retry_catalog(self) -> None:
        while not await self.reload():
            await asyncio.sleep(RETRY_CATALOG_S)

    async def reload(self) -> bool:
        """Re-read the schema cache; False (and the old cache kept) when the database fails."""
        assert self.pool is not None
        async with self._reload_lock:
            try:
                async with self.pool.acquire(timeout=self.settings.pool_timeout) as conn:
                    catalog = await load_catalog(conn, self.settings.schemas)
                    if self.settings.node_role is None:
                        self.node_role = await _database_node_role(conn,
                                                                   self.settings.anon_role)
            except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                self._faults.error("catalog", "cannot load the schema cache of %s (retrying): %s",
                                   ", ".join(self.settings.schemas), exc or type(exc).__name__)
                return False
            self._faults.forget("catalog")
            self.catalog = catalog
            self._loaded_at = time.monotonic()
            self._allowed.clear()
        for reason in catalog.skipped:
            log.warning("not served: %s", reason)
        log.info("schema cache: %d functions in %s", len(catalog),
                 ", ".join(self.settings.schemas))
        return True

    def make_app(self) -> web.Application:
        # bodies are read by _read_body, with the caller's limit
        app = web.Application(client_max_size=self.settings.max_body_bytes + 1,
                              middlewares=[self._middleware])
        app.router.add_get("/", self.root, allow_head=False)
        app.router.add_get("/health", self.health, allow_head=False)
        app.router.add_route("*", "/rpc/{name}", self.rpc)
        webui.add_routes(app)
        return app

    # -- middleware: errors and access log ----------------------------------------
    @web.middleware
    async def _middleware(self, request: web.Request,
                          handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                          ) -> web.StreamResponse:
        started = time.perf_counter()
        request["rows"] = None
        request["role"] = "-"
        response: web.StreamResponse
        try:
            check_headers(request.headers.items())
            response = await handler(request)
        except ApiError as exc:
            response = web.Response(status=exc.status, body=exc.body(), headers={
                **exc.headers, "Content-Type": "application/json; charset=utf-8"})
            if exc.status in (408, 413):
                response.force_close()  # the rest of the body is not read
        except web.HTTPException as exc:
            error = ApiError(exc.status, f"HTTP{exc.status}", exc.reason,
                             hint="Functions are at /rpc/<name>; GET / lists them.")
            response = web.Response(status=exc.status, body=error.body(), headers={
                "Content-Type": "application/json; charset=utf-8"})
        except StreamBroken as exc:
            # Cut the connection: the client sees a truncated body, never a complete one.
            if request.transport is not None:
                request.transport.abort()
            self._access(request, 500, started, "aborted")
            assert exc.response is not None
            return exc.response
        except ClientGone as exc:
            self._access(request, 499, started, "client went away")
            # aiohttp's write_eof then finds the connection closed, and says nothing
            return exc.response or web.Response(status=499)
        except asyncio.CancelledError:
            self._access(request, 499, started, "cancelled")
            raise
        except Exception:
            log.exception("%s failed", _where(request))
            error = ApiError(500, "PGRSTX00", "Internal error in kwollect-api",
                             hint="See kwollect-api's log.")
            response = web.Response(status=500, body=error.body(), headers={
                "Content-Type": "application/json; charset=utf-8"})
        self._access(request, response.status, started)
        return response

    def _access(self, request: web.Request, status: int, started: float,
                note: str = "") -> None:
        level = logging.ERROR if status >= 500 else (
            logging.WARNING if status >= 400 else logging.INFO)
        if not access_log.isEnabledFor(level):
            return
        rows = request.get("rows")
        # every value a client chose is escaped: a newline in a path or a role claim must
        # not forge a log line
        access_log.log(level, '%s "%s" %d rows=%s bytes=%s %.1fms role=%s%s',
                       request.remote, _where(request), status,
                       "-" if rows is None else rows, request.get("bytes", "-"),
                       (time.perf_counter() - started) * 1000, excerpt(request["role"], 80),
                       f" {note}" if note else "")

    # -- handlers ------------------------------------------------------------------
    async def health(self, request: web.Request) -> web.Response:
        """200 when the database answers a query, else 503; with a read replica, its state
        and lag (503 only when it is down and db-read-fallback is off)."""
        assert self.pool is not None
        report: dict[str, Any] = {"status": "ok", "database": "ok",
                                  "functions": len(self.catalog or ())}
        primary_lsn: str | None = None
        try:
            async with asyncio.timeout(HEALTH_TIMEOUT_S):
                async with self.pool.acquire() as conn:
                    primary_lsn = await conn.fetchval(
                        "SELECT CASE WHEN pg_is_in_recovery() THEN NULL "
                        "ELSE pg_current_wal_lsn()::text END")
        except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            # the details (addresses) go to the log, not to anonymous clients
            report.update(status="unavailable", database=type(exc).__name__)
            self._faults.warning("health", "health check: the database does not answer: %s",
                                 exc or type(exc).__name__)
        else:
            self._faults.forget("health")
        if self.read_pool is not None:
            await self._replica_health(report, primary_lsn)
        if self.catalog is None and report["status"] == "ok":
            report["status"] = "unavailable"
        return web.json_response(report, status=200 if report["status"] == "ok" else 503,
                                 dumps=lambda v: orjson.dumps(v).decode())

    async def _replica_health(self, report: dict[str, Any], primary_lsn: str | None) -> None:
        """replica: ok, not in recovery (a promoted standby still serves reads) or the
        error's class; replica_lag_bytes: WAL the primary wrote that the standby has not
        replayed; replica_lag_s: age of its last replayed transaction while it lags (0 when
        it has replayed everything: an idle primary is no lag)."""
        assert self.read_pool is not None
        try:
            async with asyncio.timeout(HEALTH_TIMEOUT_S):
                async with self.read_pool.acquire() as conn:
                    row = await conn.fetchrow(
                        "SELECT pg_is_in_recovery() AS standby, "
                        "pg_last_wal_replay_lsn()::text AS replayed, extract(epoch FROM "
                        "clock_timestamp() - pg_last_xact_replay_timestamp())::float8 AS age")
        except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            report["replica"] = type(exc).__name__
            self._faults.warning("replica health", "health check: the read replica does "
                                 "not answer: %s", exc or type(exc).__name__)
            if not self.settings.read_fallback:
                report["status"] = "unavailable"
            return
        self._faults.forget("replica health")
        report["replica"] = "ok" if row["standby"] else "not in recovery"
        if row["standby"] and row["replayed"] and primary_lsn:
            lag = max(0, lsn_bytes(primary_lsn) - lsn_bytes(row["replayed"]))
            report["replica_lag_bytes"] = lag
            report["replica_lag_s"] = round(row["age"] or 0.0, 3) if lag else 0.0

    async def root(self, request: web.Request) -> web.Response:
        """The OpenAPI description, limited to what the caller's role may execute."""
        media = negotiate(request.headers.get("Accept"), (OPENAPI_MEDIA,))
        if media not in (OPENAPI_MEDIA, Format.JSON):
            raise ApiError(406, "PGRST107", "GET / answers application/openapi+json only")
        schema = self._schema(request, "Accept-Profile")
        identity = self.auth.identify(request.headers.get("Authorization"))
        request["role"] = identity.role
        catalog = self._catalog()
        functions = [fn for fn in catalog.all() if fn.schema == schema]
        async with self._connection() as conn:
            try:
                async with conn.transaction(readonly=True):
                    await conn.fetchval("SELECT set_config('role', $1, true)", identity.role)
                    allowed = set(await conn.fetchval(
                        "SELECT coalesce(array_agg(o), '{}') FROM unnest($1::oid[]) o "
                        "WHERE has_function_privilege(o, 'EXECUTE')",
                        [fn.oid for fn in functions]))
            except asyncpg.PostgresError as exc:
                raise self._db_error(request, exc, identity) from exc
        document = openapi.describe([fn for fn in functions if fn.oid in allowed], schema,
                                    self.version)
        return web.Response(body=orjson.dumps(document), headers={
            "Content-Type": f"{OPENAPI_MEDIA}; charset=utf-8"})

    async def rpc(self, request: web.Request) -> web.StreamResponse:
        if request.method not in ("GET", "POST"):
            raise ApiError(405, "PGRST101", "Only GET and POST are allowed for functions",
                           headers={"Allow": "GET, POST"})
        name = request.match_info["name"]
        if not name.isprintable() or len(name) > 63:
            raise ApiError(404, "PGRST202", "No such function", hint="Call GET / for the list "
                           "of functions.")
        get = request.method == "GET"
        schema = self._schema(request, "Accept-Profile" if get else "Content-Profile")
        if name in NODE_FUNCTIONS:
            identity = await self._node_identity(request, name)
        else:
            identity = self.auth.identify(request.headers.get("Authorization"))
        request["role"] = identity.role
        fmt = negotiate(request.headers.get("Accept"))
        assert isinstance(fmt, Format)
        catalog = await self._catalog_with(schema, name)
        if get:
            values = _query_values(request)
            function = catalog.resolve(schema, name, values)
            call = Catalog.bind_text(function, values)
            if not function.read_only:
                raise ApiError(405, "PGRST101",
                               f"{schema}.{name} is VOLATILE (it may write): call it with POST",
                               headers={"Allow": "POST"})
        else:
            catalog.resolve_name(schema, name)
            await self._require_execute(request, identity, catalog, schema, name)
            body = await self._read_body(request, identity)
            call = self._post_call(request, body, catalog, schema, name)
            del body
        self._check_arguments(call)
        readonly = get or call.function.read_only
        return await self._execute(request, identity, call, fmt, readonly)

    async def _node_identity(self, request: web.Request, name: str) -> Identity:
        """The node role, for the node the caller's address names; 403 for anyone else."""
        address = self.callers.client_address(request.remote,
                                              request.headers.get("X-Forwarded-For"))
        node = await self.callers.node_of(address)
        if node is None or self.node_role is None:
            why = ("this kwollect-api maps no address to a node" if not self.callers.enabled
                   else f"{address or 'the caller'} is not a known node")
            if self.node_role is None:
                why = "this database has no node role (kwollect-setup-db too old)"
            raise ApiError(403, "KW403", f"{name}: {why}",
                           hint="Call it from a node of a running job. Operators name nodes "
                                "by address with kwollect-node-map-file or "
                                "kwollect-node-reverse-dns.")
        request["settings"] = [("kwollect.caller_node", node)]
        # identified (by address): refusals are 403, not 401
        return Identity(self.node_role, {"role": self.node_role, "node": node}, True)

    async def _require_execute(self, request: web.Request, identity: Identity,
                               catalog: Catalog, schema: str, name: str) -> None:
        """Refuse, before the body is read, a function the caller's role cannot execute.

        The answer comes from has_function_privilege, cached PRIVILEGE_CACHE_S per role and
        function name (and dropped when the schema cache is re-read).
        """
        key = (identity.role, schema, name)
        cached = self._allowed.get(key)
        now = time.monotonic()
        if cached is None or now - cached[1] > PRIVILEGE_CACHE_S:
            oids = [fn.oid for fn in catalog.functions[(schema, name)]]
            async with self._connection() as conn:
                try:
                    allowed = await conn.fetchval(
                        "SELECT coalesce(bool_or(has_function_privilege($1::text, o, "
                        "'EXECUTE')), false) FROM unnest($2::oid[]) o", identity.role, oids)
                except asyncpg.PostgresError as exc:
                    raise self._db_error(request, exc, identity) from exc
            if len(self._allowed) >= PRIVILEGE_CACHE_MAX:
                self._allowed.clear()
            cached = self._allowed[key] = (bool(allowed), now)
        if not cached[0]:
            if identity.authenticated:
                raise ApiError(403, "42501", f"permission denied for function {name}")
            raise ApiError(401, "42501", f"permission denied for function {name}",
                           hint="Send a token (Authorization: Bearer ...) of a role allowed "
                                "to call it.", headers={"WWW-Authenticate": "Bearer"})

    async def _read_body(self, request: web.Request, identity: Identity) -> bytearray:
        """The body, within the caller's size limit (413) and kwollect-body-timeout (408).

        Gathered in one bytearray (no list of chunks joined into a second copy): with its
        text and the database driver's buffer, a body costs about 3-5 times its size at
        the peak (a 60 MB insert: 284 MB over the gateway's 53 MB at rest).
        """
        limit, key = self.settings.max_body_bytes, "kwollect-max-body-bytes"
        if not identity.authenticated and self.settings.max_anon_body_bytes < limit:
            limit, key = self.settings.max_anon_body_bytes, "kwollect-max-anon-body-bytes"
        if request.content_length is not None and request.content_length > limit:
            raise too_large("The request body", limit, key)
        body = bytearray()
        try:
            async with asyncio.timeout(self.settings.body_timeout):
                async for chunk in request.content.iter_chunked(FLUSH_BYTES):
                    if len(body) + len(chunk) > limit:
                        raise too_large("The request body", limit, key)
                    body += chunk
        except TimeoutError:
            raise ApiError(408, "PGRST408", f"The request body did not arrive within "
                           f"{self.settings.body_timeout:g} s") from None
        return body

    def _check_arguments(self, call: Call) -> None:
        """413 for a parameter over kwollect-max-param-bytes (the whole-body argument is
        bounded by the body limit), 400 for JSON nested deeper than kwollect-max-json-depth."""
        limit = self.settings.max_param_bytes
        whole_body = call.function.body_param
        for arg in call.arguments:
            text = arg.text
            if text is None:
                continue
            name = arg.param.name or "the body"
            if not whole_body and len(text) * 4 > limit and len(text.encode()) > limit:
                raise too_large(f"Parameter {name!r}", limit, "kwollect-max-param-bytes")
            if (arg.param.type.is_json or arg.json_array) and not whole_body:
                check_json_depth(name, text, self.settings.max_json_depth)

    def _post_call(self, request: web.Request, body: bytearray, catalog: Catalog, schema: str,
                   name: str) -> Call:
        media = request.content_type if request.headers.get("Content-Type") else ""
        if media == FORM_MEDIA:
            if not self._named_body(body, catalog, schema, name):
                catalog.resolve(schema, name, ())  # raises: it takes a JSON body
            values = _form_values(body)
            function = catalog.resolve(schema, name, values)
            return Catalog.bind_text(function, values)
        if media and media != "application/json" and not media.endswith("+json") \
                and body.strip():
            raise ApiError(415, "PGRST107", f"Content-Type not acceptable: {media}",
                           hint="Send application/json.")
        check_json_depth("the body", body, self.settings.max_json_depth)
        space = _JSON_SPACE.match(body)
        start = space.end() if space else 0
        if start == len(body):
            function = catalog.resolve(schema, name, (), body="object")
            return Catalog.bind_json(function, {}, None)
        first = body[start]
        if first != ord("[") and (first != ord("{") or
                                  self._named_body(body, catalog, schema, name)):
            text = _utf8(body)
            values = _json_object(text)
            function = catalog.resolve(schema, name, values, body="object")
            return Catalog.bind_json(function, values, text)
        # the body is the argument, whole: a JSON array, or an object for a function
        # that takes no named argument
        function = catalog.resolve(schema, name, (),
                                   body="array" if first == ord("[") else "object")
        if len(body) > COPY_BODY_BYTES and not function.read_only:
            return Catalog.bind_body(function, body)
        return Catalog.bind_json(function, None, _utf8(body))

    def _named_body(self, body: bytearray, catalog: Catalog, schema: str, name: str) -> bool:
        """Whether the function takes named arguments (False: a JSON body is its one
        argument, never parsed); 413 for a body larger than those arguments can be,
        before it is parsed into Python objects (several times its size).

        Each value is at most kwollect-max-param-bytes; sent, it may take VALUE_ENCODING
        times that (percent-encoding, JSON escapes).
        """
        named = [fn for fn in catalog.resolve_name(schema, name) if not fn.body_param]
        if not named:
            return False
        widest = max(len(fn.params) for fn in named)
        bound = widest * VALUE_ENCODING * self.settings.max_param_bytes + 64 * 1024
        if len(body) > bound:
            raise too_large(f"A body of named arguments for {name}", bound,
                            "kwollect-max-param-bytes")
        return True

    # -- execution -----------------------------------------------------------------
    def _settings(self, request: web.Request, identity: Identity,
                  call: Call) -> list[tuple[str, str]]:
        headers: dict[str, str] = {}
        for key, value in request.headers.items():
            headers[key.lower()] = value
        pairs = [
            ("role", identity.role),
            ("request.jwt.claims", orjson.dumps(identity.claims).decode()),
            ("request.headers", orjson.dumps(headers).decode()),
            ("request.cookies", orjson.dumps(dict(request.cookies)).decode()),
            ("request.method", request.method),
            ("request.path", request.path),
            ("request.client_addr", request.remote or ""),
            ("timezone", "UTC"),
            ("datestyle", "ISO, YMD"),
            ("search_path", ", ".join(quote_ident(name) for name in
                                      (call.function.schema, *self.settings.extra_search_path))),
        ]
        if self.settings.max_rows:
            pairs.append(("kwollect.max_rows", str(self.settings.max_rows)))
        pairs += list(self.settings.app_settings.items())
        pairs += request.get("settings", [])
        pairs += call.settings()
        return pairs

    def _stream(self, request: web.Request, identity: Identity, fmt: Format,
                framing: Framing | None) -> ResultStream:
        stream = ResultStream(request, fmt, framing, self.settings.hold_bytes,
                              self.settings.send_timeout, self.settings.spool_bytes)
        client = self.callers.client_address(request.remote,
                                             request.headers.get("X-Forwarded-For"))
        stream.count_against(self.exports, identity.role, client or "")
        return stream

    async def _execute(self, request: web.Request, identity: Identity, call: Call,
                       fmt: Format, readonly: bool) -> web.StreamResponse:
        function = call.function
        framing = None if fmt is Format.CSV else Framing(function.shape, fmt, function.columns)
        stream = self._stream(request, identity, fmt, framing)
        pairs = self._settings(request, identity, call)
        setup = "SELECT " + ", ".join(f"set_config(${2 * i + 1}, ${2 * i + 2}, true)"
                                      for i in range(len(pairs)))
        flat = [item for pair in pairs for item in pair]
        replica = (readonly and self.read_pool is not None
                   and time.monotonic() >= self._replica_retry_at)
        try:
            try:
                return await self._run(request, identity, call, fmt, readonly, stream, setup,
                                       flat, replica)
            except ReplicaFailed as failed:
                self._faults.warning("replica", "the read replica failed (%s): read-only calls "
                                     "go to the primary", failed)
                stream.close()
                stream = self._stream(request, identity, fmt, framing)
                return await self._run(request, identity, call, fmt, readonly, stream, setup,
                                       flat, False)
        finally:
            stream.close()

    async def _run(self, request: web.Request, identity: Identity, call: Call, fmt: Format,
                   readonly: bool, stream: ResultStream, setup: str,
                   flat: list[str], replica: bool = False) -> web.StreamResponse:
        function = call.function
        async with self._connection(replica) as conn:
            sink = _guarded_sink(conn, stream)
            stream.on_stall = conn.terminate
            try:
                async with conn.transaction(readonly=readonly):
                    body = call.body()
                    if body is not None:
                        await _copy_body(conn, *body)
                        del body
                    await conn.fetchval(setup, *flat)
                    if function.shape is Shape.VOID:
                        await conn.execute(call.query(as_json=False))
                        status = None
                    elif fmt is Format.CSV:
                        status = await conn.copy_from_query(
                            call.query_csv(), output=sink, format="csv", header=True)
                    else:
                        status = await conn.copy_from_query(
                            call.query(as_json=True), output=sink, format="csv",
                            quote=QUOTE, delimiter=DELIMITER)
            except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
                self._note(request, stream)
                if isinstance(stream.failure, ConnectionError):
                    self._client_gone(request, stream)
                    raise ClientGone(stream.response) from None
                if stream.failure is not None:
                    raise stream.failure from None
                if replica and not stream.started and server_gone(exc):
                    raise self._replica_down(exc) from exc
                if stream.started:
                    log.error("%s failed after %d rows were sent: %s", _where(request),
                              stream.rows, excerpt(exc, 500))
                    raise StreamBroken(str(exc), stream.response) from exc
                if isinstance(exc, asyncpg.PostgresError):
                    raise self._db_error(request, exc, identity) from exc
                self._faults.error("unavailable", "the database cannot be reached: %s",
                                   excerpt(exc, 500))
                raise unavailable(exc) from exc
            finally:
                stream.on_stall = None
        if function.shape is Shape.VOID:
            return web.Response(status=204)
        request["rows"] = _copy_rows(status)
        try:
            response = await stream.finish()
        except ConnectionError:
            self._client_gone(request, stream)
            raise ClientGone(stream.response) from None
        request["bytes"] = stream.sent
        return response

    @staticmethod
    def _client_gone(request: web.Request, stream: ResultStream) -> None:
        log.info("%s: client went away after %d rows (%s)", _where(request), stream.rows,
                 excerpt(stream.failure or "connection closed", 200))

    def _db_error(self, request: web.Request, exc: asyncpg.PostgresError,
                  identity: Identity) -> ApiError:
        """The client's error; the database's own words go to the log when they are hidden."""
        error = from_postgres(exc, identity.authenticated)
        if error.status >= 500 or error.code == "54001":
            log.error("%s: database error %s: %s", _where(request), exc.sqlstate,
                      excerpt(exc, 500))
        return error

    @staticmethod
    def _note(request: web.Request, stream: ResultStream) -> None:
        request["rows"] = stream.rows
        request["bytes"] = stream.sent

    def _replica_down(self, exc: BaseException) -> Exception:
        """ReplicaFailed (the call then runs on the primary) or, without db-read-fallback,
        a 503 that says the replica is down."""
        if self.settings.read_fallback:
            self._replica_retry_at = time.monotonic() + REPLICA_RETRY_S
            return ReplicaFailed(f"{type(exc).__name__}: {excerpt(exc, 200)}")
        self._faults.error("replica", "the read replica cannot be reached: %s",
                           excerpt(exc, 500))
        return ApiError(503, "PGRST001", "The read replica cannot be reached; read-only "
                        "calls fail until it is back (db-read-fallback = false).",
                        details=type(exc).__name__)

    @contextlib.asynccontextmanager
    async def _connection(self, replica: bool = False) -> AsyncIterator[asyncpg.Connection]:
        """A pooled connection (of the read replica's pool with `replica`); 504 when none
        frees up in time, 503 when the database is down."""
        pool = self.read_pool if replica else self.pool
        assert pool is not None
        try:
            conn = await pool.acquire(timeout=self.settings.pool_timeout)
        except TimeoutError as exc:
            if replica:
                raise self._replica_down(exc) from exc
            raise ApiError(504, "PGRST003", "Timed out acquiring connection from connection "
                           "pool.") from None
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            if replica:
                raise self._replica_down(exc) from exc
            self._faults.error("unavailable", "the database cannot be reached: %s",
                               excerpt(exc, 500))
            raise unavailable(exc) from exc
        try:
            yield conn
        except asyncio.CancelledError:
            conn.terminate()  # a cancelled COPY can leave asyncpg's connection stuck
            raise
        finally:
            await pool.release(conn)

    def _schema(self, request: web.Request, header: str) -> str:
        wanted = request.headers.get(header)
        if wanted is None:
            return self.settings.schemas[0]
        if wanted not in self.settings.schemas:
            raise ApiError(406, "PGRST106", f"The schema must be one of the following: "
                           f"{', '.join(self.settings.schemas)}")
        return wanted

    def _catalog(self) -> Catalog:
        if self.catalog is None:
            raise ApiError(503, "PGRST002", "Could not query the database for the schema "
                           "cache. Retrying.")
        return self.catalog

    async def _catalog_with(self, schema: str, name: str) -> Catalog:
        """The cache, re-read first when it lacks the function: at most once per
        RELOAD_ON_MISS_S however many requests miss at once (they share that reload)."""
        catalog = self._catalog()
        if catalog.has(schema, name):
            return catalog
        if self._miss_reload is None or self._miss_reload.done():
            now = time.monotonic()
            if now - max(self._loaded_at, self._miss_reload_at) <= RELOAD_ON_MISS_S:
                return catalog
            self._miss_reload_at = now
            self._miss_reload = asyncio.create_task(self.reload())
        await asyncio.shield(self._miss_reload)
        return self._catalog()


def _where(request: web.Request) -> str:
    """'METHOD /path?query' for a log line, escaped (the raw target, as the client sent it)."""
    return excerpt(f"{request.method} {request.raw_path}", 300)


async def _database_node_role(conn: asyncpg.Connection, anon_role: str | None) -> str | None:
    """The node role kwollect-setup-db created (None for a database without one), read as
    the anonymous role (the gateway's own login has no privilege)."""
    try:
        async with conn.transaction(readonly=True):
            if anon_role:
                await conn.fetchval("SELECT set_config('role', $1, true)", anon_role)
            return await conn.fetchval("SELECT value FROM kwollect.settings "
                                       "WHERE key = 'node_role'")
    except asyncpg.PostgresError:
        return None


def _query_values(request: web.Request) -> dict[str, list[str]]:
    values: dict[str, list[str]] = {}
    for key, value in request.query.items():
        values.setdefault(key, []).append(value)
    return values


def _form_values(body: bytes | bytearray) -> dict[str, list[str]]:
    values: dict[str, list[str]] = {}
    try:
        pairs = parse_qsl(body.decode(), keep_blank_values=True, strict_parsing=False)
    except UnicodeDecodeError:
        raise ApiError(400, "PGRST102", "The form body is not UTF-8") from None
    for key, value in pairs:
        values.setdefault(key, []).append(value)
    return values


def _utf8(body: bytes | bytearray) -> str:
    try:
        return body.decode()
    except UnicodeDecodeError:
        raise ApiError(400, "PGRST102", "The request body is not UTF-8") from None


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, "PGRST102", "Empty or invalid json", details=str(exc)) from None
    if not isinstance(value, dict):
        raise ApiError(400, "PGRST102", "The body must be a JSON object of named arguments "
                       "(or an array, for a function with one unnamed json parameter)")
    return value


def _raise_file_limit(settings: config.Settings) -> None:
    """Enough descriptors for max_connections clients, the pool and the spools."""
    needed = settings.max_connections + 2 * settings.pool_size + 64
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if soft < needed:
            log.warning("only %d file descriptors for kwollect-max-connections = %d: raise "
                        "LimitNOFILE or lower the setting", soft, settings.max_connections)


def _cap_connections(server: web.Server, cap: int, faults: RateLimitedLog) -> None:
    """Close connections beyond `cap` at once, so descriptors never run out."""
    accept = server.connection_made

    def connection_made(handler: Any, transport: asyncio.Transport) -> None:
        accept(handler, transport)
        if len(server.connections) > cap:
            faults.warning("connection cap", "%d client connections open "
                           "(kwollect-max-connections): closing new ones", cap)
            transport.abort()

    setattr(server, "connection_made", connection_made)  # noqa: B010 - instance override


async def serve(settings: config.Settings, ready: Callable[[list[str]], None] | None = None
                ) -> None:
    """Run until SIGTERM or SIGINT; SIGUSR1 re-reads the schema cache.

    A connection that has not sent a complete request header within kwollect-header-timeout
    (counted from the connection, or from the end of the previous response) is closed:
    aiohttp's keep-alive timer, which runs from the start of the connection, does it.
    """
    gateway = Gateway(settings)
    _raise_file_limit(settings)
    for name in ("asyncio", "aiohttp.server", "aiohttp.web", "aiohttp.access"):
        logging.getLogger(name).addFilter(RateLimitFilter())
    await gateway.start()
    runner = web.AppRunner(gateway.make_app(), access_log=None, handle_signals=False,
                           keepalive_timeout=settings.header_timeout)
    await runner.setup()
    assert runner.server is not None
    _cap_connections(runner.server, settings.max_connections, gateway._faults)
    site = web.TCPSite(runner, settings.server_host, settings.server_port, reuse_address=True)
    await site.start()
    addresses = []
    for address in runner.addresses:
        host, port = address[:2]
        addresses.append(f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}")
    log.info("kwollect-api %s listening on %s (schemas %s)", gateway.version,
                ", ".join(addresses), ", ".join(settings.schemas))
    if ready:
        ready(addresses)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGUSR1, lambda: loop.create_task(gateway.reload()))
    try:
        await stop.wait()
    finally:
        log.info("kwollect-api stopping")
        await runner.cleanup()
        await gateway.stop()


def main(argv: Sequence[str] | None = None) -> int:
    try:
        settings = config.load(argv)
    except OptionError as exc:
        print(f"kwollect-api: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        asyncio.run(serve(settings))
    except (OSError, ValueError) as exc:
        print(f"kwollect-api: {excerpt(exc, 300)}", file=sys.stderr)
        return 1
    return 0
