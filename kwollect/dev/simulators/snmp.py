"""A real Debian snmpd on loopback serving a simulated Eaton ePDU, for the tests and the demo.

`start_snmpd` runs snmpd on 127.0.0.1 with a free UDP port and a private config.  It serves:

- snmpd's own MIB-II (system group, IF-MIB ifTable: ``lo`` is ifIndex 1);
- fixed values (``override``) under 1.3.6.1.4.1.99999.1 (`FIXED`) and .2 (`BULK`);
- a pass_persist helper serving a 24-outlet Eaton ePDU outletPowerTable
  (1.3.6.1.4.1.534.6.6.7.6.5.1, columns 2 VA, 3 W, 4 Wh, index 0.<outlet>; the power of
  outlet n moves around 100 + 10 n W), a few values snmpd's ``override`` cannot make
  (Counter64, IpAddress, long string), and a table whose rows are set at run time
  (`SnmpAgent.set_rows`), for template re-resolution;
- community ``public`` (everything) and v3 users (`V3_USERS`).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from kwollect.dev.simulators import free_udp_port, stop_process

PDU_TABLE = "1.3.6.1.4.1.534.6.6.7.6.5.1"
OUTLETS = 24
ROWS_TABLE = "1.3.6.1.4.1.99999.3.10.1"
"""Columns: 1 name (string), 2 value (INTEGER), 3 id (INTEGER); index from `set_rows`."""

FIXED = {
    "1.3.6.1.4.1.99999.1.1.0": ("integer", "42"),
    "1.3.6.1.4.1.99999.1.2.0": ("octet_str", "hello"),
    "1.3.6.1.4.1.99999.1.3.0": ("integer", "-123456"),
    "1.3.6.1.4.1.99999.1.4.0": ("octet_str", "12.5"),
    "1.3.6.1.4.1.99999.1.5.0": ("counter", "4294967295"),
    "1.3.6.1.4.1.99999.1.6.0": ("unsigned", "3000000000"),
    "1.3.6.1.4.1.99999.1.7.0": ("timeticks", "12345"),
    "1.3.6.1.4.1.99999.1.8.0": ("object_id", ".1.3.6.1.4.1.99999.200.1"),
}
BULK = {f"1.3.6.1.4.1.99999.2.{n}.0": (("integer", "unsigned", "counter")[n % 3],
                                       str(n * 1_000_003 % 2**31))
        for n in range(1, 101)}
"""Numbers snmpd serves itself (fast), for load tests and benchmarks."""
COUNTER64_OID = "1.3.6.1.4.1.99999.3.1.0"
COUNTER64_VALUE = 2**64 - 1
IPADDRESS_OID = "1.3.6.1.4.1.99999.3.2.0"
LONG_STRING_OID = "1.3.6.1.4.1.99999.3.3.0"
LONG_STRING = "kwollect-" * 40
MIN_INT_OID = "1.3.6.1.4.1.99999.3.5.0"

V3_USERS = {
    # user: (auth method, auth key, priv method, priv key), "" when not used
    "kwsha": ("SHA", "sha-auth-key", "AES", "sha-priv-key"),
    "kwmd5": ("MD5", "md5-auth-key", "DES", "md5-priv-key"),
    "kwauth": ("SHA", "auth-only-key", "", ""),
    "kwnone": ("", "", "", ""),
}

_PASS_PERSIST = r'''
"""pass_persist helper: Eaton ePDU outlet table, special values, and a table set by tests."""
import json
import math
import sys
import time

ROWS_FILE = {rows_file!r}
PDU = (1, 3, 6, 1, 4, 1, 534, 6, 6, 7, 6, 5, 1)
OWN = (1, 3, 6, 1, 4, 1, 99999, 3)
T0 = time.time()


def outlet(col, n):
    t = time.time()
    watts = 100 + 10 * n + int(20 * math.sin(t / 10 + n))
    if col == 2:
        return "integer", str(watts + 5)
    if col == 3:
        return "integer", str(watts)
    return "gauge", str(int(1000 * n + (t - T0) * watts / 3600))


def table():
    entries = {{}}
    for col in (2, 3, 4):
        for n in range(1, {outlets} + 1):
            entries[PDU + (col, 0, n)] = (outlet, col, n)
    entries[OWN + (1, 0)] = ("counter64", {counter64!r})
    entries[OWN + (2, 0)] = ("ipaddress", "10.1.2.3")
    entries[OWN + (3, 0)] = ("string", {long_string!r})
    entries[OWN + (5, 0)] = ("integer", "-2147483648")
    with open(ROWS_FILE) as f:
        rows = json.load(f)
    for index, (name, value, ident) in rows.items():
        idx = tuple(int(a) for a in index.split("."))
        entries[OWN + (10, 1, 1) + idx] = ("string", name)
        entries[OWN + (10, 1, 2) + idx] = ("integer", str(value))
        entries[OWN + (10, 1, 3) + idx] = ("integer", str(ident))
    return entries


def reply(oid, entry):
    kind, value = entry[0](entry[1], entry[2]) if callable(entry[0]) else entry
    sys.stdout.write("." + ".".join(map(str, oid)) + "\n" + kind + "\n" + value + "\n")


def parse(text):
    return tuple(int(a) for a in text.strip().strip(".").split(".") if a)


for line in sys.stdin:
    command = line.strip().lower()
    if command == "ping":
        sys.stdout.write("PONG\n")
    elif command in ("get", "getnext"):
        oid = parse(sys.stdin.readline())
        entries = table()
        if command == "get":
            found = oid if oid in entries else None
        else:
            found = min((o for o in entries if o > oid), default=None)
        if found is None:
            sys.stdout.write("NONE\n")
        else:
            reply(found, entries[found])
    elif command == "set":
        sys.stdin.readline()
        sys.stdin.readline()
        sys.stdout.write("not-writable\n")
    elif not command:
        break
    sys.stdout.flush()
'''


@dataclass
class SnmpAgent:
    host: str
    port: int
    rows_file: Path
    log_file: Path

    def url(self, oid: str, scheme: str = "snmp", credentials: str = "public",
            query: str = "") -> str:
        return f"{scheme}://{credentials}@{self.host}:{self.port}/{oid}" + \
            (f"?{query}" if query else "")

    def v3_url(self, user: str, oid: str, query: str = "") -> str:
        auth, auth_key, priv, priv_key = V3_USERS[user]
        keys = "".join(f":{key}" for key in (auth_key, priv_key) if key)
        params = [f"auth={auth}"] if auth else []
        params += [f"priv={priv}"] if priv else []
        params += [query] if query else []
        return f"snmpv3://{user}{keys}@{self.host}:{self.port}/{oid}" + \
            (f"?{'&'.join(params)}" if params else "")

    def set_rows(self, rows: dict[str, tuple[str, int, int]]) -> None:
        """Replace the run-time table: index -> (name, value, id); atomic for the helper."""
        tmp = self.rows_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(rows))
        os.replace(tmp, self.rows_file)


def _snmpd_config(helper: Path) -> str:
    lines = ["rocommunity public 127.0.0.1", "sysName test-pdu", "sysLocation loopback",
             "dontLogTCPWrappersConnects yes", f"pass_persist .1.3.6.1.4.1.99999.3 {helper}",
             f"pass_persist .{PDU_TABLE.rsplit('.', 1)[0]} {helper}"]
    lines += [f"override .{oid} {kind} {value}" for oid, (kind, value) in {**FIXED, **BULK}.items()]
    for user, (auth, auth_key, priv, priv_key) in V3_USERS.items():
        parts = [user] + ([auth, auth_key] if auth else []) + ([priv, priv_key] if priv else [])
        level = "priv" if priv else "auth" if auth else "noauth"
        lines += ["createUser " + " ".join(parts), f"rouser {user} {level}"]
    return "\n".join(lines) + "\n"


def _wait_ready(process: subprocess.Popen, port: int, deadline: float) -> bool:
    probe = ["snmpget", "-v2c", "-c", "public", "-On", "-t", "0.3", "-r", "0",
             f"127.0.0.1:{port}", ".1.3.6.1.2.1.1.5.0", f".{PDU_TABLE}.3.0.1"]
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        result = subprocess.run(probe, capture_output=True, text=True)
        if result.returncode == 0 and "test-pdu" in result.stdout:
            return True
        time.sleep(0.1)
    return False


def stop_snmpd(process: subprocess.Popen) -> None:
    stop_process(process)


def start_snmpd(base: Path) -> tuple[subprocess.Popen, SnmpAgent]:
    """Run snmpd with its config under `base` on a free loopback port (`stop_snmpd`)."""
    base.mkdir(parents=True, exist_ok=True)
    snmpd = shutil.which("snmpd") or "/usr/sbin/snmpd"
    if not os.access(snmpd, os.X_OK) or shutil.which("snmpget") is None:
        raise RuntimeError("snmpd and snmpget are needed: install Debian's snmpd and snmp "
                           "(scripts/bootstrap.sh)")
    rows_file = base / "rows.json"
    helper = base / "pass_persist.py"
    helper.write_text(f"#!{sys.executable} -u\n" + _PASS_PERSIST.format(
        rows_file=str(rows_file), outlets=OUTLETS, counter64=str(COUNTER64_VALUE),
        long_string=LONG_STRING))
    helper.chmod(0o755)
    config = base / "snmpd.conf"
    config.write_text(_snmpd_config(helper))
    (base / "persist").mkdir(exist_ok=True)
    env = {**os.environ, "SNMP_PERSISTENT_DIR": str(base / "persist"), "MIBS": ""}
    for _ in range(5):
        port = free_udp_port()
        agent = SnmpAgent("127.0.0.1", port, rows_file, base / f"snmpd-{port}.log")
        agent.set_rows({})
        with agent.log_file.open("w") as log:
            process = subprocess.Popen(
                # -I -smux: no SMUX listener (snmpd's default binds 0.0.0.0:199/tcp)
                [snmpd, "-f", "-Lo", "-C", "-I", "-smux", "-m", "", "-c", str(config), "-p",
                 str(base / "snmpd.pid"), f"udp:127.0.0.1:{port}"],
                stdout=log, stderr=subprocess.STDOUT, env=env)
        if _wait_ready(process, port, time.monotonic() + 15):
            return process, agent
        stop_snmpd(process)
    raise RuntimeError(f"snmpd did not start; see {agent.log_file}")

