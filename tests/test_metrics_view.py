"""INSERT and COPY into the `metrics` view, the way reference kwollectors and SQL users write:
rows land in the storage set-wise with the same semantics as row by row (series and
partitions created on the fly, late ranges marked for the summaries, `_device_alias` kept,
bad rows refused with a message naming the row and nothing of the statement kept)."""

from __future__ import annotations

import json
import math
from datetime import datetime, timedelta

import asyncpg
import pytest

from tests.sqlapi import UTC, get_metrics, iso

COLUMNS = ["timestamp", "device_id", "metric_id", "value", "labels"]


async def test_reference_kwollector_copy_shape(writer):
    """The reference kwollector's statement: asyncpg COPY of (timestamp, device_id,
    metric_id, value, labels), binary, many devices and metrics, NaN and infinities."""
    base = datetime(2019, 5, 1, 10, 0, tzinfo=UTC)
    values = [1.5, math.nan, math.inf, -math.inf, 0.0, -2.25]
    records = [(base + timedelta(seconds=i // 40), f"mv-ref-{i % 8}", f"m{i % 5}",
                values[i % len(values)],
                json.dumps({"_device_alias": f"mv-node-{i % 8 // 2}"} if i % 5 == 0 else {}))
               for i in range(4000)]
    result = await writer.copy_records_to_table("metrics", records=records, columns=COLUMNS)
    assert result == "COPY 4000"
    got = await writer.fetch(
        'SELECT "timestamp", device_id, metric_id, value, labels FROM metrics '
        "WHERE device_id LIKE 'mv-ref-%'")
    def key(r):
        return (r[0], r[1], r[2], repr(r[3]), r[4])
    assert sorted(key(tuple(r)) for r in got) == sorted(
        key((ts, d, m, v, json.dumps(json.loads(lab)))) for ts, d, m, v, lab in records)
    assert await writer.fetchval(
        "SELECT count(*) FROM kwollect.series WHERE device_id LIKE 'mv-ref-%'") == 8 * 5 - 8 + 8
    # the alias label is kept: the alias sums its two source devices
    alias = await get_metrics(writer, devices="mv-node-0", metrics="m0", start_time=iso(base),
                              end_time=iso(base + timedelta(seconds=1)))
    assert alias and set(alias[0]["labels"]["_device_orig"]) <= {"mv-ref-0", "mv-ref-1"}


async def test_multi_row_insert_returns_rows_and_creates_partitions(admin, writer):
    far = datetime(1987, 7, 14, 3, 0, tzinfo=UTC)
    rows = await writer.fetch(
        "INSERT INTO metrics (timestamp, device_id, metric_id, value, labels) VALUES "
        "($1, 'mv-ins', 'a', 1, NULL), ($1 + interval '1 day', 'mv-ins', 'a', 2, '{}'), "
        "($1, 'mv-ins', 'b', DEFAULT, '{\"k\": 1}') RETURNING *", far)
    assert [(r["metric_id"], r["labels"]) for r in rows] == [("a", "{}"), ("a", "{}"),
                                                             ("b", '{"k": 1}')]
    assert math.isnan(rows[2]["value"])
    for when in (far, far + timedelta(days=1)):
        assert await writer.fetchval("SELECT kwollect.partition_exists($1)", when)
    assert await admin.fetchval("SELECT count(*) FROM kwollect_partitions.samples_default") == 0
    assert await writer.fetchval("SELECT count(*) FROM metrics WHERE device_id = 'mv-ins'") == 3


async def test_late_rows_mark_their_range_and_fresh_rows_do_not(writer):
    old = datetime(2018, 3, 1, 12, 0, tzinfo=UTC)
    async with writer.transaction():
        await writer.copy_records_to_table("metrics", columns=COLUMNS, records=[
            (old, "mv-late", "m", 1.0, "{}"), (old + timedelta(hours=5), "mv-late", "m", 2.0, "{}"),
            (datetime.now(UTC), "mv-late", "m", 3.0, "{}")])
        marked = await writer.fetch("SELECT lo, hi FROM kwollect.summary_dirty WHERE lo = $1", old)
        assert [(r["lo"], r["hi"]) for r in marked] == [(old, old + timedelta(hours=5))]
    async with writer.transaction():
        before = await writer.fetchval("SELECT count(*) FROM kwollect.summary_dirty")
        await writer.execute("INSERT INTO metrics (device_id, metric_id, value) "
                             "VALUES ('mv-late', 'fresh', 1)")
        assert await writer.fetchval("SELECT count(*) FROM kwollect.summary_dirty") == before


async def test_statements_in_one_transaction_each_land_once(writer):
    t = datetime(2018, 4, 1, tzinfo=UTC)
    async with writer.transaction():
        for i in range(3):
            await writer.execute("INSERT INTO metrics VALUES ($1, 'mv-tx', 'm', $2, '{}')",
                                 t + timedelta(seconds=i), float(i))
        await writer.copy_records_to_table("metrics", columns=COLUMNS,
                                           records=[(t + timedelta(seconds=9), "mv-tx", "m",
                                                     9.0, "{}")])
        assert await writer.fetchval("SELECT count(*) FROM metrics WHERE device_id = 'mv-tx'") == 4
    assert [r[0] for r in await writer.fetch(
        "SELECT value FROM metrics WHERE device_id = 'mv-tx' ORDER BY timestamp")] == \
        [0.0, 1.0, 2.0, 9.0]


@pytest.mark.parametrize(("case", "bad", "message"), [
    (1, ("ts", None, "m", 1.0, "{}"), r"must not be null"),
    (2, ("ts", "dev", None, 1.0, "{}"), r"must not be null"),
    (3, ("ts", "dev", "m", 1.0, "[1, 2]"), "row 3 of the statement is invalid: labels is not"),
    (4, ("inf", "dev", "m", 1.0, "{}"), "row 3 .* timestamp .* out of range"),
    (5, ("ts", "dev", "m", 1.0, json.dumps({"k": "x" * 3000})), "row 3 .* larger than 2000"),
])
async def test_bad_row_is_refused_naming_it_and_nothing_is_kept(writer, case, bad, message):
    device = f"mv-bad-{case}"
    t = datetime(2018, 5, 1, tzinfo=UTC)
    good = [(t, device, "m", 0.0, "{}"), (t + timedelta(seconds=1), device, "m", 0.5, "{}")]
    row = (datetime.max.replace(tzinfo=UTC) if bad[0] == "inf" else t + timedelta(seconds=2),
           device if bad[1] == "dev" else bad[1], *bad[2:])
    with pytest.raises(asyncpg.PostgresError, match=message) as refused:
        await writer.copy_records_to_table("metrics", columns=COLUMNS, records=[*good, row])
    if case < 3:  # refused by the row trigger: COPY's context names the line
        assert "line 3" in (refused.value.as_dict().get("context") or "")
    else:
        assert device in refused.value.as_dict()["detail"]
    count = "SELECT count(*) FROM metrics WHERE device_id = $1"
    assert await writer.fetchval(count, device) == 0
    # the session goes on writing normally after the refused statement
    await writer.copy_records_to_table("metrics", columns=COLUMNS, records=good)
    assert await writer.fetchval(count, device) == 2


async def test_reader_cannot_write_through_the_view(reader):
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await reader.copy_records_to_table("metrics", columns=COLUMNS, records=[
            (datetime(2018, 1, 1, tzinfo=UTC), "mv-ro", "m", 1.0, "{}")])


async def test_roles_switched_in_one_session_share_its_inbox(admin):
    """A gateway-like session that writes as one role, then SET ROLE another."""
    await admin.execute("INSERT INTO metrics VALUES ('2018-06-01 00:00:00+00', 'mv-role', 'm', "
                        "1, '{}')")
    await admin.execute("SET ROLE kwuser")
    try:
        await admin.execute("INSERT INTO metrics VALUES ('2018-06-01 00:00:01+00', 'mv-role', "
                            "'m', 2, '{}')")
    finally:
        await admin.execute("RESET ROLE")
    assert await admin.fetchval("SELECT count(*) FROM metrics WHERE device_id = 'mv-role'") == 2


async def test_prepare_transaction_after_writing_into_the_view_is_refused(writer):
    """The view's inbox is a temporary table, and PostgreSQL cannot PREPARE a transaction that
    used one: such a transaction is refused and rolled back, with the reason; transactions of
    the same session that do not write into the view prepare normally, and a transaction that
    must be prepared writes into kwollect.samples through kwollect.series_ids."""
    t = datetime(2018, 7, 1, tzinfo=UTC)
    count = "SELECT count(*) FROM metrics WHERE device_id = 'mv-2pc'"
    await writer.execute("BEGIN")
    await writer.execute("INSERT INTO metrics VALUES ($1, 'mv-2pc', 'm', 1, '{}')", t)
    with pytest.raises(asyncpg.FeatureNotSupportedError,
                       match="cannot PREPARE a transaction that has operated on temporary"):
        await writer.execute("PREPARE TRANSACTION 'kwollect-test-view'")
    assert not writer.is_in_transaction()
    assert await writer.fetchval(count) == 0
    assert await writer.fetchval(
        "SELECT count(*) FROM pg_prepared_xacts WHERE gid = 'kwollect-test-view'") == 0
    # the same session, the documented way for a prepared transaction
    await writer.execute("BEGIN")
    await writer.execute("SELECT kwollect.ensure_partitions(ARRAY[$1::timestamptz])", t)
    await writer.execute(
        "INSERT INTO kwollect.samples (ts, value, series_id) "
        "SELECT $1, 2, (kwollect.series_ids(ARRAY['mv-2pc'], ARRAY['m'], ARRAY['{}'::jsonb]))[1]",
        t + timedelta(seconds=1))
    await writer.execute("PREPARE TRANSACTION 'kwollect-test-samples'")
    await writer.execute("COMMIT PREPARED 'kwollect-test-samples'")
    assert await writer.fetchval(count) == 1
