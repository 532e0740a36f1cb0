"""`kwollector-wattmetre`: OmegaWatt `wattmetre-read` lines on stdin -> the kwollect database.

    wattmetre-read /dev/ttyUSB0 42 20 | kwollector-wattmetre /etc/kwollect/wattmetre-1.conf

Options (YAML file given as first argument, or ``--name value``): the reference's
`wattmetre_id`, `wattmetre_version` (2 or 3), `mapping_file_path`, `db_host`, `db_port`,
`db_name`, `db_user`, `db_password` (better: `db_password_file`), `log_level`, and the
writer's `spool_dir` (default: systemd's $STATE_DIRECTORY, else
~/.local/state/kwollect/kwollector-wattmetre-<wattmetre_id>-<config name>; `none`: memory
only), `spool_max_mb`,
`queue_max_rows`, `batch_max_rows`, `flush_interval_s`, `db_pool_size`, `retry_max_s`,
`close_timeout_s`.

Stdin is read asynchronously; lines go through `kwollect.protocols.wattmetre.WattmetreAggregator`
(raw samples for promoted ports, 1 Hz means otherwise) and the readings through the shared
`kwollect.store.writer.Writer`, which spools them to disk while the database is away: an outage
never stops the reader.  About every second `promoted_metrics` is read again (the last
known promotions are kept while that fails); a row promotes a port when its device_id is
the port's node (from the mapping file) or the port itself, and its metric_id regular
expression matches all of ``wattmetre_power_watt`` (NULL matches every metric).

At end of input (or SIGTERM/SIGINT) the last, partial second is flushed, the writer
delivers what it holds (or leaves it in the spool), and the program exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import signal
import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, cast

from kwollect.collect.promotion import PromotionReader, Promotions
from kwollect.logutil import RateLimitedLog
from kwollect.options import OptionError, positive_int, tool_options
from kwollect.protocols.wattmetre import METRIC_ID, VERSIONS, WattmetreAggregator, load_mapping
from kwollect.store.dbconn import DB_DEFAULTS, connect_kwargs
from kwollect.store.writer import WRITER_DEFAULTS, Writer, WriterOptions

log = logging.getLogger("kwollect.protocols.wattmetre")

DEFAULTS: dict[str, Any] = {
    "wattmetre_id": "wattmetre",
    "wattmetre_version": 2,
    "mapping_file_path": "",
    **DB_DEFAULTS,
    "log_level": "warning",
    **WRITER_DEFAULTS,
}
STATS_EVERY_S = 300.0
CHUNK_BYTES = 1 << 16
MAX_LINE_BYTES = 1 << 16
GATHER_S = 0.1


def promoted_devices(rows: Iterable[tuple[str | None, str | None]]) -> frozenset[str]:
    """Device ids promoted for `METRIC_ID` by these promoted_metrics rows (the shared rule
    of `kwollect.collect.promotion`); a regex that does not compile is skipped and logged."""
    promotions = Promotions()
    promotions.update(rows)
    return promotions.devices_promoting(METRIC_ID)


def promotion_reader(conf: dict[str, Any], wattmetre_id: str,
                     aggregator: WattmetreAggregator) -> PromotionReader:
    """The shared reader of promoted_metrics, applying each change to the aggregator."""
    promotions = Promotions()
    current: frozenset[str] = frozenset()

    def apply() -> None:
        nonlocal current
        devices = promotions.devices_promoting(METRIC_ID)
        if devices != current:
            current = devices
            log.info("promoted for %s: %s", METRIC_ID, ", ".join(sorted(devices)) or "none")
            aggregator.set_promoted(devices)

    return PromotionReader(connect_kwargs(conf), promotions, apply,
                           name=f"kwollector-wattmetre[{wattmetre_id}]", logger=log)


class StdinSource:
    """stdin in chunks: an asyncio pipe reader for pipes, ttys and sockets, a worker thread
    for regular files (e.g. a replayed capture)."""

    def __init__(self) -> None:
        self._reader: asyncio.StreamReader | None = None
        self._transport: asyncio.ReadTransport | None = None

    async def open(self) -> StdinSource:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=CHUNK_BYTES, loop=loop)
        try:
            self._transport, _ = await loop.connect_read_pipe(
                lambda: asyncio.StreamReaderProtocol(reader, loop=loop), sys.stdin.buffer)
        except ValueError:  # a regular file
            return self
        self._reader = reader
        return self

    async def read(self) -> bytes:
        """The next chunk; b"" at end of input."""
        if self._reader is None:
            stream = cast(io.BufferedReader, sys.stdin.buffer)  # read1: whatever is there
            return await asyncio.get_running_loop().run_in_executor(None, stream.read1,
                                                                    CHUNK_BYTES)
        return await self._reader.read(CHUNK_BYTES)

    async def gather(self) -> None:
        """Stop reading for a moment, so the lines written meanwhile are read at once: one
        wake-up per GATHER_S instead of one per line (50 per second) saves most of the CPU
        of a paced input."""
        if self._transport is None:
            return
        self._transport.pause_reading()
        try:
            await asyncio.sleep(GATHER_S)
        finally:
            self._transport.resume_reading()


async def pump(source: StdinSource, aggregator: WattmetreAggregator, writer: Writer) -> None:
    """Feed every complete line of the input to the aggregator, its readings to the writer."""
    feed = aggregator.feed_line
    submit = writer.submit
    rate_log = RateLimitedLog(log)
    rest = b""
    while chunk := await source.read():
        data = rest + chunk if rest else chunk
        end = data.rfind(b"\n")
        if end < 0:
            rest = data
            if len(rest) > MAX_LINE_BYTES:
                rate_log.warning("long", "wattmetre %s: skipped %d bytes without a line end",
                                 aggregator.wattmetre_id, len(rest))
                aggregator.malformed += 1
                rest = b""
            continue
        rest = data[end + 1:]
        out = []
        for line in data[:end].decode("utf-8", "replace").split("\n"):
            out += feed(line)
        if out:
            submit(out)
        if len(chunk) < CHUNK_BYTES // 2:  # not backlogged
            await source.gather()
    if rest.strip():
        submit(feed(rest.decode("utf-8", "replace")))


def _summary(aggregator: WattmetreAggregator, writer: Writer) -> str:
    counts = aggregator.counters()
    stats = writer.stats()
    return (f"{counts['lines']} lines, {counts['frames']} frames, {counts['malformed']} "
            f"malformed, {counts['not_ok']} not OK, {counts['readings']} readings; writer: "
            f"{stats['inserted']} inserted, {stats['spooled']} spooled, {stats['dropped']} "
            f"dropped, {stats['queue_rows']} queued, {stats['spool_batches']} batch(es) in "
            f"the spool")


async def _report(aggregator: WattmetreAggregator, writer: Writer) -> None:
    while True:
        await asyncio.sleep(STATS_EVERY_S)
        log.info("wattmetre %s: %s", aggregator.wattmetre_id, _summary(aggregator, writer))


async def run(conf: dict[str, Any], mapping: Mapping[str, str]) -> int:
    wattmetre_id = conf["wattmetre_id"]
    aggregator = WattmetreAggregator(wattmetre_id, conf["wattmetre_version"], mapping,
                                     logger=log)
    options = WriterOptions.from_conf(conf, f"kwollector-wattmetre-{wattmetre_id}")
    if options.spool_dir is None:
        log.warning("wattmetre %s: no spool (spool_dir: none): during a database outage "
                    "readings are kept in memory only (up to %d rows)", wattmetre_id,
                    options.queue_max_rows)
    writer = Writer(connect_kwargs(conf), options, name=f"kwollector-wattmetre[{wattmetre_id}]")
    await writer.start()
    watcher = promotion_reader(conf, wattmetre_id, aggregator)
    await watcher.refresh()  # start with the right promotions when the database answers
    background = [asyncio.create_task(watcher.run()),
                  asyncio.create_task(_report(aggregator, writer))]
    reading = asyncio.create_task(pump(await StdinSource().open(), aggregator, writer))
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, reading.cancel)
    try:
        with contextlib.suppress(asyncio.CancelledError):
            await reading
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        await watcher.close()
        writer.submit(aggregator.flush())
        await writer.close(float(conf["close_timeout_s"]))
    counts = aggregator.counters()
    level = logging.WARNING if counts["malformed"] or writer.stats()["dropped"] else logging.INFO
    log.log(level, "wattmetre %s: end of input: %s", wattmetre_id, _summary(aggregator, writer))
    return 0


def _check(conf: dict[str, Any]) -> None:
    if conf["wattmetre_version"] not in VERSIONS:
        raise OptionError(f"wattmetre_version must be 2 or 3, got {conf['wattmetre_version']!r}")
    if not isinstance(conf["wattmetre_id"], str) or not conf["wattmetre_id"]:
        raise OptionError("wattmetre_id must be a non-empty string")
    for key in ("queue_max_rows", "batch_max_rows", "db_pool_size"):
        positive_int(conf, key)


def main(argv: Sequence[str] | None = None) -> int:
    conf = tool_options("kwollector-wattmetre", DEFAULTS, argv, _check, description=__doc__)
    if conf is None:
        return 2
    try:
        mapping = load_mapping(conf["mapping_file_path"]) if conf["mapping_file_path"] else {}
    except ValueError as exc:
        print(f"kwollector-wattmetre: {exc}", file=sys.stderr)
        return 2
    try:
        return asyncio.run(run(conf, mapping))
    except OSError as exc:  # e.g. the spool directory cannot be used
        print(f"kwollector-wattmetre: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
