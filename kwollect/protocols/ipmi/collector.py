"""The IPMI collector: one BMC's wanted sensors, by record id or name, read through the pool."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Sequence

from kwollect.logutil import RateLimitedLog
from kwollect.model import MetricDescription, Reading, make_reading, midpoint_us
from kwollect.protocols.ipmi.output import Row
from kwollect.protocols.ipmi.pool import HostResult, IpmiError, acquire_pool, release_pool
from kwollect.protocols.ipmi.url import SensorRef, Target, parse_url

RELIST_INTERVAL_S = 600.0

logger = logging.getLogger("kwollect.protocols.ipmi")
_once = RateLimitedLog(logger, interval=math.inf)
_limited = RateLimitedLog(logger)


def target_key(desc: MetricDescription) -> Target:
    return parse_url(desc.url)[0]


def open_collector(key: Target, timeout: float) -> IpmiCollector:
    return IpmiCollector(key, timeout)


class IpmiCollector:
    """Reads the sensors wanted from one BMC; see the module docstring for how."""

    def __init__(self, target: Target, timeout: float) -> None:
        self.target = target
        self.timeout = timeout
        self._pool = acquire_pool(target, timeout)
        self._closed = False
        self._lock = asyncio.Lock()
        self._refs: dict[str, SensorRef] = {}
        self._names: dict[int, str] | None = None
        """Record id -> name from the last full listing; None when a listing is due."""
        self._by_name: dict[str, int] = {}
        self._listed_at = 0.0
        self._has_unknown = False

    @property
    def cache_file(self) -> str:
        """The BMC's SDR cache file (it exists once a poll succeeded)."""
        return self._pool.sdr_cache.file(self.target)

    def _ref(self, desc: MetricDescription) -> SensorRef:
        ref = self._refs.get(desc.url)
        if ref is None:
            target, ref = parse_url(desc.url)
            if target != self.target:
                raise ValueError(f"{desc.source or desc.name}: URL is for {target}, "
                                 f"not for this collector's BMC {self.target}")
            self._refs[desc.url] = ref
        return ref

    def _resolve(self, ref: SensorRef) -> int | None:
        assert self._names is not None
        if isinstance(ref, int):
            return ref if ref in self._names else None
        return self._by_name.get(ref)

    def _learn(self, rows: list[Row]) -> None:
        self._names = {row.record_id: row.name for row in rows}
        by_name: dict[str, list[int]] = {}
        for row in rows:
            by_name.setdefault(row.name, []).append(row.record_id)
        self._by_name = {name: min(ids) for name, ids in by_name.items()}
        for name, ids in by_name.items():
            if len(ids) > 1:
                _once.warning((self.target, "dup", name),
                              "IPMI BMC %s: %d sensors are named %r (record ids %s); reading "
                              "record id %d for that name, use an id to read another",
                              self.target, len(ids), name, ", ".join(map(str, sorted(ids))),
                              min(ids))
        self._listed_at = time.monotonic()

    def _listing_due(self) -> bool:
        return self._names is None or (
            self._has_unknown and time.monotonic() - self._listed_at > RELIST_INTERVAL_S)

    async def collect(self, metrics: Sequence[MetricDescription]) -> list[Reading]:
        if self._closed:
            raise IpmiError(f"IPMI BMC {self.target}: collector is closed")
        refs = [self._ref(desc) for desc in metrics]
        async with self._lock:
            ids: tuple[int, ...] | None = None
            if not self._listing_due():
                ids = tuple(sorted({i for i in map(self._resolve, refs) if i is not None}))
            try:
                if ids == ():
                    result = HostResult([], 0, 0)
                else:
                    result = await self._pool.read(self.target, ids)
            except BaseException:
                self._names = None
                self._pool.sdr_cache.forget(self.target)
                raise
            if ids is None:
                self._learn(result.rows)
            return self._readings(metrics, refs, result)

    def _readings(self, metrics: Sequence[MetricDescription], refs: list[SensorRef],
                  result: HostResult) -> list[Reading]:
        rows = {row.record_id: row for row in result.rows}
        timestamp = midpoint_us(result.start_ns, result.end_ns)
        readings = []
        self._has_unknown = stale = False
        for desc, ref in zip(metrics, refs, strict=True):
            record_id = self._resolve(ref)
            if record_id is None:
                self._has_unknown = True
                kind = "id" if isinstance(ref, int) else "name"
                _once.warning((self.target, "unknown", ref),
                              "IPMI BMC %s: no sensor with %s %r (metric %s, %s)", self.target,
                              kind, ref, desc.name, desc.source or desc.device_id)
                continue
            row = rows.get(record_id)
            if row is None or (isinstance(ref, str) and row.name != ref):
                stale = True
                _limited.warning((self.target, "changed"),
                                 "IPMI BMC %s: sensor %r is no longer record id %d; "
                                 "listing the sensors again at the next poll",
                                 self.target, ref, record_id)
                continue
            value = row.value()
            if value is not None:
                readings.append(make_reading(desc, timestamp, value))
        if stale:
            self._names = None
        return readings

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            await release_pool(self.target, self.timeout)
