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

import json
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_common as bc  # noqa: E402
from bench_common import HERE, h  # noqa: E402

NGINX_TLS_LISTEN = """        listen 127.0.0.1:{tls_port} ssl reuseport backlog=4096;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_session_tickets on;"""

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
    ap = bc.parser(__doc__)
    ap.add_argument("--conns", type=int, default=32)
    args = ap.parse_args(argv)
    h.ensure_tools(["nginx", "wrk"])
    layout = h.cpu_layout(args.workers)
    tmp = tempfile.mkdtemp(prefix="dispa-tls-perf-")
    cert, key = make_cert(tmp)
    backend = h.make_backend(tmp, layout)
    servers = {}
    try:
        bc.start_all({"backend": backend})
        tls_port = h.free_port()
        nginx = bc.nginx_server(
            tmp, "nginx", args.workers, layout.cpuset("proxy"), bc.NGINX_PROXY,
            backend_port=backend.port,
            listen=NGINX_TLS_LISTEN.format(tls_port=tls_port, cert=cert, key=key))
        nginx.tls_port = tls_port
        d_tls = h.free_port()
        dispa = h.make_dispa(tmp, layout, args.workers, backend.port, None,
                             extra=DISPA_TLS.format(tls_port=d_tls, cert=cert, key=key))
        dispa.tls_port = d_tls
        servers = {"dispa": dispa, "nginx": nginx}
        bc.start_all(servers)

        def measure(name: str, srv: h.Server) -> dict:
            row = {}
            for scen, close in (("tls_ka", False), ("tls_hs", True)):
                r, cpu = bc.measured(srv, lambda close=close: run_wrk_tls(
                    srv.tls_port, args.duration, args.conns, layout.wrk_threads,
                    layout.cpuset("load"), close))
                row[f"{name}.{scen}"] = {"rps": round(r["rps"], 1), "errors": r["errors"],
                                         "cpu_us_per_req": bc.per_req(cpu, r["requests"])}
            return row

        rounds = bc.run_rounds(servers, args.rounds, measure)
        summary = {}
        for scen in ("tls_ka", "tls_hs"):
            d = statistics.median(r[f"dispa.{scen}"]["rps"] for r in rounds)
            n = statistics.median(r[f"nginx.{scen}"]["rps"] for r in rounds)
            dc = statistics.median(r[f"dispa.{scen}"]["cpu_us_per_req"] for r in rounds)
            nc = statistics.median(r[f"nginx.{scen}"]["cpu_us_per_req"] for r in rounds)
            per_round = [r[f"dispa.{scen}"]["rps"] / r[f"nginx.{scen}"]["rps"] for r in rounds
                         if r[f"nginx.{scen}"]["rps"]]
            summary[scen] = {
                "dispa_rps": d, "nginx_rps": n, **bc.ratios(per_round),
                "dispa_cpu_us": dc, "nginx_cpu_us": nc,
                # CPU per request, the steadier figure on a shared machine (lower is better)
                "cpu_ratio": round(dc / nc, 3) if nc else None}
        return bc.report({"workers": args.workers, "conns": args.conns,
                          "duration": args.duration}, layout, rounds, summary, args.json)
    finally:
        bc.stop_all(*servers.values(), backend)


if __name__ == "__main__":
    sys.exit(main())
