"""Write-path faults: which errors retrying cannot cure, and dropped rows counted and logged
at a limited rate."""

from __future__ import annotations

import logging

import asyncpg
import pytest

from kwollect.store.writer import faults
from kwollect.store.writer.faults import Drops, describe, is_data_error


def test_dropped_rows_are_all_counted_and_logged_once_a_minute_per_reason(caplog):
    drops = Drops("w", logging.getLogger("test"))
    with caplog.at_level(logging.ERROR, logger="test"):
        drops(3, "spool full")
        drops(2, "spool full")
        drops(1, "refused by the database")
    assert drops.count == 6
    assert [r.getMessage() for r in caplog.records] == [
        "w: dropped 3 row(s) (3 in all): spool full",
        "w: dropped 1 row(s) (6 in all): refused by the database"]


def test_every_drop_is_in_the_log_not_only_each_minutes_first(caplog, monkeypatch):
    """The two rows dropped after the first line of the minute are reported a minute later
    (by the flusher), and at close whatever is left, so the log adds up to the count."""
    clock = [1000.0]
    monkeypatch.setattr(faults.time, "monotonic", lambda: clock[0])
    drops = Drops("w", logging.getLogger("test"))
    with caplog.at_level(logging.ERROR, logger="test"):
        drops(3, "spool full")
        drops(2, "spool full")
        drops.report()  # within the minute: nothing yet
        clock[0] += faults.DROP_LOG_INTERVAL_S
        drops.report()
        drops(4, "spool full")
        drops.report(force=True)
    assert [r.getMessage() for r in caplog.records] == [
        "w: dropped 3 row(s) (3 in all): spool full",
        "w: dropped 2 row(s) (5 in all): spool full",
        "w: dropped 4 row(s) (9 in all): spool full"]


async def test_data_errors_are_told_from_link_errors(writer):
    with pytest.raises(asyncpg.PostgresError) as bad_data:
        await writer.execute("SELECT 'x'::integer")
    with pytest.raises(asyncpg.PostgresError) as no_table:
        await writer.execute("SELECT * FROM no_such_table_here")
    assert is_data_error(bad_data.value)
    assert not is_data_error(no_table.value)
    assert not is_data_error(ConnectionResetError("reset"))
    assert describe(TimeoutError()) == "TimeoutError"
    assert describe(OSError("refused")) == "OSError: refused"
