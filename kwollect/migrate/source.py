"""The Kwollect 1.x source database, read only through its own SQL relations.

`public.metrics` is read with plain SELECTs, so a TimescaleDB source decompresses its
compressed chunks itself; nothing here depends on how the source stores them.
"""

from __future__ import annotations

import os
from datetime import datetime
from urllib.parse import parse_qs, urlsplit

import asyncpg

from kwollect.errors import KwollectError


class SourceError(KwollectError):
    """The source cannot be read as a Kwollect 1.x database; the message says why."""


# kwollect's series labels are a JSON object; the reference took any jsonb.  NULL and JSON
# null become {}, any other non-object value is kept under the key "_labels".
LABELS = """CASE WHEN m.labels IS NULL OR m.labels = 'null' THEN '{}'::jsonb
                 WHEN jsonb_typeof(m.labels) = 'object' THEN m.labels
                 ELSE jsonb_build_object('_labels', m.labels) END"""

# Distinct rows of one time range, mapped to the target's series ids, as binary COPY rows of
# (timestamp, value, series_id): exactly what kwollect.samples takes, so the stream goes
# from the source to the target without being decoded.  Sorted by series, then time, so the
# target's pages hold each series' samples together.
RANGE_COPY = """
SELECT DISTINCT m."timestamp", m.value, map.sid
FROM public.metrics m
JOIN unnest($1::text[], $2::text[], $3::jsonb[], $4::integer[]) AS map(device, metric, labels, sid)
  ON m.device_id = map.device AND m.metric_id = map.metric
 AND """ + LABELS + """ = map.labels
WHERE m."timestamp" >= $5 AND m."timestamp" < $6
ORDER BY map.sid, m."timestamp"
"""

# Why kwollect.series cannot hold a series (NULL when it can): its ids are B-tree keys of at
# most 255 characters, its labels a JSON object of at most 2000 bytes (as for the metrics
# view).  Such rows are refused, counted and reported; the others of the range are copied.
REFUSED = """CASE WHEN length(m.device_id) > 255 OR length(m.metric_id) > 255
                   THEN 'device_id or metric_id longer than 255 characters'
                   WHEN pg_column_size((""" + LABELS + """)::text::jsonb) > 2000
                   THEN 'labels larger than 2000 bytes' END"""

RANGE_SERIES = """
SELECT m.device_id, m.metric_id, m.labels::text AS labels, m.n, """ + REFUSED + """ AS refused
FROM (SELECT m.device_id, m.metric_id, """ + LABELS + """ AS labels, count(*) AS n
      FROM public.metrics m
      WHERE m."timestamp" >= $1 AND m."timestamp" < $2
      GROUP BY 1, 2, 3) m
"""  # noqa: S608 (constant text)

# Per series and day, over the source's distinct rows (duplicates are kept once).
DAY_SUMMARY = """
SELECT m.device_id, m.metric_id, m.labels::text AS labels, count(*) AS n,
       count(m.value) AS valued,
       sum(m.value) FILTER (WHERE m.value NOT IN ('NaN', 'Infinity', '-Infinity')) AS total,
       count(*) FILTER (WHERE m.value = 'NaN') AS nan,
       count(*) FILTER (WHERE m.value IN ('Infinity', '-Infinity')) AS inf,
       """ + REFUSED + """ AS refused
FROM (SELECT DISTINCT m."timestamp", m.device_id, m.metric_id, """ + LABELS + """ AS labels,
                      m.value
      FROM public.metrics m WHERE m."timestamp" >= $1 AND m."timestamp" < $2) m
GROUP BY m.device_id, m.metric_id, m.labels
"""  # noqa: S608 (constant text)


def check_url(url: str) -> None:
    """The source URL must not carry a password: argv is readable by every local user."""
    parts = urlsplit(url)
    if parts.scheme not in ("postgresql", "postgres"):
        raise SourceError(f"--from must be a postgresql:// URL, got scheme {parts.scheme!r}")
    if parts.password is not None or "password" in parse_qs(parts.query):
        raise SourceError("--from must not contain a password (the command line is visible to "
                          "every local user): use --from_password_file FILE, PGPASSWORD or "
                          "~/.pgpass")


async def connect(url: str, password: str | None) -> asyncpg.Connection:
    check_url(url)
    try:
        conn = await asyncpg.connect(url, password=password or None)
    except (OSError, asyncpg.PostgresError) as exc:
        raise SourceError(f"cannot connect to the source: {exc}") from exc
    # The reference sets statement_timeout (1 h on the database, 5 min on its user): a range
    # may take longer to read.  The planner underestimates RANGE_COPY's join (by the labels
    # expression) a thousandfold and then merge-joins, sorting every row of the range by
    # its text ids and jsonb labels: 4.6-4.7 us of server CPU per row, against 2.2-2.4 with
    # a hash join on the series map (benchmarks/migrate.py stages, plain source).
    await conn.execute("SET statement_timeout = 0; SET work_mem = '128MB'; "
                       "SET idle_in_transaction_session_timeout = 0; SET enable_mergejoin = off")
    return conn


def read_password_file(path: str) -> str | None:
    if not path:
        return None
    try:
        with open(path) as handle:
            return handle.read().strip()
    except OSError as exc:
        raise SourceError(f"from_password_file: cannot read {path}: {exc.strerror}") from exc


async def describe(conn: asyncpg.Connection, url: str) -> str:
    """A name for the source that does not depend on how its URL is spelled."""
    columns = await conn.fetch(
        "SELECT attname, format_type(atttypid, atttypmod) AS type FROM pg_attribute "
        "WHERE attrelid = to_regclass('public.metrics') AND attnum > 0 AND NOT attisdropped")
    got = {r["attname"]: r["type"] for r in columns}
    wanted = {"timestamp": "timestamp with time zone", "device_id": "text", "metric_id": "text",
              "value": "double precision", "labels": "jsonb"}
    if any(got.get(name) != kind for name, kind in wanted.items()):
        raise SourceError(f"the source has no Kwollect 1.x metrics relation (public.metrics "
                          f"with {', '.join(wanted)}): found {got or 'nothing'}")
    try:
        system = await conn.fetchval("SELECT system_identifier::text FROM pg_control_system()")
    except asyncpg.PostgresError:
        parts = urlsplit(url)
        query = parse_qs(parts.query)
        host = parts.hostname or query.get("host", [os.environ.get("PGHOST", "")])[0]
        system = f"{host}:{parts.port or query.get('port', [''])[0]}"
    return f"{system}/{await conn.fetchval('SELECT current_database()')}"


async def next_timestamp(conn: asyncpg.Connection, after: datetime | None) -> datetime | None:
    """The first timestamp at or after `after` (index scan on the reference's indexes)."""
    if after is None:
        return await conn.fetchval('SELECT min("timestamp") FROM public.metrics')
    return await conn.fetchval(
        'SELECT min("timestamp") FROM public.metrics WHERE "timestamp" >= $1', after)


async def last_timestamp(conn: asyncpg.Connection) -> datetime | None:
    return await conn.fetchval('SELECT max("timestamp") FROM public.metrics')


async def null_timestamps(conn: asyncpg.Connection) -> int:
    """Rows a plain-PostgreSQL source may hold without a timestamp (they cannot be placed)."""
    return await conn.fetchval('SELECT count(*) FROM public.metrics WHERE "timestamp" IS NULL')


async def relation_kind(conn: asyncpg.Connection, name: str) -> str | None:
    """'table', 'view' (or other), or None when the relation does not exist."""
    kind = await conn.fetchval("SELECT relkind::text FROM pg_class WHERE oid = to_regclass($1)",
                               name)
    return {"r": "table", "p": "table", "v": "view", "m": "materialized view",
            "f": "foreign table"}.get(kind, kind)
