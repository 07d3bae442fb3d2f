"""What the two-proxy load benches (h2load_bench, tls_bench, l4_bench) share.

Each bench runs Dispa and one reference proxy on the same CPUs (harness.cpu_layout),
measures both in alternated rounds, and reports per-round rows and a summary of ratios.
This module holds that skeleton: the command line, an nginx configuration with the common
main/events/http settings, starting the servers, the round loop with CPU accounting, the
ratio summary and the JSON report. The benches keep only what they measure.

Importing it puts the repository root on ``sys.path`` (for ``dispa`` and ``tests.support``)
and exposes the harness as ``h``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
from pathlib import Path
from typing import Callable

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

import harness as h  # noqa: E402

__all__ = ["h", "HERE", "parser", "nginx_server", "NGINX_PROXY", "start_all", "stop_all",
           "measured", "per_req", "run_rounds", "ratios", "report"]

# The settings every bench's nginx shares; ``{http}`` is the rest of the http block.
_NGINX_MAIN = """
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
"""

#: The http block of nginx as the reverse proxy under test, to ``{backend_port}``;
#: ``{listen}`` adds the bench's own listener (and its settings) to the server.
NGINX_PROXY = """
    upstream backend {{
        server 127.0.0.1:{backend_port};
        keepalive 64;
        keepalive_requests 100000000;
    }}
    server {{
        listen 127.0.0.1:{port} reuseport backlog=4096;
{listen}
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
"""


def parser(doc: str) -> argparse.ArgumentParser:
    """The options every bench takes (``--rounds --duration --workers --json``)."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--json", default="")
    return ap


def nginx_server(tmp: str, name: str, workers: int, cpus: str, http: str,
                 **fmt) -> h.Server:
    """An nginx named ``name`` under ``tmp/name`` on a free port: the common settings plus
    ``http`` (a str.format template of the rest of the http block, given ``prefix``,
    ``port`` and ``fmt``)."""
    prefix = os.path.join(tmp, name)
    os.makedirs(prefix, exist_ok=True)
    port = h.free_port()
    nf = h.nofile_limit()
    conf = os.path.join(prefix, "nginx.conf")
    Path(conf).write_text((_NGINX_MAIN + http + "}}\n").format(
        workers=workers, prefix=prefix, port=port, nofile=nf, worker_connections=nf - 100,
        **fmt))
    return h.Server(name, h.nginx_cmd(prefix, conf), port, cpus, workdir=prefix)


def start_all(servers: dict[str, h.Server],
              ready: Callable[[h.Server], bool] | None = None,
              not_ready: str = "not ready") -> None:
    """Start every server (and wait until ``ready`` too, if given); raise naming the
    first that fails."""
    for name, srv in servers.items():
        if not srv.start() or (ready is not None and not ready(srv)):
            raise RuntimeError(f"{name}: {srv.error or not_ready}")


def stop_all(*servers: h.Server) -> None:
    for srv in servers:
        srv.stop()


def measured(srv: h.Server, run: Callable[[], dict]) -> tuple[dict, float]:
    """``run()``'s result and the CPU microseconds ``srv``'s process tree spent meanwhile."""
    r, user, system = measured_split(srv, run)
    return r, user + system


def measured_split(srv: h.Server, run: Callable[[], dict]) -> tuple[dict, float, float]:
    """``run()``'s result and the user and system CPU microseconds of ``srv``'s process
    tree meanwhile."""
    u0, s0 = h.tree_cpu_split_us(srv.proc.pid)
    r = run()
    u1, s1 = h.tree_cpu_split_us(srv.proc.pid)
    return r, u1 - u0, s1 - s0


def per_req(cpu_us: float, requests: int) -> float | None:
    return round(cpu_us / requests, 1) if requests else None


def run_rounds(servers: dict[str, h.Server], rounds: int,
               measure: Callable[[str, h.Server], dict]) -> list[dict]:
    """``rounds`` rounds, the servers in alternated order (so neither always goes first);
    ``measure(name, server)`` gives that server's entries of the round's row. Prints each
    row as a JSON line."""
    out = []
    for rnd in range(rounds):
        order = list(servers) if rnd % 2 == 0 else list(reversed(servers))
        row: dict = {}
        for name in order:
            row.update(measure(name, servers[name]))
        out.append(row)
        print(json.dumps({"round": rnd, **row}), flush=True)
    return out


def ratios(per_round: list[float]) -> dict:
    """The median of the per-round ratios (both measured back to back) and their range."""
    return {"ratio": round(statistics.median(per_round), 3) if per_round else None,
            "ratio_range": [round(min(per_round), 3), round(max(per_round), 3)]
            if per_round else None}


def report(params: dict, layout: h.Layout, rounds: list[dict], summary: dict,
           json_path: str) -> int:
    """Print the summary and, with ``json_path``, write the whole run there. Returns 0."""
    doc = {"when": datetime.datetime.now(datetime.timezone.utc).isoformat(), **params,
           "layout": layout.__dict__, "tools": h.tool_versions(), "rounds": rounds,
           "summary": summary}
    print(json.dumps({"summary": summary}, indent=1))
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(doc, indent=1))
    return 0
