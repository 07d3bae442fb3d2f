"""Micro-benchmark: proxy_request_head (the hottest writer function) and write_response_head,
compiled twin vs pure twin. Run: pytest perf/micro --benchmark-only"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_http1_parse import CHROME_GET  # noqa: E402

IMPLS = ("dispa._hotpath", "dispa.protocols.http1._pure")
DROP = frozenset({b"x-internal"})
EXTRA = [(b"X-Forwarded-For", b"203.0.113.7"), (b"X-Forwarded-Proto", b"https"),
         (b"Connection", b"keep-alive")]


@pytest.fixture(params=IMPLS, ids=("hotpath", "pure"))
def impl(request):
    return importlib.import_module(request.param)


def test_bench_proxy_request_head(benchmark, impl):
    p = impl.RequestParser()
    p.feed(CHROME_GET)
    assert p.next_event() == impl.HEAD
    head = p.head
    out = benchmark(impl.proxy_request_head, head, b"/wiki/Special:Search?search=python", DROP, EXTRA)
    assert out.startswith(b"GET /wiki/") and b"Connection: keep-alive\r\n\r\n" in out


def test_bench_write_response_head(benchmark, impl):
    headers = [(b"Content-Type", b"text/plain"), (b"Content-Length", b"12"),
               (b"Server", b"dispa")]
    benchmark(impl.write_response_head, 200, b"OK", headers)
