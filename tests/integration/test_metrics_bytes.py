"""dispa_received_bytes_total / dispa_sent_bytes_total count body bytes per domain."""

from __future__ import annotations

import re

from tests.support.dispa_proc import http_get


def counter(metrics: bytes, name: str) -> float:
    m = re.search(rf'^{name}{{domain="[^"]*"}} (\S+)$', metrics.decode(), re.M)
    return float(m.group(1)) if m else 0.0


def test_body_bytes_are_counted_both_ways(dispa, origin):
    d = dispa(targets=[("a", origin.url)])
    body = b"z" * 1234
    assert http_get(d.port, "/echo", method="POST", body=body)[2] == body
    assert http_get(d.port, "/bytes?n=5000")[2] == b"x" * 5000
    assert http_get(d.port, "/chunked?n=3&size=100")[0] == 200
    _, metrics = d.admin_get("/metrics")
    assert counter(metrics, "dispa_received_bytes_total") == 1234
    assert counter(metrics, "dispa_sent_bytes_total") == 1234 + 5000 + 300
