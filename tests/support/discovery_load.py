"""What the service-discovery end-to-end tests share: a bounded keep-alive load through
Dispa, waits on what /admin/status says is *published*, and their setup (the config file's
server and admin listeners, origins, a kubeconfig).

Why ``published`` and not the discovered set: the watcher records a registry's answer at
once but publishes at most once per ``throttle`` window, so a test that waits on the
discovered set can go on (and, say, stop an origin) while the workers still route to it.
``published`` waits until the snapshot in force has the expected endpoints, nothing is
pending, and every ready worker has acknowledged that snapshot's version.
"""

from __future__ import annotations

import http.client
import json
import re
import threading
import time
from pathlib import Path
from typing import Iterator

import yaml

from tests.support.dispa_proc import DispaProcess, http_get, wait_for
from tests.support.origin import Origin

__all__ = ["Load", "converged", "discovered_api", "kubeconfig", "metric", "outage",
           "print_timings", "provider", "published", "served_by", "start_origins",
           "write_config"]


class Load:
    """Keep-alive clients sending GET / until stopped, bounded in count and time; records
    ``(time, status, origin name)`` per request and every failure."""

    def __init__(self, port: int, threads: int = 2, max_requests: int = 40000,
                 max_seconds: float = 120.0):
        self.port, self.threads = port, threads
        self.max_requests, self.max_seconds = max_requests, max_seconds
        self.results: list[tuple[float, int, str]] = []
        self.failures: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True)
                         for _ in range(threads)]

    def _run(self) -> None:
        deadline = time.monotonic() + self.max_seconds
        conn = None
        for _ in range(self.max_requests // self.threads):
            if self._stop.is_set() or time.monotonic() > deadline:
                break
            try:
                if conn is None:
                    conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
                conn.request("GET", "/", headers={"Host": "example.com"})
                r = conn.getresponse()
                body = r.read().decode(errors="replace")
                with self._lock:
                    self.results.append((time.monotonic(), r.status,
                                         body.removeprefix("ok from ")))
                    if r.status != 200:
                        self.failures.append(f"status {r.status}: {body[:80]!r}")
                if r.getheader("connection", "").lower() == "close":
                    conn.close()
                    conn = None
            except (OSError, http.client.HTTPException) as exc:
                with self._lock:
                    self.failures.append(repr(exc))
                if conn is not None:
                    conn.close()
                conn = None
            # pacing, not synchronisation: ~500 req/s per client is a load, not a benchmark
            time.sleep(0.002)
        if conn is not None:
            conn.close()

    def start(self) -> "Load":
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(30)

    def served_since(self, t0: float) -> set[str]:
        with self._lock:
            return {name for t, status, name in self.results if t >= t0 and status == 200}

    def count(self) -> int:
        with self._lock:
            return len(self.results)

    def last_time(self) -> float:
        with self._lock:
            return self.results[-1][0] if self.results else 0.0

    def run_for(self, seconds: float, bound: float, what: str) -> set[str]:
        """Wait (at most ``bound``) until traffic ran ``seconds`` past now; the origins it
        reached meanwhile."""
        t1 = time.monotonic()
        wait_for(lambda: self.last_time() > t1 + seconds, bound, what)
        return self.served_since(t1)

    def finish(self, min_requests: int = 200) -> None:
        """Stop, and check that no request failed and that the load was one."""
        self.stop()
        assert self.failures == [], self.failures[:5]
        assert self.count() > min_requests


def converged(load: Load, live: set[str], window: float = 0.5):
    """A predicate for wait_for: the last ``window`` seconds of traffic hit exactly ``live``
    (returns the time it became true)."""
    def check():
        now = time.monotonic()
        with load._lock:
            if not load.results or now - load.results[0][0] < window:
                return None
        return now if load.served_since(now - window) == live else None
    return check


def published(d: DispaProcess, cluster: str, endpoints: int):
    """A predicate for wait_for: the snapshot in force gives ``cluster`` ``endpoints``
    endpoints, no discovered set is pending, and every ready worker (at least one) runs
    that snapshot. Returns the status it saw."""
    def check():
        st = d.status()
        entry = st["discovery"]["clusters"][cluster]
        ready = [w for w in st["workers"] if w["state"] == "ready"]
        if (entry["endpoints"] == endpoints and not entry["pending"] and ready
                and all(w["snapshot_version"] == st["snapshot_version"] for w in ready)):
            return st
        return None
    return check


def metric(d: DispaProcess, name: str, labels: str) -> float | None:
    """The value of ``name{labels}`` on /metrics (``labels`` as Prometheus writes them,
    e.g. ``provider="dns"``), or None."""
    code, body = d.admin_get("/metrics")
    assert code == 200
    m = re.search(rb"^" + re.escape(f"{name}{{{labels}}}".encode()) + rb" (\S+)$", body,
                  re.M)
    return float(m.group(1)) if m else None


def provider(d: DispaProcess, name: str) -> dict:
    """/admin/status's entry for the discovery provider ``name``."""
    return d.status()["discovery"]["providers"][name]


def outage(d: DispaProcess, load: Load, name: str, cluster: str, live: set[str],
           bound: float, stop) -> float:
    """The registry of provider ``name`` goes away (``stop()``): wait until the provider is
    stale, then check that traffic stays on ``live`` (the last known good set), that
    ``cluster`` keeps its endpoints and that status and /metrics show the staleness.
    Returns how long the provider took to turn stale."""
    t0 = time.monotonic()
    stop()
    wait_for(lambda: provider(d, name)["state"] == "stale", bound, "provider state stale")
    took = time.monotonic() - t0
    assert load.run_for(1.0, bound, "traffic during the outage") == live
    prov = provider(d, name)
    assert d.status()["discovery"]["clusters"][cluster]["endpoints"] == len(live)
    assert prov["staleness_seconds"] > 0 and prov["last_error"]
    value = metric(d, "dispa_discovery_staleness_seconds", f'provider="{name}"')
    assert value is not None and value > 0, f"dispa_discovery_staleness_seconds: {value}"
    return took


def print_timings(label: str, timings: dict[str, float], load: Load) -> None:
    print(f"{label} timings (s):", json.dumps({k: round(v, 2) for k, v in timings.items()}),
          "requests:", load.count())


def write_config(tmp_path: Path, port: int, admin_port: int, body: str) -> Path:
    """``tmp_path/dispa.toml``: a 2-worker server on ``port``, ``body``, and the admin
    listener (/admin/status, /metrics) on ``admin_port``."""
    path = tmp_path / "dispa.toml"
    path.write_text(f"""
[server]
bind_address = "127.0.0.1:{port}"
workers = 2
{body}
[monitoring]
enabled = true
bind_host = "127.0.0.1"
metrics_port = {admin_port}
health_check_port = {admin_port}
""")
    return path


def discovered_api(provider: str, static_url: str, source: str) -> str:
    """TOML for ``write_config``: the target group ``api`` discovered by ``provider``
    (``source``: the rest of its [target_groups.discovery]) and routed to by default, next
    to a static target ``static`` that its traffic must never fall back to. It ends inside
    [service_discovery] (its provider set) for the caller to go on."""
    return f"""
[[targets.targets]]
name = "static"
url = "{static_url}"

[targets.health_check]
enabled = false

[[target_groups]]
name = "api"

[target_groups.discovery]
provider = "{provider}"
{source}
[target_groups.health_check]
enabled = false

[routing]
default_target = "api"

[service_discovery]
provider = "{provider}"
"""


def kubeconfig(tmp_path: Path, server_url: str, token: str) -> Path:
    """A kubeconfig for the API double at ``server_url`` (bearer ``token``, namespace
    ``shop``)."""
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "e2e",
        "contexts": [{"name": "e2e", "context": {"cluster": "double", "user": "dispa",
                                                 "namespace": "shop"}}],
        "clusters": [{"name": "double", "cluster": {"server": server_url}}],
        "users": [{"name": "dispa", "user": {"token": token}}]}))
    return path


def start_origins(names=(), hosts: dict[str, str] | None = None) -> Iterator[dict[str, Origin]]:
    """For a fixture (``yield from``): origins by name, stopped afterwards. With ``hosts``
    (name -> loopback address) they all listen on one port, as a Service's pods or the
    addresses of one DNS name do."""
    started: dict[str, Origin] = {}
    try:
        if hosts:
            port = 0
            for name, host in hosts.items():
                started[name] = Origin(name, host=host, port=port).start()
                port = started[name].port
        else:
            for name in names:
                started[name] = Origin(name).start()
        yield started
    finally:
        for o in started.values():
            o.stop()


def served_by(port: int, path: str) -> str:
    """The origin (its X-Origin) that served ``GET path`` through Dispa, or the status."""
    status, headers, _ = http_get(port, path)
    return headers.get("x-origin", "") if status == 200 else f"status {status}"
