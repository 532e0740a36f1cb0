"""Options of every command-line tool: real help, unknown keys refused, typed file values."""

from __future__ import annotations

import re
import textwrap
from collections.abc import Callable

import pytest

from kwollect import cli
from kwollect.collect import kwollector, kwollector_wattmetre
from kwollect.dev.simulators import free_port
from kwollect.migrate import command
from kwollect.options import HELP
from kwollect.store import maintain, setupdb, setupdb_oar

TOOLS: dict[str, Callable[[list[str]], int]] = {
    "kwollector": kwollector.main,
    "kwollector-wattmetre": kwollector_wattmetre.main,
    "kwollect-setup-db": setupdb.main,
    "kwollect-setup-db-oar": setupdb_oar.main,
    "kwollect maintain": lambda argv: cli.main(["maintain", *argv]),
    "kwollect demo": lambda argv: cli.main(["demo", *argv]),
    "kwollect migrate": lambda argv: cli.main(["migrate", *argv]),
    "kwollect get": lambda argv: cli.main(["get", *argv]),
    "kwollect plot": lambda argv: cli.main(["plot", *argv]),
}


def help_text(tool: str, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        TOOLS[tool](["--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("tool", TOOLS)
def test_every_tool_has_its_own_help_with_a_real_line_per_option(tool, capsys):
    text = help_text(tool, capsys)
    assert text.startswith(f"usage: {tool} "), text[:200]
    assert "as float" not in text and "set \"" not in text  # pyonf's boilerplate
    options = re.findall(r"^  (--\w+)", text, re.MULTILINE)
    assert options
    for line in re.findall(r"^  --\w+.*(?:\n {20,}.*)*", text, re.MULTILINE):
        words = line.split(None, 2)
        assert len(words) == 3 and len(words[2].split()) >= 3, line  # option, metavar, help
    chosen = ["  -o"] if tool in ("kwollect get", "kwollect plot") else []  # -o FILE, as curl's
    assert re.findall(r"^  -[a-z]\b", text, re.MULTILINE) == ["  -h", *chosen]


def test_kwollect_without_a_command_lists_the_commands(capsys):
    assert cli.main([]) == 2
    out = capsys.readouterr().out
    assert "maintain" in out and "demo" in out
    assert cli.main(["nonsense"]) == 2
    assert "unknown command 'nonsense'" in capsys.readouterr().err


def test_maintain_without_arguments_uses_its_defaults(monkeypatch, capsys):
    """Once it failed with "can't open 'maintain'": it read its own name as the file."""
    monkeypatch.setenv("PGPORT", str(free_port()))
    assert cli.main(["maintain"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("kwollect maintain: ") and "can't open" not in err
    assert "127.0.0.1" in err or "localhost" in err  # it tried the default database


def test_short_options_are_not_invented(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        kwollector.main(["--metrics_dir", str(tmp_path), "--check", "-p", "9100"])
    assert exit_info.value.code == 2


@pytest.mark.parametrize("typo, fix", [("db_hots", "db_host"), ("spool_dri", "spool_dir")])
def test_unknown_key_in_the_config_file_is_refused_with_key_and_file(tmp_path, capsys,
                                                                      typo, fix):
    config = tmp_path / "kwollector.conf"
    config.write_text(f"metrics_dir: {tmp_path}\n{typo}: x\n")
    assert kwollector.main([str(config), "--check"]) == 2
    err = capsys.readouterr().err
    assert f"{config}: unknown option {typo!r} (did you mean {fix!r}?)" in err


def test_option_of_another_kwollect_tool_is_ignored_with_a_warning(tmp_path, capsys):
    """One file may serve the kwollector and `kwollect maintain` (db_* options)."""
    config = tmp_path / "kwollector.conf"
    (tmp_path / "metrics.d").mkdir()
    config.write_text(f"metrics_dir: {tmp_path / 'metrics.d'}\nevery_seconds: 60\n")
    assert kwollector.main([str(config), "--check"]) == 0
    assert "option 'every_seconds' is not used by this program: ignored" in (
        capsys.readouterr().err)


@pytest.mark.parametrize("line, message", [
    ("timeout_s: soon", "timeout_s: expected a number, got 'soon'"),
    ("target_concurrency: 1.5", "target_concurrency: expected an integer, got 1.5"),
    ("strict: maybe", "strict: expected true or false, got 'maybe'"),
    ("log_level: loud", "log_level: expected debug, info, warning or error, got 'loud'"),
])
def test_bad_value_in_the_config_file_names_key_and_file(tmp_path, capsys, line, message):
    config = tmp_path / "kwollector.conf"
    config.write_text(f"metrics_dir: {tmp_path}\n{line}\n")
    assert kwollector.main([str(config), "--check"]) == 2
    assert message in capsys.readouterr().err


def test_config_file_that_is_not_a_mapping(tmp_path, capsys):
    config = tmp_path / "kwollector.conf"
    config.write_text(textwrap.dedent("""\
        - metrics_dir: /etc
    """))
    assert kwollector.main([str(config), "--check"]) == 2
    assert f"{config}: expected a mapping" in capsys.readouterr().err


def test_every_help_line_is_used_by_a_tool():
    used = set().union(kwollector.DEFAULTS, kwollector_wattmetre.DEFAULTS, setupdb.DEFAULTS,
                       maintain.MAINTAIN_DEFAULTS, command.MIGRATE_DEFAULTS, setupdb_oar.DEFAULTS)
    assert set(HELP) - used == set()
