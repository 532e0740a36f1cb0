"""Command-line and YAML options for every kwollect tool, through pyonf (reference style).

Secrets never need to be on the command line: every ``<name>_password`` option has a
``<name>_password_file`` twin whose file content wins when given.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pyonf import pyonf

from kwollect.errors import KwollectError


class OptionError(KwollectError, ValueError):
    """A bad option value; the message names the option."""


def load_options(defaults: dict[str, Any], argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Defaults < YAML file (first positional argument) < --options; then secret files."""
    conf = pyonf(dict(defaults), argv=list(argv) if argv is not None else sys.argv[1:])
    for key in list(conf):
        if key.endswith("_file") and key[:-5] in conf and conf[key]:
            path = Path(conf[key])
            try:
                conf[key[:-5]] = path.read_text().strip()
            except OSError as exc:
                raise OptionError(f"{key}: cannot read {path}: {exc.strerror}") from exc
    return conf


def positive_int(conf: dict[str, Any], key: str) -> int:
    value = conf[key]
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise OptionError(f"{key} must be a positive integer, got {value!r}")
    return value


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def tool_options(prog: str, defaults: dict[str, Any], argv: Sequence[str] | None,
                 check: Callable[[dict[str, Any]], object] | None = None) -> dict[str, Any] | None:
    """A command-line tool's options, checked, with logging set up at their log_level.

    Returns None, after printing what is wrong to stderr, when the options are bad; the tool
    then exits with status 2.
    """
    try:
        conf = load_options(defaults, argv)
        if check is not None:
            check(conf)
    except (OptionError, ValueError) as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return None
    logging.basicConfig(level=str(conf.get("log_level", "warning")).upper(), format=LOG_FORMAT)
    return conf
