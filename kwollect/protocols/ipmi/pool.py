"""The ``ipmi-sensors`` processes: one for the polls of many BMCs that share credentials.

See the package docstring for why (benchmarks/ipmi_cost.py) and what a poll leaves behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from kwollect.errors import KwollectError, TargetTimeout
from kwollect.protocols.ipmi.output import Row, parse_row
from kwollect.protocols.ipmi.sdr_cache import SdrCache
from kwollect.protocols.ipmi.url import Target
from kwollect.protocols.sharing import SharedRegistry

BATCH_WINDOW_S = 0.02
"""How long a poll waits for polls of other BMCs with the same credentials to share a process."""
MAX_HOSTS_PER_PROCESS = 64
"""FreeIPMI's default fanout: more hosts in one process would wait for a free thread."""

_TIMEOUT_WORDS = ("connection timeout", "session timeout")


class IpmiError(KwollectError, RuntimeError):
    """A BMC could not be read (bad credentials, refused command, ipmi-sensors failure)."""


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
        self._pending: dict[tuple[int, ...], dict[Target, list[asyncio.Future[HostResult]]]] = {}
        self._deadline = 0.0
        self._flush_handle: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.sdr_cache = SdrCache()
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

    def argv(self, addresses: Sequence[str], ids: tuple[int, ...] | None,
             remaining: float) -> list[str]:
        session_ms = max(100, int(remaining * 800))
        argv = [_ipmi_sensors(), "--config-file=/dev/stdin", "-h", ",".join(addresses),
                "--always-prefix", "--driver-type=LAN_2_0",
                f"--session-timeout={session_ms}",
                f"--retransmission-timeout={min(1000, max(50, session_ms // 3))}",
                f"--sdr-cache-directory={self.sdr_cache.directory()}", "--sdr-cache-recreate",
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
            assert proc.stdin is not None  # stdin=PIPE
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
                host.fail(TargetTimeout(
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
            return TargetTimeout(message)
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
        self.sdr_cache.remove()


async def _pump(stream: asyncio.StreamReader | None, handle: Callable[[str], None]) -> None:
    if stream is None:
        return
    async for raw in stream:
        line = raw.decode("utf-8", "replace").rstrip("\r\n")
        if line:
            handle(line)


_pools: SharedRegistry[PoolKey, _Pool] = SharedRegistry()


def pool_key(target: Target, timeout: float) -> PoolKey:
    """BMCs with equal keys share a pool: the same credentials, options and timeout."""
    return (target.user, target.password, target.options, timeout)


def acquire_pool(target: Target, timeout: float) -> _Pool:
    return _pools.acquire(pool_key(target, timeout), lambda: _Pool(target, timeout))


async def release_pool(target: Target, timeout: float) -> None:
    last = _pools.release(pool_key(target, timeout))
    if last is not None:
        await last.close()
