"""Which optional metrics are promoted, from the `promoted_metrics` table.

A metric is promoted for a device when a row names the device (or the metric's
`_device_alias`) and its regular expression fully matches the metric name (NULL matches
every name); every row of a device counts.  The table is re-read about every second by
the caller; when a read fails the last known set is kept, so a database outage never
stops or starts the collection of optional metrics.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable

from kwollect.logutil import RateLimitedLog

log = logging.getLogger("kwollect.collect.promotion")
PROMOTED_QUERY = "SELECT device_id, metric_id FROM promoted_metrics"


class Promotions:
    """The current promoted set, with a cache of answers that lives until it changes."""

    def __init__(self) -> None:
        self._rows: frozenset[tuple[str, str | None]] = frozenset()
        self._patterns: dict[str, list[re.Pattern[str]]] = {}
        self._answers: dict[tuple[str, str | None, str], bool] = {}
        self.version = 0
        self._bad = RateLimitedLog(log, 600)

    def update(self, rows: Iterable[tuple[str, str | None]]) -> bool:
        """Replace the set; returns whether it changed."""
        rows = frozenset((str(d), m) for d, m in rows)
        if rows == self._rows:
            return False
        patterns: dict[str, list[re.Pattern[str]]] = {}
        for device, regex in rows:
            try:
                pattern = re.compile(regex if regex is not None else ".*")
            except re.error as exc:
                self._bad.warning(("regex", device, regex),
                                  "promoted_metrics row (%s, %r) ignored: bad regex: %s",
                                  device, regex, exc)
                continue
            patterns.setdefault(device, []).append(pattern)
        self._rows, self._patterns, self._answers = rows, patterns, {}
        self.version += 1
        return True

    def is_promoted(self, device_id: str, alias: str | None, name: str) -> bool:
        key = (device_id, alias, name)
        answer = self._answers.get(key)
        if answer is None:
            candidates = self._patterns.get(device_id, [])
            if alias:
                candidates = candidates + self._patterns.get(alias, [])
            answer = any(p.fullmatch(name) for p in candidates)
            self._answers[key] = answer
        return answer
