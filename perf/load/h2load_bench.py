"""HTTP/2 load: Dispa vs nginx (``listen ... http2``) with h2load, in the same run, as ratios.

h2 downstream (h2c, prior knowledge), HTTP/1.1 keep-alive upstream to the same nginx
backend; the same worker count and CPUs for both proxies (harness.cpu_layout), alternated
rounds. h2load runs ``-c`` connections with ``-m`` concurrent streams each, for a fixed
duration. Usage::

    python perf/load/h2load_bench.py --rounds 3 --duration 5 --json perf/results/h2.json

Prints one JSON line per round and a summary with the Dispa/nginx throughput ratio (target
>= 0.6, docs/http2.md#measured) and CPU per request, split into user and system time.

The summary also says what the target leaves to spend: ``budget_cpu_us`` is nginx's CPU per
request over the target ratio (CPU-bound workers: throughput goes as 1/CPU), and
``budget_user_us`` what is left of it for Dispa's own code once its system time (sockets,
epoll: the kernel's share, which no Python change removes) is paid. ``h2_floor_us`` is the
``h2`` library alone serving the same kind of traffic in-process on the proxy's CPUs
(perf/micro/bench_h2_downstream.py ``floor()``), measured once per round: while it exceeds
``budget_user_us`` no glue can reach the target with ``h2`` as it is.
"""

from __future__ import annotations

import json
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_common as bc  # noqa: E402
from bench_common import h  # noqa: E402

NGINX_H2 = "    http2_max_requests 100000000;\n" + bc.NGINX_PROXY

DISPA_H2 = """
[http2]
enabled = true
"""


def run_h2load(port: int, duration: float, conns: int, streams: int, cpus: str) -> dict:
    d = max(1, int(round(duration)))
    cmd = ["taskset", "-c", cpus, h.which("h2load") or "h2load", "-c", str(conns),
           "-m", str(streams), "-D", str(d), "-t", "1", f"http://127.0.0.1:{port}/"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=d + 60)
    m = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, "
                  r"(\d+) failed, (\d+) errored", p.stdout)
    rps = re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", p.stdout)
    if p.returncode != 0 or not m or not rps:
        raise RuntimeError(f"h2load failed rc={p.returncode}: {p.stdout[-600:]} {p.stderr[-300:]}")
    return {"requests": int(m.group(4)), "failed": int(m.group(5)) + int(m.group(6)),
            "rps": float(rps.group(1))}


MICRO = Path(__file__).resolve().parent.parent / "micro"


def h2_floor_us(cpus: str) -> float:
    """The h2 library alone, in-process, on ``cpus``: CPU µs per request (see the doc)."""
    code = ("import json, sys; sys.path.insert(0, sys.argv[1]); import bench_h2_downstream"
            " as b; print(json.dumps(b.floor(4000, 3)))")
    p = subprocess.run(["taskset", "-c", cpus, sys.executable, "-c", code, str(MICRO)],
                       capture_output=True, text=True, timeout=300)
    if p.returncode != 0:
        raise RuntimeError(f"floor run failed: {p.stderr[-600:]}")
    return round(json.loads(p.stdout.strip().splitlines()[-1]), 1)


def main(argv=None) -> int:
    ap = bc.parser(__doc__)
    ap.add_argument("--conns", type=int, default=8)
    ap.add_argument("--streams", type=int, default=16)
    args = ap.parse_args(argv)
    h.ensure_tools(["nginx", "h2load"])
    layout = h.cpu_layout(args.workers)
    tmp = tempfile.mkdtemp(prefix="dispa-h2-perf-")
    backend = h.make_backend(tmp, layout)
    servers: dict = {}
    try:
        bc.start_all({"backend": backend})
        h2_port = h.free_port()
        nginx = bc.nginx_server(tmp, "nginx", args.workers, layout.cpuset("proxy"), NGINX_H2,
                                backend_port=backend.port,
                                listen=f"        listen 127.0.0.1:{h2_port} http2 reuseport"
                                       " backlog=4096;")
        nginx.h2_port = h2_port
        dispa = h.make_dispa(tmp, layout, args.workers, backend.port, None, extra=DISPA_H2)
        servers = {"dispa": dispa, "nginx": nginx}
        bc.start_all(servers)
        dispa.h2_port = dispa.port  # one listener: the h2c preface is detected

        def measure(name: str, srv: h.Server) -> dict:
            r, user, system = bc.measured_split(srv, lambda: run_h2load(
                srv.h2_port, args.duration, args.conns, args.streams, layout.cpuset("load")))
            n = r["requests"]
            row = {name: {"rps": round(r["rps"], 1), "failed": r["failed"],
                          "cpu_us_per_req": bc.per_req(user + system, n),
                          "user_us_per_req": bc.per_req(user, n),
                          "sys_us_per_req": bc.per_req(system, n)}}
            if name == "dispa":
                row["h2_floor_us"] = h2_floor_us(layout.cpuset("proxy"))
            return row

        rounds = bc.run_rounds(servers, args.rounds, measure)
        per_round = [r["dispa"]["rps"] / r["nginx"]["rps"] for r in rounds if r["nginx"]["rps"]]

        def med(name, key):
            return statistics.median(r[name][key] for r in rounds)

        dc, nc = med("dispa", "cpu_us_per_req"), med("nginx", "cpu_us_per_req")
        target = 0.6
        budget = round(nc / target, 1) if nc else None
        summary = {"dispa_rps": med("dispa", "rps"), "nginx_rps": med("nginx", "rps"),
                   **bc.ratios(per_round),
                   "dispa_cpu_us": dc, "nginx_cpu_us": nc,
                   "cpu_ratio": round(dc / nc, 3) if nc else None,
                   "dispa_user_us": med("dispa", "user_us_per_req"),
                   "dispa_sys_us": med("dispa", "sys_us_per_req"),
                   "nginx_user_us": med("nginx", "user_us_per_req"),
                   "nginx_sys_us": med("nginx", "sys_us_per_req"),
                   "target_ratio": target,
                   "budget_cpu_us": budget,
                   "budget_user_us": round(budget - med("dispa", "sys_us_per_req"), 1)
                   if budget else None,
                   "h2_floor_us": statistics.median(r["h2_floor_us"] for r in rounds)}
        return bc.report({"workers": args.workers, "conns": args.conns,
                          "streams": args.streams, "duration": args.duration},
                         layout, rounds, summary, args.json)
    finally:
        bc.stop_all(*servers.values(), backend)


if __name__ == "__main__":
    sys.exit(main())
