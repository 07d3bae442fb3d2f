"""Active health checks (run by the master) and the sans-I/O health state machine.

The master probes every endpoint of every cluster whose ``health_check.enabled`` is set:
an HTTP/1.1 ``GET <path>`` with ``Connection: close`` every ``interval_seconds``, failing on
connect errors, a timeout, or an unexpected status. ``healthy_threshold`` consecutive
successes make an endpoint healthy, ``unhealthy_threshold`` consecutive failures make it
unhealthy (the original `[targets.health_check]` semantics). Only changes are pushed to the
workers. Endpoints start healthy, so a fresh start serves at once (nginx does the same).

Workers report failed connects (passive signals); the master answers with an immediate
probe of that endpoint instead of waiting for the next interval.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable

from dispa.tls.upstream import upstream_tls
from dispa.config.snapshot import ClusterSpec, EndpointSpec, HealthCheckSpec

log = logging.getLogger("dispa.health")

_PROBE_MIN_GAP_SECONDS = 1.0  # passive signals trigger at most one extra probe per second


class HealthState:
    """Consecutive-result thresholds as a tiny state machine (no I/O, no clock)."""

    __slots__ = ("healthy", "healthy_threshold", "unhealthy_threshold", "successes", "failures")

    def __init__(self, healthy_threshold: int, unhealthy_threshold: int, healthy: bool = True):
        self.healthy = healthy
        self.healthy_threshold = max(1, healthy_threshold)
        self.unhealthy_threshold = max(1, unhealthy_threshold)
        self.successes = 0
        self.failures = 0

    def observe(self, ok: bool) -> bool:
        """Record one probe result; return True when ``healthy`` flipped."""
        if ok:
            self.successes += 1
            self.failures = 0
            if not self.healthy and self.successes >= self.healthy_threshold:
                self.healthy = True
                return True
        else:
            self.failures += 1
            self.successes = 0
            if self.healthy and self.failures >= self.unhealthy_threshold:
                self.healthy = False
                return True
        return False


def status_ok(status: int, spec: HealthCheckSpec) -> bool:
    if spec.expected_status:
        return status in spec.expected_status
    return 200 <= status < 400


async def probe(endpoint: EndpointSpec, spec: HealthCheckSpec, tls=None) -> tuple[bool, str]:
    """One HTTP probe; returns (ok, detail). ``tls``: an https:// endpoint's
    ``dispa.tls.upstream.UpstreamTls`` (the probe then speaks TLS, as the pool does)."""
    host = spec.host or f"{endpoint.host}:{endpoint.port}"
    req = (f"GET {spec.path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: dispa-health-check\r\n"
           "Connection: close\r\n\r\n").encode("latin-1")
    writer = None
    try:
        async with asyncio.timeout(spec.timeout_seconds):
            if tls is None:
                reader, writer = await asyncio.open_connection(endpoint.host, endpoint.port)
            else:
                reader, writer = await asyncio.open_connection(
                    endpoint.host, endpoint.port, ssl=tls.context,
                    server_hostname=tls.server_name)
            writer.write(req)
            line = await reader.readline()
        parts = line.split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
            return False, f"malformed status line {line[:40]!r}"
        status = int(parts[1])
        if status_ok(status, spec):
            return True, f"status {status}"
        return False, f"unexpected status {status}"
    except TimeoutError:
        return False, "timeout"
    except OSError as exc:
        return False, exc.strerror or str(exc)
    except Exception as exc:  # noqa: BLE001 - e.g. a status line over the stream limit
        return False, f"probe failed: {type(exc).__name__}"
    finally:
        if writer is not None:
            writer.close()


async def tcp_probe(endpoint: EndpointSpec, spec: HealthCheckSpec) -> tuple[bool, str]:
    """One TCP connect check (the endpoints of L4 target groups, docs/l4.md): healthy when
    a connection is accepted within ``timeout_seconds``; closed at once, nothing sent."""
    try:
        async with asyncio.timeout(spec.timeout_seconds):
            _, writer = await asyncio.open_connection(endpoint.host, endpoint.port)
        writer.close()
        return True, "connected"
    except TimeoutError:
        return False, "timeout"
    except OSError as exc:
        return False, exc.strerror or str(exc)


async def _grpc_check(endpoint: EndpointSpec, spec: HealthCheckSpec,
                      tls: dict | None) -> tuple[bool, str]:
    """grpc.health.v1 Check over h2c, or h2 with ALPN for an https:// endpoint."""
    from types import SimpleNamespace

    from dispa.protocols.http2.grpc_health import grpc_probe, h2_client_context
    up = (tls or {}).get("upstream")
    ctx = None
    if up and endpoint.id in up.get("endpoints", ()):
        up = (up.get("per_endpoint") or {}).get(endpoint.id) or up
        ctx = SimpleNamespace(context=h2_client_context(up),
                              server_name=up.get("server_name") or endpoint.host)
    return await grpc_probe(endpoint, spec, ctx)


class HealthChecker:
    """Runs the probes and calls ``on_change({"cluster/endpoint": healthy})`` on flips."""

    def __init__(self, on_change: Callable[[dict[str, bool]], None]):
        self.on_change = on_change
        self.tls = None  # Snapshot.tls: which endpoints are https:// (set by the master)
        # clusters probed with a TCP connect instead of HTTP: L4 target groups (the master)
        self.tcp_clusters: frozenset[str] = frozenset()
        # clusters probed with grpc.health.v1 over HTTP/2: upstream h2/h2c groups (the master)
        self.grpc_clusters: frozenset[str] = frozenset()
        self.states: dict[str, HealthState] = {}
        self.details: dict[str, dict] = {}
        self._tasks: dict[str, asyncio.Task] = {}
        self._specs: dict[str, tuple[EndpointSpec, HealthCheckSpec]] = {}
        self._wake: dict[str, asyncio.Event] = {}
        self._last_probe: dict[str, float] = {}

    def health_map(self) -> dict[str, bool]:
        return {k: s.healthy for k, s in self.states.items()}

    def configure(self, clusters: tuple[ClusterSpec, ...]) -> None:
        """Start, keep or stop probe tasks to match ``clusters`` (state kept by stable key)."""
        wanted: dict[str, tuple[EndpointSpec, HealthCheckSpec]] = {}
        for c in clusters:
            if not c.health_check.enabled:
                continue
            for e in c.endpoints:
                wanted[f"{c.name}/{e.id}"] = (e, c.health_check)
        for key in [k for k in self._tasks if k not in wanted or wanted[k] != self._specs[k]]:
            self._tasks.pop(key).cancel()
        revived = {}
        for key in [k for k in self.states if k not in wanted]:
            # No longer checked: forget it, and tell the workers it is usable again, or an
            # endpoint that was down when its checks were switched off would stay out forever.
            if not self.states.pop(key).healthy:
                revived[key] = True
            self.details.pop(key, None)
        for key, (endpoint, spec) in wanted.items():
            self._specs[key] = (endpoint, spec)
            st = self.states.get(key)
            if st is None:
                self.states[key] = HealthState(spec.healthy_threshold, spec.unhealthy_threshold)
            else:
                st.healthy_threshold = max(1, spec.healthy_threshold)
                st.unhealthy_threshold = max(1, spec.unhealthy_threshold)
            if key not in self._tasks:
                self._wake[key] = asyncio.Event()
                self._tasks[key] = asyncio.ensure_future(self._run(key))
        if revived:
            self.on_change(revived)

    def passive_failure(self, key: str) -> None:
        """A worker failed to connect: probe that endpoint now (rate-limited)."""
        ev = self._wake.get(key)
        if ev is not None and time.monotonic() - self._last_probe.get(key, 0.0) > _PROBE_MIN_GAP_SECONDS:
            ev.set()

    async def _run(self, key: str) -> None:
        while True:
            endpoint, spec = self._specs[key]
            self._last_probe[key] = time.monotonic()
            self._wake[key].clear()  # a passive wake-up during this probe is kept
            if key.partition("/")[0] in self.tcp_clusters:
                ok, detail = await tcp_probe(endpoint, spec)
            elif key.partition("/")[0] in self.grpc_clusters:
                ok, detail = await _grpc_check(endpoint, spec, self.tls)
            else:
                ok, detail = await probe(endpoint, spec, upstream_tls(self.tls, endpoint.id,
                                                                      endpoint.host))
            st = self.states.get(key)
            if st is None:
                return
            self.details[key] = {"ok": ok, "detail": detail, "at": time.time(),
                                 "healthy": st.healthy}
            if st.observe(ok):
                self.details[key]["healthy"] = st.healthy
                log.warning("endpoint %s is now %s (%s)", key,
                            "healthy" if st.healthy else "unhealthy", detail,
                            extra={"fields": {"endpoint": key, "healthy": st.healthy,
                                              "detail": detail}})
                self.on_change({key: st.healthy})
            ev = self._wake[key]
            try:
                await asyncio.wait_for(ev.wait(), spec.interval_seconds)
            except TimeoutError:
                pass

    def close(self) -> None:
        for t in self._tasks.values():
            t.cancel()
        self._tasks.clear()
