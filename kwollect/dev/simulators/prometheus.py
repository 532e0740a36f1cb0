"""Debian's prometheus-node-exporter on loopback, with a private textfile directory.

The exporter serves the machine's real metrics (load, network, filesystems ...) plus the
``*.prom`` files written to its textfile directory (`NodeExporter.write`).
"""

from __future__ import annotations

import os
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from kwollect.dev.simulators import free_port, stop_process

NODE_EXPORTER = "/usr/bin/prometheus-node-exporter"


@dataclass
class NodeExporter:
    address: str
    """host:port"""
    textfile_dir: Path
    pid: int

    def write(self, name: str, text: str) -> None:
        """Publish a textfile atomically, so a scrape never sees half of it."""
        tmp = self.textfile_dir / f".{name}.tmp"
        tmp.write_text(text)
        tmp.rename(self.textfile_dir / f"{name}.prom")

    def remove(self, name: str) -> None:
        (self.textfile_dir / f"{name}.prom").unlink(missing_ok=True)


def serves(url: str) -> bool:
    """Whether `url` answers 200 right now."""
    try:
        with urllib.request.urlopen(url, timeout=1) as resp:
            return resp.status == 200
    except OSError:
        return False


def installed() -> bool:
    return os.access(NODE_EXPORTER, os.X_OK)


def start_node_exporter(workdir: Path) -> tuple[subprocess.Popen, NodeExporter]:
    """Run the exporter on a free loopback port until it serves /metrics (`stop_process`)."""
    if not installed():
        raise RuntimeError(f"{NODE_EXPORTER} missing: install Debian's prometheus-node-exporter "
                           "(scripts/bootstrap.sh)")
    workdir.mkdir(parents=True, exist_ok=True)
    textfile_dir = workdir / "textfile"
    textfile_dir.mkdir(exist_ok=True)
    with (workdir / "node_exporter.log").open("ab") as log:
        for _attempt in range(5):
            address = f"127.0.0.1:{free_port()}"
            proc = subprocess.Popen(
                [NODE_EXPORTER, f"--web.listen-address={address}",
                 f"--collector.textfile.directory={textfile_dir}"],
                stdout=log, stderr=log)
            deadline = time.monotonic() + 10
            while proc.poll() is None and time.monotonic() < deadline:
                if serves(f"http://{address}/metrics"):
                    return proc, NodeExporter(address, textfile_dir, proc.pid)
                time.sleep(0.05)
            stop_process(proc)  # port taken meanwhile or not ready: try another port
    raise RuntimeError(f"node_exporter did not start, see {workdir / 'node_exporter.log'}")
