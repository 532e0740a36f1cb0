"""Adversarial checks of the SQL roles: what each login can call, set, read and break.

Each probe is a statement a holder of that role's credential could send with psql; every
one must fail with a privilege error (or the refusal named in the test), and none may
leave a trace.  Written from issue 10's trial: a reader's archive_partitions() call held an
ACCESS EXCLUSIVE lock that blocked every read, a writer's session settings steered the
owner's maintenance, and a BC date created a partition that stopped ingestion.
"""

from __future__ import annotations

import json

import asyncpg
import pytest

WRITER_DEFINER_ALLOWED = {"kwollect.ensure_partitions(timestamp with time zone[])",
                          "kwollect.maintain()",
                          # `kwollect maintain` and update_promoted_metrics copy OAR's jobs
                          "kwollect.sync_jobs()",
                          # kwollectors with failover_groups lease their target groups
                          "kwollect.lease_groups(text,integer,double precision,"
                          "double precision)"}

# Statements no role but the owner (and superusers) may run.
FORBIDDEN_TO_ALL = (
    "SELECT kwollect.archive_partitions()",
    "SELECT kwollect.relocate_default_rows()",
    "SELECT * FROM kwollect.api_secret",
    "UPDATE kwollect.settings SET value = '1' WHERE key = 'partitions_ahead'",
    "DELETE FROM kwollect.summary",
    "UPDATE kwollect.summary_state SET watermark = now() + interval '1 year'",
    "TRUNCATE kwollect.samples",
    "DROP VIEW public.metrics",
    "ALTER TABLE kwollect.samples ADD COLUMN evil int",
    "CREATE TABLE kwollect.evil (x int)",
    "CREATE TABLE public.evil (x int)",
    "CREATE FUNCTION api.evil() RETURNS int LANGUAGE sql AS 'SELECT 1'",
    "CREATE OR REPLACE FUNCTION kwollect.setting(p_key text) RETURNS text LANGUAGE sql "
    "AS 'SELECT NULL::text'",
    "CREATE SCHEMA evil",
    "ALTER ROLE kwuser_api PASSWORD 'stolen'",
    "ALTER ROLE kwuser_owner LOGIN",
    "SET ROLE kwuser_owner",
    "GRANT kwuser_owner TO CURRENT_USER",
    "SELECT pg_read_file('/etc/passwd')",
    "COPY kwollect.settings TO PROGRAM 'id'",
    "CREATE EXTENSION IF NOT EXISTS dblink",
    "ALTER DATABASE kwdb SET jit = on",
)
FORBIDDEN_TO_READER = (
    "SELECT kwollect.maintain()",
    "SELECT kwollect.ensure_partitions(ARRAY[now()])",
    "INSERT INTO public.metrics (device_id, metric_id) VALUES ('evil', 'm')",
    "SELECT * FROM api.insert_metrics('{\"device_id\": \"evil\", \"metric_id\": \"m\"}')",
    "INSERT INTO kwollect.written_batches (batch_id) VALUES (gen_random_uuid())",
    "DELETE FROM public.promoted_metrics",
    "SET ROLE kwuser",
)
# The gateway's login inherits nothing: before it switches role it can read nothing.
FORBIDDEN_TO_API_LOGIN = (
    "SELECT * FROM public.metrics LIMIT 1",
    "SELECT * FROM api.get_metrics(devices => 'x')",
    "INSERT INTO public.metrics (device_id, metric_id) VALUES ('evil', 'm')",
    "SELECT kwollect.maintain()",
)
PRIVILEGE_ERRORS = (asyncpg.InsufficientPrivilegeError, asyncpg.FeatureNotSupportedError,
                    asyncpg.UndefinedObjectError, asyncpg.ObjectNotInPrerequisiteStateError)


def _probes():
    for role in ("kwuser_ro", "kwuser", "kwuser_api"):
        for statement in FORBIDDEN_TO_ALL:
            if role != "kwuser_api" or "kwuser_api" not in statement:  # its own password
                yield role, statement
    for statement in FORBIDDEN_TO_READER:
        yield "kwuser_ro", statement
    for statement in FORBIDDEN_TO_API_LOGIN:
        yield "kwuser_api", statement


@pytest.mark.parametrize("role,statement", list(_probes()))
async def test_privilege_probe_is_refused(kwdb, role, statement):
    conn = await kwdb.connect(role)
    try:
        with pytest.raises(PRIVILEGE_ERRORS):
            async with conn.transaction():
                await conn.execute(statement)
    finally:
        await conn.close()


async def test_security_definer_functions_are_granted_by_name_only(admin):
    rows = await admin.fetch("""
        SELECT p.oid::regprocedure::text AS fn,
               has_function_privilege('kwuser_ro', p.oid, 'EXECUTE') AS reader,
               has_function_privilege('kwuser', p.oid, 'EXECUTE') AS writer,
               has_function_privilege('kwuser_api', p.oid, 'EXECUTE') AS api,
               coalesce(array_to_string(p.proacl, ','), 'default') AS acl
        FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
        WHERE p.prosecdef AND n.nspname NOT IN ('pg_catalog', 'information_schema')""")
    assert rows, "no SECURITY DEFINER function found"
    assert [r["fn"] for r in rows if r["reader"]] == []
    assert [r["fn"] for r in rows if r["api"]] == []
    assert {r["fn"] for r in rows if r["writer"]} == WRITER_DEFINER_ALLOWED
    # PUBLIC (an empty grantee before '=') never holds EXECUTE on them
    assert [r["fn"] for r in rows if r["acl"] == "default" or ",=X" in f",{r['acl']}"] == []


async def test_reader_cannot_lock_partitions_through_archiving(kwdb, admin, reader):
    """The trial's attack: SET LOCAL archive_tablespace, then archive_partitions() held open."""
    await admin.execute("SELECT kwollect.ensure_partitions(ARRAY[timestamptz '2020-03-01'])")
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        async with reader.transaction():
            await reader.execute("SET LOCAL kwollect.archive_tablespace = 'pg_default'")
            await reader.execute("SELECT kwollect.archive_partitions()")


async def test_session_settings_do_not_steer_owner_maintenance(admin, writer):
    before = await admin.fetchval("SELECT count(*) FROM kwollect.partitions")
    watermark = await admin.fetchval("SELECT watermark FROM kwollect.summary_state")
    async with writer.transaction():
        await writer.execute("SET LOCAL kwollect.partitions_ahead = '400'")
        await writer.execute("SET LOCAL kwollect.summary_lag_seconds = '-31536000'")
        await writer.execute("SET LOCAL kwollect.chunk_interval_hour = '1'")
        await writer.execute("SET LOCAL kwollect.archive_tablespace = 'pg_default'")
        assert await writer.fetchval("SELECT kwollect.setting('partitions_ahead')") == \
            await admin.fetchval("SELECT value FROM kwollect.settings "
                                 "WHERE key = 'partitions_ahead'")
        await writer.fetchval("SELECT kwollect.maintain()")
    ahead = int(await admin.fetchval("SELECT value FROM kwollect.settings "
                                     "WHERE key = 'partitions_ahead'"))
    assert await admin.fetchval("SELECT count(*) FROM kwollect.partitions") <= before + ahead + 2
    new_watermark = await admin.fetchval("SELECT watermark FROM kwollect.summary_state")
    assert new_watermark is None or await admin.fetchval("SELECT $1 <= now()", new_watermark)
    assert watermark is None or new_watermark >= watermark
    # partitions keep the configured width (not the 1 hour the session asked for)
    hours = int(await admin.fetchval("SELECT value FROM kwollect.settings "
                                     "WHERE key = 'chunk_interval_hour'"))
    widths = await admin.fetch("SELECT DISTINCT range_end - range_start AS w "
                               "FROM kwollect.partitions WHERE range_start > now()")
    assert all(r["w"].total_seconds() == hours * 3600 for r in widths)


@pytest.mark.parametrize("stamp", ["2026-12-05T00:00:00 BC", "1969-12-31T23:59:59",
                                   "2100-01-01T00:00:00", "20260-01-01T00:00:00",
                                   "-86400", "infinity", "-infinity", "100000000000"])
async def test_absurd_timestamps_are_refused_with_the_bound(writer, stamp):
    with pytest.raises(asyncpg.DataError) as caught:
        await writer.fetch("SELECT * FROM api.insert_metrics($1::jsonb)",
                           f'{{"device_id": "sec-ts", "metric_id": "m", "timestamp": "{stamp}"}}')
    assert "out of range" in caught.value.message
    if caught.value.sqlstate == "22008" and getattr(caught.value, "hint", None):
        assert "1970-01-01" in caught.value.hint and "2100-01-01" in caught.value.hint


async def test_bc_row_neither_partitions_nor_blocks_the_ad_row(admin, writer):
    stamp_bc, stamp_ad = "2026-12-05 00:00:00+00 BC", "2026-12-05 00:00:00+00"
    with pytest.raises(asyncpg.DataError):
        await writer.execute("INSERT INTO public.metrics (timestamp, device_id, metric_id, value) "
                             "VALUES ($1::text::timestamptz, 'sec-bc', 'm', 1)", stamp_bc)
    assert await writer.fetchval("SELECT kwollect.ensure_partitions(ARRAY[$1::text::timestamptz])",
                                 stamp_bc) == 0
    await writer.fetch("SELECT * FROM api.insert_metrics($1::jsonb)",
                       '{"device_id": "sec-bc", "metric_id": "m", "timestamp": '
                       '"2026-12-05T00:00:00", "value": 2}')
    assert await admin.fetchval("SELECT count(*) FROM public.metrics WHERE device_id = 'sec-bc' "
                                "AND timestamp = $1::text::timestamptz", stamp_ad) == 1
    assert await admin.fetchval("SELECT count(*) FROM kwollect.partitions "
                                "WHERE range_start < '0001-01-01'") == 0


class _Rollback(Exception):
    pass


async def test_partition_names_keep_the_era(admin):
    """Were the bound widened to BC dates, 2026 BC and 2026 AD still get two partitions."""
    with pytest.raises(_Rollback):
        async with admin.transaction():
            await admin.execute("UPDATE kwollect.settings SET value = '4000-01-01 00:00:00+00 BC' "
                                "WHERE key = 'min_timestamp'")
            await admin.execute("SELECT kwollect.ensure_partitions(ARRAY[timestamptz "
                                "'2026-12-05 00:00:00+00 BC', "
                                "timestamptz '2026-12-05 00:00:00+00'])")
            names = await admin.fetch(
                "SELECT name FROM kwollect.partitions, unnest(ARRAY[timestamptz "
                "'2026-12-05 00:00:00+00 BC', timestamptz '2026-12-05 00:00:00+00']) t "
                "WHERE t >= range_start AND t < range_end")
            assert len({r["name"] for r in names}) == 2
            assert any(r["name"].endswith("_bc") for r in names)
            raise _Rollback


@pytest.mark.parametrize("field", ["device_id", "metric_id"])
async def test_long_ids_are_refused_without_internal_names(writer, field):
    row = {"device_id": "sec-long", "metric_id": "m", field: "x" * 5000}
    with pytest.raises(asyncpg.StringDataRightTruncationError) as caught:
        await writer.fetch("SELECT * FROM api.insert_metrics($1::jsonb)", json.dumps(row))
    text = f"{caught.value.message} {getattr(caught.value, 'detail', '')}"
    assert "255" in text and "relation" not in text and "index" not in text
    await writer.fetch("SELECT * FROM api.insert_metrics($1::jsonb)",
                       f'{{"device_id": "sec-long", "metric_id": "{"y" * 255}"}}')


async def test_gateway_logs_in_apart_from_collectors(kwdb, admin):
    """A collector's credential cannot lock the gateway out: they are different logins."""
    assert 'db-uri = "postgres://kwuser_api:' in kwdb.postgrest_config
    assert await admin.fetchval("SELECT rolinherit FROM pg_roles WHERE rolname = 'kwuser_api'") \
        is False
    conn = await kwdb.connect("kwuser_api")
    try:
        await conn.execute("SET ROLE kwuser")
        await conn.execute("SET ROLE kwuser_ro")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute("SET ROLE kwuser_owner")
    finally:
        await conn.close()


async def test_sessions_run_without_jit_and_with_timeouts(kwdb):
    for role in ("kwuser", "kwuser_ro", "kwuser_api"):
        conn = await kwdb.connect(role)
        try:
            assert await conn.fetchval("SHOW jit") == "off"
            assert await conn.fetchval("SHOW idle_in_transaction_session_timeout") == "5min"
            assert await conn.fetchval("SHOW statement_timeout") == "5min"
        finally:
            await conn.close()


async def test_second_database_keeps_the_gateway_login(kwdb):
    """Roles belong to the cluster: setting up another kwollect database on the same server
    must not change the gateway login's password under the first database's gateway."""
    from kwollect.store.setupdb import setup
    from tests.fixtures.kwdb import setup_conf

    config, _ = await setup(setup_conf(kwdb.cluster, kwollect_db_name="kwdb_second_site"))
    assert f":{kwdb.api_password}@" in config
    conn = await kwdb.connect("kwuser_api")
    await conn.close()
