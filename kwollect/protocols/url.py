"""Metric URLs, read the same way by every protocol: parts, typed query options, redaction.

Every protocol names its targets with a URL ``<scheme>://[<user>[:<password>]@]<host>[:<port>]
/<path>[?<options>][#<fragment>]`` and validates it when metrics.d is loaded, so a mistake is
reported with the file and entry before anything runs.  This module holds what they share:

- `split_url`: scheme, credentials (percent-decoded; the password as a `Secret`), host
  (lower-case, IPv6 without brackets), port (1..65535, or the protocol's default), path, query
  and fragment, with one wording for each mistake;
- `read_options`: the query as typed options (`Option` with the readers `integer`, `number`,
  `choice`, `pattern`, `flag`, `absolute_path`, `any_text`), one error wording for an unknown,
  repeated or bad option; protocols that pass other parameters on (HTTP) get them back raw;
- `redact_url`: the URL for logs and messages, without its password (or, for SNMP's
  community, without the whole user part);
- `Secret`: a string whose ``repr``, ``str`` and formatting show ``***``.

Values are percent-decoded and ``+`` stays ``+`` (no form-encoding), so a file path or a
number such as ``1e+3`` survives as written.  Every error is a `ValueError` whose message
starts with the redacted URL and never holds a secret.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar
from urllib.parse import unquote, urlsplit

T = TypeVar("T")

MASK = "***"


class Secret(str):
    """A password, community or key: compares, hashes and encodes as its value, but its
    ``repr``, ``str`` and f-string formatting show ``***``, so a target key, a log line or
    an error message that holds one never shows it.  `reveal` gives the value as a plain str.
    """

    __slots__ = ()

    def reveal(self) -> str:
        return str.__str__(self)

    def __repr__(self) -> str:
        return f"'{MASK}'"

    def __str__(self) -> str:
        return MASK

    def __format__(self, spec: str) -> str:
        return format(MASK, spec)


def _authority_end(rest: str) -> int:
    """Where the authority of ``rest`` (a URL after ``scheme://``) ends."""
    return min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))


def redact_url(url: str, *, secret_user: bool = False) -> str:
    """`url` without its password, for logs and messages: ``user:***@host``.

    With `secret_user` (SNMP's community is the user part) the whole user part is hidden:
    ``***@host``.  Works on the text as given, so it never fails, even on a URL that does not
    parse (a bad port, an unbalanced bracket).
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    end = _authority_end(rest)
    userinfo, at, hostport = rest[:end].rpartition("@")
    if not at:
        return url
    if secret_user:
        shown = MASK
    else:
        user, colon, _ = userinfo.partition(":")
        if not colon:
            return url
        shown = f"{user}:{MASK}" if user else MASK
    return f"{scheme}://{shown}@{hostport}{rest[end:]}"


def target_name(url: str) -> str:
    """``scheme://host[:port]`` of a URL: no credentials, no path (names a target in stats)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    return f"{parts.scheme}://{host}:{parts.port}" if parts.port else f"{parts.scheme}://{host}"


@dataclass(frozen=True, slots=True)
class UrlParts:
    """A metric URL split into its parts; `shown` is the URL for messages."""

    shown: str
    scheme: str
    """Lower-case."""
    userinfo: str | None
    """The raw (percent-encoded) text before ``@``, None without ``@``."""
    username: str | None
    """Percent-decoded; None without ``@``."""
    password: Secret | None
    """Percent-decoded; None without ``:`` in the user part."""
    host: str
    """Lower-case, an IPv6 address without its brackets."""
    port: int
    path: str
    query: str
    fragment: str

    def error(self, message: str) -> ValueError:
        """A ValueError for this URL: ``<shown URL>: <message>``."""
        return ValueError(f"{self.shown}: {message}")


def split_url(url: str, schemes: Collection[str], what: str,
              default_port: int | Mapping[str, int], *, secret_user: bool = False,
              shown: str | None = None) -> UrlParts:
    """Split and check a metric URL of one of `schemes` (`what` names the protocol).

    Checks the scheme, that there is a host, and the port (1..65535; `default_port`, or
    `default_port[scheme]`, when none is given).  Anything else (credentials wanted or
    refused, the path, options) is the protocol's to check, with `UrlParts.error`.  `shown`
    replaces the redacted `url` in messages (SNMP parses a URL whose template was taken out).
    """
    if shown is None:
        shown = redact_url(url, secret_user=secret_user)
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
    except ValueError as exc:  # an unbalanced or invalid [IPv6] host
        raise ValueError(f"{shown}: malformed URL ({exc})") from None
    scheme = parts.scheme.lower()
    if scheme not in schemes:
        # "an SNMP", "an IPMI", "a Modbus", "a JSON-over-HTTP"
        vowel_sound = what[:1] in "AEIOU" or (what.isupper() and what[:1] in "FHLMNRSX")
        raise ValueError(f"{shown}: not {'an' if vowel_sound else 'a'} {what} URL scheme: "
                         f"{scheme!r} (expected {', '.join(schemes)})")
    if not host:
        raise ValueError(f"{shown}: no host")
    try:
        port = parts.port
    except ValueError:
        port = 0
    if port == 0:
        raise ValueError(f"{shown}: invalid port: not a number in 1..65535")
    userinfo, at, _ = parts.netloc.rpartition("@")
    username = password = None
    if at:
        user, colon, secret = userinfo.partition(":")
        username = unquote(user)
        password = Secret(unquote(secret)) if colon else None
    if port is None:
        port = default_port if isinstance(default_port, int) else default_port[scheme]
    return UrlParts(shown, scheme, userinfo if at else None, username, password, host, port,
                    parts.path, parts.query, parts.fragment)


# --- typed query options --------------------------------------------------------------------

Reader = Callable[[str], T]
"""Turns an option's text into its value; raises ValueError("must <what it expects>")."""


@dataclass(frozen=True, slots=True)
class Option(Generic[T]):
    """A query option a protocol reads: its name and how its text becomes a value."""

    name: str
    read: Reader[T]


def integer(low: int, high: int, *, hexadecimal: bool = False) -> Reader[int]:
    """Decimal digits (or ``0x`` hexadecimal when allowed) within low..high."""
    def read(text: str) -> int:
        if hexadecimal and text[:2].lower() == "0x":
            digits, base = re.fullmatch(r"[0-9a-fA-F]+", text[2:]), 16
        else:
            digits, base = re.fullmatch(r"[0-9]+", text), 10
        # the length bound keeps int() away from its 4,300-digit limit on hostile input
        if digits is not None and len(text) <= 32 \
                and low <= (value := int(digits.group(), base)) <= high:
            return value
        raise ValueError(f"must be an integer in {low}..{high}")
    return read


def number(low: float = -math.inf, *, nonzero: bool = False) -> Reader[float]:
    """A finite decimal number >= low (and not 0 when `nonzero`)."""
    def read(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if math.isfinite(value) and value >= low and not (nonzero and value == 0):
            return value
        what = "a finite number" + (" other than 0" if nonzero else "")
        raise ValueError(f"must be {what}" + (f" >= {low:g}" if low > -math.inf else ""))
    return read


def choice(values: Collection[str], *, upper: bool = False) -> Reader[str]:
    """One of `values` (compared in upper case when `upper`, and returned so)."""
    def read(text: str) -> str:
        value = text.upper() if upper else text
        if value in values:
            return value
        raise ValueError(f"must be one of {', '.join(values)}")
    return read


def pattern(regex: str, expected: str) -> Reader[str]:
    """Text matching `regex` entirely; `expected` says what that is."""
    compiled = re.compile(regex)

    def read(text: str) -> str:
        if compiled.fullmatch(text):
            return text
        raise ValueError(f"must be {expected}")
    return read


_TRUE = frozenset({"", "1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


def flag(text: str) -> bool:
    lowered = text.lower()
    if lowered in _TRUE or lowered in _FALSE:
        return lowered in _TRUE
    raise ValueError("must be 1/0, true/false, yes/no or on/off")


def absolute_path(text: str) -> str:
    if text.startswith("/"):
        return text
    raise ValueError("must be an absolute path")


def any_text(value: str) -> str:
    return value


def read_options(parts: UrlParts, options: Sequence[Option[Any]], *,
                 forward_unknown: bool = False) -> tuple[dict[str, Any], list[str]]:
    """The typed values of the options given in the query, and (with `forward_unknown`)
    the raw query items that are not options, to pass on; without it an unknown option is
    an error.  An option given twice is an error; an item without ``=`` has the value ``""``.
    """
    known = {option.name: option for option in options}
    values: dict[str, Any] = {}
    forwarded: list[str] = []
    for raw in parts.query.split("&"):
        if not raw:
            continue
        name, _, value = (unquote(item) for item in raw.partition("="))
        option = known.get(name)
        if option is None:
            if forward_unknown:
                forwarded.append(raw)
                continue
            raise parts.error(f"unknown option {name!r} (known: {', '.join(known)})")
        if name in values:
            raise parts.error(f"option {name!r} given twice")
        try:
            values[name] = option.read(value)
        except ValueError as exc:
            raise parts.error(f"bad value {value!r}: {name} {exc}") from None
    return values, forwarded
