"""Rate-limited logging, so a device that fails every poll logs once a while, not every time."""

from __future__ import annotations

import logging
import time


class RateLimitedLog:
    """Logs a repeating fault at most once per `interval` seconds per key.

    The first occurrence is logged at once; later ones within the interval are counted and
    the count is reported with the next line that gets through.
    """

    def __init__(self, logger: logging.Logger, interval: float = 60.0) -> None:
        self._logger = logger
        self._interval = interval
        self._last: dict[object, float] = {}
        self._suppressed: dict[object, int] = {}

    def log(self, level: int, key: object, msg: str, *args: object) -> None:
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last < self._interval:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return
        self._last[key] = now
        suppressed = self._suppressed.pop(key, 0)
        if suppressed:
            msg += " (%d similar messages suppressed)"
            args = (*args, suppressed)
        self._logger.log(level, msg, *args)

    def warning(self, key: object, msg: str, *args: object) -> None:
        self.log(logging.WARNING, key, msg, *args)

    def error(self, key: object, msg: str, *args: object) -> None:
        self.log(logging.ERROR, key, msg, *args)

    def forget(self, key: object) -> None:
        """Call when the fault is gone, so its next occurrence is logged at once."""
        self._last.pop(key, None)
        self._suppressed.pop(key, None)
