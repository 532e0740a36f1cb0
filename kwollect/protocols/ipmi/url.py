"""IPMI metric URLs: ``ipmisensor://<user>:<password>@<host>[:<port>]/<sensor>[?options]``
validated into the BMC's `Target` (the target key) and the sensor wanted."""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import unquote

from kwollect.protocols.url import Option, Secret, UrlParts, pattern, read_options, split_url

SCHEMES = ("ipmisensor",)

DEFAULT_PORT = 623
MAX_USER_BYTES = 16
MAX_PASSWORD_BYTES = 20

_OPTIONS = (
    Option("workaround-flags", pattern(r"[A-Za-z0-9]+(,[A-Za-z0-9]+)*",
                                       "comma-separated letters and digits")),
    Option("cipher-suite-id", pattern(r"[0-9]{1,2}", "a number of one or two digits")),
    Option("privilege-level", pattern(r"(?i:user|operator|admin)", "user, operator or admin")),
)
_HOST = re.compile(r"[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(frozen=True, slots=True)
class Target:
    """One BMC and how to log in; the password (a `Secret`) stays out of repr() and str()."""

    host: str
    port: int
    user: str
    password: Secret
    options: tuple[tuple[str, str], ...] = ()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def label(self) -> str:
        return f"ipmisensor://{self}"

    def __str__(self) -> str:
        return f"{self.user}@{self.address}" if self.user else self.address


SensorRef = int | str
"""A record id (exact) or a sensor name."""


def parse_url(url: str) -> tuple[Target, SensorRef]:
    """Split an ``ipmisensor://`` URL into its target and sensor; ValueError says what is wrong."""
    parts = split_url(url, SCHEMES, "IPMI", DEFAULT_PORT)
    if not _HOST.fullmatch(parts.host):
        raise parts.error(f"unsupported host {parts.host!r} (a DNS name or IPv4 address)")
    user = parts.username or ""
    password = parts.password or Secret("")
    _check_credential(parts, "user", user, MAX_USER_BYTES)
    _check_credential(parts, "password", password, MAX_PASSWORD_BYTES)
    sensor = unquote(parts.path[1:] if parts.path.startswith("/") else parts.path)
    if not sensor:
        raise parts.error("no sensor id or name in the path")
    ref: SensorRef = int(sensor) if sensor.isdigit() else sensor
    options, _ = read_options(parts, _OPTIONS)
    return Target(parts.host, parts.port, user, password, tuple(sorted(options.items()))), ref


def _check_credential(parts: UrlParts, what: str, value: str, limit: int) -> None:
    if _CONTROL.search(value):
        raise parts.error(f"the {what} contains a control character")
    if len(value.encode()) > limit:
        raise parts.error(f"the {what} is longer than IPMI's {limit} bytes")
