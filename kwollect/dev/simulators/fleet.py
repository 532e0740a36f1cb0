"""A small simulated cluster: one device of every kind, and the metrics.d that describes it.

Three nodes (`NODES`) are fed and watched by: an Eaton PDU over SNMP (one outlet per node),
a BMC per node over IPMI, node-2's BMC over Redfish (JSON over HTTP), node-1's Prometheus
node exporter, a Modbus energy meter on node-3's supply, and a wattmetre whose ports (two
per node, as for dual-PSU nodes) are mapped to the nodes.  Every peer listens on 127.0.0.1
with a port the kernel picked and is stopped by pid (`Fleet.stop`).
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kwollect.dev.simulators import ipmi, modbus, prometheus, redfish, snmp, stop_process

log = logging.getLogger(__name__)

NODES = ("node-1", "node-2", "node-3")
WATTMETRE_ID = "wattmetre1"
WATTMETRE_PORTS_PER_NODE = 2
WATTMETRE_RATE = 50
PROMETHEUS_METRICS = ("node_load1", "node_memory_MemAvailable_bytes",
                      "node_context_switches_total")
RAW_POWER_METRIC = "meter_power_raw_watt"
"""The optional metric: read at 10 Hz, only while promoted (see `Fleet.describe`)."""
METER_NODE = "node-3"


@dataclass
class Fleet:
    """The running peers, with what stops each of them (in reverse start order)."""

    workdir: Path
    pdu: snmp.SnmpAgent | None = None
    exporter: prometheus.NodeExporter | None = None
    bmcs: dict[str, ipmi.IpmiSim] = field(default_factory=dict)
    meter: modbus.ModbusServer | None = None
    redfish: redfish.RedfishProcess | None = None
    _stoppers: list[tuple[str, Callable[[], None]]] = field(default_factory=list)

    def stop(self) -> None:
        """Stop every peer started so far; a failure to stop one never spares the others."""
        while self._stoppers:
            name, stop = self._stoppers.pop()
            try:
                stop()
            except Exception as exc:  # noqa: BLE001 - keep stopping the others
                log.error("could not stop %s: %s", name, exc)

    def peers(self) -> list[tuple[str, str, str]]:
        """(device, protocol, address) of every simulated device, for people to read."""
        rows = []
        if self.pdu:
            rows.append(("pdu-1", "SNMP v2c (snmpd, Eaton ePDU table)",
                         f"udp {self.pdu.host}:{self.pdu.port}"))
        for node, bmc in self.bmcs.items():
            rows.append((f"{node} BMC", "IPMI (ipmi_sim)", f"udp {bmc.host}:{bmc.port}"))
        if self.redfish:
            rows.append(("node-2 BMC", "Redfish (json+http)",
                         f"http {self.redfish.host}:{self.redfish.port}"))
        if self.exporter:
            rows.append(("node-1", "Prometheus (node exporter)", f"http {self.exporter.address}"))
        if self.meter:
            rows.append(("meter-1", "Modbus TCP (pymodbus)",
                         f"tcp {self.meter.host}:{self.meter.port}"))
        rows.append((WATTMETRE_ID, f"wattmetre v2 lines at {WATTMETRE_RATE} Hz (stdin)",
                     f"{len(NODES) * WATTMETRE_PORTS_PER_NODE} ports"))
        return rows

    def describe(self) -> dict[str, list[dict[str, Any]]]:
        """The metrics.d files (name -> descriptions) for the kwollector."""
        assert self.pdu and self.exporter and self.meter and self.redfish and self.bmcs
        pdu, files = [], {}
        for outlet, node in enumerate(NODES, 1):
            labels = {"_device_alias": node, "outlet": outlet}
            pdu.append({"name": "pdu_outlet_power_watt", "device_id": "pdu-1",
                        "url": self.pdu.url(f"{snmp.PDU_TABLE}.3.0.{outlet}"),
                        "update_every": 1000, "labels": labels})
            pdu.append({"name": "pdu_outlet_energy_watthour_total", "device_id": "pdu-1",
                        "url": self.pdu.url(f"{snmp.PDU_TABLE}.4.0.{outlet}"),
                        "update_every": 5000, "labels": labels})
        files["pdu-1.yaml"] = pdu
        files["bmc.yaml"] = [
            entry for node, bmc in self.bmcs.items() for entry in (
                {"name": "bmc_node_power_watt", "device_id": node,
                 "url": bmc.url("Pwr Consumption"), "update_every": 1000},
                {"name": "bmc_temp_cpu_celsius", "device_id": node,
                 "url": bmc.url("CPU Temp"), "update_every": 5000})]
        files["node-2-redfish.yaml"] = [
            {"name": "redfish_node_power_watt", "device_id": "node-2",
             "url": self.redfish.url(redfish.POWER_PATH, "PowerControl[0].PowerConsumedWatts"),
             "update_every": 2000},
            {"name": "redfish_psu_power_watt", "device_id": "node-2",
             "url": self.redfish.url(redfish.POWER_PATH, "$.PowerSupplies[*].PowerOutputWatts"),
             "update_every": 2000}]
        files["node-1-exporter.yaml"] = [
            {"name": "node_exporter", "device_id": "node-1",
             "url": f"prometheus://{self.exporter.address}/{'-'.join(PROMETHEUS_METRICS)}",
             "update_every": 2000}]
        meter_url = self.meter.url(1, 7, type="float32", order="ABCD")
        files["meter-1.yaml"] = [
            {"name": "meter_power_watt", "device_id": "meter-1", "url": meter_url,
             "update_every": 1000, "labels": {"_device_alias": METER_NODE}},
            {"name": RAW_POWER_METRIC, "device_id": "meter-1", "url": meter_url,
             "update_every": 100, "optional": True, "labels": {"_device_alias": METER_NODE}}]
        return files

    def write_metrics_dir(self, metrics_dir: Path) -> None:
        metrics_dir.mkdir(parents=True, exist_ok=True)
        for name, descriptions in self.describe().items():
            (metrics_dir / name).write_text(yaml.safe_dump(descriptions, sort_keys=False))


def wattmetre_ports(node: str) -> list[str]:
    index = NODES.index(node)
    return [f"{WATTMETRE_ID}-port{index * WATTMETRE_PORTS_PER_NODE + k}"
            for k in range(WATTMETRE_PORTS_PER_NODE)]


def write_wattmetre_mapping(path: Path) -> None:
    """The mapping file of kwollector-wattmetre: ``node: [<wattmetre>-port<N>, ...]``."""
    path.write_text(yaml.safe_dump({node: wattmetre_ports(node) for node in NODES}))


def wattmetre_command(seconds: int = 10 * 365 * 86400) -> list[str]:
    """The simulated `wattmetre-read`: v2 lines for every mapped port, paced in real time."""
    return [sys.executable, "-m", "kwollect.dev.simulators.wattmetre", "--realtime",
            "--version", "2", "--ports", str(len(NODES) * WATTMETRE_PORTS_PER_NODE),
            "--rate", str(WATTMETRE_RATE), "--seconds", str(seconds)]


def _bmc_sensors(index: int) -> tuple[ipmi.Sensor, ...]:
    """The simulator's sensors, each name once, with power and CPU temperature of its own
    per node (node-1 252 W and 45 C, then 20 W and 5 C more per node)."""
    sensors: dict[str, ipmi.Sensor] = {}
    for s in ipmi.SENSORS:
        if s.name in ("Pwr Consumption", "CPU Temp"):
            s = dataclasses.replace(s, raw=s.raw + 5 * index)
        sensors.setdefault(s.name, s)
    return tuple(sensors.values())


def start_fleet(workdir: Path) -> Fleet:
    """Start every peer under `workdir`; on failure, stop those already started and raise."""
    fleet = Fleet(workdir)
    try:
        process, fleet.pdu = snmp.start_snmpd(workdir / "snmpd")
        fleet._stoppers.append(("snmpd", lambda: snmp.stop_snmpd(process)))
        exporter_process, fleet.exporter = prometheus.start_node_exporter(workdir / "exporter")
        fleet._stoppers.append(("node exporter", lambda: stop_process(exporter_process)))
        for index, node in enumerate(NODES):
            bmc = ipmi.IpmiSim(workdir / f"bmc-{node}", sensors=_bmc_sensors(index))
            bmc.start()
            fleet.bmcs[node] = bmc
            fleet._stoppers.append((f"ipmi_sim of {node}", bmc.stop))
        fleet.meter = modbus.start_modbus_server(workdir / "modbus")
        fleet._stoppers.append(("modbus server", fleet.meter.stop))
        fleet.redfish = redfish.start_redfish(workdir / "redfish")
        fleet._stoppers.append(("redfish server", fleet.redfish.stop))
    except BaseException:
        fleet.stop()
        raise
    return fleet
