"""The writer's reference mode: plain COPY into a reference Kwollect database's table."""

from __future__ import annotations

import math

import asyncpg
import orjson
import pytest

from kwollect.model import Reading
from kwollect.store.writer import Writer, WriterOptions, us_to_datetime

REFERENCE_TABLE = """
CREATE TABLE metrics (
    "timestamp" timestamptz NOT NULL DEFAULT now(),
    device_id text NOT NULL,
    metric_id text NOT NULL,
    value double precision DEFAULT 'NaN',
    labels jsonb DEFAULT '{}')
"""


@pytest.fixture
async def reference_db(pg_cluster):
    admin = await asyncpg.connect(pg_cluster.dsn())
    await admin.execute("DROP DATABASE IF EXISTS kwref")
    await admin.execute("CREATE DATABASE kwref")
    await admin.close()
    conn = await asyncpg.connect(pg_cluster.dsn(database="kwref"))
    await conn.execute(REFERENCE_TABLE)
    yield conn
    await conn.close()


async def test_rows_land_in_the_reference_table(pg_cluster, reference_db):
    t0 = 1_700_000_000_123_456
    readings = [Reading(t0 + i, "ref-1", "power", float(i), {"outlet": "3", "é": "ü"})
                for i in range(1000)]
    readings.append(Reading(t0, "ref-2", "state", math.nan, {"value_str": "on"}))
    writer = Writer({"host": pg_cluster.socket_dir, "port": pg_cluster.port,
                     "user": "postgres", "database": "kwref"},
                    WriterOptions(db_schema="reference"))
    await writer.start()
    writer.submit(readings)
    await writer.close(timeout=30)
    assert writer.stats()["inserted"] == 1001 and writer.stats()["dropped"] == 0
    rows = await reference_db.fetch('SELECT * FROM metrics ORDER BY device_id, "timestamp"')
    assert len(rows) == 1001
    first = rows[0]
    assert (first["timestamp"], first["device_id"], first["metric_id"], first["value"]) == \
        (us_to_datetime(t0), "ref-1", "power", 0.0)
    assert orjson.loads(first["labels"]) == {"outlet": "3", "é": "ü"}
    assert math.isnan(rows[-1]["value"]) and orjson.loads(rows[-1]["labels"]) == {"value_str": "on"}


def test_unknown_schema_is_refused():
    with pytest.raises(ValueError, match="db_schema"):
        Writer({}, WriterOptions(db_schema="timescale"))
