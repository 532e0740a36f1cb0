"""The one promotion reader the kwollector and the wattmetre reader share: the rule, the
refresh against the real promoted_metrics table, and the last known set kept while the
database is away."""

from __future__ import annotations

import asyncio
import logging
import time

from kwollect.collect.promotion import PromotionReader, Promotions
from kwollect.dev.simulators import free_port


def test_a_row_promotes_the_metrics_its_regex_fully_matches_on_its_device_or_alias():
    promotions = Promotions()
    assert promotions.update([("node-1", "bmc_.*"), ("node-2", None), ("node-3", "(["),
                              (None, ".*")])
    assert promotions.is_promoted("node-1", None, "bmc_fan")
    assert not promotions.is_promoted("node-1", None, "xbmc_fan")
    assert promotions.is_promoted("pdu-9", "node-2", "anything")
    assert not promotions.is_promoted("node-3", None, "([")
    assert promotions.devices_promoting("bmc_temp") == {"node-1", "node-2"}
    assert not promotions.update([("node-2", None), ("node-1", "bmc_.*"), ("node-3", "([")])


async def test_the_reader_follows_the_table_and_calls_back_on_change_only(kwdb, writer):
    promotions = Promotions()
    changes: list[frozenset[str]] = []
    reader = PromotionReader(kwdb.connect_kwargs("kwuser"), promotions,
                             lambda: changes.append(promotions.devices_promoting("m_x")),
                             name="test")
    try:
        await writer.execute("INSERT INTO promoted_metrics (device_id, metric_id) "
                             "VALUES ('promo-a', 'm_.*')")
        await reader.refresh()
        await reader.refresh()
        await writer.execute("DELETE FROM promoted_metrics WHERE device_id = 'promo-a'")
        await reader.refresh()
    finally:
        await writer.execute("DELETE FROM promoted_metrics WHERE device_id = 'promo-a'")
        await reader.close()
    assert [c & {"promo-a"} for c in changes] == [{"promo-a"}, set()]


async def test_an_unreachable_database_keeps_the_last_known_set_and_logs_once(kwdb, caplog):
    promotions = Promotions()
    promotions.update([("node-1", None)])
    changes: list[None] = []
    reader = PromotionReader({**kwdb.connect_kwargs("kwuser"), "port": free_port()},
                             promotions, lambda: changes.append(None), name="test",
                             timeout_s=2)
    with caplog.at_level(logging.WARNING, logger="kwollect.collect.promotion"):
        await reader.refresh()
        await reader.refresh()
    assert promotions.is_promoted("node-1", None, "any") and not changes
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1
    assert lines[0].startswith("test: cannot read promoted_metrics (")
    assert lines[0].endswith("); keeping the last known promotions")


async def test_a_wrong_password_is_an_outage_too_not_the_end_of_the_reader(kwdb, caplog):
    promotions = Promotions()
    reader = PromotionReader({**kwdb.connect_kwargs("kwuser"), "password": "wrong"},
                             promotions, lambda: None, name="test")
    with caplog.at_level(logging.WARNING, logger="kwollect.collect.promotion"):
        await reader.refresh()
    assert "password authentication failed" in caplog.text


async def test_a_change_reaches_the_reader_at_once_by_notification(kwdb, writer):
    """With a 60 s polling period, only the table's NOTIFY can bring the change in time."""
    promotions = Promotions()
    seen = asyncio.Event()
    reader = PromotionReader(kwdb.connect_kwargs("kwuser"), promotions, seen.set,
                             name="test", refresh_s=60)
    task = asyncio.create_task(reader.run())
    try:
        await asyncio.sleep(0.5)  # the first read (nothing promoted) and LISTEN are done
        seen.clear()
        started = time.monotonic()
        await writer.execute("INSERT INTO promoted_metrics (device_id, metric_id) "
                             "VALUES ('promo-n', 'm_.*')")
        await asyncio.wait_for(seen.wait(), 5)
        assert promotions.devices_promoting("m_x") >= {"promo-n"}
        assert time.monotonic() - started < 2
    finally:
        task.cancel()
        await writer.execute("DELETE FROM promoted_metrics WHERE device_id = 'promo-n'")
