"""OAR synchronisation cost: what kwollect.sync_jobs() costs with many old OAR jobs, side
by side with the reference's layout (a postgres_fdw view over OAR read on every job query).

Starts a private PostgreSQL cluster, creates OAR 2.5's schema there from Debian
oar-server's own SQL files (/usr/lib/oar/database/pg_structure.sql), fills it with JOBS
finished jobs (2 nodes each, 4 resources of type default per node) plus RUNNING running
jobs, links kwollect to it with kwollect-setup-db-oar, and prints:

- the first synchronisation (every job copied);
- a synchronisation with nothing new (what `kwollect maintain` pays every minute);
- a synchronisation after one job started and one ended;
- resolving one job's window and nodes: from nodetime_per_job (kwollect) and through the
  reference's live FDW view (the same join as its nodetime_by_oarjob).

Usage: .venv/bin/python benchmarks/oar_sync.py [--jobs 100000] [--running 200]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import time
from pathlib import Path

import asyncpg

from kwollect.dev.devcluster import PrivateCluster
from kwollect.store.setupdb import DEFAULTS, setup
from kwollect.store.setupdb_oar import setup_oar

OAR_SQL = Path("/usr/lib/oar/database/pg_structure.sql")
NODES = 200

REFERENCE_VIEW = """
CREATE OR REPLACE VIEW bench_nodetime_by_oarjob AS
SELECT DISTINCT j.job_id, to_timestamp(j.start_time) AS start_time,
       CASE WHEN j.stop_time = 0 THEN NULL ELSE to_timestamp(j.stop_time) END AS stop_time,
       split_part(r.network_address, '.', 1) AS node
FROM oar.jobs j
JOIN oar.assigned_resources a ON a.moldable_job_id = j.assigned_moldable_job
JOIN oar.resources r ON r.resource_id = a.resource_id
WHERE r.type = 'default'
"""


FILL = [
    """INSERT INTO resources (type, network_address)
       SELECT 'default', 'node-' || n || '.site.example'
       FROM generate_series(1, $1::int) n, generate_series(1, 4) core""",
    """INSERT INTO moldable_job_descriptions (moldable_id, moldable_job_id, moldable_walltime)
       SELECT g, g, 3600 FROM generate_series(1, $1::int + $2::int) g""",
    """INSERT INTO jobs (job_id, job_name, state, job_user, launching_directory, start_time,
                         stop_time, assigned_moldable_job, checkpoint_signal)
       SELECT g, 'j', CASE WHEN g > $1 THEN 'Running' ELSE 'Terminated' END, 'u', '/tmp',
              1600000000 + g * 60,
              CASE WHEN g > $1 THEN 0 ELSE 1600000000 + g * 60 + 3000 END, g, 12
       FROM generate_series(1, $1::int + $2::int) g""",
    """INSERT INTO assigned_resources (moldable_job_id, resource_id)
       SELECT g, r.resource_id FROM generate_series(1, $1::int + $2::int) g
       JOIN resources r ON r.network_address IN (
           'node-' || (g % $3::int + 1) || '.site.example',
           'node-' || ((g + 1) % $3::int + 1) || '.site.example')""",
    """INSERT INTO job_types (job_id, type) SELECT g, 'monitor=bmc_.*'
       FROM generate_series($1::int + 1, $1::int + $2::int) g""",
]


async def fill_oar(cluster: PrivateCluster, jobs: int, running: int) -> None:
    conn = await asyncpg.connect(host=cluster.socket_dir, port=cluster.port, user="oar",
                                 database="oar")
    try:
        await conn.execute(FILL[0], NODES)
        for statement in FILL[1:3] + FILL[4:]:
            await conn.execute(statement, jobs, running)
        await conn.execute(FILL[3], jobs, running, NODES)
        await conn.execute("SELECT setval('jobs_job_id_seq', $1), "
                           "setval('moldable_job_descriptions_moldable_id_seq', $1)",
                           jobs + running)
        await conn.execute("ANALYZE")
    finally:
        await conn.close()


async def timed(conn: asyncpg.Connection, query: str, *args, repeat: int = 5) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        await conn.fetch(query, *args)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


async def run(jobs: int, running: int) -> None:
    cluster = PrivateCluster(settings={"fsync": "off", "synchronous_commit": "off"})
    cluster.start()
    try:
        cluster.psql("CREATE ROLE oar LOGIN PASSWORD 'oar-bench'")
        cluster.psql("CREATE DATABASE oar OWNER oar")
        subprocess.run([str(cluster.bindir / "psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1",
                        "-d", cluster.dsn("oar", "oar"), "-f", str(OAR_SQL)], check=True)
        t0 = time.perf_counter()
        await fill_oar(cluster, jobs, running)
        print(f"OAR database: {jobs} finished + {running} running jobs "
              f"({time.perf_counter() - t0:.1f} s to fill)")
        conf = {**DEFAULTS, "db_host": cluster.socket_dir, "db_port": cluster.port,
                "kwollect_password": "bench-writer-1"}
        await setup(conf)
        t0 = time.perf_counter()
        await setup_oar({**conf, "oardb_host": "127.0.0.1", "oardb_port": cluster.port,
                         "oardb_name": "oar", "oardb_user": "oar", "oardb_password": "oar-bench",
                         "oardb_password_file": "", "oardb_connect_timeout_s": 5,
                         "oardb_statement_timeout_s": 600})
        print(f"first synchronisation (kwollect-setup-db-oar): {time.perf_counter() - t0:.2f} s")
        conn = await asyncpg.connect(host=cluster.socket_dir, port=cluster.port,
                                     user="postgres", database="kwdb")
        try:
            idle = await timed(conn, "SELECT kwollect.sync_jobs()")
            print(f"synchronisation, nothing new ({running} open jobs): {idle * 1000:.1f} ms")
            oar = await asyncpg.connect(host=cluster.socket_dir, port=cluster.port, user="oar",
                                        database="oar")
            await oar.execute("UPDATE jobs SET state = 'Terminated', stop_time = start_time + 60 "
                              "WHERE job_id = $1", jobs + 1)
            await oar.close()
            t0 = time.perf_counter()
            await conn.fetch("SELECT kwollect.sync_jobs()")
            print(f"synchronisation, one job ended: {(time.perf_counter() - t0) * 1000:.1f} ms")
            # owned by the owner role, whose user mapping the foreign tables then use
            await conn.execute("SET ROLE kwuser_owner")
            await conn.execute(REFERENCE_VIEW)
            await conn.execute("RESET ROLE")
            job = jobs // 2
            ours = await timed(conn, "SELECT min(start_time), max(stop_time), array_agg(node) "
                                     "FROM nodetime_by_job WHERE job_id = $1", job)
            ref = await timed(conn, "SELECT min(start_time), max(stop_time), array_agg(node) "
                                    "FROM bench_nodetime_by_oarjob WHERE job_id = $1", job)
            print(f"one job's window and nodes: kwollect {ours * 1000:.2f} ms, "
                  f"reference layout (live FDW view) {ref * 1000:.2f} ms")
        finally:
            await conn.close()
    finally:
        cluster.destroy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=100_000)
    parser.add_argument("--running", type=int, default=200)
    args = parser.parse_args()
    asyncio.run(run(args.jobs, args.running))


if __name__ == "__main__":
    main()
