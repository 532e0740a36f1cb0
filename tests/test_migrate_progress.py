"""The migration's progress line: rows, rows/s and ETA on a terminal, nothing otherwise."""

from __future__ import annotations

import io

from kwollect.migrate.progress import Progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_on_a_terminal_shows_rows_rate_and_eta():
    out = Terminal()
    progress = Progress(out)
    progress.update(0, 0.0)
    assert "ETA --:--" in out.getvalue()
    progress._drawn = 0.0  # the next update redraws at once
    progress.update(123_456, 0.25)
    progress.close()
    last = out.getvalue().rstrip("\n").split("\r")[-1]
    assert "25%" in last and "123,456 rows" in last and "rows/s" in last
    assert "ETA " in last and "--:--" not in last
    assert out.getvalue().endswith("\n")


def test_progress_is_silent_when_stderr_is_not_a_terminal():
    out = io.StringIO()
    progress = Progress(out)
    progress.update(10, 0.5)
    progress.close()
    assert out.getvalue() == ""
