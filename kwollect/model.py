"""The data every part of kwollect exchanges: metric descriptions in, readings out.

Protocol modules turn a group of `MetricDescription` into a list of `Reading`; the writer
stores readings.  Neither side knows about the other, which keeps protocol code free of
database code.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol


class Reading(NamedTuple):
    """One sample read from a device, as it will be stored in `metrics`."""

    timestamp_us: int
    """Microseconds since the Unix epoch (UTC) at which the value was taken."""
    device_id: str
    metric_id: str
    value: float
    labels: Mapping[str, Any]
    """Treated as immutable: collectors may share one mapping between readings."""


@dataclass(frozen=True, slots=True)
class MetricDescription:
    """One entry of a `metrics.d/*.yaml` file (reference fields plus our own)."""

    name: str
    device_id: str
    url: str
    update_every_ms: int = 10_000
    scale_factor: float | None = None
    labels: Mapping[str, Any] = field(default_factory=dict)
    optional: bool = False
    optional_update_every_ms: int | None = None
    source: str = ""
    """Where the entry came from, e.g. ``pdu.yaml entry 3``, for error messages."""


class Collector(Protocol):
    """Reads one target (a host and its credentials) for a group of metrics.

    The scheduler calls `collect` once per tick for all metrics of the target that share
    a period; implementations batch them into as few requests as the protocol allows and
    stamp each reading with the request/response midpoint.
    """

    async def collect(self, metrics: Sequence[MetricDescription]) -> list[Reading]: ...

    async def close(self) -> None: ...


def now_us() -> int:
    """Current wall-clock time in integer microseconds since the epoch."""
    return time.time_ns() // 1000


def midpoint_us(start_ns: int, end_ns: int) -> int:
    """Timestamp of a request/response exchange: the midpoint, in microseconds."""
    return (start_ns + end_ns) // 2000


def make_reading(desc: MetricDescription, timestamp_us: int, raw: Any,
                 extra_labels: Mapping[str, Any] | None = None,
                 metric_id: str | None = None) -> Reading:
    """Build the stored form of a raw device value.

    Numbers are scaled by the description's `scale_factor`; anything that is not a number
    is stored as ``value = NaN`` with the text in ``labels.value_str`` (reference rule).
    """
    labels: Mapping[str, Any] = desc.labels
    if extra_labels:
        labels = {**labels, **extra_labels}
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8", "replace")
    try:
        value = float(raw)
    except (TypeError, ValueError):
        return Reading(timestamp_us, desc.device_id, metric_id or desc.name, math.nan,
                       {**labels, "value_str": str(raw)})
    if desc.scale_factor is not None:
        value *= desc.scale_factor
    return Reading(timestamp_us, desc.device_id, metric_id or desc.name, value, labels)
