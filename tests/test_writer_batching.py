"""Queue and batching without a database: readings cut into batches of batch_max_rows, the
rows that cannot be stored dropped (counted and logged) without holding back the others."""

from __future__ import annotations

import logging
import math

from kwollect.logutil import RateLimitedLog
from kwollect.model import Reading
from kwollect.store.writer import Batch
from kwollect.store.writer.batching import MAX_US, MIN_US, BatchQueue
from kwollect.store.writer.faults import Drops
from kwollect.store.writer.series import SeriesCache

T0 = 1_767_225_600_000_000
_log = logging.getLogger("test")


def queue(batch_rows: int = 4) -> tuple[BatchQueue, Drops]:
    rate_log = RateLimitedLog(_log)
    drops = Drops("test", _log)
    return BatchQueue(batch_rows, SeriesCache("test", _log, rate_log), drops, rate_log,
                      "test"), drops


def readings(n: int) -> list[Reading]:
    return [Reading(T0 + i, "d", "m", float(i), {}) for i in range(n)]


def test_only_whole_batches_are_cut_until_the_flush_interval_is_up():
    q, _ = queue(4)
    q.pending.extend(readings(10))
    assert [len(b) for b in q.cut(full_only=True)] == [4, 4]
    assert len(q.pending) == 2
    rest = list(q.cut(full_only=False))
    assert [b.ts for b in rest] == [[T0 + 8, T0 + 9]] and not q.pending
    assert list(q.cut(full_only=False)) == []


def test_batches_carry_fresh_ids_and_their_time_range():
    q, _ = queue(3)
    q.pending.extend(readings(6))
    first, second = q.cut(full_only=False)
    assert first.batch_id != second.batch_id
    assert (first.lo, first.hi, second.lo, second.hi) == (T0, T0 + 2, T0 + 3, T0 + 5)
    assert first.values == [0.0, 1.0, 2.0]


def test_invalid_rows_are_dropped_counted_and_logged_and_the_rest_batched(caplog):
    q, drops = queue(100)
    q.pending.extend([
        Reading(T0, "d", "m", 1.0, {}),
        Reading(float(T0 + 1), "d", "m", 2, {}),  # integral float and int: coerced
        Reading(T0 + 2, "d", "m", "3", {}),  # a string is not a number
        Reading(MAX_US, "d", "m", 4.0, {}),  # out of range
        ("too", "short"),
        Reading(T0 + 5, "d", 5, 5.0, {}),  # metric_id not a string
        Reading(T0 + 6, "", "m", 6.0, {}),  # an identity PostgreSQL refuses
        Reading(T0 + 7, "d", "m", 7.0, {}),
    ])
    with caplog.at_level(logging.ERROR, logger="test"):
        (batch,) = q.cut(full_only=False)
    assert batch.ts == [T0, T0 + 1, T0 + 7] and batch.values == [1.0, 2.0, 7.0]
    assert type(batch.ts[1]) is int and type(batch.values[1]) is float
    assert drops.count == 5
    assert "dropped 4 row(s) (4 in all): invalid readings" in caplog.text
    assert "dropped 1 row(s) (5 in all): invalid device_id, metric_id or labels" in caplog.text


def test_a_batch_of_nothing_but_invalid_rows_is_not_cut():
    q, drops = queue(10)
    q.pending.extend([Reading(MIN_US - 1, "d", "m", 1.0, {}), Reading(T0, "", "m", 1.0, {})])
    assert list(q.cut(full_only=False)) == [] and drops.count == 2


def test_the_queue_counts_pending_ready_and_in_flight_rows_and_requeues_at_the_head():
    q, _ = queue(2)
    q.pending.extend(readings(5))
    first, second, third = q.cut(full_only=False)
    q.push(first)
    q.push(second)
    q.inflight_rows += len(third)
    q.pending.extend(readings(1))
    assert q.rows == 6
    taken = q.pop_ready()
    q.push_front(taken)
    assert q.pop_ready() is taken and q.ready_rows == 2
    replayed = Batch(third.batch_id, third.ts, third.values, third.handles, ref="spooled")
    q.push_front(replayed)
    assert q.retry[0] is replayed and q.ready_rows == 2


def test_invalid_rows_of_a_batch_are_coerced_where_possible_and_named_otherwise():
    q, _ = queue(10)
    q.pending.extend(readings(4))
    (batch,) = q.cut(full_only=False)
    batch.ts[0] = float(T0)
    batch.ts[1] = T0 + 0.5
    batch.values[2] = "x"
    batch.values[3] = True
    assert batch.invalid_rows() == [1, 2]
    assert batch.ts[0] == T0 and type(batch.ts[0]) is int and batch.values[3] == 1.0
    batch.keep([True, False, False, True])
    assert (batch.ts, batch.lo, batch.hi) == ([T0, T0 + 3], T0, T0 + 3)
    assert not math.isnan(batch.values[1])
