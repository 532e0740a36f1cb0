"""Protocol modules: one per way of reading a device, all behind the same small interface.

Each module `kwollect.protocols.<name>` provides:

- ``SCHEMES``: the URL schemes it serves (e.g. ``("snmp", "snmpv1", "snmpv3")``);
- ``target_key(desc) -> Hashable``: validates ``desc.url`` (raising ``ValueError`` with a
  message that names what is wrong) and returns the key of the target it reads; metrics
  with equal keys and equal periods are read together, by one collector;
- ``open_collector(key, timeout) -> Collector``: the object that reads that target
  (see `kwollect.model.Collector`).

Protocol modules never touch the database.
"""

from __future__ import annotations

import importlib
from collections.abc import Hashable
from types import ModuleType
from urllib.parse import urlsplit

from kwollect.model import Collector, MetricDescription

PROTOCOL_MODULES = ("snmp", "prometheus", "ipmi", "modbus", "httpjson")

_by_scheme: dict[str, ModuleType] = {}


def _schemes() -> dict[str, ModuleType]:
    if not _by_scheme:
        for name in PROTOCOL_MODULES:
            module = importlib.import_module(f"{__name__}.{name}")
            for scheme in module.SCHEMES:
                _by_scheme[scheme] = module
    return _by_scheme


def protocol_for(desc: MetricDescription) -> ModuleType:
    scheme = urlsplit(desc.url).scheme.lower()
    module = _schemes().get(scheme)
    if module is None:
        known = ", ".join(sorted(_schemes()))
        raise ValueError(f"unsupported URL scheme {scheme!r} (supported: {known})")
    return module


def target_key(desc: MetricDescription) -> tuple[str, Hashable]:
    """Validate the description's URL and return (protocol name, target key)."""
    module = protocol_for(desc)
    return module.__name__.rsplit(".", 1)[1], module.target_key(desc)


def open_collector(protocol: str, key: Hashable, timeout: float) -> Collector:
    module = importlib.import_module(f"{__name__}.{protocol}")
    return module.open_collector(key, timeout)


def redact_url(url: str) -> str:
    """The URL with any password replaced, for logs and error messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    netloc = f"{parts.username}:***@{host}" if parts.username else f"***@{host}"
    return parts._replace(netloc=netloc).geturl()
