"""The simulated peers listen on loopback only (the demo runs them on an operator's machine)."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

from kwollect.dev.simulators.snmp import start_snmpd, stop_snmpd

LISTEN_TCP = "0A"


def _address(hex_address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    raw = bytes.fromhex(hex_address)
    if len(raw) == 4:
        return ipaddress.IPv4Address(raw[::-1])
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
    return ipaddress.IPv6Address(words)


def bound_addresses(pid: int) -> list[tuple[str, str, int]]:
    """(protocol, address, port) of every socket the process has bound (TCP: listening)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        target = os.readlink(fd)
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = []
    for proto in ("tcp", "tcp6", "udp", "udp6"):
        for line in Path(f"/proc/net/{proto}").read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if inode in inodes and (proto.startswith("udp") or state == LISTEN_TCP):
                address, port = local.split(":")
                found.append((proto, str(_address(address)), int(port, 16)))
    return found


def test_demo_snmpd_binds_loopback_only(tmp_path):
    """Once snmpd also listened on 0.0.0.0:199/tcp (SMUX) during the demo."""
    process, agent = start_snmpd(tmp_path / "snmpd")
    try:
        bound = bound_addresses(process.pid)
    finally:
        stop_snmpd(process)
    assert ("udp", "127.0.0.1", agent.port) in bound
    assert all(ipaddress.ip_address(address).is_loopback for _, address, _ in bound), bound
    # when another snmpd holds port 199 the bind fails, and snmpd says so in its log
    assert "smux" not in agent.log_file.read_text().lower()
