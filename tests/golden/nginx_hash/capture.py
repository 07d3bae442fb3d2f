"""Capture a golden trace of nginx's ``hash $arg_k consistent`` from a real nginx.

Theory of operation
-------------------
One nginx process (``master_process off``, ``daemon off``, a throw-away ``-p`` prefix under
``/tmp``) serves everything:

* one tiny *origin* ``server`` block per upstream node, listening on its own loopback port
  (or unix socket) and answering ``200`` with its own name (``127.0.0.1:$server_port``);
* one ``upstream`` block per layout, ``hash $arg_k consistent;`` over those origins, with the
  layout's weights; a second upstream for the same nodes with one node marked ``down``
  (to record nginx's failover walk);
* one *front* server that ``proxy_pass``es ``/<layout>`` to the layout's upstream.

For each key we ``GET /<layout>?k=<key>`` over one keep-alive connection and record which
origin answered. nginx hashes ``$arg_k`` **raw** (no percent-decoding), so the trace records
exactly the bytes nginx hashed. Keys are non-empty: nginx 1.22 falls back to round robin
for an empty key (``hp->key.len == 0`` in ``ngx_http_upstream_get_chash_peer``), which the
capture records separately as ``empty_key_owners``.

The node names are ``127.0.0.1:<port>`` with ports from a fixed block (``BASE_PORT``) when
it is free, else any free ports; they are part of each JSON file, and replaying builds the
ring from them. ``capture(..., names=...)`` reuses given names (ports) where they are free,
so a re-capture can be compared row for row with the stored trace.

Run ``python tests/golden/nginx_hash/capture.py`` to rewrite the JSON files next to this
script (``--keys N`` to change the number of keys, ``--nginx PATH`` for another binary).
``tests/unit/balancer/test_ring_nginx_golden.py`` replays the files and, where nginx is
installed, re-captures a smaller trace and checks it too.

Bounded in time: nginx must answer within ``start_timeout_seconds`` and every request has a
socket timeout; the process is always stopped (TERM, then KILL) and the prefix removed.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"

#: name -> (weights, index of the node marked ``down`` in the failover capture, or None,
#: transport). 4 equal nodes, 3 weighted nodes, 10 nodes with mixed weights, 3 unix sockets
#: (the ``unix:`` branch of nginx's host/port split).
LAYOUTS: dict[str, tuple[list[int], int | None, str]] = {
    "equal4": ([1, 1, 1, 1], 2, "tcp"),
    "weighted3": ([1, 3, 2], 1, "tcp"),
    "ten": ([1, 1, 2, 1, 1, 3, 1, 1, 2, 1], 5, "tcp"),
    "unix3": ([1, 2, 1], None, "unix"),
}

DEFAULT_KEYS = 2000

_SAFE = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~/"


def make_keys(n: int, seed: int = 6) -> list[str]:
    """``n`` distinct, non-empty keys as they appear raw in the query string (ASCII only).

    A mix of path-like keys, ids, addresses, random tokens and a few with percent-escapes,
    ``+`` and ``=`` (nginx hashes them undecoded).
    """
    rng = random.Random(seed)
    keys: list[str] = []
    seen: set[str] = set()

    def add(k: str) -> None:
        if k and k not in seen:
            seen.add(k)
            keys.append(k)

    for k in ("a", "hello", "user-42", "%2Fobjects%2F1", "a+b", "x=y", "%00", "Z" * 200):
        add(k)
    i = 0
    while len(keys) < n:
        kind = i % 5
        if kind == 0:
            add(f"/objects/{i}")
        elif kind == 1:
            add(f"user-{rng.randrange(10**9)}")
        elif kind == 2:
            add(f"10.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(1, 255)}")
        elif kind == 3:
            add("".join(rng.choice(_SAFE) for _ in range(rng.randrange(1, 48))))
        else:
            add(f"%{rng.randrange(256):02X}{rng.randrange(10**6)}+{rng.randrange(100)}")
        i += 1
    return keys[:n]


def _free_port(taken: set[int]) -> int:
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in taken:
            taken.add(port)
            return port


def _port_is_free(port: int) -> bool:
    # SO_REUSEADDR, as nginx's own listen sockets: TIME_WAIT leftovers of an earlier run do
    # not count, a listener does.
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


#: Where the stored traces' ports start (layout k uses BASE_PORT + 100 * k + 1, ...): below
#: Linux's ephemeral range, so a re-capture usually finds them free and can compare rows.
BASE_PORT = 18100


def _plan_names(layouts, prefix: Path, names: dict[str, list[str]] | None) -> dict[str, list[str]]:
    """The upstream ``server`` names per layout: ``names`` if given and their ports are free,
    else the fixed block at ``BASE_PORT``, else any free ports."""
    taken: set[int] = set()
    out: dict[str, list[str]] = {}
    for k, (layout, (weights, _down, transport)) in enumerate(layouts.items()):
        want = (names or {}).get(layout)
        if transport == "unix":
            out[layout] = [f"unix:{prefix}/{layout}-{i}.sock" for i in range(len(weights))]
            continue
        if not want:
            want = [f"127.0.0.1:{BASE_PORT + 100 * k + i + 1}" for i in range(len(weights))]
        if len(want) == len(weights):
            ports = [int(n.rsplit(":", 1)[1]) for n in want]
            if all(p not in taken and _port_is_free(p) for p in ports) and len(set(ports)) == len(ports):
                taken.update(ports)
                out[layout] = list(want)
                continue
        out[layout] = [f"127.0.0.1:{_free_port(taken)}" for _ in weights]
    return out


def _config(layouts, names: dict[str, list[str]], prefix: Path, front: int) -> str:
    lines = [
        "daemon off;",
        "master_process off;",
        "worker_processes 1;",
        f"pid {prefix}/nginx.pid;",
        f"error_log {prefix}/error.log warn;",
        "events { worker_connections 256; }",
        "http {",
        "  access_log off;",
        f"  client_body_temp_path {prefix}/body;",
        f"  proxy_temp_path {prefix}/proxy;",
        f"  fastcgi_temp_path {prefix}/fastcgi;",
        f"  uwsgi_temp_path {prefix}/uwsgi;",
        f"  scgi_temp_path {prefix}/scgi;",
        "  default_type text/plain;",
        "  keepalive_requests 100000;",
    ]
    for layout, (weights, down, _transport) in layouts.items():
        for suffix, down_idx in (("", None), ("_down", down)):
            if suffix and down is None:
                continue
            lines.append(f"  upstream {layout}{suffix} {{")
            lines.append("    hash $arg_k consistent;")
            for i, (name, w) in enumerate(zip(names[layout], weights)):
                flags = f" weight={w}" if w != 1 else ""
                flags += " down" if i == down_idx else ""
                lines.append(f"    server {name}{flags};")
            lines.append("  }")
        for name in names[layout]:
            if name.startswith("unix:"):
                lines.append(f"  server {{ listen {name}; return 200 \"{name}\"; }}")
            else:
                port = name.rsplit(":", 1)[1]
                lines.append(f"  server {{ listen 127.0.0.1:{port}; return 200 \"127.0.0.1:$server_port\"; }}")
    lines.append(f"  server {{ listen 127.0.0.1:{front};")
    for layout, (_w, down, _t) in layouts.items():
        lines.append(f"    location = /{layout} {{ proxy_pass http://{layout}; }}")
        if down is not None:
            lines.append(f"    location = /{layout}_down {{ proxy_pass http://{layout}_down; }}")
    lines.append("  }")
    lines.append("}")
    return "\n".join(lines) + "\n"


def nginx_version(nginx: str = NGINX) -> str:
    """``"nginx/1.22.1"`` as printed by ``nginx -v``."""
    out = subprocess.run([nginx, "-v"], capture_output=True, text=True, timeout=10)
    return (out.stderr or out.stdout).strip().split(": ", 1)[-1]


class _Nginx:
    def __init__(self, nginx: str, prefix: Path, conf: str, front: int, start_timeout_seconds: float):
        self.prefix = prefix
        (prefix / "nginx.conf").write_text(conf)
        self.proc = subprocess.Popen(
            [nginx, "-p", str(prefix), "-c", str(prefix / "nginx.conf"), "-e", str(prefix / "error.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
        deadline = time.monotonic() + start_timeout_seconds
        while True:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                raise RuntimeError(f"nginx exited with {self.proc.returncode}: {err}{self._log()}")
            try:
                socket.create_connection(("127.0.0.1", front), timeout=0.2).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"nginx did not listen within {start_timeout_seconds}s{self._log()}")
                time.sleep(0.02)

    def _log(self) -> str:
        try:
            return "\n" + (self.prefix / "error.log").read_text()[-2000:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        if self.proc.stderr:
            self.proc.stderr.close()


def capture(keys: list[str], layouts=None, *, names: dict[str, list[str]] | None = None,
            nginx: str = NGINX, start_timeout_seconds: float = 10.0,
            request_timeout_seconds: float = 5.0) -> dict[str, dict]:
    """Run nginx once and return ``{layout: trace}`` (the JSON documents this script writes).

    Each trace is ``{"nginx", "directive", "layout", "nodes": [[name, weight]...],
    "down": index | None, "empty_key_owners": [index...], "rows": [[key, owner] or
    [key, owner, owner_with_down]...]}``; owners are indexes into ``nodes``.

    Raises ``FileNotFoundError`` if ``nginx`` is missing, ``RuntimeError`` if it does not
    start or answers something unexpected, ``OSError``/``TimeoutError`` on socket errors.
    """
    layouts = LAYOUTS if layouts is None else layouts
    if not os.path.exists(nginx):
        raise FileNotFoundError(nginx)
    version = nginx_version(nginx)
    prefix = Path(tempfile.mkdtemp(prefix="ngxh"))
    try:
        plan = _plan_names(layouts, prefix, names)
        front = _free_port({int(n.rsplit(":", 1)[1]) for ns in plan.values() for n in ns
                            if not n.startswith("unix:")})
        server = _Nginx(nginx, prefix, _config(layouts, plan, prefix, front), front, start_timeout_seconds)
        try:
            conn = http.client.HTTPConnection("127.0.0.1", front, timeout=request_timeout_seconds)

            def owner(layout: str, path: str, index: dict[str, int]) -> int:
                conn.request("GET", path)
                resp = conn.getresponse()
                body = resp.read().decode()
                if resp.status != 200 or body not in index:
                    raise RuntimeError(f"{path}: unexpected answer {resp.status} {body!r}")
                return index[body]

            out: dict[str, dict] = {}
            for layout, (weights, down, _t) in layouts.items():
                index = {n: i for i, n in enumerate(plan[layout])}
                rows = []
                for k in keys:
                    row = [k, owner(layout, f"/{layout}?k={k}", index)]
                    if down is not None:
                        row.append(owner(layout, f"/{layout}_down?k={k}", index))
                    rows.append(row)
                empty = [owner(layout, f"/{layout}?k=", index) for _ in range(2 * len(weights))]
                out[layout] = {
                    "nginx": version,
                    "directive": "hash $arg_k consistent",
                    "layout": layout,
                    "nodes": [[n, w] for n, w in zip(plan[layout], weights)],
                    "down": down,
                    "empty_key_owners": empty,
                    "rows": rows,
                }
            conn.close()
            return out
        finally:
            server.stop()
    finally:
        shutil.rmtree(prefix, ignore_errors=True)


def load(layout: str, directory: Path = HERE) -> dict:
    """The stored trace of ``layout``."""
    return json.loads((directory / f"{layout}.json").read_text())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--keys", type=int, default=DEFAULT_KEYS)
    ap.add_argument("--nginx", default=NGINX)
    ap.add_argument("--out", type=Path, default=HERE)
    a = ap.parse_args(argv)
    traces = capture(make_keys(a.keys), nginx=a.nginx)
    a.out.mkdir(parents=True, exist_ok=True)
    for layout, doc in traces.items():
        path = a.out / f"{layout}.json"
        # One row per line: reviewable diffs, still plain JSON.
        head = ",\n".join(f" {json.dumps(k)}: {json.dumps(v)}" for k, v in doc.items() if k != "rows")
        body = ",\n".join(f"  {json.dumps(r)}" for r in doc["rows"])
        path.write_text(f"{{\n{head},\n \"rows\": [\n{body}\n ]\n}}\n")
        print(f"{path}: {len(doc['rows'])} keys, nodes {doc['nodes']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
