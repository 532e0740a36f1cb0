"""A Kwollect 1.x source database, laid out as Kwollect 1.3.1's kwollect-setup-db creates it
(shared/notes/kwollect-reference.md, section 2), with Kwollect-shaped rows that cover what a
migration must carry: NaN, infinities, NULL values and labels, labels with text values,
_device_alias rows, duplicates the reference allowed, several chunks.

On plain PostgreSQL the TimescaleDB calls of kwollect-setup-db do nothing (as in the study's
harness), so `metrics` is a plain table with the reference's two extra indexes; the
hypertable variant has TimescaleDB's own timestamp index, 6-hour chunks and native
compression with the reference's segmentby and orderby.
"""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime, timedelta

import asyncpg

SOURCE_ROLE = "kw1user"
SOURCE_PASSWORD = "kw1-source-secret"

METRICS_DDL = """
CREATE TABLE IF NOT EXISTS metrics (
    "timestamp" timestamp with time zone DEFAULT now(),
    device_id text NOT NULL,
    metric_id text NOT NULL,
    value double precision DEFAULT 'NaN',
    labels jsonb DEFAULT '{}'
);
"""
HYPERTABLE_DDL = """
CREATE EXTENSION IF NOT EXISTS timescaledb;
SELECT create_hypertable('metrics', 'timestamp', chunk_time_interval => interval '6 hours',
                         if_not_exists => true);
"""
REST_DDL = """
CREATE INDEX IF NOT EXISTS metrics_device_idx ON metrics (device_id, "timestamp" DESC);
CREATE INDEX IF NOT EXISTS metrics_alias_idx
    ON metrics ((labels->>'_device_alias'), "timestamp" DESC) WHERE labels ? '_device_alias';
CREATE TABLE IF NOT EXISTS promoted_metrics (
    device_id text NOT NULL,
    metric_id text DEFAULT NULL
);
CREATE OR REPLACE VIEW nodetime_by_job AS
    SELECT NULL::integer AS job_id, NULL::timestamptz AS start_time,
           NULL::timestamptz AS stop_time, NULL::text AS node
    WHERE false;
"""
COMPRESSION_DDL = """
ALTER TABLE metrics SET (timescaledb.compress,
                         timescaledb.compress_segmentby = 'device_id, metric_id, labels',
                         timescaledb.compress_orderby = '"timestamp" DESC');
"""
# A site that keeps its jobs in a table of the reference's shape instead of the OAR view.
JOBS_TABLE_DDL = """
DROP VIEW IF EXISTS nodetime_by_job;
CREATE TABLE nodetime_by_job (job_id integer, start_time timestamptz, stop_time timestamptz,
                              node text);
INSERT INTO nodetime_by_job VALUES
    (4242, '2016-03-01 01:00+00', '2016-03-01 03:00+00', 'node-1'),
    (4242, '2016-03-01 01:00+00', '2016-03-01 03:00+00', 'node-2'),
    (4243, '2016-03-01 05:00+00', NULL, 'node-3'),
    (4244, NULL, NULL, 'node-4');
"""

START = datetime(2016, 3, 1, tzinfo=UTC)
COLUMNS = ["timestamp", "device_id", "metric_id", "value", "labels"]


def rows(start: datetime = START, hours: float = 30, step_s: int = 10) -> list[tuple]:
    """Reference-shaped rows: 4 nodes x (power, temperature, a counter), 2 wattmetre ports
    aliased to node-1, a string-valued state; specials spread over the time span."""
    out: list[tuple] = []
    specials = [math.nan, math.inf, -math.inf, None]
    for i in range(int(hours * 3600 / step_s)):
        ts = start + timedelta(seconds=i * step_s)
        for node in range(1, 5):
            device = f"node-{node}"
            power = specials[i % 4] if i % 97 == 0 else 100.0 + (i * node) % 50 + 0.25
            out.append((ts, device, "bmc_node_power_watt", power, "{}"))
            out.append((ts, device, "bmc_temp_cpu_celsius", 40.0 + i % 7,
                        '{"sensor": "CPU1 Temp"}'))
            out.append((ts, device, "prom_node_network_receive_bytes_total", float(i * 1500),
                        json.dumps({"device": "eth0", "_metric_scrape_time": i // 360})))
        for port in (3, 4):
            out.append((ts, f"wattmetre1-port{port}", "wattmetre_power_watt", 50.0 + port,
                        '{"_device_alias": "node-1"}'))
        if i % 30 == 0:
            out.append((ts, "pdu-1", "pdu_state", math.nan, '{"value_str": "on", "é": "ü"}'))
    return out


def duplicates(base: list[tuple]) -> list[tuple]:
    """Rows the reference stored twice (kwollect_custom re-scrapes, retried COPYs)."""
    return base[::37]


async def create_source(admin: asyncpg.Connection, cluster_dsn, name: str, *,
                        hypertable: bool = False, jobs_table: bool = False) -> asyncpg.Connection:
    """A fresh source database `name` owned by the reference's role; returns its connection."""
    if not await admin.fetchval("SELECT true FROM pg_roles WHERE rolname = $1", SOURCE_ROLE):
        await admin.execute(f"CREATE ROLE {SOURCE_ROLE} LOGIN PASSWORD '{SOURCE_PASSWORD}'")
    await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    await admin.execute(f'CREATE DATABASE "{name}" OWNER {SOURCE_ROLE}')
    conn = await asyncpg.connect(cluster_dsn(database=name))
    await conn.execute(METRICS_DDL)
    if hypertable:
        await conn.execute(HYPERTABLE_DDL)
    await conn.execute(REST_DDL)
    if hypertable:
        await conn.execute(COMPRESSION_DDL)
    if jobs_table:
        await conn.execute(JOBS_TABLE_DDL)
    await conn.execute(f"ALTER TABLE metrics OWNER TO {SOURCE_ROLE}; "
                       f"ALTER TABLE promoted_metrics OWNER TO {SOURCE_ROLE}; "
                       f"GRANT SELECT ON ALL TABLES IN SCHEMA public TO {SOURCE_ROLE}")
    return conn


async def load(conn: asyncpg.Connection, records: list[tuple]) -> None:
    await conn.copy_records_to_table("metrics", records=records, columns=COLUMNS)


async def distinct_rows(conn: asyncpg.Connection, relation: str, lo: datetime,
                        hi: datetime) -> list[tuple]:
    """Every distinct row of a `metrics`-shaped relation in [lo, hi), values as text (NaN and
    infinities compare), labels as their canonical jsonb text, NULL labels as {}."""
    # relation is one of the two fixed names the tests pass
    query = (f'SELECT DISTINCT "timestamp", device_id, metric_id, value::text, '  # noqa: S608
             f"coalesce(labels, '{{}}')::text FROM {relation} "
             f'WHERE "timestamp" >= $1 AND "timestamp" < $2')
    return sorted(tuple(r) for r in await conn.fetch(query, lo, hi))
