"""Metric descriptions: reading and validating `metrics_dir` (the reference's metrics.d).

Each file holds a YAML list of descriptions, or one mapping.  Every error is reported,
naming file, entry and field; an invalid entry is skipped and the file's valid entries are
used, so a typo in one entry never stops the collection of the others; `strict` makes any
error fatal.
Whatever a file holds (another encoding, binary data, 20,000 nested brackets, a name with
a NUL byte or a lone surrogate, a period of 1e300 ms) ends as such an error, never as an
exception: a kwollector must start, and reload on SIGHUP, with its other files.  What the
directory holds but is not read (dangling symlinks, directories or special files with
description-like names) is reported as a warning.

At a reload (`previous`: what is running), an entry that became invalid keeps its last good
description, and a file that cannot be read or parsed any more keeps all of its last good
descriptions, each reported with file and entry: a SIGHUP after a typo never stops a metric
that was being collected.  Entries are identified by file and position in the file.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kwollect import protocols
from kwollect.errors import KwollectError
from kwollect.logutil import excerpt
from kwollect.model import MetricDescription
from kwollect.yamlfile import YamlFileError, read_yaml

log = logging.getLogger("kwollect.collect.metricsd")

FIELDS = {"name", "device_id", "url", "update_every", "scale_factor", "labels", "optional",
          "optional_update_every"}
# Names used by later reference releases for the same fields.
ALIASES = {"period": "update_every", "optional_period": "optional_update_every"}
MIN_PERIOD_MS = 10
MAX_PERIOD_MS = 7 * 86_400_000
"""A week: longer periods are typos (and 1e300 ms overflows the scheduler's clock)."""
MAX_LABELS_BYTES = 2000
"""The database refuses a series whose labels take more (sql/020_storage.sql)."""
MAX_ID_CHARS = 255
"""The database refuses longer device and metric ids (kwollect.series_ids)."""
_INT64 = range(-(1 << 63), 1 << 63)
SKIPPED_SUFFIXES = ("~", ".swp", ".bak", ".orig", ".dpkg-old", ".dpkg-new", ".dpkg-dist",
                    ".rpmnew", ".rpmsave")


class ConfigError(KwollectError, ValueError):
    """Errors of one file; `errors` lists each as 'file: entry N (name): field: message'."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors


EntryKey = tuple[str, int]
"""(file path, entry number from 1): how a reload finds an entry's last good description."""


@dataclass
class LoadResult:
    descriptions: list[MetricDescription] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    """Entries of the directory that are not read, e.g. a dangling symlink."""
    files_read: int = 0
    files_skipped: int = 0
    """Files of which nothing could be used (unreadable, invalid YAML, every entry invalid)."""
    kept: list[str] = field(default_factory=list)
    """Entries that became invalid at a reload and keep their last good description."""
    by_entry: dict[EntryKey, MetricDescription] = field(default_factory=dict)
    """What is in use, by entry: give it as `previous` to the next load."""


def description_files(metrics_dir: Path, warnings: list[str] | None = None) -> list[Path]:
    """Every regular, non-hidden file of the directory, but editor and package backups.

    Other entries (directories, dangling symlinks, FIFOs...) are not read; those that could
    be mistaken for descriptions (any symlink, any name ending in .yaml or .yml) are
    appended to `warnings`.
    """
    files = []
    for path in sorted(metrics_dir.iterdir()):
        name = path.name
        if name.startswith(".") or name.endswith(SKIPPED_SUFFIXES):
            continue
        try:
            regular = path.is_file()
        except OSError as exc:
            regular = False
            reason = f"cannot be examined ({exc.strerror})"
        else:
            reason = ("is a dangling symlink" if path.is_symlink() and not path.exists()
                      else "is a directory" if path.is_dir() else "is not a regular file")
        if regular:
            files.append(path)
        elif warnings is not None and (path.is_symlink() or name.endswith((".yaml", ".yml"))):
            warnings.append(f"{excerpt(path)}: {reason}: not read")
    return files


def _text(value: Any, what: str, errors: list[str], max_chars: int | None = None) -> None:
    """Errors for a string the database could not store: NUL, lone surrogate, too long."""
    if not isinstance(value, str):
        return
    if "\0" in value:
        errors.append(f"{what}: contains a NUL byte, which the database cannot store")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        errors.append(f"{what}: contains a lone surrogate (an invalid \\u escape): "
                      "not valid UTF-8")
        return
    if max_chars is not None and len(value) > max_chars:
        errors.append(f"{what}: {len(value)} characters long, at most {max_chars} allowed")


def _period(value: Any, what: str, errors: list[str]) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        errors.append(f"{what}: expected a number of milliseconds, got {excerpt(repr(value))}")
        return None
    if value < MIN_PERIOD_MS:
        errors.append(f"{what}: must be at least {MIN_PERIOD_MS} ms, got {value!r}")
        return None
    if value > MAX_PERIOD_MS:
        errors.append(f"{what}: must be at most {MAX_PERIOD_MS} ms (a week), got {value!r}")
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
        where = f"{where} ({excerpt(name)})"
    errors: list[str] = []
    for key in sorted(set(entry) - FIELDS, key=str):
        errors.append(f"{where}: unknown field {excerpt(repr(key))} "
                      f"(known: {', '.join(sorted(FIELDS))})")
    for key in ("name", "device_id", "url"):
        if not isinstance(entry.get(key), str) or not entry[key].strip():
            errors.append(f"{where}: {key}: required, a non-empty string")
        else:
            _text(entry[key], f"{where}: {key}", errors,
                  None if key == "url" else MAX_ID_CHARS)
    update_every = _period(entry.get("update_every", 10_000), f"{where}: update_every", errors)
    optional_every = _period(entry.get("optional_update_every"),
                             f"{where}: optional_update_every", errors)
    scale = entry.get("scale_factor")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, int | float)
                              or not math.isfinite(scale)):
        errors.append(f"{where}: scale_factor: expected a finite number, "
                      f"got {excerpt(repr(scale))}")
    labels = entry.get("labels") or {}
    if not isinstance(labels, Mapping):
        errors.append(f"{where}: labels: expected a mapping, got {excerpt(labels)}")
    else:
        _labels(labels, f"{where}: labels", errors)
    optional = entry.get("optional", False)
    if not isinstance(optional, bool):
        errors.append(f"{where}: optional: expected true or false, got {excerpt(repr(optional))}")
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
        raise ConfigError([f"{where}: url: {excerpt(exc)}"]) from None
    return desc


def _labels(labels: Mapping[Any, Any], where: str, errors: list[str]) -> None:
    for key, value in labels.items():
        if not isinstance(key, str):
            errors.append(f"{where}: key {excerpt(key)} is not a string")
            continue
        _text(key, f"{where}: key {excerpt(key)}", errors)
        what = f"{where}.{excerpt(key)}"
        if isinstance(value, bool | str):
            _text(value, what, errors)
        elif isinstance(value, int):
            if value not in _INT64:
                errors.append(f"{what}: integer out of the 64-bit range")
        elif isinstance(value, float):
            if not math.isfinite(value):
                errors.append(f"{what}: expected a finite number, got {excerpt(repr(value))}")
        else:
            errors.append(f"{what}: expected a string or number, got {excerpt(value)}")
    if not errors:
        size = len(json.dumps(dict(labels), ensure_ascii=False, separators=(",", ":"))
                   .encode("utf-8"))
        if size > MAX_LABELS_BYTES:
            errors.append(f"{where}: {size} bytes as JSON, the database stores at most "
                          f"{MAX_LABELS_BYTES} per series")


@dataclass
class FileEntries:
    """What one file gave: valid descriptions by entry number, and its errors."""

    descriptions: dict[int, MetricDescription] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    invalid: list[int] = field(default_factory=list)
    """Numbers of the invalid entries."""
    unreadable: bool = False
    """The file as a whole could not be read or parsed."""


def read_file(path: Path) -> FileEntries:
    """Every entry of one file, validated one by one."""
    result = FileEntries()
    where = excerpt(path, 400)
    try:
        content = read_yaml(path, "description file")
    except YamlFileError as exc:
        result.errors.append(str(exc))
        result.unreadable = True
        return result
    if content is None:
        return result
    entries = content if isinstance(content, list) else [content]
    for number, entry in enumerate(entries, 1):
        try:
            result.descriptions[number] = parse_entry(entry, f"{where}: entry {number}")
        except ConfigError as exc:
            result.errors += exc.errors
            result.invalid.append(number)
    return result


def load_file(path: Path) -> list[MetricDescription]:
    """All descriptions of one file, or ConfigError with every problem found in it."""
    entries = read_file(path)
    if entries.errors:
        raise ConfigError(entries.errors)
    return list(entries.descriptions.values())


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


def _keep_last_good(path: Path, entries: FileEntries,
                    previous: Mapping[EntryKey, MetricDescription], result: LoadResult) -> None:
    """At a reload: entries of `path` that became invalid keep their last good description."""
    name = str(path)
    if entries.unreadable:
        lost = sorted(n for f, n in previous if f == name)
    else:
        lost = [n for n in entries.invalid if (name, n) in previous]
    for number in lost:
        desc = previous[(name, number)]
        entries.descriptions[number] = desc
        result.kept.append(f"{excerpt(path, 400)}: entry {number} ({desc.name}, device "
                           f"{desc.device_id}) is invalid now: its last good description "
                           f"is kept")


def load_metrics_dir(metrics_dir: str | Path, strict: bool = False,
                     previous: Mapping[EntryKey, MetricDescription] | None = None,
                     ) -> LoadResult:
    """Read every description file; invalid entries are reported and skipped (or fatal).

    `previous` (the last result's `by_entry`) makes this a reload: see the module docstring.
    """
    directory = Path(metrics_dir)
    result = LoadResult()
    if not directory.is_dir():
        raise ConfigError([f"{directory}: metrics_dir is not a directory"])
    try:
        paths = description_files(directory, result.warnings)
    except OSError as exc:
        raise ConfigError([f"{directory}: cannot list metrics_dir: {exc.strerror}"]) from None
    for path in paths:
        entries = read_file(path)
        result.errors += entries.errors
        if previous:
            _keep_last_good(path, entries, previous, result)
        if entries.errors and not entries.descriptions:
            result.files_skipped += 1
        else:
            result.files_read += 1
        for number, desc in sorted(entries.descriptions.items()):
            result.by_entry[(str(path), number)] = desc
            result.descriptions.append(desc)
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
