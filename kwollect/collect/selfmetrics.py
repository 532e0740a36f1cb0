"""The kwollector's own health, as readings stored under its own device and as a
Prometheus exposition: values collected, the writer's counters (inserted, spooled,
dropped, queue and spool depth) and state (``kwollector_writer_online``, 1 or 0, to alert
on), and per target polls, errors, timeouts, overruns, missed ticks and poll latency."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from kwollect.collect.scheduler import TargetStats
from kwollect.model import Reading

PREFIX = "kwollector_"


def _samples(values_collected: int, writer_stats: Mapping[str, Any],
             targets: Sequence[TargetStats]) -> list[tuple[str, dict[str, str], float]]:
    samples: list[tuple[str, dict[str, str], float]] = [
        ("values_collected_total", {}, float(values_collected))]
    for key, value in sorted(writer_stats.items()):
        if isinstance(value, int | float):  # booleans too: kwollector_writer_online 1 or 0
            samples.append((f"writer_{key}", {}, float(value)))
    for t in targets:
        labels = {"target": t.name}
        samples += [
            ("polls_total", labels, float(t.polls)),
            ("poll_values_total", labels, float(t.values)),
            ("poll_errors_total", labels, float(t.errors)),
            ("poll_timeouts_total", labels, float(t.timeouts)),
            ("poll_overruns_total", labels, float(t.overruns)),
            ("poll_missed_ticks_total", labels, float(t.missed_ticks)),
            ("poll_latency_seconds", labels, t.last_latency_s),
        ]
    return samples


def self_readings(device_id: str, timestamp_us: int, values_collected: int,
                  writer_stats: Mapping[str, Any], targets: Sequence[TargetStats]) -> list[Reading]:
    return [Reading(timestamp_us, device_id, PREFIX + name, value, labels)
            for name, labels, value in _samples(values_collected, writer_stats, targets)]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def prometheus_text(values_collected: int, writer_stats: Mapping[str, Any],
                    targets: Sequence[TargetStats]) -> str:
    lines = []
    for name, labels, value in _samples(values_collected, writer_stats, targets):
        label_text = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
        lines.append(f"{PREFIX}{name}{{{label_text}}} {value!r}" if label_text
                     else f"{PREFIX}{name} {value!r}")
    return "\n".join(lines) + "\n"
