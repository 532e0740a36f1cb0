"""kwollect-setup-db: create or upgrade the kwollect database, its roles and its SQL API.

    kwollect-setup-db /etc/kwollect/setup-db.conf          (as root, on stock Debian)

Run as root with the database on its unix socket, it connects as the `postgres` system user
(peer authentication, as `runuser -u postgres` would) while it writes the files it makes as
root.  Password files that do not exist are created with fresh random passwords, mode 0640
and group `kwollect` (the services' group; `service_group`), and the API configuration is
written atomically with the same modes, replacing any looser file.  No role keeps a default
password.  Each step done is reported; a failure says what was done and what was not, and
re-running is safe: the SQL files are idempotent, the schema version is recorded, and
nothing it runs drops data, job tables or a view that a scheduler integration installed.
It ends with the commands to run next.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import logging
import os
import pwd
import re
import secrets
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

import asyncpg
import jwt

import kwollect
from kwollect.errors import KwollectError
from kwollect.options import OptionError, positive_int, tool_options
from kwollect.store import citus
from kwollect.store.secretfiles import default_group, new_secret, write_secret_file

log = logging.getLogger("kwollect.store.setupdb")

ADMIN_DEFAULTS: dict[str, Any] = {
    "db_host": "/var/run/postgresql/",
    "db_port": 5432,
    "db_admin": "postgres",
    "db_admin_password": "",
    "db_admin_password_file": "",
    "kwollect_db_name": "kwdb",
    "kwollect_user": "kwuser",
}
"""How the setup tools reach the kwollect database as an administrator (both take these)."""

DEFAULTS: dict[str, Any] = {
    **ADMIN_DEFAULTS,
    "kwollect_password": "",
    "kwollect_password_file": "",
    "kwollect_password_ro": "",
    "kwollect_password_ro_file": "",
    "chunk_interval_hour": 6,
    "chunk_compress_hour": 24,
    "timescaledb": "auto",
    "switch_storage": False,
    "request_timeout_min": 5,
    "max_rows": 20_000_000,
    "job_energy_metric": "bmc_node_power_watt",
    "archive_path": "",
    "archive_after_hour": 192,
    "retention_days": 0,
    "jobmetrics_requests_path": "",
    "token_expiry_days": 365,
    "postgrest_config_path": "",
    "service_group": "",
    "api_db_host": "",
    "log_level": "warning",
    "citus": False,
    "citus_workers": "",
    "citus_coordinator": "",
    "citus_shard_count": 32,
}


ARCHIVE_TABLESPACE = "kwollect_archive"


def retention_days(conf: dict[str, Any]) -> int:
    """--retention_days: 0 keeps raw samples forever, N > 0 drops them after N days."""
    value = conf["retention_days"]
    if value == 0:
        return 0
    return positive_int(conf, "retention_days")


def sql_dir() -> Path:
    """sql/ inside an installed wheel, or at the top of a source checkout."""
    package = Path(__file__).resolve().parents[1]
    for candidate in (package / "sql", package.parent / "sql"):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError("kwollect's sql/ directory is missing from the installation")


def sql_files() -> list[Path]:
    return sorted(sql_dir().glob("*.sql"))


def schema_version() -> str:
    return kwollect.version()


def role_names(user: str) -> dict[str, str]:
    """The roles: the writer keeps the reference login name, the reader its _ro twin.

    The API gateway logs in as its own role (`<user>_api`, NOINHERIT: it has no privilege
    until it switches to the writer or the reader per request, as PostgREST's
    authenticator): a collector's credential lets its holder change the writer's password
    (ALTER ROLE CURRENT_USER PASSWORD), which must not lock the gateway out.  The
    scheduler's hooks and the nodes' insert_user_metrics run as NOLOGIN roles of their own,
    which the gateway switches to as well.
    """
    return {"owner_role": f"{user}_owner", "writer_role": user, "reader_role": f"{user}_ro",
            "api_role": f"{user}_api", "scheduler_role": f"{user}_scheduler",
            "node_role": f"{user}_node"}


def make_token(secret: str, role: str, expiry_days: int) -> str:
    """An HS256 JWT for `role`, valid `expiry_days` days (0: never expires)."""
    claims: dict[str, Any] = {"role": role, "iat": int(time.time())}
    if expiry_days > 0:
        claims["exp"] = int(time.time()) + expiry_days * 86400
    return jwt.encode(claims, secret, algorithm="HS256")


async def _set_password(conn: asyncpg.Connection, role: str, password: str) -> None:
    # Utility statements take no bind parameters: quote on the server, and keep the
    # statement out of the server log.
    statement = await conn.fetchval(
        "SELECT format('ALTER ROLE %I PASSWORD %L', $1::text, $2::text)", role, password)
    async with conn.transaction():
        await conn.execute("SET LOCAL log_statement = 'none'")
        await conn.execute("SET LOCAL log_min_error_statement = 'panic'")
        await conn.execute(statement)


async def _ddl(conn: asyncpg.Connection, template: str, *idents: str) -> None:
    """Run a DDL statement whose identifiers are quoted by the server (format %I)."""
    statement = await conn.fetchval(
        "SELECT format($1::text, VARIADIC $2::text[])", template, list(idents))
    await conn.execute(statement)


async def ensure_roles(conn: asyncpg.Connection, roles: dict[str, str],
                       passwords: dict[str, str], login_all: bool = False) -> None:
    """`login_all` (Citus): the coordinator reaches the workers as the role of the query."""
    for key, role in roles.items():
        exists = await conn.fetchval("SELECT true FROM pg_roles WHERE rolname = $1", role)
        login = {"owner_role": "NOLOGIN", "api_role": "LOGIN NOINHERIT",
                 "scheduler_role": "NOLOGIN", "node_role": "NOLOGIN"}.get(key, "LOGIN")
        if login_all:
            login = login.replace("NOLOGIN", "LOGIN")
        if not exists:
            await _ddl(conn, f"CREATE ROLE %I {login} NOSUPERUSER NOCREATEDB NOCREATEROLE", role)
        else:
            await _ddl(conn, f"ALTER ROLE %I {login}", role)
        if key in passwords:
            await _set_password(conn, role, passwords[key])
    await _ddl(conn, "GRANT %I TO %I", roles["reader_role"], roles["writer_role"])
    await _ddl(conn, "GRANT %I, %I, %I, %I TO %I", roles["writer_role"], roles["reader_role"],
               roles["scheduler_role"], roles["node_role"], roles["api_role"])


async def ensure_database(conn: asyncpg.Connection, name: str, owner: str) -> None:
    exists = await conn.fetchval("SELECT true FROM pg_database WHERE datname = $1", name)
    if not exists:
        await _ddl(conn, "CREATE DATABASE %I OWNER %I ENCODING 'UTF8' TEMPLATE template0",
                   name, owner)
    else:
        await _ddl(conn, "ALTER DATABASE %I OWNER TO %I", name, owner)
    # PostgreSQL's default jit = on compiles the API's plans (their estimated cost is over
    # jit_above_cost): a 4-row get_metrics took 1.3-2.5 s ("JIT: Functions 343"), and under
    # 50 clients 85-90 % of requests timed out.  Off for every session of this database.
    await _ddl(conn, "ALTER DATABASE %I SET jit = off", name)


STORAGE_NAMES = {"stock": "stock PostgreSQL partitions", "timescaledb": "a TimescaleDB hypertable"}


async def existing_storage(conn: asyncpg.Connection) -> str | None:
    """The storage of an existing kwollect.samples (None in a new database), as
    kwollect.storage() tells it: a partitioned table is stock, anything else a hypertable."""
    kind = await conn.fetchval(
        "SELECT relkind::text FROM pg_class WHERE oid = to_regclass('kwollect.samples')")
    return None if kind is None else "stock" if kind == "p" else "timescaledb"


async def timescaledb_unusable(conn: asyncpg.Connection,
                               conf: dict[str, Any]) -> str | None:
    """None when the server can keep the samples on a compressed hypertable, else why not.

    The extension must be installed and preloaded, and not the Apache-2 build alone: license
    `apache` has no native compression, so kwollect's own compaction on stock PostgreSQL
    serves better.  The license is only known once the extension exists in the database:
    it is created, on a connection of its own (a session that loaded one version of the
    library cannot create the extension again), in a transaction that is rolled back.
    """
    if not await conn.fetchval(
            "SELECT true FROM pg_available_extensions WHERE name = 'timescaledb'"):
        return "the TimescaleDB extension is not installed on the database server"
    probe = await connect_admin(conf, conf["kwollect_db_name"])
    undone = probe.transaction()
    try:
        await undone.start()
        await probe.execute("CREATE EXTENSION IF NOT EXISTS timescaledb")
        license_ = await probe.fetchval("SELECT current_setting('timescaledb.license', true)")
        await undone.rollback()
    except asyncpg.PostgresError as exc:
        return f"TimescaleDB cannot be created in the database: {str(exc).splitlines()[0]}"
    finally:
        await probe.close()
    if license_ == "apache":
        return ("the server runs TimescaleDB's Apache-2 build only (timescaledb.license = "
                "apache), which has no native compression")
    return None


def choose_storage(conf: dict[str, Any], current: str | None, unusable: str | None) -> str:
    """The storage to set up: `timescaledb` (auto, on, off) against what the database has."""
    wanted = str(conf["timescaledb"]).lower()
    if wanted not in ("auto", "on", "off"):
        raise OptionError(f"timescaledb: expected auto, on or off, got {conf['timescaledb']!r}")
    if wanted == "auto":
        if conf["switch_storage"]:
            raise OptionError("switch_storage: say which storage to switch to "
                              "(--timescaledb on or off)")
        if current == "timescaledb" and unusable:
            raise SetupError(f"the database keeps its samples on TimescaleDB, but {unusable}")
        if current is None and unusable:
            log.info("TimescaleDB not used: %s", unusable)
        return current or ("stock" if unusable else "timescaledb")
    target = "timescaledb" if wanted == "on" else "stock"
    if unusable and "timescaledb" in (target, current):
        raise SetupError(f"--timescaledb {wanted}: {unusable}; with --timescaledb off (or auto) "
                         f"the samples stay on stock PostgreSQL with kwollect's compaction")
    if current not in (None, target) and not conf["switch_storage"]:
        raise SetupError(
            f"database {conf['kwollect_db_name']} keeps its samples in "
            f"{STORAGE_NAMES[str(current)]}; to move them to {STORAGE_NAMES[target]}, run again "
            f"with --switch_storage (every sample is copied, in one transaction: stop the "
            f"collectors first, they spool meanwhile; docs/storage.md)")
    return target


async def prepare_storage(conn: asyncpg.Connection, conf: dict[str, Any]) -> tuple[str, str | None]:
    """(storage to set up, storage to switch from or None); creates the extension if needed."""
    current = await existing_storage(conn)
    storage = choose_storage(conf, current, await timescaledb_unusable(conn, conf))
    if storage == "timescaledb":
        await conn.execute("CREATE EXTENSION IF NOT EXISTS timescaledb")
        schema = await conn.fetchval("SELECT extnamespace::regnamespace::text FROM pg_extension "
                                     "WHERE extname = 'timescaledb'")
        if schema != "public":
            raise SetupError(f"TimescaleDB is installed in schema {schema} of database "
                             f"{conf['kwollect_db_name']}; kwollect needs it in public")
    return storage, current if current not in (None, storage) else None


async def apply_schema(conn: asyncpg.Connection, conf: dict[str, Any],
                       roles: dict[str, str], storage: str = "stock",
                       switch_from: str | None = None) -> int | None:
    """Apply sql/*.sql as the owner role, with the settings the files read.

    With `switch_from`, the database's samples move from that storage to `storage`: the
    schema is brought up to date on the old storage, its samples set aside, the files
    applied again to create the new storage, and every sample copied (their number is
    returned), in the same transaction.
    """
    files = sql_files()
    async with conn.transaction():
        await _ddl(conn, "SET LOCAL ROLE %I", roles["owner_role"])
        await conn.execute(files[0].read_text())
        settings = {**roles,
                    "storage": switch_from or storage,
                    "chunk_interval_hour": str(positive_int(conf, "chunk_interval_hour")),
                    "chunk_compress_hour": str(positive_int(conf, "chunk_compress_hour")),
                    "max_rows": str(int(conf["max_rows"])),
                    "job_energy_metric": str(conf["job_energy_metric"]),
                    "archive_tablespace": ARCHIVE_TABLESPACE if conf["archive_path"] else "",
                    "archive_after_hour": str(positive_int(conf, "archive_after_hour")),
                    "citus": "on" if conf["citus"] else "off",
                    "citus_shard_count": str(positive_int(conf, "citus_shard_count")),
                    "retention_days": str(retention_days(conf))}
        await conn.executemany(
            "INSERT INTO kwollect.settings (key, value) VALUES ($1, $2) "
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value", list(settings.items()))
        await _apply_files(conn, files[1:])
        copied = None
        if switch_from:
            await conn.execute("SELECT kwollect.switch_storage_begin()")
            await conn.execute("UPDATE kwollect.settings SET value = $1 WHERE key = 'storage'",
                               storage)
            await _apply_files(conn, files[1:])
            copied = await conn.fetchval("SELECT kwollect.switch_storage_finish()")
        await conn.execute(
            "INSERT INTO kwollect.schema_version (version) VALUES ($1) ON CONFLICT DO NOTHING",
            schema_version())
        await conn.execute("SELECT kwollect.maintain()")
    return copied


async def _apply_files(conn: asyncpg.Connection, files: list[Path]) -> None:
    for path in files:
        try:
            await conn.execute(path.read_text())
        except asyncpg.PostgresError as exc:
            raise RuntimeError(f"{path.name}: {exc}") from exc


async def load_jobmetrics_requests(conn: asyncpg.Connection, path: str) -> int:
    """Replace the job-wide metrics requests by the lines of `path` (blank and # lines skipped)."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as exc:
        raise OptionError(f"jobmetrics_requests_path: cannot read {path}: {exc.strerror}") from exc
    requests = [(n, line.strip()) for n, line in enumerate(lines, 1)
                if line.strip() and not line.lstrip().startswith("#")]
    async with conn.transaction():
        await conn.execute("DELETE FROM kwollect.jobmetrics_requests")
        await conn.executemany(
            "INSERT INTO kwollect.jobmetrics_requests (position, request) VALUES ($1, $2)",
            requests)
    return len(requests)


async def api_secret(conn: asyncpg.Connection, owner: str) -> str:
    """The JWT secret: random, created once, readable by the owner only."""
    await conn.execute("CREATE TABLE IF NOT EXISTS kwollect.api_secret ("
                       " singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),"
                       " secret text NOT NULL)")
    await _ddl(conn, "ALTER TABLE kwollect.api_secret OWNER TO %I", owner)
    await conn.execute(
        "INSERT INTO kwollect.api_secret (secret) VALUES ($1) ON CONFLICT DO NOTHING",
        secrets.token_urlsafe(48))
    return await conn.fetchval("SELECT secret FROM kwollect.api_secret")


async def ensure_archive(conn: asyncpg.Connection, path: str, owner: str) -> None:
    """The archive tablespace at `path` (a directory the PostgreSQL server owns)."""
    location = await conn.fetchval("SELECT pg_tablespace_location(oid) FROM pg_tablespace "
                                   "WHERE spcname = $1", ARCHIVE_TABLESPACE)
    if location is None:
        statement = await conn.fetchval(
            "SELECT format('CREATE TABLESPACE %I OWNER %I LOCATION %L', $1::text, $2::text, "
            "$3::text)", ARCHIVE_TABLESPACE, owner, path)
        await conn.execute(statement)
    elif location != path.rstrip("/"):
        raise OptionError(f"archive_path: tablespace {ARCHIVE_TABLESPACE} already lives in "
                          f"{location}, not {path}")


async def set_timeouts(conn: asyncpg.Connection, conf: dict[str, Any],
                       roles: dict[str, str]) -> None:
    """statement_timeout and idle_in_transaction_session_timeout for the login roles.

    A transaction left open holds locks that make maintenance (ATTACH PARTITION) wait,
    and every reader then queues behind maintenance: idle transactions end after the
    request timeout too.
    """
    minutes = positive_int(conf, "request_timeout_min")
    for key in ("writer_role", "reader_role", "api_role"):
        for name in ("statement_timeout", "idle_in_transaction_session_timeout"):
            statement = await conn.fetchval(
                "SELECT format('ALTER ROLE %I IN DATABASE %I SET %I = %L',"
                " $1::text, $2::text, $3::text, $4::text)",
                roles[key], conf["kwollect_db_name"], name, f"{minutes}min")
            await conn.execute(statement)


def password_matches(verifier: str | None, password: str, role: str) -> bool:
    """Whether `password` is the one pg_authid keeps as `verifier` (SCRAM-SHA-256 or md5)."""
    if not verifier:
        return False
    if verifier.startswith("md5"):
        digest = hashlib.md5((password + role).encode(), usedforsecurity=False).hexdigest()
        return hmac.compare_digest(verifier, "md5" + digest)
    match = re.fullmatch(r"SCRAM-SHA-256\$(\d+):([^$]+)\$([^:]+):(.+)", verifier)
    if not match:
        return False
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), base64.b64decode(match[2]),
                                 int(match[1]))
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    return hmac.compare_digest(hashlib.sha256(client_key).digest(), base64.b64decode(match[3]))


async def _password_kept_elsewhere(conn: asyncpg.Connection, conf: dict[str, Any],
                                   role: str, verifier: str) -> str | None:
    """The gateway login's password as another kwollect database of the cluster keeps it.

    Roles belong to the cluster, passwords are kept per database: a second kwollect
    database set up on the same server must reuse the first one's, or its setup would lock
    the first database's gateway out.
    """
    for (name,) in await conn.fetch("SELECT datname FROM pg_database "
                                    "WHERE datallowconn AND NOT datistemplate"):
        try:
            other = await connect_admin(conf, name)
        except (OSError, asyncpg.PostgresError, SetupError):
            continue
        try:
            if await other.fetchval(
                    "SELECT count(*) FROM information_schema.columns WHERE table_schema = "
                    "'kwollect' AND table_name = 'api_secret' AND column_name = 'api_password'"):
                kept = await other.fetchval("SELECT api_password FROM kwollect.api_secret")
                if kept and password_matches(verifier, kept, role):
                    return kept
        finally:
            await other.close()
    return None


async def api_login_password(conn: asyncpg.Connection, roles: dict[str, str],
                             conf: dict[str, Any]) -> str:
    """The gateway login's password: random, kept next to the JWT secret, set on the role.

    Kept so that re-running setup does not lock out a gateway started with the last
    configuration; readable by the owner (and superusers) only.
    """
    role = roles["api_role"]
    await conn.execute("ALTER TABLE kwollect.api_secret ADD COLUMN IF NOT EXISTS api_password text")
    kept = await conn.fetchval("SELECT api_password FROM kwollect.api_secret")
    try:
        verifier = await conn.fetchval("SELECT rolpassword FROM pg_authid WHERE rolname = $1",
                                       role)
    except asyncpg.InsufficientPrivilegeError:  # an administrator that is not superuser
        verifier = None
    if kept and password_matches(verifier, kept, role):
        return kept
    password = await _password_kept_elsewhere(conn, conf, role, verifier) \
        if verifier else None
    if password is None:
        password = kept or secrets.token_urlsafe(32)
        if verifier:
            log.warning("%s had a password no kwollect database knows: it is replaced; "
                        "rewrite the configuration of API gateways that log in as %s",
                        role, role)
        await _set_password(conn, role, password)
    await conn.execute("UPDATE kwollect.api_secret SET api_password = $1", password)
    return password


def postgrest_config(conf: dict[str, Any], roles: dict[str, str], secret: str,
                     api_password: str) -> str:
    host = conf["api_db_host"] or ("localhost" if str(conf["db_host"]).startswith("/")
                                   else conf["db_host"])
    uri = (f"postgres://{quote(roles['api_role'], safe='')}:"
           f"{quote(api_password, safe='')}@{host}:{conf['db_port']}/"
           f"{quote(conf['kwollect_db_name'], safe='')}")
    return (f'db-uri = "{uri}"\n'
            f'db-schemas = "api"\n'
            f'db-anon-role = "{roles["reader_role"]}"\n'
            f'jwt-secret = "{secret}"\n')


def peer_user(conf: dict[str, Any]) -> pwd.struct_passwd | None:
    """The system user to connect as: db_admin's namesake, when run as root over a unix
    socket without an admin password (stock Debian: peer authentication for postgres)."""
    if os.geteuid() != 0 or not str(conf["db_host"]).startswith("/") \
            or conf["db_admin_password"]:
        return None
    try:
        return pwd.getpwnam(conf["db_admin"])
    except KeyError:
        return None


async def connect_admin(conf: dict[str, Any], database: str) -> asyncpg.Connection:
    """A connection as db_admin; as root, made with the effective uid of `peer_user`.

    Peer authentication reads the credentials of the socket's connect(), so only that
    call runs as the system user; the process is root again before and after.
    """
    kwargs = {"host": conf["db_host"], "port": conf["db_port"], "user": conf["db_admin"],
              "password": conf["db_admin_password"] or None, "database": database}
    user = peer_user(conf)
    try:
        if user is None:
            return await asyncpg.connect(**kwargs)
        os.seteuid(user.pw_uid)
        try:
            return await asyncpg.connect(**kwargs)
        finally:
            os.seteuid(0)
    except OSError as exc:
        raise SetupError(f"cannot reach the database server at {conf['db_host']} port "
                         f"{conf['db_port']}: {exc.strerror or exc}") from None
    except asyncpg.InvalidAuthorizationSpecificationError as exc:
        how = (f"connected as the system user {user.pw_name}" if user else
               "run as root, setup connects as the postgres system user over the unix socket "
               "(peer authentication)")
        raise SetupError(f"{exc} (db_admin {conf['db_admin']!r} at {conf['db_host']}: {how}; "
                         f"or give db_admin_password_file)") from None


class SetupError(KwollectError, RuntimeError):
    """A failure of the database part, with what to do."""


LEGACY_READER_PASSWORD = "ro"
"""The read-only role's default password of earlier releases: replaced at upgrade."""


async def reader_needs_password(conn: asyncpg.Connection, role: str) -> bool:
    """True for a new role, one without a password, or one with the old default `ro`."""
    if not await conn.fetchval("SELECT true FROM pg_roles WHERE rolname = $1", role):
        return True
    try:
        stored = await conn.fetchval("SELECT rolpassword FROM pg_authid WHERE rolname = $1",
                                     role)
    except asyncpg.InsufficientPrivilegeError:  # not a superuser: cannot tell, keep it
        return False
    return stored is None or password_matches(stored, LEGACY_READER_PASSWORD, role)


async def prepare_node(admin: asyncpg.Connection, conf: dict[str, Any], roles: dict[str, str],
                       passwords: dict[str, str]) -> None:
    """Roles, database and role settings on one server (the coordinator or a worker)."""
    await ensure_roles(admin, roles, passwords, login_all=bool(conf["citus"]))
    await ensure_database(admin, conf["kwollect_db_name"], roles["owner_role"])
    await set_timeouts(admin, conf, roles)
    if conf["citus"]:
        await citus.database_settings(admin, conf["kwollect_db_name"], roles["writer_role"])


async def citus_check_nodes(admin: asyncpg.Connection, conf: dict[str, Any]) -> None:
    """Every node (this one, then each worker) loads Citus, before anything is changed."""
    await citus.require_preloaded(admin, "this server")
    for host, port in citus.parse_nodes(conf["citus_workers"], "citus_workers"):
        worker = await connect_admin({**conf, "db_host": host, "db_port": port}, "postgres")
        try:
            await citus.require_preloaded(worker, f"worker {host}:{port}")
        finally:
            await worker.close()


async def prepare_citus_workers(conf: dict[str, Any], roles: dict[str, str],
                                passwords: dict[str, str], done: list[str]) -> None:
    """Each worker: the same roles and database as the coordinator, with citus in it."""
    for host, port in citus.parse_nodes(conf["citus_workers"], "citus_workers"):
        node = {**conf, "db_host": host, "db_port": port}
        admin = await connect_admin(node, "postgres")
        try:
            await prepare_node(admin, node, roles, passwords)
        finally:
            await admin.close()
        conn = await connect_admin(node, conf["kwollect_db_name"])
        try:
            await citus.ensure_extension(conn)
        finally:
            await conn.close()
        done.append(f"worker {host}:{port}: roles, database, citus")


async def setup(conf: dict[str, Any], done: list[str] | None = None) -> tuple[str, str]:
    """Create or upgrade everything; returns (PostgREST configuration, writer token).

    Each step done is appended to `done`.  Without a read-only password, the read-only role
    gets a random one if it has none (or the old default): it is then in
    conf["kwollect_password_ro"] and the caller must hand it on.
    """
    done = [] if done is None else done
    citus.check_combination(conf)
    if not conf["kwollect_password"]:
        raise OptionError("kwollect_password (or kwollect_password_file) is mandatory")
    roles = role_names(conf["kwollect_user"])
    admin = await connect_admin(conf, "postgres")
    try:
        if conf["citus"]:
            await citus_check_nodes(admin, conf)
        passwords = {"writer_role": conf["kwollect_password"]}
        if conf["kwollect_password_ro"]:
            passwords["reader_role"] = conf["kwollect_password_ro"]
        elif await reader_needs_password(admin, roles["reader_role"]):
            conf["kwollect_password_ro"] = passwords["reader_role"] = new_secret()
        await prepare_node(admin, conf, roles, passwords)
        done.append(f"roles {', '.join(roles.values())} (passwords of "
                    f"{', '.join(roles[k] for k in passwords)} set)")
        if conf["archive_path"]:
            await ensure_archive(admin, conf["archive_path"], roles["owner_role"])
        done.append(f"database {conf['kwollect_db_name']}")
    finally:
        await admin.close()
    if conf["citus"]:
        await prepare_citus_workers(conf, roles, passwords, done)
    conn = await connect_admin(conf, conf["kwollect_db_name"])
    try:
        await citus.check_database(conn, conf)
        if conf["citus"]:
            await citus.ensure_extension(conn)
            done += await citus.register_nodes(conn, citus.coordinator_address(conf),
                                               citus.parse_nodes(conf["citus_workers"],
                                                                 "citus_workers"))
        storage, switch_from = await prepare_storage(conn, conf)
        copied = await apply_schema(conn, conf, roles, storage, switch_from)
        done.append(f"schema {schema_version()} applied; samples in {STORAGE_NAMES[storage]}")
        if switch_from:
            done.append(f"switched from {STORAGE_NAMES[switch_from]}: {copied} samples copied")
        if conf["jobmetrics_requests_path"]:
            count = await load_jobmetrics_requests(conn, conf["jobmetrics_requests_path"])
            log.info("loaded %d job metrics requests", count)
        secret = await api_secret(conn, roles["owner_role"])
        api_password = await api_login_password(conn, roles, conf)
    finally:
        await conn.close()
    token = make_token(secret, roles["writer_role"], int(conf["token_expiry_days"]))
    return postgrest_config(conf, roles, secret, api_password), token


def config_secret(config: str) -> str:
    """The jwt-secret of a configuration written by postgrest_config()."""
    for line in config.splitlines():
        key, _, value = line.partition(" = ")
        if key == "jwt-secret":
            return value.strip('"')
    raise ValueError("jwt-secret missing from the configuration")


PASSWORDS = (("kwollect_password", "writer"), ("kwollect_password_ro", "read-only"))


def create_missing_password_files(conf: dict[str, Any], group: str, done: list[str]) -> None:
    """A `*_password_file` that does not exist gets a fresh random password."""
    for key, what in PASSWORDS:
        path = conf[f"{key}_file"]
        if conf[key] or not path or os.path.exists(path):
            continue
        conf[key] = new_secret()
        mode = write_secret_file(path, conf[key] + "\n", group)
        done.append(f"created {path} ({mode}): a new random {what} password")


def next_steps(conf: dict[str, Any]) -> str:
    config = conf["postgrest_config_path"] or "/etc/kwollect/api.conf"
    return (
        "Next:\n"
        f"  systemctl enable --now kwollect-api.service kwollect-maintain.timer"
        f"      # the API (reads {config})\n"
        "  $EDITOR /etc/kwollect/metrics.d/*.yaml /etc/kwollect/kwollector.conf\n"
        "  kwollector /etc/kwollect/kwollector.conf --check\n"
        "  systemctl enable --now kwollector@kwollector.service\n"
        "  curl 'http://localhost:3000/rpc/get_metrics?devices=<device>'")


def main(argv: Sequence[str] | None = None) -> int:
    conf = tool_options("kwollect-setup-db", DEFAULTS, argv, description=__doc__,
                        may_be_missing=frozenset({"kwollect_password_file",
                                                  "kwollect_password_ro_file"}))
    if conf is None:
        return 2
    done: list[str] = []
    try:
        group = {"": default_group(), "none": ""}.get(conf["service_group"],
                                                     conf["service_group"])
        create_missing_password_files(conf, group, done)
        ro_given = bool(conf["kwollect_password_ro"])
        config, token = asyncio.run(setup(conf, done))
        target = conf["postgrest_config_path"]
        if target:
            mode = write_secret_file(target, config, group)
            done.append(f"wrote {target} ({mode})")
    except (OptionError, OSError, ValueError, asyncpg.PostgresError, RuntimeError) as exc:
        print(f"kwollect-setup-db: {exc}", file=sys.stderr)
        if done:
            print("Done before the failure:\n" + "".join(f"  - {d}\n" for d in done)
                  + "Not done: the rest; fix the cause and run the same command again "
                  "(it is safe to re-run).", file=sys.stderr)
        else:
            print("Nothing was changed.", file=sys.stderr)
        return 1
    print("kwollect-setup-db: done\n" + "".join(f"  - {d}\n" for d in done))
    if not target:
        print("PostgREST / kwollect-api configuration:\n")
        print(config)
    if not ro_given and conf["kwollect_password_ro"]:
        print(f"Password of the read-only role {role_names(conf['kwollect_user'])['reader_role']}"
              f" (for Grafana; give kwollect_password_ro_file to keep it in a file):\n"
              f"{conf['kwollect_password_ro']}\n")
    if target:
        print(next_steps(conf) + "\n")
    print("Scheduler token (job_start, job_end and update_promoted_metrics only; for the "
          "scheduler's prolog/epilog hooks):\n")
    print(make_token(config_secret(config), role_names(conf["kwollect_user"])["scheduler_role"],
                     int(conf["token_expiry_days"])))
    print()
    print(f"API token (writer role, expires in {conf['token_expiry_days']} days; 0 = never):\n")
    print(token)
    return 0


if __name__ == "__main__":
    sys.exit(main())
