"""IPMI metric URLs: ``ipmisensor://<user>:<password>@<host>[:<port>]/<sensor>[?options]``
validated into the BMC's `Target` (the target key) and the sensor wanted."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, unquote, urlsplit

from kwollect.protocols import redact_url

SCHEMES = ("ipmisensor",)

DEFAULT_PORT = 623
MAX_USER_BYTES = 16
MAX_PASSWORD_BYTES = 20

_OPTIONS = {
    "workaround-flags": re.compile(r"[A-Za-z0-9]+(,[A-Za-z0-9]+)*"),
    "cipher-suite-id": re.compile(r"[0-9]{1,2}"),
    "privilege-level": re.compile(r"(?i:user|operator|admin)"),
}
_HOST = re.compile(r"[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(frozen=True, slots=True)
class Target:
    """One BMC and how to log in; the password stays out of repr() and str()."""

    host: str
    port: int
    user: str
    password: str = field(repr=False)
    options: tuple[tuple[str, str], ...] = ()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def __str__(self) -> str:
        return f"{self.user}@{self.address}" if self.user else self.address


SensorRef = int | str
"""A record id (exact) or a sensor name."""


def parse_url(url: str) -> tuple[Target, SensorRef]:
    """Split an ``ipmisensor://`` URL into its target and sensor; ValueError says what is wrong."""
    try:
        parts = urlsplit(url)
        parts.hostname  # noqa: B018 - urlsplit checks bracketed hosts only when asked
    except ValueError as exc:
        raise ValueError(f"malformed ipmisensor URL ({exc})") from None
    shown = _redact(url, parts.password)
    if parts.scheme.lower() not in SCHEMES:
        raise ValueError(f"{shown}: scheme must be ipmisensor")
    host = parts.hostname or ""
    if not _HOST.fullmatch(host):
        raise ValueError(f"{shown}: missing or unsupported host {host!r} "
                         "(a DNS name or IPv4 address)")
    try:
        port = parts.port or DEFAULT_PORT
    except ValueError as exc:
        raise ValueError(f"{shown}: bad port ({exc})") from None
    user = unquote(parts.username or "")
    password = unquote(parts.password or "")
    _check_credential(shown, "user", user, MAX_USER_BYTES)
    _check_credential(shown, "password", password, MAX_PASSWORD_BYTES)
    sensor = unquote(parts.path[1:] if parts.path.startswith("/") else parts.path)
    if not sensor:
        raise ValueError(f"{shown}: no sensor id or name in the path")
    ref: SensorRef = int(sensor) if sensor.isdigit() else sensor
    options = []
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        pattern = _OPTIONS.get(name)
        if pattern is None:
            raise ValueError(f"{shown}: unknown option {name!r} (known: {', '.join(_OPTIONS)})")
        if not pattern.fullmatch(value):
            raise ValueError(f"{shown}: bad value {value!r} for option {name!r}")
        options.append((name, value))
    if len({name for name, _ in options}) != len(options):
        raise ValueError(f"{shown}: an option is given twice")
    return Target(host.lower(), port, user, password, tuple(sorted(options))), ref


def _check_credential(shown: str, what: str, value: str, limit: int) -> None:
    if _CONTROL.search(value):
        raise ValueError(f"{shown}: the {what} contains a control character")
    if len(value.encode()) > limit:
        raise ValueError(f"{shown}: the {what} is longer than IPMI's {limit} bytes")


def _redact(url: str, password: str | None) -> str:
    try:
        return redact_url(url)
    except ValueError:  # a bad port: redact_url cannot rebuild the URL
        return url.replace(password, "***") if password else url
