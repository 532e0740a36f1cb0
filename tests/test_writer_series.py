"""The series-id cache: which identities are stored, one handle per series whatever the
mapping object, one database lookup per series."""

from __future__ import annotations

import logging
from collections import OrderedDict

import pytest

from kwollect.logutil import RateLimitedLog
from kwollect.model import Reading
from kwollect.store.writer.series import REJECTED, SeriesCache, series_identity

T0 = 1_767_225_600_000_000
_log = logging.getLogger("test")


def cache() -> SeriesCache:
    return SeriesCache("test", _log, RateLimitedLog(_log))


def test_labels_are_stored_as_json_with_sorted_keys():
    assert series_identity("d", "m", {"b": 1, "a": [2, "x"]}) == ("d", "m", '{"a":[2,"x"],"b":1}')
    assert series_identity("d", "m", OrderedDict(b=1, a=2)) == ("d", "m", '{"a":2,"b":1}')
    assert series_identity("d", "m", {}) == series_identity("d", "m", None) == ("d", "m", "{}")


@pytest.mark.parametrize(("device", "metric", "labels", "why"), [
    ("", "m", {}, "device_id '' is not a non-empty string"),
    ("d", 3, {}, "metric_id 3 is not a non-empty string"),
    ("d\x00", "m", {}, "contains a NUL character"),
    ("d", "m", {"k": "a\x00b"}, "contain a NUL character"),
    ("d", "m", {"k": object()}, "cannot be stored as JSON"),
    ("d\ud800", "m", {}, "surrogate"),
])
def test_identities_postgresql_would_refuse_are_refused_with_the_reason(device, metric, labels,
                                                                        why):
    with pytest.raises(ValueError, match=why):
        series_identity(device, metric, labels)


def test_equal_labels_in_different_mappings_share_one_handle():
    series = cache()
    rows = [Reading(T0, "d", "m", 1.0, {"a": 1}), Reading(T0, "d", "m", 2.0, {"a": 1}),
            Reading(T0, "d", "m", 3.0, {"a": 2}), Reading(T0, "e", "m", 4.0, {"a": 1})]
    handles = series.handles_of(rows)
    assert handles[0] == handles[1] and len(set(handles)) == 3
    assert series.handles_of(rows) == handles
    assert series.handle_for("d", "m", '{"a":1}') == handles[0]
    assert series.unresolved(set(handles)) == sorted(set(handles))


def test_a_series_that_cannot_be_stored_gets_the_rejected_handle_and_a_log_line(caplog):
    series = cache()
    with caplog.at_level(logging.ERROR, logger="test"):
        handles = series.handles_of([Reading(T0, "d", "", 1.0, {}), Reading(T0, "d", "m", 1.0, {})])
    assert handles[0] == REJECTED and handles[1] >= 0
    assert "cannot be stored: metric_id '' is not a non-empty string" in caplog.text


async def test_series_ids_are_looked_up_once_and_a_refused_series_is_singled_out(writer):
    series = cache()
    good = series.handle_for("wrs-good", "m", "{}")
    bad = series.handle_for("wrs-bad", "m", '{"broken": ')  # not JSON: PostgreSQL refuses it
    other = series.handle_for("wrs-other", "m", '{"a":1}')
    await series.resolve(writer, [good, bad, other], timeout=30)
    assert series.sids[bad] == REJECTED
    assert isinstance(series.sids[good], int) and isinstance(series.sids[other], int)
    assert series.sids[good] != series.sids[other]
    assert series.unresolved({good, bad, other}) == [] and series.cached == 2
    again = cache()
    handle = again.handle_for("wrs-good", "m", "{}")
    await again.resolve(writer, [handle], timeout=30)
    assert again.sids[handle] == series.sids[good]
