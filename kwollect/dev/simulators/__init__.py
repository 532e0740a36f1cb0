"""Simulated devices on loopback: the peers the tests and `kwollect demo` collect from.

One module per kind of device (snmp, prometheus, ipmi, modbus, redfish, wattmetre).  Each
starts a real server (Debian's snmpd, prometheus-node-exporter, OpenIPMI's ipmi_sim, a
pymodbus or aiohttp server) on 127.0.0.1 with a port the kernel picked, waits until it
answers, and stops it by pid.  Only loopback addresses are ever used.

Two peers make faults rather than devices: `hostile` (an exporter serving far too much) and
`tcp_proxy` (a link that hangs without closing); see docs/reliability.md.
"""

from __future__ import annotations

import select
import signal
import socket
import subprocess


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    """A port free right now on 127.0.0.1 (TCP by default; callers retry if it is taken)."""
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def free_udp_port() -> int:
    return free_port(socket.SOCK_DGRAM)


def stop_process(process: subprocess.Popen, timeout: float = 5) -> None:
    """SIGTERM, then SIGKILL if it has not exited within `timeout` seconds."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    if process.stdout is not None:
        process.stdout.close()


def read_port(process: subprocess.Popen, timeout: float = 30) -> int | None:
    """The port a server child announced with a ``PORT <n>`` line on its stdout, or None
    when it printed something else or nothing in time."""
    assert process.stdout is not None
    ready, _, _ = select.select([process.stdout], [], [], timeout)
    line = process.stdout.readline() if ready else ""
    if isinstance(line, bytes):
        line = line.decode(errors="replace")
    if not line.startswith("PORT ") or not line.split()[1].isdigit():
        return None
    return int(line.split()[1])
