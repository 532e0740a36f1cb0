"""Reading an operator's YAML file (metrics.d descriptions, the wattmetre port mapping) so
that whatever it holds ends in one line naming the file and what to do, never a traceback.

The C parser of libyaml is used when PyYAML has it: it stops 20,000 nested brackets at
depth 1,000 in 3 ms, where the pure-Python parser recursed for 5.7 s before failing (both
build the same safe objects).  Files are bounded in size before parsing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from kwollect.errors import KwollectError
from kwollect.logutil import excerpt

MAX_FILE_BYTES = 32 << 20
"""Larger files are refused before parsing (PyYAML keeps a file in memory several times
over): 32 MiB holds about 150,000 metric descriptions."""

_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class YamlFileError(KwollectError, ValueError):
    """One line: the file, what is wrong with it and what to do."""


def read_yaml(path: Path, what: str = "file") -> Any:
    """The content of a YAML file; YamlFileError for anything that keeps it from being read."""
    where = excerpt(path, 400)
    try:
        with path.open("rb") as file:
            data = file.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise YamlFileError(f"{where}: cannot read {what}: {exc.strerror}; check its "
                            "permissions (the service user must read it)") from None
    if len(data) > MAX_FILE_BYTES:
        raise YamlFileError(f"{where}: {what} larger than {MAX_FILE_BYTES >> 20} MiB: split "
                            "it into several files")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise YamlFileError(f"{where}: not UTF-8 text (byte {exc.start} is "
                            f"0x{data[exc.start]:02x}): save it as UTF-8 YAML, or move it "
                            "away if it is not a YAML file") from None
    try:
        return yaml.load(text, Loader=_LOADER)  # noqa: S506  # a safe loader
    except yaml.YAMLError as exc:
        raise YamlFileError(f"{where}: invalid YAML: {_describe(exc)}") from None
    except RecursionError:
        raise YamlFileError(f"{where}: invalid YAML: nested too deeply") from None


def _describe(exc: yaml.YAMLError) -> str:
    """PyYAML's error on one line: what and where, without its multi-line excerpt."""
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem:
        what = f"{exc.context}: {exc.problem}" if exc.context else exc.problem
        mark = exc.problem_mark
        if mark is not None:
            what += f" (line {mark.line + 1}, column {mark.column + 1})"
        return excerpt(what, 400)
    return excerpt(" ".join(str(exc).split()), 400)
