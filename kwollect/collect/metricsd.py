"""Metric descriptions: reading and validating `metrics_dir` (the reference's metrics.d).

Each file holds a YAML list of descriptions, or one mapping.  A file with any error is
reported (every error, naming file, entry and field) and skipped as a whole, so a typo in
one device's file never stops the collection of the others; `strict` makes it fatal.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kwollect import protocols
from kwollect.model import MetricDescription

log = logging.getLogger("kwollect.collect.metricsd")

FIELDS = {"name", "device_id", "url", "update_every", "scale_factor", "labels", "optional",
          "optional_update_every"}
# Names used by later reference releases for the same fields.
ALIASES = {"period": "update_every", "optional_period": "optional_update_every"}
MIN_PERIOD_MS = 10
SKIPPED_SUFFIXES = ("~", ".swp", ".bak", ".orig", ".dpkg-old", ".dpkg-new", ".dpkg-dist",
                    ".rpmnew", ".rpmsave")


class ConfigError(ValueError):
    """Errors of one file; `errors` lists each as 'file: entry N (name): field: message'."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors


@dataclass
class LoadResult:
    descriptions: list[MetricDescription] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    files_read: int = 0
    files_skipped: int = 0


def description_files(metrics_dir: Path) -> list[Path]:
    """Every regular, non-hidden file of the directory, but editor and package backups."""
    return sorted(p for p in metrics_dir.iterdir()
                  if p.is_file() and not p.name.startswith(".")
                  and not p.name.endswith(SKIPPED_SUFFIXES))


def _period(value: Any, what: str, errors: list[str]) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        errors.append(f"{what}: expected a number of milliseconds, got {value!r}")
        return None
    if value < MIN_PERIOD_MS:
        errors.append(f"{what}: must be at least {MIN_PERIOD_MS} ms, got {value!r}")
        return None
    return int(value)


def parse_entry(entry: Any, where: str) -> MetricDescription:
    """One description, validated; raises ConfigError listing every problem of the entry."""
    if not isinstance(entry, Mapping):
        raise ConfigError([f"{where}: expected a mapping with name, device_id and url, "
                           f"got {type(entry).__name__}"])
    entry = {ALIASES.get(k, k): v for k, v in entry.items()}
    name = entry.get("name")
    if isinstance(name, str) and name:
        where = f"{where} ({name})"
    errors: list[str] = []
    for key in sorted(set(entry) - FIELDS, key=str):
        errors.append(f"{where}: unknown field {key!r} (known: {', '.join(sorted(FIELDS))})")
    for key in ("name", "device_id", "url"):
        if not isinstance(entry.get(key), str) or not entry[key].strip():
            errors.append(f"{where}: {key}: required, a non-empty string")
    update_every = _period(entry.get("update_every", 10_000), f"{where}: update_every", errors)
    optional_every = _period(entry.get("optional_update_every"),
                             f"{where}: optional_update_every", errors)
    scale = entry.get("scale_factor")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, int | float)):
        errors.append(f"{where}: scale_factor: expected a number, got {scale!r}")
    labels = entry.get("labels") or {}
    if not isinstance(labels, Mapping):
        errors.append(f"{where}: labels: expected a mapping, got {labels!r}")
    else:
        for key, value in labels.items():
            if not isinstance(key, str):
                errors.append(f"{where}: labels: key {key!r} is not a string")
            if not isinstance(value, str | int | float | bool) or value is None:
                errors.append(f"{where}: labels.{key}: expected a string or number, "
                              f"got {value!r}")
    optional = entry.get("optional", False)
    if not isinstance(optional, bool):
        errors.append(f"{where}: optional: expected true or false, got {optional!r}")
    if errors:
        raise ConfigError(errors)
    desc = MetricDescription(
        name=entry["name"].strip(), device_id=entry["device_id"].strip(), url=entry["url"].strip(),
        update_every_ms=update_every or 10_000,
        scale_factor=float(scale) if scale not in (None, 0) else None,
        labels=dict(labels), optional=optional, optional_update_every_ms=optional_every,
        source=where)
    try:
        protocols.target_key(desc)
    except ValueError as exc:
        raise ConfigError([f"{where}: url: {exc}"]) from None
    return desc


def load_file(path: Path) -> list[MetricDescription]:
    """All descriptions of one file, or ConfigError with every problem found in it."""
    try:
        content = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror}"]) from None
    except yaml.YAMLError as exc:
        raise ConfigError([f"{path}: invalid YAML: {exc}"]) from None
    if content is None:
        return []
    entries = content if isinstance(content, list) else [content]
    descriptions, errors = [], []
    for number, entry in enumerate(entries, 1):
        try:
            descriptions.append(parse_entry(entry, f"{path}: entry {number}"))
        except ConfigError as exc:
            errors += exc.errors
    if errors:
        raise ConfigError(errors)
    return descriptions


def check_duplicates(descriptions: Iterable[MetricDescription]) -> list[str]:
    seen: dict[tuple[str, str, str], str] = {}
    errors = []
    for desc in descriptions:
        key = (desc.device_id, desc.name, desc.url)
        if key in seen:
            errors.append(f"{desc.source}: duplicates {seen[key]} (same name, device_id "
                          f"and url): ignored")
        else:
            seen[key] = desc.source
    return errors


def load_metrics_dir(metrics_dir: str | Path, strict: bool = False) -> LoadResult:
    """Read every description file; broken files are reported and skipped (or fatal)."""
    directory = Path(metrics_dir)
    result = LoadResult()
    if not directory.is_dir():
        raise ConfigError([f"{directory}: metrics_dir is not a directory"])
    for path in description_files(directory):
        try:
            descriptions = load_file(path)
        except ConfigError as exc:
            result.errors += exc.errors
            result.files_skipped += 1
            continue
        result.files_read += 1
        result.descriptions += descriptions
    duplicates = check_duplicates(result.descriptions)
    if duplicates:
        result.errors += duplicates
        unique: dict[tuple[str, str, str], MetricDescription] = {}
        for desc in result.descriptions:
            unique.setdefault((desc.device_id, desc.name, desc.url), desc)
        result.descriptions = list(unique.values())
    if strict and result.errors:
        raise ConfigError(result.errors)
    return result
