"""Soak: live SNMP targets beside a hostile Prometheus exporter (not run by the test suite).

tests/test_isolation.py asserts the promise in 10 s; this runs it longer and prints the
figures of docs/reliability.md, side by side with a baseline run without the hostile
exporter, in the same process and on the same machine:

- live ticks polled / expected (every target, every whole second of the window);
- the worst gap between two readings of one live target, and the p99 and maximum of how
  late a reading came after its tick;
- missed ticks, overruns, timeouts of the live targets; scrapes of the hostile exporter
  read and refused;
- peak RSS of the process.

Usage: .venv/bin/python benchmarks/soak_isolation.py [seconds per run] [live targets]
(a real snmpd from Debian's snmpd package and the hostile exporter of
kwollect.dev.simulators.hostile, both on 127.0.0.1).
"""

from __future__ import annotations

import asyncio
import math
import resource
import sys
import tempfile
from pathlib import Path

from kwollect.collect.kwollector import tune_gc
from kwollect.dev.isolation import run_beside
from kwollect.dev.simulators.hostile import HostileExporter
from kwollect.dev.simulators.snmp import BULK, start_snmpd, stop_snmpd
from kwollect.model import MetricDescription

HOSTILE = {"100k lines every 10 s": ("lines/100000", 10_000),
           "1M lines every 1 s": ("lines/1000000", 1000),
           "50 MB without newline every 1 s": ("noline/50", 1000)}


async def run(agent_url: str, targets: int, seconds: float,
              hostile: HostileExporter | None) -> dict[str, object]:
    descriptions = [MetricDescription(name="live", device_id=f"live-{i}", update_every_ms=1000,
                                      url=f"{agent_url}?max_varbinds={30 + i}")
                    for i in range(targets)]
    if hostile is not None:
        descriptions += [MetricDescription(name="flood", device_id=f"hostile-{n}",
                                           url=hostile.url(path), update_every_ms=period)
                         for n, (path, period) in enumerate(HOSTILE.values())]
    result = await run_beside(descriptions, seconds, timeout_s=10.0)
    live = result.target_stats("snmp")
    prom = result.target_stats("prometheus")
    return {"polled": sum(result.polled(f"live-{i}") for i in range(targets)),
            "expected": result.expected * targets,
            "worst gap s": max(result.gaps, default=math.nan),
            "lateness p99 ms": result.lateness_quantile(0.99) * 1000,
            "lateness max ms": result.lateness_quantile(1.0) * 1000,
            "missed+overruns+timeouts": sum(s.missed_ticks + s.overruns + s.timeouts
                                            for s in live),
            "hostile readings": sum(result.flood.values()),
            "hostile polls ok/errors/timeouts": (f"{sum(s.polls for s in prom)}/"
                                                 f"{sum(s.errors for s in prom)}/"
                                                 f"{sum(s.timeouts for s in prom)}")}


def main() -> None:
    tune_gc()  # as the kwollector does
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 60.0
    targets = int(sys.argv[2]) if len(sys.argv) > 2 else 20
    with tempfile.TemporaryDirectory() as tmp:
        process, agent = start_snmpd(Path(tmp))
        hostile = HostileExporter()
        try:
            url = agent.url(sorted(BULK)[0])
            base = asyncio.run(run(url, targets, seconds, None))
            rss_base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            loaded = asyncio.run(run(url, targets, seconds, hostile))
            rss_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        finally:
            hostile.stop()
            stop_snmpd(process)
    print(f"{targets} SNMP targets at 1 s, {seconds:g} s per run; hostile: "
          + "; ".join(HOSTILE))
    print(f"{'':32s} {'baseline':>14s} {'with hostile':>14s}")
    for key in base:
        print(f"{key:32s} {_fmt(base[key]):>14s} {_fmt(loaded[key]):>14s}")
    print(f"{'peak RSS MiB':32s} {rss_base:14.0f} {rss_loaded:14.0f}")


def _fmt(value: object) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


if __name__ == "__main__":
    main()
