"""TLS load: Dispa vs nginx (ssl listener) in the same run, as ratios.

Two scenarios, each measured with wrk against both proxies in alternated rounds:

- ``tls_ka``: TLS keep-alive requests per second (the handshake cost amortised away: the
  record layer and the proxy path);
- ``tls_hs``: ``Connection: close`` on every request, so each request is a new TCP
  connection and a full TLS handshake (wrk does not resume sessions): handshakes/s.

Both proxies get the same ECDSA P-256 certificate, TLS 1.3, the same worker count and the
same CPUs (harness.cpu_layout), and forward to the same nginx backend. Usage::

    python perf/load/tls_bench.py --rounds 3 --duration 5 --json perf/results/tls.json

Prints one JSON line per round and a summary with the Dispa/nginx ratios (docs/performance.md).
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

NGINX_TLS = """
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
        listen 127.0.0.1:{tls_port} ssl reuseport backlog=4096;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_session_tickets on;
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
}}
"""

DISPA_TLS = """
[tls]
enabled = true
bind_address = "127.0.0.1:{tls_port}"
[[tls.certificates]]
cert_file = "{cert}"
key_file = "{key}"
"""


def make_cert(tmp: str) -> tuple[str, str]:
    from tests.support.pki import CA, write_pair
    ca = CA("perf CA")
    return write_pair(Path(tmp), "bench", *ca.issue("bench.test", dns=["bench.test"],
                                                   ips=["127.0.0.1"]))


def run_wrk_tls(port: int, duration: float, conns: int, threads: int, cpus: str,
                close: bool) -> dict:
    script = HERE / ("conn_close.lua" if close else "keepalive.lua")
    d = max(1, int(round(duration)))
    cmd = ["taskset", "-c", cpus, h.which("wrk") or "wrk", f"-t{threads}", f"-c{conns}",
           f"-d{d}s", "--timeout", "5s", "-s", str(script), f"https://127.0.0.1:{port}/"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=d + 60)
    m = re.search(r"^WRKJSON (.*)$", p.stdout, re.M)
    if p.returncode != 0 or not m:
        raise RuntimeError(f"wrk failed rc={p.returncode}: {p.stdout[-400:]} {p.stderr[-400:]}")
    r = json.loads(m.group(1))
    r["rps"] = r["requests"] / (r["duration_us"] / 1e6) if r["duration_us"] else 0.0
    r["errors"] = sum(r[k] for k in ("err_connect", "err_read", "err_write", "err_status",
                                     "err_timeout"))
    return r


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--conns", type=int, default=32)
    ap.add_argument("--json", default="")
    args = ap.parse_args(argv)
    h.ensure_tools(["nginx", "wrk"])
    layout = h.cpu_layout(args.workers)
    tmp = tempfile.mkdtemp(prefix="dispa-tls-perf-")
    cert, key = make_cert(tmp)
    backend = h.make_backend(tmp, layout)
    servers = {}
    try:
        if not backend.start():
            raise RuntimeError(f"backend: {backend.error}")
        prefix = os.path.join(tmp, "nginx")
        os.makedirs(prefix, exist_ok=True)
        port, tls_port = h.free_port(), h.free_port()
        nf = h.nofile_limit()
        conf = os.path.join(prefix, "nginx.conf")
        Path(conf).write_text(NGINX_TLS.format(
            workers=args.workers, prefix=prefix, port=port, tls_port=tls_port,
            backend_port=backend.port, nofile=nf, worker_connections=nf - 100,
            cert=cert, key=key))
        nginx = h.Server("nginx", h.nginx_cmd(prefix, conf), port, layout.cpuset("proxy"),
                         workdir=prefix)
        nginx.tls_port = tls_port
        d_tls = h.free_port()
        dispa = h.make_dispa(tmp, layout, args.workers, backend.port, None,
                             extra=DISPA_TLS.format(tls_port=d_tls, cert=cert, key=key))
        dispa.tls_port = d_tls
        servers = {"dispa": dispa, "nginx": nginx}
        for name, srv in servers.items():
            if not srv.start():
                raise RuntimeError(f"{name}: {srv.error}")
        rounds = []
        for rnd in range(args.rounds):
            order = list(servers) if rnd % 2 == 0 else list(reversed(servers))
            row = {}
            for name in order:
                srv = servers[name]
                for scen, close in (("tls_ka", False), ("tls_hs", True)):
                    c0 = h.tree_cpu_us(srv.proc.pid)
                    r = run_wrk_tls(srv.tls_port, args.duration, args.conns,
                                    layout.wrk_threads, layout.cpuset("load"), close)
                    cpu = h.tree_cpu_us(srv.proc.pid) - c0
                    row[f"{name}.{scen}"] = {
                        "rps": round(r["rps"], 1), "errors": r["errors"],
                        "cpu_us_per_req": round(cpu / r["requests"], 1) if r["requests"] else None}
            rounds.append(row)
            print(json.dumps({"round": rnd, **row}), flush=True)
        summary = {}
        for scen in ("tls_ka", "tls_hs"):
            d = statistics.median(r[f"dispa.{scen}"]["rps"] for r in rounds)
            n = statistics.median(r[f"nginx.{scen}"]["rps"] for r in rounds)
            dc = statistics.median(r[f"dispa.{scen}"]["cpu_us_per_req"] for r in rounds)
            nc = statistics.median(r[f"nginx.{scen}"]["cpu_us_per_req"] for r in rounds)
            per_round = [r[f"dispa.{scen}"]["rps"] / r[f"nginx.{scen}"]["rps"] for r in rounds
                         if r[f"nginx.{scen}"]["rps"]]
            summary[scen] = {
                "dispa_rps": d, "nginx_rps": n,
                # throughput: median of the per-round ratios (both measured back to back)
                "ratio": round(statistics.median(per_round), 3) if per_round else None,
                "ratio_range": [round(min(per_round), 3), round(max(per_round), 3)]
                if per_round else None,
                "dispa_cpu_us": dc, "nginx_cpu_us": nc,
                # CPU per request, the steadier figure on a shared machine (lower is better)
                "cpu_ratio": round(dc / nc, 3) if nc else None}
        doc = {"when": datetime.datetime.now(datetime.timezone.utc).isoformat(),
               "workers": args.workers, "conns": args.conns, "duration": args.duration,
               "layout": layout.__dict__, "tools": h.tool_versions(), "rounds": rounds,
               "summary": summary}
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
