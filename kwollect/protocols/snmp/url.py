"""SNMP metric URLs: validated into the target key (`SnmpTarget`) and the OID (`OidSpec`).

The URL forms are described in the package docstring and docs/protocols/snmp.md.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from puresnmp import exc as puresnmp_exc
from puresnmp.plugins import priv as puresnmp_priv

from kwollect.protocols import redact_url
from kwollect.protocols.snmp.codec import parse_oid

SCHEMES = ("snmp", "snmpv1", "snmpv3")

_VERSIONS = {"snmpv1": 1, "snmp": 2, "snmpv3": 3}
AUTH_METHODS = {"SHA": "sha1", "SHA1": "sha1", "MD5": "md5"}
PRIV_METHODS = {"AES": "aes", "AES128": "aes", "DES": "des"}
_OPTIONS = ("max_varbinds", "max_inflight", "resolve_every")
_TEMPLATE = re.compile(r"\{\{(.*?)\}\}", re.S)
_TEMPLATE_BODY = re.compile(r"\s*([0-9.]+)\s*==(.*)", re.S)
_PLACEHOLDER = "__TEMPLATE__"


@dataclass(frozen=True)
class SnmpTarget:
    """What identifies one agent session; its repr and str never show secrets."""

    version: int
    host: str
    port: int
    community: str = field(default="", repr=False)
    user: str = ""
    auth: str = ""
    auth_key: str = field(default="", repr=False)
    priv: str = ""
    priv_key: str = field(default="", repr=False)
    max_varbinds: int = 50
    max_inflight: int = 4
    resolve_every: float = 300.0

    @property
    def label(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        if self.version == 3:
            return f"snmpv3://{self.user}@{host}:{self.port}"
        scheme = "snmpv1" if self.version == 1 else "snmp"
        return f"{scheme}://***@{host}:{self.port}"

    def __str__(self) -> str:
        return self.label


@dataclass(frozen=True)
class OidSpec:
    """A metric's OID: fixed (`walk` is None) or a template resolved through a walk."""

    oid: tuple[int, ...]
    """The OID, or for a template the arcs before it."""
    walk: tuple[int, ...] | None = None
    wanted: str = ""
    after: tuple[int, ...] = ()


def safe_url(url: str) -> str:
    """The URL for messages: no community, no v3 key."""
    scheme, sep, rest = url.partition("://")
    netloc, slash, path = rest.partition("/")
    if not sep or "@" not in netloc:
        return url
    userinfo, _, hostport = netloc.rpartition("@")
    if scheme.lower() == "snmpv3":
        try:
            return redact_url(url)
        except ValueError:
            return f"{scheme}://{userinfo.partition(':')[0]}:***@{hostport}{slash}{path}"
    return f"{scheme}://***@{hostport}{slash}{path}"


def parse_url(url: str) -> tuple[SnmpTarget, OidSpec]:
    """Validate an SNMP metric URL; ValueError says what is wrong (without secrets)."""
    shown = safe_url(url)
    template = _TEMPLATE.search(url)
    work = url if template is None else url[:template.start()] + _PLACEHOLDER + url[template.end():]
    parts = urlsplit(work)
    version = _VERSIONS.get(parts.scheme.lower())
    if version is None:
        raise ValueError(f"{shown}: scheme must be one of {', '.join(SCHEMES)}")
    userinfo, at, _ = parts.netloc.rpartition("@")
    if not at or not userinfo:
        form = "snmpv3://<user>[:<authkey>[:<privkey>]]@" if version == 3 else \
            f"{parts.scheme}://<community>@"
        raise ValueError(f"{shown}: no credentials; the form is {form}<host>[:<port>]/<oid>")
    host = parts.hostname
    if not host:
        raise ValueError(f"{shown}: no host")
    try:
        port = parts.port or 161
    except ValueError:
        raise ValueError(f"{shown}: the port is not a number in 1..65535") from None
    options = _parse_options(parts.query, version, shown)
    credentials = _parse_credentials(userinfo, version, options, shown)
    target = SnmpTarget(version, host, port, **credentials, **options)
    if template is None:
        spec = OidSpec(_oid(parts.path[1:], shown))
    else:
        spec = _parse_template(parts.path[1:], template.group(1), shown)
    return target, spec


def _oid(text: str, shown: str) -> tuple[int, ...]:
    try:
        return parse_oid(unquote(text))
    except ValueError as exc:
        raise ValueError(f"{shown}: {exc}") from None


def _parse_template(path: str, body: str, shown: str) -> OidSpec:
    before, _, after = path.partition(_PLACEHOLDER)
    inner = _TEMPLATE_BODY.fullmatch(body)
    if inner is None or not before.endswith(".") or (after and not after.startswith(".")):
        raise ValueError(f"{shown}: a template reads <prefix>.{{{{ <walk_oid> == <value> }}}}"
                         "[.<suffix>]")
    wanted = inner.group(2).strip()
    if not wanted:
        raise ValueError(f"{shown}: the template compares with an empty value")
    if after and not re.fullmatch(r"\.[0-9]+(\.[0-9]+)*", after):
        raise ValueError(f"{shown}: the text after the template must be dotted numbers")
    suffix = tuple(int(arc) for arc in after[1:].split(".")) if after else ()
    return OidSpec(_oid(before[:-1], shown), _oid(inner.group(1), shown), wanted, suffix)


def _parse_options(query: str, version: int, shown: str) -> dict[str, Any]:
    allowed = (*_OPTIONS, "auth", "priv") if version == 3 else _OPTIONS
    options: dict[str, Any] = {}
    for name, value in parse_qsl(query, keep_blank_values=True):
        if name not in allowed:
            raise ValueError(f"{shown}: unknown option {name!r} (known: {', '.join(allowed)})")
        if name in options:
            raise ValueError(f"{shown}: option {name!r} given twice")
        options[name] = value
    for name, low, high in (("max_varbinds", 1, 1000), ("max_inflight", 1, 64)):
        if name in options:
            raw = options[name]
            if not raw.isdigit() or not low <= int(raw) <= high:
                raise ValueError(f"{shown}: {name} must be an integer in {low}..{high}")
            options[name] = int(raw)
    if "resolve_every" in options:
        try:
            seconds = float(options["resolve_every"])
        except ValueError:
            seconds = -1.0
        if not 0 <= seconds < math.inf:
            raise ValueError(f"{shown}: resolve_every must be a number of seconds >= 0")
        options["resolve_every"] = seconds
    return options


def _parse_credentials(userinfo: str, version: int, options: dict[str, Any],
                       shown: str) -> dict[str, Any]:
    if version != 3:
        if ":" in userinfo:
            raise ValueError(f"{shown}: a community has no password part "
                             "(percent-encode ':' as %3A if the community holds one)")
        return {"community": unquote(userinfo)}
    fields = [unquote(part) for part in userinfo.split(":")]
    if len(fields) > 3 or not fields[0]:
        raise ValueError(f"{shown}: SNMPv3 credentials read <user>[:<authkey>[:<privkey>]]")
    user, auth_key, priv_key = (*fields, "", "")[:3]
    auth = options.pop("auth", "SHA" if auth_key else "").upper()
    priv = options.pop("priv", "AES" if priv_key else "").upper()
    if auth and auth not in AUTH_METHODS:
        raise ValueError(f"{shown}: auth must be one of {', '.join(AUTH_METHODS)}")
    if priv and priv not in PRIV_METHODS:
        raise ValueError(f"{shown}: priv must be one of {', '.join(PRIV_METHODS)}")
    if bool(auth) != bool(auth_key) or bool(priv) != bool(priv_key):
        raise ValueError(f"{shown}: auth/priv given without its key, or a key without a method")
    if priv_key and not auth_key:
        raise ValueError(f"{shown}: privacy needs authentication (an auth key)")
    for name, key in (("auth", auth_key), ("priv", priv_key)):
        if key and len(key) < 8:
            raise ValueError(f"{shown}: the {name} key must have at least 8 characters")
    if priv:
        try:
            puresnmp_priv.create(PRIV_METHODS[priv])
        except puresnmp_exc.SnmpError:
            raise ValueError(f"{shown}: priv={priv} needs the puresnmp-crypto package") from None
    return {"user": user, "auth": auth, "auth_key": auth_key, "priv": priv,
            "priv_key": priv_key}
