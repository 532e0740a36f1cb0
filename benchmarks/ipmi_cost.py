"""What one BMC poll costs the collector host, per way of reading IPMI sensors.

Starts N OpenIPMI ipmi_sim BMCs on 127.0.0.1 (free random ports, the sensors of
tests/fixtures/ipmi.py plus --extra-sensors more, so the SDR has a realistic size), then polls
every BMC for --wanted sensors, --rounds times, with each approach:

* ``kwollect, batched``: kwollect.protocols.ipmi as shipped: one ``ipmi-sensors -h a,b,...``
  process for the BMCs that share credentials (up to 64 hosts per process);
* ``kwollect, 1 process/BMC``: the same code with MAX_HOSTS_PER_PROCESS = 1, i.e. one
  ``ipmi-sensors`` process per BMC and poll;
* ``pyghmi``: the pure-Python client pyghmi (if importable: ``pip install pyghmi``, or
  ``pip install --target DIR pyghmi`` and PYTHONPATH=DIR), one session per BMC kept open,
  ``get_sensor_reading`` per wanted sensor, 16 threads.

CPU is this process's user+system time plus that of its reaped children (the ipmi-sensors
processes; the ipmi_sim BMCs are reaped only at the end, so their CPU is not counted), per BMC
poll.  Wall is the time of one round (all BMCs).  The first round of each approach (session
set-up, full listing, SDR cache creation) is reported apart.

Run from the repository root:  .venv/bin/python benchmarks/ipmi_cost.py [--bmcs 50]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import resource
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kwollect.model import MetricDescription  # noqa: E402
from kwollect.protocols import ipmi  # noqa: E402
from tests.fixtures.ipmi import ADMIN, SENSORS, IpmiSim, extra_sensors  # noqa: E402

WANTED = ("CPU Temp", "Pwr Consumption", "Fan1", "Vcore", "Inlet Temp")


def cpu_seconds() -> float:
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


class Result:
    def __init__(self, name: str, bmcs: int) -> None:
        self.name, self.bmcs = name, bmcs
        self.first_cpu = self.first_wall = self.cpu = self.wall = 0.0
        self.rounds = 0

    def line(self) -> str:
        per_poll = self.cpu / (self.rounds * self.bmcs) * 1000
        return (f"{self.name:26s} {per_poll:8.2f} ms {self.wall / self.rounds * 1000:9.1f} ms"
                f"   {self.first_cpu / self.bmcs * 1000:8.2f} ms {self.first_wall * 1000:9.1f} ms")


def measure(result: Result, one_round: Callable[[], None], rounds: int) -> Result:
    cpu0, wall0 = cpu_seconds(), time.perf_counter()
    one_round()
    result.first_cpu, result.first_wall = cpu_seconds() - cpu0, time.perf_counter() - wall0
    cpu0, wall0 = cpu_seconds(), time.perf_counter()
    for _ in range(rounds):
        one_round()
    result.cpu, result.wall = cpu_seconds() - cpu0, time.perf_counter() - wall0
    result.rounds = rounds
    return result


def bench_kwollect(sims: list[IpmiSim], wanted: tuple[str, ...], rounds: int, name: str,
                   max_hosts: int) -> Result:
    ipmi.pool.MAX_HOSTS_PER_PROCESS = max_hosts
    loop = asyncio.new_event_loop()
    descs = [[MetricDescription(name=s, device_id=f"bmc{i}", url=sim.url(s)) for s in wanted]
             for i, sim in enumerate(sims)]
    collectors = [ipmi.open_collector(ipmi.target_key(d[0]), 10.0) for d in descs]

    async def poll_all() -> None:
        polls = (c.collect(d) for c, d in zip(collectors, descs, strict=True))
        results = await asyncio.gather(*polls)
        missing = sum(len(d) - len(r) for d, r in zip(descs, results, strict=True))
        if missing:
            raise RuntimeError(f"{name}: {missing} readings missing")

    try:
        return measure(Result(name, len(sims)), lambda: loop.run_until_complete(poll_all()),
                       rounds)
    finally:
        async def close_all() -> None:
            await asyncio.gather(*(c.close() for c in collectors))

        loop.run_until_complete(close_all())
        loop.close()


def bench_pyghmi(sims: list[IpmiSim], wanted: tuple[str, ...], rounds: int) -> Result | None:
    try:
        from pyghmi.ipmi import command
    except ImportError:
        print("pyghmi: not importable, skipped (pip install pyghmi)")
        return None
    pool = ThreadPoolExecutor(16)
    sessions: list = []

    def connect() -> None:
        if not sessions:
            sessions.extend(pool.map(lambda sim: command.Command(
                bmc=sim.host, userid=ADMIN[0], password=ADMIN[1], port=sim.port), sims))

    def read(session) -> int:
        return sum(session.get_sensor_reading(s).value is not None for s in wanted)

    def one_round() -> None:
        connect()
        got = sum(pool.map(read, sessions))
        if got != len(sims) * len(wanted):
            raise RuntimeError(f"pyghmi: {len(sims) * len(wanted) - got} readings missing")

    try:
        return measure(Result("pyghmi, 16 threads", len(sims)), one_round, rounds)
    finally:
        pool.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bmcs", type=int, default=50)
    parser.add_argument("--extra-sensors", type=int, default=40,
                        help="sensors added to the fixture's 8 (default 40)")
    parser.add_argument("--wanted", type=int, default=3, choices=range(1, len(WANTED) + 1),
                        help="sensors read per BMC and poll")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    logging.getLogger(ipmi.__name__).setLevel(logging.ERROR)  # the fixture has a duplicate name
    wanted = WANTED[:args.wanted]
    sensors = SENSORS + extra_sensors(args.extra_sensors)
    with tempfile.TemporaryDirectory(prefix="ipmi-bench-") as tmp:
        sims = [IpmiSim(Path(tmp) / f"bmc{i}", sensors=sensors) for i in range(args.bmcs)]
        try:
            for sim in sims:
                sim.start()
            print(f"{args.bmcs} ipmi_sim BMCs on 127.0.0.1, {len(sensors)} sensors each, "
                  f"{len(wanted)} read per poll, {args.rounds} rounds (+1 first round)")
            results = [
                bench_kwollect(sims, wanted, args.rounds, "kwollect, batched", 64),
                bench_kwollect(sims, wanted, args.rounds, "kwollect, 1 process/BMC", 1),
                bench_pyghmi(sims, wanted, args.rounds),
            ]
        finally:
            for sim in sims:
                sim.stop()
    print(f"{'approach':26s} {'CPU/poll':>11s} {'wall/round':>12s}   "
          f"{'first round: CPU/BMC':>20s} {'wall':>9s}")
    for result in results:
        if result is not None:
            print(result.line())


if __name__ == "__main__":
    main()
