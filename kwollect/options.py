"""Command-line and YAML options for every kwollect tool (the reference's style).

`tool [CONFIG.yaml] [--option value ...]`: defaults < the YAML file < the command line.
Written here with argparse and PyYAML rather than through pyonf (which the reference used)
because pyonf cannot do what operators need: it accepts any key in the file (a typo such as
``spool_dri`` silently meant "no spool"), gives every option a boilerplate help line, and
invents one-letter short options (``-p`` meant ``--prometheus_host``).

Here:

- every option has a real help line (`HELP`, one table for every tool: an option means the
  same thing wherever it appears); a tool whose option lacks one fails its own ``--help``
  (tests/test_options.py runs it for every tool);
- a key of the file that no kwollect tool knows is an error naming the key, the file and
  the closest known name; a key that another kwollect tool takes (one file shared by the
  kwollector and ``kwollect maintain``) is ignored with a warning;
- file values are checked against the type of the default, with the key and file named;
- secrets never need to be on the command line: every ``<name>_password`` option has a
  ``<name>_password_file`` twin whose file content wins when given.
"""

from __future__ import annotations

import argparse
import difflib
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from kwollect.errors import KwollectError


class OptionError(KwollectError, ValueError):
    """A bad option value; the message names the option (and the file it came from)."""


CONFIG_FILE_KEY = "config_file"
"""Where load_options records the YAML file it read ("" for none)."""

HELP: dict[str, str] = {
    # database connection (collectors, maintenance)
    "db_host": "database server host name, or a directory holding its unix socket",
    "db_port": "database server port (default: libpq's PGPORT, else 5432)",
    "db_name": "database name",
    "db_user": "database login role (kwollect-setup-db creates kwuser, the writer)",
    "db_password": "database password (prefer db_password_file: argv is visible to all users)",
    "db_password_file": "file holding the database password (first line); wins over "
                        "db_password",
    "log_level": "least severe log messages shown: debug, info, warning, error",
    # writer (kwollector, kwollector-wattmetre)
    "spool_dir": "directory where readings wait while the database is unreachable; empty: "
                 "$STATE_DIRECTORY (systemd), else ~/.local/state/kwollect/<program>-<config> "
                 "($XDG_STATE_HOME); 'none': memory only (readings held at a stop during an "
                 "outage are lost)",
    "spool_max_mb": "largest size of the spool on disk, in MiB (about 20 bytes a reading); "
                    "beyond it readings are dropped and counted",
    "queue_max_rows": "readings kept in memory (about 150 bytes each) before they go to the "
                      "spool",
    "batch_max_rows": "readings per COPY into the database",
    "flush_interval_s": "longest time a reading waits in memory before it is sent, in seconds",
    "db_pool_size": "database connections writing at the same time",
    "retry_max_s": "longest wait between two reconnection attempts, in seconds",
    "close_timeout_s": "at a stop, how long to wait for a reachable database to take what is "
                       "in memory before it goes to the spool, in seconds (during an outage "
                       "the stop takes under 2 s)",
    "db_batch_timeout_s": "longest delivery of one batch to the database, in seconds; past "
                          "it (a link that hangs) the batch goes to the spool and the writer "
                          "reconnects",
    "db_schema": "'kwollect' (this schema) or 'reference' (plain COPY into a reference "
                 "Kwollect database's metrics table, for migrations)",
    # kwollector
    "metrics_dir": "directory of metric descriptions (*.yaml)",
    "check": "validate metrics_dir, print the polling plan and exit (status 1 on any error)",
    "strict": "any error in metrics_dir is fatal (default: the entry is reported and skipped, "
              "or its last good description kept at a reload)",
    "timeout_s": "longest wait for one device's answer, in seconds",
    "target_concurrency": "requests in flight at once to one device",
    "promotion_refresh_s": "how often promoted_metrics is read again, in seconds",
    "self_device_id": "device_id of the kwollector's own health metrics (default: "
                      "kwollector-<host name>)",
    "self_metrics_every_s": "period of the kwollector's own health metrics, in seconds "
                            "(0: not stored)",
    "prometheus_host": "address of the health endpoint (/metrics, Prometheus format)",
    "prometheus_port": "port of the health endpoint (0: no endpoint)",
    "shard": "i/n: poll the i-th of n parts of metrics_dir's targets (several kwollectors "
             "sharing one metrics.d); empty: all of them",
    "failover_groups": "G > 0: lease metrics_dir's targets, hashed into G groups, through the "
                       "database, so that the other kwollectors take a dead one's groups "
                       "over (excludes shard); 0: off",
    "lease_ttl_s": "with failover_groups, how long a lease lasts unrenewed, in seconds (a "
                   "dead kwollector's targets are taken over within about 4/3 of it)",
    # kwollector-wattmetre
    "wattmetre_id": "device_id of the wattmetre (its ports are <wattmetre_id>-port<N>)",
    "wattmetre_version": "wattmetre-read line format: 2 or 3",
    "mapping_file_path": "YAML file mapping wattmetre ports to the nodes they feed",
    # kwollect maintain
    "every_seconds": "run the maintenance every that many seconds (0: once, then exit)",
    # kwollect-setup-db-oar
    "oardb_host": "OAR's database server (host name, or a directory holding its socket)",
    "oardb_port": "OAR's database server port",
    "oardb_name": "OAR's database name",
    "oardb_user": "OAR's read-only database account",
    "oardb_password": "password of oardb_user (prefer oardb_password_file)",
    "oardb_password_file": "file holding oardb_user's password",
    "oardb_connect_timeout_s": "longest wait to connect to OAR's database, in seconds",
    "oardb_statement_timeout_s": "longest query on OAR's database, in seconds",
    # kwollect migrate
    "from": "the source database (a reference Kwollect 1.x) as a postgresql:// URL, without "
            "a password",
    "from_password_file": "file holding the source database's password (else PGPASSWORD or "
                          "~/.pgpass)",
    "range_minutes": "time range copied and committed at a time, in minutes (a rerun resumes "
                     "after the last committed range)",
    "settle_minutes": "ranges that ended less than that many minutes before the source's "
                      "clock are left for a later run (still being written)",
    "final": "copy the newest range too (once the collectors write to this database)",
    "verify": "after copying, compare source and target range by range and report "
              "differences",
    "jobs": "ranges copied at the same time",
    # kwollect-setup-db
    "db_admin": "PostgreSQL administrator role setup connects as; run as root with a unix "
                "socket db_host and no db_admin password, setup connects as the system user of "
                "that name (peer authentication, stock Debian)",
    "db_admin_password": "password of db_admin (prefer db_admin_password_file)",
    "db_admin_password_file": "file holding db_admin's password",
    "kwollect_db_name": "name of the kwollect database",
    "kwollect_user": "name of the writer role; the read-only role is <name>_ro, the owner "
                     "<name>_owner",
    "kwollect_password": "password of the writer role (prefer kwollect_password_file)",
    "kwollect_password_file": "file holding the writer role's password; created with a fresh "
                              "random password (mode 0640) when missing",
    "kwollect_password_ro": "password of the read-only role (prefer kwollect_password_ro_file; "
                            "neither: a random one, printed, for a new role or one with the "
                            "old default password)",
    "kwollect_password_ro_file": "file holding the read-only role's password; created with a "
                                 "fresh random password (mode 0640) when missing",
    "chunk_interval_hour": "time range of one sample partition, in hours",
    "chunk_compress_hour": "age after which partitions are compacted (stock PostgreSQL) or "
                           "chunks compressed (TimescaleDB), in hours",
    "timescaledb": "storage of the samples: on (a TimescaleDB hypertable with native "
                   "compression; fails when the server lacks TimescaleDB or only has its "
                   "Apache-2 build), off (partitions of stock PostgreSQL and kwollect's "
                   "compaction), auto (on when the server can; an existing database keeps its "
                   "storage)",
    "switch_storage": "with --timescaledb on or off: move an existing database's samples to "
                      "that storage, every one copied in one transaction (docs/storage.md)",
    "request_timeout_min": "statement timeout of the API roles, in minutes",
    "max_rows": "largest number of raw rows one get_metrics call may return",
    "job_energy_metric": "metric summed by get_job_metrics as the job's energy",
    "archive_path": "directory (owned by the PostgreSQL server) of the archive tablespace; "
                    "empty: no archive",
    "archive_after_hour": "age after which partitions move to the archive tablespace, in hours",
    "retention_days": "age after which raw samples (partitions and compacted blocks) are "
                      "dropped, in days; their 5-minute summaries and 1-hour rollups are kept "
                      "(0: keep raw samples forever)",
    "jobmetrics_requests_path": "file of job-wide metrics requests (one per line) to load",
    "token_expiry_days": "validity of the writer API token printed, in days (0: no expiry)",
    "postgrest_config_path": "where to write the kwollect-api / PostgREST configuration "
                             "(atomically, mode 0640 with service_group, else 0600); empty: "
                             "print it",
    "service_group": "group that may read the password and configuration files setup writes "
                     "(mode 0640; default: kwollect when that group exists; none: root only, 0600)",
    "api_db_host": "database host written into the API configuration (default: db_host, or "
                   "localhost for a unix socket)",
    "citus": "run on a Citus coordinator: samples and summaries distributed by series over "
             "citus_workers, series a reference table (docs/scaling.md)",
    "citus_workers": "host:port[,host:port...] of the Citus workers (setup creates the roles, "
                     "database and extension there as db_admin, and registers them)",
    "citus_coordinator": "host:port at which the workers reach this coordinator (default: "
                         "db_host:db_port when db_host is not a unix socket)",
    "citus_shard_count": "shards of the samples (and of the tables co-located with them), "
                         "fixed when the database is created: 2 to 4 per worker core",
}


def build_parser(prog: str, defaults: dict[str, Any], description: str | None = None,
                 ) -> argparse.ArgumentParser:
    """The command-line parser of a tool whose options are `defaults`.

    Raises KeyError for an option without a help line: that is a bug of the tool.
    """
    missing = sorted(set(defaults) - set(HELP))
    if missing:
        raise KeyError(f"{prog}: options without a help line in kwollect.options.HELP: "
                       f"{', '.join(missing)}")
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", nargs="?", metavar="CONFIG.yaml", default=None,
                        help="YAML file of options (the names below, without --); the "
                             "command line wins over it")
    for key, default in defaults.items():
        text = HELP[key]
        if isinstance(default, bool):
            text += "" if "default" in text else f" (default: {'on' if default else 'off'})"
            parser.add_argument(f"--{key}", action=argparse.BooleanOptionalAction,
                                default=argparse.SUPPRESS, help=text)
            continue
        if "default" not in text and default != "":
            text += f" (default: {default})"
        kind = type(default) if isinstance(default, int | float) else str
        parser.add_argument(f"--{key}", type=kind, default=argparse.SUPPRESS,
                            metavar=key.upper(), help=text)
    return parser


def _coerce(key: str, value: Any, default: Any, where: str) -> Any:
    """A file value converted to the default's type, or OptionError naming key and file."""
    def bad(expected: str) -> OptionError:
        return OptionError(f"{where}: {key}: expected {expected}, got {value!r}")

    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise bad("an integer")
        try:
            number = float(value)
        except ValueError:
            raise bad("an integer") from None
        if not number.is_integer():
            raise bad("an integer")
        return int(number)
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise bad("a number")
        try:
            return float(value)
        except ValueError:
            raise bad("a number") from None
    if value is None:
        return ""
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise bad("a string")
    return str(value)


def read_config_file(path: str, defaults: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The options of a YAML file, checked; returns (options, warnings)."""
    try:
        content = yaml.safe_load(Path(path).read_text())
    except OSError as exc:
        raise OptionError(f"{path}: cannot read the configuration file: "
                          f"{exc.strerror}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise OptionError(f"{path}: invalid YAML: {exc}") from None
    if content is None:
        return {}, []
    if not isinstance(content, dict):
        raise OptionError(f"{path}: expected a mapping of option: value, got "
                          f"{type(content).__name__}")
    options: dict[str, Any] = {}
    warnings = []
    for key, value in content.items():
        if key in defaults:
            options[key] = _coerce(key, value, defaults[key], path)
        elif key in HELP:
            warnings.append(f"{path}: option {key!r} is not used by this program: ignored")
        else:
            close = difflib.get_close_matches(str(key), list(defaults), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise OptionError(f"{path}: unknown option {key!r}{hint}; the options are "
                              f"listed by --help")
    return options, warnings


def load_options(defaults: dict[str, Any], argv: Sequence[str] | None = None,
                 prog: str = "kwollect", description: str | None = None,
                 warnings: list[str] | None = None,
                 may_be_missing: frozenset[str] = frozenset()) -> dict[str, Any]:
    """Defaults < YAML file (first positional argument) < --options; then secret files.

    Warnings (options of other kwollect tools found in the file) are appended to `warnings`.
    The file read, if any, is recorded under CONFIG_FILE_KEY.  Secret files named in
    `may_be_missing` are left unread when they do not exist (the tool creates them).
    """
    parser = build_parser(prog, defaults, description)
    args = vars(parser.parse_args(list(sys.argv[1:] if argv is None else argv)))
    config = args.pop("config")
    conf = dict(defaults)
    if config:
        options, found = read_config_file(config, defaults)
        conf.update(options)
        if warnings is not None:
            warnings += found
    conf.update(args)
    conf[CONFIG_FILE_KEY] = config or ""
    for key in list(conf):
        if key.endswith("_file") and key[:-5] in conf and conf[key]:
            path = Path(conf[key])
            try:
                lines = path.read_text().splitlines()
            except FileNotFoundError as exc:
                if key in may_be_missing:
                    continue
                raise OptionError(f"{key}: cannot read {path}: {exc.strerror}") from exc
            except OSError as exc:
                raise OptionError(f"{key}: cannot read {path}: {exc.strerror}") from exc
            conf[key[:-5]] = lines[0].strip() if lines else ""
    return conf


def positive_int(conf: dict[str, Any], key: str) -> int:
    value = conf[key]
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise OptionError(f"{key} must be a positive integer, got {value!r}")
    return value


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def tool_options(prog: str, defaults: dict[str, Any], argv: Sequence[str] | None,
                 check: Callable[[dict[str, Any]], object] | None = None,
                 description: str | None = None,
                 may_be_missing: frozenset[str] = frozenset()) -> dict[str, Any] | None:
    """A command-line tool's options, checked, with logging set up at their log_level.

    Returns None, after printing what is wrong to stderr, when the options are bad; the tool
    then exits with status 2.  `description` (usually the module docstring) heads --help.
    """
    warnings: list[str] = []
    try:
        conf = load_options(defaults, argv, prog, description, warnings, may_be_missing)
        if check is not None:
            check(conf)
    except (OptionError, ValueError) as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return None
    level = str(conf.get("log_level", "warning")).upper()
    if not isinstance(logging.getLevelName(level), int):
        print(f"{prog}: log_level: expected debug, info, warning or error, got "
              f"{conf['log_level']!r}", file=sys.stderr)
        return None
    logging.basicConfig(level=level, format=LOG_FORMAT)
    for warning in warnings:
        print(f"{prog}: warning: {warning}", file=sys.stderr)
    return conf
