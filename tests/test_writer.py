"""The shared writer against the real PostgreSQL: exact storage, batching, outages, spool.

Outages are real: the shared cluster is stopped and restarted (always restarted, even when a
test fails), or the writer is pointed at a loopback port where nothing listens.  Device ids
start with ``wr-``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from kwollect.dev.simulators import free_port
from kwollect.dev.simulators.tcp_proxy import TcpProxy
from kwollect.model import Reading
from kwollect.store.spool import Spool, SpoolError
from kwollect.store.writer import Writer, WriterOptions, datetime_to_us, us_to_datetime

T0 = 1_767_225_600_000_000  # 2026-01-01 00:00:00 UTC, in µs
FAST = {"flush_interval_s": 0.05, "retry_min_s": 0.05, "retry_max_s": 0.3,
        "fsync_interval_s": 0.1}


def make_writer(kwargs: dict, **options) -> Writer:
    return Writer(kwargs, WriterOptions(**{**FAST, **options}))


def dead_kwargs(kwdb) -> dict:
    """Connection options of a database that is down: nothing listens on that port."""
    return {**kwdb.connect_kwargs("kwuser"), "port": free_port()}


def ensure_running(cluster) -> None:
    if not (cluster.datadir / "postmaster.pid").exists():
        cluster.start()


async def wait_until(predicate: Callable[[], bool], what: str, timeout: float = 30) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def readings(device: str, n: int, start: int = T0, step: int = 1000, labels=None,
             metric: str = "wr_metric") -> list[Reading]:
    labels = {} if labels is None else labels
    return [Reading(start + i * step, device, metric, float(i), labels) for i in range(n)]


async def stored(kwdb, device_like: str) -> list[tuple[str, str, str, int, float]]:
    """(device, metric, labels as text, ts in µs, value) of the stored rows, in order."""
    conn = await kwdb.connect("admin")
    try:
        rows = await conn.fetch(
            "SELECT se.device_id, se.metric_id, se.labels::text, s.ts, s.value "
            "FROM kwollect.samples s JOIN kwollect.series se USING (series_id) "
            "WHERE se.device_id LIKE $1 ORDER BY se.device_id, s.ts, s.value", device_like)
    finally:
        await conn.close()
    return [(r[0], r[1], r[2], datetime_to_us(r[3]), r[4]) for r in rows]


async def count(kwdb, device_like: str) -> tuple[int, int]:
    """(rows, distinct (series, ts)) stored for these devices."""
    conn = await kwdb.connect("admin")
    try:
        return tuple(await conn.fetchrow(
            "SELECT count(*), count(DISTINCT (s.series_id, s.ts)) FROM kwollect.samples s "
            "JOIN kwollect.series se USING (series_id) WHERE se.device_id LIKE $1",
            device_like))
    finally:
        await conn.close()


def segments(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.seg"))


# --- storage -----------------------------------------------------------------------------

async def test_values_timestamps_and_labels_stored_exactly(kwdb) -> None:
    labels = {"b": [1, 2], "a": "é ☃", "_device_alias": "wr-node-1"}
    rows = [
        Reading(T0 + 1, "wr-exact", "m", 1.5, labels),
        Reading(T0 + 999_999, "wr-exact", "m", math.nan, labels),
        Reading(T0 + 2_000_001, "wr-exact", "m", -0.0, {}),
        Reading(T0 + 3_000_002, "wr-exact", "m", 5e-324, {}),
        Reading(T0 + 4_000_003, "wr-exact", "m", 1.7976931348623157e308, {}),
        Reading(T0 + 5_000_004, "wr-exact", "m", math.inf, {}),
        Reading(T0 + 6_000_005, "wr-exact", "other", 0.1 + 0.2, {"n": 1}),
    ]
    writer = make_writer(kwdb.connect_kwargs("kwuser"))
    await writer.start()
    writer.submit(rows)
    await writer.close(timeout=30)
    got = await stored(kwdb, "wr-exact")
    assert [(r[1], r[3]) for r in got] == [(r.metric_id, r.timestamp_us) for r in rows]
    values = [r[4] for r in got]
    assert values[0] == 1.5 and math.isnan(values[1])
    assert math.copysign(1, values[2]) == -1 and values[2] == 0
    assert values[3:] == [5e-324, 1.7976931348623157e308, math.inf, 0.1 + 0.2]
    assert got[0][2] == '{"a": "é ☃", "b": [1, 2], "_device_alias": "wr-node-1"}'
    assert got[2][2] == "{}" and got[6][2] == '{"n": 1}'
    stats = writer.stats()
    assert stats["submitted"] == stats["inserted"] == 7
    assert stats["dropped"] == stats["spooled"] == stats["queue_rows"] == 0
    assert stats["batches"] == 1 and stats["copy_latency_s"] > 0


async def test_series_cache_and_label_order(kwdb) -> None:
    writer = make_writer(kwdb.connect_kwargs("kwuser"))
    await writer.start()
    writer.submit([Reading(T0, "wr-cache", "m", 1.0, {"x": 1, "y": 2})])
    await wait_until(lambda: writer.stats()["inserted"] == 1, "the first batch")
    assert writer.stats()["series_lookups"] == 1
    # same series: a new mapping with another key order, and many readings sharing one
    shared = {"y": 2, "x": 1}
    writer.submit([Reading(T0 + i, "wr-cache", "m", 2.0, shared) for i in range(1, 500)])
    await wait_until(lambda: writer.stats()["inserted"] == 500, "the second batch")
    assert writer.stats()["series_lookups"] == 1
    assert writer.stats()["series_cached"] >= 1
    await writer.close()
    conn = await kwdb.connect("admin")
    try:
        assert await conn.fetchval("SELECT count(*) FROM kwollect.series "
                                   "WHERE device_id = 'wr-cache'") == 1
    finally:
        await conn.close()


async def test_far_past_and_future_rows_get_partitions(kwdb) -> None:
    past = 157_766_400_000_000  # 1975-01-01
    future = 3_786_912_000_000_000  # 2090-01-01
    stamps = [past, past + 1, T0, future, future + 7_200_000_000]  # +2 h: same chunk
    rows = [Reading(ts, "wr-far", "m", float(i), {}) for i, ts in enumerate(stamps)]
    writer = make_writer(kwdb.connect_kwargs("kwuser"))
    await writer.start()
    writer.submit(rows)
    await writer.close(timeout=30)
    assert [r[3] for r in await stored(kwdb, "wr-far")] == [r.timestamp_us for r in rows]
    assert writer.stats()["partitions_ensured"] >= 2  # 1975 and 2090 (2026 may exist)
    conn = await kwdb.connect("admin")
    try:
        homes = await conn.fetch(
            "SELECT s.tableoid::regclass::text FROM kwollect.samples s "
            "JOIN kwollect.series se USING (series_id) WHERE se.device_id = 'wr-far'")
    finally:
        await conn.close()
    assert not [home for (home,) in homes if home.endswith("samples_default")]


async def test_batches_of_batch_max_rows(kwdb) -> None:
    writer = make_writer(kwdb.connect_kwargs("kwuser"), batch_max_rows=100)
    await writer.start()
    writer.submit(readings("wr-batch", 1050))
    await writer.close(timeout=30)
    assert writer.stats()["batches"] == 11
    assert await count(kwdb, "wr-batch") == (1050, 1050)


async def test_invalid_readings_dropped_counted_and_logged(kwdb, caplog) -> None:
    good = readings("wr-invalid", 3)
    bad = [
        Reading(float("nan"), "wr-invalid", "m", 1.0, {}),  # type: ignore[arg-type]
        Reading(None, "wr-invalid", "m", 1.0, {}),  # type: ignore[arg-type]
        Reading(T0 + 10, "wr-invalid", "m", "12", {}),  # type: ignore[arg-type]
        Reading(T0 + 11, "wr-invalid", "m", None, {}),  # type: ignore[arg-type]
        Reading(T0 + 12, "wr-invalid\x00", "m", 1.0, {}),
        Reading(T0 + 13, "", "m", 1.0, {}),
        Reading(T0 + 14, "wr-invalid", "m", 1.0, {"k": {1, 2}}),
        Reading(T0 + 15, "wr-invalid", "m", 1.0, {"k": "a\x00b"}),
        ("too", "short"),
    ]
    writer = make_writer(kwdb.connect_kwargs("kwuser"))
    await writer.start()
    with caplog.at_level(logging.ERROR, logger="kwollect.store.writer"):
        writer.submit(good[:1] + bad[:4] + good[1:2])  # type: ignore[operator]
        writer.submit(bad[4:] + good[2:])  # type: ignore[operator]
        writer.submit(Reading(T0 + 20 + i, "wr-invalid", "m", 1.0, {}) if i < 2 else 1 / 0
                      for i in range(5))
        # an integral float timestamp is a collector bug that loses nothing: it is kept
        writer.submit([Reading(float(T0 + 30), "wr-invalid", "m", 2, {})])  # type: ignore
        await writer.close(timeout=30)
    stats = writer.stats()
    assert stats["submitted"] == 3 + len(bad) + 2 + 1
    assert stats["dropped"] == len(bad)
    assert stats["inserted"] == 6
    got = await stored(kwdb, "wr-invalid%")
    assert [r[3] for r in got] == [T0, T0 + 20, T0 + 21, T0 + 30, T0 + 1000, T0 + 2000]
    assert got[3][4] == 2.0
    text = caplog.text
    assert "dropped" in text and "NUL" in text and "cannot be stored as JSON" in text
    assert "failing iterable" in text


async def test_series_refused_by_the_database_does_not_block_others(kwdb, caplog) -> None:
    huge = {"blob": os.urandom(3000).hex()}  # over the 2000-byte labels limit
    rows = readings("wr-refused-ok", 5) + readings("wr-refused-bad", 3, labels=huge)
    writer = make_writer(kwdb.connect_kwargs("kwuser"))
    await writer.start()
    with caplog.at_level(logging.ERROR, logger="kwollect.store.writer"):
        writer.submit(rows)
        await writer.close(timeout=30)
    assert await count(kwdb, "wr-refused-%") == (5, 5)
    assert writer.stats()["dropped"] == 3 and writer.stats()["inserted"] == 5
    assert "refused the series" in caplog.text


async def test_log_lines_about_a_huge_series_are_bounded(kwdb, caplog) -> None:
    """A series with a 1 MB label (and one with a 1 MB device id) is refused in one line
    of bounded length each, not logged in full."""
    rows = (readings("wr-huge-label", 2, labels={"blob": "x" * 1_000_000})
            + [Reading(T0, "wr-huge-" + "d" * 1_000_000, "m", 1.0, {})])
    writer = make_writer(kwdb.connect_kwargs("kwuser"))
    await writer.start()
    with caplog.at_level(logging.WARNING):
        writer.submit(rows)
        await writer.close(timeout=30)
    assert writer.stats()["dropped"] == 3
    assert caplog.text.count("refused the series") == 2
    assert max(len(r.getMessage()) for r in caplog.records) < 2000


# --- outages -----------------------------------------------------------------------------

async def test_database_down_at_start(kwdb, tmp_path) -> None:
    writer = make_writer(dead_kwargs(kwdb), spool_dir=tmp_path / "spool")
    await writer.start()
    writer.submit(readings("wr-downstart", 50))
    await wait_until(lambda: writer.stats()["spooled"] == 50, "the spool")
    stats = writer.stats()
    assert not stats["online"] and stats["last_error"]
    await writer.close(timeout=1)
    assert writer.stats()["spool_batches"] == 1


async def test_outage_while_submitting_loses_and_duplicates_nothing(kwdb, pg_cluster,
                                                                    tmp_path) -> None:
    writer = make_writer(kwdb.connect_kwargs("kwuser"), spool_dir=tmp_path / "spool",
                         batch_max_rows=150)
    await writer.start()
    try:
        for step in range(30):
            writer.submit(readings("wr-outage", 100, start=T0 + step * 100_000, step=1000))
            if step == 8:
                await asyncio.to_thread(pg_cluster.stop)
            elif step == 20:
                await asyncio.to_thread(pg_cluster.start)
            await asyncio.sleep(0.05)
    finally:
        await asyncio.to_thread(ensure_running, pg_cluster)
    await wait_until(lambda: writer.stats()["inserted"] == 3000, "the replay", timeout=60)
    await writer.close(timeout=30)
    stats = writer.stats()
    assert stats["spooled"] > 0 and stats["replayed"] > 0
    assert stats["dropped"] == 0 and stats["spool_batches"] == 0 and stats["online"]
    assert not segments(tmp_path / "spool")
    assert [r[3] for r in await stored(kwdb, "wr-outage")] == [T0 + i * 1000
                                                               for i in range(3000)]


async def test_writer_restarted_mid_outage_replays_in_order(kwdb, pg_cluster,
                                                            tmp_path) -> None:
    spool = tmp_path / "spool"
    await asyncio.to_thread(pg_cluster.stop)
    try:
        first = make_writer(kwdb.connect_kwargs("kwuser"), spool_dir=spool, batch_max_rows=100)
        await first.start()
        first.submit(readings("wr-restart", 500))
        await first.close(timeout=2)
        assert first.stats()["spooled"] == 500 and first.stats()["inserted"] == 0
        assert segments(spool)
        second = make_writer(kwdb.connect_kwargs("kwuser"), spool_dir=spool, pool_size=1,
                             batch_max_rows=100)
        await second.start()
        assert second.stats()["spool_batches"] == 5
        await asyncio.to_thread(pg_cluster.start)
    finally:
        await asyncio.to_thread(ensure_running, pg_cluster)
    second.submit(readings("wr-restart", 300, start=T0 + 10_000_000))
    await wait_until(lambda: second.stats()["inserted"] == 800, "the replay")
    await second.close(timeout=30)
    # the new rows queued behind the spool, so they went through it too
    assert second.stats()["replayed"] == 800 and not segments(spool)
    assert await count(kwdb, "wr-restart") == (800, 800)
    conn = await kwdb.connect("admin")
    try:  # one connection: the spooled rows were committed before the new ones
        old_max, new_min = await conn.fetchrow(
            "SELECT max(s.xmin::text::bigint) FILTER (WHERE s.ts < $1), "
            "min(s.xmin::text::bigint) FILTER (WHERE s.ts >= $1) FROM kwollect.samples s "
            "JOIN kwollect.series se USING (series_id) WHERE se.device_id = 'wr-restart'",
            us_to_datetime(T0 + 10_000_000))
    finally:
        await conn.close()
    assert old_max < new_min


async def test_spool_limit_drops_are_counted(kwdb, tmp_path, caplog) -> None:
    spool = tmp_path / "spool"
    writer = make_writer(dead_kwargs(kwdb), spool_dir=spool, batch_max_rows=100,
                         spool_max_bytes=64 << 10)
    await writer.start()
    with caplog.at_level(logging.WARNING, logger="kwollect.store.writer"):
        for step in range(10):
            writer.submit(readings("wr-full", 1000, start=T0 + step * 1_000_000))
            await asyncio.sleep(0.02)
        await writer.close(timeout=1)
    stats = writer.stats()
    assert 0 < stats["spooled"] < 10_000
    assert stats["spooled"] + stats["dropped"] == stats["submitted"] == 10_000
    assert stats["spool_bytes"] <= 64 << 10
    assert "is full" in caplog.text and f"{stats['dropped']} dropped" in caplog.text
    replay = make_writer(kwdb.connect_kwargs("kwuser"), spool_dir=spool)
    await replay.start()
    await replay.close(timeout=30)
    assert replay.stats()["replayed"] == stats["spooled"]
    assert await count(kwdb, "wr-full") == (stats["spooled"], stats["spooled"])


async def test_torn_and_corrupt_spool_records_are_skipped(kwdb, tmp_path, caplog) -> None:
    spool = tmp_path / "spool"
    writer = make_writer(dead_kwargs(kwdb), spool_dir=spool, batch_max_rows=100,
                         pool_size=1)  # one batch in flight: the spool keeps the order
    await writer.start()
    writer.submit(readings("wr-torn", 400))
    await writer.close(timeout=1)
    assert writer.stats()["spooled"] == 400
    (segment,) = segments(spool)
    data = bytearray(segment.read_bytes())
    record = len(data) // 4
    data[record + 200] ^= 0xFF  # damage the second record's payload
    segment.write_bytes(bytes(data[:-7]))  # and cut the last one short (a crash mid-write)
    replay = make_writer(kwdb.connect_kwargs("kwuser"), spool_dir=spool)
    with caplog.at_level(logging.WARNING, logger="kwollect.store.writer"):
        await replay.start()
        await wait_until(lambda: replay.stats()["spool_batches"] == 0, "the replay")
        await replay.close(timeout=30)
    assert replay.stats()["spool_corrupt_records"] == 2
    assert "torn or corrupt record" in caplog.text
    got = [r[3] for r in await stored(kwdb, "wr-torn")]
    assert got == [T0 + i * 1000 for i in (*range(100), *range(200, 300))]
    assert not segments(spool)


async def test_replayed_spool_of_already_written_batches_is_skipped(kwdb, tmp_path) -> None:
    """A crash after COMMIT but before the spool segment was deleted: replayed again."""
    spool, saved = tmp_path / "spool", tmp_path / "saved"
    writer = make_writer(dead_kwargs(kwdb), spool_dir=spool, batch_max_rows=100)
    await writer.start()
    writer.submit(readings("wr-again", 300))
    await writer.close(timeout=1)
    shutil.copytree(spool, saved)
    for attempt in range(2):
        replay = make_writer(kwdb.connect_kwargs("kwuser"), spool_dir=spool)
        await replay.start()
        await replay.close(timeout=30)
        assert replay.stats()["replayed"] == 300
        assert replay.stats()["already_written"] == (300 if attempt else 0)
        shutil.rmtree(spool)
        shutil.copytree(saved, spool)
    assert await count(kwdb, "wr-again") == (300, 300)


class CommitCutter:
    """A loopback TCP proxy to PostgreSQL that, once armed, passes the next COMMIT to the
    server and then breaks the client's connection before the server's reply gets through:
    the commit happens, the client cannot know it."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.armed = False
        self.cuts = 0
        self.server: asyncio.Server | None = None
        self.transports: list[asyncio.BaseTransport] = []
        self.handlers: set[asyncio.Task] = set()

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        for transport in self.transports:
            transport.abort()
        await asyncio.gather(*self.handlers, return_exceptions=True)
        await self.server.wait_closed()

    async def _serve(self, client_reader, client_writer) -> None:
        self.handlers.add(asyncio.current_task())
        server_reader, server_writer = await asyncio.open_connection("127.0.0.1",
                                                                     self.target_port)
        self.transports += [client_writer.transport, server_writer.transport]
        cut = asyncio.Event()

        async def upstream() -> None:
            while data := await client_reader.read(65536):
                if self.armed and b"COMMIT\x00" in data:
                    self.armed = False
                    self.cuts += 1
                    cut.set()
                    server_writer.write(data)
                    await server_writer.drain()
                    await asyncio.sleep(0.5)  # the server commits meanwhile
                    client_writer.transport.abort()
                    server_writer.close()
                    return
                server_writer.write(data)
                await server_writer.drain()
            server_writer.close()

        async def downstream() -> None:
            while data := await server_reader.read(65536):
                if cut.is_set():
                    return
                client_writer.write(data)
                await client_writer.drain()
            client_writer.close()

        await asyncio.gather(upstream(), downstream(), return_exceptions=True)


async def test_commit_outcome_lost_is_not_duplicated(kwdb, tmp_path) -> None:
    proxy = CommitCutter(kwdb.cluster.port)
    port = await proxy.start()
    kwargs = {**kwdb.connect_kwargs("kwuser"), "port": port, "ssl": False}
    writer = make_writer(kwargs, spool_dir=tmp_path / "spool", pool_size=1)
    await writer.start()
    try:
        writer.submit(readings("wr-lost-commit", 10))  # series and partitions are set up
        await wait_until(lambda: writer.stats()["inserted"] == 10, "the first batch")
        proxy.armed = True
        writer.submit(readings("wr-lost-commit", 200, start=T0 + 1_000_000))
        await wait_until(lambda: writer.stats()["inserted"] == 210, "the retried batch")
        await writer.close(timeout=30)
    finally:
        await proxy.stop()
    assert proxy.cuts == 1
    stats = writer.stats()
    assert stats["already_written"] == 200 and stats["inserted"] == 210
    assert stats["batches"] == 1  # the retry found the batch id and sent nothing
    assert "ConnectionDoesNotExist" in stats["last_error"] or "connection" in \
        stats["last_error"].lower()
    assert await count(kwdb, "wr-lost-commit") == (210, 210)


async def test_spool_directory_used_by_another_writer_is_refused(kwdb, tmp_path) -> None:
    first = make_writer(dead_kwargs(kwdb), spool_dir=tmp_path / "spool")
    await first.start()
    second = make_writer(dead_kwargs(kwdb), spool_dir=tmp_path / "spool")
    with pytest.raises(SpoolError, match="in use"):
        await second.start()
    await first.close(timeout=1)


async def test_memory_only_writer_keeps_rows_across_a_short_outage(kwdb, pg_cluster) -> None:
    writer = make_writer(kwdb.connect_kwargs("kwuser"))
    await writer.start()
    await asyncio.to_thread(pg_cluster.stop)
    try:
        writer.submit(readings("wr-memory", 100))
        await wait_until(lambda: not writer.stats()["online"], "the failure")
        assert writer.stats()["queue_rows"] == 100
    finally:
        await asyncio.to_thread(ensure_running, pg_cluster)
    await wait_until(lambda: writer.stats()["inserted"] == 100, "the retry")
    await writer.close(timeout=30)
    assert await count(kwdb, "wr-memory") == (100, 100)


async def test_close_without_database_spools_what_is_in_memory(kwdb, tmp_path) -> None:
    spool = tmp_path / "spool"
    writer = make_writer(dead_kwargs(kwdb), spool_dir=spool, flush_interval_s=60)
    await writer.start()
    writer.submit(readings("wr-close", 42))
    assert writer.stats()["queue_rows"] == 42
    await writer.close(timeout=1)
    stats = writer.stats()
    assert stats["spooled"] == 42 and stats["queue_rows"] == 0 and stats["spool_batches"] == 1
    writer.submit(readings("wr-close", 1))
    assert writer.stats()["dropped"] == 1



async def test_a_hung_link_spools_says_offline_and_reconnects(kwdb, tmp_path, caplog) -> None:
    """The database link stops forwarding without closing (a firewall drop, a dead switch):
    past db_batch_timeout_s the batch goes to the spool, the writer says it is offline and
    later batches go to the spool at once (a crash would lose nothing), then it reconnects
    and replays, exactly once."""
    proxy = await TcpProxy(kwdb.cluster.port).start()
    kwargs = {**kwdb.connect_kwargs("kwuser"), "port": proxy.port, "ssl": False}
    writer = make_writer(kwargs, spool_dir=tmp_path / "spool", batch_timeout_s=1.0,
                         connect_timeout_s=1.0, batch_max_rows=500)
    await writer.start()
    try:
        writer.submit(readings("wr-hang", 1000))
        await wait_until(lambda: writer.stats()["inserted"] == 1000, "the first rows")
        proxy.hang()
        with caplog.at_level(logging.WARNING, logger="kwollect.store.writer"):
            for second in range(1, 16):  # 15,000 rows while the link hangs
                writer.submit(readings("wr-hang", 1000, start=T0 + second * 1_000_000))
                await asyncio.sleep(0.1)
            await wait_until(lambda: not writer.stats()["online"], "offline", timeout=10)
            await wait_until(lambda: writer.stats()["spooled"] == 15_000, "all in the spool",
                             timeout=10)
        stats = writer.stats()
        assert stats["inserted"] + stats["spooled"] == 16_000  # nothing a crash could lose
        assert "within 1 s (db_batch_timeout_s)" in caplog.text
        proxy.resume()
        await wait_until(lambda: writer.stats()["inserted"] == 16_000, "the replay", timeout=30)
        await writer.close(timeout=30)
    finally:
        await proxy.close()
    stats = writer.stats()
    assert stats["online"] and stats["dropped"] == 0
    assert await count(kwdb, "wr-hang") == (16_000, 16_000)


async def test_rows_of_damaged_spool_records_are_counted_as_dropped(kwdb, tmp_path) -> None:
    """Every lost row is in `dropped`: a record damaged on disk (CRC wrong), one cut short,
    and one whose CRC is right but whose content cannot be decoded; a record damaged beyond
    its row count is counted in spool_lost_records."""
    spool_dir = tmp_path / "spool"
    writer = make_writer(dead_kwargs(kwdb), spool_dir=spool_dir, batch_max_rows=100,
                         pool_size=1)
    await writer.start()
    writer.submit(readings("wr-damaged", 400))
    await writer.close(timeout=1)
    (segment,) = segments(spool_dir)
    data = bytearray(segment.read_bytes())
    record = len(data) // 4
    data[record + 200] ^= 0xFF  # the second record's payload: CRC wrong
    segment.write_bytes(bytes(data[:-7]))  # the fourth cut short
    extra = Spool(spool_dir, 1 << 20)
    extra.open()
    good = data[12:record]  # the first record's payload, re-framed with a valid CRC...
    name_at = good.index(b"wr-damaged")
    undecodable = bytes(good[:name_at]) + b"\xff" + bytes(good[name_at + 1:])  # ...not UTF-8
    assert extra.append(undecodable) and extra.append(b"\xff" * 30)  # and one without rows
    extra.close()
    replay = make_writer(kwdb.connect_kwargs("kwuser"), spool_dir=spool_dir)
    await replay.start()
    await wait_until(lambda: replay.stats()["spool_batches"] == 0, "the replay")
    await replay.close(timeout=30)
    stats = replay.stats()
    assert stats["dropped"] == 300 and stats["replayed"] == 200
    assert stats["spool_lost_records"] == 1
    assert await count(kwdb, "wr-damaged") == (200, 200)
