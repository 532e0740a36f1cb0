"""Spool record codec: a `Batch` as the bytes of one spool record, and back.

A record carries its own series identities, so it replays in a later process whose handles
differ: header (batch id, rows, series), then per distinct series its handle and the UTF-8
device_id, metric_id and labels, then the three columns as raw arrays (timestamps int64,
values float64, handles uint32), little-endian whatever the machine: 20 bytes per row
plus the series.
"""

from __future__ import annotations

import struct
import sys
import uuid
from array import array
from collections.abc import Callable
from typing import Any

from kwollect.store.writer.batching import Batch
from kwollect.store.writer.series import Identity

_HEAD = struct.Struct("<16sII")  # batch id, rows, series
_SERIES = struct.Struct("<IIII")  # handle, then the lengths of device, metric, labels
_BIG_ENDIAN = sys.byteorder == "big"
ROW_BYTES = 8 + 8 + 4

DECODE_ERRORS = (ValueError, KeyError, struct.error)
"""What `decode_record` raises for a record that is not one it wrote."""


def encode_record(batch: Batch, identity_of: Callable[[int], Identity]) -> bytes:
    distinct = set(batch.handles)
    ts = array("q", batch.ts)
    values = array("d", batch.values)
    handles = array("I", batch.handles)
    if _BIG_ENDIAN:
        for column in (ts, values, handles):
            column.byteswap()
    parts = [_HEAD.pack(batch.batch_id.bytes, len(ts), len(distinct))]
    for handle in distinct:
        device_id, metric_id, labels = (text.encode() for text in identity_of(handle))
        parts += [_SERIES.pack(handle, len(device_id), len(metric_id), len(labels)),
                  device_id, metric_id, labels]
    parts += [ts.tobytes(), values.tobytes(), handles.tobytes()]
    return b"".join(parts)


def row_count(payload: bytes, length: int) -> int | None:
    """The rows a record of `length` bytes says it holds, read from what is left of its
    payload; None when the header is gone or the count cannot fit in `length` bytes."""
    if len(payload) < _HEAD.size:
        return None
    _, nrows, nseries = _HEAD.unpack_from(payload)
    if _HEAD.size + nseries * _SERIES.size + nrows * ROW_BYTES > length:
        return None
    return nrows


def decode_record(payload: bytes, handle_for: Callable[[str, str, str], int],
                  ref: Any = None) -> Batch:
    """The batch of a record, its series mapped to this process's handles by `handle_for`."""
    raw_id, nrows, nseries = _HEAD.unpack_from(payload)
    pos = _HEAD.size
    remap: dict[int, int] = {}
    for _ in range(nseries):
        handle, *lengths = _SERIES.unpack_from(payload, pos)
        pos += _SERIES.size
        texts = []
        for length in lengths:
            texts.append(payload[pos:pos + length].decode())
            pos += length
        remap[handle] = handle_for(*texts)
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
    return Batch(uuid.UUID(bytes=raw_id), ts.tolist(), values.tolist(),
                 list(map(remap.__getitem__, handles)), ref)
