"""Write-path faults: which errors retrying cannot cure, and dropped rows counted and logged
at a limited rate."""

from __future__ import annotations

import logging

import asyncpg
import pytest

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
