"""Snapshot: the immutable, compiled form of the configuration that workers run.

Theory of operation
-------------------
The master loads and validates the configuration (``config.load``), compiles it
(``config.compile``) into one :class:`Snapshot` and sends it to every worker as a msgpack
frame (``server.channel``). A worker builds its runtime tables from it off to the side and
swaps one reference between requests. The snapshot holds only plain data (frozen msgspec
Structs): no sockets, no compiled regexes, nothing process-bound, so it crosses the
process boundary as bytes and compares by value.

Rules:

1. Ids are stable across reloads: an endpoint is ``host:port``, a cluster is its name.
   Runtime state that must survive a reload (health, pools, counters) is keyed by them.
2. ``version`` is a content hash of everything else, so an unchanged configuration yields
   the same version and workers can skip the rebuild.
3. Static settings (listeners, worker count, admin ports) live in :class:`StaticSpec`;
   a change there needs new workers (rolling restart), not a snapshot swap.

WARNING: the worker (``server/worker.py``, ``proxy/*``) reads these fields by name; a rename
here is a rename there.
"""

from __future__ import annotations

import hashlib

from typing import Any

import msgspec


class EndpointSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One upstream address of a cluster."""

    id: str  # "host:port", stable across reloads
    name: str  # the operator's name for it (the original `targets.targets[].name`)
    host: str
    port: int
    weight: int = 1
    timeout_seconds: float = 30.0  # whole upstream exchange, from connect to last byte


class HealthCheckSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Active health checking, run by the master (original `[targets.health_check]`)."""

    enabled: bool = True
    interval_seconds: float = 30.0
    timeout_seconds: float = 10.0
    healthy_threshold: int = 2
    unhealthy_threshold: int = 3
    path: str = "/"
    expected_status: tuple[int, ...] = ()  # empty: any 2xx or 3xx is healthy
    host: str = ""  # Host header for the probe; empty: the endpoint's host:port


class PoolSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Keep-alive connection pool limits, per endpoint and per worker."""

    max_idle: int = 64
    max_total: int = 1024
    idle_timeout_seconds: float = 60.0
    connect_timeout_seconds: float = 5.0
    read_timeout_seconds: float = 30.0  # between two reads from the upstream
    write_timeout_seconds: float = 30.0  # waiting for the upstream to drain our writes


class ClusterSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A named group of interchangeable endpoints and how to pick one."""

    name: str
    endpoints: tuple[EndpointSpec, ...]
    lb: str = "roundrobin"  # roundrobin | weighted | leastconnections | random
    sticky_sessions: bool = False  # pin a client IP to an endpoint while it is healthy
    health_check: HealthCheckSpec = HealthCheckSpec()
    pool: PoolSpec = PoolSpec()
    max_retries: int = 1  # extra attempts for idempotent requests when nothing was sent
    # Per-type balancing options (consistent_hash: virtual_nodes, hash_key, ...).
    lb_options: dict = msgspec.field(default_factory=dict)
    # Resilience tables as plain data (balancer/*Config shapes), None when absent.
    breaker: Any = None
    group_breaker: Any = None
    outlier: Any = None
    retry_budget: Any = None
    sticky: Any = None  # balancer.sticky.StickyConfig as plain data
    protocol: str = "http1"  # http1 | h2c | h2 (upstream HTTP/2: proxy/h2_pool.py)


class InterceptSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Which Host names Dispa proxies (original `[domains]`).

    Names are lowercase without port. ``wildcard_suffixes`` hold ``.test.com`` for a
    configured ``*.test.com``; a wildcard matches any deeper name but not the bare suffix.
    ``exclude_*`` win over intercepts. An empty intercept list intercepts every host.
    """

    exact: tuple[str, ...] = ()
    wildcard_suffixes: tuple[str, ...] = ()
    exclude_exact: tuple[str, ...] = ()
    exclude_wildcard_suffixes: tuple[str, ...] = ()
    wildcard_support: bool = True
    intercept_all: bool = False
    reject_status: int = 404  # answer for a host that is not intercepted
    reject_body: str = "host not served by this proxy\n"


class Http1Limits(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Parser limits; see protocols/http1/limits.py for the precedents."""

    max_head_bytes: int = 65536
    max_header_count: int = 100
    max_line_bytes: int = 8192  # request line (414 when exceeded)
    max_chunk_ext_bytes: int = 1024
    allow_bare_lf: bool = False  # dangerous leniency; off by default


class ProxySpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Per-request behaviour of the data plane that can change at reload."""

    keep_alive_timeout_seconds: float = 60.0  # idle downstream keep-alive connection
    request_timeout_seconds: float = 30.0  # whole request, head to last response byte
    header_timeout_seconds: float = 10.0  # first byte to complete request head (slowloris)
    trusted_proxies: tuple[str, ...] = ()  # CIDRs whose X-Forwarded-*/Forwarded we keep
    via: str = "dispa"  # pseudonym for Via; empty: no Via header
    request_id_header: str = "x-request-id"  # generated when absent; empty: off
    limits: Http1Limits = Http1Limits()


class ListenerSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A downstream listening address; each worker binds its own SO_REUSEPORT socket."""

    host: str
    port: int
    backlog: int = 1024
    tls: bool = False  # a TLS listener: certificates and settings in Snapshot.tls


class StaticSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Settings that need new workers to change (rolling restart), not a snapshot swap."""

    listeners: tuple[ListenerSpec, ...]
    workers: int = 0  # 0: one per usable CPU
    admin_listeners: tuple[ListenerSpec, ...] = ()  # /health, /metrics, /admin/* (master)
    shutdown_timeout_seconds: float = 30.0


class PluginSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A filter instance: built by each worker with its registered class (by ``type``)."""

    name: str
    type: str
    stage: str = "both"  # request | response | both: which hooks of the filter run
    error_strategy: str = "continue"  # continue | fail
    is_global: bool = True  # in the chain of every request (else only routes that name it)
    timeout_seconds: float = 5.0  # bound on each async hook call
    config: dict = msgspec.field(default_factory=dict)  # checked against the filter's Config


class PipelineSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Routing rules and filters. Empty (the default) keeps every request on the fast path."""

    plugins: tuple[PluginSpec, ...] = ()  # enabled instances, in declared order
    apply_before_domain_match: bool = True  # global request hooks run before interception
    routing: Any = None  # config.routing_model.RoutingConfig, or None without rules
    routing_log: bool = False  # log each routing decision ([routing] enable_logging)
    geo: Any = None  # balancer.geo.GeoRouterConfig as plain data: the "@geo" target


class Snapshot(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Everything a worker needs to serve traffic, compiled and frozen."""

    version: str  # content hash of the rest; see content_version()
    proxy: ProxySpec
    intercept: InterceptSpec
    clusters: tuple[ClusterSpec, ...]
    default_cluster: str
    pipeline: PipelineSpec = PipelineSpec()
    # TLS termination: certificates (PEM, validated by the master), SNI table, protocol and
    # client-auth settings as plain data (dispa/tls); None: no TLS listener.
    tls: Any = None
    # Pending ACME challenges the data plane answers: {"http01": {token: key_authorization},
    # "tls_alpn01": {server_name: [cert_pem, key_pem]}}; None when nothing is pending.
    acme_challenges: Any = None
    # Log-phase features as plain data (access_log, traffic_log, tracing, redaction,
    # custom_metrics, ...; see dispa/observability); None: all off.
    observability: Any = None
    # [websocket] limits and timeouts as plain data (proxy/websocket.py); None: defaults.
    websocket: Any = None
    # [[l4.listeners]] as plain data (dispa/l4); None: no TCP/UDP listener.
    l4: Any = None
    # [http2] settings and abuse limits as plain data (protocols/http2); None: HTTP/2 off.
    http2: Any = None


_encoder = msgspec.msgpack.Encoder()


def content_version(**fields: Any) -> str:
    """The version a snapshot with this content gets: 16 hex digits of a SHA-256 of every
    field but ``version`` (so a new field with its default changes no existing version's
    meaning, only its value once)."""
    blob = _encoder.encode(Snapshot(version="", **fields))
    return hashlib.sha256(blob).hexdigest()[:16]


def make_snapshot(proxy: ProxySpec, intercept: InterceptSpec,
                  clusters: tuple[ClusterSpec, ...], default_cluster: str,
                  **rest: Any) -> Snapshot:
    """Build a Snapshot with its content version filled in; ``rest`` are the optional
    fields (pipeline, tls, observability, ...)."""
    fields = dict(proxy=proxy, intercept=intercept, clusters=clusters,
                  default_cluster=default_cluster, **rest)
    return Snapshot(version=content_version(**fields), **fields)
