"""The kwollector's health endpoint is Prometheus' exposition format, read by its own parser."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from kwollect.collect.scheduler import TargetStats
from kwollect.collect.selfmetrics import prometheus_text, self_readings

WRITER_STATS = {"submitted": 10, "inserted": 8, "dropped": 0, "queue_rows": 2, "online": True,
                "last_error": "", "copy_latency_s": 0.01}


def two_credential_groups() -> list[TargetStats]:
    """Two SNMP communities on one agent: one target name, two targets."""
    return [TargetStats("snmp://pdu-1:161", polls=5, values=50),
            TargetStats("snmp://pdu-1:161", polls=3, values=6, errors=1),
            TargetStats("ipmisensor://node-1-bmc", polls=1, values=1)]


def test_exposition_has_type_help_and_one_series_per_label_set():
    text = prometheus_text(42, WRITER_STATS, two_credential_groups())
    assert "# TYPE kwollector_polls_total counter" in text
    assert "# HELP kwollector_polls_total per target: polls answered" in text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert families["kwollector_values_collected"].type == "counter"
    assert families["kwollector_writer_queue_rows"].type == "gauge"
    assert families["kwollector_writer_online"].samples[0].value == 1.0
    assert families["kwollector_poll_latency_seconds"].type == "gauge"
    series = [(s.name, tuple(sorted(s.labels.items())))
              for f in families.values() for s in f.samples]
    assert len(series) == len(set(series))
    polls = {(s.labels["target"], s.labels["credentials"]): s.value
             for s in families["kwollector_polls"].samples}
    assert polls == {("snmp://pdu-1:161", "1"): 5.0, ("snmp://pdu-1:161", "2"): 3.0,
                     ("ipmisensor://node-1-bmc", "1"): 1.0}
    for family in families.values():
        assert family.documentation and family.type in ("counter", "gauge"), family


def test_stored_readings_have_the_exposed_names_and_no_duplicate_series():
    readings = self_readings("kwollector-x", 1, 42, WRITER_STATS, two_credential_groups())
    keys = [(r.metric_id, tuple(sorted(r.labels.items()))) for r in readings]
    assert len(keys) == len(set(keys))
    names = {r.metric_id for r in readings}
    assert {"kwollector_writer_inserted_total", "kwollector_writer_queue_rows",
            "kwollector_polls_total", "kwollector_values_collected_total"} <= names
