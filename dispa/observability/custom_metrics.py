"""Operator-declared metrics: ``[[monitoring.histogram_buckets]]`` and
``[[monitoring.custom_metrics]]`` (docs/observability.md, "Configured metrics").

Histogram buckets are written in milliseconds (the original format) and converted to the
metric's unit. Custom metrics are filled from every finished request's
:class:`~dispa.observability.exchange.Exchange` by a log-phase sink: a counter adds 1 (or
the request's bytes), a histogram observes a duration or a size. Label values come from
request attributes; each metric keeps at most ``max_series`` label sets per worker and
counts the rest under ``_other`` so that a client cannot grow memory with random headers.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from typing import Callable, Optional

from dispa.observability.exchange import SINK_FACTORIES

__all__ = ["HISTOGRAMS", "check_monitoring_metrics", "histogram_bounds", "CustomMetrics"]

#: Histograms Dispa exports whose buckets ``[[monitoring.histogram_buckets]]`` may set.
HISTOGRAMS = frozenset({
    "dispa_request_duration_seconds", "dispa_upstream_duration_seconds",
    "dispa_plugin_duration_ms", "dispa_plugin_cmd_exec_duration_ms",
})
#: Names of the original Dispa accepted for compatibility (no such histogram here yet).
COMPAT_ONLY = frozenset({"dispa_log_write_duration_ms",
                         "dispa_target_health_check_duration_ms"})
_RESERVED_PREFIXES = ("dispa_",)
OTHER = "_other"


def histogram_bounds(metric: str, buckets_ms) -> tuple[float, ...]:
    """``buckets_ms`` in the unit of ``metric`` (seconds for ``*_seconds``)."""
    scale = 1000.0 if metric.endswith("_seconds") else 1.0
    return tuple(float(b) / scale for b in buckets_ms)


def check_monitoring_metrics(mon, issue: Callable) -> None:
    """Cross-field checks of the two tables; ``issue(message, path)`` reports a problem."""
    custom = {c.name: c for c in mon.custom_metrics}
    seen: set[str] = set()
    for i, hb in enumerate(mon.histogram_buckets):
        where = ("monitoring", "histogram_buckets", i)
        if hb.metric in seen:
            issue(f"duplicate entry for {hb.metric!r}", where + ("metric",))
        seen.add(hb.metric)
        if hb.metric not in HISTOGRAMS and hb.metric not in COMPAT_ONLY and not (
                hb.metric in custom and custom[hb.metric].type == "histogram"):
            issue(f"{hb.metric!r} is not a histogram Dispa exports (one of: "
                  f"{', '.join(sorted(HISTOGRAMS))}, or a custom histogram)",
                  where + ("metric",))
        _check_ascending(hb.buckets_ms, where + ("buckets_ms",), issue)
    names: set[str] = set()
    for i, c in enumerate(mon.custom_metrics):
        where = ("monitoring", "custom_metrics", i)
        if c.name in names:
            issue(f"duplicate custom metric {c.name!r}", where + ("name",))
        names.add(c.name)
        if c.name in HISTOGRAMS or c.name in _BUILTIN_NAMES:
            issue(f"{c.name!r} is a metric Dispa itself exports; choose another name",
                  where + ("name",))
        if c.type == "counter" and c.buckets_ms:
            issue("buckets_ms applies to a histogram, not a counter", where + ("buckets_ms",))
        if c.type == "counter" and c.value in ("duration", "upstream_duration"):
            issue(f"a counter cannot count {c.value!r} (use type = \"histogram\")",
                  where + ("value",))
        if c.type == "histogram" and c.value == "requests":
            issue("a histogram needs value = duration, upstream_duration, bytes_in or "
                  "bytes_out", where + ("value",))
        if c.type == "counter" and not c.name.endswith("_total"):
            issue(f"a counter's name should end in _total (Prometheus convention): "
                  f"{c.name}_total", where + ("name",))
        _check_ascending(c.buckets_ms, where + ("buckets_ms",), issue)
        label_names = [lab.partition("=")[0] for lab in c.labels]
        for j, n in enumerate(label_names):
            if n in label_names[:j]:
                issue(f"duplicate label {n!r}", where + ("labels", j))
            if n == "le" or n.startswith("__"):
                issue(f"label name {n!r} is reserved by Prometheus", where + ("labels", j))
            if "=" not in c.labels[j] and n not in _ATTRIBUTES:
                issue(f"label {n!r} is not a request attribute; write it as "
                      f"\"{n}=header:<name>\" or use one of {', '.join(sorted(_ATTRIBUTES))}",
                      where + ("labels", j))


def _check_ascending(values, where, issue) -> None:
    for k in range(1, len(values)):
        if values[k] <= values[k - 1]:
            issue(f"buckets must be strictly increasing ({values[k - 1]:g} then "
                  f"{values[k]:g})", where + (k,))
            return


_BUILTIN_NAMES = frozenset({
    "dispa_requests_total", "dispa_received_bytes_total", "dispa_sent_bytes_total",
    "dispa_upstream_requests_total", "dispa_target_health", "dispa_active_connections",
    "dispa_retries_total", "dispa_workers",
})


# ---------------------------------------------------------------- label sources

def _status_class(ex) -> str:
    return f"{ex.status // 100}xx"


_ATTRIBUTES: dict[str, Callable] = {
    "method": lambda ex: ex.method,
    "status": lambda ex: str(ex.status),
    "status_class": _status_class,
    "domain": lambda ex: ex.domain,
    "host": lambda ex: ex.domain,  # the matched domain: bounded, never the raw header
    "route": lambda ex: ex.route or "",
    "cluster": lambda ex: ex.cluster or "",
    "endpoint": lambda ex: ex.endpoint or "",
    "scheme": lambda ex: ex.scheme or "http",
    "client_ip": lambda ex: ex.client_ip or "",
}


def _source(spec: str) -> Callable:
    if ":" not in spec:
        return _ATTRIBUTES[spec]
    kind, _, arg = spec.partition(":")
    if kind == "header":
        return lambda ex: ex.header(arg) or ""
    if kind == "query":
        def query(ex, arg=arg):
            _, _, q = (ex.target or "").partition("?")
            for part in q.split("&"):
                k, _, v = part.partition("=")
                if k == arg:
                    return v
            return ""
        return query
    if kind == "cookie":
        def cookie(ex, arg=arg):
            raw = ex.header("cookie") or ""
            for part in raw.split(";"):
                k, _, v = part.strip().partition("=")
                if k == arg:
                    return v
            return ""
        return cookie
    raise ValueError(f"unknown label source {spec!r}")


_VALUES: dict[str, Callable] = {
    "requests": lambda ex: 1,
    "duration": lambda ex: ex.duration,
    "upstream_duration": lambda ex: ex.upstream_seconds,
    "bytes_in": lambda ex: ex.bytes_in,
    "bytes_out": lambda ex: ex.bytes_out,
}


class _Metric:
    __slots__ = ("name", "kind", "names", "sources", "value", "statuses", "bounds", "bk",
                 "max_series", "series", "metrics")

    def __init__(self, cfg: dict, metrics, bounds_override: Optional[tuple]):
        self.name = cfg["name"]
        self.kind = cfg.get("type", "counter")
        labels = cfg.get("labels") or []
        self.names = tuple(lab.partition("=")[0] for lab in labels)
        self.sources = tuple(_source(lab.partition("=")[2] or lab) for lab in labels)
        self.value = _VALUES[cfg.get("value", "requests")]
        st = cfg.get("statuses") or []
        self.statuses = (frozenset(s for s in st if not s.endswith("xx")),
                         frozenset(int(s[0]) for s in st if s.endswith("xx"))) if st else None
        unit_ms = cfg.get("buckets_ms") or []
        if bounds_override:
            self.bounds = bounds_override
        elif unit_ms:
            self.bounds = histogram_bounds(
                "x_seconds" if cfg.get("value") in ("duration", "upstream_duration")
                else "x", unit_ms)
        elif cfg.get("value") in ("duration", "upstream_duration"):
            from dispa.observability.metrics import DEFAULT_BUCKETS
            self.bounds = DEFAULT_BUCKETS
        else:  # sizes: powers of 4 from 64 B to 64 MiB
            self.bounds = tuple(float(64 * 4 ** k) for k in range(11))
        self.bk = (-math.inf,) + tuple(self.bounds)
        self.max_series = int(cfg.get("max_series", 1000))
        self.series: set = set()
        self.metrics = metrics
        if cfg.get("help"):
            metrics.set_help(self.name, self.kind, cfg["help"])

    def __call__(self, ex) -> None:
        if self.statuses is not None:
            codes, classes = self.statuses
            if str(ex.status) not in codes and ex.status // 100 not in classes:
                return
        labels = tuple(zip(self.names, [f(ex) for f in self.sources]))
        if labels not in self.series:
            if len(self.series) >= self.max_series:
                labels = tuple((n, OTHER) for n in self.names)
            self.series.add(labels)
        v = self.value(ex)
        if v is None:
            return
        if self.kind == "counter":
            self.metrics.inc(self.name, labels, v)
        else:
            self.metrics.observe(self.name, labels, float(v), self.bounds)


class CustomMetrics:
    """The log-phase sink that fills every ``[[monitoring.custom_metrics]]``."""

    def __init__(self, part: dict, metrics, overrides: dict):
        self.key = (part, overrides)
        self._metrics = [_Metric(c, metrics, overrides.get(c["name"]))
                         for c in part["metrics"]]

    def __call__(self, ex) -> None:
        for m in self._metrics:
            m(ex)


def _factory(snapshot, ctx, previous):
    obs = snapshot.observability or {}
    part = obs.get("custom_metrics")
    if not part or ctx.metrics is None:
        return None
    overrides = {k: tuple(v) for k, v in (obs.get("histogram_buckets") or {}).items()}
    if previous is not None and previous.key == (part, overrides):
        return previous
    return CustomMetrics(part, ctx.metrics, overrides)


SINK_FACTORIES.append(_factory)
