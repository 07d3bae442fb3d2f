"""Micro-benchmark and memory check of tracing at a low sampling ratio (docs/tracing.md).

Run:  python perf/micro/bench_tracing.py             (CPU per request, in-process;
                                                    BENCH_ROUNDS, BENCH_REPEAT, BENCH_N)
      python perf/micro/bench_tracing.py --memory    (PSS of master + 2 workers, real servers)

CPU: the compiled Session (or the pure one with DISPA_NO_EXTENSIONS=1) driven in-process
through fake transports, one keep-alive connection, GET + 2-byte response per request; CPU
time per request (best of ``BENCH_REPEAT`` runs of ``BENCH_N`` requests; the export
thread's encoding of the kept spans included, its POST not) for: tracing off;
tracing at 1 % with the gates (observability/tracing_gate.py); and tracing at 1 % with the
gates switched off on the runtime (every request through the pipeline and an Exchange
record: the code path before the gates); at 50 % (twice what one kept trace the Session
starts itself costs: tracing_gate.py); and at 100 % (no gate at ratio 1: what one kept
trace through the tracing filter costs). The
configurations alternate, the minimum of each is kept. The differences are what tracing
adds per request.

Memory: dispa-server with 2 workers (fork mode), tracing off, tracing on (OTLP/HTTP) with
the master preloading the exporter, and tracing on without that preload; 300 requests, then
the Pss of every process of the tree from /proc/<pid>/smaps_rollup (perf/load/harness.py's
method), in MB.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

N = int(os.environ.get("BENCH_N", "20000"))
REPEAT = int(os.environ.get("BENCH_REPEAT", "5"))

CONFIG = """
[server]
bind_address = "127.0.0.1:18080"
workers = 1
[domains]
intercept_domains = []
[[targets.targets]]
name = "a"
url = "http://127.0.0.1:18090"
[targets.health_check]
enabled = false
[monitoring]
enabled = false
"""
TRACING = """
[observability.tracing]
enabled = true
exporter = "otlp_http"
endpoint = "http://127.0.0.1:9/v1/traces"
sampling_rate = 0.01
"""
GET = (b"GET /api/items?page=2 HTTP/1.1\r\nHost: example.com\r\nUser-Agent: bench/1.0\r\n"
       b"Accept: */*\r\n\r\n")
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nServer: o\r\n\r\nok"


class _Transport:
    closing = False

    def get_extra_info(self, key, default=None):
        return ("10.0.0.7", 53211) if key == "peername" else default

    def set_write_buffer_limits(self, high=None, low=None):
        pass

    def write(self, data):
        pass

    def pause_reading(self):
        pass

    def resume_reading(self):
        pass

    def is_closing(self):
        return False

    def close(self):
        pass

    def abort(self):
        pass


class _InlineBatcher:
    """SpanBatcher's queue protocol (what TracingSink and the compiled Session's
    put_started append to), exporting inline: every 256 entries, build and encode them."""

    def __init__(self):
        import collections
        from dispa.observability.tracing_otlp import encode_spans
        self.queue = collections.deque()
        self.max_queue_size = 1 << 30
        self.max_batch = 256
        self.dropped = self.exported = self.failed = 0
        self._encode = encode_spans
        batcher = self

        class _Wake:
            def set(self):
                batcher.export()
        self._wake = _Wake()

    def export(self):
        spans = []
        q = self.queue
        while q:
            item = q.popleft()
            if type(item) is tuple:
                spans.extend(item[0](*item[1]))
            else:
                spans.append(item)
        self._encode(spans)

    def put(self, spans):
        self.queue.extend(spans)
        if len(self.queue) >= self.max_batch:
            self.export()

    def put_deferred(self, build, args, n):
        self.queue.append((build, args, n))
        if len(self.queue) >= self.max_batch:
            self.export()

    def close(self, timeout=0.0):
        pass


def cpu_per_request(config: str, *, gates: bool) -> float:
    """Best-of-REPEAT CPU microseconds per request through one Session."""
    from dispa.config.load import load_config_text
    from dispa.observability.metrics import WorkerMetrics
    from dispa.observability.tracing import TracingSink
    from dispa.proxy.protocol import Pool, Session, UpstreamConnection
    from dispa.proxy.runtime import WorkerState, build_runtime
    from dispa.routing.vhost import normalize_host

    class Server:
        def __init__(self, runtime):
            self.runtime = runtime
            self.sessions = set()
            self.draining = False
            self.slowdown_us = 0
            self.metrics = WorkerMetrics()
            self._rid = 0

        def next_request_id(self):
            self._rid += 1
            return b"r%x" % self._rid

        def domain_label(self, raw_host):
            return normalize_host(raw_host) or "-"

        def report_passive(self, *a):
            pass

    loop = asyncio.new_event_loop()
    try:
        state = WorkerState(loop)
        runtime = build_runtime(load_config_text(config, fmt="toml").snapshot, state)
        for sink in state.observers.sinks:
            if isinstance(sink, TracingSink):
                # the export thread's work (building the kept exchanges' spans, encoding
                # them) is counted: it runs on the worker's CPU; its POST is not
                sink.batcher.close(0.1)
                sink.batcher = _InlineBatcher()
        if not gates:
            runtime.log_gate = None
            if runtime.pipeline is not None:
                runtime.pipeline.trace_gate = None
        cluster = runtime.default_cluster
        ep = cluster.endpoints[0]
        pool = Pool(loop, ep.host, ep.port, cluster.spec.pool)
        cluster.pools = [pool]
        conn = UpstreamConnection(pool)
        conn.connection_made(_Transport())
        pool.total += 1
        pool.idle.insert(0, conn)
        session = Session(Server(runtime))
        session.connection_made(_Transport())
        best = float("inf")
        for _ in range(REPEAT):
            t = time.process_time()
            for _ in range(N):
                session.data_received(GET)
                conn.data_received(OK)
            best = min(best, (time.process_time() - t) / N * 1e6)
        assert session.requests == N * REPEAT, session.requests
        return best
    finally:
        loop.close()


def bench_cpu() -> None:
    """The configurations in alternated rounds (ROUNDS of them, each best of REPEAT x N
    requests), the minimum per configuration: the machine's noise only ever adds time."""
    from dispa import _native
    rounds = int(os.environ.get("BENCH_ROUNDS", "6"))
    print(f"compiled hotpath in use: {_native.build_info()['hotpath']['in_use']}; "
          f"{rounds} alternated rounds of best of {REPEAT} x {N} requests")
    configs = {
        "off": (CONFIG, True),
        "1%": (CONFIG + TRACING, True),
        "1%, no gates": (CONFIG + TRACING, False),
        "50%": (CONFIG + TRACING.replace("0.01", "0.5"), True),
        "100%": (CONFIG + TRACING.replace("0.01", "1.0"), True),
    }
    best = {k: float("inf") for k in configs}
    for _ in range(rounds):
        for k, (text, gates) in configs.items():
            best[k] = min(best[k], cpu_per_request(text, gates=gates))
    off = best["off"]
    print(f"tracing off                      {off:7.2f} us/request")
    print(f"tracing 1%, gates (now)          {best['1%']:7.2f} us/request  "
          f"(+{best['1%'] - off:.2f})")
    print(f"tracing 1%, no gates (before)    {best['1%, no gates']:7.2f} us/request  "
          f"(+{best['1%, no gates'] - off:.2f})")
    print(f"tracing 50% (gates)              {best['50%']:7.2f} us/request  "
          f"(+{best['50%'] - off:.2f}: one kept trace the Session started costs "
          f"{2 * (best['50%'] - off):.2f})")
    print(f"tracing 100% (every request)     {best['100%']:7.2f} us/request  "
          f"(+{best['100%'] - off:.2f}: one kept trace through the filter)")


# -- memory --------------------------------------------------------------------------

def _tree(root: int) -> list[int]:
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(d))
    out, todo = [], [root]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += kids.get(p, [])
    return out


def _pss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1])
    return 0


def memory_of(extra: str, *, preload: bool) -> list[float]:
    """Pss (MB) of [master, worker, worker] after 300 requests."""
    from tests.support.dispa_proc import DispaProcess, free_port, http_get, render_config
    from tests.support.origin import Origin
    origin = Origin().start()
    tmp = Path(tempfile.mkdtemp(prefix="dispa-trace-mem-"))
    port, admin = free_port(), free_port()
    cfg = tmp / "dispa.toml"
    cfg.write_text(render_config(port=port, admin_port=admin, targets=[("a", origin.url)],
                                 workers=2, extra=extra))
    if preload:
        d = DispaProcess(cfg, port=port, admin_port=admin)
    else:  # the same server with the master's tracing preload switched off
        d = DispaProcess.__new__(DispaProcess)
        d.config_path, d.port, d.admin_port = cfg, port, admin
        d.log_path = cfg.with_suffix(".log")
        d._log = open(d.log_path, "wb")
        d.proc = subprocess.Popen(
            [sys.executable, "-c", "import sys; import dispa.observability.tracing as t; "
             "t.preload = lambda s: None; from dispa.cli import server_main; "
             "sys.argv = ['dispa-server', '--config', sys.argv[1]]; sys.exit(server_main())",
             str(cfg)], cwd=ROOT, stdout=d._log, stderr=subprocess.STDOUT)
    try:
        d.wait_ready(60, workers=2)
        for i in range(300):
            status, _, _ = http_get(port, f"/x{i}")
            assert status == 200, status
        time.sleep(1.0)  # a benchmark, not a test: let the workers go idle before reading
        master = d.proc.pid
        pids = _tree(master)
        workers = [p for p in pids if p != master]
        return [_pss_kb(master) / 1024] + [_pss_kb(p) / 1024 for p in workers]
    finally:
        d.stop()
        origin.stop()


def bench_memory() -> None:
    tracing = TRACING
    for name, extra, preload in (("tracing off", "", True),
                                 ("tracing on, master preloads", tracing, True),
                                 ("tracing on, no master preload", tracing, False)):
        mb = memory_of(extra, preload=preload)
        print(f"{name:34s} total {sum(mb):6.1f} MB  (" +
              ", ".join(f"{x:.1f}" for x in mb) + ")  [master, workers]")


if __name__ == "__main__":
    if "--memory" in sys.argv:
        bench_memory()
    else:
        bench_cpu()
