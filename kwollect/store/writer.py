"""The lossless write path every collector shares: readings -> batched binary COPY.

`Writer.submit` only appends readings to an in-memory list (it is on the pollers' hot path),
so collection never waits for the database.  A flusher cuts the list into batches (every
`flush_interval_s`, or as soon as `batch_max_rows` are waiting) and `pool_size` senders,
each with its own connection, write them:

- series ids come from ``kwollect.series_ids`` once per (device_id, metric_id, labels) and
  are cached; rows go as hand-encoded binary COPY of (ts, value, series_id) straight into
  ``kwollect.samples`` (a sixth of the client CPU of asyncpg's record encoder, see
  benchmarks/writer_throughput.py --compare-encoders);
- partitions the writer has not seen for a batch's time range are created first with
  ``kwollect.ensure_partitions``; if that fails, rows go to the default partition;
- each batch has a uuid, recorded in ``kwollect.written_batches`` in the COPY's own
  transaction, together with ``kwollect.mark_late``.  The batch id is inserted first with
  ON CONFLICT DO NOTHING, so a batch whose COMMIT outcome was lost (connection broken) and
  is sent again is recognised and skipped: retries never duplicate samples.

When the database is unreachable or slow, batches go to an on-disk spool (`kwollect.store.spool`,
bounded, surviving restarts) and are replayed in order once it answers; while the spool is
not empty, new batches queue behind it.  Nothing is lost silently: rows refused (spool
full, invalid readings) are counted in `stats()` and logged at a limited rate.

Memory: about 150 bytes per queued row, and about 300 bytes per distinct series ever seen
(the series cache is never shrunk).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import random
import struct
import sys
import time
import uuid
from array import array
from bisect import bisect_right
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from operator import itemgetter
from pathlib import Path
from typing import Any

import asyncpg
import orjson

from kwollect.logutil import RateLimitedLog
from kwollect.model import Reading
from kwollect.store.spool import Spool

log = logging.getLogger(__name__)

WRITER_DEFAULTS: dict[str, Any] = {
    "spool_dir": "",
    "spool_max_mb": 1024,
    "queue_max_rows": 200_000,
    "batch_max_rows": 10_000,
    "flush_interval_s": 1.0,
    "db_pool_size": 2,
    "retry_max_s": 30.0,
    "close_timeout_s": 20.0,
    "db_schema": "kwollect",
}
"""Option names and defaults for the collectors' command lines: `WriterOptions.from_conf`
reads them (spool_max_mb in MiB, db_pool_size = pool_size); close_timeout_s is what the
collector gives `Writer.close` when it stops."""


@dataclass(frozen=True)
class WriterOptions:
    """Tunables of a `Writer`.

    queue_max_rows: rows kept in memory (about 150 bytes each) before batches spill to the
        spool (or, without a spool, are dropped and counted).
    batch_max_rows: rows per COPY; larger batches cost fewer transactions.
    flush_interval_s: the longest a submitted reading waits before its batch is cut.
    pool_size: concurrent connections (one COPY each).
    spool_dir: where batches wait while the database is unreachable; None: memory only.
    spool_max_bytes: bound of the spool on disk (about 20 bytes per row plus the series).
    retry_min_s / retry_max_s: reconnection back-off, doubling from min to max.
    fsync_interval_s: how often spool appends are made durable.
    db_schema: "kwollect" (series + samples, the default) or "reference": plain COPY of
        (timestamp, device_id, metric_id, value, labels) into a reference Kwollect
        database's `metrics` table, for sites that migrate their collectors first and for
        the side-by-side benchmark against the reference collector.  That table has no
        batch ids: a batch whose commit outcome was lost may be written twice.
    connect_timeout_s / command_timeout_s: bounds of one connection attempt / statement.
    """

    queue_max_rows: int = 200_000
    batch_max_rows: int = 10_000
    flush_interval_s: float = 1.0
    pool_size: int = 2
    spool_dir: str | Path | None = None
    spool_max_bytes: int = 1 << 30
    retry_min_s: float = 0.2
    retry_max_s: float = 30.0
    fsync_interval_s: float = 1.0
    connect_timeout_s: float = 10.0
    command_timeout_s: float = 60.0
    db_schema: str = "kwollect"

    @classmethod
    def from_conf(cls, conf: Mapping[str, Any]) -> WriterOptions:
        """From `WRITER_DEFAULTS`-style options.

        An empty spool_dir means systemd's StateDirectory ($STATE_DIRECTORY) when set, else
        no spool (rows are kept in memory only, up to queue_max_rows).
        """
        spool_dir = conf.get("spool_dir") or os.environ.get("STATE_DIRECTORY", "").split(":")[0]
        return cls(queue_max_rows=int(conf["queue_max_rows"]),
                   batch_max_rows=int(conf["batch_max_rows"]),
                   flush_interval_s=float(conf["flush_interval_s"]),
                   pool_size=int(conf["db_pool_size"]),
                   spool_dir=spool_dir or None,
                   spool_max_bytes=int(float(conf["spool_max_mb"]) * (1 << 20)),
                   retry_max_s=float(conf["retry_max_s"]),
                   db_schema=str(conf.get("db_schema", "kwollect")))


PG_EPOCH_US = 946_684_800_000_000  # 2000-01-01, the origin of binary timestamps
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
MIN_US = -62_135_596_800_000_000  # 0001-01-01: what the partition helpers can be given
MAX_US = 253_402_300_800_000_000  # 10000-01-01
_ROW = struct.Struct(">hiqidii")  # 3 fields: (len 8, ts), (len 8, value), (len 4, series id)
_REF_HEAD = struct.Struct(">hiq")  # reference rows: 5 fields, then (len 8, timestamp)
_REF_VALUE = struct.Struct(">id")
_COPY_HEADER = b"PGCOPY\n\xff\r\n\x00" + struct.pack(">ii", 0, 0)
_COPY_TRAILER = struct.pack(">h", -1)
_SPOOL_HEAD = struct.Struct("<16sII")  # batch id, rows, series
_SPOOL_SERIES = struct.Struct("<IIII")  # handle, then the lengths of device, metric, labels
_BIG_ENDIAN = sys.byteorder == "big"
_FAST_CACHE_MAX = 200_000
_DROP_LOG_INTERVAL_S = 60.0
_REJECTED = -1
_DATA_SQLSTATE_CLASSES = ("22", "23", "54")
_ts_of = itemgetter(0)
_value_of = itemgetter(3)

_MARK_SQL = """
WITH fresh AS (INSERT INTO kwollect.written_batches (batch_id) VALUES ($1)
               ON CONFLICT DO NOTHING RETURNING 1)
SELECT (SELECT count(*) FROM fresh), kwollect.mark_late($2, $3)
"""
_SERIES_SQL = "SELECT kwollect.series_ids($1::text[], $2::text[], $3::jsonb[])"
_PARTITIONS_SQL = "SELECT range_start, range_end FROM kwollect.partitions ORDER BY range_start"
_CHUNK_SQL = "SELECT kwollect.setting('chunk_interval_hour')"
_ENSURE_SQL = "SELECT kwollect.ensure_partitions($1::timestamptz[])"


def us_to_datetime(us: int) -> datetime:
    return _EPOCH + timedelta(microseconds=us)


def datetime_to_us(value: datetime) -> int:
    return (value - _EPOCH) // timedelta(microseconds=1)


def _is_data_error(exc: BaseException) -> bool:
    """True for errors caused by the data sent (retrying cannot help), not by the link."""
    if isinstance(exc, asyncpg.PostgresError):
        return str(exc.sqlstate)[:2] in _DATA_SQLSTATE_CLASSES
    return isinstance(exc, asyncpg.InterfaceError) and isinstance(exc, ValueError)


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if text != type(exc).__name__ else text


def _identity(device_id: Any, metric_id: Any, labels: Any) -> tuple[str, str, str]:
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


class _Batch:
    """Rows as columns, with the id that makes retries idempotent."""

    __slots__ = ("batch_id", "ts", "values", "handles", "lo", "hi", "ref")

    def __init__(self, batch_id: uuid.UUID, ts: list[int], values: list[float],
                 handles: list[int], ref: Any = None) -> None:
        self.batch_id = batch_id
        self.ts = ts
        self.values = values
        self.handles = handles
        self.lo = min(ts) if ts else 0
        self.hi = max(ts) if ts else 0
        self.ref = ref  # SpoolRef when the batch was read from the spool

    def __len__(self) -> int:
        return len(self.ts)

    def keep(self, mask: Sequence[bool]) -> None:
        self.ts = [t for t, ok in zip(self.ts, mask, strict=True) if ok]
        self.values = [v for v, ok in zip(self.values, mask, strict=True) if ok]
        self.handles = [h for h, ok in zip(self.handles, mask, strict=True) if ok]
        self.lo = min(self.ts) if self.ts else 0
        self.hi = max(self.ts) if self.ts else 0


class _AlreadyWritten(Exception):
    """The batch id is in kwollect.written_batches: an earlier attempt committed."""


class Writer:
    """Bounded queue -> batched binary COPY on a small pool, spooling when the DB is away.

    Use from one event loop: ``await start()``, then `submit` from the pollers, then
    ``await close(timeout)``.  See the module docstring for the guarantees.
    """

    def __init__(self, connect_kwargs: Mapping[str, Any], options: WriterOptions | None = None,
                 *, name: str = "kwollect-writer", logger: logging.Logger = log) -> None:
        self._connect_kwargs = dict(connect_kwargs)
        self._opts = opts = options or WriterOptions()
        if opts.batch_max_rows < 1 or opts.queue_max_rows < 1 or opts.pool_size < 1:
            raise ValueError("batch_max_rows, queue_max_rows and pool_size must be positive")
        if opts.db_schema not in ("kwollect", "reference"):
            raise ValueError(f"db_schema must be kwollect or reference, got {opts.db_schema!r}")
        self._reference = opts.db_schema == "reference"
        self._reference_fields: dict[int, tuple[bytes, bytes]] = {}
        self._name = name
        self._log = logger
        self._rate_log = RateLimitedLog(logger)
        self._batch_rows = opts.batch_max_rows
        self._queue_max = opts.queue_max_rows
        self._spool = (Spool(opts.spool_dir, opts.spool_max_bytes, logger)
                       if opts.spool_dir else None)
        # readings not yet cut into batches; batches waiting for a sender; in flight
        self._pending: list[Reading] = []
        self._ready: deque[_Batch] = deque()
        self._ready_rows = 0
        self._retry: deque[_Batch] = deque()  # spool batches that failed in this process
        self._inflight_rows = 0
        # series: (device, metric, id(labels)) -> handle -> identity / database id
        self._fast: dict[tuple[Any, Any, int], int] = {}
        self._fast_refs: list[object] = []  # keeps the labels alive, so their ids stay unique
        self._handles: dict[tuple[str, str, str], int] = {}
        self._identities: list[tuple[str, str, str]] = []
        self._sids: list[int | None] = []
        self._series_cached = 0
        # partitions known to exist, merged: sorted starts and their ends (µs)
        self._part_starts: list[int] = []
        self._part_ends: list[int] = []
        self._chunk_us: int | None = None
        self._partitions_retry_at = 0.0
        self._offline = False
        self._delay = opts.retry_min_s
        self._wake = asyncio.Event()
        self._work = asyncio.Event()
        self._retry_now = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False
        self._closed = False
        self._failed_while_closing = False
        self._counters = dict.fromkeys(
            ("submitted", "inserted", "replayed", "spooled", "dropped", "already_written",
             "batches", "series_lookups", "partitions_ensured"), 0)
        self._unreported_drops: dict[str, int] = {}
        self._drop_logged_at: dict[str, float] = {}
        self._last_error = ""
        self._copy_latency = 0.0
        self._copy_latency_avg = 0.0

    # --- public interface -------------------------------------------------------------

    async def start(self) -> None:
        """Open the spool (raises SpoolError if unusable) and start the background tasks.

        Does not touch the database: a database that is down at start is a normal outage.
        """
        if self._spool is not None:
            self._spool.open()
            if not self._spool.is_empty():
                self._log.warning("%s: %d batch(es), %d bytes left in the spool %s by an "
                                  "earlier run: replaying them first", self._name,
                                  self._spool.records, self._spool.size_bytes,
                                  self._spool.directory)
                self._work.set()
        self._tasks = [asyncio.create_task(self._flusher(), name=f"{self._name}-flusher")]
        self._tasks += [asyncio.create_task(self._sender(), name=f"{self._name}-sender-{i}")
                        for i in range(self._opts.pool_size)]

    def submit(self, readings: Iterable[Reading]) -> None:
        """Queue readings for writing.  Never blocks, never raises.

        The readings' label mappings must not be modified afterwards.
        """
        pending = self._pending
        before = len(pending)
        try:
            pending.extend(readings)
        except Exception as exc:  # a failing iterator: keep what it gave
            self._rate_log.error(("submit", type(exc)), "%s: submit() got a failing iterable "
                                 "(%s); kept the %d readings it gave", self._name,
                                 _describe(exc), len(pending) - before)
        size = len(pending)
        self._counters["submitted"] += size - before
        if self._closed:
            self._drop(size, "submitted after close()")
            pending.clear()
        elif size >= self._batch_rows:
            self._wake.set()
            if size > self._queue_max:  # the flusher did not get to run: cut now
                self._cut(full_only=False)

    async def close(self, timeout: float = 20.0) -> None:
        """Write what is queued, then stop; what the database did not take in `timeout`
        seconds (or at once if it is down) stays in the spool for the next run."""
        if self._closed or self._closing:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        self._closing = True
        self._cut(full_only=False)
        self._retry_now.set()  # senders waiting out a back-off try again now
        try:
            while loop.time() < deadline and self._busy():
                if self._offline and self._failed_while_closing and not self._ready:
                    break
                await asyncio.sleep(0.02)
        finally:
            self._closed = True
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            self._tasks = []
            self._cut(full_only=False)  # anything submitted meanwhile
            while self._ready:
                batch = self._ready.popleft()
                self._ready_rows -= len(batch)
                self._park(batch)
            if self._spool is not None:
                self._spool.close()
            stats = self.stats()
            level = logging.WARNING if stats["dropped"] else logging.INFO
            self._log.log(level, "%s closed: %d rows submitted, %d inserted (%d replayed), "
                          "%d spooled, %d dropped; the spool holds %d batch(es)", self._name,
                          stats["submitted"], stats["inserted"], stats["replayed"],
                          stats["spooled"], stats["dropped"], stats["spool_batches"])

    def stats(self) -> dict[str, Any]:
        """Counters (rows unless named otherwise) and gauges, for logs and monitoring."""
        spool = self._spool
        return {
            **self._counters,
            "queue_rows": len(self._pending) + self._ready_rows + self._inflight_rows,
            "spool_bytes": spool.size_bytes if spool else 0,
            "spool_batches": spool.records if spool else 0,
            "spool_corrupt_records": spool.corrupt_records if spool else 0,
            "series_cached": self._series_cached,
            "online": not self._offline,
            "last_error": self._last_error,
            "copy_latency_s": self._copy_latency,
            "copy_latency_avg_s": self._copy_latency_avg,
        }

    # --- batching ----------------------------------------------------------------------

    def _busy(self) -> bool:
        spool = self._spool
        return bool(self._pending or self._ready or self._inflight_rows or self._retry
                    or (spool is not None and not spool.is_empty()))

    async def _flusher(self) -> None:
        loop = asyncio.get_running_loop()
        interval = self._opts.flush_interval_s
        next_cut = loop.time() + interval
        next_sync = loop.time() + self._opts.fsync_interval_s
        while True:
            timeout = next_cut - loop.time()
            if timeout > 0:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(timeout):  # wait_for may swallow a cancel
                        await self._wake.wait()
            self._wake.clear()
            now = loop.time()
            try:
                self._cut(full_only=now < next_cut)
            except Exception:  # a bug: keep the flusher alive and say so
                self._log.exception("%s: unexpected error while batching", self._name)
            if now >= next_cut:
                next_cut = now + interval
            if self._spool is not None and now >= next_sync:
                next_sync = now + self._opts.fsync_interval_s
                job = self._spool.detach_sync()
                if job is not None:
                    try:
                        await asyncio.to_thread(job)
                    except OSError as exc:
                        self._rate_log.error("fsync", "%s: cannot sync the spool %s: %s",
                                             self._name, self._spool.directory, exc)

    def _cut(self, full_only: bool) -> None:
        """Turn pending readings into batches and route them (to senders or the spool)."""
        rows = self._pending
        size = self._batch_rows
        end = len(rows) - len(rows) % size if full_only else len(rows)
        if not end:
            return
        self._pending = rows[end:]
        for start in range(0, end, size):
            batch = self._make_batch(rows[start:start + size])
            if batch is not None:
                self._route(batch)

    def _route(self, batch: _Batch) -> None:
        rows = len(batch)
        queued = len(self._pending) + self._ready_rows + self._inflight_rows + rows
        spool = self._spool
        if spool is not None and (self._offline or self._retry or not spool.is_empty()
                                  or queued > self._queue_max):
            self._spill()
            self._to_spool(batch)
        elif spool is None and queued > self._queue_max:
            self._drop(rows, f"the memory queue is full ({self._queue_max} rows) and there "
                             "is no spool")
        else:
            self._ready.append(batch)
            self._ready_rows += rows
        self._work.set()

    def _spill(self) -> None:
        """Move the batches waiting in memory to the spool, in order."""
        while self._ready:
            batch = self._ready.popleft()
            self._ready_rows -= len(batch)
            self._to_spool(batch)

    def _make_batch(self, rows: list[Reading]) -> _Batch | None:
        try:
            handles = self._handles_of(rows)
            batch = _Batch(uuid.uuid4(), list(map(_ts_of, rows)), list(map(_value_of, rows)),
                           handles)
            if batch.lo < MIN_US or batch.hi >= MAX_US:
                raise ValueError("timestamp out of range")
        except (TypeError, ValueError, IndexError):
            rows = self._valid_rows(rows)
            if not rows:
                return None
            batch = _Batch(uuid.uuid4(), list(map(_ts_of, rows)), list(map(_value_of, rows)),
                           self._handles_of(rows))
        if _REJECTED in batch.handles:
            mask = [h != _REJECTED for h in batch.handles]
            self._drop(len(mask) - sum(mask), "invalid device_id, metric_id or labels "
                                              "(see the log above)")
            batch.keep(mask)
            if not batch.ts:
                return None
        return batch

    def _handles_of(self, rows: list[Reading]) -> list[int]:
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
            handle = self._handle_for(*_identity(device_id, metric_id, labels))
        except ValueError as exc:
            handle = _REJECTED
            self._rate_log.error(("identity", str(exc)[:60]), "%s: readings of %r / %r "
                                 "cannot be stored: %s", self._name, device_id, metric_id, exc)
        if len(self._fast) >= _FAST_CACHE_MAX:
            self._fast.clear()
            self._fast_refs.clear()
        self._fast[key] = handle
        self._fast_refs.append(labels)
        return handle

    def _handle_for(self, device_id: str, metric_id: str, labels: str) -> int:
        identity = (device_id, metric_id, labels)
        handle = self._handles.get(identity)
        if handle is None:
            handle = len(self._identities)
            self._handles[identity] = handle
            self._identities.append(identity)
            self._sids.append(None)
        return handle

    def _valid_rows(self, rows: Iterable[Any]) -> list[Reading]:
        """The rows that can be stored (a 5-field reading with an integer timestamp in
        range and a number as value); the others are counted as dropped and logged."""
        good: list[Reading] = []
        bad = 0
        for row in rows:
            try:
                ts, device_id, metric_id, value, labels = row
                if not isinstance(device_id, str) or not isinstance(metric_id, str):
                    raise TypeError(f"device_id and metric_id must be strings, got "
                                    f"{device_id!r:.60} and {metric_id!r:.60}")
                if isinstance(ts, float) and ts.is_integer():
                    ts = int(ts)
                if type(ts) is not int or not MIN_US <= ts < MAX_US:
                    raise ValueError(f"timestamp_us {ts!r} is not an integer in range")
                if isinstance(value, str | bytes):
                    raise ValueError(f"value {value!r:.40} is not a number")
                value = float(value)
            except (TypeError, ValueError, OverflowError) as exc:
                bad += 1
                self._rate_log.error(("reading", type(exc)), "%s: dropped an invalid reading "
                                     "%.200r: %s", self._name, row, exc)
                continue
            good.append(Reading(ts, device_id, metric_id, value, labels))
        if bad:
            self._drop(bad, "invalid readings (see the log above)")
        return good

    def _drop(self, rows: int, reason: str) -> None:
        """Count lost rows; log them at most once a minute per reason, with the count."""
        self._counters["dropped"] += rows
        unreported = self._unreported_drops.get(reason, 0) + rows
        now = time.monotonic()
        if now - self._drop_logged_at.get(reason, -math.inf) >= _DROP_LOG_INTERVAL_S:
            self._drop_logged_at[reason] = now
            self._log.error("%s: dropped %d row(s) (%d in all): %s", self._name, unreported,
                            self._counters["dropped"], reason)
            unreported = 0
        self._unreported_drops[reason] = unreported

    # --- spool ---------------------------------------------------------------------------

    def _to_spool(self, batch: _Batch) -> None:
        spool = self._spool
        assert spool is not None
        try:
            payload = self._encode_spool(batch)
        except (TypeError, OverflowError, struct.error):
            self._clean(batch)
            payload = self._encode_spool(batch)
        try:
            stored = spool.append(payload)
        except OSError as exc:
            self._drop(len(batch), f"cannot write the spool {spool.directory}: {exc}")
            return
        if stored:
            self._counters["spooled"] += len(batch)
        else:
            self._drop(len(batch), f"the spool {spool.directory} is full "
                                   f"({spool.max_bytes} bytes)")

    def _encode_spool(self, batch: _Batch) -> bytes:
        distinct = set(batch.handles)
        ts = array("q", batch.ts)
        values = array("d", batch.values)
        handles = array("I", batch.handles)
        if _BIG_ENDIAN:
            for column in (ts, values, handles):
                column.byteswap()
        parts = [_SPOOL_HEAD.pack(batch.batch_id.bytes, len(ts), len(distinct))]
        for handle in distinct:
            device_id, metric_id, labels = (text.encode() for text in self._identities[handle])
            parts += [_SPOOL_SERIES.pack(handle, len(device_id), len(metric_id), len(labels)),
                      device_id, metric_id, labels]
        parts += [ts.tobytes(), values.tobytes(), handles.tobytes()]
        return b"".join(parts)

    def _decode_spool(self, payload: bytes, ref: Any) -> _Batch:
        raw_id, nrows, nseries = _SPOOL_HEAD.unpack_from(payload)
        pos = _SPOOL_HEAD.size
        remap: dict[int, int] = {}
        for _ in range(nseries):
            handle, *lengths = _SPOOL_SERIES.unpack_from(payload, pos)
            pos += _SPOOL_SERIES.size
            texts = []
            for length in lengths:
                texts.append(payload[pos:pos + length].decode())
                pos += length
            remap[handle] = self._handle_for(*texts)
        columns: list[array[Any]] = []
        for code, width in (("q", 8), ("d", 8), ("I", 4)):
            column = array(code)
            column.frombytes(payload[pos:pos + width * nrows])
            if len(column) != nrows:
                raise ValueError(f"record holds {len(column)} of {nrows} rows")
            if _BIG_ENDIAN:
                column.byteswap()
            columns.append(column)
            pos += width * nrows
        ts, values, handles = columns
        return _Batch(uuid.UUID(bytes=raw_id), ts.tolist(), values.tolist(),
                      list(map(remap.__getitem__, handles)), ref)

    def _read_spool(self) -> _Batch | None:
        spool = self._spool
        while spool is not None:
            found = spool.read()
            if found is None:
                return None
            ref, payload = found
            try:
                return self._decode_spool(payload, ref)
            except (ValueError, KeyError, struct.error) as exc:
                self._log.error("%s: spool record in %s cannot be decoded (%s): skipped",
                                self._name, ref.segment.path, exc)
                spool.done(ref)
        return None

    # --- sending -------------------------------------------------------------------------

    async def _take(self) -> _Batch:
        while True:
            if self._retry:
                return self._retry.popleft()
            batch = self._read_spool()
            if batch is not None:
                return batch
            if self._ready:
                batch = self._ready.popleft()
                self._ready_rows -= len(batch)
                return batch
            self._work.clear()
            await self._work.wait()

    async def _sender(self) -> None:
        conn: asyncpg.Connection | None = None
        try:
            while True:
                try:
                    batch = await self._take()
                except (OSError, ValueError) as exc:  # the spool became unreadable
                    self._last_error = f"cannot read the spool: {_describe(exc)}"
                    self._rate_log.error("spool-read", "%s: %s", self._name, self._last_error)
                    await self._back_off()
                    continue
                rows = len(batch)
                self._inflight_rows += rows
                try:
                    if conn is None or conn.is_closed():
                        conn = await self._connect()
                    await self._deliver(conn, batch)
                except asyncio.CancelledError:
                    self._inflight_rows -= rows
                    if conn is not None:
                        conn.terminate()
                        conn = None
                    self._requeue(batch)
                    raise
                except Exception as exc:
                    self._inflight_rows -= rows
                    if conn is not None:
                        conn.terminate()  # state unknown: a fresh connection is simpler
                        conn = None
                    self._failed(batch, exc)
                    await self._back_off()
                else:
                    self._inflight_rows -= rows
        finally:
            if conn is not None:
                conn.terminate()

    async def _connect(self) -> asyncpg.Connection:
        kwargs = dict(self._connect_kwargs)
        kwargs["server_settings"] = {"application_name": self._name,
                                     **kwargs.get("server_settings", {})}
        return await asyncpg.connect(**kwargs, timeout=self._opts.connect_timeout_s)

    def _requeue(self, batch: _Batch) -> None:
        """A batch whose delivery was interrupted goes back to the head of its queue."""
        if batch.ref is not None:
            self._retry.appendleft(batch)
        else:
            self._ready.appendleft(batch)
            self._ready_rows += len(batch)
        self._work.set()

    def _park(self, batch: _Batch) -> None:
        """At close: a batch that was not written goes to the spool, or is dropped."""
        if batch.ref is not None:
            return  # still in the spool
        if self._spool is not None:
            self._to_spool(batch)
        else:
            self._drop(len(batch), "the database did not take it before close() and there "
                                   "is no spool")

    def _failed(self, batch: _Batch, exc: Exception) -> None:
        self._last_error = _describe(exc)
        if not isinstance(exc, OSError | asyncpg.PostgresError | asyncpg.InterfaceError
                          | TimeoutError | RuntimeError):
            self._log.error("%s: unexpected error writing batch %s", self._name,
                            batch.batch_id, exc_info=exc)
        if self._closing:
            self._failed_while_closing = True
        if _is_data_error(exc):
            self._log.error("%s: the database refused batch %s (%d rows): %s", self._name,
                            batch.batch_id, len(batch), self._last_error)
            self._drop(len(batch), "refused by the database")
            if batch.ref is not None and self._spool is not None:
                self._spool.done(batch.ref)
            return
        if not self._offline:
            self._offline = True
            where = "spooling" if self._spool is not None else "keeping rows in memory"
            self._log.warning("%s: database unavailable (%s); %s until it is back",
                              self._name, self._last_error, where)
        else:
            self._rate_log.warning("db-down", "%s: database still unavailable: %s",
                                   self._name, self._last_error)
        if batch.ref is None and self._spool is not None:
            self._to_spool(batch)  # the oldest of what waits in memory: first
            self._spill()
        else:
            self._requeue(batch)

    async def _back_off(self) -> None:
        delay = self._delay * random.uniform(0.5, 1.0)
        self._delay = min(self._delay * 2, self._opts.retry_max_s)
        if self._closing:  # close() waits for one more attempt, not for the back-off
            await asyncio.sleep(self._opts.retry_min_s)
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay):  # wait_for may swallow close()'s cancel
                await self._retry_now.wait()

    def _online(self) -> None:
        self._delay = self._opts.retry_min_s
        if self._offline:
            self._offline = False
            self._rate_log.forget("db-down")
            self._log.warning("%s: database available again%s", self._name,
                              "" if self._spool is None or self._spool.is_empty() else
                              f"; replaying {self._spool.records} spooled batch(es)")

    async def _deliver(self, conn: asyncpg.Connection, batch: _Batch) -> None:
        if self._reference:
            await self._deliver_reference(conn, batch)
            return
        timeout = self._opts.command_timeout_s
        sids = self._sids
        distinct = set(batch.handles)
        missing = [h for h in distinct if sids[h] is None]
        if missing:
            await self._resolve(conn, missing)
        if any(sids[h] == _REJECTED for h in distinct):
            mask = [sids[h] != _REJECTED for h in batch.handles]
            self._drop(len(mask) - sum(mask), "series refused by the database (see the log "
                                              "above)")
            batch.keep(mask)
        if batch.ts:
            await self._check_partitions(conn, batch)
            data = self._encode(batch, self._copy_data)
        if batch.ts:
            started = time.perf_counter()
            await conn.execute("BEGIN")
            fresh, _ = await conn.fetchrow(_MARK_SQL, batch.batch_id,
                                           us_to_datetime(batch.lo), us_to_datetime(batch.hi),
                                           timeout=timeout)
            if fresh:
                await conn.copy_to_table("samples", schema_name="kwollect",
                                         source=memoryview(data),  # bytes would be a path
                                         columns=["ts", "value", "series_id"],
                                         format="binary", timeout=timeout)
                await conn.execute("COMMIT")
                latency = time.perf_counter() - started
                self._copy_latency = latency
                self._copy_latency_avg += 0.1 * (latency - self._copy_latency_avg)
                self._counters["batches"] += 1
            else:
                await conn.execute("ROLLBACK")
                self._counters["already_written"] += len(batch)
                self._log.warning("%s: batch %s (%d rows) was already written (an earlier "
                                  "commit's outcome was lost): not sent again", self._name,
                                  batch.batch_id, len(batch))
        self._delivered(batch)

    async def _deliver_reference(self, conn: asyncpg.Connection, batch: _Batch) -> None:
        """One COPY into a reference database's plain `metrics` table."""
        if batch.ts:
            data = self._encode(batch, self._reference_copy_data)
            started = time.perf_counter()
            await conn.copy_to_table("metrics", source=memoryview(data),
                                     columns=["timestamp", "device_id", "metric_id", "value",
                                              "labels"],
                                     format="binary", timeout=self._opts.command_timeout_s)
            self._copy_latency = time.perf_counter() - started
            self._counters["batches"] += 1
        self._delivered(batch)

    def _delivered(self, batch: _Batch) -> None:
        """Count a batch that is in the database now, and release its spool record."""
        self._counters["inserted"] += len(batch)
        if batch.ref is not None:
            self._counters["replayed"] += len(batch)
            if self._spool is not None:
                self._spool.done(batch.ref)
        self._online()

    def _encode(self, batch: _Batch, encoder: Callable[[_Batch], bytes]) -> bytes:
        """COPY data of a batch; rows that cannot be encoded are dropped (counted) first."""
        try:
            return encoder(batch)
        except (TypeError, OverflowError, struct.error):
            self._clean(batch)
            return encoder(batch)

    def _reference_copy_data(self, batch: _Batch) -> bytes:
        fields = self._reference_fields
        parts = [_COPY_HEADER]
        for t, v, h in zip(batch.ts, batch.values, batch.handles, strict=True):
            identity = fields.get(h)
            if identity is None:
                device_id, metric_id, labels = (x.encode() for x in self._identities[h])
                identity = fields[h] = (
                    struct.pack(">i", len(device_id)) + device_id
                    + struct.pack(">i", len(metric_id)) + metric_id,
                    struct.pack(">ib", len(labels) + 1, 1) + labels)  # jsonb: version 1
            parts += [_REF_HEAD.pack(5, 8, t - PG_EPOCH_US), identity[0],
                      _REF_VALUE.pack(8, v), identity[1]]
        parts.append(_COPY_TRAILER)
        return b"".join(parts)

    def _copy_data(self, batch: _Batch) -> bytes:
        pack = _ROW.pack
        sids = self._sids
        parts = [_COPY_HEADER]
        parts += [pack(3, 8, t - PG_EPOCH_US, 8, v, 4, sids[h])
                  for t, v, h in zip(batch.ts, batch.values, batch.handles, strict=True)]
        parts.append(_COPY_TRAILER)
        return b"".join(parts)

    def _clean(self, batch: _Batch) -> None:
        """Drop the rows whose timestamp or value cannot be encoded (counted and logged)."""
        mask = []
        ts: Any  # what a caller submitted: may be a float, or not a number at all
        value: Any
        for i, (ts, value) in enumerate(zip(batch.ts, batch.values, strict=True)):
            if isinstance(ts, float) and ts.is_integer():
                batch.ts[i] = ts = int(ts)
            ok = type(ts) is int and MIN_US <= ts < MAX_US
            if ok and type(value) is not float:
                try:
                    if isinstance(value, str | bytes):
                        raise TypeError
                    batch.values[i] = float(value)
                except (TypeError, ValueError, OverflowError):
                    ok = False
            if not ok:
                device_id, metric_id, _ = self._identities[batch.handles[i]]
                self._rate_log.error(("reading", device_id, metric_id), "%s: dropped an "
                                     "invalid reading of %s / %s: timestamp %.40r, value "
                                     "%.40r", self._name, device_id, metric_id, ts, value)
            mask.append(ok)
        if not all(mask):
            self._drop(len(mask) - sum(mask), "invalid readings (see the log above)")
            batch.keep(mask)

    async def _resolve(self, conn: asyncpg.Connection, handles: list[int]) -> None:
        """Fetch (creating them if needed) the series ids of these handles."""
        identities = [self._identities[h] for h in handles]
        self._counters["series_lookups"] += 1
        try:
            sids = await conn.fetchval(_SERIES_SQL, *map(list, zip(*identities, strict=True)),
                                       timeout=self._opts.command_timeout_s)
        except Exception as exc:
            if not _is_data_error(exc):
                raise
            if len(handles) > 1:  # find the culprits one at a time
                for handle in handles:
                    await self._resolve(conn, [handle])
                return
            self._sids[handles[0]] = _REJECTED
            self._log.error("%s: the database refused the series %r: %s", self._name,
                            identities[0], _describe(exc))
            return
        if sids is None or len(sids) != len(handles) or None in sids:
            raise RuntimeError(f"kwollect.series_ids returned {len(sids or ())} ids for "
                               f"{len(handles)} series")
        for handle, sid in zip(handles, sids, strict=True):
            self._sids[handle] = sid
        self._series_cached += len(handles)

    # --- partitions ----------------------------------------------------------------------

    def _covered(self, lo: int, hi: int) -> bool:
        i = bisect_right(self._part_starts, lo) - 1
        return i >= 0 and hi < self._part_ends[i]

    async def _load_partitions(self, conn: asyncpg.Connection) -> None:
        timeout = self._opts.command_timeout_s
        if self._chunk_us is None:
            hours = await conn.fetchval(_CHUNK_SQL, timeout=timeout)
            try:
                self._chunk_us = max(1, int(hours)) * 3_600_000_000
            except (TypeError, ValueError):
                self._chunk_us = 3_600_000_000
        starts: list[int] = []
        ends: list[int] = []
        for start, end in await conn.fetch(_PARTITIONS_SQL, timeout=timeout):
            lo, hi = datetime_to_us(start), datetime_to_us(end)
            if ends and lo <= ends[-1]:
                ends[-1] = max(ends[-1], hi)
            else:
                starts.append(lo)
                ends.append(hi)
        self._part_starts, self._part_ends = starts, ends

    async def _check_partitions(self, conn: asyncpg.Connection, batch: _Batch) -> None:
        """Create the partitions this batch needs and the writer has not seen yet.

        Failures other than a lost connection (lock timeout, a storage without
        kwollect.partitions...) are logged and the batch goes on: rows without a partition
        land in the default one, and maintenance moves them.
        """
        if self._covered(batch.lo, batch.hi) or time.monotonic() < self._partitions_retry_at:
            return
        wanted: dict[int, int] = {}
        try:
            await self._load_partitions(conn)
            if self._covered(batch.lo, batch.hi):
                return
            chunk = self._chunk_us or 3_600_000_000
            for ts in batch.ts:
                if ts // chunk not in wanted and not self._covered(ts, ts):
                    wanted[ts // chunk] = ts
            await conn.fetchval(_ENSURE_SQL, [us_to_datetime(ts) for ts in wanted.values()],
                                timeout=self._opts.command_timeout_s)
            self._counters["partitions_ensured"] += len(wanted)
            await self._load_partitions(conn)
        except asyncpg.PostgresError as exc:
            if isinstance(exc, asyncpg.PostgresConnectionError):
                raise
            self._partitions_retry_at = time.monotonic() + 60
            self._rate_log.warning("partitions", "%s: cannot create partitions for %d time "
                                   "range(s) (%s); rows go to the default partition until "
                                   "maintenance moves them", self._name, len(wanted),
                                   _describe(exc))
