"""OmegaWatt wattmetre protocol: parse `wattmetre-read` lines and turn frames into readings.

`wattmetre-read` prints one line per measurement frame (about 50 per second) with the
active power of every port.  This module is pure protocol code: it parses lines (formats v2
and v3), loads the port -> node mapping file and aggregates frames into `Reading` objects,
either every raw sample (promoted ports) or one mean per second.  Reading stdin and writing
to the database belong to the caller.

Timestamps and promotion rules (the choices the reference left undocumented):

- Timestamps are parsed from the decimal text into integer microseconds, truncating the
  nanoseconds (no float round-trip, so ``.003000999`` is 3000 µs, not 3001 µs).
- A 1 Hz value is the mean of the samples of one wall-clock second ``[S, S+1)`` and is
  stamped at the middle of that second, ``S + 0.5 s`` (the reference stamped ``S``, which
  shifts averaged power half a second early).  All wattmetres stamp a given second with the
  same instant, so the per-node sum made by the ``_device_alias`` views lines up.
- A port is passed through raw while its node (from the mapping) or its own device id is
  in the promoted set given by the caller.  The set may change between any two frames; it
  applies from the next frame on.  Every sample lands in exactly one place: a raw sample is
  never part of a mean, and the mean of a second covers the samples of that second that
  were not passed through (so a second in which promotion switched has both raw readings
  and a mean over the rest, stamped at mid-second as usual).
- Missing values (``""`` or ``nan``) are skipped: no raw reading and no weight in the mean.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Iterable, Mapping
from itertools import zip_longest
from pathlib import Path
from typing import Any

from kwollect.logutil import RateLimitedLog
from kwollect.model import Reading
from kwollect.yamlfile import read_yaml

METRIC_ID = "wattmetre_power_watt"
VERSIONS = (2, 3)

Frame = tuple[int, list[float]]
"""(timestamp in µs since the epoch, active power in W per port with NaN for no value)."""

_US = 1_000_000
_NAN = math.nan
_MAX_SECONDS_DIGITS = 10  # up to year 2286: rejects glued or garbled timestamps
MAX_PORTS = 256
"""OmegaWatt wattmetres have up to 48 ports; a frame with more is a damaged line."""
START_FRAMES = 3
"""Frames in a row that must agree on the port count at the start (60 ms at 50 Hz), so
that a damaged first line does not set it."""
PORT_CHANGE_FRAMES = 50
"""Frames in a row (a second at 50 Hz) with a new port count that make it the stream's."""
_V3_EXTRA_FIELDS = 11  # timestamp, ok flag, U1-U3 before the port pairs, 6 fields after
_new_reading = tuple.__new__  # Reading(...) without the NamedTuple __new__ wrapper (hot path)

log = logging.getLogger(__name__)


def _short(text: str) -> str:
    return repr(text if len(text) <= 40 else text[:37] + "...")


def parse_timestamp_us(text: str) -> int:
    """Epoch seconds as decimal text (``1609452000.003000021``) -> integer µs, truncated."""
    sec, _, frac = text.partition(".")
    if not (sec.isdigit() and len(sec) <= _MAX_SECONDS_DIGITS) or (frac and not frac.isdigit()):
        raise ValueError(f"bad timestamp {_short(text)}")
    try:
        return int(sec) * _US + (int((frac + "000000")[:6]) if frac else 0)
    except ValueError:  # non-ASCII digits pass isdigit() but not int()
        raise ValueError(f"bad timestamp {_short(text)}") from None


def _powers(fields: list[str]) -> list[float]:
    """Floats for the power fields; "" and "nan" become NaN, anything else non-finite fails."""
    try:
        values = list(map(float, fields))
    except ValueError:
        try:
            values = [float(text) if text else _NAN for text in fields]
        except ValueError:
            values = []
    if values:
        total = sum(values)
        if total - total == 0.0 or not any(map(math.isinf, values)):  # 1st test: all finite
            return values
    raise _bad_power(fields)


def _bad_power(fields: list[str]) -> ValueError:
    """The error for the first power field that is neither a finite number nor missing."""
    for port, text in enumerate(fields):
        try:
            if not math.isinf(float(text or "nan")):
                continue
        except ValueError:
            pass
        return ValueError(f"port {port}: bad number {_short(text)}")
    return ValueError("bad number")


def parse_v2(line: str, ports: int | None = None) -> Frame | None:
    """Parse ``d1,d2,<epoch.ns>,OK,p0,p1,...``; None for a frame the device did not flag OK.

    `ports`, when given, is the expected port count: a line with another count is
    malformed (typically a line cut short).  Raises ValueError for malformed lines.
    """
    fields = line.strip().split(",")
    nfields = len(fields)
    if nfields < 4:
        raise ValueError(f"expected at least 5 fields, got {nfields}")
    if fields[3] != "OK":
        return None
    if nfields < 5:
        raise ValueError("OK frame without port values")
    if ports is not None and nfields - 4 != ports:
        raise ValueError(f"expected {ports} ports, got {nfields - 4}")
    return parse_timestamp_us(fields[2]), _powers(fields[4:])


def parse_v3(line: str, ports: int | None = None) -> Frame | None:
    """Parse ``<epoch>,true,U1,U2,U3,i0,p0,i1,p1,...,<6 fields>``; None for a ``false`` frame.

    Port p's active power is field ``6 + 2p``; the port count is ``(nfields - 11) / 2``.
    Raises ValueError for malformed lines (including a status other than true/false).
    """
    fields = line.strip().split(",")
    nfields = len(fields)
    if nfields < 2:
        raise ValueError(f"expected at least 13 fields, got {nfields}")
    status = fields[1]
    if status != "true":
        if status == "false":
            return None
        raise ValueError(f"bad frame status {_short(status)} (expected true or false)")
    count, odd = divmod(nfields - _V3_EXTRA_FIELDS, 2)
    if count < 1 or odd:
        raise ValueError(f"expected 11 + 2 x ports fields (ports >= 1), got {nfields}")
    if ports is not None and count != ports:
        raise ValueError(f"expected {ports} ports, got {count}")
    return parse_timestamp_us(fields[0]), _powers(fields[6:6 + 2 * count:2])


def parser_for(version: int) -> Callable[[str, int | None], Frame | None]:
    if version == 2:
        return parse_v2
    if version == 3:
        return parse_v3
    raise ValueError(f"unsupported wattmetre format version {version!r} (supported: 2, 3)")


_PORT_DEVICE = re.compile(r"\S+-port(?:0|[1-9][0-9]*)")


def load_mapping(path: str | Path) -> dict[str, str]:
    """Read a mapping file ``node: [<wattmetre_id>-port<N>, ...]`` into port id -> node.

    A node may have several ports (one per PSU); a port may belong to one node only.  The
    file may list ports of several wattmetres.  Raises ValueError naming the file and entry.
    """
    content = read_yaml(Path(path), "mapping file")
    if content is None:
        return {}
    if not isinstance(content, dict):
        raise ValueError(f"{path}: expected a mapping of node: [<wattmetre>-port<N>, ...], "
                         f"got {type(content).__name__}")
    mapping: dict[str, str] = {}
    for node, ports in content.items():
        if not isinstance(node, str) or not node:
            raise ValueError(f"{path}: entry {node!r}: node name must be a non-empty string")
        if isinstance(ports, str):
            ports = [ports]
        if not isinstance(ports, list) or not ports:
            raise ValueError(f"{path}: entry {node!r}: expected a list of "
                             f"<wattmetre>-port<N>, got {ports!r}")
        for port in ports:
            if not isinstance(port, str) or not _PORT_DEVICE.fullmatch(port):
                raise ValueError(f"{path}: entry {node!r}: {port!r} is not "
                                 f"<wattmetre>-port<N> (N without leading zeros)")
            other = mapping.setdefault(port, node)
            if other != node:
                raise ValueError(f"{path}: entry {node!r}: {port} is already mapped to "
                                 f"{other!r}")
    return mapping


class WattmetreAggregator:
    """Turns the frames of one wattmetre into readings: raw for promoted ports, else 1 Hz.

    Feed it lines (`feed_line`) or parsed frames (`feed`); each call returns the readings
    that became final.  Call `flush` at end of input for the last, partial second.  Frames
    are expected in time order; a step back or a skipped second is counted and logged,
    never fatal, and no sample is dropped for it: when the clock goes back, the open second
    is emitted and a new one starts (so a second can then get two means).
    """

    def __init__(self, wattmetre_id: str, version: int = 2,
                 mapping: Mapping[str, str] | None = None, ports: int | None = None,
                 logger: logging.Logger = log) -> None:
        self.wattmetre_id = wattmetre_id
        self._parse = parser_for(version)
        self._expected_ports = ports
        self._ports = ports
        """The stream's port count: `ports`, else learnt from its first frames."""
        self._other_run: list[tuple[int, Frame]] = []
        self._mapping = dict(mapping or {})
        self._promoted: frozenset[str] = frozenset()
        self._rate_log = RateLimitedLog(logger)
        prefix = f"{wattmetre_id}-port"
        if self._mapping and not any(key.startswith(prefix) for key in self._mapping):
            logger.warning("wattmetre %s: the mapping file maps no port of this wattmetre "
                           "(expected entries like %s0)", wattmetre_id, prefix)
        self._device_ids: list[str] = []
        self._nodes: list[str | None] = []
        self._labels: list[Mapping[str, Any]] = []
        self._raw_ports: list[int] = []
        self._all_raw = False
        self._open_second: int | None = None
        self._pending: list[list[float]] = []
        self._last_us: int | None = None
        self.lines = 0
        self.frames = 0
        self.not_ok = 0
        self.malformed = 0
        self.readings = 0
        self.gaps = 0
        self.missing_seconds = 0
        self.backwards = 0

    def counters(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in (
            "lines", "frames", "not_ok", "malformed", "readings", "gaps", "missing_seconds",
            "backwards")}

    def set_promoted(self, device_ids: Iterable[str]) -> None:
        """Device ids (nodes or ports) promoted for `METRIC_ID`; applies from the next frame."""
        self._promoted = frozenset(device_ids)
        self._update_raw_ports()

    def _update_raw_ports(self) -> None:
        promoted = self._promoted
        self._raw_ports = [port for port, (device_id, node) in
                           enumerate(zip(self._device_ids, self._nodes, strict=True))
                           if device_id in promoted or node in promoted]
        self._all_raw = bool(self._device_ids) and len(self._raw_ports) == len(self._device_ids)

    def _grow(self, nports: int) -> None:
        for port in range(len(self._device_ids), nports):
            device_id = f"{self.wattmetre_id}-port{port}"
            node = self._mapping.get(device_id)
            self._device_ids.append(device_id)
            self._nodes.append(node)
            self._labels.append({"_device_alias": node} if node is not None else {})
        self._update_raw_ports()

    def feed_line(self, line: str) -> list[Reading]:
        """Parse and feed one line; malformed lines and not-OK frames are counted, not raised.

        A frame whose port count differs from the stream's is malformed (see `_port_count`).
        """
        self.lines += 1
        try:
            frame = self._parse(line, self._expected_ports)
            if frame is None:
                self.not_ok += 1
                return []
            if len(frame[1]) != self._ports:
                return self._port_count(frame)
        except ValueError as exc:
            self._malformed(self.lines, exc)
            return []
        return self.feed(*frame)

    def _malformed(self, line: int, exc: Exception) -> None:
        self.malformed += 1
        self._rate_log.warning(("malformed", self.wattmetre_id),
                               "wattmetre %s: skipped malformed line %d: %s",
                               self.wattmetre_id, line, exc)

    def _port_count(self, frame: Frame) -> list[Reading]:
        """A frame of another port count than the stream's, or one of the first frames.

        The stream's count is `ports` when given (then any other count is malformed), else
        the count `START_FRAMES` frames in a row agree on at the start.  A frame of another
        count is a damaged line (one all-numeric 60 KB line once made 15,004 series out of
        a 4-port stream), unless the device really changed: `PORT_CHANGE_FRAMES` frames in
        a row with one new count (a second at 50 Hz) make it the stream's count, and those
        frames are then kept.  More than `MAX_PORTS` ports is always malformed.
        """
        count = len(frame[1])
        if count > MAX_PORTS:
            raise ValueError(f"{count} ports: more than {MAX_PORTS}")
        if self._expected_ports is not None:
            raise ValueError(f"expected {self._expected_ports} ports, got {count}")
        run = self._other_run
        if run and len(run[0][1][1]) != count:
            self._end_run()
            run = self._other_run
        run.append((self.lines, frame))
        if len(run) < (START_FRAMES if self._ports is None else PORT_CHANGE_FRAMES):
            return []
        return self._adopt_run()

    def _adopt_run(self) -> list[Reading]:
        """The frames of the pending run set the stream's port count and are fed."""
        run, self._other_run = self._other_run, []
        count = len(run[0][1][1])
        if self._ports is not None:
            self._rate_log.warning(("ports", self.wattmetre_id),
                                   "wattmetre %s: %d frames in a row with %d ports instead of "
                                   "%d: the stream now has %d ports", self.wattmetre_id,
                                   len(run), count, self._ports, count)
        self._ports = count
        out: list[Reading] = []
        for _, kept in run:
            out += self.feed(*kept)
        return out

    def _end_run(self) -> None:
        """Frames of another port count were not followed by enough of their kind."""
        run, self._other_run = self._other_run, []
        expected = (f"expected {self._ports} ports" if self._ports is not None else
                    f"the first {START_FRAMES} frames disagree on the port count")
        for line, frame in run:
            self._malformed(line, ValueError(f"{expected}, got {len(frame[1])}"))

    def feed(self, timestamp_us: int, values: list[float]) -> list[Reading]:
        """Feed one frame; `values` (one per port, NaN = none) is kept, not copied."""
        if self._other_run:
            self._end_run()
        out: list[Reading] = []
        second = timestamp_us // _US
        if second != self._open_second:
            self._start_second(second, timestamp_us, out)
        elif timestamp_us < self._last_us:  # type: ignore[operator]  # set with _open_second
            self._went_back(timestamp_us)
        self._last_us = timestamp_us
        self.frames += 1
        if len(values) > len(self._device_ids):
            self._grow(len(values))
        raw_ports = self._raw_ports
        if raw_ports:
            ids, labels, nvalues = self._device_ids, self._labels, len(values)
            averaged = None if self._all_raw else values.copy()
            for port in raw_ports:
                if port >= nvalues:
                    break
                value = values[port]
                if value == value:
                    out.append(_new_reading(Reading, (timestamp_us, ids[port], METRIC_ID,
                                                      value, labels[port])))
                if averaged is not None:
                    averaged[port] = _NAN
            if averaged is not None:
                self._pending.append(averaged)
        else:
            self._pending.append(values)
        self.readings += len(out)
        return out

    def flush(self) -> list[Reading]:
        """Emit the mean of the open (partial) second, e.g. at end of input."""
        out: list[Reading] = []
        if self._other_run:  # a stream too short to have a count yet takes its frames
            out = self._adopt_run() if self._ports is None else []
            if self._other_run:
                self._end_run()
        means: list[Reading] = []
        self._emit_means(means)
        self._open_second = None
        self.readings += len(means)
        return out + means

    def _start_second(self, second: int, timestamp_us: int, out: list[Reading]) -> None:
        self._emit_means(out)
        self._open_second = second
        last_us = self._last_us
        if last_us is None:
            return
        if timestamp_us < last_us:
            self._went_back(timestamp_us)
        elif second > last_us // _US + 1:
            skipped = second - last_us // _US - 1
            self.gaps += 1
            self.missing_seconds += skipped
            self._rate_log.warning(("gap", self.wattmetre_id),
                                   "wattmetre %s: %d second(s) without frames before %d",
                                   self.wattmetre_id, skipped, second)

    def _went_back(self, timestamp_us: int) -> None:
        self.backwards += 1
        self._rate_log.warning(("backwards", self.wattmetre_id),
                               "wattmetre %s: timestamp went back from %d us to %d us",
                               self.wattmetre_id, self._last_us, timestamp_us)

    def _emit_means(self, out: list[Reading]) -> None:
        pending = self._pending
        if not pending:
            return
        self._pending = []
        stamp = self._open_second * _US + _US // 2  # type: ignore[operator]  # set with pending
        ids, labels = self._device_ids, self._labels
        # sum, not math.fsum: fsum raises on overflow, and 50 terms lose nothing that matters
        for port, column in enumerate(zip_longest(*pending, fillvalue=_NAN)):
            total = sum(column)
            if total == total:
                mean = total / len(column)
            else:
                present = [value for value in column if value == value]
                if not present:
                    continue
                mean = sum(present) / len(present)
            out.append(_new_reading(Reading, (stamp, ids[port], METRIC_ID, mean, labels[port])))
