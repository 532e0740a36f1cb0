"""Client CPU per collected Modbus value: decoding alone, and whole rounds against a real server.

Run from the repository root: ``.venv/bin/python benchmarks/modbus.py``.  The server is the
test peer (tests/fixtures/modbus.py) in its own process, so its CPU is not counted here.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kwollect.model import MetricDescription  # noqa: E402
from kwollect.protocols import modbus  # noqa: E402
from tests.fixtures.modbus import SPAN_AREA, start_modbus_server  # noqa: E402


def bench_decode() -> None:
    registers = list(range(1000, 1008))
    for type_, order in (("uint16", "ABCD"), ("int16", "ABCD"), ("int16", "BADC"),
                         ("float32", "ABCD"), ("float32", "CDAB"), ("float64", "DCBA")):
        point = modbus._parse(f"modbus://h/1/0?type={type_}&order={order}")[1]
        decode = point.decode
        n = 500_000
        start = time.perf_counter()
        for _ in range(n):
            decode(registers, 2)
        per = (time.perf_counter() - start) / n * 1e9
        print(f"decode {type_:8} {order}: {per:6.0f} ns/value")


async def bench_rounds(server_url: str, port: int, rounds: int) -> None:
    def url(address: int, **options: str) -> str:
        query = "&".join(f"{k}={v}" for k, v in options.items())
        return f"{server_url}:{port}/1/{address}" + (f"?{query}" if query else "")

    cases = {
        "250 uint16, 2 requests": [url(a) for a in SPAN_AREA[:250]],
        "100 float32 CDAB, 2 requests": [url(a, type="float32", order="CDAB")
                                         for a in SPAN_AREA[:200:2]],
        "20 uint16 spread, 20 requests": [url(a, max_gap="0") for a in SPAN_AREA[::15]],
    }
    collector = modbus.open_collector(("127.0.0.1", port), 2.0)
    try:
        for name, urls in cases.items():
            metrics = [MetricDescription(f"m{i}", "meter", u) for i, u in enumerate(urls)]
            await collector.collect(metrics)  # connect, plan
            cpu, wall = time.process_time(), time.perf_counter()
            for _ in range(rounds):
                readings = await collector.collect(metrics)
            cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
            assert len(readings) == len(metrics)
            print(f"round {name:30}: {wall / rounds * 1e3:6.2f} ms wall, "
                  f"{cpu / rounds * 1e6:7.0f} us CPU/round, "
                  f"{cpu / rounds / len(metrics) * 1e6:5.1f} us CPU/value")
    finally:
        await collector.close()


def main() -> None:
    bench_decode()
    with tempfile.TemporaryDirectory() as workdir:
        server = start_modbus_server(Path(workdir))
        try:
            asyncio.run(bench_rounds("modbus://127.0.0.1", server.port, 300))
        finally:
            server.stop()


if __name__ == "__main__":
    main()
