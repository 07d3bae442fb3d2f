"""What the service-discovery end-to-end tests share: a bounded keep-alive load through
Dispa, and waits on what /admin/status says is *published*.

Why ``published`` and not the discovered set: the watcher records a registry's answer at
once but publishes at most once per ``throttle`` window, so a test that waits on the
discovered set can go on (and, say, stop an origin) while the workers still route to it.
``published`` waits until the snapshot in force has the expected endpoints, nothing is
pending, and every ready worker has acknowledged that snapshot's version.
"""

from __future__ import annotations

import http.client
import re
import threading
import time

from tests.support.dispa_proc import DispaProcess

__all__ = ["Load", "converged", "metric", "published"]


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
