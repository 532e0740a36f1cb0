"""The functions of the exposed schemas, read from pg_proc, and how to call them.

Nothing is hard-coded: every function of the schemas is served, with its parameters (names,
types, defaults), its volatility and the shape of its result.  The SQL that calls a function
is built from these catalog identifiers (quoted) and from fixed setting names; the values a
client sends never enter SQL text: they travel as bound parameters of set_config().  An enum
argument equal to one of its type's labels is written as the catalog's label (enum_literal),
so that the planner sees a constant.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import orjson

from kwollect.gateway.errors import ApiError

ARG_SETTING = "kwollect_api.arg_{}"

_PROCS = """
SELECT p.oid, n.nspname AS schema, p.proname AS name, p.provolatile::text AS volatility,
       p.proretset AS retset, p.prorettype AS rettype, p.pronargs AS nargs,
       p.pronargdefaults AS ndefaults, coalesce(p.proallargtypes, p.proargtypes::oid[]) AS types,
       p.proargmodes::text[] AS modes, p.proargnames AS names,
       obj_description(p.oid, 'pg_proc') AS description
FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
WHERE n.nspname = ANY ($1::text[]) AND p.prokind = 'f'
ORDER BY n.nspname, p.proname, p.oid
"""

_TYPES = """
SELECT t.oid, format_type(t.oid, NULL) AS sql, b.typname AS base, b.typtype::text AS kind,
       b.typcategory::text AS category, b.typrelid AS relid,
       ARRAY(SELECT e.enumlabel::text FROM pg_enum e WHERE e.enumtypid = b.oid
             ORDER BY e.enumsortorder) AS labels
FROM pg_type t
CROSS JOIN LATERAL (
    WITH RECURSIVE chain (oid, depth) AS (
        SELECT t.oid, 0
        UNION ALL
        SELECT d.typbasetype, c.depth + 1 FROM chain c JOIN pg_type d ON d.oid = c.oid
        WHERE d.typtype = 'd')
    SELECT oid FROM chain ORDER BY depth DESC LIMIT 1) r
JOIN pg_type b ON b.oid = r.oid
WHERE t.oid = ANY ($1::oid[])
"""

_ATTRIBUTES = """
SELECT a.attrelid AS relid, a.attname AS name, a.atttypid AS type
FROM pg_attribute a
WHERE a.attrelid = ANY ($1::oid[]) AND a.attnum > 0 AND NOT a.attisdropped
ORDER BY a.attrelid, a.attnum
"""


class Codec(enum.Enum):
    """How a column's PostgreSQL text output becomes JSON (see formats.py)."""

    NUMBER = "number"
    BOOLEAN = "boolean"
    STRING = "string"
    TIMESTAMPTZ = "timestamptz"
    TIMESTAMP = "timestamp"
    RAW = "raw"          # json, jsonb: the text is JSON already
    TO_JSON = "to_json"  # anything else: the database applies to_json()


class Shape(enum.Enum):
    ROWS = "rows"                # SETOF composite / TABLE: array of objects
    SETOF_SCALAR = "setof"       # SETOF scalar: array of values
    SINGLE_ROW = "single"        # one composite: an object
    SCALAR = "scalar"            # one value
    VOID = "void"                # no content


@dataclass(frozen=True)
class PgType:
    oid: int
    sql: str
    base: str
    kind: str
    category: str
    relid: int
    labels: tuple[str, ...] = ()  # an enum's labels, in their order

    @property
    def codec(self) -> Codec:
        if self.base in ("int2", "int4", "int8", "float4", "float8", "numeric", "oid"):
            return Codec.NUMBER
        if self.base == "bool":
            return Codec.BOOLEAN
        if self.base in ("json", "jsonb"):
            return Codec.RAW
        if self.base == "timestamptz":
            return Codec.TIMESTAMPTZ
        if self.base == "timestamp":
            return Codec.TIMESTAMP
        if self.category == "S" or self.kind == "e" or self.base == "uuid":
            return Codec.STRING
        return Codec.TO_JSON

    @property
    def is_json(self) -> bool:
        return self.base in ("json", "jsonb")

    @property
    def is_array(self) -> bool:
        return self.category == "A"


@dataclass(frozen=True)
class Param:
    name: str
    type: PgType
    has_default: bool
    variadic: bool


@dataclass(frozen=True)
class Column:
    name: str
    type: PgType


@dataclass(frozen=True)
class Function:
    schema: str
    name: str
    oid: int
    params: tuple[Param, ...]
    columns: tuple[Column, ...]
    shape: Shape
    volatility: str
    description: str | None
    record_call: bool = False   # RETURNS [SETOF] record: called in the select list

    @property
    def read_only(self) -> bool:
        return self.volatility in ("i", "s")

    @property
    def body_param(self) -> bool:
        """A single unnamed json/jsonb parameter: the whole POST body is the argument."""
        return (len(self.params) == 1 and not self.params[0].name
                and self.params[0].type.is_json)

    @property
    def required(self) -> frozenset[str]:
        return frozenset(p.name for p in self.params if not p.has_default)

    @property
    def names(self) -> frozenset[str]:
        return frozenset(p.name for p in self.params)

    def signature(self) -> str:
        args = ", ".join(f"{p.name or '$' + str(i)} {p.type.sql}"
                         for i, p in enumerate(self.params, 1))
        return f"{self.schema}.{self.name}({args})"


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


# Enum labels written into the call as literals: letters, digits and a few signs, never a
# quote or a backslash (every label of kwollect's enums; others go by their setting).
_PLAIN_LABEL = re.compile(r"[A-Za-z0-9_.+-]{1,63}")


def enum_literal(pg_type: PgType, text: str) -> str | None:
    """The catalog's own label equal to `text`, as a SQL literal, or None.

    A constant lets the planner fold what depends on it: get_metrics' `summary` then
    decides while planning whether the raw partitions are read at all, instead of laying
    out every one of them (kwollect.reads_raw, docs/storage.md).  The literal is the
    catalog's string, found by equality, so a client's text still never becomes SQL."""
    for label in pg_type.labels:
        if label == text and _PLAIN_LABEL.fullmatch(label):
            return f"'{label}'"
    return None


@dataclass
class Argument:
    """A value for one parameter: text cast by PostgreSQL, a JSON array, or SQL NULL.

    `body` is a whole request body kept as the bytes received: it reaches its setting by
    COPY (kwollect-api's _copy_body), never as a Python string or a bound parameter.
    """

    param: Param
    text: str | None
    json_array: bool = False
    body: bytes | bytearray | None = None


@dataclass
class Call:
    function: Function
    arguments: list[Argument] = field(default_factory=list)

    def settings(self) -> list[tuple[str, str]]:
        """(setting name, value) pairs to set_config() before the call."""
        return [(ARG_SETTING.format(i), arg.text)
                for i, arg in enumerate(self.arguments, 1) if arg.text is not None]

    def body(self) -> tuple[str, bytes | bytearray] | None:
        """(setting name, bytes) of the argument given as raw body bytes, if any."""
        for i, arg in enumerate(self.arguments, 1):
            if arg.body is not None:
                return ARG_SETTING.format(i), arg.body
        return None

    def _argument_sql(self) -> str:
        parts = []
        for i, arg in enumerate(self.arguments, 1):
            target = arg.param.type.sql
            source = f"current_setting('{ARG_SETTING.format(i)}')"
            if arg.text is None and arg.body is None:
                value = f"CAST(NULL AS {target})"
            elif arg.text is not None and (literal := enum_literal(arg.param.type, arg.text)):
                value = f"CAST({literal} AS {target})"
            elif arg.json_array:
                value = f"CAST(ARRAY(SELECT jsonb_array_elements_text(CAST({source} AS jsonb))) " \
                        f"AS {target})"
            else:
                value = f"CAST({source} AS {target})"
            variadic = "VARIADIC " if arg.param.variadic else ""
            named = f"{quote_ident(arg.param.name)} => " if arg.param.name else ""
            parts.append(f"{variadic}{named}{value}")
        return ", ".join(parts)

    def query(self, as_json: bool) -> str:
        """The SELECT whose rows COPY streams: raw columns, or JSON-ready ones."""
        if self.function.record_call:
            value = "to_json(t.v)" if as_json else "t.v"
            return f"SELECT {value} FROM (SELECT {self._target()} AS v) AS t"  # noqa: S608
        return self._select(lambda column, ref: f"to_json({ref})"
                            if as_json and column.type.codec is Codec.TO_JSON else ref)

    def query_csv(self) -> str:
        """The SELECT for text/csv: what a spreadsheet can read.

        Timestamps come in the ISO 8601 form of the JSON output ("2020-12-31T22:00:00+00:00",
        not PostgreSQL's "2020-12-31 22:00:00+00"), and a function returning one JSON object
        (get_job_metrics) becomes a key,value table, nested keys joined by dots
        ("node_energy_watthour.node-1"), instead of one cell holding the whole object.
        """
        fn = self.function
        if fn.shape is Shape.SCALAR and fn.columns and fn.columns[0].type.is_json:
            return JSON_TABLE_SQL.format(target=self._target())
        if fn.record_call:
            return self.query(as_json=False)
        return self._select(lambda column, ref: f"to_json({ref}) #>> '{{}}'"
                            if column.type.codec in (Codec.TIMESTAMPTZ, Codec.TIMESTAMP)
                            else ref)

    def _target(self) -> str:
        fn = self.function
        return f"{quote_ident(fn.schema)}.{quote_ident(fn.name)}({self._argument_sql()})"

    def _select(self, expression: Callable[[Column, str], str]) -> str:
        """SELECT every output column of the call, each through `expression` (column, ref)."""
        fn = self.function
        if not fn.columns:
            return f"SELECT FROM {self._target()} AS t"  # noqa: S608
        aliases = ", ".join(quote_ident(c.name) for c in fn.columns)
        select = [f"{expression(c, 't.' + quote_ident(c.name))} AS {quote_ident(c.name)}"
                  for c in fn.columns]
        # Identifiers come from pg_catalog and are quoted; values are bound settings.
        return f"SELECT {', '.join(select)} FROM {self._target()} AS t({aliases})"  # noqa: S608


# One JSON object as (key, value) rows; nested objects flattened with dotted keys.
JSON_TABLE_SQL = """WITH RECURSIVE doc(v) AS (SELECT to_jsonb({target})),
kv(key, value) AS (
    SELECT e.key, e.value
    FROM doc, jsonb_each(CASE WHEN jsonb_typeof(doc.v) = 'object' THEN doc.v
                              ELSE jsonb_build_object('value', doc.v) END) e
    UNION ALL
    SELECT kv.key || '.' || e.key, e.value FROM kv, jsonb_each(kv.value) e
    WHERE jsonb_typeof(kv.value) = 'object')
SELECT key, value #>> '{{}}' AS value FROM kv WHERE jsonb_typeof(value) <> 'object' ORDER BY key"""


def _arguments_text(function: Function, values: Mapping[str, list[str]]) -> list[Argument]:
    """Query-string (or form) values: text cast by PostgreSQL; repeated names make arrays."""
    by_name = {p.name: p for p in function.params}
    arguments = []
    for name, texts in values.items():
        param = by_name[name]
        if len(texts) > 1:
            if not param.type.is_array:
                raise ApiError(400, "PGRST100", f"parameter {name!r} is given {len(texts)} times",
                               hint=f"{name} is a {param.type.sql}: give it once.")
            arguments.append(Argument(param, _json_text(texts), json_array=True))
        else:
            arguments.append(Argument(param, texts[0]))
    return arguments


def _json_text(value: Any) -> str:
    return orjson.dumps(value).decode()


def _arguments_json(function: Function, values: Mapping[str, Any]) -> list[Argument]:
    """JSON object values, converted the way PostgREST's json_to_record converts them."""
    by_name = {p.name: p for p in function.params}
    arguments = []
    for name, value in values.items():
        param = by_name[name]
        if value is None:
            arguments.append(Argument(param, None))
        elif param.type.is_json:
            arguments.append(Argument(param, _json_text(value)))
        elif isinstance(value, list) and param.type.is_array:
            arguments.append(Argument(param, _json_text(value), json_array=True))
        elif isinstance(value, str):
            arguments.append(Argument(param, value))
        elif isinstance(value, bool):
            arguments.append(Argument(param, "true" if value else "false"))
        else:
            arguments.append(Argument(param, _json_text(value)))
    return arguments


class Catalog:
    """The callable functions of each exposed schema, by name (overloads kept together)."""

    def __init__(self, functions: Iterable[Function], skipped: Iterable[str] = ()) -> None:
        self.functions: dict[tuple[str, str], list[Function]] = {}
        for fn in functions:
            self.functions.setdefault((fn.schema, fn.name), []).append(fn)
        self.skipped = list(skipped)

    def __len__(self) -> int:
        return sum(len(v) for v in self.functions.values())

    def all(self) -> list[Function]:
        return [fn for overloads in self.functions.values() for fn in overloads]

    def has(self, schema: str, name: str) -> bool:
        return (schema, name) in self.functions

    def resolve_name(self, schema: str, name: str) -> list[Function]:
        """The overloads of schema.name; 404 when there is none."""
        overloads = self.functions.get((schema, name))
        if not overloads:
            raise ApiError(404, "PGRST202",
                           f"Could not find the function {schema}.{name} in the schema cache",
                           hint="Call GET / for the list of functions.")
        return overloads

    def resolve(self, schema: str, name: str, keys: Iterable[str], *,
                body: str | None = None) -> Function:
        """The overload a request means, chosen like PostgREST chooses it.

        `keys` are the argument names sent; `body` is "object" or "array" for a JSON body,
        so that a function with a single unnamed json parameter can take it whole.
        """
        overloads = self.resolve_name(schema, name)
        sent = frozenset(keys)
        named = [fn for fn in overloads if not fn.body_param
                 and sent <= fn.names and fn.required <= sent]
        if body == "array":
            named = []
        if len(named) == 1:
            return named[0]
        if len(named) > 1:
            raise ApiError(300, "PGRST203",
                           f"Could not choose the best candidate function between: "
                           f"{', '.join(fn.signature() for fn in named)}",
                           hint="Try renaming the parameters or the function itself.")
        whole = [fn for fn in overloads if fn.body_param]
        if body is not None and whole:
            return whole[0]
        raise _no_match(schema, name, sent, [fn for fn in overloads if not fn.body_param],
                        body, bool(whole))

    @staticmethod
    def bind_text(function: Function, values: Mapping[str, list[str]]) -> Call:
        return Call(function, _arguments_text(function, values))

    @staticmethod
    def bind_json(function: Function, values: Mapping[str, Any] | None,
                  raw_body: str | None = None) -> Call:
        if function.body_param:
            return Call(function, [Argument(function.params[0], raw_body or "{}")])
        return Call(function, _arguments_json(function, values or {}))

    @staticmethod
    def bind_body(function: Function, body: bytes | bytearray) -> Call:
        """The whole body as the single json argument, kept as bytes (see Argument)."""
        return Call(function, [Argument(function.params[0], None, body=body)])


def _no_match(schema: str, name: str, sent: frozenset[str], overloads: list[Function],
              body: str | None, takes_body: bool) -> ApiError:
    if takes_body:
        return ApiError(400, "PGRST202", f"{schema}.{name} takes its argument as a JSON body",
                        hint="Call it with POST and a JSON body.")
    if body == "array":
        return ApiError(400, "PGRST102",
                        f"{schema}.{name} does not take a JSON array as its body",
                        hint="Send a JSON object of named arguments.")
    problems = []
    if overloads:
        closest = min(overloads, key=lambda fn: len(sent - fn.names) + len(fn.required - sent))
        unknown = sorted(sent - closest.names)
        missing = sorted(closest.required - sent)
        if unknown:
            problems.append(f"unknown parameter(s): {', '.join(unknown)}")
        if missing:
            problems.append(f"missing required parameter(s): {', '.join(missing)}")
    args = ", ".join(sorted(sent))
    hints = "; ".join(fn.signature() for fn in overloads)
    return ApiError(400, "PGRST202",
                    f"Could not find the function {schema}.{name}({args}) in the schema cache",
                    details="; ".join(problems) or None,
                    hint=f"Parameters: {hints}" if hints else None)


def _shape(row: asyncpg.Record, types: Mapping[int, PgType], outputs: list[Column],
           attributes: Mapping[int, list[Column]]) -> tuple[Shape, tuple[Column, ...], bool]:
    """Shape and output columns of a function, or raise ValueError when it cannot be served."""
    rettype = types[row["rettype"]]
    if rettype.base == "void":
        return Shape.VOID, (), False
    if outputs:
        return (Shape.ROWS if row["retset"] else Shape.SINGLE_ROW), tuple(outputs), False
    if rettype.kind == "c":
        columns = attributes.get(rettype.relid, [])
        if not columns:
            raise ValueError(f"returns {rettype.sql}, a composite type without columns")
        return (Shape.ROWS if row["retset"] else Shape.SINGLE_ROW), tuple(columns), False
    if rettype.base == "record":
        column = Column(row["name"], rettype)
        return (Shape.SETOF_SCALAR if row["retset"] else Shape.SCALAR), (column,), True
    if rettype.kind == "p":
        raise ValueError(f"returns the pseudo-type {rettype.sql}")
    column = Column(row["name"], rettype)
    return (Shape.SETOF_SCALAR if row["retset"] else Shape.SCALAR), (column,), False


def _function(row: asyncpg.Record, types: Mapping[int, PgType],
              attributes: Mapping[int, list[Column]]) -> Function:
    modes = row["modes"] or ["i"] * len(row["types"])
    names = row["names"] or [""] * len(row["types"])
    params: list[Param] = []
    outputs: list[Column] = []
    inputs = sum(1 for m in modes if m in ("i", "b", "v"))
    first_default = inputs - row["ndefaults"]
    for type_oid, mode, name in zip(row["types"], modes, names, strict=True):
        pg_type = types[type_oid]
        if mode in ("o", "b", "t"):
            outputs.append(Column(name, pg_type))
        if mode in ("i", "b", "v"):
            if pg_type.kind == "p":
                raise ValueError(f"has a parameter of pseudo-type {pg_type.sql}")
            params.append(Param(name, pg_type, len(params) >= first_default, mode == "v"))
    shape, columns, record_call = _shape(row, types, outputs, attributes)
    function = Function(row["schema"], row["name"], row["oid"], tuple(params), columns, shape,
                        row["volatility"], row["description"], record_call)
    if any(not p.name for p in params) and not function.body_param:
        raise ValueError("has unnamed parameters (only a single unnamed json parameter works)")
    return function


async def _types(conn: asyncpg.Connection, oids: Iterable[int]) -> dict[int, PgType]:
    rows = await conn.fetch(_TYPES, sorted(set(oids)))
    return {r["oid"]: PgType(r["oid"], r["sql"], r["base"], r["kind"], r["category"], r["relid"],
                             tuple(r["labels"]))
            for r in rows}


async def load_catalog(conn: asyncpg.Connection, schemas: Iterable[str]) -> Catalog:
    """Read every function of `schemas`; functions that cannot be served are listed apart."""
    procs = await conn.fetch(_PROCS, list(schemas))
    types = await _types(conn, {oid for r in procs for oid in [r["rettype"], *r["types"]]})
    relids = [t.relid for t in types.values() if t.kind == "c" and t.relid]
    attribute_rows = await conn.fetch(_ATTRIBUTES, relids)
    missing = {r["type"] for r in attribute_rows} - types.keys()
    if missing:
        types.update(await _types(conn, missing))
    attributes: dict[int, list[Column]] = {}
    for r in attribute_rows:
        attributes.setdefault(r["relid"], []).append(Column(r["name"], types[r["type"]]))
    functions, skipped = [], []
    for row in procs:
        try:
            functions.append(_function(row, types, attributes))
        except ValueError as exc:
            skipped.append(f"{row['schema']}.{row['name']} {exc}")
    return Catalog(functions, skipped)
