"""The worker's compiled view of one Snapshot: what a request needs, ready to use.

Built off to the side when a snapshot arrives (``build_runtime``), then swapped in with one
attribute assignment; sessions take a reference to the runtime current at their request
head, so a swap never changes the rules under a request in flight.

State that must survive a swap (pools, endpoint health, in-flight counts) lives in
:class:`WorkerState`, keyed by stable ids: cluster name and endpoint id.
"""

from __future__ import annotations

import asyncio
import time

from dispa.balancer import build_selector
from dispa.config.snapshot import ClusterSpec, Snapshot
from dispa.proxy.forwarding import FORWARDING_HEADERS, TrustedProxies
from dispa.plugins.chain import StatsRegistry
from dispa.proxy.mirror import Mirrors
from dispa.proxy.pipeline import Pipeline
from dispa.proxy.protocol import Pool
from dispa.routing.vhost import InterceptTable

# How long a worker avoids an endpoint after a failed connect when no active health check
# will tell it the endpoint is back (nginx's fail_timeout default is 10 s).
PASSIVE_DOWN_SECONDS = 10.0


class ClusterRuntime:
    """A cluster's endpoints, selector, pools and health, as one worker sees them."""

    __slots__ = ("name", "spec", "endpoints", "selector", "pools", "healthy", "down_until",
                 "_all_up", "sticky", "ep_timeouts", "ep_ids")

    def __init__(self, spec: ClusterSpec, state: "WorkerState"):
        self.name = spec.name
        self.spec = spec
        self.endpoints = spec.endpoints
        self.selector = build_selector(spec.lb, [e.weight for e in spec.endpoints])
        self.pools = [state.pool_for(e.id, e.host, e.port, spec.pool) for e in spec.endpoints]
        self.healthy = [state.health.get(f"{spec.name}/{e.id}", True) for e in spec.endpoints]
        self.down_until = [0.0] * len(spec.endpoints)
        self._all_up = all(self.healthy)
        self.sticky = spec.sticky_sessions
        self.ep_timeouts = tuple(float(e.timeout_seconds) for e in spec.endpoints)
        self.ep_ids = tuple(e.id for e in spec.endpoints)

    def set_health(self, endpoint_id: str, healthy: bool) -> None:
        for i, e in enumerate(self.endpoints):
            if e.id == endpoint_id:
                self.healthy[i] = healthy
                if healthy:
                    self.down_until[i] = 0.0
        self._recompute()

    def _recompute(self) -> None:
        now = time.monotonic()
        self._all_up = all(h and d <= now for h, d in zip(self.healthy, self.down_until))

    def mark_failed(self, i: int) -> None:
        """Passive signal: connecting to endpoint ``i`` failed."""
        self.down_until[i] = time.monotonic() + PASSIVE_DOWN_SECONDS
        self._all_up = False

    def health_view(self) -> list[bool] | None:
        """None when every endpoint is usable (the selector's fast path), else a mask.

        If every endpoint is down we return all-True rather than failing every request:
        trying a possibly-dead endpoint beats a guaranteed 502 (nginx does the same when all
        peers are marked failed).
        """
        if self._all_up:
            return None
        now = time.monotonic()
        view = [h and d <= now for h, d in zip(self.healthy, self.down_until)]
        if all(view):
            self._all_up = True
            return None
        if not any(view):
            return None
        return view

    def pick(self, client_ip: str, exclude: set[int] | None) -> int:
        view = self.health_view()
        key = client_ip.encode() if self.sticky else None
        if exclude:
            return self.selector.pick_excluding(view, exclude, key)
        if self.sticky:
            return self._sticky_pick(view, key)
        return self.selector.pick(view, key)

    def _sticky_pick(self, view, key: bytes) -> int:
        # Pin a client IP to an endpoint by hashing it over the usable endpoints (the
        # original `sticky_sessions`: client-IP affinity). Rendezvous hashing keeps most
        # clients in place when an endpoint leaves or returns.
        import zlib
        best, best_score = -1, -1
        for i, e in enumerate(self.endpoints):
            if view is not None and not view[i]:
                continue
            score = zlib.crc32(key + e.id.encode()) * e.weight
            if score > best_score:
                best, best_score = i, score
        return best


class WorkerState:
    """Everything a worker keeps across snapshots."""

    def __init__(self, loop: asyncio.AbstractEventLoop, metrics=None):
        self.loop = loop
        self.metrics = metrics
        # Pools are keyed by endpoint and pool settings: clusters that share an endpoint
        # with the same settings share its idle connections.
        self.pools: dict[tuple, Pool] = {}
        self.health: dict[str, bool] = {}  # "cluster/endpoint_id" -> healthy
        self.plugin_stats = StatsRegistry(metrics)
        self.mirrors = Mirrors(metrics)

    def pool_for(self, endpoint_id: str, host: str, port: int, spec) -> Pool:
        key = (endpoint_id, spec)
        pool = self.pools.get(key)
        if pool is None:
            pool = Pool(self.loop, host, port, spec)
            self.pools[key] = pool
        return pool

    def retire_unused_pools(self, runtime: "Runtime") -> None:
        used = {(e.id, c.spec.pool) for c in runtime.clusters.values() for e in c.endpoints}
        for key in [k for k in self.pools if k not in used]:
            self.pools.pop(key).close()


class Runtime:
    """One snapshot, compiled for the request path."""

    def __init__(self, snapshot: Snapshot, state: WorkerState):
        self.version = snapshot.version
        self.snapshot = snapshot
        p = snapshot.proxy
        self.proxy = p
        self.intercept = InterceptTable(snapshot.intercept)
        self.reject_status = snapshot.intercept.reject_status
        self.reject_body = snapshot.intercept.reject_body.encode("utf-8")
        self.trusted = TrustedProxies(p.trusted_proxies)
        self.via = p.via.encode("latin-1")
        self.request_id_header = p.request_id_header.lower().encode("latin-1")
        # Dropped from the downstream copy of a request head: forwarding headers (rebuilt),
        # Expect (we answer 100-continue ourselves) and the request-id header (ours replaces
        # the client's one, so the upstream never sees two).
        self.drop_request = FORWARDING_HEADERS | {b"expect"} | (
            {self.request_id_header} if self.request_id_header else set())
        self.clusters = {c.name: ClusterRuntime(c, state) for c in snapshot.clusters}
        self.default_cluster = self.clusters[snapshot.default_cluster]
        # routing rules and filters; None keeps every request on the compiled fast path
        pipeline = Pipeline(snapshot.pipeline, self, state)
        self.pipeline = None if pipeline.trivial else pipeline
        self.limits = p.limits
        self.parser_kwargs = dict(
            max_head_bytes=p.limits.max_head_bytes,
            max_header_count=p.limits.max_header_count,
            max_line_bytes=p.limits.max_line_bytes,
            max_chunk_ext_bytes=p.limits.max_chunk_ext_bytes,
            allow_bare_lf=p.limits.allow_bare_lf,
        )

    def set_health(self, key: str, healthy: bool) -> None:
        cluster_name, _, endpoint_id = key.partition("/")
        cluster = self.clusters.get(cluster_name)
        if cluster is not None:
            cluster.set_health(endpoint_id, healthy)


def build_runtime(snapshot: Snapshot, state: WorkerState) -> Runtime:
    """Compile ``snapshot`` for this worker (may raise: the caller NACKs the version)."""
    runtime = Runtime(snapshot, state)
    state.retire_unused_pools(runtime)
    return runtime
