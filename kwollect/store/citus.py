"""`kwollect-setup-db --citus`: the kwollect database distributed over a Citus cluster.

Run on the coordinator.  Every node (coordinator and `citus_workers`) gets the same roles,
the database and the citus extension; the workers are registered with the coordinator;
then, once sql/ is applied on the coordinator, the tables that grow with the samples are
distributed by series_id, co-located, and the series identities become a reference table
(a copy on every node, so joins of samples with series run on the workers):

- kwollect.samples (range-partitioned on ts: a distributed partitioned table; the
  partitions kwollect.ensure_partitions creates later are distributed when attached);
- kwollect.summary, co-located with the samples;
- kwollect.series: reference table.

Everything else (settings, partitions catalogue, jobs, leases, summary bookkeeping) is a
few rows and stays on the coordinator.  The API, the views and the Grafana queries are the
same SQL: Citus plans them on the coordinator and pushes each series' work to its shard.

The coordinator opens connections to the workers as the role running the query (the
SECURITY DEFINER maintenance runs as the owner), so on Citus every kwollect role can log
in (the owner and the scheduler and node roles get no password from setup: the operator
makes workers accept the coordinator by `pg_hba.conf` on the private network, certificates,
or Citus' pg_dist_authinfo; docs/scaling.md).

Refused, with the reason (docs/scaling.md): TimescaleDB in the same database (its
hypertables cannot be distributed by Citus), and kwollect's compaction (sql/025) whose
blocks table is written by SECURITY DEFINER functions with temporary tables and
DELETE ... RETURNING moves across shards.
"""

from __future__ import annotations

import logging
from typing import Any

import asyncpg

from kwollect.options import OptionError

log = logging.getLogger("kwollect.store.citus")

def parse_nodes(value: str, option: str) -> list[tuple[str, int]]:
    """`host:port,host:port` (port 5432 when left out) as a list of (host, port)."""
    nodes = []
    for item in (part.strip() for part in value.split(",")):
        if not item:
            continue
        host, sep, port = item.rpartition(":")
        if not sep:
            host, port = item, "5432"
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise OptionError(f"{option}: expected host:port[,host:port...], got {item!r}")
        nodes.append((host, int(port)))
    return nodes


def check_combination(conf: dict[str, Any]) -> None:
    """Refuse what cannot combine with Citus, before anything is changed."""
    if not conf.get("citus"):
        if conf.get("citus_workers"):
            raise OptionError("citus_workers is given without --citus")
        return
    if conf.get("switch_storage"):
        raise OptionError("--citus and --switch_storage exclude each other: set up a new "
                          "database with --citus and copy the samples with `kwollect migrate`")
    if conf.get("archive_path"):
        raise OptionError("--citus and archive_path exclude each other: a tablespace belongs to "
                          "one server, and Citus does not move the shards of the workers into "
                          "it; give the workers' data directories the disks instead")
    if str(conf.get("timescaledb", "off")) == "auto":
        conf["timescaledb"] = "off"
    if str(conf.get("timescaledb", "off")) == "on":
        raise OptionError(
            "--citus and --timescaledb=on exclude each other: a TimescaleDB hypertable cannot "
            "be a Citus distributed table (both take over the same table's storage); on "
            "Citus, kwollect stores samples in distributed plain partitions (docs/scaling.md)")
    if not parse_nodes(str(conf.get("citus_workers", "")), "citus_workers"):
        raise OptionError("--citus needs citus_workers (host:port of each worker node)")
    coordinator_address(conf)


def coordinator_address(conf: dict[str, Any]) -> tuple[str, int]:
    """Where the workers reach the coordinator: citus_coordinator, else db_host (TCP)."""
    if conf.get("citus_coordinator"):
        return parse_nodes(str(conf["citus_coordinator"]), "citus_coordinator")[0]
    if str(conf["db_host"]).startswith("/"):
        raise OptionError("--citus with a unix-socket db_host needs citus_coordinator "
                          "(host:port at which the workers reach this server)")
    return str(conf["db_host"]), int(conf["db_port"])


async def require_preloaded(conn: asyncpg.Connection, where: str) -> None:
    """The server `where` must preload citus (checked before anything is changed)."""
    preload = await conn.fetchval("SELECT current_setting('shared_preload_libraries')")
    if "citus" not in [name.strip() for name in preload.split(",")]:
        raise OptionError(
            f"--citus: {where} does not load Citus (shared_preload_libraries = {preload!r}); "
            "install Citus, put citus first in shared_preload_libraries, restart PostgreSQL "
            "and run setup again")


async def check_database(conn: asyncpg.Connection, conf: dict[str, Any]) -> None:
    """A database keeps the storage it was set up with: Citus or not, never switched by
    setup (a new database and `kwollect migrate` move samples between them)."""
    has_samples = await conn.fetchval("SELECT to_regclass('kwollect.samples') IS NOT NULL")
    distributed = await conn.fetchval(
        "SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'citus') AND "
        "coalesce((SELECT value = 'on' FROM kwollect.settings WHERE key = 'citus'), false)"
        if has_samples else "SELECT false")
    name = conf["kwollect_db_name"]
    if distributed and not conf["citus"]:
        raise OptionError(f"database {name} is distributed with Citus: run setup with --citus "
                          "and its citus_workers")
    if conf["citus"] and has_samples and not distributed:
        raise OptionError(
            f"--citus: database {name} already holds samples on one server; set up a new "
            "database with --citus and copy the samples with `kwollect migrate`")
    if conf["citus"] and await conn.fetchval(
            "SELECT true FROM pg_extension WHERE extname = 'timescaledb'"):
        raise OptionError(
            f"--citus: database {name} uses TimescaleDB, which cannot combine with Citus (a "
            "hypertable cannot be distributed); set up a new database with --citus")


ROLE_PROPAGATION = ("citus.enable_create_role_propagation", "citus.enable_alter_role_propagation",
                    "citus.enable_alter_role_set_propagation")
"""Off in the kwollect database of every node: setup makes the roles on every node itself,
and Citus would otherwise re-create the owner role on the workers whenever the owner
creates an object, with an ALTER ROLE only a superuser may run."""


WRITER_CACHED_CONNECTIONS = 16
"""Connections to each worker a writer's session keeps between its COPYs: a COPY opens one
per shard it writes (32 shards by default), and with Citus' default of 1 kept, every batch
opened the others again (benchmarks/scaleout.py --citus: docs/performance.md)."""


SESSION_CONNECTIONS = {"citus.max_adaptive_executor_pool_size": 4,
                       "citus.max_cached_conns_per_worker": 4}
"""Every session of the database: a query uses at most 4 connections per worker, kept
between queries.  Citus' defaults (16, 1 kept) opened up to 15 new worker backends for each
query over the 32 shards: get_metrics, a query per time chunk, took 9 s instead of 0.3 s
(benchmarks/scaleout.py --citus)."""


async def database_settings(admin: asyncpg.Connection, database: str, writer: str) -> None:
    """ROLE_PROPAGATION off for `database`, and the writer's cached connections (run from
    another database: Citus refuses ALTER DATABASE on a worker from inside the distributed
    database)."""
    for name in ROLE_PROPAGATION:
        statement = await admin.fetchval("SELECT format('ALTER DATABASE %I SET %s = off', "
                                         "$1::text, $2::text)", database, name)
        await admin.execute(statement)
    for name, value in SESSION_CONNECTIONS.items():
        statement = await admin.fetchval("SELECT format('ALTER DATABASE %I SET %s = %s', "
                                         "$1::text, $2::text, $3::int)", database, name, value)
        await admin.execute(statement)
    statement = await admin.fetchval(
        "SELECT format('ALTER ROLE %I IN DATABASE %I SET citus.max_cached_conns_per_worker "
        "= %s', $1::text, $2::text, $3::int)", writer, database, WRITER_CACHED_CONNECTIONS)
    await admin.execute(statement)


async def ensure_extension(conn: asyncpg.Connection) -> None:
    """citus in the database of `conn`, whose session then propagates no role either."""
    await conn.execute("CREATE EXTENSION IF NOT EXISTS citus")
    for name in ROLE_PROPAGATION:
        await conn.execute(f"SET {name} = off")


async def register_nodes(conn: asyncpg.Connection, coordinator: tuple[str, int],
                         workers: list[tuple[str, int]]) -> list[str]:
    """The coordinator's address and the workers in pg_dist_node; returns what was added."""
    added = []
    if not await conn.fetchval("SELECT true FROM pg_dist_node WHERE groupid = 0"):
        await conn.execute("SELECT citus_set_coordinator_host($1, $2)", *coordinator)
        added.append(f"coordinator {coordinator[0]}:{coordinator[1]}")
    for host, port in workers:
        if not await conn.fetchval("SELECT true FROM pg_dist_node "
                                   "WHERE nodename = $1 AND nodeport = $2", host, port):
            await conn.execute("SELECT citus_add_node($1, $2)", host, port)
            added.append(f"worker {host}:{port}")
    return added

