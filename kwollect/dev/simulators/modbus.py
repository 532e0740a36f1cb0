"""A real pymodbus TCP server on loopback holding known values, for the tests and the demo.

Run as ``python -m kwollect.dev.simulators.modbus``, this module is the server (pymodbus
SimDevice API, 3.16); `start_modbus_server` runs it in a subprocess.  The server binds port
0 and prints the port it got, so no port is ever guessed; it logs every request it receives
(unit, function, address, count, requests in flight) and every connection to a file, which
is how tests count requests.

Units: 1 holds the typed values below; 2 and 5 hold `SMALL_*`; 3 holds the same but answers
every read with exception 4 (device failure); 4 holds the same but never answers (its
responses are dropped on the way out); 6 holds the same but answers exception 11 (gateway
target failed to respond), as a gateway does for a dead device.  Other units answer
exception 4.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from kwollect.dev.simulators import read_port, stop_process

# (address, type, order, registers on the wire, value they encode).  The registers are
# written out by hand, not computed, so the decoder is checked against independent data.
HOLDING_1: list[tuple[int, str, str, list[int], float]] = [
    (0, "int16", "ABCD", [0xFB2E], -1234),
    (1, "uint16", "ABCD", [0xD431], 54321),
    (2, "int16", "BADC", [0xFEFF], -2),
    (3, "int32", "ABCD", [0xF8A4, 0x32EB], -123456789),
    (5, "uint32", "CDAB", [0x5E00, 0xB2D0], 3000000000),
    (7, "float32", "ABCD", [0x4366, 0x8000], 230.5),
    (9, "float32", "CDAB", [0x8000, 0x4366], 230.5),
    (11, "float32", "BADC", [0x6643, 0x0080], 230.5),
    (13, "float32", "DCBA", [0x0080, 0x6643], 230.5),
    (15, "float64", "ABCD", [0xC0C8, 0x1CD6, 0xE631, 0xF8A1], -12345.6789),
    (19, "float64", "DCBA", [0xA1F8, 0x31E6, 0xD61C, 0xC8C0], -12345.6789),
    (23, "float64", "CDAB", [0x2D18, 0x5444, 0x21FB, 0x4009], 3.141592653589793),
    (27, "uint64", "ABCD", [0x0123, 0x4567, 0x89AB, 0xCDEF], 0x0123456789ABCDEF),
    (31, "int64", "BADC", [0xFFFF, 0xFFFF, 0xFFFF, 0xFEFF], -2),
    (35, "int32", "DCBA", [0xFEFF, 0xFFFF], -2),
    (37, "uint32", "BADC", [0xD0B2, 0x005E], 3000000000),
]
HOLDING_1_END = 39
"""Registers 39..49 of unit 1 do not exist (a hole: reads over them get exception 2)."""
HOLDING_1_AFTER_HOLE = (50, 4242)
SPAN_AREA = range(100, 400)
"""Unit 1 holding registers here hold 20000 + address."""
INPUT_1: list[tuple[int, str, str, list[int], float]] = [
    (0, "uint16", "ABCD", [42], 42),
    (1, "float32", "CDAB", [0x0000, 0xBFC0], -1.5),
    (3, "int32", "BADC", [0xFEFF, 0x90EE], -70000),
    (5, "int16", "ABCD", [0x8000], -32768),
]
COILS_1 = 2100
"""Unit 1 coil i is on when i % 3 == 0."""
DISCRETE_1 = 16
"""Unit 1 discrete input i is on when i is odd."""
SMALL_HOLDING = [0xFFFE, 0xBFA0, 0x0000, 2]
"""Units 2..5: holding 0 = int16 -2, 1..2 = float32 -1.25, 3 = uint16 2."""
SMALL_INPUT = [7]
SMALL_COILS = [True] * 4 + [False] * 12
EXCEPTION_UNIT = 3
SILENT_UNIT = 4
UNREACHABLE_UNIT = 6


@dataclass(frozen=True)
class Request:
    unit: int
    function: int
    address: int
    count: int
    in_flight: int
    """Requests the server was handling when this one arrived, itself included."""


@dataclass
class ModbusServer:
    host: str
    port: int
    process: subprocess.Popen[str]
    log_path: Path

    def url(self, unit: int, address: int, **options: Any) -> str:
        query = f"?{urlencode(options)}" if options else ""
        return f"modbus://{self.host}:{self.port}/{unit}/{address}{query}"

    @property
    def key(self) -> tuple[str, int]:
        return (self.host, self.port)

    def _lines(self) -> list[str]:
        return self.log_path.read_text().splitlines()

    def mark(self) -> int:
        """A position in the log; pass it to `requests` or `connections` to see what follows."""
        return len(self._lines())

    def requests(self, since: int = 0) -> list[Request]:
        return [Request(*map(int, line.split()[1:])) for line in self._lines()[since:]
                if line.startswith("R ")]

    def connections(self, since: int = 0) -> int:
        """Connections opened since `since`."""
        return sum(1 for line in self._lines()[since:] if line == "C 1")

    def stop(self) -> None:
        stop_process(self.process, timeout=10)


def start_modbus_server(workdir: Path, port: int = 0) -> ModbusServer:
    """Start the server in a subprocess (port 0: a free port chosen by the kernel)."""
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / f"requests-{port}.log"
    stderr = (workdir / f"server-{port}.err").open("a")
    process = subprocess.Popen(
        [sys.executable, "-m", __name__, "--port", str(port), "--log", str(log_path)],
        stdout=subprocess.PIPE, stderr=stderr, text=True)
    stderr.close()
    bound = read_port(process)
    if bound is None:
        stop_process(process)
        errors = (workdir / f"server-{port}.err").read_text()
        raise RuntimeError(f"modbus simulator did not start: {errors}")
    return ModbusServer("127.0.0.1", bound, process, log_path)


def _devices() -> list[Any]:
    from pymodbus.constants import ExcCodes
    from pymodbus.simulator import DataType, SimData, SimDevice

    def registers(address: int, values: list[int]) -> SimData:
        return SimData(address, values=values, datatype=DataType.REGISTERS)

    def bits(values: list[bool]) -> SimData:
        return SimData(0, values=values, datatype=DataType.BITS)

    async def device_failure(*_args: Any) -> ExcCodes:
        return ExcCodes.DEVICE_FAILURE

    async def gateway_no_response(*_args: Any) -> ExcCodes:
        return ExcCodes.GATEWAY_NO_RESPONSE

    actions = {EXCEPTION_UNIT: device_failure, UNREACHABLE_UNIT: gateway_no_response}

    holding = [registers(0, [r for *_, regs, _v in HOLDING_1 for r in regs]),
               registers(HOLDING_1_AFTER_HOLE[0], [HOLDING_1_AFTER_HOLE[1]]),
               registers(SPAN_AREA.start, [20000 + a for a in SPAN_AREA])]
    assert sum(len(regs) for *_, regs, _v in HOLDING_1) == HOLDING_1_END
    unit1 = SimDevice(id=1, simdata=(
        [bits([i % 3 == 0 for i in range(COILS_1)])],
        [bits([i % 2 == 1 for i in range(DISCRETE_1)])],
        holding,
        [registers(0, [r for *_, regs, _v in INPUT_1 for r in regs])],
    ))

    def small(unit: int) -> SimDevice:
        return SimDevice(id=unit, simdata=(
            [bits(list(SMALL_COILS))], [bits([False] * 16)],
            [registers(0, list(SMALL_HOLDING))], [registers(0, list(SMALL_INPUT))],
        ), action=actions.get(unit))

    return [unit1] + [small(unit) for unit in (2, 3, 4, 5, 6)]


async def _serve(port: int, log_path: Path) -> None:
    from pymodbus.server import ModbusTcpServer

    log = log_path.open("a", buffering=1)
    in_flight = 0

    def trace_pdu(sending: bool, pdu: Any) -> Any:
        nonlocal in_flight
        if sending:
            in_flight -= 1
        else:
            in_flight += 1
            log.write(f"R {pdu.dev_id} {pdu.function_code} {pdu.address} {pdu.count} "
                      f"{in_flight}\n")
        return pdu

    def trace_packet(sending: bool, data: bytes) -> bytes:
        # MBAP header: byte 6 is the unit id; dropping the frame makes the unit silent.
        if sending and len(data) > 6 and data[6] == SILENT_UNIT:
            return b""
        return data

    def trace_connect(connected: bool) -> None:
        log.write(f"C {int(connected)}\n")

    server = ModbusTcpServer(_devices(), address=("127.0.0.1", port), trace_pdu=trace_pdu,
                             trace_packet=trace_packet, trace_connect=trace_connect)
    await server.serve_forever(background=True)
    listener = server.transport  # an asyncio.Server, which pymodbus types as a BaseTransport
    print("PORT", listener.sockets[0].getsockname()[1], flush=True)  # type: ignore[attr-defined]
    await server.serving


if __name__ == "__main__":
    import logging

    logging.basicConfig(level=logging.CRITICAL)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--log", type=Path, required=True)
    args = parser.parse_args()
    asyncio.run(_serve(args.port, args.log))
