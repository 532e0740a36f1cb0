"""as_rate takes booleans too: Kwollect 1.x Grafana dashboards call
api.get_metrics(..., summary => <boolean>, as_rate => <boolean>); words over HTTP and SQL."""

from __future__ import annotations

from datetime import timedelta

import aiohttp
import asyncpg
import pytest

from tests.sqlapi import T0, iso, load, series

WINDOW = {"start": iso(T0), "end": iso(T0 + timedelta(seconds=20))}


@pytest.fixture(scope="module")
async def counter(kwdb):
    conn = await kwdb.connect("kwuser")
    try:
        await load(conn, series("ar-1", "ar_bytes_total", T0, 5, 5, value=lambda i: 100.0 * i)
                   + series("ar-1", "ar_load", T0, 5, 5, value=lambda i: 7.0))
    finally:
        await conn.close()


async def values(conn: asyncpg.Connection, call: str, *args: object) -> dict[str, list]:
    # `call` comes from the fixed parameter lists below; the window is a constant
    query = (f"SELECT metric_id, value FROM api.get_metrics(devices => 'ar-1', "  # noqa: S608
             f"start_time => '{WINDOW['start']}', end_time => '{WINDOW['end']}', "
             f"{call}) ORDER BY metric_id, timestamp")
    rows = await conn.fetch(query, *args)
    result: dict[str, list] = {}
    for r in rows:
        result.setdefault(r["metric_id"], []).append(r["value"])
    return result


RATES = {"ar_bytes_total": [None, 20.0, 20.0, 20.0, 20.0], "ar_load": [None, 0.0, 0.0, 0.0, 0.0]}
AUTO = {"ar_bytes_total": [None, 20.0, 20.0, 20.0, 20.0], "ar_load": [7.0] * 5}
RAW = {"ar_bytes_total": [0.0, 100.0, 200.0, 300.0, 400.0], "ar_load": [7.0] * 5}


@pytest.mark.parametrize("call, expected", [
    ("summary => false, as_rate => true", RATES),     # Kwollect 1.x Grafana dashboards
    ("summary => false, as_rate => false", RAW),
    ("as_rate => 'auto'", AUTO),
    ("as_rate => 'yes'", RATES),
    ("as_rate => 'true'::text", RATES),
    ("as_rate => 'AUTO'::text", AUTO),
    ("as_rate => NULL::boolean", RAW),
    ("as_rate => 1 = 1", RATES),                      # any boolean expression
])
async def test_sql_callers_give_booleans_or_words(reader, counter, call, expected):
    assert await values(reader, call) == expected


async def test_bound_parameters_of_either_type(reader, counter):
    assert await values(reader, "as_rate => $1::boolean", True) == RATES
    assert await values(reader, "as_rate => $1::text", "auto") == AUTO


async def test_a_bad_word_is_refused_with_the_choices(reader, counter):
    with pytest.raises(asyncpg.InvalidParameterValueError, match="as_rate") as info:
        await values(reader, "as_rate => 'sometimes'::text")
    assert "auto" in info.value.hint


async def test_http_takes_the_words_of_any_case(gateway, counter):
    base = (f"{gateway.url}/rpc/get_metrics?devices=ar-1&start_time={WINDOW['start']}"
            f"&end_time={WINDOW['end']}&metrics=ar_load")
    async with aiohttp.ClientSession() as http:
        for word, expected in (("true", RATES), ("TRUE", RATES), ("auto", AUTO),
                               ("false", RAW)):
            async with http.get(f"{base}&as_rate={word}") as resp:
                assert resp.status == 200, await resp.text()
                got = [r["value"] for r in await resp.json()]
            assert got == expected["ar_load"], word


def ieee_rates(values: list[float], step_s: float) -> list[float | None]:
    """The reference's rates computed by Python floats (IEEE rounding, never an error)."""
    rates: list[float | None] = [None]
    for i in range(1, len(values)):
        value, prev, running_max = values[i], values[i - 1], max(values[:i])
        increase = running_max - prev + value if value < prev else value - prev
        rates.append(increase / step_s)
    return rates


EXTREME = [0.0, 5e-324, 1e-323, 5e-324, 2.5e-323, 1e308, -1e308, 1.5e308, 0.0, -0.0, 1e-300]


@pytest.mark.parametrize("step_s", [5.0, 1e-6])
async def test_subnormal_and_huge_values_round_instead_of_failing(writer, reader, step_s):
    """5e-324 over 5 s is below the smallest double: the rate is 0 (it was 'value out of
    range: underflow', failing the whole request); 1.5e308 - (-1e308) is +infinity."""
    device = f"ar-x{int(step_s * 1e6)}"
    await load(writer, series(device, "ar_tiny_total", T0, len(EXTREME), step_s,
                              value=lambda i: EXTREME[i]))
    rows = await reader.fetch(
        "SELECT value FROM api.get_metrics(devices => $1, start_time => $2, end_time => $3, "
        "as_rate => true) ORDER BY timestamp", device, iso(T0), iso(T0 + timedelta(minutes=1)))
    got = [r["value"] for r in rows]
    expected = ieee_rates(EXTREME, step_s)
    assert [repr(v) for v in got] == [repr(v) for v in expected]
    # the cases that raised: underflow of the quotient, overflow of the difference, and
    # overflow of the quotient of a finite difference by a microsecond
    assert expected[7] == float("inf")
    assert expected[3] == 0.0 if step_s == 5.0 else expected[5] == float("inf")
