"""Protocol modules: one per way of reading a device, all behind one contract.

`kwollect.protocols.contract` states what each module provides (``SCHEMES``, ``target_key``,
``open_collector``), `kwollect.protocols.url` parses every metric URL, and
`kwollect.protocols.sharing` shares connections between collectors.  This module finds the
protocol of a URL by its scheme.  Protocol modules never touch the database.
"""

from __future__ import annotations

import importlib
from typing import Any, cast
from urllib.parse import urlsplit

from kwollect.model import Collector, MetricDescription
from kwollect.protocols.contract import Source, TargetKey

PROTOCOL_MODULES = ("snmp", "prometheus", "ipmi", "modbus", "httpjson")

_by_scheme: dict[str, tuple[str, Source[Any]]] = {}


def _load(name: str) -> Source[Any]:
    """A protocol module, imported on first use (each one pulls in its own libraries)."""
    return cast("Source[Any]", importlib.import_module(f"{__name__}.{name}"))


def _schemes() -> dict[str, tuple[str, Source[Any]]]:
    if not _by_scheme:
        for name in PROTOCOL_MODULES:
            module = _load(name)
            for scheme in module.SCHEMES:
                _by_scheme[scheme] = (name, module)
    return _by_scheme


def protocol_for(desc: MetricDescription) -> tuple[str, Source[Any]]:
    """(name, module) of the protocol that reads a description's URL."""
    try:
        scheme = urlsplit(desc.url).scheme.lower()
    except ValueError:  # e.g. a bad [IPv6] host: the protocol's parser says what is wrong
        scheme = desc.url.partition("://")[0].lower()
    found = _schemes().get(scheme)
    if found is None:
        known = ", ".join(sorted(_schemes()))
        raise ValueError(f"unsupported URL scheme {scheme!r} (supported: {known})")
    return found


def target_key(desc: MetricDescription) -> tuple[str, TargetKey]:
    """Validate the description's URL and return (protocol name, target key)."""
    name, module = protocol_for(desc)
    return name, module.target_key(desc)


def open_collector(protocol: str, key: TargetKey, timeout: float) -> Collector:
    return _load(protocol).open_collector(key, timeout)
