"""The ``[observability]`` table and its ``[observability.tracing]`` part, and their checks.

Theory of operation
-------------------
The original Dispa file had ``[observability.tracing] enabled, exporter, endpoint,
sampling_rate``; those keys keep their names and meaning. The rest (exporter headers and
timeout, batching, propagators, the sampler's rate limit and tail rules) are new keys with
defaults that keep an old file's behaviour. docs/tracing.md explains what each does at run
time; docs/configuration.md has one row per key.

Rules:

1. Per-value constraints are ``Meta`` annotations; cross-field rules (an endpoint URL that
   fits the exporter, header names, batch size within the queue, the exporter's package
   being installed) live in :func:`check_tracing`, called by ``config.load._check``.
2. This module imports nothing heavy: checking that the exporter package is installed reads
   its distribution metadata (no import), so the master never loads opentelemetry.

WARNING: a new key here needs a row in docs/configuration.md and, when the worker uses it,
a line in ``_tracing_part`` (dispa/config/compile.py) and in dispa/observability/tracing.py.
"""

from __future__ import annotations

import importlib.metadata
import re
import urllib.parse
from typing import Annotated, Callable, Literal

import msgspec
from msgspec import Meta

__all__ = ["ObservabilityConfig", "TracingConfig", "TracingBatchConfig", "check_tracing",
           "EXPORTER_DISTRIBUTIONS", "DEFAULT_ENDPOINTS", "exporter_kind"]

Seconds = Annotated[float, Meta(gt=0, le=3600, description="seconds (> 0)")]
Ratio = Annotated[float, Meta(ge=0.0, le=1.0, description="a share, 0.0 .. 1.0")]


class _Table(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Base of these tables: frozen, unknown keys rejected (own base: no import cycle)."""


Exporter = Literal["otlp_http", "otlp_grpc", "zipkin", "otlp", "jaeger"]
Propagator = Literal["tracecontext", "baggage", "b3", "b3multi"]

#: exporter name -> the distributions it needs (pyproject's ``tracing`` extra)
EXPORTER_DISTRIBUTIONS = {
    "otlp_http": ("opentelemetry-sdk", "opentelemetry-exporter-otlp-proto-http"),
    "otlp_grpc": ("opentelemetry-sdk", "opentelemetry-exporter-otlp-proto-grpc"),
    "zipkin": ("opentelemetry-sdk", "opentelemetry-exporter-zipkin-json"),
}
#: the collectors' conventional addresses, used when ``endpoint`` is empty
DEFAULT_ENDPOINTS = {
    "otlp_http": "http://localhost:4318/v1/traces",
    "otlp_grpc": "http://localhost:4317",
    "zipkin": "http://localhost:9411/api/v2/spans",
}


def exporter_kind(name: str) -> str:
    """The exporter a configured name means: ``otlp`` and ``jaeger`` (Jaeger >= 1.35 takes
    OTLP natively) are OTLP over HTTP."""
    return "otlp_http" if name in ("otlp", "jaeger") else name


class TracingBatchConfig(_Table):
    """``[observability.tracing.batch]``: the exporter thread's batching (the SDK's
    BatchSpanProcessor). Spans beyond ``max_queue_size`` are dropped and counted."""

    max_queue_size: Annotated[int, Meta(ge=1, le=1_000_000)] = 2048
    max_export_batch_size: Annotated[int, Meta(ge=1, le=100_000)] = 512
    schedule_delay: Seconds = 5.0
    export_timeout: Seconds = 30.0


class TracingConfig(_Table):
    """``[observability.tracing]``: spans per request, sampling, propagation, export."""

    enabled: bool = False
    exporter: Exporter = "otlp_http"
    endpoint: str = ""  # empty: the exporter's conventional local address
    sampling_rate: Ratio = 0.1
    service_name: Annotated[str, Meta(min_length=1)] = "dispa"
    headers: dict[str, str] = msgspec.field(default_factory=dict)
    timeout: Seconds = 10.0
    compression: Literal["none", "gzip"] = "none"
    propagators: list[Propagator] = msgspec.field(
        default_factory=lambda: ["tracecontext", "baggage"])
    parent_based: bool = True
    max_traces_per_second: Annotated[float, Meta(ge=0)] = 0.0  # 0: no limit
    always_sample_errors: bool = True
    slow_threshold: Annotated[float, Meta(ge=0, le=3600)] = 0.0  # seconds; 0: off
    resource_attributes: dict[str, str] = msgspec.field(default_factory=dict)
    batch: TracingBatchConfig = TracingBatchConfig()


class ObservabilityConfig(_Table):
    """``[observability]``: per-request telemetry beyond metrics and logs."""

    tracing: TracingConfig = TracingConfig()


_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")


def check_tracing(obs: ObservabilityConfig, issue: Callable[[str, tuple], None]) -> None:
    """Cross-field checks of ``[observability.tracing]``; every problem goes to ``issue``
    with the offending key's path."""
    t = obs.tracing
    where = ("observability", "tracing")
    kind = exporter_kind(t.exporter)
    if t.endpoint:
        problem = _check_endpoint(t.endpoint, kind)
        if problem:
            issue(problem, where + ("endpoint",))
    for table in ("headers", "resource_attributes"):
        for name, value in getattr(t, table).items():
            if not isinstance(value, str):
                issue(f"expected a string, got {type(value).__name__}", where + (table, name))
    for name, value in t.headers.items():
        if not isinstance(value, str):
            continue
        if not _TOKEN.match(name):
            issue(f"invalid header name {name!r}", where + ("headers", name))
        elif any((ord(c) < 32 and c != "\t") or ord(c) == 127 for c in value):
            issue(f"header {name!r}: control characters in the value", where + ("headers", name))
    if t.batch.max_export_batch_size > t.batch.max_queue_size:
        issue(f"max_export_batch_size ({t.batch.max_export_batch_size}) must not exceed "
              f"max_queue_size ({t.batch.max_queue_size})",
              where + ("batch", "max_export_batch_size"))
    if len(set(t.propagators)) != len(t.propagators):
        issue("a propagator is listed twice", where + ("propagators",))
    if t.enabled:
        missing = [d for d in EXPORTER_DISTRIBUTIONS[kind] if not _installed(d)]
        if missing:
            issue(f"exporter {t.exporter!r} needs {', '.join(missing)}: "
                  "pip install 'dispa[tracing]'", where + ("exporter",))


def _installed(distribution: str) -> bool:
    try:
        importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def _check_endpoint(url: str, kind: str) -> str | None:
    if kind == "otlp_grpc" and "://" not in url:
        url = "http://" + url  # grpc's own "host:port" spelling
    try:
        u = urllib.parse.urlsplit(url)
        u.port  # noqa: B018 - raises on a bad port
    except ValueError as exc:
        return f"invalid endpoint URL {url!r}: {exc}"
    if u.scheme not in ("http", "https") or not u.hostname:
        return f"endpoint must be an http:// or https:// URL with a host, got {url!r}"
    if kind == "otlp_grpc" and u.path not in ("", "/"):
        return f"an OTLP/gRPC endpoint has no path (host:port), got {url!r}"
    return None
