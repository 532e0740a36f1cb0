"""A one-line progress display on stderr: rows, rows/s, ETA; silent when not a terminal."""

from __future__ import annotations

import sys
import time
from typing import TextIO


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class Progress:
    """Redrawn at most 5 times a second.  The ETA comes from the share of the source's time
    span done so far (row counts of a 1.x database are unknown until read)."""

    def __init__(self, stream: TextIO | None = None, enabled: bool | None = None) -> None:
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.rows = 0
        self.fraction = 0.0
        self._start = time.monotonic()
        self._drawn = 0.0

    def update(self, rows: int = 0, fraction: float | None = None) -> None:
        self.rows += rows
        if fraction is not None:
            self.fraction = max(self.fraction, min(1.0, fraction))
        now = time.monotonic()
        if self.enabled and now - self._drawn >= 0.2:
            self._drawn = now
            self.stream.write("\r" + self.line(now) + "\x1b[K")
            self.stream.flush()

    def line(self, now: float | None = None) -> str:
        elapsed = max((now or time.monotonic()) - self._start, 1e-6)
        rate = self.rows / elapsed
        eta = (f"ETA {_duration(elapsed * (1 - self.fraction) / self.fraction)}"
               if self.fraction > 0 else "ETA --:--")
        width = 24
        filled = int(width * self.fraction)
        return (f"[{'#' * filled}{'.' * (width - filled)}] {self.fraction:4.0%} "
                f"{self.rows:,} rows  {rate:,.0f} rows/s  {eta}")

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\r" + self.line() + "\x1b[K\n")
            self.stream.flush()
