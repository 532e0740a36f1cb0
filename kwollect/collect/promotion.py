"""Which optional metrics are promoted, from the `promoted_metrics` table: one reader for
the kwollector and the wattmetre reader.

A metric is promoted for a device when a row names the device (or the metric's
`_device_alias`) and its regular expression fully matches the metric name (NULL matches
every name); every row of a device counts.  `PromotionReader` re-reads the table about
every second on a connection of its own, and at once when the database says it changed
(NOTIFY kwollect_promotions, sent by a trigger on the table: a job's promotion reaches the
collectors within milliseconds, polling being the fallback); when a read fails (database
down, slow, refusing) the last known set is kept, so a database outage never stops or
starts the collection of optional metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import asyncpg

from kwollect.logutil import RateLimitedLog

log = logging.getLogger("kwollect.collect.promotion")
PROMOTED_QUERY = "SELECT device_id, metric_id FROM promoted_metrics"
CHANNEL = "kwollect_promotions"
REFRESH_S = 1.0
TIMEOUT_S = 5.0
READ_ERRORS = (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError)
"""What a read of promoted_metrics may fail with and be retried later."""


class Promotions:
    """The current promoted set, with a cache of answers that lives until it changes."""

    def __init__(self) -> None:
        self._rows: frozenset[tuple[str, str | None]] = frozenset()
        self._patterns: dict[str, list[re.Pattern[str]]] = {}
        self._answers: dict[tuple[str, str | None, str], bool] = {}
        self._bad = RateLimitedLog(log, 600)

    def update(self, rows: Iterable[tuple[str | None, str | None]]) -> bool:
        """Replace the set; returns whether it changed.  Rows without a device are ignored."""
        new = frozenset((str(d), m) for d, m in rows if d is not None)
        if new == self._rows:
            return False
        patterns: dict[str, list[re.Pattern[str]]] = {}
        for device, regex in new:
            try:
                pattern = re.compile(regex if regex is not None else ".*")
            except re.error as exc:
                self._bad.warning(("regex", device, regex),
                                  "promoted_metrics row (%s, %r) ignored: bad regex: %s",
                                  device, regex, exc)
                continue
            patterns.setdefault(device, []).append(pattern)
        self._rows, self._patterns, self._answers = new, patterns, {}
        return True

    def devices_promoting(self, name: str) -> frozenset[str]:
        """The devices (or aliases) for which the metric `name` is promoted."""
        return frozenset(device for device, patterns in self._patterns.items()
                         if any(p.fullmatch(name) for p in patterns))

    def is_promoted(self, device_id: str, alias: str | None, name: str) -> bool:
        key = (device_id, alias, name)
        answer = self._answers.get(key)
        if answer is None:
            candidates = self._patterns.get(device_id, [])
            if alias:
                candidates = candidates + self._patterns.get(alias, [])
            answer = any(p.fullmatch(name) for p in candidates)
            self._answers[key] = answer
        return answer


class PromotionReader:
    """Reads promoted_metrics into `promotions` every `refresh_s` on its own connection,
    calling `on_change` when the set changed; keeps the last known set while reads fail."""

    def __init__(self, connect_kwargs: Mapping[str, Any], promotions: Promotions,
                 on_change: Callable[[], None], *, name: str,
                 wanted: Callable[[], bool] = lambda: True, refresh_s: float = REFRESH_S,
                 timeout_s: float = TIMEOUT_S, logger: logging.Logger = log) -> None:
        self._connect_kwargs = dict(connect_kwargs)
        self.promotions = promotions
        self._on_change = on_change
        self._name = name
        self._wanted = wanted
        self._refresh_s = refresh_s
        self._timeout_s = timeout_s
        self._rate_log = RateLimitedLog(logger)
        self._conn: asyncpg.Connection | None = None
        self._changed = asyncio.Event()

    async def refresh(self) -> None:
        """Read the table once."""
        try:
            if self._conn is None or self._conn.is_closed():
                self._conn = await asyncpg.connect(
                    **self._connect_kwargs, timeout=self._timeout_s,
                    server_settings={"application_name": f"{self._name} promotions"})
                await self._conn.add_listener(CHANNEL, self._notified)
            self._changed.clear()
            rows = await self._conn.fetch(PROMOTED_QUERY, timeout=self._timeout_s)
        except READ_ERRORS as exc:
            self._rate_log.warning("read", "%s: cannot read promoted_metrics (%s); keeping "
                                   "the last known promotions", self._name, exc)
            await self.close()
            return
        self._rate_log.forget("read")
        if self.promotions.update((r["device_id"], r["metric_id"]) for r in rows):
            self._on_change()

    def _notified(self, *_args: object) -> None:
        self._changed.set()

    async def run(self) -> None:
        """Refresh now (when wanted), then every `refresh_s` or on notice; cancel to stop."""
        try:
            while True:
                if self._wanted():
                    await self.refresh()
                with contextlib.suppress(TimeoutError):  # not wait_for: see Scheduler._run
                    async with asyncio.timeout(self._refresh_s):
                        await self._changed.wait()
        finally:
            await self.close()

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.terminate()
