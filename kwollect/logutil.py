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


def excerpt(text: object, limit: int = 200) -> str:
    """`text` made safe for a log line or a terminal: printable and bounded.

    Control characters, NUL bytes and lone surrogates (from undecodable file names) are
    escaped, and anything beyond `limit` characters is cut, with the full length said, so
    a 1 MB label or a binary reply never floods a log nor makes printing it fail.
    """
    shown = str(text)
    if len(shown) > 4 * limit:
        shown = shown[:4 * limit]
    shown = shown.encode("utf-8", "backslashreplace").decode("utf-8")
    if not shown.isprintable():
        shown = "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in shown)
    full = len(str(text))
    if len(shown) > limit or full > 4 * limit:
        return f"{shown[:limit]}... ({full} characters)"
    return shown


class RateLimitFilter(logging.Filter):
    """A logging filter passing each (logger, message template) at most once per interval.

    For loggers of libraries that log a fault per occurrence (asyncio's accept errors when
    file descriptors run out, aiohttp's per-connection errors): measured before it, 1,100
    half-open connections made the API write 175,788 log lines in 35 s.
    """

    def __init__(self, interval: float = 60.0) -> None:
        super().__init__()
        self._interval = interval
        self._last: dict[tuple[str, object], float] = {}
        self._suppressed: dict[tuple[str, object], int] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, record.msg)
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last < self._interval:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return False
        self._last[key] = now
        suppressed = self._suppressed.pop(key, 0)
        if suppressed:
            record.msg = f"{record.msg} ({suppressed} similar messages suppressed)"
        return True
