"""A Redfish-shaped JSON API (aiohttp): a BMC's Power and Thermal documents behind auth.

`redfish_app` builds the application around a `RedfishServer` state (the tests serve it
in-process, over http and https); ``python -m kwollect.dev.simulators.redfish`` serves it over
http on a port the kernel picks and prints ``PORT <n>``, and `start_redfish` runs that
subprocess for the demo.

Every path needs basic auth (REDFISH_USER/REDFISH_PASSWORD) or the bearer REDFISH_TOKEN.
Besides the documents, /redfish/v1/slow never answers in time, /redfish/v1/broken answers
500 and /redfish/v1/invalid answers truncated JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import copy
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

from aiohttp import web

from kwollect.dev.simulators import read_port, stop_process

REDFISH_USER, REDFISH_PASSWORD = "admin", "calvin:p@ss"
REDFISH_TOKEN = "redfish-token-42"
POWER_PATH = "/redfish/v1/Chassis/1/Power"
THERMAL_PATH = "/redfish/v1/Chassis/1/Thermal"

POWER = {
    "@odata.id": POWER_PATH,
    "PowerControl": [{"Name": "System Power Control", "PowerConsumedWatts": 312,
                      "PowerMetrics": {"AverageConsumedWatts": 305.5}}],
    "PowerSupplies": [
        {"Name": "PSU1", "PowerOutputWatts": 150, "Status": {"Health": "OK"}},
        {"Name": "PSU2", "PowerOutputWatts": 162, "Status": {"Health": "Warning"}},
    ],
}
THERMAL = {
    "@odata.id": THERMAL_PATH,
    "Temperatures": [
        {"Name": "CPU1 Temp", "ReadingCelsius": 45},
        {"Name": "Inlet Temp", "ReadingCelsius": 22.5},
        {"Name": "Absent Temp", "ReadingCelsius": None},
    ],
}


@dataclass
class RedfishServer:
    http: str
    """host:port, plain http"""
    https: str
    """host:port, https (empty when served over http only)"""
    bearer_file: Path
    documents: dict[str, object]
    """JSON served per path; tests may change it."""
    hits: collections.Counter = field(default_factory=collections.Counter)
    """Authorized requests received per path (with the query string)."""


def default_documents() -> dict[str, object]:
    return {POWER_PATH: copy.deepcopy(POWER), THERMAL_PATH: copy.deepcopy(THERMAL)}


def _authorized(request: web.Request) -> bool:
    basic = base64.b64encode(f"{REDFISH_USER}:{REDFISH_PASSWORD}".encode()).decode()
    return request.headers.get("Authorization") in (f"Basic {basic}", f"Bearer {REDFISH_TOKEN}")


def redfish_app(state: RedfishServer) -> web.Application:
    async def handler(request: web.Request) -> web.StreamResponse:
        if not _authorized(request):
            return web.json_response({"error": "unauthorized"}, status=401)
        state.hits[request.path_qs] += 1
        if request.path == "/redfish/v1/slow":
            await asyncio.sleep(30)
        if request.path == "/redfish/v1/broken":
            return web.json_response({"error": "internal"}, status=500)
        if request.path == "/redfish/v1/invalid":
            return web.Response(text='{"PowerControl": [', content_type="application/json")
        if request.path not in state.documents:
            return web.json_response({"error": "not found"}, status=404)
        return web.json_response(state.documents[request.path])

    app = web.Application()
    app.router.add_get("/{tail:.*}", handler)
    return app


@dataclass
class RedfishProcess:
    """The simulator running in a subprocess (`start_redfish`)."""

    host: str
    port: int
    process: subprocess.Popen

    def url(self, path: str, jsonpath: str) -> str:
        """A ``json+http://`` URL reading `jsonpath` of the document at `path`."""
        return (f"json+http://{REDFISH_USER}:{quote(REDFISH_PASSWORD, safe='')}"
                f"@{self.host}:{self.port}{path}#{jsonpath}")

    def stop(self) -> None:
        stop_process(self.process)


def start_redfish(workdir: Path) -> RedfishProcess:
    """Serve the default documents over http on loopback in a subprocess."""
    workdir.mkdir(parents=True, exist_ok=True)
    with (workdir / "redfish.log").open("ab") as log:
        process = subprocess.Popen([sys.executable, "-m", __name__], stdout=subprocess.PIPE,
                                   stderr=log, text=True)
    port = read_port(process)
    if port is None:
        stop_process(process)
        raise RuntimeError(f"Redfish simulator did not start, see {workdir / 'redfish.log'}")
    return RedfishProcess("127.0.0.1", port, process)


async def _serve() -> None:
    state = RedfishServer("", "", Path(), default_documents())
    runner = web.AppRunner(redfish_app(state), access_log=None, handle_signals=False)
    await runner.setup()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    await web.SockSite(runner, sock).start()
    print("PORT", sock.getsockname()[1], flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()


if __name__ == "__main__":
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    asyncio.run(_serve())
