"""The kwollector's own health, as readings stored under its own device and as a
Prometheus exposition: values collected, the writer's counters (inserted, spooled,
dropped, queue and spool depth) and state (``kwollector_writer_online``, 1 or 0, to alert
on), and per target polls, errors, timeouts, overruns, missed ticks and poll latency.

One table (`_samples`) feeds both, so a stored metric and the exposed series have the same
name: counters end in ``_total`` (so ``as_rate=auto`` turns them into rates), gauges do not.
The exposition is written by prometheus_client (TYPE and HELP lines, escaping), not by
hand.  Per-target series carry ``target`` (scheme://host:port, no credentials) and
``credentials``: the rank (1, 2, ...) of the credential set among those polling the same
address, so that two credential groups on one host (two SNMP communities, two BMC users)
are two series, with no secret in any label.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from prometheus_client.core import CollectorRegistry, CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector

from kwollect.collect.scheduler import TargetStats
from kwollect.model import Reading

PREFIX = "kwollector_"
TARGET_LABELS = ("target", "credentials")

WRITER_HELP: dict[str, tuple[str, str]] = {
    # writer stats key -> (kind, help)
    "submitted": ("counter", "readings handed to the writer"),
    "inserted": ("counter", "readings written to the database"),
    "replayed": ("counter", "readings written to the database from the spool"),
    "spooled": ("counter", "readings written to the spool"),
    "dropped": ("counter", "readings lost (spool full, invalid, refused by the database)"),
    "already_written": ("counter", "batches found already written when sent again"),
    "batches": ("counter", "batches written to the database"),
    "series_lookups": ("counter", "series ids asked to the database"),
    "partitions_ensured": ("counter", "partitions created or checked ahead of rows"),
    "queue_rows": ("gauge", "readings waiting in memory"),
    "spool_bytes": ("gauge", "size of the spool on disk, in bytes"),
    "spool_batches": ("gauge", "batches waiting in the spool"),
    "spool_corrupt_records": ("gauge", "damaged spool records found and skipped"),
    "series_cached": ("gauge", "series whose database id is cached"),
    "online": ("gauge", "1 while the database takes writes, 0 during an outage"),
    "copy_latency_s": ("gauge", "duration of the last COPY, in seconds"),
    "copy_latency_avg_s": ("gauge", "moving average of COPY durations, in seconds"),
}

TARGET_HELP: dict[str, tuple[str, str, str]] = {
    # metric name -> (kind, TargetStats field, help)
    "polls_total": ("counter", "polls", "polls answered"),
    "poll_values_total": ("counter", "values", "values read"),
    "poll_errors_total": ("counter", "errors", "polls that failed"),
    "poll_timeouts_total": ("counter", "timeouts", "polls not answered in time"),
    "poll_overruns_total": ("counter", "overruns",
                            "ticks skipped because the previous poll was still running"),
    "poll_missed_ticks_total": ("counter", "missed_ticks",
                                "ticks missed after a process pause or a clock step"),
    "poll_latency_seconds": ("gauge", "last_latency_s", "duration of the last poll"),
}


@dataclass(frozen=True)
class Sample:
    name: str
    """Without PREFIX; counters end in _total."""
    kind: str
    help: str
    labels: tuple[tuple[str, str], ...]
    value: float


def _writer_name(key: str, kind: str) -> str:
    return f"writer_{key}_total" if kind == "counter" else f"writer_{key}"


def _samples(values_collected: int, writer_stats: Mapping[str, Any],
             targets: Sequence[TargetStats]) -> list[Sample]:
    samples = [Sample("values_collected_total", "counter", "values read from every target",
                      (), float(values_collected))]
    for key, value in sorted(writer_stats.items()):
        if not isinstance(value, int | float):
            continue
        kind, text = WRITER_HELP.get(key, ("gauge", f"writer statistic {key}"))
        samples.append(Sample(_writer_name(key, kind), kind, f"writer: {text}", (),
                              float(value)))
    ranks: dict[str, int] = {}
    for t in targets:
        ranks[t.name] = ranks.get(t.name, 0) + 1
        labels = (("target", t.name), ("credentials", str(ranks[t.name])))
        for name, (kind, attribute, text) in TARGET_HELP.items():
            samples.append(Sample(name, kind, f"per target: {text}", labels,
                                  float(getattr(t, attribute))))
    return samples


def self_readings(device_id: str, timestamp_us: int, values_collected: int,
                  writer_stats: Mapping[str, Any], targets: Sequence[TargetStats]) -> list[Reading]:
    return [Reading(timestamp_us, device_id, PREFIX + s.name, s.value, dict(s.labels))
            for s in _samples(values_collected, writer_stats, targets)]


class _Snapshot(Collector):
    """prometheus_client collector of one set of samples, grouped into metric families."""

    def __init__(self, samples: Sequence[Sample]) -> None:
        self._samples = samples

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        families: dict[str, CounterMetricFamily | GaugeMetricFamily] = {}
        for s in self._samples:
            family = families.get(s.name)
            if family is None:
                labels = [k for k, _ in s.labels]
                if s.kind == "counter":  # the family name goes without _total
                    family = CounterMetricFamily(PREFIX + s.name.removesuffix("_total"),
                                                 s.help, labels=labels)
                else:
                    family = GaugeMetricFamily(PREFIX + s.name, s.help, labels=labels)
                families[s.name] = family
            family.add_metric([v for _, v in s.labels], s.value)
        yield from families.values()


def prometheus_text(values_collected: int, writer_stats: Mapping[str, Any],
                    targets: Sequence[TargetStats]) -> str:
    """The Prometheus text exposition (format 0.0.4) of the kwollector's health."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Snapshot(_samples(values_collected, writer_stats, targets)))
    return generate_latest(registry).decode()
