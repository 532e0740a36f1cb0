"""Grafana's query interpolation for its PostgreSQL datasource, step by step, for the tests.

Grafana cannot be installed here, so the dashboard's SQL is run the way Grafana would send
it: first the frontend's template variables (`$var`, `${var}`, `${var:format}`, `[[var]]`;
for SQL datasources a multi-value variable is quoted as SQL literals and joined by commas,
a single-value one is inserted raw), then the backend's global substitutions (`$__interval`,
`$__interval_ms`, `$__unixEpochFrom()`, `$__unixEpochTo()`), then the PostgreSQL macro
engine, which treats every remaining `$name(args)` as a macro and fails on unknown ones.
Behaviour follows Grafana 10/11 (public/app/features/templating, pkg/tsdb/sqleng and
pkg/tsdb/grafana-postgresql-datasource/macros.go).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime

VARIABLE = re.compile(r"\$(\w+)|\[\[(\w+)(?::(\w+))?\]\]|\$\{(\w+)(?:\.([^:}]+))?(?::([^}]+))?\}")
MACRO = re.compile(r"\$([_a-zA-Z0-9]+)\(([^)]*)\)")


@dataclass
class Variable:
    value: str | list[str]
    multi: bool = False


def quote_literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _format(value: str | list[str], variable: Variable, fmt: str | None) -> str:
    values = value if isinstance(value, list) else [value]
    if fmt is None:
        if isinstance(value, list) or variable.multi:
            return ",".join(quote_literal(v) for v in values)
        return value if isinstance(value, str) else ",".join(values)
    if fmt == "csv":
        return ",".join(values)
    if fmt == "sqlstring":
        return ",".join(quote_literal(v) for v in values)
    if fmt == "doublequote":
        return ",".join('"' + v.replace('"', '\\"') + '"' for v in values)
    if fmt == "singlequote":
        return ",".join("'" + v.replace("'", "\\'") + "'" for v in values)
    if fmt == "raw":
        return ",".join(values)
    raise ValueError(f"format {fmt!r} not modelled")


def template(sql: str, variables: dict[str, Variable]) -> str:
    """Frontend template variables; unknown names are left as they are (as Grafana does)."""
    def replace(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2) or match.group(4)
        fmt = match.group(3) or match.group(6)
        if name not in variables:
            return match.group(0)
        variable = variables[name]
        return _format(variable.value, variable, fmt)
    return VARIABLE.sub(replace, sql)


def _rfc3339(ts: datetime) -> str:
    text = ts.astimezone(UTC).isoformat().replace("+00:00", "Z")
    return text.replace(".000000Z", "Z")


def backend(sql: str, start: datetime, end: datetime, interval_s: int) -> str:
    """sqleng.Interpolate then the PostgreSQL macro engine."""
    interval_text = f"{interval_s}s" if interval_s < 60 else f"{interval_s // 60}m"
    sql = sql.replace("$__interval_ms", str(interval_s * 1000))
    sql = sql.replace("$__interval", interval_text)
    sql = sql.replace("$__unixEpochFrom()", str(int(start.timestamp())))
    sql = sql.replace("$__unixEpochTo()", str(int(end.timestamp())))

    def macro(match: re.Match[str]) -> str:
        name, args = match.group(1), [a.strip() for a in match.group(2).split(",")]
        if name == "__timeFilter":
            return f"{args[0]} BETWEEN '{_rfc3339(start)}' AND '{_rfc3339(end)}'"
        if name == "__timeFrom":
            return f"'{_rfc3339(start)}'"
        if name == "__timeTo":
            return f"'{_rfc3339(end)}'"
        if name == "__time":
            return f'{args[0]} AS "time"'
        raise ValueError(f"unknown macro {name!r}: Grafana would fail this query")
    return MACRO.sub(macro, sql)


def interpolate(sql: str, variables: dict[str, Variable], start: datetime, end: datetime,
                interval_s: int = 10) -> str:
    return backend(template(sql, variables), start, end, interval_s)
