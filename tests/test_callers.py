"""kwollect-api's naming of callers for insert_user_metrics: the map file, trusted proxies'
X-Forwarded-For, reverse DNS (only for 127.0.0.1, answered by /etc/hosts: no DNS query)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kwollect.gateway.callers import NodeResolver, load_node_map, parse_networks
from kwollect.options import OptionError


def test_node_map_file(tmp_path):
    path = tmp_path / "nodes"
    path.write_text("# comment\n127.0.0.2 node-2.site.example\n\n::1 node-6  # v6\n")
    assert load_node_map(str(path)) == {"127.0.0.2": "node-2", "::1": "node-6"}
    path.write_text("127.0.0.2 node-2\nnode-3\n")
    with pytest.raises(OptionError, match=r"line 2: expected 'ADDRESS NODE', got 'node-3'"):
        load_node_map(str(path))
    with pytest.raises(OptionError, match="cannot read"):
        load_node_map(str(tmp_path / "missing"))
    with pytest.raises(OptionError, match="not an address or a network"):
        parse_networks("127.0.0.1, proxy.example")


def test_forwarded_for_is_read_from_trusted_proxies_only():
    resolver = NodeResolver({}, False, parse_networks("127.0.0.5, 10.0.0.0/8"))
    assert resolver.client_address("127.0.0.9", "127.0.0.2") == "127.0.0.9"
    assert resolver.client_address("127.0.0.5", "127.0.0.2") == "127.0.0.2"
    # two trusted hops: the first untrusted address from the right
    assert resolver.client_address("127.0.0.5", "127.0.0.7, 127.0.0.2, 10.1.1.1") == "127.0.0.2"
    assert resolver.client_address("127.0.0.5", "garbage") is None
    assert resolver.client_address("127.0.0.5", None) == "127.0.0.5"


async def test_map_then_reverse_dns():
    resolver = NodeResolver({"127.0.0.2": "node-2"}, False, ())
    assert await resolver.node_of("127.0.0.2") == "node-2"
    assert await resolver.node_of("127.0.0.3") is None
    assert await resolver.node_of(None) is None
    hosts = Path("/etc/hosts").read_text() if Path("/etc/hosts").exists() else ""
    if not any(line.split()[:2] == ["127.0.0.1", "localhost"] for line in hosts.splitlines()
               if line.strip()):
        pytest.skip("/etc/hosts does not map 127.0.0.1 to localhost: reverse DNS would "
                    "query a name server")
    resolver = NodeResolver({}, True, ())
    assert await resolver.node_of("127.0.0.1") == "localhost"
