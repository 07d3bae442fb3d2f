"""Compile a validated ``config.model.Config`` into ``StaticSpec`` + ``Snapshot``.

Theory of operation
-------------------
This is the only place where the file's vocabulary (``targets``, ``bind_address``,
``keep_alive_timeout`` in seconds without a unit) meets the runtime's (cluster, endpoint,
listener, ``*_seconds``). It is pure: the same model always gives the same snapshot, and so
the same ``Snapshot.version`` (a content hash, see ``snapshot.content_version``).

Rules:

1. The input has passed ``load._check``; anything that could fail was reported there. A
   failure here is a bug, not an operator error.
2. One cluster, named ``default``, holds every ``[[targets.targets]]`` entry; endpoint ids are
   ``host:port`` with the host lowercased (``[v6]:port`` for IPv6) and survive reloads.
3. ``StaticSpec.workers`` is 0 for ``"auto"``; ``workers_override`` (the CLI) wins.

WARNING: field names of ``config.snapshot`` are read by the worker; keep this in step.
"""

from __future__ import annotations

import ipaddress

import msgspec

from dispa.config import model as m
from dispa.config.logging_model import (
    compile_access_log, compile_redaction, compile_traffic_log)
from dispa.config.load import (
    endpoint_id, parse_host_port, parse_upstream_url, split_domains, _Context,
)
from dispa.config.snapshot import (
    ClusterSpec, EndpointSpec, HealthCheckSpec, Http1Limits, InterceptSpec, ListenerSpec,
    PipelineSpec, PluginSpec, PoolSpec, ProxySpec, Snapshot, StaticSpec, make_snapshot,
)
from dispa.errors import ConfigError

DEFAULT_CLUSTER = "default"


def compile_config(config: m.Config, *,
                   workers_override: int | None = None) -> tuple[StaticSpec, Snapshot]:
    """Build the static settings and the snapshot of a validated configuration.

    Returns ``(static, snapshot)``. Raises :class:`ConfigError` only if ``config`` did not
    pass validation (domain or address checks fail again here).
    """
    clusters = [compile_cluster(config.cluster)]
    clusters += [compile_cluster(g, name=g.name) for g in config.target_groups]
    routing = getattr(config, "routing", None)
    # A rule may name one [[targets.targets]] endpoint (the original Dispa meaning of a
    # rule's target): it becomes a one-endpoint cluster of that name, sharing the
    # endpoint's pool. A target group of the same name wins.
    known = {c.name for c in clusters}
    by_name = {e.name: e for e in config.cluster.endpoints}
    for name in routing_targets(routing):
        if name not in known and name in by_name:
            clusters.append(compile_cluster(config.cluster, name=name, only=by_name[name]))
            known.add(name)
    snapshot = make_snapshot(
        proxy=compile_proxy(config.server),
        intercept=compile_intercept(config.domains),
        clusters=tuple(clusters),
        default_cluster=DEFAULT_CLUSTER,
        pipeline=compile_pipeline(config),
        observability=compile_observability(config),
        tls=compile_tls_part(config, clusters),
        **_stream_parts(config),
        http2=_http2_part(config),
    )
    return compile_static(config, workers_override), snapshot


def _http2_part(config: m.Config):
    """``Snapshot.http2`` (config/http2_model.py); None when HTTP/2 is off."""
    from dispa.config.http2_model import compile_http2
    return compile_http2(config.http2)


def _stream_parts(config: m.Config) -> dict:
    """``Snapshot.websocket`` and ``Snapshot.l4`` (config/stream_model.py)."""
    from dispa.config.stream_model import compile_l4, compile_websocket
    return {"websocket": compile_websocket(config.websocket),
            "l4": compile_l4(config.l4, lambda a: _address(parse_host_port(a)))}


def compile_tls_part(config: m.Config, clusters: list[ClusterSpec]):
    """``Snapshot.tls`` settings (dispa/tls/config.py); the master's certificate store adds
    the certificates. None without a TLS listener or an https:// target."""
    from dispa.config.load import is_https_url
    from dispa.tls.config import compile_tls
    tables = [config.cluster, *config.target_groups]
    https = {endpoint_id(*_address(parse_upstream_url(e.url)))
             for t in tables for e in t.endpoints if is_https_url(e.url)}
    # [targets.tls] / [target_groups.tls]: these endpoints' own upstream TLS settings
    per_endpoint = {endpoint_id(*_address(parse_upstream_url(e.url))): t.tls
                    for t in tables if getattr(t, "tls", None) is not None
                    for e in t.endpoints if is_https_url(e.url)}
    return compile_tls(config.tls, sorted(https), per_endpoint)


def routing_targets(routing) -> list[str]:
    """Every target name the routing rules refer to (rule, split, mirror, default)."""
    if routing is None:
        return []
    data = msgspec.to_builtins(routing)
    names = [data.get("default_target") or ""]
    for rule in data.get("rules") or []:
        names.append(rule.get("target") or "")
        actions = rule.get("actions") or {}
        names += [s.get("target") or "" for s in actions.get("split") or []]
        names.append((actions.get("mirror") or {}).get("target") or "")
    return [n for n in dict.fromkeys(names) if n]


def compile_pipeline(config: m.Config) -> PipelineSpec:
    """Filters and routing rules; empty when neither is configured (the fast path)."""
    plugins_cfg = config.plugins
    plugins = ()
    if plugins_cfg.enabled:
        plugins = tuple(
            PluginSpec(name=p.name, type=p.type, stage=p.stage, error_strategy=p.error_strategy,
                       is_global=p.global_, timeout_seconds=float(p.timeout),
                       config=p.config)
            for p in plugins_cfg.plugins if p.enabled)
    plugins = _tracing_filters(config) + plugins
    routing = getattr(config, "routing", None)
    has_rules = routing is not None and (
        any(r.enabled for r in routing.rules) or routing.default_target)
    return PipelineSpec(
        plugins=plugins,
        apply_before_domain_match=plugins_cfg.apply_before_domain_match,
        routing=msgspec.to_builtins(routing) if has_rules else None,
        routing_log=bool(routing is not None and routing.enable_logging),
        geo=_plain(getattr(config, "geo", None)),
    )


def compile_observability(config: m.Config) -> dict | None:
    """The log-phase features as plain data for ``Snapshot.observability``; None when all
    are off (the worker then builds no log sinks and the Session no Exchange record).

    Keys, each present only when its feature is on: ``access_log``, ``traffic_log``,
    ``redaction`` (dispa/observability/logs docs), ``tracing`` (observability/tracing),
    ``custom_metrics`` (observability/custom_metrics).
    """
    parts: dict = {}
    for key, compile_part in OBSERVABILITY_PARTS:
        value = compile_part(config)
        if value is not None:
            parts[key] = value
    return parts or None


def _custom_metrics_part(config: m.Config):
    mon = config.monitoring
    metrics = getattr(mon, "custom_metrics", None)
    if not metrics:
        return None
    return {"metrics": _plain(metrics)}


def _histogram_buckets_part(config: m.Config):
    from dispa.observability.custom_metrics import histogram_bounds
    entries = config.monitoring.histogram_buckets
    if not entries:
        return None
    return {e.metric: list(histogram_bounds(e.metric, e.buckets_ms)) for e in entries}


def _tracing_part(config: m.Config):
    """``[observability.tracing]`` as plain data (docs/tracing.md), None when off."""
    obs = getattr(config, "observability", None)
    if obs is None or not obs.tracing.enabled:
        return None
    from dispa.config.tracing_model import DEFAULT_ENDPOINTS, exporter_kind
    data = msgspec.to_builtins(obs.tracing)
    data["exporter"] = exporter_kind(obs.tracing.exporter)
    data["endpoint"] = obs.tracing.endpoint or DEFAULT_ENDPOINTS[data["exporter"]]
    return data


def _tracing_filters(config: m.Config) -> tuple:
    """The tracing filter (dispa/plugins/builtin/tracing.py), first in the global chain
    when tracing is on: it reads and injects the propagation headers (phase 4)."""
    part = _tracing_part(config)
    if part is None or not set(part["propagators"]) & {"tracecontext", "b3", "b3multi"}:
        return ()  # nothing to inject: the log-phase sink decides alone
    return (PluginSpec(name="tracing@dispa", type="dispa.plugins.builtin.tracing:Tracing",
                       config=part),)


#: (key, function(config) -> plain data or None), one per log-phase feature.
OBSERVABILITY_PARTS: list = [
    ("custom_metrics", _custom_metrics_part),
    ("tracing", _tracing_part),              # config/tracing_model.py
    ("histogram_buckets", _histogram_buckets_part),
    ("access_log", compile_access_log),     # config/logging_model.py
    ("traffic_log", compile_traffic_log),
    ("redaction", compile_redaction),
]


def compile_static(config: m.Config, workers_override: int | None = None) -> StaticSpec:
    """Listeners, worker count, admin listeners and shutdown timeout."""
    server = config.server
    host, port = _address(parse_host_port(server.bind_address))
    if workers_override is not None:
        workers = workers_override
    else:
        workers = 0 if server.workers == "auto" else server.workers
    admin: list[ListenerSpec] = []
    mon = config.monitoring
    if mon.enabled:
        for admin_port in (mon.metrics_port, mon.health_check_port):
            if all(a.port != admin_port for a in admin):
                admin.append(ListenerSpec(host=mon.bind_host, port=admin_port))
    listeners = [ListenerSpec(host=host, port=port, backlog=server.backlog)]
    if config.tls.enabled:  # the TLS listener (docs/tls.md); after the plain one
        tls_host, tls_port = _address(parse_host_port(config.tls.bind_address))
        listeners.append(ListenerSpec(host=tls_host, port=tls_port, backlog=server.backlog,
                                      tls=True))
    return StaticSpec(
        listeners=tuple(listeners),
        workers=workers,
        admin_listeners=tuple(admin),
        shutdown_timeout_seconds=float(server.shutdown_timeout),
    )


def compile_proxy(server: m.ServerConfig) -> ProxySpec:
    """Per-request behaviour from ``[server]``."""
    trusted = tuple(str(ipaddress.ip_network(p.strip(), strict=False))
                    for p in server.trusted_proxies)
    return ProxySpec(
        keep_alive_timeout_seconds=float(server.keep_alive_timeout),
        request_timeout_seconds=float(server.request_timeout),
        header_timeout_seconds=float(server.header_timeout),
        trusted_proxies=tuple(dict.fromkeys(trusted)),
        via=server.via,
        request_id_header=server.request_id_header.lower(),
        limits=Http1Limits(
            max_head_bytes=server.max_head_bytes,
            max_header_count=server.max_header_count,
            max_line_bytes=server.max_line_bytes,
            allow_bare_lf=server.dangerous_allow_bare_lf,
        ),
    )


def compile_intercept(domains: m.DomainsConfig) -> InterceptSpec:
    """Exact names and wildcard suffixes, intercepts and excludes."""
    ctx = _Context("<compile>", {})
    exact, suffixes = split_domains(domains.intercept_domains, ("domains", "intercept_domains"),
                                    domains.wildcard_support, ctx)
    ex_exact, ex_suffixes = split_domains(domains.exclude_domains,
                                          ("domains", "exclude_domains"),
                                          domains.wildcard_support, ctx)
    ctx.raise_if_any()
    return InterceptSpec(
        exact=tuple(exact),
        wildcard_suffixes=tuple(suffixes),
        exclude_exact=tuple(ex_exact),
        exclude_wildcard_suffixes=tuple(ex_suffixes),
        wildcard_support=domains.wildcard_support,
        intercept_all=not exact and not suffixes,
        reject_status=domains.reject_status,
        reject_body=domains.reject_body,
    )


def compile_cluster(cluster: m.ClusterConfig, *, name: str = DEFAULT_CLUSTER,
                    only: m.EndpointConfig | None = None) -> ClusterSpec:
    """A cluster: ``default`` from ``[targets]``, or a ``[[target_groups]]`` entry; with
    ``only``, the one-endpoint cluster of a rule that names a ``[targets]`` endpoint."""
    endpoints = []
    for entry in (cluster.endpoints if only is None else [only]):
        host, port = _address(parse_upstream_url(entry.url))
        endpoints.append(EndpointSpec(
            id=endpoint_id(host, port), name=entry.name, host=host, port=port,
            weight=entry.weight, timeout_seconds=float(entry.timeout),
        ))
    health = cluster.health_check
    pool = cluster.pool
    lb = cluster.load_balancing
    return ClusterSpec(
        name=name,
        endpoints=tuple(endpoints),
        lb=type(lb).__struct_config__.tag,
        sticky_sessions=lb.sticky_sessions,
        health_check=HealthCheckSpec(
            enabled=health.enabled,
            interval_seconds=float(health.interval),
            timeout_seconds=float(health.timeout),
            healthy_threshold=health.healthy_threshold,
            unhealthy_threshold=health.unhealthy_threshold,
            path=health.path,
            expected_status=tuple(health.expected_status),
            host=health.host,
        ),
        pool=PoolSpec(
            max_idle=pool.max_idle,
            max_total=pool.max_total,
            idle_timeout_seconds=float(pool.idle_timeout),
            connect_timeout_seconds=float(pool.connect_timeout),
            read_timeout_seconds=float(pool.read_timeout),
            write_timeout_seconds=float(pool.write_timeout),
        ),
        max_retries=cluster.max_retries,
        lb_options={k: v for k, v in msgspec.to_builtins(lb).items()
                    if k not in ("type", "sticky_sessions")},
        breaker=_plain(cluster.circuit_breaker),
        group_breaker=_plain(cluster.group_breaker),
        outlier=_plain(cluster.outlier_detection),
        retry_budget=_plain(cluster.retry_budget),
        sticky=_plain(cluster.sticky),
        protocol=cluster.protocol,
    )


def _plain(table):
    return None if table is None else msgspec.to_builtins(table)


def _address(parsed: tuple[str, int] | str) -> tuple[str, int]:
    if isinstance(parsed, str):
        raise ConfigError(f"configuration was not validated: {parsed}")
    return parsed
