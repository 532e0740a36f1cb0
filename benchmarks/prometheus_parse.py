"""CPU cost of reading a real node_exporter scrape (not run by the test suite).

Starts Debian's prometheus-node-exporter on a free loopback port, takes one scrape, then
times, in CPU time per scrape:
- prometheus_client's whole-text parser (what the reference improvement note suggests);
- `parse_exposition` (strict pattern for ordinary lines, prometheus_client for the rest);
- every line through prometheus_client one by one (the cost if no line were ordinary);
- parsing plus building the readings for one description keeping every metric;
- a whole `collect()` over loopback HTTP (client side only; node_exporter runs elsewhere).

Usage: .venv/bin/python benchmarks/prometheus_parse.py [scrapes]
"""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from kwollect.model import MetricDescription
from kwollect.protocols import prometheus


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _cpu_ms(func, repeat: int) -> float:
    func()
    start = time.process_time()
    for _ in range(repeat):
        func()
    return (time.process_time() - start) / repeat * 1000


def _library_whole(text: str) -> None:
    for family in text_string_to_metric_families(text):
        list(family.samples)


def _library_lines(text: str) -> None:
    for line in text.splitlines():
        line = line.strip()
        if line and line[0] != "#":
            prometheus.library_parse_line(line)


async def _collect_ms(address: str, repeat: int) -> tuple[float, int]:
    desc = MetricDescription(name="prom", device_id="node-1", url=f"prometheus://{address}/")
    collector = prometheus.open_collector(prometheus.target_key(desc), 10.0)
    try:
        readings = await collector.collect([desc])
        start = time.process_time()
        for _ in range(repeat):
            await collector.collect([desc])
        return (time.process_time() - start) / repeat * 1000, len(readings)
    finally:
        await collector.close()


def main() -> None:
    repeat = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    with tempfile.TemporaryDirectory() as textfile_dir:
        address = f"127.0.0.1:{_free_port()}"
        proc = subprocess.Popen(
            ["/usr/bin/prometheus-node-exporter", f"--web.listen-address={address}",
             f"--collector.textfile.directory={textfile_dir}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            for _ in range(100):
                try:
                    with urllib.request.urlopen(f"http://{address}/metrics", timeout=1) as resp:
                        text = resp.read().decode()
                    break
                except OSError:
                    time.sleep(0.05)
            else:
                sys.exit("node_exporter did not start")
            lines = len(text.splitlines())
            samples = len(prometheus.parse_exposition(text).samples)
            print(f"node_exporter scrape: {len(text)} bytes, {lines} lines, {samples} samples; "
                  f"CPU ms per scrape, mean of {repeat}:")
            desc = MetricDescription(name="prom", device_id="node-1",
                                     url=f"prometheus://{address}/")
            collector = prometheus.PrometheusCollector(prometheus.target_key(desc), 1.0)
            figures = {
                "prometheus_client whole text": lambda: _library_whole(text),
                "parse_exposition": lambda: prometheus.parse_exposition(text),
                "prometheus_client line by line": lambda: _library_lines(text),
                "parse + readings (all metrics)": lambda: collector._readings(
                    desc, prometheus.parse_exposition(text).samples, 0),
            }
            for label, func in figures.items():
                print(f"  {label:34s} {_cpu_ms(func, repeat):7.2f} ms")
            collect_ms, count = asyncio.run(_collect_ms(address, repeat))
            print(f"  {'collect() over loopback HTTP':34s} {collect_ms:7.2f} ms "
                  f"({count} readings, {collect_ms / count * 1000:.1f} us per reading)")
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(5)


if __name__ == "__main__":
    main()
