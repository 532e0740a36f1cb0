"""kwollect.minute_key, the time key of the samples index: inlined by PostgreSQL (no SQL
function call per row inserted), and the same minute as the epoch's date_part everywhere."""

from __future__ import annotations


async def test_minute_key_is_inlined(admin):
    plan = await admin.fetchval(
        "EXPLAIN (VERBOSE, FORMAT JSON) SELECT kwollect.minute_key(t) "
        "FROM unnest(ARRAY[now()]) t")
    assert "minute_key" not in str(plan) and "date_part" in str(plan)


async def test_minute_key_is_the_epoch_minute(admin):
    """Minute boundaries and a microsecond either side from 1900 to 2100, and random times:
    the same value as floor(epoch / 60), so existing indexes stay valid."""
    differ = await admin.fetchval("""
        WITH t AS (
            SELECT '1970-01-01 00:00:00+00'::timestamptz + k * interval '1 minute'
                   + d * interval '1 microsecond' AS ts
            FROM generate_series(-36000000::bigint, 68000000::bigint, 99991) k,
                 unnest(ARRAY[-1, 0, 1, 999999, -999999, 59999999]) d
            UNION ALL
            SELECT '1900-01-01+00'::timestamptz + random() * interval '200 years'
            FROM generate_series(1, 20000))
        SELECT count(*) FILTER (WHERE kwollect.minute_key(ts)
                                      <> floor(date_part('epoch', ts) / 60)::integer)
        FROM t""")
    assert differ == 0
