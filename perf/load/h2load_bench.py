"""HTTP/2 load: Dispa vs nginx (``listen ... http2``) with h2load, in the same run, as ratios.

h2 downstream (h2c, prior knowledge), HTTP/1.1 keep-alive upstream to the same nginx
backend; the same worker count and CPUs for both proxies (harness.cpu_layout), alternated
rounds. h2load runs ``-c`` connections with ``-m`` concurrent streams each, for a fixed
duration. Usage::

    python perf/load/h2load_bench.py --rounds 3 --duration 5 --json perf/results/h2.json

Prints one JSON line per round and a summary with the Dispa/nginx throughput ratio (target
>= 0.6, docs/http2.md#measured) and CPU per request.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parents[1]))

import harness as h  # noqa: E402

NGINX_H2 = """
worker_processes {workers};
daemon off;
master_process on;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
worker_rlimit_nofile {nofile};
events {{ worker_connections {worker_connections}; }}
http {{
    access_log off;
    keepalive_timeout 300s;
    keepalive_requests 100000000;
    http2_max_requests 100000000;
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy_temp;
    fastcgi_temp_path {prefix}/fastcgi_temp;
    uwsgi_temp_path {prefix}/uwsgi_temp;
    scgi_temp_path {prefix}/scgi_temp;
    upstream backend {{
        server 127.0.0.1:{backend_port};
        keepalive 64;
        keepalive_requests 100000000;
    }}
    server {{
        listen 127.0.0.1:{port} reuseport backlog=4096;
        listen 127.0.0.1:{h2_port} http2 reuseport backlog=4096;
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
}}
"""

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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--conns", type=int, default=8)
    ap.add_argument("--streams", type=int, default=16)
    ap.add_argument("--json", default="")
    args = ap.parse_args(argv)
    h.ensure_tools(["nginx", "h2load"])
    layout = h.cpu_layout(args.workers)
    tmp = tempfile.mkdtemp(prefix="dispa-h2-perf-")
    backend = h.make_backend(tmp, layout)
    servers: dict = {}
    try:
        if not backend.start():
            raise RuntimeError(f"backend: {backend.error}")
        prefix = os.path.join(tmp, "nginx")
        os.makedirs(prefix, exist_ok=True)
        port, h2_port = h.free_port(), h.free_port()
        nf = h.nofile_limit()
        conf = os.path.join(prefix, "nginx.conf")
        Path(conf).write_text(NGINX_H2.format(
            workers=args.workers, prefix=prefix, port=port, h2_port=h2_port,
            backend_port=backend.port, nofile=nf, worker_connections=nf - 100))
        nginx = h.Server("nginx", h.nginx_cmd(prefix, conf), port, layout.cpuset("proxy"),
                         workdir=prefix)
        nginx.h2_port = h2_port
        dispa = h.make_dispa(tmp, layout, args.workers, backend.port, None, extra=DISPA_H2)
        servers = {"dispa": dispa, "nginx": nginx}
        for name, srv in servers.items():
            if not srv.start():
                raise RuntimeError(f"{name}: {srv.error}")
        dispa.h2_port = dispa.port  # one listener: the h2c preface is detected
        rounds = []
        for rnd in range(args.rounds):
            order = list(servers) if rnd % 2 == 0 else list(reversed(servers))
            row = {}
            for name in order:
                srv = servers[name]
                c0 = h.tree_cpu_us(srv.proc.pid)
                r = run_h2load(srv.h2_port, args.duration, args.conns, args.streams,
                               layout.cpuset("load"))
                cpu = h.tree_cpu_us(srv.proc.pid) - c0
                row[name] = {"rps": round(r["rps"], 1), "failed": r["failed"],
                             "cpu_us_per_req": round(cpu / r["requests"], 1)
                             if r["requests"] else None}
            rounds.append(row)
            print(json.dumps({"round": rnd, **row}), flush=True)
        per_round = [r["dispa"]["rps"] / r["nginx"]["rps"] for r in rounds if r["nginx"]["rps"]]
        dc = statistics.median(r["dispa"]["cpu_us_per_req"] for r in rounds)
        nc = statistics.median(r["nginx"]["cpu_us_per_req"] for r in rounds)
        summary = {"dispa_rps": statistics.median(r["dispa"]["rps"] for r in rounds),
                   "nginx_rps": statistics.median(r["nginx"]["rps"] for r in rounds),
                   "ratio": round(statistics.median(per_round), 3) if per_round else None,
                   "ratio_range": [round(min(per_round), 3), round(max(per_round), 3)]
                   if per_round else None,
                   "dispa_cpu_us": dc, "nginx_cpu_us": nc,
                   "cpu_ratio": round(dc / nc, 3) if nc else None,
                   "target_ratio": 0.6}
        doc = {"when": datetime.datetime.now(datetime.timezone.utc).isoformat(),
               "workers": args.workers, "conns": args.conns, "streams": args.streams,
               "duration": args.duration, "layout": layout.__dict__,
               "tools": h.tool_versions(), "rounds": rounds, "summary": summary}
        print(json.dumps({"summary": summary}, indent=1))
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(doc, indent=1))
        return 0
    finally:
        for srv in list(servers.values()) + [backend]:
            srv.stop()


if __name__ == "__main__":
    sys.exit(main())
