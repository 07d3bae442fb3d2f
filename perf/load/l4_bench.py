"""L4 TCP proxying: Dispa ``[[l4.listeners]]`` vs HAProxy ``mode tcp``, in the same run.

Two scenarios, measured with wrk through both TCP proxies in alternated rounds, to the same
nginx origin (the proxies see only bytes; wrk speaks HTTP/1.1 to nginx through them):

- ``l4_tput``: keep-alive GETs of a 1 MiB file over a few connections: proxied bytes per
  second (the copy loop and its backpressure);
- ``l4_conn``: ``Connection: close`` GETs of a 64-byte body: new TCP connections per second
  through the proxy (accept, upstream choice and connect, two closes per connection).

Both proxies get the same worker/thread count and the same CPUs (harness.cpu_layout). Usage::

    python perf/load/l4_bench.py --rounds 3 --duration 5 --json perf/results/l4.json

Prints one JSON line per round and a summary with the Dispa/HAProxy ratios (docs/l4.md).
"""

from __future__ import annotations

import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_common as bc  # noqa: E402
from bench_common import h  # noqa: E402

ORIGIN_HTTP = """
    default_type application/octet-stream;
    sendfile on;
    server {{
        listen 127.0.0.1:{port} reuseport backlog=4096;
        root {prefix}/www;
        location = / {{ return 200 "{body64}"; }}
    }}
"""

HAPROXY_TCP = """
global
    nbthread {workers}
    no strict-limits
    maxconn 20000
defaults
    mode tcp
    timeout connect 5s
    timeout client 300s
    timeout server 300s
frontend fe
    bind 127.0.0.1:{port}
    default_backend be
backend be
    server s1 127.0.0.1:{backend_port}
"""

DISPA_L4 = """
[[l4.listeners]]
name = "bench"
bind_address = "127.0.0.1:{port}"
target_group = "default"
max_connections = 100000
"""

BIG = 1 << 20  # bytes of the throughput scenario's file


def tcp_ready(port: int, timeout: float = 20.0) -> bool:
    """The proxy's L4 port accepts (its HTTP readiness says nothing about the L4 one)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.5).close()
            return True
        except OSError:
            time.sleep(0.1)
    return False


def make_origin(tmp: str, layout: h.Layout) -> h.Server:
    prefix = os.path.join(tmp, "origin")
    os.makedirs(os.path.join(prefix, "www"), exist_ok=True)
    Path(prefix, "www", "1m").write_bytes(os.urandom(BIG))
    # nginx workers may run as another user (root starts them as nobody): let them read it
    for path in (tmp, prefix, os.path.join(prefix, "www")):
        os.chmod(path, 0o755)
    os.chmod(os.path.join(prefix, "www", "1m"), 0o644)
    return bc.nginx_server(tmp, "origin", layout.backend_workers, layout.cpuset("load"),
                           ORIGIN_HTTP, body64="x" * 64)


def make_haproxy_tcp(tmp: str, layout: h.Layout, workers: int, backend_port: int) -> h.Server:
    prefix = os.path.join(tmp, "haproxy")
    os.makedirs(prefix, exist_ok=True)
    port = h.free_port()
    conf = os.path.join(prefix, "haproxy.cfg")
    Path(conf).write_text(HAPROXY_TCP.format(workers=workers, port=port,
                                             backend_port=backend_port))
    # mode tcp proxies the origin's HTTP, so the harness's HTTP readiness probe works here
    srv = h.Server("haproxy", [h.which("haproxy") or "haproxy", "-db", "-f", conf], port,
                   layout.cpuset("proxy"), workdir=prefix)
    srv.l4_port = port
    return srv


def main(argv=None) -> int:
    ap = bc.parser(__doc__)
    ap.add_argument("--tput-conns", type=int, default=4)
    ap.add_argument("--conn-conns", type=int, default=32)
    ap.add_argument("--dispa-cmd", default=None, help="as perf/load/run.py --dispa-cmd")
    args = ap.parse_args(argv)
    h.ensure_tools(["nginx", "wrk", "haproxy"])
    layout = h.cpu_layout(args.workers)
    tmp = tempfile.mkdtemp(prefix="dispa-l4-perf-")
    origin = make_origin(tmp, layout)
    servers: dict[str, h.Server] = {}
    try:
        bc.start_all({"origin": origin})
        l4_port = h.free_port()
        dispa = h.make_dispa(tmp, layout, args.workers, origin.port, args.dispa_cmd,
                             extra=DISPA_L4.format(port=l4_port))
        dispa.l4_port = l4_port
        haproxy = make_haproxy_tcp(tmp, layout, args.workers, origin.port)
        servers = {"dispa": dispa, "haproxy": haproxy}
        bc.start_all(servers, lambda srv: tcp_ready(srv.l4_port), "L4 port not accepting")
        scenarios = (("l4_tput", "/1m", False, args.tput_conns),
                     ("l4_conn", "/", True, args.conn_conns))

        def measure(name: str, srv: h.Server) -> dict:
            row = {}
            for scen, path, close, conns in scenarios:
                r, cpu = bc.measured(srv, lambda p=path, c=close, n=conns: h.run_wrk(
                    srv.l4_port, p, args.duration, n, layout.wrk_threads,
                    layout.cpuset("load"), c))
                secs = r["duration_us"] / 1e6 if r["duration_us"] else 0.0
                row[f"{name}.{scen}"] = {
                    "rps": round(r["rps"], 1), "errors": r["errors"],
                    "mib_per_s": round(r["bytes"] / secs / (1 << 20), 1) if secs else 0.0,
                    "cpu_us_per_req": bc.per_req(cpu, r["requests"])}
            return row

        rounds = bc.run_rounds(servers, args.rounds, measure)
        summary = {}
        for scen, *_ in scenarios:
            key = "mib_per_s" if scen == "l4_tput" else "rps"
            per_round = [r[f"dispa.{scen}"][key] / r[f"haproxy.{scen}"][key] for r in rounds
                         if r[f"haproxy.{scen}"][key]]
            dc = [r[f"dispa.{scen}"]["cpu_us_per_req"] for r in rounds]
            hc = [r[f"haproxy.{scen}"]["cpu_us_per_req"] for r in rounds]
            summary[scen] = {
                "unit": "MiB/s" if key == "mib_per_s" else "connections/s",
                "dispa": statistics.median(r[f"dispa.{scen}"][key] for r in rounds),
                "haproxy": statistics.median(r[f"haproxy.{scen}"][key] for r in rounds),
                **bc.ratios(per_round),
                # CPU per request: the steadier figure on a shared machine (lower is better)
                "cpu_ratio": round(statistics.median(dc) / statistics.median(hc), 3)
                if None not in dc + hc and statistics.median(hc) else None,
                "errors": sum(r[f"dispa.{scen}"]["errors"] for r in rounds)}
        return bc.report({"workers": args.workers, "duration": args.duration}, layout,
                         rounds, summary, args.json)
    finally:
        bc.stop_all(*servers.values(), origin)


if __name__ == "__main__":
    sys.exit(main())
