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

Every batch's delivery (series look-up, partitions, BEGIN, COPY, COMMIT) has a deadline,
`batch_timeout_s`: a link that hangs instead of failing is an outage like any other.
When the database is unreachable or slow, batches go to an on-disk spool (`kwollect.store.spool`,
bounded, surviving restarts) and are replayed in order once it answers; while the spool is
not empty, new batches queue behind it.  Nothing is lost silently: every row lost (spool
full, invalid readings, refused series, spool records damaged on disk or undecodable) is
counted in `stats()["dropped"]` and logged at a limited rate, each drop in some line; a
spool record damaged beyond its row count is counted in ``spool_lost_records``.

Memory: about 150 bytes per queued row, and about 300 bytes per distinct series ever seen
(the series cache is never shrunk).

Modules, in the order a reading goes through them:
`options` (tunables and their defaults), `batching` (queue, batches, row validation),
`series` (series-id cache), `partitions` (partition cache), `copy_encoders` (the two binary
COPY encoders), `spool_codec` (a batch as a spool record), `faults` (error kinds, dropped
rows), `writer` (`Writer`: senders, spool, back-off, close).
"""

from kwollect.store.writer.batching import Batch, datetime_to_us, us_to_datetime
from kwollect.store.writer.options import CLOSE_TIMEOUT_S, WRITER_DEFAULTS, WriterOptions
from kwollect.store.writer.writer import Writer

__all__ = ["CLOSE_TIMEOUT_S", "WRITER_DEFAULTS", "Batch", "Writer", "WriterOptions",
           "datetime_to_us", "us_to_datetime"]
