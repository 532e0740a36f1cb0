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
        self._unreported[reason] = self._unreported.get(reason, 0) + rows
        self._report(reason, time.monotonic())

    def report(self, force: bool = False) -> None:
        """Log the drops not reported yet whose reason was last logged a minute ago (every
        one when `force`, at close): each dropped row is in some line of the log, not only
        the first batch of each minute."""
        now = time.monotonic()
        for reason in [r for r, rows in self._unreported.items() if rows]:
            self._report(reason, now, force)

    def _report(self, reason: str, now: float, force: bool = False) -> None:
        if force or now - self._logged_at.get(reason, -math.inf) >= DROP_LOG_INTERVAL_S:
            self._logged_at[reason] = now
            self._log.error("%s: dropped %d row(s) (%d in all): %s", self._name,
                            self._unreported[reason], self.count, reason)
            self._unreported[reason] = 0
