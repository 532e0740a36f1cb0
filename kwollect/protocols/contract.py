"""What every protocol provides, written down as types mypy checks.

A protocol is a module (or package) of `kwollect.protocols` named in `PROTOCOL_MODULES`.
It provides:

- ``SCHEMES``: the URL schemes it serves (e.g. ``("snmp", "snmpv1", "snmpv3")``);
- ``target_key(desc) -> key``: validates ``desc.url`` (a `ValueError` whose message starts
  with the redacted URL says what is wrong; `kwollect.protocols.url` parses it) and returns
  the key of the target that URL reads.  Metrics with equal keys and equal periods are read
  together, by one collector.  A key is immutable and hashable (a frozen dataclass; Modbus'
  (host, port) is a NamedTuple), its secrets are `Secret` strings, and its `label` names the
  target in messages without secrets;
- ``open_collector(key, timeout) -> Collector``: the object that reads that target (see
  `kwollect.model.Collector`), closed by its user when no longer needed.

Errors while reading a target are `kwollect.errors.TargetTimeout` or `TargetUnreachable`
(so also `TimeoutError` and `ConnectionError`) when the target does not answer or cannot be
reached, and another `KwollectError` (or `ValueError` for a URL) for the rest.  Protocol code
never touches the database.  Objects shared between collectors (connections, processes) are
kept in a `kwollect.protocols.sharing.SharedRegistry`.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import TYPE_CHECKING, Protocol, TypeVar

from kwollect.model import Collector, MetricDescription

Key = TypeVar("Key", bound="TargetKey")


class TargetKey(Hashable, Protocol):
    """Identifies one target: equal keys share a collector."""

    @property
    def label(self) -> str:
        """``scheme://[user@]host:port`` (no password, community or key), for messages."""


class Source(Protocol[Key]):
    """A protocol module: the URL schemes it serves, the key of a URL's target, a collector."""

    @property
    def SCHEMES(self) -> tuple[str, ...]: ...  # noqa: N802 - a module constant

    def target_key(self, desc: MetricDescription) -> Key: ...

    def open_collector(self, key: Key, timeout: float) -> Collector: ...


if TYPE_CHECKING:  # mypy checks here that every protocol module fulfils the contract
    from kwollect.protocols import httpjson, ipmi, modbus, prometheus, snmp
    from kwollect.protocols.http_common import HttpTarget

    _snmp: Source[snmp.SnmpTarget] = snmp
    _ipmi: Source[ipmi.Target] = ipmi
    _modbus: Source[modbus.Gateway] = modbus
    _prometheus: Source[HttpTarget] = prometheus
    _httpjson: Source[HttpTarget] = httpjson
