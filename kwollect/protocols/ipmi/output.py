"""The lines ``ipmi-sensors --comma-separated-output --output-event-bitmask`` prints."""

from __future__ import annotations

from typing import NamedTuple


class Row(NamedTuple):
    """One line of ``ipmi-sensors --comma-separated-output --output-event-bitmask``."""

    record_id: int
    name: str
    reading: str
    units: str
    event: str

    def value(self) -> float | int | None:
        """The number to store: the reading, a discrete sensor's event bitmask, or None (N/A)."""
        if self.reading != "N/A":
            try:
                return float(self.reading)
            except ValueError:
                return None
        if self.units == "N/A" and self.event.endswith("h"):
            try:
                return int(self.event[:-1], 16)
            except ValueError:
                return None
        return None


def parse_row(text: str) -> Row | None:
    """Parse a CSV sensor line; None for anything else (such as FreeIPMI's messages).

    Names may contain commas, the other columns (type, reading, units, event) cannot, so the
    line is split once from the left and four times from the right.
    """
    rid, sep, rest = text.partition(",")
    if not sep or not rid.isdigit():
        return None
    parts = rest.rsplit(",", 4)
    if len(parts) != 5:
        return None
    name, _type, reading, units, event = parts
    return Row(int(rid), name, reading, units, event)
