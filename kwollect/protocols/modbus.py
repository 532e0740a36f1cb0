"""Modbus TCP: registers, coils and discrete inputs read through a gateway, batched per unit.

URL: ``modbus://<host>[:<port>]/<unit>/<address>[?<option>=<value>&...]``

- ``port``: TCP port of the gateway (or of the device itself), 502 by default.
- ``unit``: unit id (a.k.a. slave or device id) of the device behind the gateway, 0..255.
- ``address``: 0-based protocol address of the first register or bit, i.e. the address sent
  on the wire, not the "40001" document notation; decimal, or hexadecimal with ``0x``.

Options (each at most once):

- ``kind``: ``holding`` (default, function 3), ``input`` (function 4), ``coil`` (function 1)
  or ``discrete`` (discrete input, function 2). Coils and discrete inputs read as 0 or 1.
- ``type`` (registers only): ``uint16`` (default), ``int16``, ``uint32``, ``int32``,
  ``float32``, ``uint64``, ``int64``, ``float64``.
- ``order`` (registers only): where the bytes ``A B C D`` of a value (most significant
  first) travel on the wire: ``ABCD`` (default, Modbus big-endian), ``CDAB`` (registers
  swapped), ``BADC`` (bytes swapped in each register) or ``DCBA`` (both). The code means
  "byte order inside a register, register order across the value", so for 64-bit types
  ``CDAB`` reads ``GH EF CD AB`` and for 16-bit types only the byte swap matters.
- ``scale``: multiplier applied to the decoded value. The description's ``scale_factor``
  applies on top: stored value = raw × scale × scale_factor.
- ``max_span``: largest single read, in registers (1..125, default 125) or in bits
  (1..2000, default 2000): the Modbus limits; lower it for devices that accept less.
- ``max_gap``: unused registers (default 16) or bits (default 128) that may be read to
  join two metrics into one request.

Metrics of one gateway (host, port) share one TCP connection and one request at a time.
For each unit and kind, metrics whose addresses lie within ``max_gap`` of each other are read
by one request of at most ``max_span`` (a block takes the smallest limits of its metrics).
If a device refuses a joined read with exception 2 or 3 (typically a hole in its register
map), that block is split for good: at its gaps first, into one read per metric if need be.

A unit that answers an exception or does not answer loses its readings for this round only
and the other units are still read; units that were silent last round are read last.
``collect`` raises only when the gateway cannot be reached or no unit answered at all.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache, lru_cache
from typing import Any, NamedTuple

from pymodbus.client import AsyncModbusTcpClient
from pymodbus.exceptions import ModbusException

from kwollect.errors import KwollectError, TargetTimeout, TargetUnreachable
from kwollect.logutil import RateLimitedLog
from kwollect.model import MetricDescription, Reading, make_reading, midpoint_us
from kwollect.protocols.sharing import SharedRegistry
from kwollect.protocols.url import Option, choice, integer, number, read_options, split_url

SCHEMES = ("modbus",)

DEFAULT_PORT = 502

if "device_id" not in inspect.signature(AsyncModbusTcpClient.read_coils).parameters:
    raise ImportError("kwollect's Modbus support needs pymodbus >= 3.10 (device_id= keyword)")

logger = logging.getLogger(__name__)
_faults = RateLimitedLog(logger)

# pymodbus logs every timeout and connection failure itself, on every poll; this module
# reports them rate-limited instead.  An explicit level set by the operator is kept.
if logging.getLogger("pymodbus").level == logging.NOTSET:
    logging.getLogger("pymodbus").setLevel(logging.CRITICAL)

Decoder = Callable[[Sequence[Any], int], float]
"""Reads one value from a response's registers or bits, at an offset."""


@dataclass(frozen=True, slots=True)
class _Kind:
    name: str
    read: Callable[..., Any]
    """Unbound `AsyncModbusTcpClient` read method for this kind."""
    bits: bool
    span_limit: int
    default_gap: int


_KINDS = {
    "holding": _Kind("holding", AsyncModbusTcpClient.read_holding_registers, False, 125, 16),
    "input": _Kind("input", AsyncModbusTcpClient.read_input_registers, False, 125, 16),
    "coil": _Kind("coil", AsyncModbusTcpClient.read_coils, True, 2000, 128),
    "discrete": _Kind("discrete", AsyncModbusTcpClient.read_discrete_inputs, True, 2000, 128),
}
_TYPES = {"uint16": "H", "int16": "h", "uint32": "I", "int32": "i", "float32": "f",
          "uint64": "Q", "int64": "q", "float64": "d"}
_ORDERS = {"ABCD": (False, False), "CDAB": (False, True), "BADC": (True, False),
           "DCBA": (True, True)}
"""Order code -> (bytes swapped inside each register, registers in reverse order)."""

_SPLIT_CODES = frozenset({2, 3})
"""Exception codes that may mean "this joined read is not acceptable", worth splitting."""
_GATEWAY_CODES = frozenset({10, 11})
"""Exception codes by which a gateway says the unit is unreachable: skip its other reads."""
_EXCEPTION_NAMES = {1: "illegal function", 2: "illegal data address", 3: "illegal data value",
                    4: "device failure", 5: "acknowledge", 6: "device busy",
                    8: "memory parity error", 10: "gateway path unavailable",
                    11: "gateway target failed to respond"}


@dataclass(frozen=True, slots=True)
class _Point:
    """What one URL reads, parsed once."""

    unit: int
    kind: _Kind
    address: int
    width: int
    decode: Decoder
    scale: float
    max_span: int
    max_gap: int


def _bit(values: Sequence[Any], offset: int) -> float:
    return 1 if values[offset] else 0


def _uint16(values: Sequence[Any], offset: int) -> float:
    return values[offset]


def _int16(values: Sequence[Any], offset: int) -> float:
    value = values[offset]
    return value - 0x10000 if value & 0x8000 else value


@cache
def _register_decoder(code: str, swap_bytes: bool, swap_words: bool) -> tuple[Decoder, int]:
    """Decoder and width in registers for a struct type code and a wire order."""
    width = struct.calcsize(f">{code}") // 2
    if not swap_bytes and code in ("H", "h"):
        return (_uint16 if code == "H" else _int16), 1
    pack = struct.Struct(f"{'<' if swap_bytes else '>'}{width}H").pack
    unpack = struct.Struct(f">{code}").unpack

    if swap_words and width > 1:
        def decode(values: Sequence[Any], offset: int) -> float:
            return unpack(pack(*reversed(values[offset:offset + width])))[0]
    else:
        def decode(values: Sequence[Any], offset: int) -> float:
            return unpack(pack(*values[offset:offset + width]))[0]
    return decode, width


def _int_in(text: str, low: int, high: int, what: str, url: str) -> int:
    try:
        value = int(text, 16) if text[:2].lower() == "0x" else int(text, 10)
    except ValueError:
        raise ValueError(f"{url}: {what} {text!r} is not an integer") from None
    if not low <= value <= high:
        raise ValueError(f"{url}: {what} {value} out of range {low}..{high}")
    return value


class Gateway(NamedTuple):
    """The target key: a gateway, (host, port); all units behind it share one connection."""

    host: str
    port: int

    @property
    def label(self) -> str:
        return f"modbus://{f'[{self.host}]' if ':' in self.host else self.host}:{self.port}"


_OPTIONS = (
    Option("kind", choice(_KINDS)),
    Option("type", choice(_TYPES)),
    Option("order", choice(_ORDERS, upper=True)),
    Option("scale", number(nonzero=True)),
    Option("max_span", integer(1, 2000, hexadecimal=True)),
    Option("max_gap", integer(0, 2000, hexadecimal=True)),
)


@lru_cache(maxsize=65536)
def _parse(url: str) -> tuple[Gateway, _Point]:
    """Validate a modbus URL: (gateway, what it reads).  ValueError names the culprit."""
    parts = split_url(url, SCHEMES, "Modbus", DEFAULT_PORT)
    shown = parts.shown
    if parts.userinfo is not None:
        raise parts.error("Modbus has no credentials, remove the user part")
    if parts.fragment:
        raise parts.error(f"unexpected fragment '#{parts.fragment}'")
    segments = parts.path.split("/")[1:]
    if len(segments) != 2 or not all(segments):
        raise parts.error(f"path must be /<unit>/<address>, got {parts.path!r}")
    unit = _int_in(segments[0], 0, 255, "unit", shown)
    address = _int_in(segments[1], 0, 0xFFFF, "address", shown)
    options, _ = read_options(parts, _OPTIONS)

    kind = _KINDS[options.get("kind", "holding")]
    if kind.bits:
        for name in ("type", "order"):
            if name in options:
                raise parts.error(f"option {name!r} does not apply to kind={kind.name}")
        decode: Decoder = _bit
        width = 1
    else:
        code = _TYPES[options.get("type", "uint16")]
        decode, width = _register_decoder(code, *_ORDERS[options.get("order", "ABCD")])
    if address + width - 1 > 0xFFFF:
        raise parts.error(f"address {address} + {width} registers passes 65535")
    max_span = options.get("max_span", kind.span_limit)
    if not width <= max_span <= kind.span_limit:
        raise parts.error(f"max_span {max_span} out of range {width}..{kind.span_limit}")
    max_gap = options.get("max_gap", kind.default_gap)
    if max_gap > kind.span_limit:
        raise parts.error(f"max_gap {max_gap} out of range 0..{kind.span_limit}")
    return (Gateway(parts.host, parts.port),
            _Point(unit, kind, address, width, decode, options.get("scale", 1.0), max_span,
                   max_gap))


def target_key(desc: MetricDescription) -> Gateway:
    """The gateway, (host, port): all units behind it share one connection."""
    return _parse(desc.url)[0]


@dataclass(slots=True)
class _Block:
    """One read request: `count` registers or bits from `start`, feeding several metrics."""

    kind: _Kind
    start: int
    count: int
    items: list[tuple[int, _Point]]
    """(index in the collected metrics, point) for each metric the block serves."""
    slots: list[tuple[int, Decoder, int, float]] | None = None
    """(index, decoder, offset in the response, scale): `items` ready for decoding."""

    def decoding_slots(self) -> list[tuple[int, Decoder, int, float]]:
        if self.slots is None:
            self.slots = [(index, point.decode, point.address - self.start, point.scale)
                          for index, point in self.items]
        return self.slots

    def split(self) -> list[_Block]:
        """Smaller blocks for a refused read: its contiguous runs, or if it is one run, one
        block per distinct register range (metrics on the same range stay together)."""
        runs = _join(self.items, 0)
        if len(runs) > 1:
            return runs
        ranges: dict[tuple[int, int], _Block] = {}
        for index, point in self.items:
            key = (point.address, point.width)
            block = ranges.get(key)
            if block is None:
                ranges[key] = _Block(self.kind, point.address, point.width, [(index, point)])
            else:
                block.items.append((index, point))
        return list(ranges.values())


@dataclass(slots=True)
class _UnitPlan:
    unit: int
    blocks: list[_Block]


def _join(items: Sequence[tuple[int, _Point]], max_gap: int | None) -> list[_Block]:
    """Blocks for the points of one unit and kind, sorted by address: a point joins the
    previous block when the gap and the resulting span are within the limits of every point
    of the block (`max_gap`, when given, overrides the points' own gap limits)."""
    blocks: list[_Block] = []
    block: _Block | None = None
    span = gap = 0
    for index, point in items:
        end = point.address + point.width
        if block is not None:
            joined_span = min(span, point.max_span)
            joined_gap = min(gap, point.max_gap if max_gap is None else max_gap)
            block_end = block.start + block.count
            joined_end = max(block_end, end)
            if point.address - block_end <= joined_gap and joined_end - block.start <= joined_span:
                block.count = joined_end - block.start
                block.items.append((index, point))
                span, gap = joined_span, joined_gap
                continue
        block = _Block(point.kind, point.address, point.width, [(index, point)])
        blocks.append(block)
        span, gap = point.max_span, point.max_gap if max_gap is None else max_gap
    return blocks


def _plan(points: Sequence[_Point]) -> list[_UnitPlan]:
    """Group points into as few blocks as the span and gap limits allow, per unit and kind."""
    groups: dict[tuple[int, str], list[tuple[int, _Point]]] = {}
    for index, point in enumerate(points):
        groups.setdefault((point.unit, point.kind.name), []).append((index, point))
    units: dict[int, list[_Block]] = {}
    for (unit, _kind), items in sorted(groups.items()):
        items.sort(key=lambda item: item[1].address)
        units.setdefault(unit, []).extend(_join(items, None))
    return [_UnitPlan(unit, blocks) for unit, blocks in sorted(units.items())]


class _NoAnswer(KwollectError):
    """The request got no valid response in time (the unit or the whole gateway is silent)."""


class _Gateway:
    """One TCP connection to (host, port), shared by every collector of that gateway.

    A lock keeps one request in flight, so a request's timestamp measures that request
    only, and a gateway that talks to a serial bus is never asked two things at once.
    """

    def __init__(self, key: Gateway, timeout: float) -> None:
        self.key = key
        self.host, self.port = key
        self.timeout = timeout
        self.label = key.label
        self.silent_units: set[int] = set()
        self._lock = asyncio.Lock()
        self._client: AsyncModbusTcpClient | None = None

    async def read(self, unit: int, block: _Block) -> tuple[Any, int]:
        """Send one read; return the response and the request/response midpoint in µs."""
        async with self._lock:
            client = await self._connected()
            start = time.time_ns()
            try:
                response = await block.kind.read(client, block.start, count=block.count,
                                                 device_id=unit)
            except ModbusException as exc:
                raise _NoAnswer(str(exc)) from exc
            end = time.time_ns()
        return response, midpoint_us(start, end)

    async def _connected(self) -> AsyncModbusTcpClient:
        client = self._client
        if client is None:
            # reconnect_delay=0: no background reconnection; the next request reconnects.
            client = self._client = AsyncModbusTcpClient(
                self.host, port=self.port, timeout=self.timeout, retries=0, reconnect_delay=0)
        if not client.connected and not await client.connect():
            raise TargetUnreachable(f"{self.label}: cannot connect (refused, unreachable or "
                                  f"no answer within {self.timeout} s)")
        return client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None


_gateways: SharedRegistry[Gateway, _Gateway] = SharedRegistry()


class ModbusCollector:
    """Reads the metrics of one gateway; several collectors of a gateway share its connection."""

    def __init__(self, gateway: _Gateway) -> None:
        self._gateway = gateway
        self._plans: dict[tuple[str, ...], list[_UnitPlan]] = {}
        self._closed = False

    def _plan_for(self, metrics: Sequence[MetricDescription]) -> list[_UnitPlan]:
        urls = tuple([desc.url for desc in metrics])
        plan = self._plans.get(urls)
        if plan is None:
            if len(self._plans) >= 64:
                self._plans.clear()
            plan = self._plans[urls] = _plan([_parse(url)[1] for url in urls])
        return plan

    async def collect(self, metrics: Sequence[MetricDescription]) -> list[Reading]:
        if self._closed:
            raise KwollectError(f"{self._gateway.label}: collector is closed")
        gateway = self._gateway
        readings: list[Reading] = []
        answers = 0
        silent: list[int] = []
        plan = sorted(self._plan_for(metrics), key=lambda u: u.unit in gateway.silent_units)
        for unit_plan in plan:
            unit = unit_plan.unit
            blocks = unit_plan.blocks
            i = 0
            while i < len(blocks):
                block = blocks[i]
                try:
                    response, timestamp_us = await gateway.read(unit, block)
                except ConnectionError as exc:
                    if not answers:
                        raise
                    _faults.warning((gateway.label, "connect"),
                                    "%s; readings of this round so far are kept", exc)
                    return readings
                except _NoAnswer as exc:
                    silent.append(unit)
                    gateway.silent_units.add(unit)
                    if not answers and len(silent) >= 2:
                        raise TargetTimeout(f"{gateway.label}: units {silent[0]} and {unit} "
                                           f"gave no answer within {gateway.timeout} s, and "
                                           "no unit did: gateway unresponsive") from exc
                    _faults.warning((gateway.label, unit, "silent"),
                                    "%s unit %d: no answer to %s read at %d (%s); its other "
                                    "reads skipped this round", gateway.label, unit,
                                    block.kind.name, block.start, exc)
                    break
                answers += 1
                if unit in gateway.silent_units:
                    gateway.silent_units.discard(unit)
                    _faults.forget((gateway.label, unit, "silent"))
                if response.isError():
                    code = response.exception_code
                    if code in _SPLIT_CODES and len(pieces := block.split()) > 1:
                        logger.info("%s unit %d: %s read %d+%d refused (exception %d), "
                                    "split into %d reads from now on", gateway.label, unit,
                                    block.kind.name, block.start, block.count, code,
                                    len(pieces))
                        blocks[i:i + 1] = pieces
                        continue
                    _faults.warning((gateway.label, unit, block.kind.name, block.start),
                                    "%s unit %d: %s read %d+%d answered exception %d (%s)",
                                    gateway.label, unit, block.kind.name, block.start,
                                    block.count, code, _EXCEPTION_NAMES.get(code, "unknown"))
                    if code in _GATEWAY_CODES:
                        break
                else:
                    self._decode(block, response, timestamp_us, metrics, readings, unit)
                i += 1
        if not answers and silent:
            raise TargetTimeout(f"{gateway.label}: unit {silent[0]} gave no answer within "
                               f"{gateway.timeout} s")
        return readings

    def _decode(self, block: _Block, response: Any, timestamp_us: int,
                metrics: Sequence[MetricDescription], readings: list[Reading],
                unit: int) -> None:
        values = response.bits if block.kind.bits else response.registers
        if len(values) < block.count:
            _faults.warning((self._gateway.label, unit, block.kind.name, block.start),
                            "%s unit %d: %s read %d+%d returned only %d values, ignored",
                            self._gateway.label, unit, block.kind.name, block.start,
                            block.count, len(values))
            return
        append = readings.append
        for index, decode, offset, scale in block.decoding_slots():
            append(make_reading(metrics[index], timestamp_us, decode(values, offset) * scale))

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        last = _gateways.release(self._gateway.key)
        if last is not None:
            last.close()


def open_collector(key: tuple[str, int], timeout: float) -> ModbusCollector:
    """A collector for gateway `key`; the first one opened sets the gateway's timeout."""
    gateway = Gateway(*key)
    return ModbusCollector(_gateways.acquire(gateway, lambda: _Gateway(gateway, timeout)))
