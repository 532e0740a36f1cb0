"""Series-id cache: (device_id, metric_id, labels) -> a handle -> the database's series id.

A handle is a small integer, dense and private to this process, that batches and spool
records carry instead of the identity; the database id (``kwollect.series_ids``, which
creates the series if needed) is looked up once per series and cached for good.  The hot
path hashes (device, metric, id(labels)): collectors share one labels mapping between the
readings of a metric, so serialising the labels happens once per mapping, not per reading.

Memory: about 300 bytes per distinct series ever seen (the cache is never shrunk).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import asyncpg
import orjson

from kwollect.logutil import RateLimitedLog, excerpt
from kwollect.model import Reading
from kwollect.store.writer.faults import describe, is_data_error

REJECTED = -1
"""The handle of a series that cannot be stored, and the id of one the database refused."""
FAST_CACHE_MAX = 200_000
_SERIES_SQL = "SELECT kwollect.series_ids($1::text[], $2::text[], $3::jsonb[])"

Identity = tuple[str, str, str]
"""(device_id, metric_id, labels as canonical JSON text)."""


def series_identity(device_id: Any, metric_id: Any, labels: Any) -> Identity:
    """The stored identity of a series; ValueError says why PostgreSQL would refuse it."""
    for name, text in (("device_id", device_id), ("metric_id", metric_id)):
        if not isinstance(text, str) or not text:
            raise ValueError(f"{name} {text!r} is not a non-empty string")
        if "\x00" in text:
            raise ValueError(f"{name} {text!r} contains a NUL character")
        text.encode()  # UnicodeEncodeError (a ValueError) for lone surrogates
    if not labels:
        return device_id, metric_id, "{}"
    try:
        if type(labels) is not dict:
            labels = dict(labels)
        text = orjson.dumps(labels, option=orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"labels {labels!r:.200} cannot be stored as JSON: {exc}") from None
    if b"\\u0000" in text:
        raise ValueError(f"labels {labels!r:.200} contain a NUL character")
    return device_id, metric_id, text.decode()


class SeriesCache:
    """Handles of the series seen by this process, and their database ids once resolved."""

    def __init__(self, name: str, logger: logging.Logger, rate_log: RateLimitedLog) -> None:
        self._name = name
        self._log = logger
        self._rate_log = rate_log
        self._fast: dict[tuple[Any, Any, int], int] = {}
        self._fast_refs: list[object] = []  # keeps the labels alive, so their ids stay unique
        self._handles: dict[Identity, int] = {}
        self.identities: list[Identity] = []
        """Handle -> identity."""
        self.sids: list[int | None] = []
        """Handle -> database series id; None until resolved, REJECTED if refused."""
        self.cached = 0
        self.lookups = 0

    def handles_of(self, rows: Sequence[Reading]) -> list[int]:
        """The handle of each reading's series (REJECTED where it cannot be stored)."""
        get = self._fast.get
        handles = [get((r[1], r[2], id(r[4]))) for r in rows]
        if None in handles:
            for i, handle in enumerate(handles):
                if handle is None:
                    row = rows[i]
                    handles[i] = self._handle_slow(row[1], row[2], row[4])
        return handles  # type: ignore[return-value]  # no None left

    def _handle_slow(self, device_id: Any, metric_id: Any, labels: Any) -> int:
        key = (device_id, metric_id, id(labels))
        handle = self._fast.get(key)
        if handle is not None:
            return handle
        try:
            handle = self.handle_for(*series_identity(device_id, metric_id, labels))
        except ValueError as exc:
            handle = REJECTED
            self._rate_log.error(("identity", str(exc)[:60]), "%s: readings of %s / %s "
                                 "cannot be stored: %s", self._name, excerpt(repr(device_id)),
                                 excerpt(repr(metric_id)), excerpt(exc))
        if len(self._fast) >= FAST_CACHE_MAX:
            self._fast.clear()
            self._fast_refs.clear()
        self._fast[key] = handle
        self._fast_refs.append(labels)
        return handle

    def handle_for(self, device_id: str, metric_id: str, labels: str) -> int:
        """The handle of a stored identity, given a new one the first time."""
        identity = (device_id, metric_id, labels)
        handle = self._handles.get(identity)
        if handle is None:
            handle = len(self.identities)
            self._handles[identity] = handle
            self.identities.append(identity)
            self.sids.append(None)
        return handle

    def unresolved(self, handles: set[int]) -> list[int]:
        sids = self.sids
        return [h for h in handles if sids[h] is None]

    async def resolve(self, conn: asyncpg.Connection, handles: list[int],
                      timeout: float) -> None:
        """Fetch (creating them if needed) the series ids of these handles.

        A series the database refuses (a data error) is marked REJECTED, found by asking
        for the series one at a time, so that it does not hold back the others.
        """
        identities = [self.identities[h] for h in handles]
        self.lookups += 1
        try:
            sids = await conn.fetchval(_SERIES_SQL, *map(list, zip(*identities, strict=True)),
                                       timeout=timeout)
        except Exception as exc:
            if not is_data_error(exc):
                raise
            if len(handles) > 1:  # find the culprits one at a time
                for handle in handles:
                    await self.resolve(conn, [handle], timeout)
                return
            self.sids[handles[0]] = REJECTED
            self._log.error("%s: the database refused the series %s: %s", self._name,
                            excerpt(repr(identities[0]), 300), excerpt(describe(exc), 300))
            return
        if sids is None or len(sids) != len(handles) or None in sids:
            raise RuntimeError(f"kwollect.series_ids returned {len(sids or ())} ids for "
                               f"{len(handles)} series")
        for handle, sid in zip(handles, sids, strict=True):
            self.sids[handle] = sid
        self.cached += len(handles)
