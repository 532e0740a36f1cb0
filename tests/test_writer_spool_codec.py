"""The spool record codec on its own, without PostgreSQL: a batch written by one process
reads back whole in another, whose series handles differ."""

from __future__ import annotations

import logging
import math
import uuid

import pytest

from kwollect.logutil import RateLimitedLog
from kwollect.model import Reading
from kwollect.store.writer import Batch
from kwollect.store.writer.batching import ENCODE_ERRORS
from kwollect.store.writer.series import SeriesCache
from kwollect.store.writer.spool_codec import DECODE_ERRORS, decode_record, encode_record

T0 = 1_767_225_600_000_000
_log = logging.getLogger("test")


def cache() -> SeriesCache:
    return SeriesCache("test", _log, RateLimitedLog(_log))


def batch_of(series: SeriesCache, rows: list[Reading]) -> Batch:
    return Batch(uuid.uuid4(), [r.timestamp_us for r in rows], [r.value for r in rows],
                 series.handles_of(rows))


def test_a_record_reads_back_with_the_same_id_rows_and_series_in_another_process():
    writer_side = cache()
    writer_side.handle_for("unrelated", "m", "{}")  # handles differ between processes
    rows = [Reading(T0 + i, f"dev-{i % 3}", "power", i * 1.5, {"outlet": i % 2, "é": "ü"})
            for i in range(10)]
    rows.append(Reading(-62_135_596_800_000_000, "dev-0", "power", math.inf, {}))
    batch = batch_of(writer_side, rows)
    record = encode_record(batch, writer_side.identities.__getitem__)

    reader_side = cache()
    back = decode_record(record, reader_side.handle_for, ref="the-ref")
    assert back.batch_id == batch.batch_id and back.ref == "the-ref"
    assert back.ts == batch.ts and back.values == batch.values
    assert back.lo == batch.lo and back.hi == batch.hi
    assert [reader_side.identities[h] for h in back.handles] == \
        [writer_side.identities[h] for h in batch.handles]
    assert reader_side.identities[back.handles[0]] == \
        ("dev-0", "power", '{"outlet":0,"é":"ü"}')


def test_an_empty_batch_round_trips():
    series = cache()
    batch = Batch(uuid.uuid4(), [], [], [])
    back = decode_record(encode_record(batch, series.identities.__getitem__), series.handle_for)
    assert len(back) == 0 and back.batch_id == batch.batch_id


def test_a_record_cut_short_is_refused_not_read_as_fewer_rows():
    series = cache()
    batch = batch_of(series, [Reading(T0 + i, "d", "m", 1.0, {}) for i in range(5)])
    record = encode_record(batch, series.identities.__getitem__)
    for cut in (len(record) - 1, len(record) - 21, 10):
        with pytest.raises(DECODE_ERRORS):
            decode_record(record[:cut], cache().handle_for)


def test_a_row_naming_a_series_the_record_does_not_carry_is_refused():
    series = cache()
    record = encode_record(batch_of(series, [Reading(T0, "d", "m", 1.0, {})]),
                           series.identities.__getitem__)
    tampered = record[:-4] + (7).to_bytes(4, "little")  # the last row's handle: 7
    with pytest.raises(DECODE_ERRORS):
        decode_record(tampered, cache().handle_for)


def test_a_value_that_is_not_a_float_cannot_be_encoded_until_cleaned():
    series = cache()
    batch = batch_of(series, [Reading(T0, "d", "m", 1.0, {}), Reading(T0 + 1, "d", "m", 2.0, {})])
    batch.values[1] = "2"
    with pytest.raises(ENCODE_ERRORS):
        encode_record(batch, series.identities.__getitem__)
    assert batch.invalid_rows() == [1]
