"""Every function of schema `api` has a COMMENT ON: it is the OpenAPI text kwollect-api
serves at / (summary and description of /rpc/<name>)."""

from __future__ import annotations


async def test_every_api_function_has_a_comment(admin):
    rows = await admin.fetch("""
        SELECT p.oid::regprocedure::text AS signature,
               coalesce(obj_description(p.oid, 'pg_proc'), '') AS comment
        FROM pg_proc p
        WHERE p.pronamespace = 'api'::regnamespace
        ORDER BY 1""")
    assert len(rows) >= 5  # get_metrics (both forms), available_metrics, insert_metrics...
    assert [r["signature"] for r in rows if len(r["comment"].strip()) < 20] == []
