"""CPU cost per value of SNMP polling: kwollect's lean codec and collector versus puresnmp.

Starts a private snmpd on loopback (the test configuration) and prints CPU microseconds per
value (this process only, user + system) for:

1. encode + decode of a 50-OID GET, from a real snmpd response (no I/O);
2. the same plus turning values into Readings (`make_reading`);
3. full GET round trips by one `SnmpCollector`, one poll after the other;
4. 200 collectors polled at once (as the scheduler does at a tick), 50 OIDs each;
5. puresnmp's `Client.multiget` and `PyWrapper.multiget` of the same 50 OIDs.

Usage: .venv/bin/python benchmarks/snmp_codec_cost.py [--polls N] [--targets N]
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from puresnmp import V2C, Client, ObjectIdentifier, PyWrapper  # noqa: E402

from kwollect.model import MetricDescription, make_reading  # noqa: E402
from kwollect.protocols import snmp  # noqa: E402
from kwollect.protocols.snmp import codec as snmp_codec  # noqa: E402
from tests.fixtures.snmp import BULK, start_snmpd, stop_snmpd  # noqa: E402

OIDS = sorted(BULK, key=lambda oid: int(oid.split(".")[-2]))[:50]
_AGENT_QUEUE = 20


def cpu_us() -> float:
    return time.process_time() * 1e6


def codec_cost(port: int, rounds: int) -> tuple[float, float]:
    """(encode+decode, encode+decode+make_reading) CPU µs per value."""
    tlvs = [snmp_codec.encode_oid(snmp_codec.parse_oid(oid)) for oid in OIDS]
    template = snmp_codec.get_request(1, b"public", tlvs)
    prefix = snmp_codec.message_prefix(1, b"public")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(2)
        sock.connect(("127.0.0.1", port))
        sock.send(template.packet(snmp_codec.REQUEST_ID_MIN))
        data = sock.recv(65535)
    metrics = [MetricDescription(f"m{n}", "pdu", "snmp://x@y/1.3", labels={"k": n})
               for n in range(len(OIDS))]
    start = cpu_us()
    for n in range(rounds):
        template.packet(snmp_codec.REQUEST_ID_MIN + n)
        header = snmp_codec.parse_response_header(data, prefix)
        snmp_codec.decode_get_values(data, header, tlvs)
    codec = (cpu_us() - start) / (rounds * len(OIDS))
    start = cpu_us()
    for n in range(rounds):
        template.packet(snmp_codec.REQUEST_ID_MIN + n)
        header = snmp_codec.parse_response_header(data, prefix)
        values = snmp_codec.decode_get_values(data, header, tlvs)
        [make_reading(m, 0, v) for m, v in zip(metrics, values, strict=True)]
    full = (cpu_us() - start) / (rounds * len(OIDS))
    return codec, full


def metrics_for(port: int, device: str) -> list[MetricDescription]:
    return [MetricDescription(f"m{n}", device, f"snmp://public@127.0.0.1:{port}/{oid}")
            for n, oid in enumerate(OIDS)]


async def sequential_cost(port: int, polls: int) -> tuple[float, float]:
    """(CPU µs per value, wall ms per poll) of one collector polling back to back."""
    metrics = metrics_for(port, "pdu")
    collector = snmp.open_collector(snmp.target_key(metrics[0]), 2.0)
    try:
        assert len(await collector.collect(metrics)) == len(OIDS)
        start, wall = cpu_us(), time.perf_counter()
        values = 0
        for _ in range(polls):
            values += len(await collector.collect(metrics))
        return (cpu_us() - start) / values, (time.perf_counter() - wall) * 1e3 / polls
    finally:
        await collector.close()


async def concurrent_cost(port: int, targets: int, ticks: int) -> tuple[float, float]:
    """(CPU µs per value, values per wall second) of `targets` collectors polled together.

    All targets are the one snmpd here, so at most `_AGENT_QUEUE` GETs are in flight: more
    overflow its UDP receive buffer (200 distinct agents would each get one GET).
    """
    groups = [metrics_for(port, f"pdu-{n}") for n in range(targets)]
    collectors = [snmp.open_collector(snmp.target_key(g[0]), 5.0) for g in groups]
    queue = asyncio.Semaphore(_AGENT_QUEUE)

    async def poll(collector: snmp.SnmpCollector, metrics: list[MetricDescription]) -> int:
        async with queue:
            return len(await collector.collect(metrics))

    try:
        await asyncio.gather(*(poll(c, g) for c, g in zip(collectors, groups, strict=True)))
        start, wall = cpu_us(), time.perf_counter()
        values = 0
        for _ in range(ticks):
            values += sum(await asyncio.gather(*(poll(c, g) for c, g in
                                                 zip(collectors, groups, strict=True))))
        elapsed = time.perf_counter() - wall
        return (cpu_us() - start) / values, values / elapsed
    finally:
        for collector in collectors:
            await collector.close()


async def puresnmp_cost(port: int, polls: int) -> tuple[float, float]:
    """(Client.multiget, PyWrapper.multiget) CPU µs per value, back to back."""
    warnings.simplefilter("ignore")
    client = Client("127.0.0.1", V2C("public"), port=port)
    client.configure(timeout=2, retries=1)
    wrapper = PyWrapper(client)
    oids = [ObjectIdentifier(oid) for oid in OIDS]
    results = []
    for call, args in ((client.multiget, oids), (wrapper.multiget, OIDS)):
        await call(args)
        start = cpu_us()
        for _ in range(polls):
            await call(args)
        results.append((cpu_us() - start) / (polls * len(OIDS)))
    return results[0], results[1]


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--polls", type=int, default=2000)
    parser.add_argument("--targets", type=int, default=200)
    parser.add_argument("--ticks", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as base:
        process, agent = start_snmpd(Path(base))
        try:
            codec, codec_readings = codec_cost(agent.port, args.polls * 5)
            seq, seq_wall = await sequential_cost(agent.port, args.polls)
            conc, rate = await concurrent_cost(agent.port, args.targets, args.ticks)
            raw, wrapped = await puresnmp_cost(agent.port, args.polls // 4)
        finally:
            stop_snmpd(process)
    print(f"CPU µs per value, {len(OIDS)} OIDs per GET, snmpd on loopback "
          f"(Python {sys.version.split()[0]})")
    print(f"  kwollect codec, encode + decode (no I/O)          {codec:8.2f}")
    print(f"  kwollect codec + make_reading (no I/O)            {codec_readings:8.2f}")
    print(f"  kwollect collector, sequential round trips        {seq:8.2f}"
          f"   ({seq_wall:.2f} ms wall per GET)")
    print(f"  kwollect collector, {args.targets} targets at once          {conc:8.2f}"
          f"   ({rate:,.0f} values/s, agent-bound)")
    print(f"  puresnmp Client.multiget, sequential              {raw:8.2f}")
    print(f"  puresnmp PyWrapper.multiget, sequential           {wrapped:8.2f}")
    print(f"  => {args.targets} PDUs x {len(OIDS)} OIDs x 1 Hz costs "
          f"{conc * args.targets * len(OIDS) / 1e6:.3f} CPU-s per second in this process")


if __name__ == "__main__":
    asyncio.run(main())
