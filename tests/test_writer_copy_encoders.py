"""The two binary COPY encoders: what PostgreSQL reads from them, byte for byte and through a
real COPY into tables of the same columns."""

from __future__ import annotations

import json
import logging
import math
import struct
import uuid

import pytest

from kwollect.logutil import RateLimitedLog
from kwollect.model import Reading
from kwollect.store.writer import Batch, us_to_datetime
from kwollect.store.writer.batching import ENCODE_ERRORS
from kwollect.store.writer.copy_encoders import (
    HEADER,
    PG_EPOCH_US,
    REFERENCE_COLUMNS,
    SAMPLES_COLUMNS,
    TRAILER,
    ReferenceEncoder,
    samples_copy,
)
from kwollect.store.writer.series import SeriesCache

T0 = 1_767_225_600_000_000  # 2026-01-01 00:00:00 UTC
_log = logging.getLogger("test")


def batch_and_series(rows: list[Reading]) -> tuple[Batch, SeriesCache]:
    series = SeriesCache("test", _log, RateLimitedLog(_log))
    batch = Batch(uuid.uuid4(), [r.timestamp_us for r in rows], [r.value for r in rows],
                  series.handles_of(rows))
    return batch, series


def parse_copy(data: bytes) -> list[list[bytes | None]]:
    """Rows of binary COPY data, each a list of raw fields (None for NULL)."""
    assert data.startswith(HEADER) and data.endswith(TRAILER)
    pos, rows = len(HEADER), []
    while pos < len(data) - len(TRAILER):
        (count,) = struct.unpack_from(">h", data, pos)
        pos += 2
        fields: list[bytes | None] = []
        for _ in range(count):
            (length,) = struct.unpack_from(">i", data, pos)
            pos += 4
            fields.append(None if length < 0 else data[pos:pos + length])
            pos += max(length, 0)
        rows.append(fields)
    assert pos == len(data) - len(TRAILER)
    return rows


ROWS = [Reading(T0, "node-1", "power", 12.5, {"psu": 1}),
        Reading(T0 + 1, "node-2", "power", -0.0, {}),
        Reading(PG_EPOCH_US - 1, "node-1", "power", math.inf, {"psu": 1})]


def test_samples_rows_hold_the_timestamp_from_2000_the_value_and_the_series_id():
    batch, series = batch_and_series(ROWS)
    sids = [100 + h for h in range(len(series.identities))]
    rows = parse_copy(samples_copy(batch, sids))
    assert [len(row) for row in rows] == [3, 3, 3]
    decoded = [(struct.unpack(">q", ts)[0], struct.unpack(">d", v)[0], struct.unpack(">i", s)[0])
               for ts, v, s in rows]
    assert decoded == [(T0 - PG_EPOCH_US, 12.5, 100), (T0 + 1 - PG_EPOCH_US, -0.0, 101),
                       (-1, math.inf, 100)]


def test_reference_rows_carry_the_identity_and_labels_as_jsonb_version_1():
    batch, series = batch_and_series(ROWS)
    rows = parse_copy(ReferenceEncoder(series.identities.__getitem__)(batch))
    assert [len(row) for row in rows] == [5, 5, 5]
    ts, device, metric, value, labels = rows[0]
    assert struct.unpack(">q", ts) == (T0 - PG_EPOCH_US,)
    assert (device, metric, struct.unpack(">d", value)) == (b"node-1", b"power", (12.5,))
    assert labels[:1] == b"\x01" and json.loads(labels[1:]) == {"psu": 1}
    assert rows[1][4] == b"\x01{}"


def test_a_timestamp_that_is_not_an_integer_cannot_be_encoded():
    batch, series = batch_and_series(ROWS)
    batch.ts[1] = T0 + 0.5
    with pytest.raises(ENCODE_ERRORS):
        samples_copy(batch, [1, 2])
    with pytest.raises(ENCODE_ERRORS):
        ReferenceEncoder(series.identities.__getitem__)(batch)


async def test_postgresql_reads_both_encodings_back_as_the_readings(admin):
    batch, series = batch_and_series(ROWS)
    async with admin.transaction():
        await admin.execute("CREATE TEMP TABLE enc_samples (ts timestamptz, value float8, "
                            "series_id integer) ON COMMIT DROP")
        await admin.execute("CREATE TEMP TABLE enc_reference (timestamp timestamptz, "
                            "device_id text, metric_id text, value float8, labels jsonb) "
                            "ON COMMIT DROP")
        await admin.copy_to_table("enc_samples", source=memoryview(samples_copy(batch, [7, 8])),
                                  columns=SAMPLES_COLUMNS, format="binary")
        encoder = ReferenceEncoder(series.identities.__getitem__)
        await admin.copy_to_table("enc_reference", source=memoryview(encoder(batch)),
                                  columns=REFERENCE_COLUMNS, format="binary")
        samples = await admin.fetch("SELECT ts, value, series_id FROM enc_samples")
        reference = await admin.fetch("SELECT timestamp, device_id, metric_id, value, "
                                      "labels::text FROM enc_reference")
    expected_ts = [us_to_datetime(r.timestamp_us) for r in ROWS]
    assert [tuple(r) for r in samples] == [(expected_ts[0], 12.5, 7), (expected_ts[1], -0.0, 8),
                                          (expected_ts[2], math.inf, 7)]
    assert [tuple(r) for r in reference] == [
        (expected_ts[0], "node-1", "power", 12.5, '{"psu": 1}'),
        (expected_ts[1], "node-2", "power", -0.0, "{}"),
        (expected_ts[2], "node-1", "power", math.inf, '{"psu": 1}')]
