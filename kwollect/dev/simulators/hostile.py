"""A hostile Prometheus exporter on loopback, for the isolation tests and the soak benchmark.

Run as ``python -m kwollect.dev.simulators.hostile`` (it prints its port, then serves until
SIGTERM).  It runs in its own process so that serving tens of megabytes costs the
collector under test nothing but the reading.  Paths:

- ``/lines/<n>``: an exposition of ``n`` distinct series (``hostile_series{i="..."}``),
  built once per ``n`` and kept;
- ``/noline/<megabytes>``: that many megabytes of digits without a newline, streamed;
- ``/slow/<seconds>``: a one-line exposition answered after that delay;
- ``/duplicates/<n>``: ``n`` series, each line written twice.
"""

from __future__ import annotations

import functools
import signal
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from kwollect.dev.simulators import stop_process

_CHUNK = b"7" * (1 << 20)


@functools.cache
def exposition(lines: int, repeat: int = 1) -> bytes:
    rows = [f'hostile_series{{i="{i}",kind="flood"}} {i % 1000}.5\n' for i in range(lines)]
    return "".join(row * repeat for row in rows).encode()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002  # quiet
        pass

    def _send(self, body: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802  # the name http.server calls
        kind, _, arg = self.path.strip("/").partition("/")
        try:
            number = float(arg)
        except ValueError:
            self.send_error(404)
            return
        try:
            if kind == "lines":
                self._send(exposition(int(number)))
            elif kind == "duplicates":
                self._send(exposition(int(number), repeat=2))
            elif kind == "slow":
                threading.Event().wait(number)
                self._send(b"hostile_slow 1\n")
            elif kind == "noline":
                size = int(number * len(_CHUNK))
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(size))
                self.end_headers()
                while size > 0:
                    self.wfile.write(_CHUNK[:size])
                    size -= len(_CHUNK)
            else:
                self.send_error(404)
        except (BrokenPipeError, ConnectionResetError):  # the collector gave up: expected
            pass


def main() -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    print(server.server_address[1], flush=True)
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    server.serve_forever()


class HostileExporter:
    """The exporter in a subprocess; `url(path)` gives a prometheus:// URL to it."""

    def __init__(self) -> None:
        self.process = subprocess.Popen([sys.executable, "-m", __name__],
                                        stdout=subprocess.PIPE, text=True)
        assert self.process.stdout is not None
        port = self.process.stdout.readline().strip()
        if not port.isdigit():
            stop_process(self.process)
            raise RuntimeError("the hostile exporter did not start")
        self.port = int(port)

    def url(self, path: str, query: str = "") -> str:
        extra = f"&{query}" if query else ""
        return f"prometheus://127.0.0.1:{self.port}/?path=/{path}{extra}"

    def stop(self) -> None:
        stop_process(self.process)


if __name__ == "__main__":
    main()
