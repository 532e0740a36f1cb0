"""The writer's tunables, with their defaults written once: `WriterOptions` holds them and
`WRITER_DEFAULTS` (the collectors' command-line options) is derived from it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kwollect.options import CONFIG_FILE_KEY
from kwollect.store.spool import spool_directory

CLOSE_TIMEOUT_S = 20.0
"""How long `Writer.close` gives the database to take what is queued."""
CLOSE_OFFLINE_S = 1.0
"""At close during an outage: the longest wait for one more attempt to reach the database."""


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
    batch_timeout_s: bound of one batch's whole delivery (series look-up, partitions, BEGIN,
        COPY, COMMIT).  A link that hangs instead of failing (a firewall dropping packets,
        a dead switch) once kept BEGIN/COMMIT waiting forever, the writer "online" and the
        rows in memory; past this deadline the batch goes to the spool, the writer says it
        is offline and reconnects.  A normal 10,000-row batch takes about 50 ms.
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
    batch_timeout_s: float = 20.0
    db_schema: str = "kwollect"

    @classmethod
    def from_conf(cls, conf: Mapping[str, Any], program: str = "kwollector") -> WriterOptions:
        """From `WRITER_DEFAULTS`-style options.

        spool_dir as `kwollect.store.spool.spool_directory` reads it: empty is the default
        spool of `program` (lossless by default), ``none`` is memory only.
        """
        spool_dir = spool_directory(str(conf.get("spool_dir") or ""), program,
                                    str(conf.get(CONFIG_FILE_KEY) or ""))
        return cls(queue_max_rows=int(conf["queue_max_rows"]),
                   batch_max_rows=int(conf["batch_max_rows"]),
                   flush_interval_s=float(conf["flush_interval_s"]),
                   pool_size=int(conf["db_pool_size"]),
                   spool_dir=spool_dir,
                   spool_max_bytes=int(float(conf["spool_max_mb"]) * (1 << 20)),
                   retry_max_s=float(conf["retry_max_s"]),
                   batch_timeout_s=float(conf.get("db_batch_timeout_s",
                                                  _DEFAULT.batch_timeout_s)),
                   db_schema=str(conf.get("db_schema", _DEFAULT.db_schema)))


_DEFAULT = WriterOptions()

WRITER_DEFAULTS: dict[str, Any] = {
    "spool_dir": "",
    "spool_max_mb": _DEFAULT.spool_max_bytes >> 20,
    "queue_max_rows": _DEFAULT.queue_max_rows,
    "batch_max_rows": _DEFAULT.batch_max_rows,
    "flush_interval_s": _DEFAULT.flush_interval_s,
    "db_pool_size": _DEFAULT.pool_size,
    "retry_max_s": _DEFAULT.retry_max_s,
    "close_timeout_s": CLOSE_TIMEOUT_S,
    "db_batch_timeout_s": _DEFAULT.batch_timeout_s,
    "db_schema": _DEFAULT.db_schema,
}
"""Option names and defaults for the collectors' command lines: `WriterOptions.from_conf`
reads them (spool_max_mb in MiB, db_pool_size = pool_size, db_batch_timeout_s =
batch_timeout_s); close_timeout_s is what the
collector gives `Writer.close` when it stops."""
