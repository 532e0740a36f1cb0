"""kwollect-api settings: the PostgREST configuration file, PGRST_* variables, then options.

The file is the one kwollect-setup-db prints for PostgREST (``key = "value"`` lines, a TOML
subset), so a site swaps PostgREST for kwollect-api without rewriting it.  Precedence, as in
PostgREST: defaults < file < PGRST_<KEY> environment variables; the command line comes last.
Secrets are read from the file, the environment or secret files, never from argv.
"""

from __future__ import annotations

import argparse
import base64
import logging
import os
import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kwollect.gateway.callers import IpNetwork, load_node_map, parse_networks
from kwollect.options import OptionError

log = logging.getLogger("kwollect.api")

POSTGREST_KEYS = {
    "db-uri", "db-schemas", "db-schema", "db-anon-role", "db-pool", "db-extra-search-path",
    "db-pool-acquisition-timeout", "jwt-secret", "jwt-secret-is-base64", "jwt-aud",
    "jwt-role-claim-key", "server-host", "server-port", "log-level",
}
OWN_KEYS = {
    "kwollect-max-rows", "kwollect-max-body-bytes", "kwollect-jwt-secret-file",
    "kwollect-db-password-file", "kwollect-hold-bytes", "kwollect-max-anon-body-bytes",
    "kwollect-max-param-bytes", "kwollect-max-json-depth", "kwollect-header-timeout",
    "kwollect-body-timeout", "kwollect-send-timeout", "kwollect-max-connections",
    "kwollect-spool-bytes", "kwollect-max-exports-per-role", "kwollect-max-exports-per-client",
    "kwollect-node-map-file", "kwollect-node-reverse-dns", "kwollect-trusted-proxies",
    "kwollect-node-role",
}
REPLICA_KEYS = {"db-read-uri", "db-read-fallback"}
"""Read replicas (docs/gateway.md): PostgREST's naming, though PostgREST has no such keys."""
DEFAULTS: dict[str, Any] = {
    "db-uri": "postgresql://",
    "db-read-uri": "",
    "db-read-fallback": True,
    "db-schemas": "public",
    "db-anon-role": "",
    "db-extra-search-path": "public",
    "db-pool": 10,
    "db-pool-acquisition-timeout": 10,
    "jwt-secret": "",
    "jwt-secret-is-base64": False,
    "jwt-aud": "",
    "jwt-role-claim-key": ".role",
    "server-host": "!4",
    "server-port": 3000,
    "log-level": "info",
    "kwollect-max-rows": 0,
    "kwollect-max-body-bytes": 64 * 1024 * 1024,
    "kwollect-jwt-secret-file": "",
    "kwollect-db-password-file": "",
    "kwollect-hold-bytes": 256 * 1024,
    # Request bounds (docs/gateway.md, "Limits"): anonymous callers only read, so 1 MiB
    # of body is plenty; writers send batches of rows up to kwollect-max-body-bytes.
    "kwollect-max-anon-body-bytes": 1024 * 1024,
    "kwollect-max-param-bytes": 1024 * 1024,
    "kwollect-max-json-depth": 64,
    "kwollect-header-timeout": 10,
    "kwollect-body-timeout": 60,
    "kwollect-send-timeout": 30,
    "kwollect-max-connections": 1000,
    "kwollect-spool-bytes": 256 * 1024 * 1024,
    # Streamed responses at once (docs/gateway.md, "Limits"); per role: db-pool - 2 (at
    # least 1) unless set, so that a role's stalled exports leave connections to the rest.
    "kwollect-max-exports-per-role": None,
    "kwollect-max-exports-per-client": 4,
    "kwollect-node-map-file": "",
    "kwollect-node-reverse-dns": False,
    "kwollect-trusted-proxies": "",
    "kwollect-node-role": "",
}
LOG_LEVELS = {"crit": logging.CRITICAL, "critical": logging.CRITICAL, "error": logging.ERROR,
              "warn": logging.WARNING, "warning": logging.WARNING, "info": logging.INFO,
              "debug": logging.DEBUG}
_ENV_REF = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


@dataclass(frozen=True)
class Settings:
    db_uri: str
    db_password: str | None
    schemas: tuple[str, ...]
    extra_search_path: tuple[str, ...]
    anon_role: str | None
    jwt_secret: bytes | None
    jwt_aud: str | None
    role_claim_path: tuple[str | int, ...]
    server_host: str | None
    server_port: int
    pool_size: int
    pool_timeout: float
    max_rows: int
    max_body_bytes: int
    hold_bytes: int
    log_level: int
    max_anon_body_bytes: int = DEFAULTS["kwollect-max-anon-body-bytes"]
    max_param_bytes: int = DEFAULTS["kwollect-max-param-bytes"]
    max_json_depth: int = DEFAULTS["kwollect-max-json-depth"]
    header_timeout: float = DEFAULTS["kwollect-header-timeout"]
    body_timeout: float = DEFAULTS["kwollect-body-timeout"]
    send_timeout: float = DEFAULTS["kwollect-send-timeout"]
    max_connections: int = DEFAULTS["kwollect-max-connections"]
    spool_bytes: int = DEFAULTS["kwollect-spool-bytes"]
    max_exports_per_role: int = 0
    """Streamed responses at once per role (0: no cap)."""
    max_exports_per_client: int = DEFAULTS["kwollect-max-exports-per-client"]
    """Streamed responses at once per client address (0: no cap)."""
    app_settings: dict[str, str] = field(default_factory=dict)
    # insert_user_metrics: callers named from their address (kwollect.gateway.callers)
    node_map: dict[str, str] = field(default_factory=dict)
    node_reverse_dns: bool = False
    trusted_proxies: tuple[IpNetwork, ...] = ()
    node_role: str | None = None
    db_read_uri: str | None = None
    """A hot standby for read-only calls; None: everything on db_uri."""
    read_fallback: bool = True
    """Read-only calls go to the primary while the standby cannot be reached (else 503)."""


def parse_role_claim_key(text: str) -> tuple[str | int, ...]:
    """PostgREST's jwt-role-claim-key: ``.role``, ``."https://x.org/c".role``, ``.r[0]``."""
    path: list[str | int] = []
    pos = 0
    token = re.compile(r'\.(?:"((?:[^"\\]|\\.)*)"|([A-Za-z0-9_$@-]+))|\[(\d+)\]')
    while pos < len(text):
        match = token.match(text, pos)
        if not match:
            raise OptionError(f"jwt-role-claim-key: cannot parse {text!r} at position {pos}")
        quoted, bare, index = match.groups()
        if index is not None:
            path.append(int(index))
        else:
            path.append(bare if bare is not None else quoted.replace('\\"', '"'))
        pos = match.end()
    if not path:
        raise OptionError("jwt-role-claim-key must not be empty")
    return tuple(path)


def _interpolate(value: Any, env: Mapping[str, str]) -> Any:
    """PostgREST's $(VAR) references to environment variables inside string values."""
    if not isinstance(value, str):
        return value
    return _ENV_REF.sub(lambda m: env.get(m.group(1), ""), value)


def _read_secret(path: str, what: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError as exc:
        raise OptionError(f"{what}: cannot read {path}: {exc.strerror}") from exc


def _flatten(table: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """TOML dotted keys (app.settings.x = ...) back to PostgREST's flat names."""
    flat: dict[str, Any] = {}
    for key, value in table.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def load_file(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as handle:
            return _flatten(tomllib.load(handle))
    except OSError as exc:
        raise OptionError(f"cannot read configuration file {path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise OptionError(f"configuration file {path}: {exc}") from exc


def _env_overrides(env: Mapping[str, str]) -> dict[str, Any]:
    known = POSTGREST_KEYS | OWN_KEYS | REPLICA_KEYS
    found: dict[str, Any] = {}
    for name, value in env.items():
        if name.startswith("PGRST_"):
            key = name[6:].lower().replace("_", "-")
            if key in known:
                found[key] = value
    return found


def _as_int(conf: Mapping[str, Any], key: str, minimum: int = 0) -> int:
    value = conf[key]
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise OptionError(f"{key} must be an integer, got {value!r}") from None
    if isinstance(value, bool) or number < minimum:
        raise OptionError(f"{key} must be an integer >= {minimum}, got {value!r}")
    return number


def _as_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    return str(value).strip().lower() in ("true", "1", "yes", "on")


def _listen_host(value: str) -> str | None:
    """PostgREST's special hosts: !4 any IPv4, !6 any IPv6, * and ! any address."""
    return {"!4": "0.0.0.0", "*4": "0.0.0.0", "!6": "::", "*6": "::",  # noqa: S104
            "*": None, "!": None}.get(value, value)


_URI_PORT = re.compile(r"(?:^|[?&])port=([^&]*)")


def _bad_port(text: str) -> bool:
    return not all(part.isdigit() and 0 < int(part) <= 65535 for part in text.split(","))


def check_db_ports(uri: str, key: str = "db-uri") -> None:
    """A one-line error for a db-uri whose port is not 1-65535 (asyncpg raised ValueError
    with a traceback).  The URI itself is never repeated: it may hold a password."""
    ports: list[str] = []
    if "://" in uri:
        rest = uri.split("://", 1)[1]
        hosts = re.split(r"[/?]", rest.rsplit("@", 1)[-1] if "@" in rest.split("/", 1)[0]
                         else rest, maxsplit=1)[0]
        for host in hosts.split(","):
            if ":" in host and not host.endswith("]"):
                ports.append(host.rsplit(":", 1)[1])
        ports += _URI_PORT.findall(uri.split("?", 1)[1]) if "?" in uri else []
    else:
        ports += [item.partition("=")[2].strip("'") for item in uri.split()
                  if item.startswith("port=")]
    for port in ports:
        if port and _bad_port(port):
            raise OptionError(f"{key}: invalid port {port[:20]!r} (expected 1-65535)")


def build_settings(conf: Mapping[str, Any]) -> Settings:
    """Validate merged raw values (file, environment, command line) into Settings."""
    env = os.environ
    values = {key: _interpolate(value, env) for key, value in conf.items()}
    unknown = sorted(k for k in values if k not in POSTGREST_KEYS | OWN_KEYS | REPLICA_KEYS
                     and not k.startswith("app.settings."))
    if unknown:
        log.warning("ignoring configuration keys kwollect-api does not use: %s",
                    ", ".join(unknown))
    db_uri = str(values["db-uri"])
    if db_uri.startswith("@"):
        db_uri = _read_secret(db_uri[1:], "db-uri")
    check_db_ports(db_uri)
    read_uri = str(values["db-read-uri"])
    if read_uri.startswith("@"):
        read_uri = _read_secret(read_uri[1:], "db-read-uri")
    check_db_ports(read_uri, "db-read-uri")
    password = None
    if values["kwollect-db-password-file"]:
        password = _read_secret(str(values["kwollect-db-password-file"]),
                                "kwollect-db-password-file")
    secret_text = str(values["jwt-secret"])
    if values["kwollect-jwt-secret-file"]:
        secret_text = _read_secret(str(values["kwollect-jwt-secret-file"]),
                                   "kwollect-jwt-secret-file")
    elif secret_text.startswith("@"):
        secret_text = _read_secret(secret_text[1:], "jwt-secret")
    secret: bytes | None = None
    if secret_text:
        if _as_bool(values["jwt-secret-is-base64"]):
            try:
                secret = base64.b64decode(secret_text, validate=True)
            except ValueError as exc:
                raise OptionError("jwt-secret is not valid base64 "
                                  "(jwt-secret-is-base64 = true)") from exc
        else:
            secret = secret_text.encode()
        if len(secret) < 32:
            raise OptionError("jwt-secret must be at least 32 characters long")
    schemas_text = str(values.get("db-schema") or values["db-schemas"])
    schemas = tuple(s.strip() for s in schemas_text.split(",") if s.strip())
    if not schemas:
        raise OptionError("db-schemas must name at least one schema")
    level = LOG_LEVELS.get(str(values["log-level"]).lower())
    if level is None:
        raise OptionError(f"log-level must be one of {', '.join(LOG_LEVELS)}, "
                          f"got {values['log-level']!r}")
    port = _as_int(values, "server-port")
    if port > 65535:
        raise OptionError(f"server-port must be at most 65535, got {port}")
    pool_size = _as_int(values, "db-pool", 1)
    per_role = max(1, pool_size - 2) if values["kwollect-max-exports-per-role"] in (None, "") \
        else _as_int(values, "kwollect-max-exports-per-role")
    return Settings(
        db_uri=db_uri,
        db_password=password,
        schemas=schemas,
        extra_search_path=tuple(s.strip() for s in str(values["db-extra-search-path"]).split(",")
                                if s.strip()),
        anon_role=str(values["db-anon-role"]) or None,
        jwt_secret=secret,
        jwt_aud=str(values["jwt-aud"]) or None,
        role_claim_path=parse_role_claim_key(str(values["jwt-role-claim-key"])),
        server_host=_listen_host(str(values["server-host"])),
        server_port=port,
        pool_size=pool_size,
        pool_timeout=float(_as_int(values, "db-pool-acquisition-timeout", 1)),
        max_rows=_as_int(values, "kwollect-max-rows"),
        max_body_bytes=_as_int(values, "kwollect-max-body-bytes", 1),
        hold_bytes=_as_int(values, "kwollect-hold-bytes"),
        log_level=level,
        max_anon_body_bytes=_as_int(values, "kwollect-max-anon-body-bytes"),
        max_param_bytes=_as_int(values, "kwollect-max-param-bytes", 1),
        max_json_depth=_as_int(values, "kwollect-max-json-depth", 1),
        header_timeout=float(_as_int(values, "kwollect-header-timeout", 1)),
        body_timeout=float(_as_int(values, "kwollect-body-timeout", 1)),
        send_timeout=float(_as_int(values, "kwollect-send-timeout", 1)),
        max_connections=_as_int(values, "kwollect-max-connections", 1),
        spool_bytes=_as_int(values, "kwollect-spool-bytes"),
        max_exports_per_role=per_role,
        max_exports_per_client=_as_int(values, "kwollect-max-exports-per-client"),
        app_settings={k: str(v) for k, v in values.items() if k.startswith("app.settings.")},
        node_map=(load_node_map(str(values["kwollect-node-map-file"]))
                  if values["kwollect-node-map-file"] else {}),
        node_reverse_dns=_as_bool(values["kwollect-node-reverse-dns"]),
        trusted_proxies=parse_networks(str(values["kwollect-trusted-proxies"])),
        node_role=str(values["kwollect-node-role"]) or None,
        db_read_uri=read_uri or None,
        read_fallback=_as_bool(values["db-read-fallback"]),
    )


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kwollect-api", allow_abbrev=False,
        description="PostgREST-compatible HTTP gateway to kwollect's SQL API, streaming "
                    "results from a server-side cursor.")
    p.add_argument("config", nargs="?", help="PostgREST configuration file (as printed by "
                   "kwollect-setup-db); own keys start with kwollect-")
    p.add_argument("--server-host", help="listen address (PostgREST syntax: !4 any IPv4, "
                   "!6 any IPv6, * any; default !4)")
    p.add_argument("--server-port", type=int, help="listen port (default 3000; 0: any free)")
    p.add_argument("--db-pool", type=int, help="database connections (default 10)")
    p.add_argument("--max-rows", type=int, dest="kwollect-max-rows",
                   help="row bound per get_metrics request (SET LOCAL kwollect.max_rows; "
                        "default: the database's setting)")
    p.add_argument("--max-body-bytes", type=int, dest="kwollect-max-body-bytes",
                   help="largest accepted request body (default 64 MiB)")
    p.add_argument("--jwt-secret-file", dest="kwollect-jwt-secret-file",
                   help="file holding the JWT secret (instead of jwt-secret)")
    p.add_argument("--db-password-file", dest="kwollect-db-password-file",
                   help="file holding the database password (overrides db-uri's)")
    p.add_argument("--max-connections", type=int, dest="kwollect-max-connections",
                   help="open client connections at most (default 1000; more are closed "
                        "at once)")
    p.add_argument("--log-level", help="crit, error, warn, info (access log, default) or debug")
    return p


def load(argv: Sequence[str] | None = None) -> Settings:
    args = vars(parser().parse_args(argv))
    conf: dict[str, Any] = dict(DEFAULTS)
    path = args.pop("config")
    if path:
        conf.update(load_file(path))
    conf.update(_env_overrides(os.environ))
    for key, value in args.items():
        if value is not None:
            conf[key.replace("_", "-")] = value
    return build_settings(conf)
