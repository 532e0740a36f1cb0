"""Summary benchmark: the issue's read (3), 5-minute averages of one metric for DEVICES devices
over HOURS hours, from kwollect's summaries beside the reference layout's GROUP BY over its raw
rows; and the 1-hour rollup over DAYS days: its build rate and get_metrics(summary => '1h')
beside summary => true over the same range.

Starts a private cluster, sets kwollect up and generates server-side:
- bmc_node_power_watt of DEVICES devices at 1 Hz for HOURS hours (100-370 W, one decimal,
  0-19 ms of jitter), in kwollect.samples and in the reference layout (a plain table with
  text ids and Kwollect's (device_id, timestamp DESC) index), summarized by
  kwollect.refresh_summary();
- 5-minute summary rows of the same devices for DAYS days before that (what years of
  maintenance leave), rolled up by kwollect.refresh_rollup() (rows/s measured).
Times are for every row to reach the client, best of REPEAT after a warm-up: by binary COPY
into a sink (the query planned each time), and by a prepared statement (its plan cached, as
kwollect-api's connections do).

Usage: .venv/bin/python benchmarks/summary.py [--devices 200] [--hours 6] [--days 90]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from datetime import datetime
from pathlib import Path

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.compaction import client_time  # noqa: E402
from kwollect.dev.devcluster import PrivateCluster  # noqa: E402
from kwollect.store.setupdb import DEFAULTS, setup  # noqa: E402

START = "2025-01-06 00:00:00+00"
METRICS = ["bmc_node_power_watt", "wattmetre_power_watt", "pdu_outlet_power_watt",
           "prom_node_network_receive_bytes_total", "prom_node_network_transmit_bytes_total",
           "prom_node_disk_read_bytes_total", "bmc_temp_cpu_celsius", "bmc_fan_speed_rpm",
           "bmc_psu_input_voltage_volt", "prom_node_memory_MemTotal_bytes"]


async def load(conn: asyncpg.Connection, devices: int, hours: int, days: int) -> None:
    # the series of the data set's 10 metrics (the other 9 without samples here)
    await conn.execute(
        "SELECT kwollect.series_ids(array_agg('node-' || d), array_agg(m), "
        "array_agg('{}'::jsonb)) FROM generate_series(1, $1) d, unnest($2::text[]) m",
        devices, METRICS)
    start = datetime.fromisoformat(START)
    await conn.execute("SELECT kwollect.ensure_partitions(array_agg(t)) FROM generate_series("
                       "$1::timestamptz, $1 + make_interval(hours => $2), '1 hour') t",
                       start, hours)
    await conn.execute(
        "CREATE TABLE ref_metrics (timestamp timestamptz NOT NULL, device_id text NOT NULL,"
        " metric_id text NOT NULL, value double precision, labels jsonb DEFAULT '{}');"
        "CREATE INDEX ON ref_metrics (device_id, timestamp DESC)")
    await conn.execute(
        "INSERT INTO ref_metrics SELECT $3::timestamptz + s * interval '1 second' "
        "+ (random() * 19)::int * interval '1 millisecond', 'node-' || d, "
        "'bmc_node_power_watt', 100 + floor(random() * 2700) / 10 "
        "FROM generate_series(0, $1 - 1) s, generate_series(1, $2) d ORDER BY 1",
        hours * 3600, devices, start)
    await conn.execute(
        "INSERT INTO kwollect.samples (ts, value, series_id) SELECT r.timestamp, r.value, "
        "s.series_id FROM ref_metrics r JOIN kwollect.series s USING (device_id, metric_id)")
    await conn.execute(
        "INSERT INTO kwollect.summary (series_id, bucket, count, nan_count, avg, min, max, last)"
        " SELECT s.series_id, b, 300, 0, 235, 100, 370, 200 FROM kwollect.series s, "
        "generate_series($1::timestamptz - make_interval(days => $2), "
        "$1 - interval '5 minutes', interval '5 minutes') b "
        "WHERE s.metric_id = 'bmc_node_power_watt'", start, days)


async def prepared_time(conn: asyncpg.Connection, query: str, repeat: int) -> float:
    """Best wall time of a prepared statement's rows at the client, its plan cached (as for
    kwollect-api, whose connections cache their statements): the planning of get_metrics'
    body, about 50 ms, is then paid once per connection."""
    statement = await conn.prepare(query)  # no parameters: its one plan is cached at once
    best = float("inf")
    for _ in range(repeat + 1):
        t0 = time.perf_counter()
        await statement.fetch()
        best = min(best, time.perf_counter() - t0)
    return best


async def run(args: argparse.Namespace) -> None:
    cluster = PrivateCluster(settings={"shared_buffers": "1GB", "work_mem": "64MB",
                                       "maintenance_work_mem": "512MB", "autovacuum": "off"})
    cluster.start()
    try:
        conf = {**DEFAULTS, "db_host": cluster.socket_dir, "db_port": cluster.port,
                "kwollect_password": "bench-writer"}
        await setup(conf)
        conn = await asyncpg.connect(cluster.dsn(database=conf["kwollect_db_name"]))
        t0 = time.perf_counter()
        await load(conn, args.devices, args.hours, args.days)
        # setup's maintenance already moved the watermarks past the (older) generated rows
        await conn.execute("UPDATE kwollect.summary_state SET watermark = NULL, "
                           "rollup_watermark = NULL")
        await conn.execute("SELECT kwollect.refresh_summary('1 hour')")
        print(f"generated and summarized in {time.perf_counter() - t0:.0f} s")
        summary_rows = await conn.fetchval("SELECT count(*) FROM kwollect.summary")
        t0 = time.perf_counter()
        rolled = 0
        while True:
            written = await conn.fetchval("SELECT kwollect.refresh_rollup('1 hour')")
            rolled += written
            if not written:
                break
        rollup_s = time.perf_counter() - t0
        await conn.execute("VACUUM ANALYZE")
        devices = ",".join(f"node-{d}" for d in range(1, args.devices + 1))
        end = f"timestamptz '{START}' + interval '{args.hours} hours'"
        reads = {
            f"(3) 5-min averages, 1 metric, {args.devices} devices, {args.hours} h": [
                ("reference layout, GROUP BY over raw rows",
                 "SELECT date_bin('5 minutes', timestamp, timestamptz 'epoch') AS b, device_id, "  # noqa: S608
                 "avg(value) FROM ref_metrics WHERE metric_id = 'bmc_node_power_watt' "
                 f"AND device_id = ANY ('{{{devices}}}'::text[]) "
                 f"AND timestamp >= '{START}' AND timestamp < {end} GROUP BY 1, 2 ORDER BY 1, 2"),
                ("kwollect get_metrics(summary => true)",
                 f"SELECT * FROM api.get_metrics(devices => '{devices}', "  # noqa: S608
                 "metrics => 'bmc_node_power_watt', summary => true, "
                 f"start_time => '{START}', end_time => ({end} - interval '1 second')::text)"),
            ],
            f"1-hour rollup, 1 metric, {args.devices} devices, {args.days} days": [
                ("kwollect get_metrics(summary => true)",
                 f"SELECT * FROM api.get_metrics(devices => '{devices}', "  # noqa: S608
                 "metrics => 'bmc_node_power_watt', summary => true, start_time => "
                 f"(timestamptz '{START}' - interval '{args.days} days')::text, "
                 f"end_time => '{START}')"),
                ("kwollect get_metrics(summary => '1h')",
                 f"SELECT * FROM api.get_metrics(devices => '{devices}', "  # noqa: S608
                 "metrics => 'bmc_node_power_watt', summary => '1h', start_time => "
                 f"(timestamptz '{START}' - interval '{args.days} days')::text, "
                 f"end_time => '{START}')"),
            ],
        }
        print(f"\n5-minute summary rows: {summary_rows:,}; rolled up into {rolled:,} hourly rows "
              f"at {summary_rows / rollup_s:,.0f} summary rows/s")
        postmaster = int((cluster.datadir / "postmaster.pid").read_text().split()[0])
        for name, variants in reads.items():
            print(f"\n{name}  (seconds, all rows at the client: COPY, prepared)")
            for label, query in variants:
                rows = await conn.fetchval(f"SELECT count(*) FROM ({query}) q")  # noqa: S608
                seconds, _ = await client_time(conn, query, args.repeat, postmaster)
                cached = await prepared_time(conn, query, args.repeat)
                print(f"  {label:<45} {seconds:8.3f} {cached:8.3f}  ({rows:,} rows)")
        await conn.close()
    finally:
        cluster.destroy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=200)
    parser.add_argument("--hours", type=int, default=6)
    parser.add_argument("--days", type=int, default=90)
    parser.add_argument("--repeat", type=int, default=3)
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
