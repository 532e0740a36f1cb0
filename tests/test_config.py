"""metrics.d loading: the reference format, clear errors, broken files skipped."""

from __future__ import annotations

import logging
import math
import random
import textwrap
from pathlib import Path

import pytest

from kwollect.collect.kwollector import DEFAULTS, Kwollector
from kwollect.collect.kwollector import main as kwollector_main
from kwollect.collect.metricsd import ConfigError, load_metrics_dir, parse_entry

REFERENCE_FILE = """\
- name: idrac_power_watth_total
  device_id: node-1
  url: snmp://public@node-1-admin.domain.com/1.3.6.1.4.1.674.10892.5.4.600.60.1.7.1.1
  update_every: 5000

- name: idrac_power_watt
  device_id: node-1
  url: snmp://public@node-1-admin.domain.com/1.3.6.1.4.1.674.10892.5.4.600.30.1.6.1.3
  update_every: 5000
  scale_factor: 0.1
  labels: {_device_alias: node-1-psu}
"""


def write(directory, name, text):
    (directory / name).write_text(textwrap.dedent(text))


def test_reference_file_and_single_mapping(tmp_path):
    write(tmp_path, "node-1.yaml", REFERENCE_FILE)
    write(tmp_path, "pdu", """\
        name: pdu_outlet_power_watt
        device_id: node-2
        url: snmp://public@127.0.0.1:1161/1.3.6.1.4.1.534.6.6.7.6.5.1.3.0.2
        optional: true
        optional_update_every: 20
    """)
    result = load_metrics_dir(tmp_path)
    assert result.errors == [] and result.files_read == 2
    by_name = {d.name: d for d in result.descriptions}
    assert by_name["idrac_power_watt"].scale_factor == 0.1
    assert by_name["idrac_power_watt"].labels == {"_device_alias": "node-1-psu"}
    assert by_name["idrac_power_watt"].update_every_ms == 5000
    pdu = by_name["pdu_outlet_power_watt"]
    assert pdu.optional and pdu.optional_update_every_ms == 20 and pdu.update_every_ms == 10_000


def test_broken_file_is_reported_and_skipped(tmp_path):
    write(tmp_path, "good.yaml", REFERENCE_FILE)
    write(tmp_path, "bad.yaml", """\
        - name: m1
          device_id: node-3
          url: snmp://public@127.0.0.1/1.3.6.1.2.1.1.3.0
          update_evry: 1000
        - name: m2
          url: gopher://node-3/x
          update_every: -5
          labels: [a, b]
    """)
    result = load_metrics_dir(tmp_path)
    assert [d.device_id for d in result.descriptions] == ["node-1", "node-1"]
    assert result.files_skipped == 1
    text = "\n".join(result.errors)
    assert "bad.yaml: entry 1 (m1): unknown field 'update_evry'" in text
    assert "bad.yaml: entry 2 (m2): device_id: required" in text
    assert "bad.yaml: entry 2 (m2): update_every: must be at least 10 ms" in text
    assert "bad.yaml: entry 2 (m2): labels: expected a mapping" in text
    with pytest.raises(ConfigError, match="update_evry"):
        load_metrics_dir(tmp_path, strict=True)


def test_url_errors_name_the_entry_and_hide_secrets(tmp_path):
    write(tmp_path, "bmc.yaml", """\
        - name: bmc_power
          device_id: node-4
          url: ipmisensor://root:sup3rsecret@127.0.0.1:623/
        - name: x
          device_id: node-4
          url: gopher://node-4/x
    """)
    result = load_metrics_dir(tmp_path)
    text = "\n".join(result.errors)
    assert "bmc.yaml: entry 1 (bmc_power): url:" in text
    assert "bmc.yaml: entry 2 (x): url: unsupported URL scheme 'gopher'" in text
    assert "sup3rsecret" not in text


def test_invalid_yaml_and_backups(tmp_path):
    write(tmp_path, "broken.yaml", "- name: [unclosed\n")
    write(tmp_path, "node-1.yaml~", "this is an editor backup: not read\n")
    write(tmp_path, ".hidden.yaml", "neither is this\n")
    write(tmp_path, "empty.yaml", "")
    result = load_metrics_dir(tmp_path)
    assert result.descriptions == [] and result.files_read == 1 and result.files_skipped == 1
    assert result.errors[0].startswith(f"{tmp_path / 'broken.yaml'}: invalid YAML")


def test_later_reference_field_names_are_accepted(tmp_path):
    write(tmp_path, "p.yaml", """\
        - {name: m, device_id: d, url: "prometheus://127.0.0.1:9100/", period: 2000,
           optional_period: 100}
    """)
    (desc,) = load_metrics_dir(tmp_path).descriptions
    assert (desc.update_every_ms, desc.optional_update_every_ms) == (2000, 100)


def test_duplicates_reported_once_kept_once(tmp_path):
    write(tmp_path, "a.yaml", REFERENCE_FILE)
    write(tmp_path, "b.yaml", REFERENCE_FILE)
    result = load_metrics_dir(tmp_path)
    assert len(result.descriptions) == 2
    assert sum("duplicates" in e for e in result.errors) == 2


def test_shipped_examples_are_valid():
    result = load_metrics_dir(Path(__file__).parent.parent / "metrics.d", strict=True)
    schemes = {d.url.split(":", 1)[0] for d in result.descriptions}
    assert schemes == {"snmp", "snmpv3", "ipmisensor", "json+https", "prometheus", "modbus"}


HOSTILE_FILES = {
    "latin1.yaml": "- name: caf\xe9\n".encode("latin-1"),
    "random.yaml": bytes(range(256)) * 4,
    "nested.yaml": b"[" * 20_000 + b"]" * 20_000,
    "nul.yaml": b"- name: a\x00b\n",
    "huge-line.yaml": b"- name: " + b"x" * 1_000_000 + b": :\n",
}


def test_hostile_files_are_one_error_each_and_the_others_load(tmp_path):
    write(tmp_path, "good.yaml", REFERENCE_FILE)
    for name, data in HOSTILE_FILES.items():
        (tmp_path / name).write_bytes(data)
    result = load_metrics_dir(tmp_path)
    assert [d.device_id for d in result.descriptions] == ["node-1", "node-1"]
    assert (result.files_read, result.files_skipped) == (1, len(HOSTILE_FILES))
    assert len(result.errors) == len(HOSTILE_FILES)
    by_file = {Path(e.split(":", 1)[0]).name: e for e in result.errors}
    assert "not UTF-8 text (byte 11 is 0xe9): save it as UTF-8" in by_file["latin1.yaml"]
    assert "not UTF-8 text" in by_file["random.yaml"]
    assert by_file["nested.yaml"].endswith("invalid YAML: while increasing flow level: "
                                           "exceeded maximum nesting depth (line 1, column 1001)")
    assert "invalid YAML" in by_file["nul.yaml"]
    assert all(len(e) < 1000 for e in result.errors)


def test_entries_the_database_could_never_store_are_refused(tmp_path):
    write(tmp_path, "bad.yaml", f"""\
        - {{name: "a\\0b", device_id: d, url: "prometheus://127.0.0.1:9100/"}}
        - {{name: m2, device_id: d, url: "prometheus://127.0.0.1:9100/",
            labels: {{k: "v\\0"}}}}
        - {{name: m3, device_id: d, url: "prometheus://127.0.0.1:9100/",
            labels: {{k: "{'x' * 2100}"}}}}
        - {{name: m4, device_id: d, url: "prometheus://127.0.0.1:9100/", update_every: 1.0e+300}}
        - {{name: m5, device_id: d, url: "prometheus://127.0.0.1:9100/", scale_factor: .nan}}
        - {{name: m6, device_id: d, url: "prometheus://127.0.0.1:9100/", scale_factor: .inf}}
        - {{name: m8, device_id: d, url: "prometheus://127.0.0.1:9100/",
            labels: {{big: {10 ** 30}, inf: .inf}}}}
    """)
    result = load_metrics_dir(tmp_path)
    assert result.descriptions == []
    text = "\n".join(result.errors)
    assert "entry 1 (a\\x00b): name: contains a NUL byte" in text
    assert "entry 2 (m2): labels.k: contains a NUL byte" in text
    assert "entry 3 (m3): labels: 2108 bytes as JSON, the database stores at most 2000" in text
    assert "entry 4 (m4): update_every: must be at most 604800000 ms (a week)" in text
    assert "entry 5 (m5): scale_factor: expected a finite number, got nan" in text
    assert "entry 6 (m6): scale_factor: expected a finite number, got inf" in text
    assert "entry 7 (m8): labels.big: integer out of the 64-bit range" in text
    assert "entry 7 (m8): labels.inf: expected a finite number" in text
    with pytest.raises(ConfigError, match=r"entry 1 \(\\udc80\): name: contains a lone surrogate"):
        parse_entry({"name": "\udc80", "device_id": "d", "url": "prometheus://h:1/"},
                    "entry 1")


def test_check_survives_a_lone_surrogate_and_says_what_is_not_read(tmp_path, capsys):
    write(tmp_path, "s.yaml", '- {name: "\\udc80", device_id: d, url: "prometheus://h:1/"}\n')
    write(tmp_path, "good.yaml", REFERENCE_FILE)
    (tmp_path / "dir.yaml").mkdir()
    (tmp_path / "gone.yaml").symlink_to(tmp_path / "nowhere.yaml")
    (tmp_path / "notes").mkdir()  # a directory without a description name: not worth a word
    assert kwollector_main(["--metrics_dir", str(tmp_path), "--check"]) == 1
    out, err = capsys.readouterr()
    assert "2 metrics from 1 files (1 skipped)" in out
    assert f"warning: {tmp_path / 'dir.yaml'}: is a directory: not read" in err
    assert f"warning: {tmp_path / 'gone.yaml'}: is a dangling symlink: not read" in err
    assert "notes" not in err
    assert "s.yaml: invalid YAML" in err or "name: contains a lone surrogate" in err


async def test_reload_with_a_hostile_file_keeps_the_others(tmp_path, caplog):
    write(tmp_path, "good.yaml", REFERENCE_FILE)
    kwollector = Kwollector({**DEFAULTS, "metrics_dir": str(tmp_path)})
    try:
        kwollector.load()
        (tmp_path / "nested.yaml").write_bytes(HOSTILE_FILES["nested.yaml"])
        (tmp_path / "binary.yaml").write_bytes(HOSTILE_FILES["random.yaml"])
        write(tmp_path, "more.yaml", REFERENCE_FILE.replace("node-1", "node-2"))
        with caplog.at_level(logging.WARNING):
            kwollector.reload()
        assert "4 metrics loaded: 1 polling groups started, 1 kept, 0 stopped" in caplog.text
        assert "nested.yaml: invalid YAML: while increasing flow level" in caplog.text
    finally:
        await kwollector.scheduler.close()


def test_ids_longer_than_the_database_takes_are_refused(tmp_path):
    write(tmp_path, "long.yaml", f"""\
        - {{name: {"m" * 256}, device_id: d, url: "prometheus://127.0.0.1:9100/"}}
        - {{name: ok, device_id: {"é" * 255}, url: "prometheus://127.0.0.1:9100/"}}
    """)
    result = load_metrics_dir(tmp_path)
    assert result.errors and "name: 256 characters long, at most 255 allowed" in result.errors[0]
    assert len(result.errors) == 1


FUZZ_BASE = REFERENCE_FILE + """\
- name: pdu_outlet_power_watt
  device_id: node-2
  url: "snmp://public@127.0.0.1:1161/1.3.6.1.4.1.534.6.6.7.6.5.1.3.0.2"
  optional: true
  labels: {_device_alias: node-2, rack: "r1"}
"""


def test_fuzzed_description_files_end_as_errors_never_exceptions(tmp_path):
    """600 mutations of a valid file (seeded): each loads or is a ConfigError-style error
    naming the file, and anything loaded is something the database can store."""
    rng = random.Random(16)
    pieces = ["\x00", "\t", "{", "[", "]", "}", ":", "- ", "&a", "*a", "!!binary", "\udc80",
              "1e400", ".nan", "\n  ", '"', "\\", "é", "\x85", "\u2028", "? "]
    for n in range(600):
        text = list(FUZZ_BASE)
        for _ in range(rng.randint(1, 8)):
            where = rng.randrange(len(text))
            text[where] = rng.choice(pieces) if rng.random() < 0.7 else ""
        path = tmp_path / f"f{n}.yaml"
        path.write_bytes("".join(text).encode("utf-8", "surrogatepass"))
        result = load_metrics_dir(tmp_path)
        path.unlink()
        assert all(e.startswith(str(path)) for e in result.errors), result.errors
        "\n".join(result.errors).encode("utf-8")
        for d in result.descriptions:
            assert "\x00" not in d.name + d.device_id and len(d.name) <= 255
            assert d.scale_factor is None or math.isfinite(d.scale_factor)
