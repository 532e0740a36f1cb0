"""GET /: an OpenAPI 3.0 description of the /rpc functions the caller's role may execute."""

from __future__ import annotations

from typing import Any

from kwollect.gateway.catalog import Codec, Function, PgType, Shape

_NUMBER_FORMATS = {"int2": ("integer", "int32"), "int4": ("integer", "int32"),
                   "int8": ("integer", "int64"), "oid": ("integer", "int64"),
                   "float4": ("number", "float"), "float8": ("number", "double"),
                   "numeric": ("number", None)}


def type_schema(pg_type: PgType) -> dict[str, Any]:
    """A JSON schema for values of a PostgreSQL type, as the gateway writes them."""
    schema: dict[str, Any]
    codec = pg_type.codec
    if codec is Codec.NUMBER:
        kind, fmt = _NUMBER_FORMATS[pg_type.base]
        schema = {"type": kind}
        if fmt:
            schema["format"] = fmt
        if pg_type.base in ("float4", "float8", "numeric"):
            schema = {"oneOf": [schema, {"type": "string", "enum": ["NaN", "Infinity",
                                                                   "-Infinity"]}]}
    elif codec is Codec.BOOLEAN:
        schema = {"type": "boolean"}
    elif codec is Codec.TIMESTAMPTZ or codec is Codec.TIMESTAMP:
        schema = {"type": "string", "format": "date-time"}
    elif codec is Codec.STRING:
        schema = {"type": "string"}
    elif pg_type.is_array:
        schema = {"type": "array", "items": {}}
    elif pg_type.is_json:
        schema = {}
    else:
        schema = {"type": "string"} if pg_type.category in ("D", "T", "N") else {}
    schema["description"] = pg_type.sql
    return schema


def _result_schema(fn: Function) -> dict[str, Any]:
    if fn.shape in (Shape.ROWS, Shape.SINGLE_ROW):
        item: dict[str, Any] = {"type": "object", "properties": {
            c.name: type_schema(c.type) for c in fn.columns}}
    else:
        item = type_schema(fn.columns[0].type)
    if fn.shape in (Shape.ROWS, Shape.SETOF_SCALAR):
        return {"type": "array", "items": item}
    return item


def _operation(fn: Function, method: str) -> dict[str, Any]:
    summary, _, rest = (fn.description or "").partition(". ")
    operation: dict[str, Any] = {
        "tags": ["(rpc) " + fn.name],
        "summary": summary or fn.name,
        "responses": {"200": {"description": "OK", "content": {
            "application/json": {"schema": _result_schema(fn)},
            "application/x-ndjson": {}, "text/csv": {}}}}
        if fn.shape is not Shape.VOID else {"204": {"description": "No Content"}},
    }
    if rest:
        operation["description"] = fn.description
    if method == "get":
        operation["parameters"] = [
            {"name": p.name, "in": "query", "required": not p.has_default,
             "schema": type_schema(p.type)} for p in fn.params]
    elif fn.body_param:
        operation["requestBody"] = {"required": True, "content": {
            "application/json": {"schema": {"oneOf": [{"type": "object"}, {"type": "array"}]}}}}
    else:
        operation["requestBody"] = {"content": {"application/json": {"schema": {
            "type": "object",
            "required": sorted(p.name for p in fn.params if not p.has_default),
            "properties": {p.name: type_schema(p.type) for p in fn.params}}}}}
    return operation


def describe(functions: list[Function], schema: str, version: str) -> dict[str, Any]:
    """The document; overloads of one name share a path, described by the widest one."""
    paths: dict[str, dict[str, Any]] = {}
    for fn in sorted(functions, key=lambda f: (f.name, f.body_param, -len(f.params))):
        item = paths.setdefault(f"/rpc/{fn.name}", {})
        if fn.read_only and not fn.body_param and "get" not in item:
            item["get"] = _operation(fn, "get")
        if "post" not in item:
            item["post"] = _operation(fn, "post")
    return {
        "openapi": "3.0.3",
        "info": {"title": "kwollect API", "version": version,
                 "description": f"Functions of schema {schema}, served by kwollect-api "
                                "(PostgREST-compatible /rpc calls, streamed results)."},
        "paths": paths,
    }
