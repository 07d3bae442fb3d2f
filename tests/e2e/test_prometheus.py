"""A real Prometheus scrapes Dispa: PromQL sees the request rate that was sent, the custom
metrics and configured buckets, and every query of the shipped Grafana dashboard runs."""

from __future__ import annotations

import http.client
import json
import re
import time
from pathlib import Path

import pytest

from tests.support.dispa_proc import wait_for
from tests.support.prometheus import Prometheus

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "docs" / "grafana" / "dispa-dashboard.json"

EXTRA = """
[[monitoring.histogram_buckets]]
metric = "dispa_request_duration_seconds"
buckets_ms = [0.25, 1, 4, 16, 64, 256]

[[monitoring.custom_metrics]]
name = "shop_requests_total"
help = "Requests by tenant and status class."
labels = ["tenant=header:x-tenant", "status_class"]

[[monitoring.custom_metrics]]
name = "shop_response_bytes"
type = "histogram"
value = "bytes_out"
buckets_ms = [10, 100, 1000]
"""

RATE = 40.0      # requests per second sent
DURATION = 8.0   # seconds of steady load


def _paced_load(port: int, rate: float, seconds: float) -> tuple[int, float, float]:
    """Send GETs on one keep-alive connection at ``rate``/s for ``seconds``; return
    (count, start, end) wall-clock times."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    n = 0
    start = time.time()
    t0 = time.monotonic()
    while True:
        due = t0 + n / rate
        if due - t0 >= seconds:
            break
        delay = due - time.monotonic()
        if delay > 0:
            time.sleep(delay)  # pacing the load, not synchronisation
        conn.request("GET", "/bytes?n=50", headers={"Host": "shop.example",
                                                    "X-Tenant": "acme" if n % 4 else "globex"})
        r = conn.getresponse()
        r.read()
        assert r.status == 200
        n += 1
    conn.close()
    return n, start, time.time()


@pytest.mark.slow
def test_prometheus_scrapes_dispa(dispa, origin, tmp_path):
    d = dispa(targets=[("a", origin.url)], workers="2", wait_workers=2, extra=EXTRA)
    prom = Prometheus(tmp_path, [f"127.0.0.1:{d.admin_port}"]).start()
    try:
        wait_for(lambda: prom.value('up{job="dispa"}') == 1.0, 30, "first scrape")
        sent, start, end = _paced_load(d.port, RATE, DURATION)

        # every request is counted once across both workers
        wait_for(lambda: prom.value("sum(dispa_requests_total)") == sent, 20,
                 f"prometheus to see {sent} requests")

        # the rate over a window inside the steady load is the rate sent
        mid = start + DURATION * 0.75
        rate = prom.value("sum(rate(dispa_requests_total[4s]))", at=mid)
        assert rate is not None and abs(rate - RATE) / RATE < 0.25, (rate, RATE)

        # custom metrics, filled from request attributes, summed over workers
        acme = prom.value('sum(shop_requests_total{tenant="acme",status_class="2xx"})')
        globex = prom.value('sum(shop_requests_total{tenant="globex"})')
        assert acme + globex == sent and globex == len(range(0, sent, 4))
        assert prom.value('sum(shop_response_bytes_bucket{le="100"})') == sent
        assert prom.value('sum(shop_response_bytes_bucket{le="10"})') == 0

        # configured buckets reach the scrape (ms -> s)
        les = {s["metric"]["le"] for s in prom.query(
            "dispa_request_duration_seconds_bucket")["data"]["result"]}
        assert {"0.00025", "0.001", "0.004", "0.256", "+Inf"} <= les, les

        # the dashboard's queries are valid PromQL and the core panels have data
        dash = json.loads(DASHBOARD.read_text())
        exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
        assert len(exprs) >= 15
        empty = []
        for expr in exprs:
            q = expr.replace("$__rate_interval", "5s").replace("$job", ".*")
            res = prom.query(q, at=end)
            assert res.get("status") == "success", (expr, res)
            if not res["data"]["result"]:
                empty.append(expr)
        for name in ("dispa_requests_total", "dispa_request_duration_seconds_bucket",
                     "dispa_upstream_requests_total", "dispa_target_health",
                     "dispa_active_connections", "dispa_upstream_pool_connections",
                     "dispa_sent_bytes_total", "dispa_workers"):
            using = [e for e in exprs if re.search(rf"\b{name}\b", e)]
            assert using and [e for e in using if e not in empty], (name, empty)
    finally:
        prom.stop()
