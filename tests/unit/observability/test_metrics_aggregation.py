"""Worker metrics + master aggregation (the stats channel)."""

from __future__ import annotations

import math

import msgspec
import pytest
from prometheus_client.parser import text_string_to_metric_families

from dispa.observability.metrics import (
    DEFAULT_BUCKETS,
    MetricsAggregator,
    WorkerMetrics,
)


def families(text: str) -> dict:
    return {f.name: f for f in text_string_to_metric_families(text)}


def sample(fams: dict, family: str, sample_name: str, **labels) -> float:
    for s in fams[family].samples:
        if s.name == sample_name and all(s.labels.get(k) == v for k, v in labels.items()) \
                and set(labels) <= set(s.labels):
            if set(s.labels) - set(labels) - {"le"} and sample_name.endswith("_bucket"):
                continue
            return s.value
    raise KeyError((family, sample_name, labels))


def roundtrip(export: dict) -> dict:
    """What the master receives: the export went through msgpack on the stats channel."""
    return msgspec.msgpack.decode(msgspec.msgpack.encode(export))


def two_workers() -> tuple[WorkerMetrics, WorkerMetrics]:
    w1, w2 = WorkerMetrics(), WorkerMetrics()
    for _ in range(3):
        w1.observe_request("a.example", "GET", 200, 0.0004, 10, 100)
    w1.observe_request("a.example", "POST", 502, 0.2)
    for _ in range(2):
        w2.observe_request("a.example", "GET", 200, 0.003, 5, 50)
    w2.observe_request("b.example", "GET", 404, 7.0)
    w1.observe_upstream("10.0.0.1:80", "ok", 0.001)
    w2.observe_upstream("10.0.0.1:80", "timeout", 30.0)
    w1.inc("dispa_retries_total")
    w2.inc("dispa_retries_total", value=2)
    w1.set_gauge("dispa_active_connections", (), 4)
    w2.set_gauge("dispa_active_connections", (), 6)
    return w1, w2


def test_counts_add_up_across_two_workers():
    w1, w2 = two_workers()
    agg = MetricsAggregator()
    agg.update("worker-1", roundtrip(w1.export()))
    agg.update("worker-2", roundtrip(w2.export()))
    fams = families(agg.render_prometheus())
    req = "dispa_requests_total"
    assert sample(fams, "dispa_requests", req, domain="a.example", method="GET",
                  status="200") == 5
    assert sample(fams, "dispa_requests", req, domain="a.example", method="POST",
                  status="502") == 1
    assert sample(fams, "dispa_requests", req, domain="b.example", method="GET",
                  status="404") == 1
    h = "dispa_request_duration_seconds"
    assert sample(fams, h, h + "_count", domain="a.example") == 6
    assert sample(fams, h, h + "_sum", domain="a.example") == pytest.approx(
        3 * 0.0004 + 0.2 + 2 * 0.003)
    assert sample(fams, h, h + "_bucket", domain="a.example", le="0.0005") == 3
    assert sample(fams, h, h + "_bucket", domain="a.example", le="0.005") == 5
    assert sample(fams, h, h + "_bucket", domain="b.example", le="5") == 0
    assert sample(fams, h, h + "_bucket", domain="b.example", le="+Inf") == 1
    assert sample(fams, "dispa_received_bytes", "dispa_received_bytes_total",
                  domain="a.example") == 40
    assert sample(fams, "dispa_sent_bytes", "dispa_sent_bytes_total", domain="a.example") == 400
    assert sample(fams, "dispa_upstream_requests", "dispa_upstream_requests_total",
                  endpoint="10.0.0.1:80", outcome="timeout") == 1
    u = "dispa_upstream_duration_seconds"
    assert sample(fams, u, u + "_count", endpoint="10.0.0.1:80") == 2
    assert sample(fams, "dispa_retries", "dispa_retries_total") == 3
    assert sample(fams, "dispa_active_connections", "dispa_active_connections") == 10
    assert agg.render_json()["requests_total"] == 7


def test_retire_keeps_counters_monotonic_and_drops_gauges():
    w1, w2 = two_workers()
    agg = MetricsAggregator()
    agg.update("worker-1", w1.export())
    agg.update("worker-2", w2.export())
    before = agg.render_json()["requests_total"]
    agg.retire("worker-1")
    assert agg.render_json()["requests_total"] == before
    fams = families(agg.render_prometheus())
    assert sample(fams, "dispa_active_connections", "dispa_active_connections") == 6
    assert sample(fams, "dispa_retries", "dispa_retries_total") == 3

    # The replacement starts from zero under the same key; totals keep growing.
    w1b = WorkerMetrics()
    w1b.observe_request("a.example", "GET", 200, 0.001)
    agg.update("worker-1", w1b.export())
    assert agg.render_json()["requests_total"] == before + 1
    h = "dispa_request_duration_seconds"
    fams = families(agg.render_prometheus())
    assert sample(fams, h, h + "_count", domain="a.example") == 7


def test_worker_replaced_without_retire_is_retired_implicitly():
    agg = MetricsAggregator()
    old = WorkerMetrics()
    for _ in range(5):
        old.observe_request("a", "GET", 200, 0.01)
    agg.update("worker-1", old.export())
    new = WorkerMetrics()
    new.observe_request("a", "GET", 200, 0.01)
    agg.update("worker-1", new.export())  # different instance id, same key
    assert agg.render_json()["requests_total"] == 6


def test_a_stale_export_never_moves_counters_back():
    agg = MetricsAggregator()
    w = WorkerMetrics()
    w.observe_request("a", "GET", 200, 0.01)
    stale = w.export()
    w.observe_request("a", "GET", 200, 0.01)
    fresh = w.export()
    agg.update("worker-1", fresh)
    agg.update("worker-1", stale)  # reply that arrived late
    assert agg.render_json()["requests_total"] == 2


def test_a_lost_reply_loses_nothing_because_exports_are_cumulative():
    agg = MetricsAggregator()
    w = WorkerMetrics()
    w.observe_request("a", "GET", 200, 0.01)
    agg.update("w", w.export())
    w.observe_request("a", "GET", 200, 0.01)
    w.export()  # lost on the way
    w.observe_request("a", "GET", 200, 0.01)
    agg.update("w", w.export())
    assert agg.render_json()["requests_total"] == 3


def test_retire_of_unknown_worker_is_a_no_op():
    MetricsAggregator().retire("nobody")


def test_histogram_buckets_are_cumulative_and_end_with_inf():
    w = WorkerMetrics()
    durations = [0.0001, 0.0005, 0.0007, 0.003, 0.04, 0.9, 3.0, 99.0]
    for d in durations:
        w.observe_request("a", "GET", 200, d)
    agg = MetricsAggregator()
    agg.update("w", w.export())
    text = agg.render_prometheus()
    fam = families(text)["dispa_request_duration_seconds"]
    buckets = [(s.labels["le"], s.value) for s in fam.samples if s.name.endswith("_bucket")]
    les = [math.inf if le == "+Inf" else float(le) for le, _ in buckets]
    assert les == list(DEFAULT_BUCKETS) + [math.inf]
    values = [v for _, v in buckets]
    assert values == sorted(values)
    for le, v in zip(les, values):
        assert v == sum(1 for d in durations if d <= le)  # le is inclusive
    count = [s.value for s in fam.samples if s.name.endswith("_count")][0]
    assert values[-1] == count == len(durations)


def test_label_values_are_escaped():
    w = WorkerMetrics()
    nasty = 'we"ird\\dom\nain'
    w.observe_request(nasty, "GET", 200, 0.01)
    w.inc("dispa_protocol_errors_total", (("status", "400"), ("reason", 'a"b')))
    agg = MetricsAggregator()
    agg.update("w", w.export())
    text = agg.render_prometheus([("dispa_target_health", "Target health.",
                                   {"target": 'x"\\\n', "cluster": "c", "endpoint": "e"}, 1)])
    assert 'domain="we\\"ird\\\\dom\\nain"' in text
    fams = families(text)  # parses
    assert sample(fams, "dispa_requests", "dispa_requests_total", domain=nasty) == 1
    assert sample(fams, "dispa_target_health", "dispa_target_health", target='x"\\\n') == 1
    assert sample(fams, "dispa_protocol_errors", "dispa_protocol_errors_total",
                  reason='a"b') == 1


def test_full_exposition_parses_with_help_and_type_for_every_family():
    w1, w2 = two_workers()
    agg = MetricsAggregator()
    agg.update("worker-1", w1.export())
    agg.update("worker-2", w2.export())
    extra = [
        ("dispa_target_health", "1 if healthy.", {"target": "t1", "cluster": "c",
                                                  "endpoint": "10.0.0.1:80"}, 1),
        ("dispa_target_health", "1 if healthy.", {"target": "t2", "cluster": "c",
                                                  "endpoint": "10.0.0.2:80"}, 0),
        ("dispa_workers", "Live workers.", {}, 2),
        ("dispa_config_reloads_total", "Reloads.", {"result": "ok"}, 3),
    ]
    text = agg.render_prometheus(extra)
    assert text.endswith("\n")
    fams = families(text)
    types = {name: f.type for name, f in fams.items()}
    assert types["dispa_requests"] == "counter"
    assert types["dispa_request_duration_seconds"] == "histogram"
    assert types["dispa_target_health"] == "gauge"
    assert types["dispa_workers"] == "gauge"
    assert types["dispa_config_reloads"] == "counter"
    assert types["dispa_active_connections"] == "gauge"
    for line in text.splitlines():
        if line.startswith("# TYPE"):
            name = line.split()[2]
            assert text.count(f"# TYPE {name} ") == 1  # one block per family
    assert sample(fams, "dispa_target_health", "dispa_target_health", target="t2") == 0


def test_render_json_has_the_same_data():
    w1, w2 = two_workers()
    agg = MetricsAggregator()
    agg.update("worker-1", w1.export())
    agg.update("worker-2", w2.export())
    j = agg.render_json([("dispa_workers", "Live workers.", {}, 2)])
    msgspec.json.encode(j)  # JSON-able
    assert set(j) >= {"counters", "histograms", "gauges", "requests_total"}
    assert j["requests_total"] == 7
    assert {"name": "dispa_workers", "labels": {}, "value": 2} in j["gauges"]
    hist = next(h for h in j["histograms"] if h["labels"] == {"domain": "a.example"})
    assert hist["count"] == 6 and hist["buckets"][-1] == {"le": "+Inf", "count": 6}
    counts = [b["count"] for b in hist["buckets"]]
    assert counts == sorted(counts)


def test_export_is_plain_encodable_data():
    w1, _ = two_workers()
    e = w1.export()
    assert msgspec.json.decode(msgspec.json.encode(e)) == roundtrip(e)


def test_unknown_methods_and_too_many_domains_fold_into_bounded_series():
    w = WorkerMetrics(max_domains=3)
    for i in range(50):
        w.observe_request(f"d{i}.example", "GET", 200, 0.01)
    w.observe_request("d0.example", "BREW", 418, 0.01)
    w.observe_request("d0.example", "BREW", 418, 0.01)
    e = w.export()
    domains = {dict(lab)["domain"] for name, lab, _ in e["counters"]
               if name == "dispa_requests_total"}
    assert domains == {"d0.example", "d1.example", "d2.example", "_other"}
    agg = MetricsAggregator()
    agg.update("w", e)
    fams = families(agg.render_prometheus())
    assert sample(fams, "dispa_requests", "dispa_requests_total", domain="_other",
                  method="GET", status="200") == 47
    assert sample(fams, "dispa_requests", "dispa_requests_total", domain="d0.example",
                  method="OTHER", status="418") == 2
    assert agg.render_json()["requests_total"] == 52


def test_histograms_with_different_buckets_are_merged_onto_the_first_layout():
    a = WorkerMetrics(buckets=(0.1, 1.0))
    b = WorkerMetrics(buckets=(0.05, 0.1, 0.5, 1.0))
    a.observe_request("x", "GET", 200, 0.07)
    b.observe_request("x", "GET", 200, 0.07)
    b.observe_request("x", "GET", 200, 0.3)
    agg = MetricsAggregator()
    agg.update("a", a.export())
    agg.update("b", b.export())
    h = "dispa_request_duration_seconds"
    fams = families(agg.render_prometheus())
    assert sample(fams, h, h + "_bucket", domain="x", le="0.1") == 2
    assert sample(fams, h, h + "_bucket", domain="x", le="1") == 3
    assert sample(fams, h, h + "_count", domain="x") == 3


def test_malformed_export_is_rejected_without_changing_state():
    agg = MetricsAggregator()
    w = WorkerMetrics()
    w.observe_request("a", "GET", 200, 0.01)
    agg.update("w", w.export())
    with pytest.raises(ValueError):
        agg.update("w", {"counters": [["x"]]})
    with pytest.raises(ValueError):
        agg.update("w", "nope")  # type: ignore[arg-type]
    assert agg.render_json()["requests_total"] == 1


@pytest.mark.parametrize("buckets", [(), (1.0, 0.5), (0.1, float("inf")), (0.1, 0.1)])
def test_invalid_buckets_are_rejected(buckets):
    with pytest.raises(ValueError):
        WorkerMetrics(buckets=buckets)


def test_empty_aggregator_renders_empty_but_valid_text():
    agg = MetricsAggregator()
    assert list(text_string_to_metric_families(agg.render_prometheus())) == []
    assert agg.render_json()["requests_total"] == 0
