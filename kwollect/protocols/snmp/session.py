"""SNMP sessions: one agent's GET and walk exchanges, v1/v2c through the lean codec, v3 through
puresnmp; both return the same `Exchange` so the collector does not know which it talks to."""

from __future__ import annotations

import asyncio
import logging
import random
import socket
import time
from collections.abc import Sequence
from typing import Any, NamedTuple

from puresnmp import Client, ObjectIdentifier
from puresnmp import exc as puresnmp_exc
from puresnmp.credentials import V3, Auth, Priv
from puresnmp.pdu import EndOfMibView, NoSuchInstance, NoSuchObject
from puresnmp.types import Opaque

from kwollect.errors import KwollectError, TargetTimeout, TargetUnreachable
from kwollect.model import midpoint_us
from kwollect.protocols.snmp.codec import (
    END_OF_MIB_VIEW,
    ERROR_NAMES,
    NO_SUCH_INSTANCE,
    NO_SUCH_NAME,
    NO_SUCH_OBJECT,
    REQUEST_ID_MAX,
    REQUEST_ID_MIN,
    VERSION_1,
    VERSION_2C,
    BerError,
    RequestTemplate,
    Value,
    decode_get_values,
    decode_opaque,
    decode_varbinds,
    encode_oid,
    get_request,
    message_prefix,
    oid_text,
    parse_oid,
    parse_response_header,
    walk_request,
)
from kwollect.protocols.snmp.url import AUTH_METHODS, PRIV_METHODS, SnmpTarget

_log = logging.getLogger("kwollect.protocols.snmp")

WALK_REPETITIONS = 25
_WALK_MAX_ROWS = 100_000
_V3_REDISCOVER_S = 60.0
"""puresnmp reuses the engine time of its discovery forever; agents reject it after 150 s."""


class SnmpError(KwollectError):
    """An SNMP exchange failed; the message names the target but never its secrets."""


class SnmpTimeout(SnmpError, TargetTimeout):
    """The agent did not answer within the timeout (agent down, or wrong community/user)."""


class SnmpUnreachable(SnmpError, TargetUnreachable):
    """The agent's host said nothing listens on its port, or its name does not resolve."""


class Exchange(NamedTuple):
    timestamp_us: int
    error_status: int
    error_index: int
    values: list[Any] | None
    """GET values in request order, or walk (arcs, value) rows; None on error-status."""


class Request(NamedTuple):
    template: RequestTemplate
    oid_tlvs: tuple[bytes, ...]
    walk: bool


Prepared = Request | list[ObjectIdentifier]
"""A GET as a session prepared it: the v1/v2c codec's template, or v3's puresnmp OIDs."""


class _UdpProtocol(asyncio.DatagramProtocol):
    """One connected UDP socket per agent; replies are matched to requests by request-id.

    Datagrams that are malformed, for another version or community, or whose request-id
    is not pending (late or duplicate replies) are ignored.
    """

    def __init__(self, prefix: bytes, label: str, timeout: float) -> None:
        self._prefix = prefix
        self._label = label
        self._timeout = timeout
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.DatagramTransport | None = None
        self._pending: dict[int, tuple[asyncio.Future[Exchange], asyncio.TimerHandle, int,
                                       Request]] = {}
        self._next_id = random.randrange(REQUEST_ID_MIN, REQUEST_ID_MAX)

    @property
    def closed(self) -> bool:
        return self._transport is None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        self._fail_all(SnmpError(f"{self._label}: UDP socket closed"))

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def send(self, request: Request) -> asyncio.Future[Exchange]:
        future: asyncio.Future[Exchange] = self._loop.create_future()
        if self._transport is None:
            future.set_exception(SnmpError(f"{self._label}: UDP socket closed"))
            return future
        request_id = self._next_id
        self._next_id = request_id + 1 if request_id < REQUEST_ID_MAX else REQUEST_ID_MIN
        timer = self._loop.call_later(self._timeout, self._expire, request_id)
        self._pending[request_id] = (future, timer, time.time_ns(), request)
        self._transport.sendto(request.template.packet(request_id))
        return future

    def _expire(self, request_id: int) -> None:
        entry = self._pending.pop(request_id, None)
        if entry is not None and not entry[0].done():
            entry[0].set_exception(SnmpTimeout(
                f"{self._label}: no SNMP response within {self._timeout:g} s "
                "(agent down, unreachable, or wrong community?)"))

    def datagram_received(self, data: bytes, addr: Any) -> None:
        end_ns = time.time_ns()
        try:
            header = parse_response_header(data, self._prefix)
        except BerError as exc:
            _log.debug("%s: ignored a datagram: %s", self._label, exc)
            return
        entry = self._pending.pop(header.request_id, None)
        if entry is None:
            _log.debug("%s: ignored a reply to no pending request (late or duplicate)",
                       self._label)
            return
        future, timer, start_ns, request = entry
        timer.cancel()
        if future.done():
            return
        values: list[Any] | None
        try:
            if header.error_status:
                values = None
            elif request.walk:
                values = decode_varbinds(data, header)
            else:
                values = decode_get_values(data, header, request.oid_tlvs)
        except BerError as exc:
            future.set_exception(SnmpError(f"{self._label}: malformed response: {exc}"))
            return
        future.set_result(Exchange(midpoint_us(start_ns, end_ns), header.error_status,
                                    header.error_index, values))

    def error_received(self, exc: Exception) -> None:
        if isinstance(exc, ConnectionRefusedError):
            error: SnmpError = SnmpUnreachable(
                f"{self._label}: nothing listens on that UDP port (ICMP port unreachable)")
        else:
            error = SnmpUnreachable(f"{self._label}: {exc}")
        self._fail_all(error)

    def _fail_all(self, error: SnmpError) -> None:
        pending, self._pending = self._pending, {}
        for future, timer, _, _ in pending.values():
            timer.cancel()
            if not future.done():
                future.set_exception(error)


class CommunitySession:
    """v1/v2c through the lean codec."""

    def __init__(self, target: SnmpTarget, timeout: float) -> None:
        self.max_inflight = target.max_inflight
        self._target = target
        self._timeout = timeout
        self._version = VERSION_1 if target.version == 1 else VERSION_2C
        self._community = target.community.encode()
        self._protocol: _UdpProtocol | None = None

    async def open(self) -> None:
        if self._protocol is not None and not self._protocol.closed:
            return
        loop = asyncio.get_running_loop()
        label = self._target.label
        try:
            _, protocol = await loop.create_datagram_endpoint(
                lambda: _UdpProtocol(message_prefix(self._version, self._community), label,
                                     self._timeout),
                remote_addr=(self._target.host, self._target.port))
        except OSError as exc:
            raise SnmpUnreachable(f"{label}: cannot open a UDP socket to it: {exc}") from None
        self._protocol = protocol

    def prepare(self, oids: Sequence[tuple[int, ...]]) -> Request:
        tlvs = tuple(encode_oid(oid) for oid in oids)
        return Request(get_request(self._version, self._community, tlvs), tlvs, False)

    def send(self, request: Prepared) -> asyncio.Future[Exchange]:
        assert self._protocol is not None and isinstance(request, Request)
        return self._protocol.send(request)

    async def walk(self, root: tuple[int, ...]) -> list[tuple[tuple[int, ...], Value]]:
        """GETBULK (v2c) or GETNEXT (v1) until the walk leaves `root`'s subtree."""
        rows: list[tuple[tuple[int, ...], Value]] = []
        current = root
        depth = len(root)
        while len(rows) < _WALK_MAX_ROWS:
            template = walk_request(self._version, self._community, encode_oid(current),
                                    WALK_REPETITIONS)
            exchange = await self.send(Request(template, (), True))
            if exchange.error_status == NO_SUCH_NAME and self._version == VERSION_1:
                return rows
            if exchange.error_status:
                name = ERROR_NAMES.get(exchange.error_status, str(exchange.error_status))
                raise SnmpError(f"{self._target.label}: walk of {oid_text(root)}: agent "
                                f"answered {name}")
            if not exchange.values:
                return rows
            for oid, value in exchange.values:
                if value is END_OF_MIB_VIEW or oid[:depth] != root:
                    return rows
                if oid <= current:
                    raise SnmpError(f"{self._target.label}: walk of {oid_text(root)}: agent "
                                    f"returned {oid_text(oid)} after {oid_text(current)}")
                rows.append((oid, value))
                current = oid
        raise SnmpError(f"{self._target.label}: walk of {oid_text(root)} exceeds "
                        f"{_WALK_MAX_ROWS} entries")

    async def close(self) -> None:
        if self._protocol is not None:
            self._protocol.close()
            self._protocol = None


_X690_MISSING = {NoSuchObject: NO_SUCH_OBJECT, NoSuchInstance: NO_SUCH_INSTANCE,
                 EndOfMibView: END_OF_MIB_VIEW}


def _from_x690(value: Any) -> Value:
    """A puresnmp value in the codec's representation, so both paths read alike."""
    missing = _X690_MISSING.get(type(value))
    if missing is not None:
        return missing
    if isinstance(value, ObjectIdentifier):
        return str(value)
    raw = value.value
    if isinstance(value, Opaque):
        decoded = decode_opaque(raw)
        return decoded if isinstance(decoded, float) else decoded.hex()
    if isinstance(raw, (int, bytes)):
        return raw
    return str(raw)


class _OneReply(asyncio.DatagramProtocol):
    """The first datagram (or socket error) of a one-exchange socket."""

    def __init__(self, received: asyncio.Future[bytes]) -> None:
        self._received = received

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if not self._received.done():
            self._received.set_result(data)

    def error_received(self, exc: Exception) -> None:
        if not self._received.done():
            self._received.set_exception(exc)


class V3Session:
    """SNMPv3 through puresnmp, one exchange at a time (its cost is not on the v2c path)."""

    max_inflight = 1

    def __init__(self, target: SnmpTarget, timeout: float) -> None:
        self._target = target
        self._timeout = timeout
        auth = Auth(target.auth_key.encode(), AUTH_METHODS[target.auth]) if target.auth \
            else None
        priv = Priv(target.priv_key.encode(), PRIV_METHODS[target.priv]) if target.priv \
            else None
        self._credentials = V3(target.user, auth, priv)
        self._address: str | None = None
        self._client: Client | None = None
        self._client_expires = 0.0
        self._exchange_ns = (0, 0)
        self._lock = asyncio.Lock()

    async def open(self) -> None:
        if self._address is not None:
            return
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(self._target.host, self._target.port,
                                           type=socket.SOCK_DGRAM)
        except OSError as exc:
            raise SnmpUnreachable(f"{self._target.label}: cannot resolve host: {exc}") from None
        self._address = str(infos[0][4][0])

    def prepare(self, oids: Sequence[tuple[int, ...]]) -> list[ObjectIdentifier]:
        return [ObjectIdentifier(oid_text(oid)) for oid in oids]

    def send(self, request: Prepared) -> asyncio.Future[Exchange]:
        assert isinstance(request, list)
        return asyncio.ensure_future(self._get(request))

    async def _sender(self, endpoint: Any, packet: bytes, timeout: float = 1,
                      loop: Any = None, retries: int = 1) -> bytes:
        """puresnmp's UDP exchange, always closing its socket and noting when it happened."""
        loop = asyncio.get_running_loop()
        received: asyncio.Future[bytes] = loop.create_future()
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _OneReply(received), remote_addr=(str(endpoint.ip), endpoint.port))
        try:
            start = time.time_ns()
            transport.sendto(packet)
            async with asyncio.timeout(self._timeout):
                data = await received
            self._exchange_ns = (start, time.time_ns())
            return data
        finally:
            transport.close()

    def _current_client(self) -> Client:
        now = time.monotonic()
        if self._client is None or now >= self._client_expires:
            assert self._address is not None
            client = Client(self._address, self._credentials, port=self._target.port,
                            sender=self._sender)
            client.configure(timeout=self._timeout, retries=1)
            self._client = client
            self._client_expires = now + _V3_REDISCOVER_S
        return self._client

    async def _get(self, oids: list[ObjectIdentifier]) -> Exchange:
        async with self._lock:
            try:
                async with asyncio.timeout(self._timeout):
                    values = await self._current_client().multiget(oids)
            except puresnmp_exc.ErrorResponse as exc:
                index = next((n for n, oid in enumerate(oids, 1) if oid == exc.offending_oid), 0)
                return Exchange(midpoint_us(*self._exchange_ns), exc.error_status, index, None)
            except Exception as exc:
                self._client = None
                raise self._error(exc) from None
            if len(values) != len(oids):
                raise SnmpError(f"{self._target.label}: {len(values)} values for "
                                f"{len(oids)} OIDs")
            return Exchange(midpoint_us(*self._exchange_ns), 0, 0,
                             [_from_x690(value) for value in values])

    async def walk(self, root: tuple[int, ...]) -> list[tuple[tuple[int, ...], Value]]:
        async with self._lock:
            try:
                return [(parse_oid(str(row.oid)), _from_x690(row.value))
                        async for row in self._current_client().bulkwalk(
                            [ObjectIdentifier(oid_text(root))], bulk_size=WALK_REPETITIONS)]
            except Exception as exc:
                self._client = None
                raise self._error(exc) from None

    def _error(self, exc: Exception) -> SnmpError:
        """Our exception for a failure inside puresnmp."""
        label = self._target.label
        if isinstance(exc, (TimeoutError, puresnmp_exc.Timeout)):
            return SnmpTimeout(f"{label}: no SNMPv3 response within {self._timeout:g} s "
                               "(agent down or unreachable?)")
        if isinstance(exc, ConnectionRefusedError):
            return SnmpUnreachable(f"{label}: nothing listens on that UDP port")
        if isinstance(exc, puresnmp_exc.SnmpError):
            return SnmpError(f"{label}: {exc}")
        return SnmpError(f"{label}: SNMPv3 exchange failed: {type(exc).__name__}: {exc}")

    async def close(self) -> None:
        self._client = None
