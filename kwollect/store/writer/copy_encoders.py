"""The two binary COPY encoders: a `Batch` as the COPY data PostgreSQL reads.

`samples_copy` writes (ts, value, series_id) rows for ``kwollect.samples``; hand-encoding
them with one `struct.pack` per row costs a sixth of the client CPU of asyncpg's record
encoder (benchmarks/writer_throughput.py --compare-encoders).  `ReferenceEncoder` writes
(timestamp, device_id, metric_id, value, labels) rows for a reference Kwollect database's
`metrics` table, caching each series' encoded fields.

Both raise one of `batching.ENCODE_ERRORS` for a row they cannot encode (a timestamp that is not an
integer in range, a value that is not a float); see `Batch.invalid_rows`.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence

from kwollect.store.writer.batching import Batch
from kwollect.store.writer.series import Identity

PG_EPOCH_US = 946_684_800_000_000  # 2000-01-01, the origin of binary timestamps
HEADER = b"PGCOPY\n\xff\r\n\x00" + struct.pack(">ii", 0, 0)
TRAILER = struct.pack(">h", -1)
_ROW = struct.Struct(">hiqidii")  # 3 fields: (len 8, ts), (len 8, value), (len 4, series id)
_REF_HEAD = struct.Struct(">hiq")  # reference rows: 5 fields, then (len 8, timestamp)
_REF_VALUE = struct.Struct(">id")

SAMPLES_COLUMNS = ["ts", "value", "series_id"]
REFERENCE_COLUMNS = ["timestamp", "device_id", "metric_id", "value", "labels"]


def samples_copy(batch: Batch, sids: Sequence[int | None]) -> bytes:
    """COPY data of the batch for kwollect.samples; `sids` maps handles to series ids."""
    pack = _ROW.pack
    parts = [HEADER]
    parts += [pack(3, 8, t - PG_EPOCH_US, 8, v, 4, sids[h])
              for t, v, h in zip(batch.ts, batch.values, batch.handles, strict=True)]
    parts.append(TRAILER)
    return b"".join(parts)


class ReferenceEncoder:
    """COPY data for a reference database's `metrics` table."""

    def __init__(self, identity_of: Callable[[int], Identity]) -> None:
        self._identity_of = identity_of
        self._fields: dict[int, tuple[bytes, bytes]] = {}

    def __call__(self, batch: Batch) -> bytes:
        fields = self._fields
        parts = [HEADER]
        for t, v, h in zip(batch.ts, batch.values, batch.handles, strict=True):
            identity = fields.get(h)
            if identity is None:
                device_id, metric_id, labels = (x.encode() for x in self._identity_of(h))
                identity = fields[h] = (
                    struct.pack(">i", len(device_id)) + device_id
                    + struct.pack(">i", len(metric_id)) + metric_id,
                    struct.pack(">ib", len(labels) + 1, 1) + labels)  # jsonb: version 1
            parts += [_REF_HEAD.pack(5, 8, t - PG_EPOCH_US), identity[0],
                      _REF_VALUE.pack(8, v), identity[1]]
        parts.append(TRAILER)
        return b"".join(parts)
