"""[[monitoring.histogram_buckets]] and [[monitoring.custom_metrics]]: config checks,
bucket changes at runtime, and the custom-metrics sink fed by Exchange records."""

from __future__ import annotations

import pytest

from dispa.config.load import load_config_text
from dispa.errors import ConfigError
from dispa.observability.custom_metrics import CustomMetrics, histogram_bounds
from dispa.observability.exchange import Exchange
from dispa.observability.metrics import DEFAULT_BUCKETS, MetricsAggregator, WorkerMetrics

BASE = """
[server]
bind_address = "127.0.0.1:18080"
[[targets.targets]]
name = "a"
url = "http://127.0.0.1:18090"
[monitoring]
metrics_port = 19090
{extra}
"""


def _load(extra: str):
    return load_config_text(BASE.format(extra=extra), fmt="toml")


def _errors(extra: str) -> list[str]:
    with pytest.raises(ConfigError) as e:
        _load(extra)
    return [err.format() for err in e.value.errors]


def test_histogram_buckets_compile_to_the_metric_unit():
    lc = _load("""
[[monitoring.histogram_buckets]]
metric = "dispa_request_duration_seconds"
buckets_ms = [1, 2.5, 10, 100]
[[monitoring.histogram_buckets]]
metric = "dispa_plugin_duration_ms"
buckets_ms = [0.5, 5]
""")
    hb = lc.snapshot.observability["histogram_buckets"]
    assert hb == {"dispa_request_duration_seconds": [0.001, 0.0025, 0.01, 0.1],
                  "dispa_plugin_duration_ms": [0.5, 5.0]}
    assert histogram_bounds("x_seconds", [250]) == (0.25,)


@pytest.mark.parametrize("extra, needle", [
    ('[[monitoring.histogram_buckets]]\nmetric = "dispa_request_duration_seconds"\n'
     'buckets_ms = [5, 1]', "strictly increasing"),
    ('[[monitoring.histogram_buckets]]\nmetric = "dispa_nope_ms"\nbuckets_ms = [1]',
     "not a histogram Dispa exports"),
    ('[[monitoring.histogram_buckets]]\nmetric = "dispa_request_duration_seconds"\n'
     'buckets_ms = [0, 1]', "monitoring.histogram_buckets[0].buckets_ms[0]"),
    ('[[monitoring.custom_metrics]]\nname = "dispa_requests_total"', "Dispa itself exports"),
    ('[[monitoring.custom_metrics]]\nname = "shop_hits"', "should end in _total"),
    ('[[monitoring.custom_metrics]]\nname = "shop_lat"\ntype = "histogram"', "needs value"),
    ('[[monitoring.custom_metrics]]\nname = "shop_total"\nlabels = ["tenant"]',
     "not a request attribute"),
    ('[[monitoring.custom_metrics]]\nname = "shop_total"\nlabels = ["a=header:x", "a=route"]',
     "duplicate label"),
    ('[[monitoring.custom_metrics]]\nname = "shop_total"\nlabels = ["a=body:x"]',
     "monitoring.custom_metrics[0].labels[0]"),
])
def test_bad_metric_config_is_refused_with_its_field(extra, needle):
    errors = _errors(extra)
    assert any(needle in e for e in errors), errors


def test_original_compat_names_are_accepted():
    _load('[[monitoring.histogram_buckets]]\nmetric = "dispa_log_write_duration_ms"\n'
          'buckets_ms = [0.5, 1, 2]')


def _ex(**kw) -> Exchange:
    base = dict(start=0.0, t0=0.0, duration=0.02, client_ip="10.0.0.1", method="GET",
                target="/a?plan=gold&x=1", version="HTTP/1.1", host="shop.example",
                domain="shop.example", status=200, bytes_in=10, bytes_out=300,
                request_headers=[(b"X-Tenant", b"acme"), (b"Cookie", b"sid=1; ab=b")],
                request_id="r1", route="api", cluster="default", endpoint="127.0.0.1:1",
                attempts=[("127.0.0.1:1", 0.0, 0.015, "ok")], error=None, request=None,
                scheme="http", tls=None)
    base.update(kw)
    return Exchange(**base)


def _export_map(wm: WorkerMetrics):
    exp = wm.export()
    counters: dict = {}
    for n, l, v in exp["counters"]:  # a frozen and a live series of one key add up
        k = (n, tuple(map(tuple, l)))
        counters[k] = counters.get(k, 0) + v
    hists = {(n, tuple(map(tuple, l))): (exp["bucket_sets"][b], c, t)
             for n, l, b, c, t in exp["histograms"]}
    return exp, counters, hists


def test_custom_counter_and_histogram_from_exchanges():
    wm = WorkerMetrics()
    part = {"metrics": [
        {"name": "shop_requests_total", "type": "counter",
         "labels": ["tenant=header:x-tenant", "route", "status_class", "plan=query:plan",
                    "ab=cookie:ab"], "help": "Shop requests."},
        {"name": "shop_errors_total", "labels": ["status"], "statuses": ["5xx"]},
        {"name": "shop_upstream_seconds", "type": "histogram", "value": "upstream_duration",
         "buckets_ms": [10, 20]},
        {"name": "shop_bytes_out_total", "value": "bytes_out"},
    ]}
    sink = CustomMetrics(part, wm, {})
    sink(_ex())
    sink(_ex(status=503))
    sink(_ex(status=502, attempts=[]))
    exp, counters, hists = _export_map(wm)
    key = ("shop_requests_total", (("tenant", "acme"), ("route", "api"),
                                   ("status_class", "2xx"), ("plan", "gold"), ("ab", "b")))
    assert counters[key] == 1
    assert counters[("shop_errors_total", (("status", "503"),))] == 1
    assert counters[("shop_errors_total", (("status", "502"),))] == 1
    assert ("shop_errors_total", (("status", "200"),)) not in counters
    assert counters[("shop_bytes_out_total", ())] == 900
    bounds, counts, total = hists[("shop_upstream_seconds", ())]
    assert bounds == [0.01, 0.02] and counts == [0, 2, 0]  # 15 ms twice; none without attempts
    assert exp["help"]["shop_requests_total"] == ["counter", "Shop requests."]
    agg = MetricsAggregator()
    agg.update("w1", exp)
    text = agg.render_prometheus()
    assert "# HELP shop_requests_total Shop requests." in text
    assert 'shop_upstream_seconds_bucket{le="0.02"} 2' in text


def test_custom_metric_series_are_bounded():
    wm = WorkerMetrics()
    sink = CustomMetrics({"metrics": [{"name": "t_total", "labels": ["t=header:x-t"],
                                       "max_series": 3}]}, wm, {})
    for i in range(50):
        sink(_ex(request_headers=[(b"x-t", str(i).encode())]))
    _, counters, _ = _export_map(wm)
    assert len([k for k in counters if k[0] == "t_total"]) == 4
    assert counters[("t_total", (("t", "_other"),))] == 47


def test_bucket_change_freezes_old_series_and_the_master_shows_the_new_layout():
    wm = WorkerMetrics()
    wm.observe_request("a", "GET", 200, 0.003)
    wm.configure_buckets({"dispa_request_duration_seconds": (0.002, 0.004)})
    wm.observe_request("a", "GET", 200, 0.003)
    wm.observe_request("a", "GET", 200, 0.5)
    exp, counters, _ = _export_map(wm)
    assert counters[("dispa_requests_total", (("domain", "a"), ("method", "GET"),
                                              ("status", "200")))] == 3
    agg = MetricsAggregator()
    agg.update("w", exp)
    text = agg.render_prometheus()
    # the frozen 3 ms (bucket le=0.005 of the old layout) lands in the first new bucket that
    # is >= 0.005, +Inf: never in a bucket smaller than its own
    assert 'dispa_request_duration_seconds_bucket{domain="a",le="0.004"} 1' in text
    assert 'dispa_request_duration_seconds_bucket{domain="a",le="+Inf"} 3' in text
    assert 'dispa_requests_total{domain="a",method="GET",status="200"} 3' in text
    # back to the defaults
    wm.configure_buckets({})
    wm.observe_request("a", "GET", 200, 0.003)
    agg.update("w", wm.export())
    text = agg.render_prometheus()
    assert 'dispa_request_duration_seconds_bucket{domain="a",le="0.0025"}' in text
    assert 'dispa_requests_total{domain="a",method="GET",status="200"} 4' in text
    assert tuple(DEFAULT_BUCKETS) == wm._buckets


def test_ms_histogram_override():
    wm = WorkerMetrics()
    wm.configure_buckets({"dispa_plugin_duration_ms": (1.0, 10.0)})
    wm.observe_ms("dispa_plugin_duration_ms", (("plugin", "p"),), 5.0)
    _, _, hists = _export_map(wm)
    assert hists[("dispa_plugin_duration_ms", (("plugin", "p"),))][:2] == ([1.0, 10.0],
                                                                          [0, 1, 0])
