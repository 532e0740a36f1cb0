"""The SQL API tests again, against a cluster with PostgreSQL's stock settings.

Fixtures `kwdb` (and so admin, writer, reader) are overridden for this module: every test
imported below runs on tests/fixtures/stockdb.py's cluster (jit on, fsync on).
"""

from __future__ import annotations

import pytest

from tests.test_api_functions import *  # noqa: F403
from tests.test_api_functions import recent  # noqa: F401


async def explain_get_metrics(conn) -> str:
    rows = await conn.fetch(
        "EXPLAIN (ANALYZE, FORMAT TEXT) SELECT * FROM api.get_metrics("
        "devices => 'stock-1', start_time => '2021-01-01', end_time => '2021-01-02')")
    return "\n".join(r[0] for r in rows)


@pytest.fixture(scope="module")
def kwdb(stock_kwdb):
    return stock_kwdb


async def test_stock_server_has_jit_on_and_sessions_off(kwdb, admin):
    """The cluster really is stock; setup turns JIT off for the database's sessions."""
    assert kwdb.cluster.settings == {"timezone": "Europe/Paris"}
    assert await admin.fetchval("SELECT boot_val FROM pg_settings WHERE name = 'jit'") == "on"
    for role in ("kwuser", "kwuser_ro", "kwuser_api"):
        conn = await kwdb.connect(role)
        try:
            assert await conn.fetchval("SHOW jit") == "off"
            await conn.execute("SET ROLE kwuser_ro") if role == "kwuser_api" else None
            plan = await explain_get_metrics(conn)
            assert "JIT" not in plan
        finally:
            await conn.close()


async def test_get_metrics_would_reach_jit_cost(kwdb, reader):
    """Why setup turns JIT off: with jit on, even a tiny get_metrics is compiled."""
    await reader.execute("SET jit = on")
    plan = await explain_get_metrics(reader)
    assert "JIT" in plan
