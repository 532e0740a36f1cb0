"""OpenIPMI's ipmi_sim as a real BMC on loopback, with sensors defined by a compiled SDR.

Each simulator gets free random ports (RMCP+ over UDP and the emulator console over TCP), a
fresh state directory (ipmi_sim persists SDRs, so a stale one could hide the SDR we compile)
and is stopped by pid.  Sensor values are set at run time through the console, which takes the
same commands as the .emu file (``sensor_set_value mc lun num raw event``).

The sensors, in SDR order (FreeIPMI's Record ID = position + 2, record 1 is the MC locator):

======  ===============  ===========================================  ==================
record  name             definition                                   initial reading
======  ===============  ===========================================  ==================
2       CPU Temp         temperature, m=1                             45.00 C
3       Pwr Consumption  power in W, m=4                              252.00 W
4       Fan1             fan, m=100                                   4800.00 RPM
5       Inlet Temp       temperature, m=1                             22.00 C
6       Inlet Temp       same name, other entity instance             30.00 C
7       PSU1 Status      discrete power supply, presence bit set      event bitmask 0001h
8       Exhaust Temp     temperature with scanning disabled           N/A
9       Vcore            voltage, m=1, r_exp=-2                       1.20 V
======  ===============  ===========================================  ==================
"""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

from kwollect.dev.simulators import free_port, free_udp_port

ADMIN = ("admin", "secret")
ODD = ("odd", 'p#"x\\y')
"""A user whose password has the characters FreeIPMI's config-file syntax must escape."""

RECORD_IDS = {"CPU Temp": 2, "Pwr Consumption": 3, "Fan1": 4, "Inlet Temp": 5,
              "PSU1 Status": 7, "Exhaust Temp": 8, "Vcore": 9}
INLET_TEMP_2 = 6
FAN_SENSOR_NUMBER = 3


@dataclass(frozen=True)
class Sensor:
    number: int
    name: str
    sensor_type: str
    type_code: int
    unit: str
    m: int = 1
    r_exp: int = 0
    raw: int = 0
    entity: str = "system_board"
    instance: int = 1
    discrete: bool = False
    scanning: bool = True


SENSORS = (
    Sensor(1, "CPU Temp", "Temperature", 0x01, "degrees_C", raw=45),
    Sensor(2, "Pwr Consumption", "Current", 0x03, "Watts", m=4, raw=63, entity="power_supply"),
    Sensor(3, "Fan1", "Fan", 0x04, "RPM", m=100, raw=48, entity="fan_cooling_device"),
    Sensor(4, "Inlet Temp", "Temperature", 0x01, "degrees_C", raw=22, instance=2),
    Sensor(5, "Inlet Temp", "Temperature", 0x01, "degrees_C", raw=30, instance=3),
    Sensor(6, "PSU1 Status", "Power_Supply", 0x08, "unspecified", entity="power_supply",
           discrete=True),
    Sensor(7, "Exhaust Temp", "Temperature", 0x01, "degrees_C", raw=40, instance=4,
           scanning=False),
    Sensor(8, "Vcore", "Voltage", 0x02, "Volts", r_exp=-2, raw=120),
)


def extra_sensors(count: int) -> tuple[Sensor, ...]:
    """More temperature sensors, for benchmarks that need a BMC with a realistic SDR size."""
    return tuple(Sensor(100 + i, f"Temp {i}", "Temperature", 0x01, "degrees_C", raw=20 + i % 50,
                        instance=10 + i) for i in range(count))


def _sdr(sensor: Sensor) -> str:
    return f"""sdr type 1
\tsensor_owner_id 0x20
\tsensor_owner_lun 0
\tchannel_number 0
\tsensor_number {sensor.number}
\tentity_id {sensor.entity}
\tentity_instance {sensor.instance}
\tsensor_type {sensor.sensor_type}
\tinit_scanning true
\tinit_sensor_type true
\tdefault_sensor_scan_on true
\tevent_reading_type_code {0x6F if sensor.discrete else 1}
\tanalog_data_format unsigned
\trate_unit none
\tmodifier_unit none
\tpercentage false
\tbase_unit {sensor.unit}
\tmodifier_unit_code unspecified
\tlinearization linear
\tm {sensor.m}
\ttolerance 0
\tb 0
\taccuracy 1
\taccuracy_exp 0
\tsensor_direction input
\tr_exp {sensor.r_exp}
\tb_exp 0
\tsensor_maximum 255
\tsensor_minimum 0
\tid_string "{sensor.name}"
endsdr
"""


_MC_SDR = """sdr type 18
\tdevice_slave_address 0x20
\tdevice_channel_number 0
\tchassis true
\tipmb_event_gen false
\tipmb_event_recv false
\tfru_inventory false
\tsel true
\tsdr true
\tsensor true
\tentity_id system_board
\tentity_instance 1
\tid_string "sim BMC"
endsdr
"""


def _emu(sensors: tuple[Sensor, ...]) -> str:
    lines = ["mc_setbmc 0x20",
             "mc_add 0x20 0 no-device-sdrs 0x23 9 8 0x9f 0x1291 0xf02 persist_sdr",
             "sel_enable 0x20 1000 0x0a"]
    for s in sensors:
        code = 0x6F if s.discrete else 0x01
        lines.append(f"sensor_add 0x20 0 {s.number} {s.type_code:#04x} {code:#04x}")
        if s.discrete:
            lines.append(f"sensor_set_bit 0x20 0 {s.number} 0 1 0")
        else:
            lines.append(f"sensor_set_value 0x20 0 {s.number} {s.raw} 0")
        if not s.scanning:
            zeros = "0" * 15
            lines.append(f"sensor_set_event_support 0x20 0 {s.number} disable no-scanning "
                         f"per-state {zeros} {zeros} {zeros} {zeros}")
    lines.append("mc_enable 0x20")
    return "\n".join(lines) + "\n"


def _lan_conf(port: int, console_port: int) -> str:
    users = "\n".join(
        f'  user {num} true "{user}" "{password}" admin 10 none md2 md5 straight'
        for num, (user, password) in ((2, ADMIN), (3, ODD)))
    return f"""name "sim"
set_working_mc 0x20
  startlan 1
    addr 127.0.0.1 {port}
    priv_limit admin
    allowed_auths_callback none md2 md5 straight
    allowed_auths_user none md2 md5 straight
    allowed_auths_operator none md2 md5 straight
    allowed_auths_admin none md2 md5 straight
    guid a123456789abcdefa123456789abcdef
  endlan
{users}
console 127.0.0.1 {console_port}
"""


def _udp_bound(port: int) -> bool:
    wanted = f"0100007F:{port:04X}"
    with open("/proc/net/udp") as table:
        return any(line.split()[1] == wanted for line in table.readlines()[1:])


@dataclass
class IpmiSim:
    """One ipmi_sim process and its files; `start` picks new free ports on each try."""

    workdir: Path
    sensors: tuple[Sensor, ...] = SENSORS
    port: int = 0
    console_port: int = 0
    proc: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def host(self) -> str:
        return "127.0.0.1"

    def url(self, sensor: str | int, user: str = ADMIN[0], password: str = ADMIN[1],
            query: str = "workaround-flags=opensesspriv") -> str:
        """An ``ipmisensor://`` URL for this BMC (ipmi_sim needs FreeIPMI's opensesspriv)."""
        userinfo = f"{quote(user, safe='')}:{quote(password, safe='')}"
        url = f"ipmisensor://{userinfo}@{self.host}:{self.port}/{quote(str(sensor))}"
        return f"{url}?{query}" if query else url

    def pause(self) -> None:
        """Freeze the BMC (SIGSTOP): it stops answering, as a hung BMC would."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def _write_files(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        sdrs = self.workdir / "sim.sdrs"
        sdrs.write_text(_MC_SDR + "".join(_sdr(s) for s in self.sensors))
        state = self.workdir / "state" / "ipmi_sim" / "sim"
        if state.parent.parent.exists():
            subprocess.run(["rm", "-rf", str(state.parent.parent)], check=True)
        state.mkdir(parents=True)
        subprocess.run(["sdrcomp", "-o", str(state / "sdr.20.main"), str(sdrs)], check=True,
                       capture_output=True)
        (self.workdir / "sim.emu").write_text(_emu(self.sensors))
        (self.workdir / "lan.conf").write_text(_lan_conf(self.port, self.console_port))

    def start(self, port: int | None = None) -> None:
        """Start on `port` (for a restart on the same address) or on fresh free ports."""
        for _ in range(5):
            self.port = port or free_udp_port()
            self.console_port = free_port()
            self._write_files()
            log = open(self.workdir / "ipmi_sim.log", "ab")  # noqa: SIM115 - owned by the child
            self.proc = subprocess.Popen(
                ["ipmi_sim", "-c", "lan.conf", "-f", "sim.emu", "-s", "state", "-n"],
                cwd=self.workdir, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                # keep SIGPIPE ignored: ipmi_sim dies of it when a console client hangs up
                restore_signals=False)
            log.close()
            if self._wait_ready():
                return
            self.stop()
        raise RuntimeError(f"ipmi_sim did not start, see {self.workdir / 'ipmi_sim.log'}")

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                return False
            if _udp_bound(self.port):
                try:
                    socket.create_connection((self.host, self.console_port), timeout=1).close()
                    return True
                except OSError:
                    pass
            time.sleep(0.02)
        return False

    def command(self, line: str) -> None:
        """Run one emulator command through the console; raises if the simulator refuses it."""
        with socket.create_connection((self.host, self.console_port), timeout=5) as sock:
            # the console shows its first prompt only once it has input
            sock.sendall(line.encode() + b"\n")
            reply = _read_reply(sock, line.encode())
        if b"**" in reply:
            raise RuntimeError(f"ipmi_sim refused {line!r}: {reply!r}")

    def set_raw(self, sensor_number: int, raw: int) -> None:
        self.command(f"sensor_set_value 0x20 0 {sensor_number} {raw} 0")

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGCONT)
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _read_reply(sock: socket.socket, echo: bytes) -> bytes:
    """Console output after the echo of a command, up to the prompt that follows it."""
    data = b""
    while True:
        _, seen, reply = data.partition(echo)
        if seen and reply.endswith(b"> "):
            return reply
        chunk = sock.recv(4096)
        if not chunk:
            return reply
        data += chunk
