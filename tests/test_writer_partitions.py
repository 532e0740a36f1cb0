"""The partition cache: which time ranges it knows, and the partitions it creates for a batch
outside them (against the real kwollect.partitions)."""

from __future__ import annotations

import logging
import uuid
from datetime import UTC, datetime

import pytest

from kwollect.logutil import RateLimitedLog
from kwollect.store.writer import Batch, datetime_to_us
from kwollect.store.writer.partitions import PartitionCache, merge_ranges


@pytest.fixture(scope="module")
def kwdb(each_storage):
    """Every test here runs on each storage (stock and TimescaleDB: tests/fixtures/kwdb.py)."""
    return each_storage


_log = logging.getLogger("test")


def at(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


def test_touching_and_overlapping_ranges_merge_and_gaps_stay():
    starts, ends = merge_ranges([(at(2026, 1, 1), at(2026, 1, 2)), (at(2026, 1, 2), at(2026, 1, 3)),
                                 (at(2026, 1, 2, 12), at(2026, 1, 2, 18)),
                                 (at(2026, 2, 1), at(2026, 2, 2))])
    assert starts == [datetime_to_us(at(2026, 1, 1)), datetime_to_us(at(2026, 2, 1))]
    assert ends == [datetime_to_us(at(2026, 1, 3)), datetime_to_us(at(2026, 2, 2))]


def test_nothing_is_covered_before_the_partitions_are_loaded():
    cache = PartitionCache("test", RateLimitedLog(_log))
    assert not cache.covered(0, 0)


async def test_a_batch_outside_known_ranges_gets_its_partitions_once(writer):
    cache = PartitionCache("test", RateLimitedLog(_log))
    far = [datetime_to_us(at(1981, 3, 4, 5)), datetime_to_us(at(2081, 6, 7, 8)),
           datetime_to_us(at(2081, 6, 7, 8, 30))]
    batch = Batch(uuid.uuid4(), far, [1.0, 2.0, 3.0], [0, 0, 0])
    await cache.ensure(writer, batch, timeout=30)
    assert cache.covered(far[0], far[0]) and cache.covered(far[1], far[2])
    assert not cache.covered(batch.lo, batch.hi)  # 1981..2081 is not one partition
    created = cache.ensured
    assert created <= 2
    for ts in far:
        assert await writer.fetchval(
            "SELECT count(*) FROM kwollect.partitions WHERE range_start <= $1 AND $1 < range_end",
            datetime.fromtimestamp(ts / 1e6, UTC)) == 1
    await cache.ensure(writer, Batch(uuid.uuid4(), far[1:], [2.0, 3.0], [0, 0]), timeout=30)
    assert cache.ensured == created
