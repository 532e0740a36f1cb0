"""kwollect-setup-db-oar: link OAR's database, so that OAR jobs become kwollect jobs.

Runs as a PostgreSQL administrator of the kwollect database, after kwollect-setup-db.
It creates the postgres_fdw server `kwollect_oar` (OAR's database, read-only account),
the owner role's user mapping, four foreign tables in schema `oar` (the columns the
synchronisation reads), and sets job_source = 'oar'.  Job rows are then copied into
nodetime_per_job by kwollect.sync_jobs() (sql/070_oar.sql), from `kwollect maintain` and
update_promoted_metrics; get_metrics never reads OAR.  Re-running it only updates the
link (host, account, password); no job row is lost, and kwollect-setup-db keeps it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from collections.abc import Sequence
from typing import Any

import asyncpg

from kwollect.options import OptionError, positive_int, tool_options
from kwollect.store.setupdb import ADMIN_DEFAULTS, SetupError, connect_admin, role_names

log = logging.getLogger("kwollect.store.setupdb_oar")

DEFAULTS: dict[str, Any] = {
    **ADMIN_DEFAULTS,
    "oardb_host": "oar",
    "oardb_port": 5432,
    "oardb_name": "oar2",
    "oardb_user": "oarreader",
    "oardb_password": "",
    "oardb_password_file": "",
    "oardb_connect_timeout_s": 5,
    "oardb_statement_timeout_s": 30,
    "log_level": "warning",
}

SERVER = "kwollect_oar"

# The OAR 2.5 columns the synchronisation reads (schema version 2.5.x, public schema).
FOREIGN_TABLES = {
    "jobs": "job_id bigint, state text, start_time integer, stop_time integer, "
            "assigned_moldable_job integer",
    "job_types": "job_id integer, type text, types_index text",
    "assigned_resources": "moldable_job_id integer, resource_id bigint",
    "resources": "resource_id bigint, type text, network_address text",
}


async def _format(conn: asyncpg.Connection, template: str, *values: str) -> str:
    """A statement with identifiers (%I) and literals (%L) quoted by the server."""
    return await conn.fetchval("SELECT format($1::text, VARIADIC $2::text[])", template,
                               list(values))


async def link(conn: asyncpg.Connection, conf: dict[str, Any]) -> None:
    """Create or update the server, the user mapping and the foreign tables."""
    roles = role_names(conf["kwollect_user"])
    owner = roles["owner_role"]
    if not await conn.fetchval("SELECT to_regclass('kwollect.oar_sync_state') IS NOT NULL"):
        raise OptionError(f"database {conf['kwollect_db_name']} has no kwollect schema: "
                          "run kwollect-setup-db first")
    options = {"host": str(conf["oardb_host"]), "port": str(conf["oardb_port"]),
               "dbname": str(conf["oardb_name"]),
               "connect_timeout": str(positive_int(conf, "oardb_connect_timeout_s")),
               "options": f"-c statement_timeout={positive_int(conf, 'oardb_statement_timeout_s')}s"
                          " -c default_transaction_read_only=on",
               "application_name": "kwollect"}
    await conn.execute("CREATE EXTENSION IF NOT EXISTS postgres_fdw")
    exists = await conn.fetchval("SELECT true FROM pg_foreign_server WHERE srvname = $1", SERVER)
    if not exists:
        await conn.execute(await _format(conn, "CREATE SERVER %I FOREIGN DATA WRAPPER "
                                         "postgres_fdw", SERVER))
    current = await conn.fetchval(
        "SELECT coalesce(srvoptions, '{}') FROM pg_foreign_server WHERE srvname = $1", SERVER)
    present = {item.split("=", 1)[0] for item in current}
    for key, value in options.items():
        verb = "SET" if key in present else "ADD"
        await conn.execute(await _format(conn, f"ALTER SERVER %I OPTIONS ({verb} %I %L)",
                                         SERVER, key, value))
    await conn.execute(await _format(conn, "GRANT USAGE ON FOREIGN SERVER %I TO %I",
                                     SERVER, owner))
    mapping = await conn.fetchval(
        "SELECT true FROM pg_user_mappings WHERE srvname = $1 AND usename = $2", SERVER, owner)
    statement = await _format(
        conn, "ALTER USER MAPPING FOR %I SERVER %I OPTIONS (SET user %L, SET password %L)"
        if mapping else
        "CREATE USER MAPPING FOR %I SERVER %I OPTIONS (user %L, password %L)",
        owner, SERVER, str(conf["oardb_user"]), str(conf["oardb_password"]))
    async with conn.transaction():
        # the statement holds a password: keep it out of the server log
        await conn.execute("SET LOCAL log_statement = 'none'")
        await conn.execute("SET LOCAL log_min_error_statement = 'panic'")
        await conn.execute(statement)
    async with conn.transaction():
        await conn.execute(await _format(conn, "CREATE SCHEMA IF NOT EXISTS oar AUTHORIZATION %I",
                                         owner))
        await conn.execute(await _format(conn, "SET LOCAL ROLE %I", owner))
        for table, columns in FOREIGN_TABLES.items():
            await conn.execute(await _format(conn, "DROP FOREIGN TABLE IF EXISTS oar.%I", table))
            await conn.execute(await _format(
                conn, f"CREATE FOREIGN TABLE oar.%I ({columns}) SERVER %I "
                "OPTIONS (schema_name 'public', table_name %L)", table, SERVER, table))
        await conn.execute("UPDATE kwollect.settings SET value = 'oar' WHERE key = 'job_source'")


async def setup_oar(conf: dict[str, Any]) -> dict[str, Any]:
    """Link OAR, then run a first synchronisation; returns its summary."""
    if not conf["oardb_password"]:
        raise OptionError("oardb_password (or oardb_password_file) is mandatory: the OAR "
                          "read-only account's password")
    conn = await connect_admin(conf, conf["kwollect_db_name"])  # as root: as postgres
    try:
        await link(conn, conf)
        summary = json.loads(await conn.fetchval("SELECT kwollect.sync_jobs()::text"))
    finally:
        await conn.close()
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    conf = tool_options("kwollect-setup-db-oar", DEFAULTS, argv, description=__doc__)
    if conf is None:
        return 2
    try:
        summary = asyncio.run(setup_oar(conf))
    except (OptionError, OSError, asyncpg.PostgresError, SetupError) as exc:
        print(f"kwollect-setup-db-oar: {exc}", file=sys.stderr)
        return 1
    if "error" in summary:
        print(f"kwollect-setup-db-oar: OAR linked, but its database cannot be read yet: "
              f"{summary['error']}", file=sys.stderr)
        return 1
    print(f"OAR linked: {summary['jobs_read']} jobs read, {summary['rows_written']} job rows "
          f"written, {summary['open_jobs']} jobs waiting or running")
    return 0


if __name__ == "__main__":
    sys.exit(main())
