"""What can go wrong on the write path: which database errors retrying cannot cure, how an
error is worded, and the count of dropped rows (never silent: counted and logged)."""

from __future__ import annotations

import logging
import math
import time

import asyncpg

DROP_LOG_INTERVAL_S = 60.0
_DATA_SQLSTATE_CLASSES = ("22", "23", "54")


def is_data_error(exc: BaseException) -> bool:
    """True for errors caused by the data sent (retrying cannot help), not by the link."""
    if isinstance(exc, asyncpg.PostgresError):
        return str(exc.sqlstate)[:2] in _DATA_SQLSTATE_CLASSES
    return isinstance(exc, asyncpg.InterfaceError) and isinstance(exc, ValueError)


def describe(exc: BaseException) -> str:
    """The error's type and text, once (``TimeoutError`` rather than ``TimeoutError: ``)."""
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if text != type(exc).__name__ else text


class Drops:
    """Rows lost for good: counted, and logged at most once a minute per reason with the
    number dropped since the last line."""

    def __init__(self, name: str, logger: logging.Logger) -> None:
        self.count = 0
        self._name = name
        self._log = logger
        self._unreported: dict[str, int] = {}
        self._logged_at: dict[str, float] = {}

    def __call__(self, rows: int, reason: str) -> None:
        self.count += rows
        unreported = self._unreported.get(reason, 0) + rows
        now = time.monotonic()
        if now - self._logged_at.get(reason, -math.inf) >= DROP_LOG_INTERVAL_S:
            self._logged_at[reason] = now
            self._log.error("%s: dropped %d row(s) (%d in all): %s", self._name, unreported,
                            self.count, reason)
            unreported = 0
        self._unreported[reason] = unreported
