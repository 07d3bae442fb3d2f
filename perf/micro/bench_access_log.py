"""Micro-benchmark: the per-request cost of the log sinks (what a worker pays per request).

Run:  python perf/micro/bench_access_log.py          (prints ns per request)
      pytest perf/micro/bench_access_log.py          (pytest-benchmark)

Measured per exchange, sanitization on (defaults): the access log sink in ``json`` and
``combined`` format (render + append to the buffer; the ``write(2)`` per 64 KiB buffer is
included, amortised) for a browser-like request (8 headers, a Chrome User-Agent, a
referer) and for a minimal one (``GET /``, Host only: what wrk sends); ``make_exchange``
from a parsed head (what the Session pays once when any sink is on); the traffic log sink
(row + queue), and the redactor alone on a target with a card number. The load harness
measures the same in throughput terms (docs/logging.md#cost):
``python perf/load/run.py --proxies dispa,dispa-access-log``.
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
from dispa.observability.exchange import Exchange, make_exchange  # noqa: E402
from dispa.observability.redaction import build_redactor  # noqa: E402
from dispa.observability.traffic_log import TrafficLog  # noqa: E402

N = int(os.environ.get("BENCH_N", "50000"))


def default_redaction() -> dict:
    """``[logging.sanitization]`` defaults, compiled as a worker gets them."""
    from dispa.config.load import load_config_text
    from dispa.config.logging_model import compile_redaction
    cfg = load_config_text('[[targets.targets]]\nname = "a"\nurl = "http://127.0.0.1:1"\n'
                           "[logging.access_log]\nenabled = true\n", fmt="toml")
    return compile_redaction(cfg.model)


REDACTION = default_redaction()



_RAW_HEAD = (b"GET /api/v1/items?page=2&sort=asc HTTP/1.1\r\nHost: api.example.com\r\n"
             b"User-Agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like "
             b"Gecko) Chrome/120.0.0.0 Safari/537.36\r\nAccept: */*\r\n"
             b"Accept-Encoding: gzip, br\r\nReferer: https://www.example.com/list?page=1\r\n"
             b"Authorization: Bearer abc.def\r\nCookie: session=abcdef0123456789\r\n\r\n")


def session_head(raw: bytes = _RAW_HEAD):
    """A parsed request head, as the Session holds it (compiled parser when built)."""
    from dispa.protocols.http1 import RequestParser
    p = RequestParser()
    p.feed(raw)
    p.next_event()
    return p.head


class _Cluster:
    name = "default"


_T0 = time.monotonic()
_ATTEMPTS = [("10.0.0.5:8080", _T0 + 0.0001, _T0 + 0.0004, "ok")]


def session_exchange(head=None):
    """What the Session builds per request: make_exchange over its raw values."""
    return make_exchange(_T0, _T0 + 0.00042, "10.1.2.3", head or session_head(),
                         "api.example.com", 200, 0, 1234, b"5f3a9c-42", _Cluster,
                         "10.0.0.5:8080", _ATTEMPTS, None, None)


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
    minimal = session_exchange(session_head(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n"))
    out = {"make_exchange (Session's record)": cpu_ns(lambda: session_exchange(head)),
           "Exchange(**kw) (tests' record)": cpu_ns(exchange)}
    with tempfile.TemporaryDirectory() as d:
        for fmt in ("json", "combined"):
            spec = {"path": os.path.join(d, f"{fmt}.log"), "flush_interval": 1.0,
                    "buffer_size": 65536, "format": PRESETS.get(fmt, fmt)}
            # the sink's entry point as Observers calls it (emit when it has one)
            sink = AccessLog(spec, REDACTION, _Ctx(loop))
            emit = getattr(sink, "emit", sink)
            out[f"access log {fmt}"] = cpu_ns(lambda: emit(ex))
            out[f"access log {fmt} incl. make_exchange"] = cpu_ns(
                lambda: emit(session_exchange(head)))
            out[f"access log {fmt}, minimal request"] = cpu_ns(lambda: emit(minimal))
            sink.close()
            sink = AccessLog(spec, None, _Ctx(loop))
            emit = getattr(sink, "emit", sink)
            out[f"access log {fmt}, sanitization off"] = cpu_ns(lambda: emit(ex))
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
