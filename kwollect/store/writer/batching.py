"""Queue and batching: submitted readings -> batches of at most `batch_max_rows` rows.

`BatchQueue.add` only appends to a list (it is on the pollers' hot path); `cut` turns what is
pending into `Batch`es, columns of (timestamp, value, series handle) with the uuid that
makes retries idempotent.  Rows that cannot be stored (not a 5-field reading, a timestamp
that is not an integer in range, a value that is not a number, an identity PostgreSQL would
refuse) are dropped there, counted and logged, so they never hold back a batch.

Memory: about 150 bytes per queued row.
"""

from __future__ import annotations

import struct
import uuid
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from operator import itemgetter
from typing import Any

from kwollect.logutil import RateLimitedLog
from kwollect.model import Reading
from kwollect.store.writer.faults import Drops
from kwollect.store.writer.series import REJECTED, SeriesCache

MIN_US = -62_135_596_800_000_000  # 0001-01-01: what the partition helpers can be given
MAX_US = 253_402_300_800_000_000  # 10000-01-01
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
ENCODE_ERRORS = (TypeError, OverflowError, struct.error)
"""What the COPY and spool encoders raise for a row they cannot encode: see
`Batch.invalid_rows`."""
_ts_of = itemgetter(0)
_value_of = itemgetter(3)


def us_to_datetime(us: int) -> datetime:
    return _EPOCH + timedelta(microseconds=us)


def datetime_to_us(value: datetime) -> int:
    return (value - _EPOCH) // timedelta(microseconds=1)


class Batch:
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

    def invalid_rows(self) -> list[int]:
        """Coerce in place what an encoder can take (an integral float timestamp, a value
        that converts to float); the indices of the rows that cannot be encoded."""
        bad = []
        ts: Any  # what a caller submitted: may be a float, or not a number at all
        value: Any
        for i, (ts, value) in enumerate(zip(self.ts, self.values, strict=True)):
            if isinstance(ts, float) and ts.is_integer():
                self.ts[i] = ts = int(ts)
            ok = type(ts) is int and MIN_US <= ts < MAX_US
            if ok and type(value) is not float:
                try:
                    if isinstance(value, str | bytes):
                        raise TypeError
                    self.values[i] = float(value)
                except (TypeError, ValueError, OverflowError):
                    ok = False
            if not ok:
                bad.append(i)
        return bad


class BatchQueue:
    """Readings not yet cut into batches, batches waiting for a sender, and the rows in
    flight: together, what `queue_max_rows` bounds."""

    def __init__(self, batch_rows: int, series: SeriesCache, drops: Drops,
                 rate_log: RateLimitedLog, name: str) -> None:
        self.batch_rows = batch_rows
        self.pending: list[Reading] = []
        self.ready: deque[Batch] = deque()
        self.ready_rows = 0
        self.retry: deque[Batch] = deque()  # spool batches that failed in this process
        self.inflight_rows = 0
        self._series = series
        self._drops = drops
        self._rate_log = rate_log
        self._name = name

    @property
    def rows(self) -> int:
        return len(self.pending) + self.ready_rows + self.inflight_rows

    def push(self, batch: Batch) -> None:
        self.ready.append(batch)
        self.ready_rows += len(batch)

    def push_front(self, batch: Batch) -> None:
        """A batch whose delivery was interrupted goes back to the head of its queue."""
        if batch.ref is not None:
            self.retry.appendleft(batch)
        else:
            self.ready.appendleft(batch)
            self.ready_rows += len(batch)

    def pop_ready(self) -> Batch:
        batch = self.ready.popleft()
        self.ready_rows -= len(batch)
        return batch

    def cut(self, full_only: bool) -> Iterator[Batch]:
        """Batches of the pending readings (only whole ones if `full_only`)."""
        rows = self.pending
        size = self.batch_rows
        end = len(rows) - len(rows) % size if full_only else len(rows)
        if not end:
            return
        self.pending = rows[end:]
        for start in range(0, end, size):
            batch = self._make_batch(rows[start:start + size])
            if batch is not None:
                yield batch

    def _make_batch(self, rows: list[Reading]) -> Batch | None:
        try:
            handles = self._series.handles_of(rows)
            batch = Batch(uuid.uuid4(), list(map(_ts_of, rows)), list(map(_value_of, rows)),
                          handles)
            if batch.lo < MIN_US or batch.hi >= MAX_US:
                raise ValueError("timestamp out of range")
        except (TypeError, ValueError, IndexError):
            rows = self._valid_rows(rows)
            if not rows:
                return None
            batch = Batch(uuid.uuid4(), list(map(_ts_of, rows)), list(map(_value_of, rows)),
                          self._series.handles_of(rows))
        if REJECTED in batch.handles:
            mask = [h != REJECTED for h in batch.handles]
            self._drops(len(mask) - sum(mask), "invalid device_id, metric_id or labels "
                                               "(see the log above)")
            batch.keep(mask)
            if not batch.ts:
                return None
        return batch

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
            self._drops(bad, "invalid readings (see the log above)")
        return good
