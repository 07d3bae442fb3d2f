"""The worker's compiled view of one Snapshot: what a request needs, ready to use.

Built off to the side when a snapshot arrives (``build_runtime``), then swapped in with one
attribute assignment; sessions take a reference to the runtime current at their request
head, so a swap never changes the rules under a request in flight.

State that must survive a swap (pools, endpoint health, in-flight counts) lives in
:class:`WorkerState`, keyed by stable ids: cluster name and endpoint id.
"""

from __future__ import annotations

import asyncio
import random
import time

import msgspec

from dispa.balancer import build_selector
from dispa.balancer.breaker import BreakerConfig, GroupBreaker, GroupBreakerConfig
from dispa.balancer.consistent import ConsistentHash
from dispa.balancer.ewma import PeakEwma
from dispa.balancer.hash_key import compile_hash_key
from dispa.balancer.outlier import OutlierConfig, OutlierDetector
from dispa.balancer.retry_budget import RetryBudgetConfig, build_retry_budget
from dispa.balancer.sticky import StickyConfig, StickyPolicy
from dispa.config.snapshot import ClusterSpec, Snapshot
from dispa.proxy.forwarding import FORWARDING_HEADERS, TrustedProxies
from dispa.plugins.chain import StatsRegistry
from dispa.observability.exchange import Observers, SinkContext
from dispa.observability.tracing_gate import log_gate_of
from dispa.proxy.mirror import Mirrors
from dispa.proxy.pipeline import Pipeline
from dispa.proxy.protocol import Pool
from dispa.routing.vhost import InterceptTable
from dispa.tls.upstream import set_pool_tls, upstream_tls

# How long a worker avoids an endpoint after a failed connect when no active health check
# will tell it the endpoint is back (nginx's fail_timeout default is 10 s).
PASSIVE_DOWN_SECONDS = 10.0


class ClusterRuntime:
    """A cluster's endpoints, selector, pools and health, as one worker sees them."""

    __slots__ = ("name", "spec", "endpoints", "selector", "pools", "healthy", "down_until",
                 "_all_up", "sticky", "ep_timeouts", "ep_ids", "hash_key", "tracks",
                 "breakers", "outlier", "budget", "observe", "pick", "sticky_policy",
                 "cookie", "_rnd")

    def __init__(self, spec: ClusterSpec, state: "WorkerState"):
        self.name = spec.name
        self.spec = spec
        self.endpoints = spec.endpoints
        self.selector, self.hash_key = _selector(spec, state)
        self.pools = [state.pool_for(e.id, e.host, e.port, spec.pool) for e in spec.endpoints]
        for e, pool in zip(spec.endpoints, self.pools):
            # https:// endpoints connect with TLS (docs/tls.md); None: plain TCP
            set_pool_tls(pool, upstream_tls(state.tls, e.id, e.host))
        self.healthy = [state.health.get(f"{spec.name}/{e.id}", True) for e in spec.endpoints]
        self.down_until = [0.0] * len(spec.endpoints)
        self._all_up = all(self.healthy)
        self.sticky = spec.sticky_sessions
        self.ep_timeouts = tuple(float(e.timeout_seconds) for e in spec.endpoints)
        self.ep_ids = tuple(e.id for e in spec.endpoints)
        n = len(spec.endpoints)
        # Resilience state is per worker and per snapshot (a reload starts it afresh, as a
        # changed endpoint set would make old indexes meaningless).
        self.breakers = None
        if (spec.breaker is not None or spec.group_breaker is not None) and n:
            self.breakers = GroupBreaker(
                n, msgspec.convert(spec.breaker, BreakerConfig) if spec.breaker else None,
                msgspec.convert(spec.group_breaker, GroupBreakerConfig)
                if spec.group_breaker else None)
        self.outlier = (OutlierDetector(n, msgspec.convert(spec.outlier, OutlierConfig))
                        if spec.outlier is not None and n else None)
        self.budget = (build_retry_budget(msgspec.convert(spec.retry_budget,
                                                          RetryBudgetConfig))
                       if spec.retry_budget is not None else None)
        per_try = getattr(self.budget, "per_try_timeout", None)
        if per_try:
            # each attempt (first try or retry) waits at most per_try_timeout for its head
            self.ep_timeouts = tuple(min(t, float(per_try)) for t in self.ep_timeouts)
        self.observe = getattr(self.selector, "observe", None)  # latency-aware selectors
        self._rnd = random.random
        self.sticky_policy = None
        self.cookie = None  # Set-Cookie of the last pick (taken by the session at once)
        if spec.sticky is not None and n:
            self.sticky_policy = StickyPolicy(msgspec.convert(spec.sticky, StickyConfig),
                                              [e.id for e in spec.endpoints],
                                              [e.weight for e in spec.endpoints])
        # tracks: the session reports outcomes (pick/report below take the slow path)
        self.tracks = bool(self.breakers or self.outlier or self.budget or self.observe
                           or self.sticky_policy)
        # pick(client_ip, exclude, head) -> endpoint index; -1: none usable, -2: the group's
        # breaker is open (answered 503 at once). Bound once: one call per request.
        self.pick = self._pick_guarded if self.tracks else self._pick_plain
        if n == 0:
            # an empty cluster (service discovery answered "no instances"): every request
            # gets 503 "no upstream endpoint available" (docs/discovery.md)
            self.tracks = False
            self.pick = _pick_none

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

    def usable(self) -> bool:
        """Some endpoint is healthy and not passively marked down (geo failover)."""
        if self._all_up:
            return bool(self.endpoints)  # an empty (discovered) cluster is not usable
        now = time.monotonic()
        return any(h and d <= now for h, d in zip(self.healthy, self.down_until))

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

    def _key(self, client_ip: str, head) -> bytes | None:
        hk = self.hash_key
        if hk is None or head is None:
            return client_ip.encode() if self.sticky else None
        target = head.target
        path, _, query = target.partition(b"?")
        return hk.build(head.method, path, query, head.headers, client_ip)

    def _pick_guarded(self, client_ip: str, exclude, head=None) -> int:
        now = time.monotonic()
        breakers = self.breakers
        if breakers is not None and not breakers.admit(now):
            return -2
        view = self.health_view()
        if breakers is not None:
            view = breakers.mask(now, view)
        if self.outlier is not None:
            view = self.outlier.mask(now, view)
        if view is not None and not any(view):
            return -1  # every endpoint's breaker is open (or ejected): fail fast
        key = self._key(client_ip, head)
        policy = self.sticky_policy
        if policy is not None and not exclude:
            i = self._sticky_choose(policy, view, key, client_ip, head)
            if i >= 0 and (breakers is None or breakers.allow_endpoint(i, now)):
                if self.budget is not None:
                    self.budget.deposit(now)
                return i
            self.cookie = None
        tried = set(exclude) if exclude else set()
        for _ in range(len(self.endpoints)):
            if tried:
                i = self.selector.pick_excluding(view, tried, key)
            else:
                i = self.selector.pick(view, key)
            if i < 0 or breakers is None:
                break
            if key is None and len(tried) + 1 < len(self.endpoints):
                # slow start after a recovery: the endpoint takes only `factor` of its
                # share (the rest goes to the next pick); hashed keys stay put
                factor = breakers.endpoints[i].weight_factor(now)
                if 0.0 < factor < 1.0 and self._rnd() >= factor:
                    tried.add(i)
                    i = -1
                    continue
            if breakers.allow_endpoint(i, now):
                break
            tried.add(i)  # half-open with its probes in flight: try another
            i = -1
        if i < 0 and tried and not exclude and breakers is not None:
            # every candidate was deferred by slow start: take the selector's own choice
            i = self.selector.pick(view, key)
            if i >= 0 and not breakers.allow_endpoint(i, now):
                i = -1
        if i >= 0 and self.budget is not None and not exclude:
            self.budget.deposit(now)
        return i

    def _sticky_choose(self, policy, view, key, client_ip: str, head) -> int:
        cfg = policy.config
        cookie = header = None
        if head is not None:
            if cfg.mode == "cookie":
                cookie = b"; ".join([v for k, v in head.headers if k.lower() == b"cookie"]
                                    ).decode("latin-1") or None
            elif cfg.mode == "header":
                want = cfg.header_name.lower().encode("latin-1")
                header = next((v.decode("latin-1") for k, v in head.headers
                               if k.lower() == want), None)
        choice = policy.choose(time.time(), view, lambda h: self.selector.pick(h, key),
                               client_ip=client_ip, cookie_header=cookie, header_value=header)
        self.cookie = choice.set_cookie.encode("latin-1") if choice.set_cookie else None
        return choice.index

    def take_cookie(self) -> bytes | None:
        """The Set-Cookie value the last pick asked for (sticky cookie mode), once."""
        c, self.cookie = self.cookie, None
        return c

    def report(self, i: int, status: int, duration: float) -> None:
        """Outcome of one attempt on endpoint ``i``: an HTTP status, or 0 for a failure
        before a response (connect error, reset, timeout)."""
        now = time.monotonic()
        ok = 0 < status < 500
        if self.breakers is not None:
            self.breakers.record(i, now, ok, duration)
        if self.outlier is not None:
            self.outlier.record(i, now, status)
        if self.observe is not None and status:
            self.observe(i, duration, now)
        if self.budget is not None:
            self.budget.request_done()

    def retry_allowed(self) -> bool:
        """A retry may go out (the retry budget, when configured, has room)."""
        if self.budget is None:
            return True
        if self.budget.try_withdraw(time.monotonic()):
            self.budget.retry_done()
            return True
        return False

    def snapshot(self) -> dict:
        """Resilience state for metrics and /admin/status."""
        now = time.monotonic()
        out: dict = {}
        if self.breakers is not None:
            out["breakers"] = self.breakers.snapshot(now)
        if self.outlier is not None:
            out["outlier"] = self.outlier.snapshot(now)
        if self.budget is not None:
            out["retry_budget"] = self.budget.snapshot(now)
        if self.sticky_policy is not None:
            out["sticky"] = self.sticky_policy.snapshot()
        return out

    def _pick_plain(self, client_ip: str, exclude, head=None) -> int:
        view = self.health_view()
        key = self._key(client_ip, head) if self.hash_key is not None else (
            client_ip.encode() if self.sticky else None)
        if exclude:
            return self.selector.pick_excluding(view, exclude, key)
        if self.sticky and self.hash_key is None:
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


def _pick_none(client_ip: str, exclude, head=None) -> int:
    return -1


class _NoEndpoints:
    """The selector of an empty cluster: nothing to pick."""

    def pick(self, healthy, key=None) -> int:
        return -1

    def pick_excluding(self, healthy, exclude, key=None) -> int:
        return -1

    def acquire(self, i: int) -> None:
        pass

    def release(self, i: int) -> None:
        pass


def _selector(spec: ClusterSpec, state):
    """The cluster's selector and, for hashing ones, its compiled hash key."""
    if not spec.endpoints:
        return _NoEndpoints(), None
    weights = [e.weight for e in spec.endpoints]
    opts = spec.lb_options
    if spec.lb in ("consistent_hash", "maglev"):
        # node names as nginx's `server` lines spell them, so placement matches nginx
        nodes = [(e.id, e.weight) for e in spec.endpoints]
        if spec.lb == "maglev":
            sel = ConsistentHash(nodes, mode="maglev", table_size=opts.get("table_size", 65537))
        else:
            sel = ConsistentHash(nodes, points_per_weight=opts.get("virtual_nodes", 160),
                                 bounded_factor=opts.get("bounded_load_factor"))
        return sel, compile_hash_key(opts.get("hash_key", "client_ip"))
    if spec.lb == "peak_ewma":
        return PeakEwma(weights, decay_seconds=opts.get("decay_seconds", 10.0),
                        initial_latency_seconds=opts.get("initial_latency_seconds", 0.03)), None
    return build_selector(spec.lb, weights), None


class WorkerState:
    """Everything a worker keeps across snapshots."""

    def __init__(self, loop: asyncio.AbstractEventLoop, metrics=None, worker_id: int = 0):
        self.loop = loop
        self.metrics = metrics
        # log-phase sinks (access log, traffic records, tracing, custom metrics)
        self.observers = Observers(SinkContext(loop, metrics, worker_id))
        # Pools are keyed by endpoint and pool settings: clusters that share an endpoint
        # with the same settings share its idle connections.
        self.pools: dict[tuple, Pool] = {}
        self.health: dict[str, bool] = {}  # "cluster/endpoint_id" -> healthy
        self.plugin_stats = StatsRegistry(metrics)
        self.mirrors = Mirrors(metrics)
        self.tls = None  # Snapshot.tls of the runtime being built (upstream TLS)

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
        # the client-certificate header is ours to set (TLS listener); never the client's
        tls = snapshot.tls or {}
        self.client_cert_header = (tls.get("client_cert_header") or "").encode("latin-1")
        if self.client_cert_header:
            self.drop_request = self.drop_request | {self.client_cert_header}
        state.tls = snapshot.tls
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
        # Last, once nothing else can fail: the log-phase sinks for this snapshot. None
        # when none is configured; the Session then builds no Exchange record at all.
        self.log_exchange = state.observers.configure(snapshot)
        # which exchanges the sinks can use, when they all say (tracing alone); None: all
        self.log_gate = (log_gate_of(state.observers.sinks)
                         if self.log_exchange is not None else None)
        # the tracing sink alone: the Session queues the traces it started straight to it
        # (TracingSink.put_started), building no Exchange on the loop
        sinks = state.observers.sinks
        self.trace_sink = (sinks[0] if self.log_gate is not None and len(sinks) == 1
                           and hasattr(sinks[0], "put_started") else None)
        if state.metrics is not None:
            obs = snapshot.observability or {}
            state.metrics.configure_buckets(obs.get("histogram_buckets") or {})

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
