"""The writer's defaults are written once: the collectors' command-line defaults give the
same options as `WriterOptions()`."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from kwollect.store.writer import CLOSE_TIMEOUT_S, WRITER_DEFAULTS, WriterOptions


def test_the_command_line_defaults_are_the_writer_defaults(monkeypatch, tmp_path):
    monkeypatch.delenv("STATE_DIRECTORY", raising=False)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    options = WriterOptions.from_conf(WRITER_DEFAULTS)
    assert dataclasses.replace(options, spool_dir=None) == WriterOptions()
    # lossless by default: a per-user spool outside systemd (tests/test_kwollector_ops.py)
    assert options.spool_dir == tmp_path / "kwollect" / "kwollector"
    assert WriterOptions.from_conf({**WRITER_DEFAULTS, "spool_dir": "none"}).spool_dir is None
    assert WRITER_DEFAULTS["close_timeout_s"] == CLOSE_TIMEOUT_S
    assert WRITER_DEFAULTS["spool_max_mb"] == 1024


def test_an_empty_spool_dir_means_systemds_state_directory(monkeypatch):
    monkeypatch.setenv("STATE_DIRECTORY", "/var/lib/kwollector:/var/lib/other")
    assert WriterOptions.from_conf(WRITER_DEFAULTS).spool_dir == Path("/var/lib/kwollector")
    conf = {**WRITER_DEFAULTS, "spool_dir": "/srv/spool", "spool_max_mb": 0.5}
    options = WriterOptions.from_conf(conf)
    assert options.spool_dir == Path("/srv/spool") and options.spool_max_bytes == 1 << 19
