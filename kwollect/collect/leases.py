"""Failover of kwollectors through PostgreSQL: target groups leased with an expiry.

With `failover_groups: G`, the targets of a shared metrics.d are hashed into G groups
(`sharding.group_of`) and each kwollector polls the groups it leases through
`kwollect.lease_groups` (sql/095_collector_leases.sql), called every ttl/3.  No
coordinator of our own: the database is already what every kwollector must reach, and the
function serialises the callers with a transaction-level advisory lock.

Bounds (docs/scaling.md): a dead kwollector's groups are claimed by the others at most
ttl + ttl/3 after its last renewal, plus the time to start the groups' first poll.  A
kwollector that cannot renew stops polling its groups when its lease may have expired
(ttl after it sent its last successful call, which precedes the database's now()), before
anyone may claim them: no group is polled by two kwollectors at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import asyncpg

from kwollect.logutil import RateLimitedLog

log = logging.getLogger("kwollect.collect.leases")

SAFETY = 0.9
"""A kwollector stops polling its groups at 90 % of the ttl after it sent the renewal that
the database stamped: a margin for the two clocks' rates and the event loop's delays."""


class LeaseKeeper:
    """Keeps this kwollector's leases; calls `changed(groups)` whenever they change."""

    def __init__(self, connect_kwargs: dict, holder: str, groups: int, ttl_s: float,
                 changed: Callable[[frozenset[int]], None]) -> None:
        self._connect_kwargs = connect_kwargs
        self.holder = holder
        self.groups = groups
        self.ttl_s = ttl_s
        self._changed = changed
        self.held: frozenset[int] = frozenset()
        self._valid_until = 0.0
        self._conn: asyncpg.Connection | None = None
        self._faults = RateLimitedLog(log, 60)

    @property
    def every_s(self) -> float:
        return self.ttl_s / 3

    def _set(self, held: frozenset[int]) -> None:
        if held != self.held:
            log.warning("leases of %s: %d of %d target groups held (%s)", self.holder,
                        len(held), self.groups, ",".join(map(str, sorted(held))) or "none")
            self.held = held
            self._changed(held)

    async def renew(self) -> None:
        """One call to the database; on failure the leases are kept until they may expire."""
        sent = time.monotonic()
        try:
            if self._conn is None or self._conn.is_closed():
                self._conn = await asyncpg.connect(**self._connect_kwargs,
                                                   timeout=self.every_s)
            groups = await self._conn.fetchval(
                "SELECT kwollect.lease_groups($1, $2, $3)", self.holder, self.groups,
                self.ttl_s, timeout=self.every_s)
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            self._faults.error("renew", "cannot renew the leases of %s: %s", self.holder,
                               exc or type(exc).__name__)
            await self._drop_connection()
            self.expire_if_due()
            return
        self._faults.forget("renew")
        self._valid_until = sent + self.ttl_s * SAFETY
        self._set(frozenset(groups))

    def expire_if_due(self) -> None:
        """Stop polling every group once its lease may have expired unrenewed."""
        if self.held and time.monotonic() >= self._valid_until:
            log.error("leases of %s may have expired: polling none of its groups until "
                      "the database answers", self.holder)
            self._set(frozenset())

    async def _drop_connection(self) -> None:
        if self._conn is not None:
            self._conn.terminate()
            self._conn = None

    async def run(self) -> None:
        try:
            while True:
                started = time.monotonic()
                self.expire_if_due()
                await self.renew()
                # wake up in time to stop polling before an unrenewed lease may expire
                wait = self.every_s - (time.monotonic() - started)
                if self.held:
                    wait = min(wait, self._valid_until - time.monotonic())
                await asyncio.sleep(max(wait, 0.05))
        finally:
            await self._drop_connection()
