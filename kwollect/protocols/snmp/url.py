"""SNMP metric URLs: validated into the target key (`SnmpTarget`) and the OID (`OidSpec`).

The URL forms are described in the package docstring and docs/protocols/snmp.md.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

from puresnmp import exc as puresnmp_exc
from puresnmp.plugins import priv as puresnmp_priv

from kwollect.protocols.snmp.codec import parse_oid
from kwollect.protocols.url import (
    Option,
    Secret,
    UrlParts,
    choice,
    integer,
    number,
    read_options,
    redact_url,
    split_url,
)

SCHEMES = ("snmp", "snmpv1", "snmpv3")

_VERSIONS = {"snmpv1": 1, "snmp": 2, "snmpv3": 3}
AUTH_METHODS = {"SHA": "sha1", "SHA1": "sha1", "MD5": "md5"}
PRIV_METHODS = {"AES": "aes", "AES128": "aes", "DES": "des"}
_OPTIONS = (Option("max_varbinds", integer(1, 1000)), Option("max_inflight", integer(1, 64)),
            Option("resolve_every", number(0)))
_V3_OPTIONS = (*_OPTIONS, Option("auth", choice(AUTH_METHODS, upper=True)),
               Option("priv", choice(PRIV_METHODS, upper=True)))
_TEMPLATE = re.compile(r"\{\{(.*?)\}\}", re.S)
_TEMPLATE_BODY = re.compile(r"\s*([0-9.]+)\s*==(.*)", re.S)
_PLACEHOLDER = "__TEMPLATE__"


@dataclass(frozen=True)
class SnmpTarget:
    """What identifies one agent session; its repr and str never show secrets."""

    version: int
    host: str
    port: int
    community: Secret = Secret("")
    user: str = ""
    auth: str = ""
    auth_key: Secret = Secret("")
    priv: str = ""
    priv_key: Secret = Secret("")
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
    return redact_url(url, secret_user=url.partition(":")[0].lower() != "snmpv3")


def parse_url(url: str) -> tuple[SnmpTarget, OidSpec]:
    """Validate an SNMP metric URL; ValueError says what is wrong (without secrets)."""
    template = _TEMPLATE.search(url)
    work = url if template is None else url[:template.start()] + _PLACEHOLDER + url[template.end():]
    parts = split_url(work, SCHEMES, "SNMP", 161, shown=safe_url(url))
    version = _VERSIONS[parts.scheme]
    if not parts.userinfo:
        form = "snmpv3://<user>[:<authkey>[:<privkey>]]@" if version == 3 else \
            f"{parts.scheme}://<community>@"
        raise parts.error(f"no credentials; the form is {form}<host>[:<port>]/<oid>")
    options, _ = read_options(parts, _V3_OPTIONS if version == 3 else _OPTIONS)
    credentials = _parse_credentials(parts, version, options)
    target = SnmpTarget(version, parts.host, parts.port, **credentials, **options)
    if template is None:
        spec = OidSpec(_oid(parts.path[1:], parts.shown))
    else:
        spec = _parse_template(parts.path[1:], template.group(1), parts.shown)
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


def _parse_credentials(parts: UrlParts, version: int, options: dict[str, Any]) -> dict[str, Any]:
    userinfo = parts.userinfo or ""
    if version != 3:
        if ":" in userinfo:
            raise parts.error("a community has no password part "
                              "(percent-encode ':' as %3A if the community holds one)")
        return {"community": Secret(unquote(userinfo))}
    fields = [unquote(part) for part in userinfo.split(":")]
    if len(fields) > 3 or not fields[0]:
        raise parts.error("SNMPv3 credentials read <user>[:<authkey>[:<privkey>]]")
    user, auth_key, priv_key = (*fields, "", "")[:3]
    auth = options.pop("auth", "SHA" if auth_key else "")
    priv = options.pop("priv", "AES" if priv_key else "")
    if bool(auth) != bool(auth_key) or bool(priv) != bool(priv_key):
        raise parts.error("auth/priv given without its key, or a key without a method")
    if priv_key and not auth_key:
        raise parts.error("privacy needs authentication (an auth key)")
    for name, key in (("auth", auth_key), ("priv", priv_key)):
        if key and len(key) < 8:
            raise parts.error(f"the {name} key must have at least 8 characters")
    if priv:
        try:
            puresnmp_priv.create(PRIV_METHODS[priv])
        except puresnmp_exc.SnmpError:
            raise parts.error(f"priv={priv} needs the puresnmp-crypto package") from None
    return {"user": user, "auth": auth, "auth_key": Secret(auth_key), "priv": priv,
            "priv_key": Secret(priv_key)}
