"""The SNMP collector: one agent's OIDs of a poll in as few GETs as its options allow,
templated OIDs resolved through walks, missing OIDs reported once."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any, NamedTuple

from kwollect.logutil import RateLimitedLog
from kwollect.model import MetricDescription, Reading, make_reading
from kwollect.protocols.snmp.codec import (
    ERROR_NAMES,
    NO_SUCH_NAME,
    TOO_BIG,
    Missing,
    Refused,
    Value,
    oid_text,
)
from kwollect.protocols.snmp.session import (
    CommunitySession,
    Exchange,
    SnmpError,
    SnmpTimeout,
    SnmpUnreachable,
    V3Session,
)
from kwollect.protocols.snmp.url import OidSpec, SnmpTarget, parse_url

_log = logging.getLogger("kwollect.protocols.snmp")

_PLAN_MAX_AGE_S = 3600.0
_WALK_RETRY_S = 30.0


def target_key(desc: MetricDescription) -> SnmpTarget:
    return parse_url(desc.url)[0]


def open_collector(key: SnmpTarget, timeout: float) -> SnmpCollector:
    return SnmpCollector(key, float(timeout))


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
    if isinstance(value, Missing | Refused):
        return None
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    return str(value).strip().strip("\x00").strip()


class SnmpCollector:
    """Polls one agent: all OIDs of a poll in GETs of up to `max_varbinds` varbinds."""

    def __init__(self, target: SnmpTarget, timeout: float) -> None:
        self._target = target
        self._label = target.label
        self._session: CommunitySession | V3Session = (
            V3Session(target, timeout) if target.version == 3
            else CommunitySession(target, timeout))
        self._specs: dict[str, OidSpec] = {}
        self._plans: dict[tuple[str, ...], _Plan] = {}
        self._generation = 0
        self._walks: dict[tuple[int, ...], _WalkState] = {}
        self._missing: set[tuple[int, ...]] = set()
        self._excluded: dict[tuple[int, ...], float] = {}
        self._log = RateLimitedLog(_log)
        self.refused_values = 0
        """Values skipped since the collector was opened (see `Refused`)."""

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

    def _emit(self, items: list[_Item], exchange: Exchange,
              metrics: Sequence[MetricDescription], out: list[Reading]) -> None:
        timestamp = exchange.timestamp_us
        missing = self._missing
        append = out.append
        for item, value in zip(items, exchange.values, strict=True):  # type: ignore[arg-type]
            kind = value.__class__
            if kind is Missing:
                self._on_missing(item, value.name, metrics)
                continue
            if kind is Refused:
                self._on_refused(item, value.reason, metrics)
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

    def _on_refused(self, item: _Item, why: str, metrics: Sequence[MetricDescription]) -> None:
        self.refused_values += 1
        names = ", ".join(metrics[index].name for index in item.indices)
        self._log.warning(("refused", item.oid), "%s: %s (metric %s): value refused: %s",
                          self._label, oid_text(item.oid), names, why)

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

    async def _recover(self, items: list[_Item], exchange: Exchange,
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
