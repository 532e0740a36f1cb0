"""SNMP: GET many OIDs per request from v1/v2c agents (lean codec) and v3 agents (puresnmp).

URLs
----
``snmp://<community>@<host>[:<port>]/<oid>[?<options>]``
    SNMP v2c, UDP port 161 by default (the reference form).
``snmpv1://<community>@<host>[:<port>]/<oid>[?<options>]``
    SNMP v1.
``snmpv3://<user>[:<authkey>[:<privkey>]]@<host>[:<port>]/<oid>[?auth=SHA|MD5][&priv=AES|DES][&<options>]``
    SNMP v3 (USM): noAuthNoPriv with no key, authNoPriv with an auth key, authPriv with both.
    ``auth`` defaults to SHA (SHA-1) and ``priv`` to AES (AES-128); keys are at least 8
    characters. AES/DES need the puresnmp-crypto package.

A community or key containing ``:``, ``@``, ``/``, ``?``, ``#`` or ``%`` is percent-encoded.
Error messages show ``snmp://***@host:port`` and ``snmpv3://user@host:port``, never a secret.

``<oid>`` is dotted decimal, with or without a leading dot, or a template
``<prefix>.{{ <walk_oid> == <value> }}[.<suffix>]``: <walk_oid> is walked and the index of the
first entry (in OID order) whose value equals <value> takes the template's place, e.g.
``1.3.6.1.2.1.2.2.1.10.{{ 1.3.6.1.2.1.2.2.1.2 == eth0 }}`` is ifInOctets of eth0. <value> is
taken literally up to ``}}`` (it may hold spaces, ``/`` or ``?``) and compared with each
entry's text, both stripped; numbers compare by their decimal text. Templates are resolved
at the first poll, every ``resolve_every`` seconds, and at the next poll after a templated
OID reads as missing (at most once per period, so a permanently missing one costs no walk
per poll). A template that matches nothing is logged and its metric skipped.

Options (target-wide: metrics of one agent that differ in them are polled separately):
``max_varbinds`` OIDs per GET (default 50); ``max_inflight`` GETs in flight at once
(default 4; v3 always 1); ``resolve_every`` seconds between template resolutions (default 300).

Values: INTEGER, Counter32/64, Gauge32 and TimeTicks are numbers; strings go through
`make_reading` (NaN with ``labels.value_str`` unless the text is a number). An OID the agent
does not have (noSuchObject, noSuchInstance, endOfMibView, v1 noSuchName) gives no reading
and is logged once until it has a value again. tooBig splits the GET in two.

Each reading is stamped with the midpoint of its own GET exchange. An agent that answers
none of a poll's GETs within the timeout makes `collect` raise `SnmpTimeout`; a closed port
raises `SnmpUnreachable` (both name the target, never its secrets).
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import re
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple
from urllib.parse import parse_qsl, unquote, urlsplit

from puresnmp import Client, ObjectIdentifier
from puresnmp import exc as puresnmp_exc
from puresnmp.credentials import V3, Auth, Priv
from puresnmp.pdu import EndOfMibView, NoSuchInstance, NoSuchObject
from puresnmp.plugins import priv as puresnmp_priv
from puresnmp.types import Opaque

from kwollect.logutil import RateLimitedLog
from kwollect.model import MetricDescription, Reading, make_reading, midpoint_us
from kwollect.protocols import redact_url
from kwollect.protocols.snmp_codec import (
    END_OF_MIB_VIEW,
    ERROR_NAMES,
    NO_SUCH_INSTANCE,
    NO_SUCH_NAME,
    NO_SUCH_OBJECT,
    REQUEST_ID_MAX,
    REQUEST_ID_MIN,
    TOO_BIG,
    VERSION_1,
    VERSION_2C,
    BerError,
    Missing,
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

SCHEMES = ("snmp", "snmpv1", "snmpv3")

_log = logging.getLogger(__name__)

_VERSIONS = {"snmpv1": 1, "snmp": 2, "snmpv3": 3}
_AUTH_METHODS = {"SHA": "sha1", "SHA1": "sha1", "MD5": "md5"}
_PRIV_METHODS = {"AES": "aes", "AES128": "aes", "DES": "des"}
_OPTIONS = ("max_varbinds", "max_inflight", "resolve_every")
_TEMPLATE = re.compile(r"\{\{(.*?)\}\}", re.S)
_TEMPLATE_BODY = re.compile(r"\s*([0-9.]+)\s*==(.*)", re.S)
_PLACEHOLDER = "__TEMPLATE__"
_PLAN_MAX_AGE_S = 3600.0
_WALK_RETRY_S = 30.0
_WALK_REPETITIONS = 25
_WALK_MAX_ROWS = 100_000
_V3_REDISCOVER_S = 60.0
"""puresnmp reuses the engine time of its discovery forever; agents reject it after 150 s."""


class SnmpError(Exception):
    """An SNMP exchange failed; the message names the target but never its secrets."""


class SnmpTimeout(SnmpError, TimeoutError):
    """The agent did not answer within the timeout (agent down, or wrong community/user)."""


class SnmpUnreachable(SnmpError, ConnectionError):
    """The agent's host said nothing listens on its port, or its name does not resolve."""


# --- URLs -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class SnmpTarget:
    """What identifies one agent session; its repr and str never show secrets."""

    version: int
    host: str
    port: int
    community: str = field(default="", repr=False)
    user: str = ""
    auth: str = ""
    auth_key: str = field(default="", repr=False)
    priv: str = ""
    priv_key: str = field(default="", repr=False)
    max_varbinds: int = 50
    max_inflight: int = 4
    resolve_every: float = 300.0

    @property
    def label(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        if self.version == 3:
            return f"snmpv3://{self.user}@{host}:{self.port}"
        scheme = "snmpv1" if self.version == 1 else "snmp"
        return f"{scheme}://***@{host}:{self.port}"

    def __str__(self) -> str:
        return self.label


@dataclass(frozen=True)
class OidSpec:
    """A metric's OID: fixed (`walk` is None) or a template resolved through a walk."""

    oid: tuple[int, ...]
    """The OID, or for a template the arcs before it."""
    walk: tuple[int, ...] | None = None
    wanted: str = ""
    after: tuple[int, ...] = ()


def safe_url(url: str) -> str:
    """The URL for messages: no community, no v3 key."""
    scheme, sep, rest = url.partition("://")
    netloc, slash, path = rest.partition("/")
    if not sep or "@" not in netloc:
        return url
    userinfo, _, hostport = netloc.rpartition("@")
    if scheme.lower() == "snmpv3":
        try:
            return redact_url(url)
        except ValueError:
            return f"{scheme}://{userinfo.partition(':')[0]}:***@{hostport}{slash}{path}"
    return f"{scheme}://***@{hostport}{slash}{path}"


def parse_url(url: str) -> tuple[SnmpTarget, OidSpec]:
    """Validate an SNMP metric URL; ValueError says what is wrong (without secrets)."""
    shown = safe_url(url)
    template = _TEMPLATE.search(url)
    work = url if template is None else url[:template.start()] + _PLACEHOLDER + url[template.end():]
    parts = urlsplit(work)
    version = _VERSIONS.get(parts.scheme.lower())
    if version is None:
        raise ValueError(f"{shown}: scheme must be one of {', '.join(SCHEMES)}")
    userinfo, at, _ = parts.netloc.rpartition("@")
    if not at or not userinfo:
        form = "snmpv3://<user>[:<authkey>[:<privkey>]]@" if version == 3 else \
            f"{parts.scheme}://<community>@"
        raise ValueError(f"{shown}: no credentials; the form is {form}<host>[:<port>]/<oid>")
    host = parts.hostname
    if not host:
        raise ValueError(f"{shown}: no host")
    try:
        port = parts.port or 161
    except ValueError:
        raise ValueError(f"{shown}: the port is not a number in 1..65535") from None
    options = _parse_options(parts.query, version, shown)
    credentials = _parse_credentials(userinfo, version, options, shown)
    target = SnmpTarget(version, host, port, **credentials, **options)
    if template is None:
        spec = OidSpec(_oid(parts.path[1:], shown))
    else:
        spec = _parse_template(parts.path[1:], template.group(1), shown)
    return target, spec


def _oid(text: str, shown: str) -> tuple[int, ...]:
    try:
        return parse_oid(unquote(text))
    except ValueError as exc:
        raise ValueError(f"{shown}: {exc}") from None


def _parse_template(path: str, body: str, shown: str) -> OidSpec:
    before, _, after = path.partition(_PLACEHOLDER)
    inner = _TEMPLATE_BODY.fullmatch(body)
    if inner is None or not before.endswith(".") or (after and not after.startswith(".")):
        raise ValueError(f"{shown}: a template reads <prefix>.{{{{ <walk_oid> == <value> }}}}"
                         "[.<suffix>]")
    wanted = inner.group(2).strip()
    if not wanted:
        raise ValueError(f"{shown}: the template compares with an empty value")
    if after and not re.fullmatch(r"\.[0-9]+(\.[0-9]+)*", after):
        raise ValueError(f"{shown}: the text after the template must be dotted numbers")
    suffix = tuple(int(arc) for arc in after[1:].split(".")) if after else ()
    return OidSpec(_oid(before[:-1], shown), _oid(inner.group(1), shown), wanted, suffix)


def _parse_options(query: str, version: int, shown: str) -> dict[str, Any]:
    allowed = (*_OPTIONS, "auth", "priv") if version == 3 else _OPTIONS
    options: dict[str, Any] = {}
    for name, value in parse_qsl(query, keep_blank_values=True):
        if name not in allowed:
            raise ValueError(f"{shown}: unknown option {name!r} (known: {', '.join(allowed)})")
        if name in options:
            raise ValueError(f"{shown}: option {name!r} given twice")
        options[name] = value
    for name, low, high in (("max_varbinds", 1, 1000), ("max_inflight", 1, 64)):
        if name in options:
            raw = options[name]
            if not raw.isdigit() or not low <= int(raw) <= high:
                raise ValueError(f"{shown}: {name} must be an integer in {low}..{high}")
            options[name] = int(raw)
    if "resolve_every" in options:
        try:
            seconds = float(options["resolve_every"])
        except ValueError:
            seconds = -1.0
        if not 0 <= seconds < math.inf:
            raise ValueError(f"{shown}: resolve_every must be a number of seconds >= 0")
        options["resolve_every"] = seconds
    return options


def _parse_credentials(userinfo: str, version: int, options: dict[str, Any],
                       shown: str) -> dict[str, str]:
    if version != 3:
        if ":" in userinfo:
            raise ValueError(f"{shown}: a community has no password part "
                             "(percent-encode ':' as %3A if the community holds one)")
        return {"community": unquote(userinfo)}
    fields = [unquote(part) for part in userinfo.split(":")]
    if len(fields) > 3 or not fields[0]:
        raise ValueError(f"{shown}: SNMPv3 credentials read <user>[:<authkey>[:<privkey>]]")
    user, auth_key, priv_key = (*fields, "", "")[:3]
    auth = options.pop("auth", "SHA" if auth_key else "").upper()
    priv = options.pop("priv", "AES" if priv_key else "").upper()
    if auth and auth not in _AUTH_METHODS:
        raise ValueError(f"{shown}: auth must be one of {', '.join(_AUTH_METHODS)}")
    if priv and priv not in _PRIV_METHODS:
        raise ValueError(f"{shown}: priv must be one of {', '.join(_PRIV_METHODS)}")
    if bool(auth) != bool(auth_key) or bool(priv) != bool(priv_key):
        raise ValueError(f"{shown}: auth/priv given without its key, or a key without a method")
    if priv_key and not auth_key:
        raise ValueError(f"{shown}: privacy needs authentication (an auth key)")
    for name, key in (("auth", auth_key), ("priv", priv_key)):
        if key and len(key) < 8:
            raise ValueError(f"{shown}: the {name} key must have at least 8 characters")
    if priv:
        try:
            puresnmp_priv.create(_PRIV_METHODS[priv])
        except puresnmp_exc.SnmpError:
            raise ValueError(f"{shown}: priv={priv} needs the puresnmp-crypto package") from None
    return {"user": user, "auth": auth, "auth_key": auth_key, "priv": priv,
            "priv_key": priv_key}


def target_key(desc: MetricDescription) -> SnmpTarget:
    return parse_url(desc.url)[0]


def open_collector(key: SnmpTarget, timeout: float) -> SnmpCollector:
    if not isinstance(key, SnmpTarget):
        raise TypeError(f"not an SNMP target key: {key!r}")
    return SnmpCollector(key, float(timeout))


# --- sessions: one GET or walk exchange with an agent ---------------------------------------

class _Exchange(NamedTuple):
    timestamp_us: int
    error_status: int
    error_index: int
    values: list[Any] | None
    """GET values in request order, or walk (arcs, value) rows; None on error-status."""


class _Request(NamedTuple):
    template: RequestTemplate
    oid_tlvs: tuple[bytes, ...]
    walk: bool


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
        self._pending: dict[int, tuple[asyncio.Future[_Exchange], asyncio.TimerHandle, int,
                                       _Request]] = {}
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

    def send(self, request: _Request) -> asyncio.Future[_Exchange]:
        future: asyncio.Future[_Exchange] = self._loop.create_future()
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
        future.set_result(_Exchange(midpoint_us(start_ns, end_ns), header.error_status,
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


class _CommunitySession:
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

    def prepare(self, oids: Sequence[tuple[int, ...]]) -> _Request:
        tlvs = tuple(encode_oid(oid) for oid in oids)
        return _Request(get_request(self._version, self._community, tlvs), tlvs, False)

    def send(self, request: _Request) -> asyncio.Future[_Exchange]:
        assert self._protocol is not None
        return self._protocol.send(request)

    async def walk(self, root: tuple[int, ...]) -> list[tuple[tuple[int, ...], Value]]:
        """GETBULK (v2c) or GETNEXT (v1) until the walk leaves `root`'s subtree."""
        rows: list[tuple[tuple[int, ...], Value]] = []
        current = root
        depth = len(root)
        while len(rows) < _WALK_MAX_ROWS:
            template = walk_request(self._version, self._community, encode_oid(current),
                                    _WALK_REPETITIONS)
            exchange = await self.send(_Request(template, (), True))
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


class _V3Session:
    """SNMPv3 through puresnmp, one exchange at a time (its cost is not on the v2c path)."""

    max_inflight = 1

    def __init__(self, target: SnmpTarget, timeout: float) -> None:
        self._target = target
        self._timeout = timeout
        auth = Auth(target.auth_key.encode(), _AUTH_METHODS[target.auth]) if target.auth \
            else None
        priv = Priv(target.priv_key.encode(), _PRIV_METHODS[target.priv]) if target.priv \
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
        self._address = infos[0][4][0]

    def prepare(self, oids: Sequence[tuple[int, ...]]) -> list[ObjectIdentifier]:
        return [ObjectIdentifier(oid_text(oid)) for oid in oids]

    def send(self, request: list[ObjectIdentifier]) -> asyncio.Future[_Exchange]:
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

    async def _get(self, oids: list[ObjectIdentifier]) -> _Exchange:
        async with self._lock:
            try:
                async with asyncio.timeout(self._timeout):
                    values = await self._current_client().multiget(oids)
            except puresnmp_exc.ErrorResponse as exc:
                index = next((n for n, oid in enumerate(oids, 1) if oid == exc.offending_oid), 0)
                return _Exchange(midpoint_us(*self._exchange_ns), exc.error_status, index, None)
            except Exception as exc:
                self._client = None
                raise self._error(exc) from None
            if len(values) != len(oids):
                raise SnmpError(f"{self._target.label}: {len(values)} values for "
                                f"{len(oids)} OIDs")
            return _Exchange(midpoint_us(*self._exchange_ns), 0, 0,
                             [_from_x690(value) for value in values])

    async def walk(self, root: tuple[int, ...]) -> list[tuple[tuple[int, ...], Value]]:
        async with self._lock:
            try:
                return [(parse_oid(str(row.oid)), _from_x690(row.value))
                        async for row in self._current_client().bulkwalk(
                            [ObjectIdentifier(oid_text(root))], bulk_size=_WALK_REPETITIONS)]
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


# --- the collector --------------------------------------------------------------------------

class _Item:
    """One distinct OID of a poll and the metrics (by position) that read it."""

    __slots__ = ("oid", "walk", "indices")

    def __init__(self, oid: tuple[int, ...], walk: tuple[int, ...] | None) -> None:
        self.oid = oid
        self.walk = walk
        self.indices: list[int] = []


class _Batch(NamedTuple):
    items: list[_Item]
    request: Any


class _Plan(NamedTuple):
    batches: list[_Batch]
    generation: int
    expires: float


class _WalkState:
    __slots__ = ("table", "ambiguous", "next_walk", "after_miss", "miss_pending")

    def __init__(self) -> None:
        self.table: dict[str, tuple[int, ...]] = {}
        self.ambiguous: set[str] = set()
        self.next_walk = 0.0
        self.after_miss = False
        self.miss_pending = False


def _match_text(value: Value) -> str | None:
    if isinstance(value, Missing):
        return None
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    return str(value).strip().strip("\x00").strip()


class SnmpCollector:
    """Polls one agent: all OIDs of a poll in GETs of up to `max_varbinds` varbinds."""

    def __init__(self, target: SnmpTarget, timeout: float) -> None:
        self._target = target
        self._label = target.label
        self._session: _CommunitySession | _V3Session = (
            _V3Session(target, timeout) if target.version == 3
            else _CommunitySession(target, timeout))
        self._specs: dict[str, OidSpec] = {}
        self._plans: dict[tuple[str, ...], _Plan] = {}
        self._generation = 0
        self._walks: dict[tuple[int, ...], _WalkState] = {}
        self._missing: set[tuple[int, ...]] = set()
        self._excluded: dict[tuple[int, ...], float] = {}
        self._log = RateLimitedLog(_log)

    async def collect(self, metrics: Sequence[MetricDescription]) -> list[Reading]:
        readings: list[Reading] = []
        if not metrics:
            return readings
        session = self._session
        await session.open()
        plan = await self._plan(metrics)
        batches = plan.batches
        window = session.max_inflight
        futures = [session.send(batch.request) for batch in batches[:window]]
        answered = False
        failure: SnmpError | None = None
        try:
            for n, batch in enumerate(batches):
                if n + window < len(batches):
                    futures.append(session.send(batches[n + window].request))
                try:
                    exchange = await futures[n]
                    answered = True
                    if exchange.error_status:
                        await self._recover(batch.items, exchange, metrics, readings)
                    else:
                        self._emit(batch.items, exchange, metrics, readings)
                except SnmpTimeout as exc:
                    if not answered:
                        raise  # the agent is down: do not wait for the other GETs in turn
                    self._log.warning(("timeout", batch.items[0].oid), "%s", exc)
                except SnmpUnreachable:
                    raise
                except SnmpError as exc:
                    failure = failure or exc
                    self._log.warning(("error", batch.items[0].oid), "%s", exc)
        finally:
            for future in futures:
                if not future.done():
                    future.cancel()
                elif not future.cancelled():
                    future.exception()  # retrieved: no "never retrieved" noise
        if failure is not None and not answered:
            raise failure
        return readings

    async def close(self) -> None:
        await self._session.close()

    def _emit(self, items: list[_Item], exchange: _Exchange,
              metrics: Sequence[MetricDescription], out: list[Reading]) -> None:
        timestamp = exchange.timestamp_us
        missing = self._missing
        append = out.append
        for item, value in zip(items, exchange.values, strict=True):  # type: ignore[arg-type]
            kind = value.__class__
            if kind is Missing:
                self._on_missing(item, value.name, metrics)
                continue
            if missing and item.oid in missing:
                missing.discard(item.oid)
                _log.info("%s: %s has a value again", self._label, oid_text(item.oid))
            if kind is int:
                # make_reading's result for an int, built inline: it is most of the values
                # and this halves their cost (tests check both give the same Reading)
                number = float(value)
                for index in item.indices:
                    desc = metrics[index]
                    scale = desc.scale_factor
                    append(Reading(timestamp, desc.device_id, desc.name,
                                   number if scale is None else number * scale, desc.labels))
            else:
                for index in item.indices:
                    append(make_reading(metrics[index], timestamp, value))

    def _on_missing(self, item: _Item, why: str, metrics: Sequence[MetricDescription]) -> None:
        if item.oid not in self._missing:
            self._missing.add(item.oid)
            names = ", ".join(metrics[index].name for index in item.indices)
            _log.warning("%s: %s reads as %s (metric %s); no reading until it has a value",
                         self._label, oid_text(item.oid), why, names)
        if item.walk is not None:
            state = self._walks[item.walk]
            if not state.after_miss and not state.miss_pending:
                state.miss_pending = True
                state.next_walk = 0.0
                self._generation += 1

    async def _fetch(self, items: list[_Item], metrics: Sequence[MetricDescription],
                     out: list[Reading]) -> None:
        exchange = await self._session.send(self._session.prepare([i.oid for i in items]))
        if exchange.error_status:
            await self._recover(items, exchange, metrics, out)
        else:
            self._emit(items, exchange, metrics, out)

    async def _recover(self, items: list[_Item], exchange: _Exchange,
                       metrics: Sequence[MetricDescription], out: list[Reading]) -> None:
        """Handle an error-status: split on tooBig, drop the offending OID on others."""
        status, index = exchange.error_status, exchange.error_index
        name = ERROR_NAMES.get(status, f"error-status {status}")
        if status == TOO_BIG and len(items) > 1:
            half = len(items) // 2
            for part in (items[:half], items[half:]):
                await self._fetch(part, metrics, out)
            return
        if 1 <= index <= len(items):
            bad = items[index - 1]
            if status == NO_SUCH_NAME:
                self._excluded[bad.oid] = time.monotonic() + self._target.resolve_every
                self._generation += 1
                self._on_missing(bad, "noSuchName", metrics)
            else:
                names = ", ".join(metrics[i].name for i in bad.indices)
                self._log.warning((name, bad.oid), "%s: agent answered %s for %s (metric %s); "
                                  "skipped", self._label, name, oid_text(bad.oid), names)
            rest = [item for item in items if item is not bad]
            if rest:
                await self._fetch(rest, metrics, out)
            return
        self._log.warning((name, items[0].oid), "%s: agent answered %s to a GET of %d OIDs "
                          "(from %s); skipped", self._label, name, len(items),
                          oid_text(items[0].oid))

    async def _plan(self, metrics: Sequence[MetricDescription]) -> _Plan:
        key = tuple([desc.url for desc in metrics])
        plan = self._plans.get(key)
        if plan is None or plan.generation != self._generation \
                or time.monotonic() >= plan.expires:
            plan = await self._build_plan(metrics)
            if len(self._plans) >= 8:
                self._plans.clear()
            self._plans[key] = plan
        return plan

    def _spec(self, desc: MetricDescription) -> OidSpec:
        spec = self._specs.get(desc.url)
        if spec is None:
            spec = self._specs[desc.url] = parse_url(desc.url)[1]
        return spec

    async def _build_plan(self, metrics: Sequence[MetricDescription]) -> _Plan:
        now = time.monotonic()
        specs = [self._spec(desc) for desc in metrics]
        walks = {spec.walk for spec in specs if spec.walk is not None}
        for walk in sorted(walks):
            state = self._walks.setdefault(walk, _WalkState())
            if now >= state.next_walk:
                await self._resolve(walk, state)
        now = time.monotonic()
        expires = now + _PLAN_MAX_AGE_S
        items: dict[tuple[int, ...], _Item] = {}
        for index, (desc, spec) in enumerate(zip(metrics, specs, strict=True)):
            oid = spec.oid
            if spec.walk is not None:
                state = self._walks[spec.walk]
                expires = min(expires, state.next_walk)
                suffix = state.table.get(spec.wanted)
                if suffix is None:
                    self._log.warning(("unresolved", desc.url), "%s: metric %s skipped: no entry "
                                      "of %s equals %r", self._label, desc.name,
                                      oid_text(spec.walk), spec.wanted)
                    continue
                if spec.wanted in state.ambiguous:
                    self._log.warning(("ambiguous", desc.url), "%s: metric %s: several entries "
                                      "of %s equal %r; using the first", self._label,
                                      desc.name, oid_text(spec.walk), spec.wanted)
                oid = spec.oid + suffix + spec.after
            until = self._excluded.get(oid)
            if until is not None:
                if now < until:
                    expires = min(expires, until)
                    continue
                del self._excluded[oid]
            item = items.get(oid)
            if item is None:
                item = items[oid] = _Item(oid, spec.walk)
            item.indices.append(index)
        ordered = list(items.values())
        size = self._target.max_varbinds
        batches = [_Batch(chunk, self._session.prepare([item.oid for item in chunk]))
                   for chunk in (ordered[n:n + size] for n in range(0, len(ordered), size))]
        return _Plan(batches, self._generation, expires)

    async def _resolve(self, walk: tuple[int, ...], state: _WalkState) -> None:
        """Walk a template's table; timeouts propagate (the agent is down)."""
        try:
            rows = await self._session.walk(walk)
        except (SnmpTimeout, SnmpUnreachable):
            raise
        except SnmpError as exc:
            self._log.warning(("walk", walk), "%s", exc)
            state.next_walk = time.monotonic() + min(self._target.resolve_every,
                                                     _WALK_RETRY_S)
            return
        table: dict[str, tuple[int, ...]] = {}
        ambiguous: set[str] = set()
        depth = len(walk)
        for oid, value in rows:
            text = _match_text(value)
            if text is None:
                continue
            if text in table:
                ambiguous.add(text)
            else:
                table[text] = oid[depth:]
        state.table = table
        state.ambiguous = ambiguous
        state.after_miss = state.miss_pending
        state.miss_pending = False
        state.next_walk = time.monotonic() + self._target.resolve_every
        self._generation += 1
