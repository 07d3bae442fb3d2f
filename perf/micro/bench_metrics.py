"""Micro-benchmark: Dispa's stats-channel metrics vs prometheus-client multiprocess mode.

Run:  python perf/micro/bench_metrics.py            (prints a table; needs prometheus-client)
      pytest perf/micro/bench_metrics.py            (pytest-benchmark, hot path only)

What is compared, per request (the work a worker does on the hot path):

* ``dispa observe_request``: :meth:`WorkerMetrics.observe_request` = requests counter +
  duration histogram + byte counters, all in one call.
* ``prom mp Counter.labels().inc()``: prometheus-client with ``PROMETHEUS_MULTIPROC_DIR``
  set (each process writes mmap'ed files the scraper reads), counter only.
* ``prom mp counter+histogram``: the same work as observe_request (counter + histogram; no
  byte counters, so it is still the cheaper side of the comparison).
* ``prom single-process`` numbers for reference (not usable with N worker processes).

And per scrape (the master's side): rendering 2 workers x 50 domains, ours
(update + render_prometheus) vs ``MultiProcessCollector`` + ``generate_latest``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import timeit

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

N = int(os.environ.get("BENCH_N", "200000"))
REPEAT = int(os.environ.get("BENCH_REPEAT", "5"))


def best_ns(stmt, number: int = N, repeat: int = REPEAT) -> float:
    return min(timeit.repeat(stmt, number=number, repeat=repeat)) / number * 1e9


def bench_dispa() -> dict:
    from dispa.observability.metrics import MetricsAggregator, WorkerMetrics

    w = WorkerMetrics()
    obs = w.observe_request
    obs("api.example.com", "GET", 200, 0.0031, 120, 2048)
    out = {
        "dispa observe_request": best_ns(
            lambda: obs("api.example.com", "GET", 200, 0.0031, 120, 2048)),
    }
    up = w.observe_upstream
    out["dispa observe_upstream"] = best_ns(lambda: up("10.0.0.1:8080", "ok", 0.0021))
    # scrape: 2 workers x 50 domains x 3 statuses
    workers = []
    for _ in range(2):
        wm = WorkerMetrics()
        for d in range(50):
            for st in (200, 404, 502):
                wm.observe_request(f"d{d}.example.com", "GET", st, 0.002 * (st // 100))
        workers.append(wm)
    agg = MetricsAggregator()

    def scrape():
        for i, wm in enumerate(workers):
            agg.update(f"w{i}", wm.export())
        return agg.render_prometheus()

    out["dispa scrape 2w x 50 domains (us)"] = best_ns(scrape, number=50) / 1000
    return out


_PROM_CHILD = r"""
import json, os, sys, timeit
N, REPEAT = int(sys.argv[1]), int(sys.argv[2])
def best_ns(f, number=N): return min(timeit.repeat(f, number=number, repeat=REPEAT)) / number * 1e9
from prometheus_client import Counter, Histogram, CollectorRegistry, generate_latest
B = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
reg = CollectorRegistry()
c = Counter("dispa_requests_total", "r", ["domain", "method", "status"], registry=reg)
h = Histogram("dispa_request_duration_seconds", "d", ["domain"], buckets=B, registry=reg)
out = {}
mode = "mp" if os.environ.get("PROMETHEUS_MULTIPROC_DIR") else "single"
out[f"prom {mode} Counter.labels().inc()"] = best_ns(
    lambda: c.labels("api.example.com", "GET", "200").inc())
cl = c.labels("api.example.com", "GET", "200")
out[f"prom {mode} cached child .inc()"] = best_ns(cl.inc)
def both():
    c.labels("api.example.com", "GET", "200").inc()
    h.labels("api.example.com").observe(0.0031)
out[f"prom {mode} counter+histogram"] = best_ns(both)
if mode == "mp":
    from prometheus_client import multiprocess
    for d in range(50):
        for st in ("200", "404", "502"):
            c.labels(f"d{d}.example.com", "GET", st).inc()
            h.labels(f"d{d}.example.com").observe(0.002)
    def scrape():
        r = CollectorRegistry()
        multiprocess.MultiProcessCollector(r)
        return generate_latest(r)
    out["prom mp scrape 1 proc x 50 domains (us)"] = best_ns(scrape, number=50) / 1000
print(json.dumps(out))
"""


def bench_prometheus(multiprocess: bool) -> dict:
    env = dict(os.environ)
    with tempfile.TemporaryDirectory() as d:
        if multiprocess:
            env["PROMETHEUS_MULTIPROC_DIR"] = d
        else:
            env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        p = subprocess.run([sys.executable, "-c", _PROM_CHILD, str(N), str(REPEAT)],
                           env=env, capture_output=True, text=True, check=True)
    return json.loads(p.stdout)


def main() -> None:
    rows = bench_dispa()
    try:
        rows.update(bench_prometheus(multiprocess=True))
        rows.update(bench_prometheus(multiprocess=False))
    except (subprocess.CalledProcessError, FileNotFoundError) as e:
        print(f"prometheus-client part skipped: {e}", file=sys.stderr)
    print(f"python {sys.version.split()[0]}, N={N}, best of {REPEAT}")
    for k, v in rows.items():
        unit = "" if "(us)" in k else " ns"
        print(f"{k:<45} {v:10.1f}{unit}")


# -- pytest-benchmark entry points (hot path only) --------------------------------------

def test_bench_observe_request(benchmark):
    from dispa.observability.metrics import WorkerMetrics

    w = WorkerMetrics()
    benchmark(w.observe_request, "api.example.com", "GET", 200, 0.0031, 120, 2048)


def test_bench_observe_upstream(benchmark):
    from dispa.observability.metrics import WorkerMetrics

    w = WorkerMetrics()
    benchmark(w.observe_upstream, "10.0.0.1:8080", "ok", 0.0021)


if __name__ == "__main__":
    main()
