"""kwollector-wattmetre as a real program: generator lines in, rows in the real database out.

The program runs as a subprocess (``python -m kwollect.collect.kwollector_wattmetre``) fed by
tests/wattmetre_gen.py (or by the test itself, to pace the input around an outage).  Its
values: frame i, second k = i // 50, position j = i % 50, port p reads
``100 + p + 0.5 j + 0.25 (k % 4)`` W.  Device ids start with ``wm-``.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml

from kwollect.collect.kwollector_wattmetre import promoted_devices
from kwollect.store.writer import datetime_to_us
from tests.fixtures.kwdb import WRITER_PASSWORD
from tests.sqlapi import get_metrics, iso

GENERATOR = Path(__file__).parent / "wattmetre_gen.py"
PROGRAM = [sys.executable, "-m", "kwollect.collect.kwollector_wattmetre"]
US = 1_000_000
RATE = 50


def mean(port: int, second: int, frames: int = RATE) -> float:
    """The 1 Hz mean of the first `frames` frames of a second."""
    return 100 + port + 0.25 * (frames - 1) + 0.25 * (second % 4)


def write_config(tmp_path: Path, kwdb, wattmetre_id: str, mapping: str | None = None,
                 **options) -> Path:
    password = tmp_path / "db_password"
    password.write_text(WRITER_PASSWORD + "\n")
    conf = {"wattmetre_id": wattmetre_id, "wattmetre_version": 2, "db_host": "127.0.0.1",
            "db_port": kwdb.cluster.port, "db_name": kwdb.name, "db_user": "kwuser",
            "db_password_file": str(password), "log_level": "info",
            "spool_dir": str(tmp_path / "spool"), "flush_interval_s": 0.2,
            "retry_max_s": 0.5, "close_timeout_s": 30.0, **options}
    if mapping is not None:
        (tmp_path / "mapping.yaml").write_text(mapping)
        conf["mapping_file_path"] = str(tmp_path / "mapping.yaml")
    path = tmp_path / "wattmetre.yaml"
    path.write_text(yaml.safe_dump(conf))
    return path


def gen_args(**options: object) -> list[str]:
    args = [sys.executable, str(GENERATOR)]
    for name, value in options.items():
        flag = "--" + name.replace("_", "-")
        args += [flag] if value is True else [flag, str(value)]
    return args


async def run_piped(config: Path, **gen_options: object) -> tuple[int, str]:
    """generator | program; returns the program's exit code and stderr."""
    read_end, write_end = os.pipe()
    try:
        generator = await asyncio.create_subprocess_exec(*gen_args(**gen_options),
                                                         stdout=write_end)
        program = await asyncio.create_subprocess_exec(*PROGRAM, str(config), stdin=read_end,
                                                       stderr=subprocess.PIPE)
    finally:
        os.close(read_end)
        os.close(write_end)
    _, stderr = await asyncio.wait_for(program.communicate(), 90)
    assert await asyncio.wait_for(generator.wait(), 10) == 0
    return program.returncode, stderr.decode()


async def stored(kwdb, device_like: str) -> dict[str, list[tuple[int, float]]]:
    """device_id -> [(ts in µs, value)] in time order."""
    conn = await kwdb.connect("admin")
    try:
        rows = await conn.fetch(
            "SELECT se.device_id, s.ts, s.value FROM kwollect.samples s "
            "JOIN kwollect.series se USING (series_id) "
            "WHERE se.device_id LIKE $1 AND se.metric_id = 'wattmetre_power_watt' "
            "ORDER BY se.device_id, s.ts", device_like)
    finally:
        await conn.close()
    out: dict[str, list[tuple[int, float]]] = {}
    for device_id, ts, value in rows:
        out.setdefault(device_id, []).append((datetime_to_us(ts), value))
    return out


def means(start: int, ports: int, seconds: Sequence[int], last_frames: int = RATE,
          prefix: str = "") -> dict[str, list[tuple[int, float]]]:
    """Expected 1 Hz rows; the last second may be partial (`last_frames` frames)."""
    last = seconds[-1]
    return {f"{prefix}-port{p}": [((start + k) * US + US // 2,
                                  mean(p, k, last_frames if k == last else RATE))
                                 for k in seconds] for p in range(ports)}


def test_promotion_rule() -> None:
    rows = [("node-1", "wattmetre_.*"), ("node-2", None), ("node-3", "wattmetre"),
            ("node-4", "bmc_.*"), ("wm-port5", "wattmetre_power_watt"), ("node-6", "(["),
            ("node-7", ".*power.*"), (None, ".*")]
    assert promoted_devices(rows) == {"node-1", "node-2", "wm-port5", "node-7"}


async def test_one_hz_means_and_last_partial_second_flushed_at_eof(kwdb, tmp_path) -> None:
    start = 1_700_100_000
    config = write_config(tmp_path, kwdb, "wm-hz")
    code, stderr = await run_piped(config, version=2, ports=3, seconds="2.5", start=start)
    assert code == 0, stderr
    assert await stored(kwdb, "wm-hz-%") == means(start, 3, [0, 1, 2], last_frames=25,
                                                   prefix="wm-hz")
    assert "end of input: 125 lines, 125 frames, 0 malformed" in stderr


async def test_v3_lines(kwdb, tmp_path) -> None:
    start = 1_700_100_100
    config = write_config(tmp_path, kwdb, "wm-v3", wattmetre_version=3)
    code, stderr = await run_piped(config, version=3, ports=2, seconds=2, start=start)
    assert code == 0, stderr
    assert await stored(kwdb, "wm-v3-%") == means(start, 2, [0, 1], prefix="wm-v3")


async def test_bad_lines_counted_and_skipped(kwdb, tmp_path) -> None:
    start = 1_700_100_200
    config = write_config(tmp_path, kwdb, "wm-bad")
    code, stderr = await run_piped(config, version=2, ports=2, seconds=2, start=start,
                                   bad_every=10, not_ok_every=25)
    assert code == 0, stderr
    # not-OK frames (every 25th) are not samples: seconds lose positions 24 and 49
    got = await stored(kwdb, "wm-bad-%")
    for port in range(2):
        expected = [(start + k) * US + US // 2 for k in (0, 1)]
        assert [ts for ts, _ in got[f"wm-bad-port{port}"]] == expected
        values = [100 + port + 0.5 * j for j in range(50) if j not in (24, 49)]
        assert got[f"wm-bad-port{port}"][0][1] == sum(values) / 48
    assert "skipped malformed line" in stderr
    assert "110 lines, 96 frames, 10 malformed, 4 not OK" in stderr


async def test_two_ports_of_one_node_are_summed_by_get_metrics(kwdb, tmp_path) -> None:
    start = 1_700_100_300
    config = write_config(tmp_path, kwdb, "wm-alias",
                          mapping="wm-alias-node: [wm-alias-port0, wm-alias-port1]\n")
    code, stderr = await run_piped(config, version=2, ports=3, seconds=2, start=start)
    assert code == 0, stderr
    conn = await kwdb.connect("kwuser_ro")
    try:
        first = datetime.fromtimestamp(start, UTC)
        rows = await get_metrics(conn, devices="wm-alias-node", start_time=iso(first),
                                 end_time=iso(first + timedelta(seconds=2)))
    finally:
        await conn.close()
    assert [(r["timestamp"], r["device_id"], r["value"]) for r in rows] == [
        (first + timedelta(seconds=k, milliseconds=500), "wm-alias-node", mean(0, k) + mean(1, k))
        for k in (0, 1)]
    assert rows[0]["labels"] == {"_device_orig": ["wm-alias-port0", "wm-alias-port1"]}


async def test_promotion_switches_between_raw_and_one_hz(kwdb, tmp_path) -> None:
    config = write_config(tmp_path, kwdb, "wm-promo",
                          mapping="wm-promo-node: [wm-promo-port1]\n")
    read_end, write_end = os.pipe()
    try:
        generator = await asyncio.create_subprocess_exec(
            *gen_args(version=2, ports=2, seconds=8, realtime=True), stdout=write_end)
        program = await asyncio.create_subprocess_exec(*PROGRAM, str(config), stdin=read_end,
                                                       stderr=subprocess.PIPE)
    finally:
        os.close(read_end)
        os.close(write_end)
    conn = await kwdb.connect("kwuser")
    try:
        await asyncio.sleep(2)
        # the node of port 1; port 0 by its own id but with a regex matching a prefix only
        await conn.execute("INSERT INTO promoted_metrics (device_id, metric_id) VALUES "
                           "('wm-promo-node', 'wattmetre_.*'), ('wm-promo-port0', 'wattmetre')")
        await asyncio.sleep(2.5)
        await conn.execute("DELETE FROM promoted_metrics WHERE device_id LIKE 'wm-promo-%'")
        _, stderr = await asyncio.wait_for(program.communicate(), 60)
        await generator.wait()
    finally:
        await conn.execute("DELETE FROM promoted_metrics WHERE device_id LIKE 'wm-promo-%'")
        await conn.close()
    assert program.returncode == 0, stderr.decode()
    got = await stored(kwdb, "wm-promo-%")
    assert all(ts % US == US // 2 for ts, _ in got["wm-promo-port0"])  # 1 Hz only
    port1 = got["wm-promo-port1"]
    raw = [ts for ts, _ in port1 if ts % US != US // 2]
    assert len(raw) >= 50  # at least a second of 50 Hz samples
    seconds_of_means = [ts // US for ts, _ in port1 if ts % US == US // 2]
    assert min(seconds_of_means) < raw[0] // US  # means before the promotion...
    assert max(seconds_of_means) > raw[-1] // US  # ... and after it ended
    assert "promoted for wattmetre_power_watt: wm-promo-node" in stderr.decode()


async def test_database_outage_during_the_stream_loses_nothing(kwdb, pg_cluster,
                                                               tmp_path) -> None:
    start = 1_700_100_400
    lines = subprocess.run(gen_args(version=2, ports=2, seconds=6, start=start),
                           capture_output=True, check=True).stdout.splitlines(keepends=True)
    config = write_config(tmp_path, kwdb, "wm-outage")
    program = await asyncio.create_subprocess_exec(*PROGRAM, str(config),
                                                   stdin=subprocess.PIPE,
                                                   stderr=subprocess.PIPE)
    assert program.stdin is not None
    try:
        for second in range(6):
            program.stdin.write(b"".join(lines[second * RATE:(second + 1) * RATE]))
            await program.stdin.drain()
            await asyncio.sleep(0.4)
            if second == 1:
                await asyncio.to_thread(pg_cluster.stop)
            elif second == 3:
                await asyncio.sleep(0.5)  # the writer spools meanwhile
                await asyncio.to_thread(pg_cluster.start)
    finally:
        if not (pg_cluster.datadir / "postmaster.pid").exists():
            await asyncio.to_thread(pg_cluster.start)
    program.stdin.close()
    _, stderr = await asyncio.wait_for(program.communicate(), 60)
    assert program.returncode == 0, stderr.decode()
    assert await stored(kwdb, "wm-outage-%") == means(start, 2, range(6),
                                                      prefix="wm-outage")
    assert "database unavailable" in stderr.decode()


@pytest.mark.parametrize(("options", "message"), [
    ({"wattmetre_version": 4}, "wattmetre_version must be 2 or 3"),
    ({"mapping_file_path": "/nonexistent/mapping.yaml"}, "cannot read mapping file"),
    ({"batch_max_rows": 0}, "batch_max_rows must be a positive integer"),
])
def test_bad_options_exit_2(tmp_path, kwdb, options, message) -> None:
    config = write_config(tmp_path, kwdb, "wm-opts", **options)
    result = subprocess.run([*PROGRAM, str(config)], input=b"", capture_output=True,
                            timeout=60)
    assert result.returncode == 2
    assert message in result.stderr.decode()


async def test_sigterm_flushes_the_last_second_and_exits_0(kwdb, tmp_path) -> None:
    start = 1_700_100_500
    lines = subprocess.run(gen_args(version=2, ports=2, seconds="2.5", start=start),
                           capture_output=True, check=True).stdout
    config = write_config(tmp_path, kwdb, "wm-term")
    program = await asyncio.create_subprocess_exec(*PROGRAM, str(config),
                                                   stdin=subprocess.PIPE,
                                                   stderr=subprocess.PIPE)
    assert program.stdin is not None
    program.stdin.write(lines)  # stdin stays open: only the signal ends the program
    await program.stdin.drain()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30
    while len((await stored(kwdb, "wm-term-%")).get("wm-term-port1", [])) < 2:
        assert loop.time() < deadline, "the first two seconds were not stored"
        await asyncio.sleep(0.1)
    program.terminate()
    _, stderr = await asyncio.wait_for(program.communicate(), 60)
    assert program.returncode == 0, stderr.decode()
    assert await stored(kwdb, "wm-term-%") == means(start, 2, [0, 1, 2], last_frames=25,
                                                     prefix="wm-term")
