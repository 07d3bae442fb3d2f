"""Micro-benchmark: the per-request cost of the filter pipeline (proxy/pipeline.py).

Run:  pytest perf/micro/bench_filters.py --benchmark-only

``Pipeline.start`` is what the Session calls once per request head when a snapshot has
plugins or routing rules: it builds the ``Request`` view, runs the sync ``on_request``
hooks through a ``SyncRunner`` and settles the plan. Measured with 1 and 10 no-op sync
filters (the issue's throughput target is ">= 85 % of no filters with 10 no-op filters";
the end-to-end check is ``perf/load/run.py --proxies dispa,dispa-filters``).
"""

from __future__ import annotations

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from dispa.config.snapshot import PipelineSpec, PluginSpec  # noqa: E402
from dispa.plugins.chain import StatsRegistry  # noqa: E402
from dispa.protocols.http1 import RequestParser  # noqa: E402
from dispa.proxy.mirror import Mirrors  # noqa: E402
from dispa.proxy.pipeline import Pipeline  # noqa: E402

HEAD = (b"GET /index.html?x=1 HTTP/1.1\r\nHost: example.com\r\nUser-Agent: Mozilla/5.0\r\n"
        b"Accept: text/html,application/xhtml+xml\r\nAccept-Language: en-US,en;q=0.5\r\n"
        b"Accept-Encoding: gzip, deflate, br\r\nConnection: keep-alive\r\n\r\n")


class _State:
    loop = None
    metrics = None

    def __init__(self):
        self.plugin_stats = StatsRegistry(None)
        self.mirrors = Mirrors(None)


class _Runtime:
    clusters: dict = {}
    reject_status = 404
    reject_body = b""

    def __init__(self):
        from dispa.proxy.forwarding import TrustedProxies
        self.trusted = TrustedProxies(())


def _pipeline(n: int) -> Pipeline:
    spec = PipelineSpec(plugins=tuple(
        PluginSpec(name=f"noop{i}", type="tests.support.filters:Noop") for i in range(n)))
    return Pipeline(spec, _Runtime(), _State())


def _head():
    p = RequestParser()
    p.feed(HEAD)
    p.next_event()
    return p.head


@pytest.mark.parametrize("filters", [1, 10])
def test_pipeline_start(benchmark, filters):
    p = _pipeline(filters)
    head = _head()
    start = p.start
    plan = benchmark(lambda: start(None, head, b"example.com", b"/index.html?x=1", True,
                                   "127.0.0.1", b"rid"))
    assert plan is None  # no-op hooks: the request goes on on the compiled fast path
