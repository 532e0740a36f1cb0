"""Output formats: Accept negotiation, and COPY output turned into JSON, NDJSON or CSV.

The database streams rows with COPY ... (FORMAT csv, QUOTE '\\x01', DELIMITER '\\x02'):
each field is PostgreSQL's text output, unquoted unless it holds a control character, so a
chunk of rows is split with two bytes.replace/split calls and rebuilt into JSON with list
slicing, column by column, without a Python step per row.  Measured (benchmarks/
gateway_stream.py): the columns' text output costs the database backend about half of
what row_to_json costs, and the gateway spends about 1.6 µs of CPU per row on another core.
Chunks holding a quoted field take a slower, row-by-row path with the same result.

JSON values are written exactly as PostgreSQL's to_json writes them from a UTC session
(what PostgREST returns): timestamps as "2020-12-31T22:00:00+00:00", NaN and infinities
as the strings "NaN", "Infinity", "-Infinity".
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable, Sequence

import orjson

from kwollect.gateway.catalog import Codec, Column, Shape
from kwollect.gateway.errors import ApiError

QUOTE = "\x01"
DELIMITER = "\x02"
Q = QUOTE.encode()
D = DELIMITER.encode()
NL = b"\n"
NULL = b"null"
STRING_CACHE_LIMIT = 50_000
_SLOT = b""  # a value slot of a row template, filled per row


class Format(enum.Enum):
    JSON = "application/json; charset=utf-8"
    NDJSON = "application/x-ndjson; charset=utf-8"
    CSV = "text/csv; charset=utf-8"


_MEDIA = {
    "application/json": Format.JSON,
    "application/*": Format.JSON,
    "*/*": Format.JSON,
    "application/x-ndjson": Format.NDJSON,
    "application/ndjson": Format.NDJSON,
    "application/jsonl": Format.NDJSON,
    "text/csv": Format.CSV,
    "text/*": Format.CSV,
}


def negotiate(accept: str | None, offered: Sequence[str] = ()) -> Format | str:
    """The best format the client accepts (highest q, then its order); 406 if none.

    `offered` adds extra media types (e.g. application/openapi+json), returned as text.
    """
    if not accept or not accept.strip():
        return Format.JSON
    ranked = []
    for position, item in enumerate(accept.split(",")):
        media, *params = (part.strip() for part in item.split(";"))
        quality = 1.0
        for param in params:
            key, _, value = param.partition("=")
            if key.strip().lower() == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
        ranked.append((-quality, position, media.lower()))
    for neg_quality, _, media in sorted(ranked):
        if neg_quality >= 0:
            continue
        if media in offered:
            return media
        if media in _MEDIA:
            return _MEDIA[media]
    raise ApiError(406, "PGRST107", f"None of these media types are available: {accept}",
                   hint="Use application/json, application/x-ndjson or text/csv.")


def _number(raw: bytes | None) -> bytes:
    if raw is None:
        return NULL
    if raw[:1].isdigit() or (raw[:1] == b"-" and raw[1:2].isdigit()):
        return raw
    return orjson.dumps(raw.decode())


def _boolean(raw: bytes | None) -> bytes:
    return NULL if raw is None else (b"true" if raw == b"t" else b"false")


def _string(raw: bytes | None) -> bytes:
    return NULL if raw is None else orjson.dumps(raw.decode())


_OFFSET_HOURS = re.compile(rb"([+-]\d\d)(?=$| BC$)")


def _timestamp(raw: bytes | None, with_zone: bool) -> bytes:
    """Text output ("2020-12-31 22:00:00+00") to to_json's ("2020-12-31T22:00:00+00:00")."""
    if raw is None:
        return NULL
    date, space, rest = raw.partition(b" ")
    if space:
        if with_zone:
            rest = _OFFSET_HOURS.sub(rb"\1:00", rest, count=1)
        raw = date + b"T" + rest
    return b'"' + raw + b'"'


def _raw(raw: bytes | None) -> bytes:
    """JSON text; a json value may hold raw whitespace (only between tokens): make it spaces."""
    if raw is None:
        return NULL
    return raw.translate(_WHITESPACE) if b"\n" in raw or b"\r" in raw or b"\t" in raw else raw


_WHITESPACE = bytes.maketrans(b"\n\r\t", b"   ")

_VALUE_CONVERTERS: dict[Codec, Callable[[bytes | None], bytes]] = {
    Codec.NUMBER: _number,
    Codec.BOOLEAN: _boolean,
    Codec.STRING: _string,
    Codec.TIMESTAMPTZ: lambda raw: _timestamp(raw, True),
    Codec.TIMESTAMP: lambda raw: _timestamp(raw, False),
    Codec.RAW: _raw,
    Codec.TO_JSON: _raw,
}
_SPECIAL_NUMBERS = {b"NaN": b'"NaN"', b"Infinity": b'"Infinity"',
                    b"-Infinity": b'"-Infinity"', b"": NULL}
_BOOLEANS = {b"t": b"true", b"f": b"false", b"": NULL}


def split_rows(buf: bytes) -> list[list[bytes | None]]:
    """Parse COPY CSV rows (quote \\x01, delimiter \\x02); None is SQL NULL."""
    rows: list[list[bytes | None]] = []
    row: list[bytes | None] = []
    pos, size = 0, len(buf)
    while pos < size:
        if buf[pos] == 1:
            parts, start = [], pos + 1
            while True:
                end = buf.index(Q, start)
                if buf[end + 1:end + 2] == Q:
                    parts.append(buf[start:end + 1])
                    start = end + 2
                else:
                    parts.append(buf[start:end])
                    pos = end + 1
                    break
            row.append(b"".join(parts))
        else:
            delimiter, newline = buf.find(D, pos), buf.find(NL, pos)
            end = newline if delimiter < 0 or newline < delimiter else delimiter
            row.append(buf[pos:end] or None)
            pos = end
        pos += 1
        if buf[pos - 1] == 0x0A:
            rows.append(row)
            row = []
    return rows


class JsonEncoder:
    """COPY chunks (whole rows) to JSON text, one object (or value) per row.

    Framing: `separator` goes between rows, `end` after each; `objects` selects objects
    keyed by column name or bare values (scalar functions).
    """

    def __init__(self, columns: Sequence[Column], *, objects: bool, separator: bytes,
                 end: bytes) -> None:
        self.codecs = [c.type.codec for c in columns]
        self.width = len(columns)
        if objects:
            keys = [orjson.dumps(c.name) + b":" for c in columns]
            template = [separator, b"{" + keys[0]]
            for key in keys[1:]:
                template += [_SLOT, b"," + key]
            template += [_SLOT, b"}" + end]
        else:
            template = [separator, _SLOT, end]
        self.template = template
        self.stride = len(template)
        self.slots = [2 + 2 * i for i in range(self.width)] if objects else [1]
        self.first = True
        self.strings: dict[bytes, bytes] = {b"": NULL}

    def encode(self, chunk: bytes) -> tuple[bytes, int]:
        """(JSON text, row count) of a chunk of whole COPY rows."""
        if Q in chunk:
            return self._encode_rows(split_rows(chunk))
        flat = chunk.replace(NL, D)
        fields = flat.split(D)
        count, extra = divmod(len(fields) - 1, self.width)
        if extra or not count:
            return self._encode_rows(split_rows(chunk))
        has_null = D + D in flat or flat[:1] == D
        out = self.template * count
        end = count * self.width
        for i, codec in enumerate(self.codecs):
            column = fields[i:end:self.width]
            out[self.slots[i]::self.stride] = self._column(codec, column, has_null)
        self._first_row(out)
        return b"".join(out), count

    def _first_row(self, out: list) -> None:
        if self.first:
            out[0] = b""
            self.first = False

    def _column(self, codec: Codec, column: list[bytes], has_null: bool) -> list[bytes]:
        if codec is Codec.STRING:
            return self._strings(column)
        if codec is Codec.NUMBER:
            joined = D.join(column)
            if has_null or b"N" in joined or b"I" in joined:
                special = _SPECIAL_NUMBERS
                return [special.get(v, v) for v in column]
            return column
        if codec is Codec.BOOLEAN:
            return [_BOOLEANS[v] for v in column]
        if codec is Codec.TIMESTAMPTZ or codec is Codec.TIMESTAMP:
            return self._timestamps(codec, column)
        if has_null:
            return [v or NULL for v in column]
        return column

    def _strings(self, column: list[bytes]) -> list[bytes]:
        """Through a bounded cache: device and metric ids repeat on every row."""
        cache = self.strings
        missing = set(column).difference(cache)
        if missing:
            if len(cache) + len(missing) > STRING_CACHE_LIMIT:
                cache.clear()
                cache[b""] = NULL
                missing = set(column)
            for raw in missing:
                cache[raw] = orjson.dumps(raw.decode())
        return list(map(cache.__getitem__, column))

    def _timestamps(self, codec: Codec, column: list[bytes]) -> list[bytes]:
        joined = b'"' + b'"\x02"'.join(column) + b'"'
        converted = joined.replace(b" ", b"T")
        present = len(column) - column.count(b"")
        if codec is Codec.TIMESTAMPTZ:
            converted = converted.replace(b'+00"', b'+00:00"')
            regular = converted.count(b'+00:00"') == present
        else:
            regular = converted.count(b"T") == present
        if b"B" in joined or not regular:
            convert = _VALUE_CONVERTERS[codec]
            return [convert(v or None) for v in column]
        values = converted.split(D)
        if present < len(column):
            values = [v if v != b'""' else NULL for v in values]
        return values

    def _encode_rows(self, rows: list[list[bytes | None]]) -> tuple[bytes, int]:
        converters = [_VALUE_CONVERTERS[c] for c in self.codecs]
        out = self.template * len(rows)
        for r, row in enumerate(rows):
            base = r * self.stride
            for i, convert in enumerate(converters):
                out[base + self.slots[i]] = convert(row[i])
        if rows:
            self._first_row(out)
        return b"".join(out), len(rows)


class Framing:
    """What a response holds before, between and after rows, per shape and format."""

    def __init__(self, shape: Shape, fmt: Format, columns: Sequence[Column]) -> None:
        many = shape in (Shape.ROWS, Shape.SETOF_SCALAR)
        objects = shape in (Shape.ROWS, Shape.SINGLE_ROW)
        if fmt is Format.NDJSON:
            self.head, self.tail, self.empty = b"", b"", b""
            self.encoder = JsonEncoder(columns, objects=objects, separator=b"", end=b"\n")
        elif many:
            self.head, self.tail, self.empty = b"[", b"]", b"[]"
            self.encoder = JsonEncoder(columns, objects=objects, separator=b",\n", end=b"")
        else:
            self.head, self.tail, self.empty = b"", b"", NULL
            self.encoder = JsonEncoder(columns, objects=objects, separator=b"", end=b"")
