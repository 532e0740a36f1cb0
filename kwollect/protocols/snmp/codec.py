"""A lean BER codec for community-based SNMP (v1, v2c): GET/GETNEXT/GETBULK and their responses.

Why not puresnmp for this: building and parsing its generic x690 object trees costs about
90 µs of CPU per value, while the kwollector budget is about 15 µs per value for everything.
This module only does what polling needs, on plain bytes:

- a request is pre-encoded once per batch of OIDs; per poll only its 4-byte request-id
  changes (request-ids are kept in [2**24, 2**31) so their encoding has a fixed size);
- a GET response is checked against the OIDs we asked for by comparing their encoded bytes,
  so OIDs are never decoded on the hot path.

SNMPv3 (USM security) is left to puresnmp.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from kwollect.errors import KwollectError

SEQUENCE = 0x30
INTEGER = 0x02
OCTET_STRING = 0x04
NULL = 0x05
OBJECT_IDENTIFIER = 0x06
IP_ADDRESS = 0x40
COUNTER32 = 0x41
GAUGE32 = 0x42
TIME_TICKS = 0x43
OPAQUE = 0x44
COUNTER64 = 0x46

GET_REQUEST = 0xA0
GET_NEXT_REQUEST = 0xA1
GET_RESPONSE = 0xA2
GET_BULK_REQUEST = 0xA5

VERSION_1 = 0
VERSION_2C = 1

REQUEST_ID_MIN = 1 << 24
REQUEST_ID_MAX = (1 << 31) - 1

ERROR_NAMES = {
    0: "noError", 1: "tooBig", 2: "noSuchName", 3: "badValue", 4: "readOnly", 5: "genErr",
    6: "noAccess", 7: "wrongType", 8: "wrongLength", 9: "wrongEncoding", 10: "wrongValue",
    11: "noCreation", 12: "inconsistentValue", 13: "resourceUnavailable", 14: "commitFailed",
    15: "undoFailed", 16: "authorizationError", 17: "notWritable", 18: "inconsistentName",
}
TOO_BIG = 1
NO_SUCH_NAME = 2


class BerError(KwollectError, ValueError):
    """The bytes are not the SNMP message we expect (malformed or truncated)."""


class Missing:
    """An SNMPv2 exception value in a varbind: the agent has no value for that OID."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


class Refused:
    """A value kwollect will not store as a number: its reason says what it was.

    An INTEGER or counter wider than 64 bits (once an OverflowError that lost the whole
    poll), an Opaque that is not net-snmp's float or double wrapping, a type the standard
    does not define (once stored as its hex digits read as decimal: ``01 02`` as 102.0).
    The collector skips and counts it; the other values of the poll are kept.
    """

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def __repr__(self) -> str:
        return f"Refused({self.reason!r})"


MAX_INTEGER_BYTES = 9
"""Counter64 takes 9 bytes in BER (a leading zero); INTEGER (Integer32) takes 4."""


NO_SUCH_OBJECT = Missing("noSuchObject")
NO_SUCH_INSTANCE = Missing("noSuchInstance")
END_OF_MIB_VIEW = Missing("endOfMibView")
NULL_VALUE = Missing("NULL")
_MISSING = {0x80: NO_SUCH_OBJECT, 0x81: NO_SUCH_INSTANCE, 0x82: END_OF_MIB_VIEW, NULL: NULL_VALUE}
_UNSIGNED = frozenset((COUNTER32, GAUGE32, TIME_TICKS, COUNTER64))

Value = int | float | bytes | str | Missing | Refused


# --- encoding -------------------------------------------------------------------------------

def encode_length(length: int) -> bytes:
    if length < 0x80:
        return bytes((length,))
    raw = length.to_bytes((length.bit_length() + 7) // 8, "big")
    return bytes((0x80 | len(raw),)) + raw


def encode_tlv(tag: int, payload: bytes) -> bytes:
    return bytes((tag,)) + encode_length(len(payload)) + payload


def encode_integer(value: int) -> bytes:
    """INTEGER TLV in the minimal two's-complement form BER requires."""
    size = ((value if value >= 0 else ~value).bit_length() + 8) // 8
    return encode_tlv(INTEGER, value.to_bytes(size, "big", signed=True))


def parse_oid(text: str) -> tuple[int, ...]:
    """Dotted OID text (with or without a leading dot) to arcs, validated for BER encoding."""
    body = text.strip()
    if body.startswith("."):
        body = body[1:]
    try:
        arcs = tuple(int(part) for part in body.split("."))
    except ValueError:
        raise ValueError(f"invalid OID {text!r}: arcs must be decimal numbers") from None
    if len(arcs) < 2:
        raise ValueError(f"invalid OID {text!r}: it needs at least two arcs")
    if arcs[0] > 2 or (arcs[0] < 2 and arcs[1] >= 40) or min(arcs) < 0:
        raise ValueError(f"invalid OID {text!r}: first arcs out of range")
    return arcs


def encode_oid(arcs: Sequence[int]) -> bytes:
    """OBJECT IDENTIFIER TLV; arcs above 127 use the base-128 continuation form."""
    out = bytearray()
    for arc in (arcs[0] * 40 + arcs[1], *arcs[2:]):
        chunk = [arc & 0x7F]
        arc >>= 7
        while arc:
            chunk.append(0x80 | (arc & 0x7F))
            arc >>= 7
        out.extend(reversed(chunk))
    return encode_tlv(OBJECT_IDENTIFIER, bytes(out))


def encode_varbind_list(oid_tlvs: Sequence[bytes]) -> bytes:
    """The varbind list of a request: each OID bound to NULL."""
    return encode_tlv(SEQUENCE, b"".join(encode_tlv(SEQUENCE, oid + b"\x05\x00")
                                         for oid in oid_tlvs))


class RequestTemplate:
    """A request whose only varying part is its request-id: `packet(rid)` is one concatenation."""

    __slots__ = ("_head", "_tail")

    def __init__(self, version: int, community: bytes, pdu_tag: int, varbind_list: bytes,
                 error_status: int = 0, error_index: int = 0) -> None:
        pdu_body = (b"\x02\x04\x00\x00\x00\x00" + encode_integer(error_status)
                    + encode_integer(error_index) + varbind_list)
        message = encode_tlv(SEQUENCE, encode_integer(version) + encode_tlv(OCTET_STRING, community)
                             + encode_tlv(pdu_tag, pdu_body))
        # the request-id's 4 content bytes sit right before error-status, at a fixed offset
        rid_at = len(message) - len(pdu_body) + 2
        self._head = message[:rid_at]
        self._tail = message[rid_at + 4:]

    def packet(self, request_id: int) -> bytes:
        return self._head + request_id.to_bytes(4, "big") + self._tail


def get_request(version: int, community: bytes, oid_tlvs: Sequence[bytes]) -> RequestTemplate:
    return RequestTemplate(version, community, GET_REQUEST, encode_varbind_list(oid_tlvs))


def walk_request(version: int, community: bytes, oid_tlv: bytes,
                 repetitions: int) -> RequestTemplate:
    """GETBULK (v2c) or GETNEXT (v1) for the next entries after `oid_tlv`."""
    varbinds = encode_varbind_list([oid_tlv])
    if version == VERSION_1:
        return RequestTemplate(version, community, GET_NEXT_REQUEST, varbinds)
    return RequestTemplate(version, community, GET_BULK_REQUEST, varbinds, 0, repetitions)


# --- decoding -------------------------------------------------------------------------------

def _length(data: bytes, pos: int) -> tuple[int, int]:
    """Length at `pos` and the position of the contents; accepts long forms up to 4 bytes."""
    first = data[pos]
    if first < 0x80:
        return first, pos + 1
    size = first & 0x7F
    if size == 0 or size > 4:
        raise BerError(f"unsupported length form 0x{first:02x} at offset {pos}")
    end = pos + 1 + size
    if end > len(data):
        raise BerError("truncated length")
    return int.from_bytes(data[pos + 1:end], "big"), end


def _small_int(data: bytes, pos: int, what: str) -> tuple[int, int]:
    if data[pos] != INTEGER:
        raise BerError(f"{what}: expected INTEGER, got tag 0x{data[pos]:02x}")
    length, pos = _length(data, pos + 1)
    if not 0 < length <= 8:
        raise BerError(f"{what}: bad INTEGER length {length}")
    end = pos + length
    return int.from_bytes(data[pos:end], "big", signed=True), end


class ResponseHeader:
    """Where a response's parts are, as found by `parse_response_header`."""

    __slots__ = ("request_id", "error_status", "error_index", "varbinds_at", "end")

    def __init__(self, request_id: int, error_status: int, error_index: int, varbinds_at: int,
                 end: int) -> None:
        self.request_id = request_id
        self.error_status = error_status
        self.error_index = error_index
        self.varbinds_at = varbinds_at
        self.end = end


def message_prefix(version: int, community: bytes) -> bytes:
    """The bytes a response to us carries right after its outer SEQUENCE header."""
    return encode_integer(version) + encode_tlv(OCTET_STRING, community)


def parse_response_header(data: bytes, prefix: bytes) -> ResponseHeader:
    """Check a datagram is a GetResponse for our version and community, and locate its parts.

    Raises BerError for anything else (malformed, truncated, another version or community).
    """
    try:
        if data[0] != SEQUENCE:
            raise BerError("not a SEQUENCE")
        length, pos = _length(data, 1)
        end = pos + length
        if end > len(data):
            raise BerError("truncated message")
        if not data.startswith(prefix, pos):
            raise BerError("other SNMP version or community")
        pos += len(prefix)
        if data[pos] != GET_RESPONSE:
            raise BerError(f"not a GetResponse PDU (tag 0x{data[pos]:02x})")
        length, pos = _length(data, pos + 1)
        if pos + length > end:
            raise BerError("truncated PDU")
        request_id, pos = _small_int(data, pos, "request-id")
        error_status, pos = _small_int(data, pos, "error-status")
        error_index, pos = _small_int(data, pos, "error-index")
        if data[pos] != SEQUENCE:
            raise BerError("varbind list is not a SEQUENCE")
        length, pos = _length(data, pos + 1)
        if pos + length > end:
            raise BerError("truncated varbind list")
        return ResponseHeader(request_id, error_status, error_index, pos, pos + length)
    except IndexError:
        raise BerError("truncated message") from None


def decode_get_values(data: bytes, header: ResponseHeader,
                      oid_tlvs: Sequence[bytes]) -> list[Value]:
    """The values of a GET response, in request order, checking each OID is the one we sent.

    Integers are Python ints (INTEGER signed; Counter32/Gauge32/TimeTicks/Counter64
    unsigned); OctetString is bytes; OID and IpAddress are dotted text; an Opaque float or
    double is a float; SNMPv2 exceptions are `Missing` singletons.
    """
    pos = header.varbinds_at
    end = header.end
    out: list[Value] = []
    append = out.append
    from_bytes = int.from_bytes
    unsigned = _UNSIGNED
    try:
        for oid in oid_tlvs:
            length = data[pos + 1]
            if data[pos] != SEQUENCE or length > 0x7F:
                if data[pos] != SEQUENCE:
                    raise BerError(f"varbind {len(out) + 1} is not a SEQUENCE")
                length, pos = _length(data, pos + 1)
            else:
                pos += 2
            vb_end = pos + length
            if not data.startswith(oid, pos):
                raise BerError(f"varbind {len(out) + 1} is not for the OID requested")
            pos += len(oid)
            tag = data[pos]
            length = data[pos + 1]
            if length > 0x7F:
                length, pos = _length(data, pos + 1)
            else:
                pos += 2
            if pos + length != vb_end or vb_end > end:
                raise BerError(f"varbind {len(out) + 1} has inconsistent lengths")
            if length > MAX_INTEGER_BYTES and (tag == 0x02 or tag in unsigned):
                append(decode_value(tag, data[pos:vb_end]))
            elif tag == 0x02:  # INTEGER
                append(from_bytes(data[pos:vb_end], "big", signed=True))
            elif tag in unsigned:
                append(from_bytes(data[pos:vb_end]))
            elif tag == 0x04:  # OCTET STRING
                append(data[pos:vb_end])
            else:
                append(decode_value(tag, data[pos:vb_end]))
            pos = vb_end
    except IndexError:
        raise BerError("truncated varbind list") from None
    if pos != end:
        raise BerError(f"response has more varbinds than the {len(oid_tlvs)} requested")
    return out


def decode_varbinds(data: bytes, header: ResponseHeader) -> list[tuple[tuple[int, ...], Value]]:
    """All (OID arcs, value) pairs of a response, for walks."""
    pos = header.varbinds_at
    end = header.end
    out: list[tuple[tuple[int, ...], Value]] = []
    try:
        while pos < end:
            if data[pos] != SEQUENCE:
                raise BerError("varbind is not a SEQUENCE")
            length, pos = _length(data, pos + 1)
            vb_end = pos + length
            if data[pos] != OBJECT_IDENTIFIER:
                raise BerError("varbind does not start with an OID")
            length, pos = _length(data, pos + 1)
            oid = decode_oid(data[pos:pos + length])
            pos += length
            tag = data[pos]
            length, pos = _length(data, pos + 1)
            if pos + length != vb_end or vb_end > end:
                raise BerError("varbind has inconsistent lengths")
            out.append((oid, decode_value(tag, data[pos:vb_end])))
            pos = vb_end
    except IndexError:
        raise BerError("truncated varbind list") from None
    return out


def decode_oid(payload: bytes) -> tuple[int, ...]:
    if not payload or payload[-1] & 0x80:
        raise BerError("malformed OBJECT IDENTIFIER")
    arcs: list[int] = []
    arc = 0
    for byte in payload:
        arc = (arc << 7) | (byte & 0x7F)
        if not byte & 0x80:
            arcs.append(arc)
            arc = 0
    first = arcs[0]
    head = (0, first) if first < 40 else (1, first - 40) if first < 80 else (2, first - 80)
    return head + tuple(arcs[1:])


def oid_text(arcs: Sequence[int]) -> str:
    return ".".join(map(str, arcs))


def decode_opaque(payload: bytes) -> bytes | float:
    """Opaque: the net-snmp float/double wrappings become floats, anything else stays bytes."""
    if len(payload) == 7 and payload[:3] == b"\x9f\x78\x04":
        return struct.unpack(">f", payload[3:])[0]
    if len(payload) == 11 and payload[:3] == b"\x9f\x79\x08":
        return struct.unpack(">d", payload[3:])[0]
    return payload


def decode_value(tag: int, payload: bytes) -> Value:
    """Any SNMP value; OID and IpAddress become dotted text; what the standard does not
    define, or a number wider than 64 bits, is `Refused`."""
    if tag == INTEGER or tag in _UNSIGNED:
        if len(payload) > MAX_INTEGER_BYTES:
            return Refused(f"{'INTEGER' if tag == INTEGER else f'type 0x{tag:02x}'} of "
                           f"{len(payload)} bytes: wider than 64 bits")
        return int.from_bytes(payload, "big", signed=tag == INTEGER)
    if tag == OCTET_STRING:
        return payload
    missing = _MISSING.get(tag)
    if missing is not None:
        return missing
    if tag == OBJECT_IDENTIFIER:
        return oid_text(decode_oid(payload))
    if tag == IP_ADDRESS:
        return ".".join(map(str, payload))
    if tag == OPAQUE:
        value = decode_opaque(payload)
        return value if isinstance(value, float) else Refused(
            f"Opaque of {len(payload)} bytes that is not a float or double")
    return Refused(f"type 0x{tag:02x}, which SNMP does not define")
