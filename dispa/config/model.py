"""The configuration file's model: one msgspec Struct per table of the file.

Theory of operation
-------------------
These Structs describe the file exactly as the operator writes it: the original Dispa TOML
format (``../shared/compat/config.example.toml``), extended with new keys. ``config.load``
builds them table by table (so that every error is reported, not just the first) and
``config.compile`` turns them into the ``Snapshot``/``StaticSpec`` that the runtime uses.

Rules:

1. Every Struct is frozen and rejects unknown keys; per-value constraints live in ``Meta``
   annotations, cross-field rules in ``load._check_*``.
2. Config keys keep the original names (``bind_address``, ``keep_alive_timeout``, seconds
   implied). Python attribute names follow the glossary (docs/glossary.md): the legacy
   ``targets`` table is the attribute ``cluster`` and its ``targets`` list is ``endpoints``;
   ``msgspec.field(name=...)`` keeps the file's spelling. Error paths, the JSON schema and
   ``LoadedConfig.as_dict()`` all use the file's spelling.
3. Choices are tagged unions on ``type`` (``[targets.load_balancing] type = "weighted"``).
4. Every field has a default except ``targets.targets[].name``/``url``; the defaults are
   documented in docs/configuration.md, and tests/unit/config/test_docs.py checks that the
   document names every key.

WARNING: a new key here needs a row in docs/configuration.md, a check in ``load`` if it has
cross-field rules, and a line in ``compile`` if the runtime uses it.
"""

from __future__ import annotations

from typing import Annotated, Literal, Optional, Union

import msgspec
from msgspec import Meta

from dispa.balancer.breaker import BreakerConfig, GroupBreakerConfig
from dispa.balancer.outlier import OutlierConfig
from dispa.balancer.retry_budget import RetryBudgetConfig
from dispa.balancer.sticky import StickyConfig
from dispa.discovery.config import DiscoverySource, ServiceDiscoveryConfig
from dispa.config.logging_model import AccessLogConfig, SanitizationConfig

# Shared value types. Durations are seconds (int or float); the upper bound only catches
# typos such as a value in milliseconds.
MAX_SECONDS = 7 * 24 * 3600
Seconds = Annotated[float, Meta(gt=0, le=MAX_SECONDS, description="seconds (> 0)")]
Port = Annotated[int, Meta(ge=0, le=65535, description="TCP port; 0 lets the OS pick (tests)")]
PositiveInt = Annotated[int, Meta(ge=1)]
NonNegativeInt = Annotated[int, Meta(ge=0)]


class _Table(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Base of every table: frozen, unknown keys rejected."""


# ---------------------------------------------------------------- [server]

class ServerConfig(_Table):
    """``[server]``: the downstream listener and per-request limits."""

    bind_address: str = "0.0.0.0:8080"  # "host:port"; IPv6 as "[::1]:8080"
    workers: Union[PositiveInt, Literal["auto"]] = "auto"
    keep_alive_timeout: Seconds = 60.0
    request_timeout: Seconds = 30.0
    shutdown_timeout: Seconds = 30.0
    header_timeout: Seconds = 10.0
    trusted_proxies: list[str] = msgspec.field(default_factory=list)
    via: str = "dispa"
    request_id_header: str = "x-request-id"
    # Limits: precedents in protocols/http1/limits.py (nginx large_client_header_buffers,
    # h11 DEFAULT_MAX_INCOMPLETE_EVENT_SIZE = 16 KiB, Node.js --max-http-header-size).
    max_head_bytes: Annotated[int, Meta(ge=1024, le=16 * 1024 * 1024)] = 65536
    max_header_count: Annotated[int, Meta(ge=1, le=10000)] = 100
    max_line_bytes: Annotated[int, Meta(ge=256, le=16 * 1024 * 1024)] = 8192
    dangerous_allow_bare_lf: bool = False
    backlog: Annotated[int, Meta(ge=1, le=65535)] = 1024


# ---------------------------------------------------------------- [domains]

class DomainsConfig(_Table):
    """``[domains]``: which Host names are proxied."""

    intercept_domains: list[str] = msgspec.field(default_factory=list)
    exclude_domains: list[str] = msgspec.field(default_factory=list)
    wildcard_support: bool = True
    reject_status: Annotated[int, Meta(ge=200, le=599)] = 404
    reject_body: str = "host not served by this proxy\n"


# ---------------------------------------------------------------- [targets]

class EndpointConfig(_Table):
    """One ``[[targets.targets]]`` entry: an upstream endpoint."""

    name: Annotated[str, Meta(min_length=1)]
    url: str  # "http://host[:port]"; path empty or "/"
    weight: PositiveInt = 1
    timeout: Seconds = 30.0


class LoadBalancing(_Table, tag_field="type"):
    """``[targets.load_balancing]``: how an endpoint is picked; ``type`` selects the variant."""

    sticky_sessions: bool = False


class RoundRobin(LoadBalancing, tag="roundrobin"):
    """Each endpoint in turn."""


class Weighted(LoadBalancing, tag="weighted"):
    """In proportion to ``weight`` (smooth weighted round robin)."""


class LeastConnections(LoadBalancing, tag="leastconnections"):
    """The endpoint with the fewest requests in flight (per worker)."""


class Random(LoadBalancing, tag="random"):
    """Uniformly at random."""


HashKey = Annotated[str, Meta(min_length=1, description=(
    "client_ip | path | uri | header:<name> | cookie:<name> | query:<arg>, or several "
    "joined with +"))]


class ConsistentHashLB(LoadBalancing, tag="consistent_hash"):
    """A ketama ring placed exactly like nginx's ``hash $key consistent``."""

    virtual_nodes: Annotated[int, Meta(ge=1, le=10000)] = 160  # points per unit of weight
    hash_key: HashKey = "client_ip"
    # consistent hashing with bounded loads (HAProxy hash-balance-factor): no endpoint takes
    # more than factor x the average in-flight requests; unset: plain ring
    bounded_load_factor: Optional[Annotated[float, Meta(gt=1.0, le=10.0)]] = None


class MaglevLB(LoadBalancing, tag="maglev"):
    """Google's Maglev lookup table: even spread, minimal disruption."""

    hash_key: HashKey = "client_ip"
    table_size: Annotated[int, Meta(ge=7, le=1_000_003)] = 65537  # a prime


class PeakEwmaLB(LoadBalancing, tag="peak_ewma"):
    """Power of two choices over outstanding requests x peak-EWMA latency."""

    decay_seconds: Annotated[float, Meta(gt=0, le=3600)] = 10.0
    initial_latency_seconds: Annotated[float, Meta(gt=0, le=60)] = 0.03


LoadBalancingChoice = Union[RoundRobin, Weighted, LeastConnections, Random, ConsistentHashLB,
                            MaglevLB, PeakEwmaLB]


class HealthCheckConfig(_Table):
    """``[targets.health_check]``: active checks run by the master."""

    enabled: bool = True
    interval: Seconds = 30.0
    timeout: Seconds = 10.0
    healthy_threshold: PositiveInt = 2
    unhealthy_threshold: PositiveInt = 3
    path: str = "/"
    expected_status: list[Annotated[int, Meta(ge=100, le=599)]] = msgspec.field(
        default_factory=list)
    host: str = ""


class PoolConfig(_Table):
    """``[targets.pool]``: keep-alive pool limits, per endpoint and per worker."""

    max_idle: NonNegativeInt = 64
    max_total: PositiveInt = 1024
    idle_timeout: Seconds = 60.0
    connect_timeout: Seconds = 5.0
    read_timeout: Seconds = 30.0
    write_timeout: Seconds = 30.0


class ClusterConfig(_Table):
    """``[targets]``: the default upstream cluster, named "default"."""

    endpoints: list[EndpointConfig] = msgspec.field(default_factory=list, name="targets")
    load_balancing: LoadBalancingChoice = RoundRobin()
    health_check: HealthCheckConfig = HealthCheckConfig()
    pool: PoolConfig = PoolConfig()
    max_retries: Annotated[int, Meta(ge=0, le=10)] = 1
    # Resilience (docs/resilience.md); each is off unless its table is present.
    circuit_breaker: Optional[BreakerConfig] = None
    group_breaker: Optional[GroupBreakerConfig] = None
    outlier_detection: Optional[OutlierConfig] = None
    retry_budget: Optional[RetryBudgetConfig] = None
    # Sticky sessions by signed cookie, client IP or header (sticky_sessions = true in
    # [targets.load_balancing] is the original client-IP affinity).
    sticky: Optional[StickyConfig] = None
    # Endpoints from a registry (docs/discovery.md); the static targets are then optional.
    discovery: Optional[DiscoverySource] = None
    # How Dispa talks to these endpoints: HTTP/1.1, or HTTP/2 (h2c cleartext, h2 over
    # TLS) for gRPC and other h2-only backends (docs/http2.md).
    protocol: Literal["http1", "h2c", "h2"] = "http1"
    # TLS to this cluster's https:// endpoints instead of [tls.upstream] (docs/tls.md)
    tls: Optional[UpstreamTlsConfig] = None


class TargetGroupConfig(ClusterConfig, kw_only=True):
    """One ``[[target_groups]]`` entry: a named cluster that routing rules can send to.
    Same keys as ``[targets]``, plus ``name``."""

    # "@": dynamic configuration qualifies its names as name@provider (config/merge.py)
    name: Annotated[str, Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.@-]+$")]


# ---------------------------------------------------------------- [plugins]

class PluginConfig(_Table):
    """One ``[[plugins.plugins]]`` entry: a named filter instance."""

    name: Annotated[str, Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.@-]+$")]
    type: Annotated[str, Meta(min_length=1)]  # the filter's registry key
    enabled: bool = True
    stage: Literal["request", "response", "both"] = "both"
    error_strategy: Literal["continue", "fail"] = "continue"
    # New keys. global: part of the chain every request walks (else only for routes that
    # name it); timeout bounds each async hook call.
    global_: bool = msgspec.field(default=True, name="global")
    timeout: Seconds = 5.0
    config: dict = msgspec.field(default_factory=dict)


class PluginsConfig(_Table):
    """``[plugins]``: the filter instances and the global chain."""

    enabled: bool = True
    apply_before_domain_match: bool = True
    plugins: list[PluginConfig] = msgspec.field(default_factory=list)


# ---------------------------------------------------------------- [routing]
# The rule tables live in config/routing_model.py (imported at the end of this module: it
# builds on _Table and the value types above).


# ---------------------------------------------------------------- [logging]

class DatabaseLogConfig(_Table):
    """``[logging.database]``: traffic log store."""

    url: str = "sqlite://./data/traffic.db"
    max_connections: PositiveInt = 10
    connection_timeout: Seconds = 30.0
    # batching and back-pressure of the traffic log writers (docs/logging.md)
    table: Annotated[str, Meta(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")] = "traffic_log"
    batch_size: Annotated[int, Meta(ge=1, le=100_000)] = 500
    queue_size: Annotated[int, Meta(ge=1, le=10_000_000)] = 100_000
    flush_interval: Annotated[float, Meta(gt=0, le=60)] = 0.5


class FileLogConfig(_Table):
    """``[logging.file]``: traffic log files."""

    directory: Annotated[str, Meta(min_length=1)] = "./logs"
    max_file_size: Annotated[int, Meta(ge=1024)] = 100_000_000
    rotation: bool = True
    rotate_interval: Literal["none", "hourly", "daily"] = "daily"  # with rotation = true
    compression: Literal["none", "gzip", "zstd"] = "gzip"  # of rotated files
    traffic_file: Annotated[str, Meta(min_length=1)] = "traffic.log"  # JSON lines


class LoggingConfig(_Table):
    """``[logging]``: traffic logging (enabled/type/...) and Dispa's own log (level/format)."""

    enabled: bool = False
    type: Literal["file", "database", "both"] = "file"
    retention_days: NonNegativeInt = 30  # 0: keep forever
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["json", "logfmt", "text"] = "json"
    database: DatabaseLogConfig = DatabaseLogConfig()
    file: FileLogConfig = FileLogConfig()
    access_log: AccessLogConfig = AccessLogConfig()  # config/logging_model.py
    sanitization: SanitizationConfig = SanitizationConfig()


# ---------------------------------------------------------------- [monitoring]

class HistogramBucketsConfig(_Table):
    """One ``[[monitoring.histogram_buckets]]`` entry (original): bounds for one histogram,
    always written in milliseconds (divided by 1000 for a ``*_seconds`` metric)."""

    metric: Annotated[str, Meta(min_length=1, pattern=r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")]
    buckets_ms: Annotated[list[Annotated[float, Meta(gt=0)]], Meta(min_length=1, max_length=64)]


MetricLabel = Annotated[str, Meta(min_length=1, pattern=(
    r"^[a-zA-Z_][a-zA-Z0-9_]*(=(method|status|status_class|domain|host|route|cluster|endpoint"
    r"|scheme|client_ip|(header|query|cookie):[!#$%&'*+.^_`|~0-9A-Za-z-]+))?$"))]


class CustomMetricConfig(_Table):
    """One ``[[monitoring.custom_metrics]]`` entry (original keys name, type, labels): a
    business metric filled from every request's attributes."""

    name: Annotated[str, Meta(min_length=1, max_length=128,
                              pattern=r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")]
    type: Literal["counter", "histogram"] = "counter"
    help: str = ""
    # "name" (an attribute of that name) or "name=source", source one of method, status,
    # status_class, domain, host, route, cluster, endpoint, scheme, client_ip,
    # header:<name>, query:<arg>, cookie:<name>
    labels: list[MetricLabel] = msgspec.field(default_factory=list)
    # what is counted / observed: requests (counter: +1), duration / upstream_duration
    # (seconds), bytes_in / bytes_out
    value: Literal["requests", "duration", "upstream_duration", "bytes_in",
                   "bytes_out"] = "requests"
    buckets_ms: list[Annotated[float, Meta(gt=0)]] = msgspec.field(default_factory=list)
    # only requests whose status is in these classes ("2xx".."5xx") or codes; empty: all
    statuses: list[Annotated[str, Meta(pattern=r"^([1-5]xx|[1-5][0-9][0-9])$")]] = \
        msgspec.field(default_factory=list)
    max_series: Annotated[int, Meta(ge=1, le=100000)] = 1000  # per worker; then "_other"


class MonitoringConfig(_Table):
    """``[monitoring]``: the admin listeners (/health, /metrics, /admin/*) of the master."""

    enabled: bool = True
    metrics_port: Port = 9090
    health_check_port: Port = 8081
    bind_host: Annotated[str, Meta(min_length=1)] = "127.0.0.1"
    histogram_buckets: list[HistogramBucketsConfig] = msgspec.field(default_factory=list)
    custom_metrics: list[CustomMetricConfig] = msgspec.field(default_factory=list)


# ---------------------------------------------------------------- top level

from dispa.config.routing_model import RoutingConfig  # noqa: E402 - needs _Table above
from dispa.balancer.geo import GeoRouterConfig  # noqa: E402
from dispa.tls.config import TlsConfig, UpstreamTlsConfig  # noqa: E402
from dispa.config.tracing_model import ObservabilityConfig  # noqa: E402
from dispa.config.stream_model import L4Config, WebSocketConfig  # noqa: E402
from dispa.config.http2_model import Http2Config  # noqa: E402

class Config(_Table):
    """The whole file."""

    server: ServerConfig = ServerConfig()
    domains: DomainsConfig = DomainsConfig()
    cluster: ClusterConfig = msgspec.field(default_factory=ClusterConfig, name="targets")
    target_groups: list[TargetGroupConfig] = msgspec.field(default_factory=list)
    plugins: PluginsConfig = PluginsConfig()
    routing: RoutingConfig = RoutingConfig()
    geo: Optional[GeoRouterConfig] = None
    logging: LoggingConfig = LoggingConfig()
    monitoring: MonitoringConfig = MonitoringConfig()
    tls: TlsConfig = TlsConfig()  # [tls]: termination, SNI, mTLS, upstream TLS (docs/tls.md)
    service_discovery: Optional[ServiceDiscoveryConfig] = None  # docs/discovery.md
    observability: ObservabilityConfig = ObservabilityConfig()  # docs/tracing.md
    websocket: WebSocketConfig = WebSocketConfig()  # docs/websocket.md
    l4: L4Config = L4Config()  # [[l4.listeners]]: TCP/UDP proxying (docs/l4.md)
    http2: Http2Config = Http2Config()  # [http2]: HTTP/2 to clients (docs/http2.md)
