"""Wattmetre protocol: v2/v3 parsing, mapping file, 1 Hz means and raw pass-through.

Input comes from tests/wattmetre_gen.py run as a subprocess (the real line formats).  Its
values: frame i, second k = i // rate, position j = i % rate, port p reads
``100 + p + 0.5 j + 0.25 (k % 4)`` W, stamped ``1700000000 + i / rate + 3000999 ns``.
"""

from __future__ import annotations

import functools
import math
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kwollect.model import Reading
from kwollect.protocols.wattmetre import (
    METRIC_ID,
    WattmetreAggregator,
    load_mapping,
    parse_timestamp_us,
    parse_v2,
    parse_v3,
    parser_for,
)

GENERATOR = Path(__file__).parent / "wattmetre_gen.py"
T0 = 1_700_000_000  # the generator's default start, in seconds
T0_US = T0 * 1_000_000
FIRST_US = T0_US + 3000  # 3000999 ns after the second, truncated to µs
MID = 500_000


@functools.cache
def _generate(args: tuple[str, ...]) -> tuple[str, ...]:
    result = subprocess.run([sys.executable, str(GENERATOR), *args], capture_output=True,
                            text=True, timeout=60, check=True)
    return tuple(result.stdout.splitlines())


def gen(**options: object) -> list[str]:
    """Lines printed by the generator, e.g. gen(version=3, ports=2, seconds=1)."""
    args: list[str] = []
    for name, value in options.items():
        flag = "--" + name.replace("_", "-")
        args += [flag] if value is True else [flag, str(value)]
    return list(_generate(tuple(args)))


def power(port: int, frame: int, rate: int = 50) -> float:
    second, position = divmod(frame, rate)
    return 100 + port + 0.5 * position + 0.25 * (second % 4)


def full_second_mean(port: int, second: int, rate: int = 50) -> float:
    return 100 + port + 0.25 * (rate - 1) + 0.25 * (second % 4)


def frame_us(frame: int, rate: int = 50) -> int:
    return FIRST_US + frame * 1_000_000 // rate


def run(agg: WattmetreAggregator, lines: list[str], flush: bool = True) -> list[Reading]:
    out: list[Reading] = []
    for line in lines:
        out += agg.feed_line(line)
    if flush:
        out += agg.flush()
    return out


def by_device(readings: list[Reading]) -> dict[str, list[tuple[int, float]]]:
    series: dict[str, list[tuple[int, float]]] = {}
    for reading in readings:
        series.setdefault(reading.device_id, []).append((reading.timestamp_us, reading.value))
    return series


@pytest.fixture(scope="module")
def mapping_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("wattmetre") / "mapping.yaml"
    path.write_text("node-1: [wm-port1, wm-port2]\nnode-3: wm-port3\n"
                    "other-node: [wm2-port0]\n")
    return path


# --- parsing ---------------------------------------------------------------------------

def test_parse_v2_exact_values_and_timestamps() -> None:
    lines = gen(version=2, ports=3, seconds=1)
    assert len(lines) == 50
    assert lines[0].split(",")[2] == "1700000000.003000999"
    for frame in (0, 1, 49):
        timestamp_us, values = parse_v2(lines[frame])
        assert timestamp_us == frame_us(frame)
        assert values == [power(port, frame) for port in range(3)]


def test_parse_v3_exact_values_and_timestamps() -> None:
    lines = gen(version=3, ports=2, seconds=1)
    assert len(lines[7].split(",")) == 15  # 11 + 2 x ports
    timestamp_us, values = parse_v3(lines[7])
    assert timestamp_us == frame_us(7)
    assert values == [power(0, 7), power(1, 7)]
    assert parser_for(3) is parse_v3 and parser_for(2) is parse_v2


def test_timestamp_does_not_go_through_float() -> None:
    assert parse_timestamp_us("1609452000.003000999") == 1_609_452_000_003_000
    assert parse_timestamp_us("1609452000.999999999") == 1_609_452_000_999_999
    assert parse_timestamp_us("1609452000.5") == 1_609_452_000_500_000
    assert parse_timestamp_us("1609452000") == 1_609_452_000_000_000


@pytest.mark.parametrize("text", ["", "-1609452000.5", "+1609452000", "1609452000.5.1",
                                  "1.6e9", "16094520001609452000.5", "1609452000.5x", "nan"])
def test_bad_timestamp_rejected(text: str) -> None:
    with pytest.raises(ValueError, match="bad timestamp"):
        parse_timestamp_us(text)


def test_missing_values_are_nan() -> None:
    lines = gen(version=2, ports=3, seconds=1, missing_every=2)
    assert lines[1].split(",")[4] == ""  # first occurrence: port 0 written as ""
    _, values = parse_v2(lines[1])
    assert math.isnan(values[0]) and values[1:] == [power(1, 1), power(2, 1)]
    _, values = parse_v2(lines[3])  # second occurrence: port 1 written as "nan"
    assert ",nan," in lines[3]
    assert math.isnan(values[1]) and values[0] == power(0, 3)
    _, values = parse_v3(gen(version=3, ports=3, seconds=1, missing_every=2)[1])
    assert math.isnan(values[0]) and values[1] == power(1, 1)


def test_not_ok_frames_are_not_errors() -> None:
    v2 = gen(version=2, ports=2, seconds=1, not_ok_every=4)
    v3 = gen(version=3, ports=2, seconds=1, not_ok_every=4)
    assert ",KO," in v2[3] and v3[3].split(",")[1] == "false"
    assert parse_v2(v2[3]) is None and parse_v3(v3[3]) is None
    assert parse_v2(v2[4]) is not None and parse_v3(v3[4]) is not None


@pytest.mark.parametrize(("line", "reason"), [
    ("", "expected at least 5 fields, got 1"),
    ("0,0x0000,1700000000.5", "expected at least 5 fields"),
    ("0,0x0000,1700000000.5,OK", "without port values"),
    ("0,0x0000,1700000000.5,OK,100,1x2", "port 1: bad number '1x2'"),
    ("0,0x0000,1700000000.5,OK,100,inf", "port 1: bad number 'inf'"),
    ("0,0x0000,1700000000.5,OK,100,1e999", "port 1: bad number"),
    ("0,0x0000,17e8x.5,OK,100", "bad timestamp '17e8x.5'"),
])
def test_parse_v2_malformed(line: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        parse_v2(line)


def test_parse_v2_port_count_check() -> None:
    line = "0,0x0000,1700000000.5,OK,100,101"
    assert parse_v2(line, ports=2) == (T0_US + MID, [100.0, 101.0])
    with pytest.raises(ValueError, match="expected 3 ports, got 2"):
        parse_v2(line, ports=3)


@pytest.mark.parametrize(("line", "reason"), [
    ("1700000000.5", "expected at least 13 fields, got 1"),
    ("1700000000.5,yes," + ",".join(["1"] * 13), "bad frame status 'yes'"),
    ("1700000000.5,true," + ",".join(["1"] * 12), "expected 11 \\+ 2 x ports fields"),
    ("1700000000.5,true," + ",".join(["1"] * 9), "expected 11 \\+ 2 x ports fields"),
    ("1700000000.5,true,1,1,1,1,zz,1,1,1,1,1,1", "port 0: bad number 'zz'"),
    ("17000000x0,true,1,1,1,1,100,1,1,1,1,1,1", "bad timestamp"),
])
def test_parse_v3_malformed(line: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        parse_v3(line)


def test_parse_v3_port_count_check() -> None:
    line = "1700000000.5,true,230,230,230,0.4,100,0.4,101,50,1,1,1,0,0"
    assert parse_v3(line) == (T0_US + MID, [100.0, 101.0])
    with pytest.raises(ValueError, match="expected 1 ports, got 2"):
        parse_v3(line, ports=1)


def test_unknown_version() -> None:
    with pytest.raises(ValueError, match="unsupported wattmetre format version 4"):
        WattmetreAggregator("wm", version=4)


# --- mapping file ----------------------------------------------------------------------

def test_load_mapping(mapping_file: Path) -> None:
    assert load_mapping(mapping_file) == {"wm-port1": "node-1", "wm-port2": "node-1",
                                          "wm-port3": "node-3", "wm2-port0": "other-node"}


def test_empty_mapping_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing mapped yet\n")
    assert load_mapping(path) == {}


@pytest.mark.parametrize(("content", "reason"), [
    ("node-1: [wm-port1\n", "invalid YAML"),
    ("- wm-port1\n", "expected a mapping of node"),
    ("node-1: {a: 1}\n", "entry 'node-1': expected a list"),
    ("node-1: []\n", "entry 'node-1': expected a list"),
    ("node-1: [wm-port1, wm-p2]\n", "entry 'node-1': 'wm-p2' is not <wattmetre>-port<N>"),
    ("node-1: [wm-port01]\n", "entry 'node-1': 'wm-port01' is not"),
    ("node-1: [3]\n", "entry 'node-1': 3 is not"),
    ("7: [wm-port1]\n", "entry 7: node name must be a non-empty string"),
    ("node-1: [wm-port1]\nnode-2: [wm-port2, wm-port1]\n",
     "entry 'node-2': wm-port1 is already mapped to 'node-1'"),
])
def test_mapping_errors_name_file_and_entry(tmp_path: Path, content: str, reason: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(content)
    with pytest.raises(ValueError, match=reason) as excinfo:
        load_mapping(path)
    assert str(excinfo.value).startswith(f"{path}: ")


def test_missing_mapping_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.yaml"
    with pytest.raises(ValueError, match=f"{path}: cannot read mapping file"):
        load_mapping(path)


def test_mapping_of_another_wattmetre_is_warned(caplog: pytest.LogCaptureFixture) -> None:
    WattmetreAggregator("wm9", mapping={"wm-port1": "node-1"})
    assert "maps no port of this wattmetre" in caplog.text


# --- aggregation -----------------------------------------------------------------------

@pytest.mark.parametrize("version", [2, 3])
def test_one_hz_means_stamped_mid_second(version: int, mapping_file: Path) -> None:
    agg = WattmetreAggregator("wm", version, load_mapping(mapping_file))
    readings = run(agg, gen(version=version, ports=4, seconds=3))
    assert len(readings) == 12
    expected = [(T0_US + second * 1_000_000 + MID, f"wm-port{port}", full_second_mean(port, second))
                for second in range(3) for port in range(4)]
    assert [(r.timestamp_us, r.device_id, r.value) for r in readings] == expected
    assert {r.metric_id for r in readings} == {METRIC_ID}
    assert agg.counters() == {"lines": 150, "frames": 150, "not_ok": 0, "malformed": 0,
                              "readings": 12, "gaps": 0, "missing_seconds": 0, "backwards": 0}


def test_alias_labels_from_mapping_file(mapping_file: Path) -> None:
    agg = WattmetreAggregator("wm", 2, load_mapping(mapping_file))
    labels = {r.device_id: r.labels for r in run(agg, gen(ports=5, seconds=1))}
    assert labels == {"wm-port0": {}, "wm-port1": {"_device_alias": "node-1"},
                      "wm-port2": {"_device_alias": "node-1"},
                      "wm-port3": {"_device_alias": "node-3"}, "wm-port4": {}}


def test_readings_are_emitted_when_the_second_ends() -> None:
    agg = WattmetreAggregator("wm")
    lines = gen(ports=2, seconds=2)
    assert all(agg.feed_line(line) == [] for line in lines[:50])
    first = agg.feed_line(lines[50])  # first frame of the next second closes the previous one
    assert [(r.timestamp_us, r.value) for r in first] == [
        (T0_US + MID, full_second_mean(0, 0)), (T0_US + MID, full_second_mean(1, 0))]


def test_flush_emits_the_partial_last_second() -> None:
    agg = WattmetreAggregator("wm")
    lines = gen(ports=2, seconds=2.5)
    readings = run(agg, lines, flush=False)
    assert len(readings) == 4
    last = agg.flush()
    # frames 100..124: positions 0..24 of second 2
    assert [(r.timestamp_us, r.device_id, r.value) for r in last] == [
        (T0_US + 2_000_000 + MID, f"wm-port{port}", 100 + port + 0.5 * 12 + 0.25 * 2)
        for port in range(2)]
    assert agg.flush() == []
    assert agg.readings == 6


@pytest.mark.parametrize("version", [2, 3])
def test_malformed_lines_are_counted_not_fatal(version: int,
                                               caplog: pytest.LogCaptureFixture) -> None:
    agg = WattmetreAggregator("wm", version)
    lines = gen(version=version, ports=3, seconds=2, bad_every=10)
    readings = run(agg, lines)
    assert agg.malformed == 10 and agg.frames == 100 and agg.lines == 110
    assert [r.value for r in readings] == [full_second_mean(p, s) for s in range(2)
                                           for p in range(3)]
    assert "wm: skipped malformed line 11:" in caplog.text


@pytest.mark.parametrize("version", [2, 3])
def test_lines_of_another_port_count_than_the_stream_are_malformed(version: int) -> None:
    agg = WattmetreAggregator("wm", version)
    lines = gen(version=version, ports=4, seconds=2)
    stamp = lines[10].split(",")[2 if version == 2 else 0]
    numeric = (f"1,2,{stamp},OK," + ",".join(["7"] * 15_000) if version == 2 else
               f"{stamp},true," + ",".join(["7"] * 30_009))  # 60 KB, all numeric
    wide = ",".join(lines[20].split(",")[:4] + ["1"] * 8) if version == 2 else \
        ",".join(lines[20].split(",")[:6] + ["1"] * 8 + lines[20].split(",")[-6:])
    readings = run(agg, [*lines[:10], numeric, *lines[10:20], wide, *lines[20:]])
    assert {r.device_id for r in readings} == {f"wm-port{p}" for p in range(4)}
    assert agg.malformed == 2 and agg.frames == 100


def test_a_damaged_first_line_does_not_set_the_port_count() -> None:
    agg = WattmetreAggregator("wm", 2)
    lines = gen(ports=4, seconds=1)
    damaged = lines[0].replace(",OK,", ",OK,1,2,3,4,5,")  # 9 ports, all numeric
    readings = run(agg, [damaged, *lines[1:]])
    assert {r.device_id for r in readings} == {f"wm-port{p}" for p in range(4)}
    assert (agg.malformed, agg.frames) == (1, 49)


def test_a_real_change_of_port_count_is_taken_after_a_second() -> None:
    agg = WattmetreAggregator("wm", 2)
    before = gen(ports=2, seconds=1)
    after = gen(ports=3, seconds=2, start=T0 + 1)
    readings = run(agg, [*before, *after[:30], *before[:5], *after[30:]])
    # 30 frames of 3 ports then 2-port ones: damaged lines; then 70 in a row: the new count
    assert agg.malformed == 30 and agg.frames == 50 + 5 + 70
    series = by_device(readings)
    assert len(series["wm-port2"]) == 2  # seconds 1 (20 frames, after the switch) and 2
    assert agg.flush() == []


def test_expected_port_count_catches_short_lines() -> None:
    agg = WattmetreAggregator("wm", ports=3)
    lines = gen(ports=3, seconds=1)
    short = lines[10].rsplit(",", 1)[0]  # a line cut after port 1
    run(agg, [*lines[:10], short, *lines[10:]])
    assert agg.malformed == 1 and agg.frames == 50


def test_not_ok_frames_are_counted_and_left_out_of_means() -> None:
    agg = WattmetreAggregator("wm", 3)
    readings = run(agg, gen(version=3, ports=2, seconds=1, not_ok_every=5))
    assert agg.not_ok == 10 and agg.frames == 40 and agg.malformed == 0
    kept = [j for j in range(50) if j % 5 != 4]
    assert [r.value for r in readings] == [
        sum(power(port, j) for j in kept) / len(kept) for port in range(2)]


def test_missing_values_are_left_out_of_means() -> None:
    agg = WattmetreAggregator("wm")
    readings = run(agg, gen(ports=2, seconds=1, missing_every=2))
    # missing: frame 1 port 0, frame 3 port 1, frame 5 port 0, ... (frames 2m+1, port m % 2)
    for port, reading in enumerate(readings):
        kept = [j for j in range(50) if not (j % 2 == 1 and (j // 2) % 2 == port)]
        assert reading.value == sum(power(port, j) for j in kept) / len(kept)


def test_port_with_no_value_in_a_second_gets_no_reading() -> None:
    agg = WattmetreAggregator("wm")
    lines = [f"{j},0,1700000000.{j:02d},OK,100,nan" for j in range(10)]
    assert [(r.device_id, r.value) for r in run(agg, lines)] == [("wm-port0", 100.0)]


def test_gaps_are_counted_and_each_second_keeps_its_mean() -> None:
    agg = WattmetreAggregator("wm")
    lines = gen(ports=1, seconds=2) + gen(ports=1, seconds=1, start=T0 + 5)
    readings = run(agg, lines)
    assert [(r.timestamp_us, r.value) for r in readings] == [
        (T0_US + MID, full_second_mean(0, 0)), (T0_US + 1_000_000 + MID, full_second_mean(0, 1)),
        (T0_US + 5_000_000 + MID, full_second_mean(0, 0))]
    assert (agg.gaps, agg.missing_seconds, agg.backwards) == (1, 3, 0)


def test_timestamps_going_back_lose_nothing(caplog: pytest.LogCaptureFixture) -> None:
    agg = WattmetreAggregator("wm")
    lines = gen(ports=1, seconds=1, start=T0 + 10) + gen(ports=1, seconds=1)
    readings = run(agg, lines)
    assert [(r.timestamp_us, r.value) for r in readings] == [
        (T0_US + 10_000_000 + MID, full_second_mean(0, 0)), (T0_US + MID, full_second_mean(0, 0))]
    assert (agg.backwards, agg.gaps) == (1, 0)
    assert "timestamp went back" in caplog.text


def test_step_back_within_a_second_is_counted() -> None:
    agg = WattmetreAggregator("wm")
    lines = ["0,0,1700000000.5,OK,100", "1,0,1700000000.4,OK,102", "2,0,1700000000.6,OK,104"]
    assert [r.value for r in run(agg, lines)] == [102.0]
    assert agg.backwards == 1


def test_huge_values_do_not_break_the_mean() -> None:
    agg = WattmetreAggregator("wm")
    readings = run(agg, ["0,0,1700000000.1,OK,1e308", "1,0,1700000000.2,OK,1e308"])
    assert [r.value for r in readings] == [math.inf]


# --- promotion: raw pass-through -------------------------------------------------------

def test_promoted_node_ports_pass_every_sample(mapping_file: Path) -> None:
    agg = WattmetreAggregator("wm", 2, load_mapping(mapping_file))
    agg.set_promoted({"node-1", "unrelated"})
    series = by_device(run(agg, gen(ports=4, seconds=2)))
    for port in (1, 2):  # both ports of node-1
        assert series[f"wm-port{port}"] == [(frame_us(i), power(port, i)) for i in range(100)]
    for port in (0, 3):
        assert series[f"wm-port{port}"] == [
            (T0_US + s * 1_000_000 + MID, full_second_mean(port, s)) for s in range(2)]
    assert agg.readings == 2 * 100 + 2 * 2


def test_raw_readings_carry_the_alias(mapping_file: Path) -> None:
    agg = WattmetreAggregator("wm", 3, load_mapping(mapping_file))
    agg.set_promoted(["node-1"])
    readings = run(agg, gen(version=3, ports=3, seconds=1))
    raw = [r for r in readings if r.device_id == "wm-port2"]
    assert len(raw) == 50 and all(r.labels == {"_device_alias": "node-1"} for r in raw)
    assert all(r.metric_id == METRIC_ID for r in readings)


def test_port_promoted_by_its_own_device_id() -> None:
    agg = WattmetreAggregator("wm")
    agg.set_promoted({"wm-port0"})
    series = by_device(run(agg, gen(ports=2, seconds=1, missing_every=2)))
    # port 0 has no value at frames 1, 5, 9, ...: those samples are skipped, not stored as NaN
    assert series["wm-port0"] == [(frame_us(i), power(0, i)) for i in range(50) if i % 4 != 1]
    assert len(series["wm-port1"]) == 1


def test_all_ports_promoted() -> None:
    agg = WattmetreAggregator("wm")
    agg.set_promoted({"wm-port0", "wm-port1"})
    series = by_device(run(agg, gen(ports=2, seconds=1)))
    assert series == {f"wm-port{port}": [(frame_us(i), power(port, i)) for i in range(50)]
                      for port in range(2)}


def test_promotion_switching_mid_second_accounts_every_sample(mapping_file: Path) -> None:
    agg = WattmetreAggregator("wm", 2, load_mapping(mapping_file))
    lines = gen(ports=2, seconds=3)
    readings: list[Reading] = []
    for frame, line in enumerate(lines):
        if frame == 25:
            agg.set_promoted({"node-1"})  # 1 Hz -> raw in the middle of second 0
        if frame == 80:
            agg.set_promoted(set())  # raw -> 1 Hz in the middle of second 1
        readings += agg.feed_line(line)
    readings += agg.flush()
    series = by_device(readings)
    raw = [(frame_us(i), power(1, i)) for i in range(25, 80)]
    means = [(T0_US + MID, sum(power(1, i) for i in range(25)) / 25),
             (T0_US + 1_000_000 + MID, sum(power(1, i) for i in range(80, 100)) / 20),
             (T0_US + 2_000_000 + MID, full_second_mean(1, 2))]
    assert sorted(series["wm-port1"]) == sorted(raw + means)
    # no sample lost or counted twice: 150 = 55 raw + 25 + 20 + 50 averaged
    assert len(raw) + 25 + 20 + 50 == len(lines)
    assert series["wm-port0"] == [
        (T0_US + s * 1_000_000 + MID, full_second_mean(0, s)) for s in range(3)]


# --- the generator itself --------------------------------------------------------------

def test_generator_realtime_uses_the_clock() -> None:
    before_us = time.time_ns() // 1000
    lines = gen(version=2, ports=2, rate=50, seconds=0.2, realtime=True)
    after_us = time.time_ns() // 1000
    stamps = [parse_v2(line)[0] for line in lines]
    assert len(stamps) == 10 and stamps == sorted(stamps)
    assert before_us <= stamps[0] and stamps[-1] <= after_us


@pytest.mark.parametrize("version", [2, 3])
def test_fuzzed_streams_never_raise_and_account_for_every_line(version: int) -> None:
    """1,500 mutated streams per format (seeded): every line is a frame, a not-OK frame or
    malformed, no series beyond the stream's ports appears, no value is infinite."""
    base = gen(version=version, ports=4, seconds=1)
    rng = random.Random(version)
    pieces = [",", "", "nan", "inf", "-1e309", "OK", "true", "\x00", "9" * 400, "1,2,3,4,5",
              ".", "-", "١"]
    for _ in range(1500):
        lines = list(base[:20])
        for _ in range(rng.randint(1, 6)):
            n = rng.randrange(len(lines))
            fields = lines[n].split(",")
            fields[rng.randrange(len(fields))] = rng.choice(pieces)
            lines[n] = ",".join(fields) if rng.random() < 0.9 else lines[n] * 3
        agg = WattmetreAggregator("wm", version)
        readings = run(agg, lines)
        assert agg.lines == agg.frames + agg.not_ok + agg.malformed == len(lines)
        assert {r.device_id for r in readings} <= {f"wm-port{p}" for p in range(4)}
        assert all(math.isfinite(r.value) for r in readings)
