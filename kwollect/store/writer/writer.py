"""`Writer`: the batches of the queue -> PostgreSQL on `pool_size` senders, exactly once,
through the spool while the database is away.  The package docstring tells the guarantees;
this module holds the sequencing (queue, spool, senders, back-off, close)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import asyncpg

from kwollect.errors import TargetTimeout
from kwollect.logutil import RateLimitedLog, excerpt
from kwollect.model import Reading
from kwollect.store.spool import Spool
from kwollect.store.writer.batching import ENCODE_ERRORS, Batch, BatchQueue, us_to_datetime
from kwollect.store.writer.copy_encoders import (
    REFERENCE_COLUMNS,
    SAMPLES_COLUMNS,
    ReferenceEncoder,
    samples_copy,
)
from kwollect.store.writer.faults import Drops, describe, is_data_error
from kwollect.store.writer.options import CLOSE_OFFLINE_S, CLOSE_TIMEOUT_S, WriterOptions
from kwollect.store.writer.partitions import PartitionCache
from kwollect.store.writer.series import REJECTED, SeriesCache
from kwollect.store.writer.spool_codec import (
    DECODE_ERRORS,
    decode_record,
    encode_record,
    row_count,
)

log = logging.getLogger("kwollect.store.writer")

_MARK_SQL = """
WITH fresh AS (INSERT INTO kwollect.written_batches (batch_id) VALUES ($1)
               ON CONFLICT DO NOTHING RETURNING 1)
SELECT (SELECT count(*) FROM fresh), kwollect.mark_late($2, $3)
"""


class Writer:
    """Bounded queue -> batched binary COPY on a small pool, spooling when the DB is away.

    Use from one event loop: ``await start()``, then `submit` from the pollers, then
    ``await close(timeout)``.  See the package docstring for the guarantees.
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
        self._name = name
        self._log = logger
        self._rate_log = RateLimitedLog(logger)
        self._queue_max = opts.queue_max_rows
        self._spool = (Spool(opts.spool_dir, opts.spool_max_bytes, logger,
                             on_damaged=self._damaged_record)
                       if opts.spool_dir else None)
        self._lost_records = 0
        """Spool records lost without a readable row count (their rows are not in
        `dropped`): damaged beyond their header."""
        self._drop = Drops(name, logger)
        self._series = SeriesCache(name, logger, self._rate_log)
        self._queue = BatchQueue(opts.batch_max_rows, self._series, self._drop,
                                 self._rate_log, name)
        self._partitions = PartitionCache(name, self._rate_log)
        self._reference_copy = ReferenceEncoder(self._series.identities.__getitem__)
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
            ("submitted", "inserted", "replayed", "spooled", "already_written", "batches"), 0)
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
        pending = self._queue.pending
        before = len(pending)
        try:
            pending.extend(readings)
        except Exception as exc:  # a failing iterator: keep what it gave
            self._rate_log.error(("submit", type(exc)), "%s: submit() got a failing iterable "
                                 "(%s); kept the %d readings it gave", self._name,
                                 describe(exc), len(pending) - before)
        size = len(pending)
        self._counters["submitted"] += size - before
        if self._closed:
            self._drop(size, "submitted after close()")
            pending.clear()
        elif size >= self._queue.batch_rows:
            self._wake.set()
            if size > self._queue_max:  # the flusher did not get to run: cut now
                self._cut(full_only=False)

    async def close(self, timeout: float = CLOSE_TIMEOUT_S) -> None:
        """Write what is queued, then stop; what the database did not take in `timeout`
        seconds stays in the spool for the next run (without a spool: dropped and counted).

        During an outage the stop is fast in every configuration: once the writer is
        offline, close() waits for one more failed attempt, at most CLOSE_OFFLINE_S, then
        parks what it holds (a kwollector stopped 10 s into an outage used to wait the
        whole 20 s with nothing polled)."""
        if self._closed or self._closing:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        self._closing = True
        self._cut(full_only=False)
        self._retry_now.set()  # senders waiting out a back-off try again now
        offline_deadline: float | None = None
        try:
            while loop.time() < deadline and self._busy():
                if self._offline:
                    if self._failed_while_closing:
                        break
                    if offline_deadline is None:
                        offline_deadline = loop.time() + CLOSE_OFFLINE_S
                    elif loop.time() >= offline_deadline:
                        break
                await asyncio.sleep(0.02)
        finally:
            self._closed = True
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            self._tasks = []
            self._cut(full_only=False)  # anything submitted meanwhile
            while self._queue.ready:
                self._park(self._queue.pop_ready())
            if self._spool is not None:
                self._spool.close()
            self._drop.report(force=True)
            stats = self.stats()
            level = logging.WARNING if stats["dropped"] else logging.INFO
            self._log.log(level, "%s closed: %d rows submitted, %d inserted (%d replayed), "
                          "%d spooled, %d dropped; the spool holds %d batch(es)", self._name,
                          stats["submitted"], stats["inserted"], stats["replayed"],
                          stats["spooled"], stats["dropped"], stats["spool_batches"])

    def stats(self) -> dict[str, Any]:
        """Counters (rows unless named otherwise) and gauges, for logs and monitoring."""
        spool = self._spool
        counters = self._counters
        return {
            "submitted": counters["submitted"],
            "inserted": counters["inserted"],
            "replayed": counters["replayed"],
            "spooled": counters["spooled"],
            "dropped": self._drop.count,
            "already_written": counters["already_written"],
            "batches": counters["batches"],
            "series_lookups": self._series.lookups,
            "partitions_ensured": self._partitions.ensured,
            "queue_rows": self._queue.rows,
            "spool_bytes": spool.size_bytes if spool else 0,
            "spool_batches": spool.records if spool else 0,
            "spool_corrupt_records": spool.corrupt_records if spool else 0,
            "spool_lost_records": self._lost_records + (spool.unreadable_records if spool
                                                        else 0),
            "series_cached": self._series.cached,
            "online": not self._offline,
            "last_error": self._last_error,
            "copy_latency_s": self._copy_latency,
            "copy_latency_avg_s": self._copy_latency_avg,
        }

    # --- batching: the queue, and where its batches go -----------------------------------

    def _busy(self) -> bool:
        spool = self._spool
        queue = self._queue
        return bool(queue.pending or queue.ready or queue.inflight_rows or queue.retry
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
                self._drop.report()
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
        for batch in self._queue.cut(full_only):
            self._route(batch)

    def _route(self, batch: Batch) -> None:
        rows = len(batch)
        queue = self._queue
        queued = queue.rows + rows
        spool = self._spool
        if spool is not None and (self._offline or queue.retry or not spool.is_empty()
                                  or queued > self._queue_max):
            self._spill()
            self._to_spool(batch)
        elif spool is None and queued > self._queue_max:
            self._drop(rows, f"the memory queue is full ({self._queue_max} rows) and there "
                             "is no spool")
        else:
            queue.push(batch)
        self._work.set()

    def _spill(self) -> None:
        """Move the batches waiting in memory to the spool, in order."""
        while self._queue.ready:
            self._to_spool(self._queue.pop_ready())

    def _requeue(self, batch: Batch) -> None:
        """A batch whose delivery was interrupted goes back to the head of its queue."""
        self._queue.push_front(batch)
        self._work.set()

    def _park(self, batch: Batch) -> None:
        """At close: a batch that was not written goes to the spool, or is dropped."""
        if batch.ref is not None:
            return  # still in the spool
        if self._spool is not None:
            self._to_spool(batch)
        else:
            self._drop(len(batch), "the database did not take it before close() and there "
                                   "is no spool")

    def _clean(self, batch: Batch) -> None:
        """Drop the rows whose timestamp or value cannot be encoded (counted and logged)."""
        bad = batch.invalid_rows()
        if not bad:
            return
        for i in bad:
            device_id, metric_id, _ = self._series.identities[batch.handles[i]]
            self._rate_log.error(("reading", device_id, metric_id), "%s: dropped an invalid "
                                 "reading of %s / %s: timestamp %.40r, value %.40r",
                                 self._name, device_id, metric_id, batch.ts[i],
                                 batch.values[i])
        self._drop(len(bad), "invalid readings (see the log above)")
        invalid = set(bad)
        batch.keep([i not in invalid for i in range(len(batch))])

    def _encode(self, batch: Batch, encoder: Callable[[Batch], bytes]) -> bytes:
        """Encoded batch; rows that cannot be encoded are dropped (counted) first."""
        try:
            return encoder(batch)
        except ENCODE_ERRORS:
            self._clean(batch)
            return encoder(batch)

    # --- spool ---------------------------------------------------------------------------

    def _to_spool(self, batch: Batch) -> None:
        spool = self._spool
        assert spool is not None
        payload = self._encode(batch, self._spool_record)
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

    def _spool_record(self, batch: Batch) -> bytes:
        return encode_record(batch, self._series.identities.__getitem__)

    def _read_spool(self) -> Batch | None:
        spool = self._spool
        while spool is not None:
            found = spool.read()
            if found is None:
                return None
            ref, payload = found
            try:
                return decode_record(payload, self._series.handle_for, ref)
            except DECODE_ERRORS as exc:
                self._log.error("%s: spool record in %s cannot be decoded (%s): skipped",
                                self._name, ref.segment.path, excerpt(exc))
                spool.done(ref)
                self._lost(row_count(payload, len(payload)), "a spool record that cannot be "
                                                             "decoded")
        return None

    def _damaged_record(self, payload: bytes, length: int) -> None:
        """A torn or corrupt spool record was skipped (the spool logged where)."""
        self._lost(row_count(payload, length), "a torn or corrupt spool record")

    def _lost(self, rows: int | None, what: str) -> None:
        if rows is None:
            self._lost_records += 1
            self._rate_log.error(("lost-record", what), "%s: %s held an unknown number of "
                                 "rows (%d such record(s) in all)", self._name, what,
                                 self._lost_records)
        else:
            self._drop(rows, what)

    # --- sending -------------------------------------------------------------------------

    async def _take(self) -> Batch:
        queue = self._queue
        while True:
            if queue.retry:
                return queue.retry.popleft()
            batch = self._read_spool()
            if batch is not None:
                return batch
            if queue.ready:
                return queue.pop_ready()
            self._work.clear()
            await self._work.wait()

    async def _sender(self) -> None:
        conn: asyncpg.Connection | None = None
        queue = self._queue
        try:
            while True:
                try:
                    batch = await self._take()
                except (OSError, ValueError) as exc:  # the spool became unreadable
                    self._last_error = f"cannot read the spool: {describe(exc)}"
                    self._rate_log.error("spool-read", "%s: %s", self._name, self._last_error)
                    await self._back_off()
                    continue
                rows = len(batch)
                queue.inflight_rows += rows
                try:
                    if conn is None or conn.is_closed():
                        conn = await self._connect()
                    await self._deliver_in_time(conn, batch)
                except asyncio.CancelledError:
                    queue.inflight_rows -= rows
                    if conn is not None:
                        conn.terminate()
                        conn = None
                    self._requeue(batch)
                    raise
                except Exception as exc:
                    queue.inflight_rows -= rows
                    if conn is not None:
                        conn.terminate()  # state unknown: a fresh connection is simpler
                        conn = None
                    self._failed(batch, exc)
                    await self._back_off()
                else:
                    queue.inflight_rows -= rows
        finally:
            if conn is not None:
                conn.terminate()

    async def _connect(self) -> asyncpg.Connection:
        kwargs = dict(self._connect_kwargs)
        kwargs["server_settings"] = {"application_name": self._name,
                                     **kwargs.get("server_settings", {})}
        return await asyncpg.connect(**kwargs, timeout=self._opts.connect_timeout_s)

    def _failed(self, batch: Batch, exc: Exception) -> None:
        self._last_error = describe(exc)
        if not isinstance(exc, OSError | asyncpg.PostgresError | asyncpg.InterfaceError
                          | TimeoutError | RuntimeError):
            self._log.error("%s: unexpected error writing batch %s", self._name,
                            batch.batch_id, exc_info=exc)
        if self._closing:
            self._failed_while_closing = True
        if is_data_error(exc):
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

    async def _deliver_in_time(self, conn: asyncpg.Connection, batch: Batch) -> None:
        """`_deliver` within batch_timeout_s: a hung link ends as a TargetTimeout."""
        limit = self._opts.batch_timeout_s
        try:
            async with asyncio.timeout(limit):
                await self._deliver(conn, batch)
        except TimeoutError as exc:
            raise TargetTimeout(f"no answer from the database within {limit:g} s "
                                "(db_batch_timeout_s): the link or the server hangs") from exc

    async def _deliver(self, conn: asyncpg.Connection, batch: Batch) -> None:
        if self._reference:
            await self._deliver_reference(conn, batch)
            return
        timeout = self._opts.command_timeout_s
        series = self._series
        distinct = set(batch.handles)
        missing = series.unresolved(distinct)
        if missing:
            await series.resolve(conn, missing, timeout)
        sids = series.sids
        if any(sids[h] == REJECTED for h in distinct):
            mask = [sids[h] != REJECTED for h in batch.handles]
            self._drop(len(mask) - sum(mask), "series refused by the database (see the log "
                                              "above)")
            batch.keep(mask)
        if batch.ts:
            await self._partitions.ensure(conn, batch, timeout)
            data = self._encode(batch, self._samples_copy)
        if batch.ts:
            started = time.perf_counter()
            await conn.execute("BEGIN")
            fresh, _ = await conn.fetchrow(_MARK_SQL, batch.batch_id,
                                           us_to_datetime(batch.lo), us_to_datetime(batch.hi),
                                           timeout=timeout)
            if fresh:
                await conn.copy_to_table("samples", schema_name="kwollect",
                                         source=memoryview(data),  # bytes would be a path
                                         columns=SAMPLES_COLUMNS,
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

    def _samples_copy(self, batch: Batch) -> bytes:
        return samples_copy(batch, self._series.sids)

    async def _deliver_reference(self, conn: asyncpg.Connection, batch: Batch) -> None:
        """One COPY into a reference database's plain `metrics` table."""
        if batch.ts:
            data = self._encode(batch, self._reference_copy)
            started = time.perf_counter()
            await conn.copy_to_table("metrics", source=memoryview(data),
                                     columns=REFERENCE_COLUMNS,
                                     format="binary", timeout=self._opts.command_timeout_s)
            self._copy_latency = time.perf_counter() - started
            self._counters["batches"] += 1
        self._delivered(batch)

    def _delivered(self, batch: Batch) -> None:
        """Count a batch that is in the database now, and release its spool record."""
        self._counters["inserted"] += len(batch)
        if batch.ref is not None:
            self._counters["replayed"] += len(batch)
            if self._spool is not None:
                self._spool.done(batch.ref)
        self._online()
