"""Micro-benchmark: the per-request cost of the log sinks (what a worker pays per request).

Run:  python perf/micro/bench_access_log.py          (prints ns per request)
      pytest perf/micro/bench_access_log.py          (pytest-benchmark)

Measured per exchange, sanitization on (defaults): the access log sink in ``json`` and
``combined`` format (render + append to the buffer; the ``write(2)`` per 64 KiB buffer is
included, amortised), the traffic log sink (row + queue), and the redactor alone on a
target with a card number. The load harness measures the same in throughput terms:
``python perf/load/run.py --proxies dispa,dispa-access-log`` (docs/logging.md#cost).
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
import time
import timeit

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from dispa.observability.access_log import AccessLog  # noqa: E402
from dispa.observability.exchange import Exchange  # noqa: E402
from dispa.observability.redaction import build_redactor  # noqa: E402
from dispa.observability.traffic_log import TrafficLog  # noqa: E402

N = int(os.environ.get("BENCH_N", "50000"))
REDACTION = {"mask_headers": ["authorization", "proxy-authorization", "cookie", "set-cookie",
                              "x-api-key"],
             "mask_query_params": ["token", "access_token", "password", "api_key"],
             "card_numbers": True, "bearer_tokens": True}


_RAW_HEAD = (b"GET /api/v1/items?page=2&sort=asc HTTP/1.1\r\nHost: api.example.com\r\n"
             b"User-Agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like "
             b"Gecko) Chrome/120.0.0.0 Safari/537.36\r\nAccept: */*\r\n"
             b"Accept-Encoding: gzip, br\r\nReferer: https://www.example.com/list?page=1\r\n"
             b"Authorization: Bearer abc.def\r\nCookie: session=abcdef0123456789\r\n\r\n")


def session_head():
    """A parsed request head, as the Session holds it (compiled parser when built)."""
    from dispa.protocols.http1 import RequestParser
    p = RequestParser()
    p.feed(_RAW_HEAD)
    p.next_event()
    return p.head


class _Cluster:
    name = "default"


def session_exchange(head=None):
    """What the Session builds per request: make_exchange over its raw values."""
    from dispa.observability.exchange import make_exchange
    head = head or session_head()
    t0 = time.monotonic()
    return make_exchange(t0, t0 + 0.00042, "10.1.2.3", head, "api.example.com", 200, 0,
                         1234, b"5f3a9c-42", _Cluster, "10.0.0.5:8080",
                         [("10.0.0.5:8080", t0 + 0.0001, t0 + 0.0004, "ok")], None, None)


def exchange() -> Exchange:
    return Exchange(start=time.time(), t0=0.0, duration=0.00042, client_ip="10.1.2.3",
                    method="GET", target="/api/v1/items?page=2&sort=asc", version="HTTP/1.1",
                    host="api.example.com", domain="api.example.com", status=200,
                    bytes_in=0, bytes_out=1234,
                    request_headers=[(b"Host", b"api.example.com"),
                                     (b"User-Agent", b"Mozilla/5.0 (X11; Linux x86_64)"),
                                     (b"Accept", b"*/*"), (b"Authorization", b"Bearer abc.def")],
                    request_id="5f3a9c-42", route=None, cluster="default",
                    endpoint="10.0.0.5:8080", attempts=[("10.0.0.5:8080", 1.0, 1.0003, "ok")],
                    error=None, request=None, scheme="http", tls=None)


class _Ctx:
    def __init__(self, loop):
        self.loop = loop
        self.metrics = None
        self.worker_id = 0


def cpu_ns(fn, number: int = N, repeat: int = 20) -> float:
    """Best CPU time (process_time: not wall time, the machine may be shared) per call,
    over ``repeat`` short runs of ``number // repeat`` calls: on a shared machine the
    minimum of many short runs is the figure least disturbed by the neighbours."""
    n = max(1, number // repeat)
    return min(timeit.repeat(fn, number=n, repeat=repeat, timer=time.process_time)) / n * 1e9


def run() -> dict:
    from dispa.config.logging_model import PRESETS
    loop = asyncio.new_event_loop()
    head = session_head()
    ex = session_exchange(head)
    out = {"make_exchange (Session's record)": cpu_ns(lambda: session_exchange(head)),
           "Exchange(**kw) (tests' record)": cpu_ns(exchange)}
    with tempfile.TemporaryDirectory() as d:
        for fmt in ("json", "combined"):
            spec = {"path": os.path.join(d, f"{fmt}.log"), "flush_interval": 1.0,
                    "buffer_size": 65536, "format": PRESETS.get(fmt, fmt)}
            sink = AccessLog(spec, REDACTION, _Ctx(loop))
            out[f"access log {fmt}"] = cpu_ns(lambda: sink(ex))
            out[f"access log {fmt} incl. make_exchange"] = cpu_ns(
                lambda: sink(session_exchange(head)))
            sink.close()
            sink = AccessLog(spec, None, _Ctx(loop))
            out[f"access log {fmt}, sanitization off"] = cpu_ns(lambda: sink(ex))
            sink.close()

        async def traffic():
            spec = {"queue_size": N * 6, "batch_size": 500, "flush_interval": 60.0,
                    "retention_days": 0, "database": None,
                    "file": {"path": os.path.join(d, "traffic.log"), "rotation": {}}}
            sink = TrafficLog(spec, REDACTION, _Ctx(loop))
            t = cpu_ns(lambda: sink(ex))
            for w in sink.writers:
                w.queue.clear()
            await sink.flush()
            return t
        out["traffic log row+queue"] = loop.run_until_complete(traffic())
        ex0 = ex
        ex = exchange()
        out["traffic log row+queue, kw Exchange"] = loop.run_until_complete(traffic())
        ex = ex0
    red = build_redactor(REDACTION)
    target = "/pay?card=4111111111111111&token=abc&page=2"
    out["redactor.target (card+token)"] = cpu_ns(lambda: red.target(target))
    out["redactor.target (plain query)"] = cpu_ns(lambda: red.target(ex.target))
    loop.close()
    return out


def test_access_log_json(benchmark, tmp_path):
    sink = AccessLog({"path": str(tmp_path / "a.log"), "format": "json",
                      "buffer_size": 65536, "flush_interval": 1.0}, REDACTION, _Ctx(None))
    ex = exchange()
    benchmark(sink, ex)
    sink.close()


if __name__ == "__main__":
    for k, v in run().items():
        print(f"{k:44s} {v:8.0f} ns/request")
