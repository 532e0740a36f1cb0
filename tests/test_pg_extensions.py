"""The extension builds named by KWOLLECT_PG_EXTENSIONS (scripts/install-pg-extensions.sh)
are usable by the test cluster; without them, these tests and the storages needing them skip
with the reason and the way to install them."""

from __future__ import annotations

import pytest

from kwollect.dev.devcluster import missing_extension_reason


def test_timescaledb_is_preloaded_and_creatable(pg_cluster):
    reason = missing_extension_reason("timescaledb")
    if reason:
        pytest.skip(reason)
    assert "timescaledb" in pg_cluster.preloaded
    pg_cluster.psql("DROP DATABASE IF EXISTS ext_probe")
    pg_cluster.psql("CREATE DATABASE ext_probe")
    try:
        out = pg_cluster.psql("CREATE EXTENSION timescaledb; "
                              "SELECT extversion FROM pg_extension WHERE extname = 'timescaledb'",
                              database="ext_probe")
        assert out.split()[-1].startswith("2.")
    finally:
        pg_cluster.psql("DROP DATABASE ext_probe")
