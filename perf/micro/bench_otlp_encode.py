"""Micro-benchmark: one span's OTLP protobuf encoding (dispa/observability/tracing_otlp.py
``encode_span``), the compiled twin (_native/otlp.pyx) against the pure one.

Run:  pytest perf/micro/bench_otlp_encode.py --benchmark-only

The span is a SERVER span as the tracing sink builds it for a GET (15 attributes,
docs/tracing.md): what the export thread encodes twice per kept request. The CI perf gate
(ci/perf_gate.py) checks the compiled/pure speedup of the pair.
"""

from __future__ import annotations

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from dispa import _native  # noqa: E402
from dispa.observability import tracing_otlp  # noqa: E402

ATTRS = {
    "http.request.method": "GET", "url.path": "/api/items", "url.scheme": "http",
    "network.protocol.name": "http", "network.protocol.version": "1.1",
    "client.address": "10.0.0.7", "network.peer.address": "10.0.0.7",
    "dispa.sampling.reason": "head", "url.query": "page=2", "server.address": "example.com",
    "http.response.status_code": 200, "user_agent.original": "Mozilla/5.0 (X11; Linux x86_64)",
    "http.response.body.size": 1534, "dispa.request_id": "5f0c2a9e1b7d4c3a",
    "dispa.cluster": "default",
}
ARGS = ("GET", 0x0af7651916cd43dd8448eb211c80319c, 0xb7ad6b7169203331, 0x00f067aa0ba902b7,
        True, 2, 1_700_000_000_000_000_000, 1_700_000_000_000_480_000, ATTRS, 0, None)

TWINS = [pytest.param(tracing_otlp.encode_span, id="pure")]
if getattr(_native.hotpath, "otlp_encode_span", None) is not None:
    TWINS.insert(0, pytest.param(_native.hotpath.otlp_encode_span, id="compiled"))


@pytest.mark.parametrize("encode", TWINS)
def test_encode_span(benchmark, encode):
    out = benchmark(encode, *ARGS)
    assert out == tracing_otlp.encode_span(*ARGS)
