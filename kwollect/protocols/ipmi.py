"""IPMI sensors of BMCs, read with FreeIPMI's ``ipmi-sensors`` over RMCP+ (IPMI 2.0).

URL: ``ipmisensor://<user>:<password>@<host>[:<port>]/<sensor>[?<option>=<value>&...]``

* ``<sensor>`` is a FreeIPMI Record ID (the ``ID`` column of ``ipmi-sensors``) when it is all
  digits, else a sensor name (the ``Name`` column, percent-decoded, compared exactly).  A look-up
  by id is exact.  When several sensors share a name, the first one in SDR order (lowest record
  id) is read and a warning naming all their ids is logged once: use the id to pick another.
* ``<port>`` defaults to 623.  User and password are percent-decoded; either may be empty.
* Options, for BMCs that need them, are passed to ``ipmi-sensors``: ``workaround-flags``
  (e.g. ``opensesspriv``, which OpenIPMI's ipmi_sim needs), ``cipher-suite-id`` and
  ``privilege-level``.  They are part of the target key.  The system-wide
  /etc/freeipmi/freeipmi.conf is not read (our own config replaces it).

Readings: a numeric reading is stored through `make_reading` (so ``scale_factor`` applies).
A reading of ``N/A`` is skipped.  A discrete sensor (no reading, no unit, but an event state)
is stored as its event bitmask (bit n = state offset n of the IPMI sensor type, e.g. 1 =
"Presence detected" for a power supply); the event text is not stored because FreeIPMI prints
either the bitmask or the text, not both, and the bitmask is lossless and can be graphed.
No unit label is added: it would be wrong after a ``scale_factor`` and would grow every row.
FreeIPMI prints readings with two decimals, which is what is stored.  Each reading is stamped
with the midpoint between starting ``ipmi-sensors`` and receiving that BMC's last line.

How a BMC is read, and why: measured with benchmarks/ipmi_cost.py (50 ipmi_sim BMCs on
loopback, 3 sensors read per BMC and poll, 2 cores; client CPU per BMC poll, the BMCs' own CPU
not counted; wall = one round over the 50 BMCs):

=========================================================  ================  ================
approach                                                   8-sensor SDR      48-sensor SDR
=========================================================  ================  ================
one ``ipmi-sensors`` process per BMC                       6.2 ms,  242 ms   7.1 ms,  268 ms
one ``ipmi-sensors -h bmc1,...`` for all 50 (chosen)       1.9 ms,  104 ms   2.1 ms,  112 ms
pyghmi 1.6.19: sessions kept open, 16 threads              3.8 ms, 1490 ms   3.1 ms, 1287 ms
=========================================================  ================  ================

pyghmi saves the session set-up but reads sensor by sensor in Python threads: it costs more
CPU than the shared process, is over ten times slower per round, and a thread stuck in it cannot be
killed.  So every poll goes through ``ipmi-sensors``, and the polls of BMCs that share
credentials, options, timeout and wanted record ids, and arrive within `BATCH_WINDOW_S` of each
other, share one process (up to `MAX_HOSTS_PER_PROCESS` hosts, which FreeIPMI reads in
parallel threads).  Each BMC's readings are handed back as soon as its lines are in, so a dead
BMC delays no other.

What a poll costs and leaves behind:

* Only the wanted record ids are read (``-r``).  Names are resolved, and ids checked, from one
  full listing of the BMC, made on the first poll and again after a failure, after the SDR
  changed under us, or every `RELIST_INTERVAL_S` while some wanted sensor is unknown.
* The SDR cache is kept in a private directory (mode 0700) between polls;
  ``--sdr-cache-recreate`` lets FreeIPMI rebuild it only when the BMC reports a newer SDR or
  the file is invalid, and a failed poll deletes that BMC's cache file so the next one
  rebuilds it.  The directory is removed when the last collector using it is closed.
* Credentials are written to the child's stdin, read as its config file
  (``--config-file=/dev/stdin``): never in argv, the environment, a file or a log.
* Hard timeout: FreeIPMI's own session timeout is set below the collector timeout, and at the
  deadline (or when every waiting poll is cancelled) the process group of ``ipmi-sensors``
  is killed with SIGKILL and reaped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import re
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple
from urllib.parse import parse_qsl, unquote, urlsplit

from kwollect.logutil import RateLimitedLog
from kwollect.model import MetricDescription, Reading, make_reading, midpoint_us
from kwollect.protocols import redact_url

SCHEMES = ("ipmisensor",)

DEFAULT_PORT = 623
BATCH_WINDOW_S = 0.02
"""How long a poll waits for polls of other BMCs with the same credentials to share a process."""
MAX_HOSTS_PER_PROCESS = 64
"""FreeIPMI's default fanout: more hosts in one process would wait for a free thread."""
RELIST_INTERVAL_S = 600.0
MAX_USER_BYTES = 16
MAX_PASSWORD_BYTES = 20

_OPTIONS = {
    "workaround-flags": re.compile(r"[A-Za-z0-9]+(,[A-Za-z0-9]+)*"),
    "cipher-suite-id": re.compile(r"[0-9]{1,2}"),
    "privilege-level": re.compile(r"(?i:user|operator|admin)"),
}
_HOST = re.compile(r"[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_TIMEOUT_WORDS = ("connection timeout", "session timeout")
# FreeIPMI names a BMC's cache file after the short local host name and the BMC's -h string.
_LOCAL_NAME = socket.gethostname().split(".", 1)[0] or "localhost"

logger = logging.getLogger(__name__)
_once = RateLimitedLog(logger, interval=math.inf)
_limited = RateLimitedLog(logger)


class IpmiError(RuntimeError):
    """A BMC could not be read (bad credentials, refused command, ipmi-sensors failure)."""


@dataclass(frozen=True, slots=True)
class Target:
    """One BMC and how to log in; the password stays out of repr() and str()."""

    host: str
    port: int
    user: str
    password: str = field(repr=False)
    options: tuple[tuple[str, str], ...] = ()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def __str__(self) -> str:
        return f"{self.user}@{self.address}" if self.user else self.address


SensorRef = int | str
"""A record id (exact) or a sensor name."""


def parse_url(url: str) -> tuple[Target, SensorRef]:
    """Split an ``ipmisensor://`` URL into its target and sensor; ValueError says what is wrong."""
    try:
        parts = urlsplit(url)
        parts.hostname  # noqa: B018 - urlsplit checks bracketed hosts only when asked
    except ValueError as exc:
        raise ValueError(f"malformed ipmisensor URL ({exc})") from None
    shown = _redact(url, parts.password)
    if parts.scheme.lower() not in SCHEMES:
        raise ValueError(f"{shown}: scheme must be ipmisensor")
    host = parts.hostname or ""
    if not _HOST.fullmatch(host):
        raise ValueError(f"{shown}: missing or unsupported host {host!r} "
                         "(a DNS name or IPv4 address)")
    try:
        port = parts.port or DEFAULT_PORT
    except ValueError as exc:
        raise ValueError(f"{shown}: bad port ({exc})") from None
    user = unquote(parts.username or "")
    password = unquote(parts.password or "")
    _check_credential(shown, "user", user, MAX_USER_BYTES)
    _check_credential(shown, "password", password, MAX_PASSWORD_BYTES)
    sensor = unquote(parts.path[1:] if parts.path.startswith("/") else parts.path)
    if not sensor:
        raise ValueError(f"{shown}: no sensor id or name in the path")
    ref: SensorRef = int(sensor) if sensor.isdigit() else sensor
    options = []
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        pattern = _OPTIONS.get(name)
        if pattern is None:
            raise ValueError(f"{shown}: unknown option {name!r} (known: {', '.join(_OPTIONS)})")
        if not pattern.fullmatch(value):
            raise ValueError(f"{shown}: bad value {value!r} for option {name!r}")
        options.append((name, value))
    if len({name for name, _ in options}) != len(options):
        raise ValueError(f"{shown}: an option is given twice")
    return Target(host.lower(), port, user, password, tuple(sorted(options))), ref


def _check_credential(shown: str, what: str, value: str, limit: int) -> None:
    if _CONTROL.search(value):
        raise ValueError(f"{shown}: the {what} contains a control character")
    if len(value.encode()) > limit:
        raise ValueError(f"{shown}: the {what} is longer than IPMI's {limit} bytes")


def _redact(url: str, password: str | None) -> str:
    try:
        return redact_url(url)
    except ValueError:  # a bad port: redact_url cannot rebuild the URL
        return url.replace(password, "***") if password else url


def target_key(desc: MetricDescription) -> Target:
    return parse_url(desc.url)[0]


def open_collector(key: Target, timeout: float) -> IpmiCollector:
    return IpmiCollector(key, timeout)


class Row(NamedTuple):
    """One line of ``ipmi-sensors --comma-separated-output --output-event-bitmask``."""

    record_id: int
    name: str
    reading: str
    units: str
    event: str

    def value(self) -> float | int | None:
        """The number to store: the reading, a discrete sensor's event bitmask, or None (N/A)."""
        if self.reading != "N/A":
            try:
                return float(self.reading)
            except ValueError:
                return None
        if self.units == "N/A" and self.event.endswith("h"):
            try:
                return int(self.event[:-1], 16)
            except ValueError:
                return None
        return None


def parse_row(text: str) -> Row | None:
    """Parse a CSV sensor line; None for anything else (such as FreeIPMI's messages).

    Names may contain commas, the other columns (type, reading, units, event) cannot, so the
    line is split once from the left and four times from the right.
    """
    rid, sep, rest = text.partition(",")
    if not sep or not rid.isdigit():
        return None
    parts = rest.rsplit(",", 4)
    if len(parts) != 5:
        return None
    name, _type, reading, units, event = parts
    return Row(int(rid), name, reading, units, event)


class HostResult(NamedTuple):
    rows: list[Row]
    start_ns: int
    end_ns: int


def _conf_quote(value: str) -> str:
    """Quote a value for FreeIPMI's config-file syntax (``#`` starts a comment even in quotes)."""
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("#", "\\#")
    return f'"{escaped}"'


_executable: str | None = None


def _ipmi_sensors() -> str:
    global _executable
    if _executable is None:
        search = os.pathsep.join((os.environ.get("PATH", ""), "/usr/sbin", "/sbin"))
        _executable = shutil.which("ipmi-sensors", path=search)
        if _executable is None:
            raise IpmiError("ipmi-sensors not found "
                            "(install FreeIPMI: Debian package freeipmi-tools)")
    return _executable


@dataclass
class _Host:
    """One BMC's part of a running batch."""

    target: Target
    futures: list[asyncio.Future[HostResult]]
    rows: list[Row] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return all(f.done() for f in self.futures)

    def resolve(self, start_ns: int, end_ns: int) -> None:
        result = HostResult(self.rows, start_ns, end_ns)
        for fut in self.futures:
            if not fut.done():
                fut.set_result(result)

    def fail(self, exc: BaseException) -> None:
        for fut in self.futures:
            if not fut.done():
                fut.set_exception(exc)


PoolKey = tuple[str, str, tuple[tuple[str, str], ...], float]


class _Pool:
    """Runs ``ipmi-sensors`` for all BMCs that share credentials, options and timeout."""

    def __init__(self, target: Target, timeout: float) -> None:
        self._user = target.user
        self._password = target.password
        self._options = target.options
        self._timeout = timeout
        self.users = 0
        self._pending: dict[tuple[int, ...], dict[Target, list[asyncio.Future[HostResult]]]] = {}
        self._deadline = 0.0
        self._flush_handle: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._cache_dir: str | None = None
        lines = [f"{name} {_conf_quote(value)}" for name, value in
                 (("username", self._user), ("password", self._password)) if value]
        self._config = ("\n".join(lines) + "\n").encode()

    def read(self, target: Target, ids: tuple[int, ...] | None) -> asyncio.Future[HostResult]:
        """Queue a read of `ids` (None: every sensor, in a process of its own) on `target`."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[HostResult] = loop.create_future()
        if ids is None:
            self._start({target: [fut]}, None, loop.time() + self._timeout)
            return fut
        if not self._pending:
            self._deadline = loop.time() + self._timeout
            self._flush_handle = loop.call_later(BATCH_WINDOW_S, self._flush)
        self._pending.setdefault(ids, {}).setdefault(target, []).append(fut)
        return fut

    def _flush(self) -> None:
        self._flush_handle = None
        pending, self._pending = self._pending, {}
        for ids, by_target in pending.items():
            targets = list(by_target.items())
            for i in range(0, len(targets), MAX_HOSTS_PER_PROCESS):
                self._start(dict(targets[i:i + MAX_HOSTS_PER_PROCESS]), ids, self._deadline)

    def _start(self, batch: dict[Target, list[asyncio.Future[HostResult]]],
               ids: tuple[int, ...] | None, deadline: float) -> None:
        hosts = {t.address: _Host(t, futs) for t, futs in batch.items()}
        task = asyncio.get_running_loop().create_task(self._run(hosts, ids, deadline))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        futures = [f for h in hosts.values() for f in h.futures]

        def cancel_if_unwanted(_: asyncio.Future[HostResult]) -> None:
            if all(f.cancelled() for f in futures):
                task.cancel()

        for fut in futures:
            fut.add_done_callback(cancel_if_unwanted)

    def cache_dir(self) -> str:
        if self._cache_dir is None:
            self._cache_dir = tempfile.mkdtemp(prefix="kwollect-ipmi-")
        return self._cache_dir

    def cache_file(self, target: Target) -> str:
        """Where FreeIPMI keeps `target`'s SDR cache inside our cache directory."""
        return os.path.join(self.cache_dir(), ".freeipmi", "sdr-cache",
                            f"sdr-cache-{_LOCAL_NAME}.{target.address}")

    def forget_sdr(self, target: Target) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.cache_file(target))

    def argv(self, addresses: Sequence[str], ids: tuple[int, ...] | None,
             remaining: float) -> list[str]:
        session_ms = max(100, int(remaining * 800))
        argv = [_ipmi_sensors(), "--config-file=/dev/stdin", "-h", ",".join(addresses),
                "--always-prefix", "--driver-type=LAN_2_0",
                f"--session-timeout={session_ms}",
                f"--retransmission-timeout={min(1000, max(50, session_ms // 3))}",
                f"--sdr-cache-directory={self.cache_dir()}", "--sdr-cache-recreate",
                "--quiet-cache", "--comma-separated-output", "--no-header-output",
                "--output-event-bitmask"]
        argv += [f"--{name}={value}" for name, value in self._options]
        if ids is not None:
            argv += ["-r", ",".join(map(str, ids))]
        return argv

    async def _run(self, hosts: dict[str, _Host], ids: tuple[int, ...] | None,
                   deadline: float) -> None:
        loop = asyncio.get_running_loop()
        expected = None if ids is None else len(ids)
        general: list[str] = []
        start_ns = time.time_ns()
        proc = None
        try:
            proc = await asyncio.create_subprocess_exec(
                *self.argv(list(hosts), ids, deadline - loop.time()),
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE, start_new_session=True,
                env={**os.environ, "LC_ALL": "C"})
            try:
                proc.stdin.write(self._config)
                await proc.stdin.drain()
                proc.stdin.close()
            except (BrokenPipeError, ConnectionResetError):
                pass  # it died before reading its config: its stderr says why

            def on_stdout(line: str) -> None:
                host, text = self._route(hosts, line, general)
                if host is None or host.done:
                    return
                row = parse_row(text)
                if row is None:
                    host.fail(self._error(host.target, text))
                    return
                host.rows.append(row)
                if expected is not None and len(host.rows) >= expected:
                    host.resolve(start_ns, time.time_ns())

            def on_stderr(line: str) -> None:
                host, text = self._route(hosts, line, general)
                if host is not None and not host.done:
                    host.fail(self._error(host.target, text))

            async with asyncio.timeout(deadline - loop.time()):
                await asyncio.gather(_pump(proc.stdout, on_stdout), _pump(proc.stderr, on_stderr))
                returncode = await proc.wait()
            end_ns = time.time_ns()
            for host in hosts.values():
                if host.done:
                    continue
                if returncode == 0:
                    host.resolve(start_ns, end_ns)
                else:
                    detail = "; ".join(general) or "no message"
                    host.fail(IpmiError(self._scrub(
                        f"IPMI BMC {host.target}: ipmi-sensors exited with status {returncode}: "
                        f"{detail}")))
        except TimeoutError:
            for host in hosts.values():
                host.fail(TimeoutError(
                    f"IPMI BMC {host.target}: no complete answer within {self._timeout:g} s"))
        except IpmiError as exc:
            for host in hosts.values():
                host.fail(exc)
        except OSError as exc:
            for host in hosts.values():
                host.fail(IpmiError(f"IPMI BMC {host.target}: cannot run ipmi-sensors: {exc}"))
        finally:
            if proc is not None and proc.returncode is None:
                # ProcessLookupError: it exited and the child watcher reaped it a moment ago
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                await proc.wait()
            for host in hosts.values():
                if not host.done:
                    host.fail(IpmiError(f"IPMI BMC {host.target}: poll abandoned"))

    @staticmethod
    def _route(hosts: dict[str, _Host], line: str, general: list[str]) -> tuple[_Host | None, str]:
        prefix, sep, text = line.partition(": ")
        host = hosts.get(prefix) if sep else None
        if host is None:
            general.append(line)
        return host, text

    def _error(self, target: Target, text: str) -> Exception:
        message = self._scrub(f"IPMI BMC {target}: {text.removeprefix('ipmi-sensors: ')}")
        if any(word in text for word in _TIMEOUT_WORDS):
            return TimeoutError(message)
        return IpmiError(message)

    def _scrub(self, text: str) -> str:
        return text.replace(self._password, "***") if self._password else text

    async def close(self) -> None:
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        for by_target in self._pending.values():
            for futures in by_target.values():
                for fut in futures:
                    fut.cancel()
        self._pending.clear()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._cache_dir is not None:
            shutil.rmtree(self._cache_dir, ignore_errors=True)
            self._cache_dir = None


async def _pump(stream: asyncio.StreamReader | None, handle) -> None:
    if stream is None:
        return
    async for raw in stream:
        line = raw.decode("utf-8", "replace").rstrip("\r\n")
        if line:
            handle(line)


_pools: dict[PoolKey, _Pool] = {}


def _acquire_pool(target: Target, timeout: float) -> _Pool:
    key = (target.user, target.password, target.options, timeout)
    pool = _pools.get(key)
    if pool is None:
        pool = _pools[key] = _Pool(target, timeout)
    pool.users += 1
    return pool


async def _release_pool(pool: _Pool) -> None:
    pool.users -= 1
    if pool.users == 0:
        for key, known in list(_pools.items()):
            if known is pool:
                del _pools[key]
        await pool.close()


class IpmiCollector:
    """Reads the sensors wanted from one BMC; see the module docstring for how."""

    def __init__(self, target: Target, timeout: float) -> None:
        self.target = target
        self.timeout = timeout
        self._pool = _acquire_pool(target, timeout)
        self._closed = False
        self._lock = asyncio.Lock()
        self._refs: dict[str, SensorRef] = {}
        self._names: dict[int, str] | None = None
        """Record id -> name from the last full listing; None when a listing is due."""
        self._by_name: dict[str, int] = {}
        self._listed_at = 0.0
        self._has_unknown = False

    @property
    def cache_file(self) -> str:
        """The BMC's SDR cache file (it exists once a poll succeeded)."""
        return self._pool.cache_file(self.target)

    def _ref(self, desc: MetricDescription) -> SensorRef:
        ref = self._refs.get(desc.url)
        if ref is None:
            target, ref = parse_url(desc.url)
            if target != self.target:
                raise ValueError(f"{desc.source or desc.name}: URL is for {target}, "
                                 f"not for this collector's BMC {self.target}")
            self._refs[desc.url] = ref
        return ref

    def _resolve(self, ref: SensorRef) -> int | None:
        assert self._names is not None
        if isinstance(ref, int):
            return ref if ref in self._names else None
        return self._by_name.get(ref)

    def _learn(self, rows: list[Row]) -> None:
        self._names = {row.record_id: row.name for row in rows}
        by_name: dict[str, list[int]] = {}
        for row in rows:
            by_name.setdefault(row.name, []).append(row.record_id)
        self._by_name = {name: min(ids) for name, ids in by_name.items()}
        for name, ids in by_name.items():
            if len(ids) > 1:
                _once.warning((self.target, "dup", name),
                              "IPMI BMC %s: %d sensors are named %r (record ids %s); reading "
                              "record id %d for that name, use an id to read another",
                              self.target, len(ids), name, ", ".join(map(str, sorted(ids))),
                              min(ids))
        self._listed_at = time.monotonic()

    def _listing_due(self) -> bool:
        return self._names is None or (
            self._has_unknown and time.monotonic() - self._listed_at > RELIST_INTERVAL_S)

    async def collect(self, metrics: Sequence[MetricDescription]) -> list[Reading]:
        if self._closed:
            raise IpmiError(f"IPMI BMC {self.target}: collector is closed")
        refs = [self._ref(desc) for desc in metrics]
        async with self._lock:
            ids: tuple[int, ...] | None = None
            if not self._listing_due():
                ids = tuple(sorted({i for i in map(self._resolve, refs) if i is not None}))
            try:
                if ids == ():
                    result = HostResult([], 0, 0)
                else:
                    result = await self._pool.read(self.target, ids)
            except BaseException:
                self._names = None
                self._pool.forget_sdr(self.target)
                raise
            if ids is None:
                self._learn(result.rows)
            return self._readings(metrics, refs, result)

    def _readings(self, metrics: Sequence[MetricDescription], refs: list[SensorRef],
                  result: HostResult) -> list[Reading]:
        rows = {row.record_id: row for row in result.rows}
        timestamp = midpoint_us(result.start_ns, result.end_ns)
        readings = []
        self._has_unknown = stale = False
        for desc, ref in zip(metrics, refs, strict=True):
            record_id = self._resolve(ref)
            if record_id is None:
                self._has_unknown = True
                kind = "id" if isinstance(ref, int) else "name"
                _once.warning((self.target, "unknown", ref),
                              "IPMI BMC %s: no sensor with %s %r (metric %s, %s)", self.target,
                              kind, ref, desc.name, desc.source or desc.device_id)
                continue
            row = rows.get(record_id)
            if row is None or (isinstance(ref, str) and row.name != ref):
                stale = True
                _limited.warning((self.target, "changed"),
                                 "IPMI BMC %s: sensor %r is no longer record id %d; "
                                 "listing the sensors again at the next poll",
                                 self.target, ref, record_id)
                continue
            value = row.value()
            if value is not None:
                readings.append(make_reading(desc, timestamp, value))
        if stale:
            self._names = None
        return readings

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            await _release_pool(self._pool)
