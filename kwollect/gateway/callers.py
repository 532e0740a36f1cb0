"""Which node is calling: insert_user_metrics is called without a token from inside a job,
so kwollect-api names the caller from its address.

The address is the TCP peer's, or, when the peer is a trusted proxy, the last address of
X-Forwarded-For that is not itself a trusted proxy (anything before it could be forged by
the client).  The node name comes from the operator's map file (``ADDRESS NODE`` lines,
``#`` comments) or, when enabled, from reverse DNS (cut at the first dot, as job node
names are).  Reverse answers are cached for CACHE_S seconds, failures for a tenth of it.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time
from collections.abc import Mapping
from pathlib import Path

from kwollect.options import OptionError

CACHE_S = 300.0
IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def _address(text: str) -> str | None:
    try:
        return str(ipaddress.ip_address(text.strip().split("%")[0]))
    except ValueError:
        return None


def load_node_map(path: str) -> dict[str, str]:
    """ADDRESS NODE lines; a bad line is an error naming the file and line."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as exc:
        raise OptionError(f"kwollect-node-map-file: cannot read {path}: {exc.strerror}") from exc
    mapping: dict[str, str] = {}
    for number, line in enumerate(lines, 1):
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        address = _address(words[0]) if len(words) == 2 else None
        if address is None:
            raise OptionError(f"kwollect-node-map-file {path}, line {number}: expected "
                              f"'ADDRESS NODE', got {line.strip()!r}")
        mapping[address] = words[1].split(".", 1)[0]
    return mapping


def parse_networks(text: str) -> tuple[IpNetwork, ...]:
    networks = []
    for item in (i.strip() for i in text.split(",")):
        if item:
            try:
                networks.append(ipaddress.ip_network(item, strict=False))
            except ValueError:
                raise OptionError(f"kwollect-trusted-proxies: {item!r} is not an address "
                                  "or a network") from None
    return tuple(networks)


class NodeResolver:
    """Caller address -> node name, from the map, then (optionally) reverse DNS."""

    def __init__(self, node_map: Mapping[str, str], reverse_dns: bool,
                 trusted_proxies: tuple[IpNetwork, ...]) -> None:
        self._map = dict(node_map)
        self._reverse_dns = reverse_dns
        self._proxies = trusted_proxies
        self._cache: dict[str, tuple[float, str | None]] = {}

    @property
    def enabled(self) -> bool:
        return bool(self._map) or self._reverse_dns

    def _trusted(self, address: str | None) -> bool:
        if address is None:
            return False
        ip = ipaddress.ip_address(address)
        return any(ip in network for network in self._proxies)

    def client_address(self, peer: str | None, forwarded_for: str | None) -> str | None:
        """The caller's address, looking through trusted proxies only."""
        address = _address(peer) if peer else None
        if not self._trusted(address) or not forwarded_for:
            return address
        for hop in reversed([h.strip() for h in forwarded_for.split(",")]):
            hop_address = _address(hop)
            if hop_address is None:
                return None  # a garbled header from a trusted proxy: nobody
            address = hop_address
            if not self._trusted(address):
                break
        return address

    async def node_of(self, address: str | None) -> str | None:
        if address is None:
            return None
        node = self._map.get(address)
        if node is not None or not self._reverse_dns:
            return node
        now = time.monotonic()
        cached = self._cache.get(address)
        if cached and cached[0] > now:
            return cached[1]
        try:
            host, _ = await asyncio.get_running_loop().getnameinfo((address, 0),
                                                                  socket.NI_NAMEREQD)
            node = host.split(".", 1)[0] or None
        except OSError:
            node = None
        self._cache[address] = (now + (CACHE_S if node else CACHE_S / 10), node)
        return node
