"""Metrics: workers count locally, the master pulls and aggregates (the stats channel).

Each worker owns one :class:`WorkerMetrics`. The hot path (:meth:`WorkerMetrics.observe_request`)
is two dict updates and a ``bisect``: no locks, no shared memory, no files. On a scrape the
master asks every live worker for :meth:`WorkerMetrics.export` (plain, msgspec-encodable
data, *cumulative since the worker started*), feeds each reply to
:meth:`MetricsAggregator.update` and renders the sum. Because exports are cumulative, a lost
or late reply loses nothing: the next one carries every count. When a worker dies or is
replaced, :meth:`MetricsAggregator.retire` folds its last export into a retained base so
counters never go backwards. See docs/observability.md for the measured comparison with
prometheus-client's multiprocess mode.

Export format (version 1)::

    {"v": 1, "instance": "<pid>-<start ns>", "seq": <int, +1 per export()>,
     "bucket_sets": [[0.0005, 0.001, ...], ...],
     "counters":   [[name, [[label, value], ...], number], ...],
     "histograms": [[name, [[label, value], ...], bucket_set_index,
                     [count per bucket (not cumulative) ..., count above the last bound],
                     sum], ...],
     "gauges":     [[name, [[label, value], ...], number], ...]}
"""

from __future__ import annotations

import math
import os
import re
import time
from bisect import bisect_left
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

__all__ = [
    "DEFAULT_BUCKETS",
    "KNOWN_METHODS",
    "METRIC_HELP",
    "OTHER",
    "UPSTREAM_OUTCOMES",
    "MetricsAggregator",
    "WorkerMetrics",
]

#: Prometheus' default buckets, extended downwards: a proxy's own latency is sub-millisecond.
DEFAULT_BUCKETS: tuple[float, ...] = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

#: Buckets (milliseconds) of the ``*_ms`` histograms (plugin and command durations).
MS_BUCKETS: tuple[float, ...] = (
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0,
    1000.0, 2500.0, 5000.0)

#: Methods counted under their own name; anything else becomes ``"OTHER"``.
KNOWN_METHODS = frozenset(
    ("GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"))

#: Outcomes accepted by :meth:`WorkerMetrics.observe_upstream`.
UPSTREAM_OUTCOMES = ("ok", "connect_error", "timeout", "reset", "bad_response")

#: Label value that absorbs series beyond the cardinality caps.
OTHER = "_other"

REQUESTS_TOTAL = "dispa_requests_total"
REQUEST_DURATION = "dispa_request_duration_seconds"
RECEIVED_BYTES = "dispa_received_bytes_total"
SENT_BYTES = "dispa_sent_bytes_total"
UPSTREAM_REQUESTS = "dispa_upstream_requests_total"
UPSTREAM_DURATION = "dispa_upstream_duration_seconds"

#: name -> (type, help) for the metrics Dispa itself defines. Unknown names still render:
#: ``*_total`` as counters, everything else as gauges, with a generic help line.
METRIC_HELP: dict[str, tuple[str, str]] = {
    REQUESTS_TOTAL: ("counter", "Requests answered, by virtual host domain, method and status."),
    REQUEST_DURATION: ("histogram", "Time from request head parsed to response end, by domain."),
    RECEIVED_BYTES: ("counter", "Request body bytes received from clients, by domain."),
    SENT_BYTES: ("counter", "Response body bytes sent to clients, by domain."),
    UPSTREAM_REQUESTS: ("counter", "Upstream attempts, by endpoint and outcome."),
    UPSTREAM_DURATION: ("histogram", "Upstream attempt duration, by endpoint."),
    "dispa_protocol_errors_total": ("counter", "Requests rejected before routing, by status."),
    "dispa_retries_total": ("counter", "Upstream retries."),
    "dispa_active_connections": ("gauge", "Open downstream connections (sum over workers)."),
    "dispa_traces_total": (
        "counter", "Traces decided by the tracer, by outcome (sampled, kept by a tail rule, "
                   "rate-limited, not sampled)."),
    "dispa_trace_spans_total": (
        "counter", "Spans handed to the exporter, by outcome (exported, failed, dropped)."),
    "dispa_upstream_pool_connections": (
        "gauge", "Upstream keep-alive pool connections by endpoint and state (idle, in_use)."),
    "dispa_target_health": ("gauge", "1 if the target endpoint is healthy, else 0."),
    "dispa_workers": ("gauge", "Live worker processes."),
    "dispa_config_reloads_total": ("counter", "Configuration reloads, by result."),
    "dispa_plugin_invocations_total": ("counter", "Filter hook calls, by plugin and stage."),
    "dispa_plugin_short_circuits_total": (
        "counter", "Responses made by a filter (answer or replace), by plugin and stage."),
    "dispa_plugin_errors_total": ("counter", "Filter hook failures, by plugin, stage, kind."),
    "dispa_plugin_duration_ms": (
        "histogram", "Filter hook duration in ms, by plugin and stage (sync hooks sampled "
                     "1 in 16)."),
    "dispa_routing_matches_total": ("counter", "Requests matched by a routing rule, by rule."),
    "dispa_mirror_requests_total": ("counter", "Mirrored requests, by target and outcome."),
}

Labels = tuple[tuple[str, str], ...]

_MS_BK1 = (-math.inf,) + MS_BUCKETS  # bisect result == slot index in an ms series


def _instance_id() -> str:
    return f"{os.getpid()}-{time.time_ns()}"


class WorkerMetrics:
    """Per-worker counters, gauges and histograms. Not thread-safe (one event loop).

    ``domain`` and ``method`` must be bounded: pass the matched virtual host's configured
    domain (never the raw Host header) and the method. As a safety net, domains beyond
    ``max_domains`` count under ``"_other"``, methods outside :data:`KNOWN_METHODS` under
    ``"OTHER"``, and request series beyond ``max_series`` under domain ``"_other"``.

    Layout (why it is fast): one dict keyed by ``(domain, method, status)`` whose value is a
    list ``[sum, bytes_in, bytes_out, count per bucket..., count above the last bound]``.
    One request = one dict lookup, one ``bisect`` and four list-slot increments. The bisect
    runs over the bounds prefixed with three ``-inf`` so its result is already the slot
    index, and every index is non-negative (CPython 3.11 specialises ``list[int]`` only for
    non-negative ints: negative indices measured ~15 % slower). The per-domain histogram and
    ``requests_total`` are derived at :meth:`export` time.
    """

    __slots__ = ("_buckets", "_nb", "_bk3", "_bk1", "_requests", "_domain_set", "_upstream",
                 "_counters", "_gauges", "_instance", "_seq", "max_domains", "max_series",
                 "_ms", "_collectors", "_hists", "_help", "_frozen", "_ms_bounds",
                 "_overrides", "_ubuckets")

    def __init__(self, buckets: Sequence[float] = DEFAULT_BUCKETS, *,
                 max_domains: int = 1000, max_series: int = 20000):
        """Args:
            buckets: histogram upper bounds, strictly increasing, finite (``+Inf`` is implied).
            max_domains: distinct domains kept before folding into ``"_other"``.
            max_series: distinct (domain, method, status) series kept before folding.

        Raises:
            ValueError: empty, unsorted or non-finite ``buckets``.
        """
        b = tuple(float(x) for x in buckets)
        if not b or any(not math.isfinite(x) for x in b) or any(
                b[i] >= b[i + 1] for i in range(len(b) - 1)):
            raise ValueError("buckets must be non-empty, finite and strictly increasing")
        self._buckets = b
        self._nb = len(b)
        self._bk3 = (-math.inf,) * 3 + b  # bisect result == slot index in a request list
        self._bk1 = (-math.inf,) + b      # ... in an upstream list
        self._ubuckets = b                # bounds of the upstream duration histogram
        # (domain, method, status) -> [sum, bytes_in, bytes_out, counts..., count > last]
        self._requests: dict[tuple[str, str, int], list] = {}
        self._domain_set: set[str] = set()
        # (endpoint, outcome) -> [sum, counts..., count > last bound]
        self._upstream: dict[tuple[str, str], list] = {}
        self._counters: dict[tuple[str, Labels], float] = {}
        self._gauges: dict[tuple[str, Labels], float] = {}
        # (name, labels) -> [sum, counts per MS_BUCKETS..., count above the last bound]
        self._ms: dict[tuple[str, Labels], list] = {}
        self._collectors: list = []
        # (name, labels) -> [bounds, sum, counts..., count above the last bound]: histograms
        # with their own bounds (custom metrics)
        self._hists: dict[tuple[str, Labels], list] = {}
        self._help: dict[str, tuple[str, str]] = {}  # declared (type, help) of custom metrics
        # series retired by a bucket change: exported as they were, never updated again
        self._frozen: list = []
        self._ms_bounds: dict[str, tuple] = {}  # name -> (bounds, bisect table) overrides
        self._overrides: dict[str, tuple] = {}
        self._instance = _instance_id()
        self._seq = 0
        self.max_domains = max_domains
        self.max_series = max_series

    # -- hot path ---------------------------------------------------------------------------

    def observe_request(self, domain: str, method: str, status: int, duration_seconds: float,
                        bytes_in: int = 0, bytes_out: int = 0) -> None:
        """Count one answered request: ``dispa_requests_total{domain,method,status}``,
        ``dispa_request_duration_seconds{domain}`` and the byte counters.
        ``duration_seconds`` must be a finite float (negative counts in the first bucket).
        Never raises for well-typed input."""
        h = self._requests.get((domain, method, status))
        if h is None:
            h = self._new_request(domain, method, status)
        h[bisect_left(self._bk3, duration_seconds)] += 1
        h[0] += duration_seconds
        h[1] += bytes_in
        h[2] += bytes_out

    def observe_upstream(self, endpoint_id: str, outcome: str, duration_seconds: float) -> None:
        """Count one upstream attempt (``dispa_upstream_requests_total{endpoint,outcome}``) and
        its duration (``dispa_upstream_duration_seconds{endpoint}``). ``outcome`` is one of
        :data:`UPSTREAM_OUTCOMES`; the caller owns that vocabulary."""
        h = self._upstream.get((endpoint_id, outcome))
        if h is None:
            h = self._upstream[(endpoint_id, outcome)] = [0.0] + [0] * (len(self._ubuckets) + 1)
        h[bisect_left(self._bk1, duration_seconds)] += 1
        h[0] += duration_seconds

    def inc(self, name: str, labels: Labels = (), value: float = 1) -> None:
        """Add ``value`` to the generic counter ``name{labels}`` (e.g.
        ``inc("dispa_protocol_errors_total", (("status", "400"),))``)."""
        k = (name, labels)
        c = self._counters
        c[k] = c.get(k, 0) + value

    def observe_ms(self, name: str, labels: Labels, ms: float) -> None:
        """Add one observation (milliseconds) to the histogram ``name{labels}``, bucketed by
        :data:`MS_BUCKETS` (e.g. ``dispa_plugin_duration_ms``)."""
        h = self.ms_series(name, labels)
        b = self._ms_bounds.get(name) if self._ms_bounds else None
        h[bisect_left(b[1] if b else _MS_BK1, ms)] += 1
        h[0] += ms

    def ms_series(self, name: str, labels: Labels) -> list:
        """The live list behind ``name{labels}`` (``[sum, counts...]``): callers on a hot
        path keep it and update it in place, as :meth:`observe_ms` does."""
        k = (name, labels)
        h = self._ms.get(k)
        if h is None:
            b = self._ms_bounds.get(name)
            h = self._ms[k] = [0.0] + [0] * (len(b[0] if b else MS_BUCKETS) + 1)
        return h

    def add_collector(self, fn) -> None:
        """Call ``fn(counters)`` before each export; it writes cumulative values into the
        ``{(name, labels): value}`` dict (for counters kept elsewhere, e.g. plugin stats)."""
        self._collectors.append(fn)

    def remove_collector(self, fn) -> None:
        """Stop calling ``fn`` (a sink dropped by a new snapshot); unknown ``fn``: no-op."""
        try:
            self._collectors.remove(fn)
        except ValueError:
            pass

    def observe(self, name: str, labels: Labels, value: float,
                bounds: tuple[float, ...]) -> None:
        """Add one observation to the histogram ``name{labels}`` with its own ``bounds``
        (custom metrics; a name keeps the bounds of its first series)."""
        k = (name, labels)
        h = self._hists.get(k)
        if h is None:
            h = self._hists[k] = [bounds, (-math.inf,) + tuple(bounds), 0.0] + \
                [0] * (len(bounds) + 1)
        h[2 + bisect_left(h[1], value)] += 1
        h[2] += value

    def set_help(self, name: str, kind: str, help_: str) -> None:
        """Declare the type and help text of a metric Dispa does not define itself."""
        self._help[name] = (kind, help_)

    def configure_buckets(self, overrides: Mapping[str, Sequence[float]]) -> None:
        """Apply ``[[monitoring.histogram_buckets]]`` (bounds already in the metric's unit).

        Series recorded with other bounds are frozen (exported unchanged from now on) and new
        observations start on the new bounds; the master merges the two layouts.
        """
        wanted = {k: tuple(float(x) for x in v) for k, v in overrides.items()}
        if wanted == self._overrides:
            return
        self._overrides = wanted
        req = wanted.get(REQUEST_DURATION, DEFAULT_BUCKETS)
        up = wanted.get(UPSTREAM_DURATION, DEFAULT_BUCKETS)
        if req != self._buckets or up != self._ubuckets:
            self._freeze_core()
            self._buckets = req
            self._nb = len(req)
            self._bk3 = (-math.inf,) * 3 + req
            self._ubuckets = up
            self._bk1 = (-math.inf,) + up
        for name in {n for n, _ in self._ms} | set(self._ms_bounds) | set(wanted):
            if name in (REQUEST_DURATION, UPSTREAM_DURATION) or name in METRIC_HELP and \
                    METRIC_HELP[name][0] != "histogram":
                continue
            new = wanted.get(name)
            old = self._ms_bounds.get(name)
            if (new or MS_BUCKETS) == (old[0] if old else MS_BUCKETS):
                continue
            for k in [k for k in self._ms if k[0] == name]:
                h = self._ms.pop(k)
                self._frozen.append(("hist", k[0], k[1], old[0] if old else MS_BUCKETS,
                                     h[1:], h[0]))
            if new:
                self._ms_bounds[name] = (new, (-math.inf,) + new)
            else:
                self._ms_bounds.pop(name, None)

    def _freeze_core(self) -> None:
        part = self._export_core()
        for name, labels, v in part[0]:
            self._frozen.append(("counter", name, labels, v))
        for name, labels, bounds, counts, total in part[1]:
            self._frozen.append(("hist", name, labels, bounds, counts, total))
        self._requests = {}
        self._upstream = {}
        self._domain_set = set()

    def clear_gauges(self, name: str) -> None:
        """Drop every series of the gauge ``name`` (before setting the current set)."""
        for k in [k for k in self._gauges if k[0] == name]:
            del self._gauges[k]

    def set_gauge(self, name: str, labels: Labels, value: float) -> None:
        """Set the gauge ``name{labels}`` (e.g. ``dispa_active_connections``). The master
        sums a gauge over live workers and drops the gauges of retired ones."""
        self._gauges[(name, labels)] = value

    # -- slow path --------------------------------------------------------------------------

    def _new_request(self, domain: str, method: str, status: int) -> list:
        """Series for a key seen for the first time (or one that must be folded)."""
        fold = False
        if domain not in self._domain_set:
            if len(self._domain_set) >= self.max_domains:
                domain, fold = OTHER, True
        if method not in KNOWN_METHODS:
            method, fold = "OTHER", True
        if len(self._requests) >= self.max_series:
            domain, fold = OTHER, True
        k = (domain, method, status)
        h = self._requests.get(k)
        if h is None:
            if fold and len(self._requests) >= self.max_series + 200:
                # Hard ceiling: even folded keys are bounded (statuses are 100..999).
                k = (OTHER, "OTHER", 0)
                h = self._requests.get(k)
            if h is None:
                h = self._requests[k] = [0.0, 0, 0] + [0] * (self._nb + 1)
                self._domain_set.add(k[0])
        return h

    # -- export -----------------------------------------------------------------------------

    def _export_core(self) -> tuple[list, list]:
        """Request and upstream series as ([name, labels, value] counters,
        [name, labels, bounds, counts, sum] histograms)."""
        counters: list = []
        histograms: list = []
        per_domain: dict[str, list] = {}
        for (domain, method, status), h in self._requests.items():
            counters.append([REQUESTS_TOTAL, (("domain", domain), ("method", method),
                                              ("status", str(status))), sum(h[3:])])
            acc = per_domain.get(domain)
            if acc is None:
                per_domain[domain] = list(h)
            else:
                for i, v in enumerate(h):
                    acc[i] += v
        for domain, h in per_domain.items():
            lab = (("domain", domain),)
            histograms.append([REQUEST_DURATION, lab, self._buckets, h[3:], h[0]])
            if h[1]:
                counters.append([RECEIVED_BYTES, lab, h[1]])
            if h[2]:
                counters.append([SENT_BYTES, lab, h[2]])
        per_ep: dict[str, list] = {}
        for (ep, outcome), h in self._upstream.items():
            counters.append([UPSTREAM_REQUESTS, (("endpoint", ep), ("outcome", outcome)),
                             sum(h[1:])])
            acc = per_ep.get(ep)
            if acc is None:
                per_ep[ep] = list(h)
            else:
                for i, v in enumerate(h):
                    acc[i] += v
        for ep, h in per_ep.items():
            histograms.append([UPSTREAM_DURATION, (("endpoint", ep),), self._ubuckets, h[1:],
                               h[0]])
        return counters, histograms

    def export(self) -> dict:
        """Everything counted since this worker started, as plain data (see module doc).

        Returns:
            A dict of str/int/float/list values, encodable by msgspec JSON and msgpack.
        """
        self._seq += 1
        for fn in self._collectors:
            fn(self._counters)
        bucket_sets: list = [list(self._buckets), list(MS_BUCKETS)]
        index: dict[tuple, int] = {tuple(self._buckets): 0, MS_BUCKETS: 1}

        def bset(bounds) -> int:
            b = tuple(bounds)
            i = index.get(b)
            if i is None:
                i = index[b] = len(bucket_sets)
                bucket_sets.append(list(b))
            return i

        def lab(labels) -> list:
            return [[k, v] for k, v in labels]

        core_c, core_h = self._export_core()
        counters = [[n, lab(l), v] for n, l, v in core_c]
        histograms = [[n, lab(l), bset(b), c, t] for n, l, b, c, t in core_h]
        for (name, labels), v in self._counters.items():
            counters.append([name, lab(labels), v])
        for (name, labels), h in self._ms.items():
            if sum(h[1:]):
                b = self._ms_bounds.get(name)
                histograms.append([name, lab(labels), bset(b[0]) if b else 1, h[1:], h[0]])
        for (name, labels), h in self._hists.items():
            histograms.append([name, lab(labels), bset(h[0]), h[3:], h[2]])
        # frozen series last: the master merges them onto the current layout
        for f in self._frozen:
            if f[0] == "counter":
                counters.append([f[1], lab(f[2]), f[3]])
            else:
                histograms.append([f[1], lab(f[2]), bset(f[3]), list(f[4]), f[5]])
        gauges = [[name, lab(labels), v] for (name, labels), v in self._gauges.items()]
        out = {
            "v": 1,
            "instance": self._instance,
            "seq": self._seq,
            "bucket_sets": bucket_sets,
            "counters": counters,
            "histograms": histograms,
            "gauges": gauges,
        }
        if self._help:
            out["help"] = {k: list(v) for k, v in self._help.items()}
        return out


# ------------------------------------------------------------------------------------------
# master side
# ------------------------------------------------------------------------------------------

class _Hist:
    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...], counts: list, total: float):
        self.bounds = bounds
        self.counts = counts  # per bucket, not cumulative; last = above the last bound
        self.sum = total

    def add(self, other: "_Hist") -> None:
        if other.bounds == self.bounds:
            for i, c in enumerate(other.counts):
                self.counts[i] += c
        else:
            for i, c in enumerate(_rebucket(other, self.bounds)):
                self.counts[i] += c
        self.sum += other.sum

    def copy(self) -> "_Hist":
        return _Hist(self.bounds, list(self.counts), self.sum)


def _rebucket(h: _Hist, bounds: tuple[float, ...]) -> list:
    """Map ``h`` onto other bounds: each observation goes to the first target bucket whose
    bound is >= its source bound (exact when the target bounds are a superset)."""
    out = [0] * (len(bounds) + 1)
    for i, c in enumerate(h.counts):
        src = h.bounds[i] if i < len(h.bounds) else math.inf
        out[bisect_left(bounds, src)] += c
    return out


class _Snapshot:
    """One worker export, normalised for summing."""

    __slots__ = ("instance", "seq", "counters", "hists", "gauges")

    def __init__(self, instance: str, seq: int):
        self.instance = instance
        self.seq = seq
        self.counters: dict[tuple[str, Labels], float] = {}
        self.hists: dict[tuple[str, Labels], _Hist] = {}
        self.gauges: dict[tuple[str, Labels], float] = {}


def _labels(raw: Any) -> Labels:
    if isinstance(raw, Mapping):
        items = raw.items()
    else:
        items = raw or ()
    return tuple((str(k), str(v)) for k, v in items)


def _parse_export(export: Mapping) -> _Snapshot:
    if not isinstance(export, Mapping):
        raise ValueError("metrics export must be a dict")
    snap = _Snapshot(str(export.get("instance", "")), int(export.get("seq", 0)))
    bucket_sets = [tuple(float(b) for b in bs) for bs in export.get("bucket_sets", ())]
    for name, labels, value in export.get("counters", ()):
        k = (str(name), _labels(labels))
        snap.counters[k] = snap.counters.get(k, 0) + value
    for name, labels, bset, counts, total in export.get("histograms", ()):
        bounds = bucket_sets[bset]
        if len(counts) != len(bounds) + 1:
            raise ValueError(f"histogram {name}: {len(counts)} counts for {len(bounds)} bounds")
        k = (str(name), _labels(labels))
        h = _Hist(bounds, list(counts), float(total))
        if k in snap.hists:
            snap.hists[k].add(h)
        else:
            snap.hists[k] = h
    for name, labels, value in export.get("gauges", ()):
        snap.gauges[(str(name), _labels(labels))] = value
    return snap


class MetricsAggregator:
    """The master's view: the sum of the latest export of every live worker plus the retained
    totals of retired ones. Not thread-safe (the master's event loop)."""

    def __init__(self) -> None:
        self._live: dict[str, _Snapshot] = {}
        self._base_counters: dict[tuple[str, Labels], float] = {}
        self._base_hists: dict[tuple[str, Labels], _Hist] = {}
        self._help: dict[str, tuple[str, str]] = {}  # declared by workers (custom metrics)

    def update(self, worker_key: str, export: Mapping) -> None:
        """Record the latest cumulative export of the live worker ``worker_key``.

        An export older than the one held (same ``instance``, lower or equal ``seq``) is
        ignored. An export from a new ``instance`` under the same key (the worker was
        replaced without :meth:`retire`) first retires the old one, so counts are kept.

        Raises:
            ValueError: ``export`` is malformed (nothing is changed then).
        """
        try:
            snap = _parse_export(export)
        except ValueError:
            raise
        except Exception as e:
            raise ValueError(f"malformed metrics export from {worker_key}: {e!r}") from e
        declared = export.get("help") if isinstance(export, Mapping) else None
        if isinstance(declared, Mapping):
            for name, (kind, text) in declared.items():
                if kind in ("counter", "gauge", "histogram"):
                    self._help[str(name)] = (kind, str(text))
        old = self._live.get(worker_key)
        if old is not None:
            if old.instance == snap.instance:
                if snap.seq and old.seq and snap.seq <= old.seq:
                    return
            else:
                self._fold(old)
        self._live[worker_key] = snap

    def retire(self, worker_key: str) -> None:
        """The worker ``worker_key`` died or was replaced: keep its counters and histograms
        in the retained base, drop its gauges. Unknown keys are ignored."""
        old = self._live.pop(worker_key, None)
        if old is not None:
            self._fold(old)

    def workers(self) -> list[str]:
        """Keys of the workers whose exports are held."""
        return list(self._live)

    def _fold(self, snap: _Snapshot) -> None:
        bc = self._base_counters
        for k, v in snap.counters.items():
            bc[k] = bc.get(k, 0) + v
        bh = self._base_hists
        for k, h in snap.hists.items():
            if k in bh:
                bh[k].add(h)
            else:
                bh[k] = h.copy()

    def _totals(self) -> tuple[dict, dict, dict]:
        counters = dict(self._base_counters)
        # live workers first: their bucket layout (the current config) wins, and retired
        # counts are merged onto it
        hists: dict[tuple[str, Labels], _Hist] = {}
        gauges: dict[tuple[str, Labels], float] = {}
        for snap in self._live.values():
            for k, v in snap.counters.items():
                counters[k] = counters.get(k, 0) + v
            for k, h in snap.hists.items():
                if k in hists:
                    hists[k].add(h)
                else:
                    hists[k] = h.copy()
            for k, v in snap.gauges.items():
                gauges[k] = gauges.get(k, 0) + v
        for k, h in self._base_hists.items():
            if k in hists:
                hists[k].add(h)
            else:
                hists[k] = h.copy()
        return counters, hists, gauges

    # -- rendering --------------------------------------------------------------------------

    def _families(self, extra_gauges: Iterable) -> dict[str, list]:
        """name -> [type, help, samples]; samples are (suffix, labels, value) or hist."""
        counters, hists, gauges = self._totals()
        fams: dict[str, list] = {}

        def fam(name: str, default_type: str) -> list:
            f = fams.get(name)
            if f is None:
                typ, help_ = METRIC_HELP.get(name) or self._help.get(name) or (
                    default_type, f"Dispa metric {name}.")
                f = fams[name] = [typ, help_, []]
            return f

        for (name, labels), v in counters.items():
            fam(name, "counter")[2].append(("", labels, v))
        for (name, labels), h in hists.items():
            fam(name, "histogram")[2].append(("hist", labels, h))
        for (name, labels), v in gauges.items():
            fam(name, "gauge")[2].append(("", labels, v))
        for entry in extra_gauges:
            name, help_, labels, value = entry[0], entry[1], entry[2], entry[3]
            typ = entry[4] if len(entry) > 4 else (
                "counter" if name.endswith("_total") else "gauge")
            f = fams.get(name)
            if f is None:
                f = fams[name] = [typ, help_ or METRIC_HELP.get(name, ("", name))[1], []]
            f[2].append(("", _labels(labels), value))
        return fams

    def render_prometheus(self, extra_gauges: Iterable[tuple] = ()) -> str:
        """Prometheus text exposition format 0.0.4.

        Args:
            extra_gauges: ``(name, help, labels_dict, value)`` entries supplied by the
                master (``dispa_target_health``, ``dispa_workers``, ...). A name ending in
                ``_total`` is typed ``counter``, others ``gauge``; an optional fifth element
                overrides the type.

        Returns:
            The exposition text, families sorted by name, ending with a newline.
        """
        out: list[str] = []
        fams = self._families(extra_gauges)
        for name in sorted(fams):
            typ, help_, samples = fams[name]
            mname = _metric_name(name)
            out.append(f"# HELP {mname} {_escape_help(help_)}")
            out.append(f"# TYPE {mname} {typ}")
            for suffix, labels, v in sorted(samples, key=lambda s: s[1]):
                if suffix == "hist":
                    h: _Hist = v
                    base = _label_body(labels)
                    lab = "{" + base + "}" if base else ""
                    pre = f"{mname}_bucket{{{base}{',' if base else ''}le=\""
                    cum = 0
                    for le, c in zip(_le_strings(h.bounds), h.counts):
                        cum += c
                        out.append(f'{pre}{le}"}} {_fmt(cum)}')
                    out.append(f"{mname}_sum{lab} {_fmt(h.sum)}")
                    out.append(f"{mname}_count{lab} {_fmt(cum)}")
                else:
                    out.append(f"{mname}{_label_str(labels)} {_fmt(v)}")
        return "\n".join(out) + "\n" if out else ""

    def render_json(self, extra_gauges: Iterable[tuple] = ()) -> dict:
        """The same data as :meth:`render_prometheus`, JSON-able.

        Returns:
            ``{"counters": [{"name", "labels", "value"}], "histograms": [{"name", "labels",
            "buckets": [{"le": "0.0005", "count": cumulative}, ..., {"le": "+Inf", ...}],
            "sum", "count"}], "gauges": [{"name", "labels", "value"}], "requests_total": N,
            "workers_reporting": N}``
        """
        fams = self._families(extra_gauges)
        counters: list = []
        histograms: list = []
        gauges: list = []
        requests_total = 0
        for name in sorted(fams):
            typ, _help, samples = fams[name]
            for suffix, labels, v in sorted(samples, key=lambda s: s[1]):
                lab = dict(labels)
                if suffix == "hist":
                    cum = 0
                    buckets = []
                    for i, c in enumerate(v.counts):
                        cum += c
                        le = _fmt(v.bounds[i]) if i < len(v.bounds) else "+Inf"
                        buckets.append({"le": le, "count": cum})
                    histograms.append({"name": name, "labels": lab, "buckets": buckets,
                                       "sum": _json_num(v.sum), "count": cum})
                elif typ == "counter":
                    counters.append({"name": name, "labels": lab, "value": _json_num(v)})
                    if name == REQUESTS_TOTAL:
                        requests_total += v
                else:
                    gauges.append({"name": name, "labels": lab, "value": _json_num(v)})
        return {"counters": counters, "histograms": histograms, "gauges": gauges,
                "requests_total": _json_num(requests_total),
                "workers_reporting": len(self._live)}


# -- text format helpers -------------------------------------------------------------------

_NAME_BAD = re.compile(r"[^a-zA-Z0-9_:]")
_LABEL_BAD = re.compile(r"[^a-zA-Z0-9_]")


def _metric_name(name: str) -> str:
    n = _NAME_BAD.sub("_", name) or "_"
    return "_" + n if n[0].isdigit() else n


def _label_name(name: str) -> str:
    if name.isidentifier() and name.isascii():
        return name
    n = _LABEL_BAD.sub("_", name) or "_"
    return "_" + n if n[0].isdigit() else n


def _escape_label(v: str) -> str:
    if "\\" in v or "\n" in v or '"' in v:
        return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
    return v


def _escape_help(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n")


def _label_body(labels: Labels) -> str:
    return ",".join(f'{_label_name(k)}="{_escape_label(v)}"' for k, v in labels)


def _label_str(labels: Labels) -> str:
    if not labels:
        return ""
    return "{" + _label_body(labels) + "}"


_LE_CACHE: dict[tuple[float, ...], tuple[str, ...]] = {}


def _le_strings(bounds: tuple[float, ...]) -> tuple[str, ...]:
    """``le`` label values for ``bounds`` plus ``"+Inf"``, cached per layout."""
    les = _LE_CACHE.get(bounds)
    if les is None:
        if len(_LE_CACHE) > 64:
            _LE_CACHE.clear()
        les = _LE_CACHE[bounds] = tuple(_fmt(b) for b in bounds) + ("+Inf",)
    return les


def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, int):
        return str(v)
    try:
        f = float(v)
    except (TypeError, ValueError):
        return "NaN"
    if math.isnan(f):
        return "NaN"
    if math.isinf(f):
        return "+Inf" if f > 0 else "-Inf"
    if f.is_integer() and abs(f) < 1e15:
        return str(int(f))
    return repr(f)


def _json_num(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, float) and v.is_integer() and abs(v) < 1e15:
        return int(v)
    return v
