"""Tracing: one SERVER span per request and one CLIENT span per upstream attempt.

Theory of operation
-------------------
Tracing has two halves, split so that an unsampled request costs almost nothing:

1. **Request phase** - the ``tracing@dispa`` filter (dispa/plugins/builtin/tracing.py,
   first in the global chain when tracing is on) extracts the client's parent
   (tracing_context.extract), makes the head decision (tracing_context.Sampler) and, when
   the request is sampled or has a parent, leaves a :class:`TraceContext` in
   ``req.ctx["tracing"]`` and injects a ``traceparent`` (and/or B3) whose parent is Dispa's
   CLIENT span. Unsampled and parentless: the hook returns after one header scan and one
   random draw, and the request stays on the pipeline's fast path; when the filter is the
   pipeline's only member, the Session makes that check itself, in C, and never calls the
   pipeline for such a request (observability/tracing_gate.py).
2. **Log phase** - :class:`TracingSink`, one of the log-phase sinks
   (observability/exchange.py), sees the finished :class:`Exchange` records it can use
   (its ``log_gate``: traced requests, 5xx, slow ones; every exchange when another sink
   needs them all, or when no request filter made the head decision). It keeps a trace
   when the head decision sampled it, or *at the end* when the exchange failed (5xx or an
   error, ``always_sample_errors``) or was slow (``duration > slow_threshold``). That tail
   decision is taken within the request, after its last byte: the facts it needs (status,
   duration, attempts, headers) are recorded by the log phase for every request that can
   qualify (the Session checks status, duration and trace context first), and spans are
   only built for kept traces. A tail-kept trace continues the client's trace
   when the request carried a parent; its upstream saw a ``traceparent`` with the
   not-sampled flag (or none at all for a parentless request), so the upstream's own spans
   may be missing from it.

A kept exchange is queued as is (SpanBatcher.put_deferred, tracing_export.py): its spans
are built with explicit start/end timestamps (Exchange.start + monotonic offsets of the
attempts), encoded and exported in the batcher's thread, a batch at a time, never on the
request path; ``flush`` on graceful shutdown exports what is queued.

The CLIENT span whose id went upstream in the ``traceparent`` is the *last* attempt's:
Dispa retries only when nothing was sent (connect failures), so the earlier attempts never
reached an upstream and get their own ids.

Rule: nothing here imports opentelemetry at module level; the SDK loads in the first
snapshot that turns tracing on: in the master before it forks the workers (:func:`preload`,
so they share the pages), else in the worker. Without tracing no process loads it.
"""

from __future__ import annotations

import asyncio
import logging
import threading

from dispa.observability.exchange import SINK_FACTORIES, make_exchange
from dispa.observability.tracing_gate import LogGate
from dispa.observability.tracing_context import (
    CTX_KEY, Sampler, TraceContext, extract, new_high64, new_low64, new_span_id,
)

log = logging.getLogger("dispa.observability.tracing")

__all__ = ["TracingSink", "tracing_sink", "sampler_for", "known_method", "preload"]

FILTER_TYPE = "dispa.plugins.builtin.tracing:Tracing"  # config/compile.py _tracing_filters
# OTLP values (tracing_otlp.encode_span): SPAN_KIND_SERVER, SPAN_KIND_CLIENT; STATUS_CODE_*
_SERVER, _CLIENT = 2, 3
_UNSET, _ERROR = 0, 2
_KNOWN_METHODS = frozenset(("GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS",
                            "TRACE", "PATCH", "QUERY"))

# One sampler per worker and settings: the filter (head) and the sink (tail) share its rate
# limit, and a reload with unchanged settings keeps its bucket.
_samplers: dict[tuple, Sampler] = {}


def sampler_for(part: dict) -> Sampler:
    """The worker's sampler for these ``[observability.tracing]`` settings."""
    key = (float(part.get("sampling_rate", 0.1)), bool(part.get("parent_based", True)),
           float(part.get("max_traces_per_second", 0.0)))
    s = _samplers.get(key)
    if s is None:
        if len(_samplers) > 8:
            _samplers.clear()
        s = _samplers[key] = Sampler(key[0], parent_based=key[1], max_per_second=key[2])
    return s


def known_method(method: str) -> bool:
    return method in _KNOWN_METHODS


def injects(part: dict) -> bool:
    """Whether the request-phase filter runs (some propagator writes headers)."""
    return any(p in ("tracecontext", "b3", "b3multi") for p in part.get("propagators") or ())


def _split_host(authority: str | None) -> tuple[str | None, int | None]:
    if not authority:
        return None, None
    if authority.startswith("["):
        host, _, rest = authority[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    else:
        host, sep, port = authority.rpartition(":")
        if not sep:
            host, port = authority, ""
    try:
        return host or None, int(port) if port else None
    except ValueError:
        return authority, None


class TracingSink:
    """The log-phase half of tracing (see the module docstring). Never blocks."""

    def __init__(self, part: dict, ctx, redaction: dict | None):
        from dispa.observability import tracing_export as tx
        from dispa.observability.redaction import build_redactor

        self.part = part
        self.redaction = redaction
        self._tx = tx
        self.metrics = ctx.metrics
        self.loop = ctx.loop
        self.sampler = sampler_for(part)
        self.filtered = injects(part)  # the filter made the head decision
        props = set(part.get("propagators") or ())
        self.w3c = "tracecontext" in props
        self.b3 = "b3" in props or "b3multi" in props
        self.errors = bool(part.get("always_sample_errors", True))
        self.slow = float(part.get("slow_threshold") or 0.0)
        # The exchanges this sink can use (observability/tracing_gate.py): with the request
        # filter deciding the head, only traced requests and the tail rules' candidates;
        # without it, the head decision is made here, for every exchange.
        self.log_gate = (LogGate(self.errors, self.slow, CTX_KEY) if self.filtered
                         else None)
        self.redactor = build_redactor(redaction)
        # the span attributes that carry client strings; _emit's fast path needs no rule
        # to name them (observability/redaction.py Redactor.leaves_unsuspected)
        self._plain = self.redactor.leaves_unsuspected(
            ("url.path", "url.query", "url.full", "user_agent.original"))
        self._finished = tx.FinishedSpan
        self.resource = tx.make_resource(part, ctx.worker_id)
        batch = part.get("batch") or {}
        self.batcher = tx.SpanBatcher(
            tx.make_exporter(part),
            max_queue_size=int(batch.get("max_queue_size", 2048)),
            max_export_batch_size=int(batch.get("max_export_batch_size", 512)),
            schedule_delay=float(batch.get("schedule_delay", 5.0)),
            export_timeout=float(batch.get("export_timeout", 30.0)),
            loop=self.loop)
        self._reported = (0, 0, 0)
        # traces the Session started and queued itself (put_started, or the compiled
        # Session's C twin of it); folded into dispa_traces_total when metrics are read
        self.started = 0
        self._started_reported = 0
        if self.metrics is not None:
            self.metrics.add_collector(self._collect)

    def same_settings(self, part: dict, redaction: dict | None) -> bool:
        return part == self.part and redaction == self.redaction

    # -- the per-request call --------------------------------------------------------

    def __call__(self, ex) -> None:
        tc = ex.trace  # a trace the Session started itself (tracing_gate.TraceGate.start)
        if tc is None:
            req = ex.request
            if req is not None:
                try:
                    tc = req.ctx.get(CTX_KEY)
                except AttributeError:
                    tc = None
        if tc is not None and tc.sampled:
            reason = "head"
        else:
            status = ex.status or 0
            if self.errors and (status >= 500 or (ex.error is not None and status != 499)):
                reason = "error"
            elif self.slow and ex.duration is not None and ex.duration > self.slow:
                reason = "slow"
            elif tc is None and not self.filtered:
                reason = "head"  # no request-phase filter: the head decision is made here
            else:
                return
            if tc is None:
                tc = self._context_at_end(ex, reason == "head")
                if tc is None:
                    return
            elif not self.sampler.allow():
                self._count("rate_limited")
                return
        self._emit(ex, tc, reason)

    def _context_at_end(self, ex, head: bool) -> TraceContext | None:
        """Ids for a trace decided in the log phase: the client's parent when it sent one,
        else a new trace; None when the sampler (ratio or rate limit) says no."""
        parent = extract(ex.request_headers or (), w3c=self.w3c, b3=self.b3)
        s = self.sampler
        if head:
            if parent is not None:
                keep = s.child(parent)
            else:
                low = new_low64()
                if not s.root(low):
                    return None
                return TraceContext((new_high64() << 64) | low, 0, new_span_id(),
                                    new_span_id(), True)
            if not keep:
                return None
        elif not s.allow():
            self._count("rate_limited")
            return None
        if parent is not None:
            return TraceContext(parent.trace_id, parent.span_id, new_span_id(), new_span_id(),
                                True)
        return TraceContext((new_high64() << 64) | new_low64(), 0, new_span_id(),
                            new_span_id(), True)

    def _count(self, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.inc("dispa_traces_total", (("outcome", outcome),))

    # -- span building (kept traces only) ---------------------------------------------

    def put_started(self, args: tuple) -> None:
        """The log phase of a trace the Session started (``Runtime.trace_sink``;
        observability/tracing_gate.py): ``args`` are make_exchange's, ``trace`` last. The
        Exchange is built in the export thread with the spans (:meth:`_started_spans`);
        on the loop only the queueing and one count (the compiled Session does the same
        in C, against the same batcher fields)."""
        self.batcher.put_deferred(self._started_spans, args, 1 + len(args[11] or ()))
        self.started += 1

    def _started_spans(self, *args) -> list:
        """put_started's entries, in the export thread."""
        ex = make_exchange(*args)
        return self._spans(ex, ex.trace, "head")

    def _collect(self, counters) -> None:
        """Metrics collector (WorkerMetrics.add_collector): the started traces and the
        export thread's counters, since the last read."""
        n = self.started - self._started_reported
        if n:
            self._started_reported += n
            self.metrics.inc("dispa_traces_total", (("outcome", "head"),), n)
        self._report()

    def _emit(self, ex, tc: TraceContext, reason: str) -> None:
        # On the event loop for every kept trace: only the queueing. The Exchange record
        # holds per-request objects that nothing changes after the exchange ended, so
        # the spans are built from it later, in the export thread, a batch at a time
        # (SpanBatcher.put_deferred; docs/tracing.md#cost-on-the-request-path).
        self.batcher.put_deferred(self._spans, (ex, tc, reason), 1 + len(ex.attempts or ()))
        if self.metrics is not None:
            self.metrics.inc("dispa_traces_total", (("outcome", reason),))
            self._report()

    def _spans(self, ex, tc: TraceContext, reason: str) -> list:
        """The SERVER span and one CLIENT span per upstream attempt of a kept exchange
        (export thread). Spans are the encoder's arguments (tracing_export.FinishedSpan):
        no SDK object is built here."""
        finished = self._finished
        resource = self.resource
        start = ex.start
        t0 = ex.t0
        start_ns = int(start * 1e9)
        end_ns = int((start + (ex.duration or 0.0)) * 1e9)
        method = ex.method or "-"
        known = method in _KNOWN_METHODS
        otel_method = method if known else "_OTHER"
        span_name = method if known else "HTTP"
        status = ex.status or 0
        target = ex.target or ""
        path, _, query = target.partition("?")
        ua = ex.header(b"user-agent")
        red = self.redactor
        # one suspect() over every client string instead of four value() calls
        if self._plain and not red.suspect(f"{target}\0{ua}" if ua else target):
            full_target = target or "/"
        else:
            path = red.value("url.path", path)
            if query:
                query = red.target("?" + query)[1:]
            if ua:
                ua = red.value("user_agent.original", ua)
            full_target = red.value("url.full", target or "/")
        host, port = _split_host(ex.host)
        client_ip = ex.client_ip or ""
        attrs = {
            "http.request.method": otel_method,
            "url.path": path,
            "url.scheme": ex.scheme or "http",
            "network.protocol.name": "http",
            "network.protocol.version": (ex.version or "HTTP/1.1").removeprefix("HTTP/"),
            # the client behind trusted proxies (the filter API's resolved address) when the
            # pipeline ran; the peer otherwise
            "client.address": getattr(ex.request, "client_ip", None) or client_ip,
            "network.peer.address": client_ip,
            "dispa.sampling.reason": reason,
        }
        if not known:
            attrs["http.request.method_original"] = method
        if query:
            attrs["url.query"] = query
        if host:
            attrs["server.address"] = host
        if port:
            attrs["server.port"] = port
        if status:
            attrs["http.response.status_code"] = status
        if ua:
            attrs["user_agent.original"] = ua
        if ex.bytes_in:
            attrs["http.request.body.size"] = ex.bytes_in
        if ex.bytes_out:
            attrs["http.response.body.size"] = ex.bytes_out
        if ex.request_id:
            attrs["dispa.request_id"] = ex.request_id
        if ex.route:
            attrs["dispa.route"] = ex.route
        if ex.cluster:
            attrs["dispa.cluster"] = ex.cluster
        if status >= 500:
            attrs["error.type"] = str(status)
        elif ex.error is not None and status != 499:
            attrs["error.type"] = str(ex.error)
        trace_id = tc.trace_id
        server_id = tc.server_id
        spans = [finished((span_name, trace_id, server_id, tc.parent_id, True, _SERVER,
                           start_ns, end_ns, attrs, _ERROR if status >= 500 else _UNSET,
                           None), resource)]
        attempts = ex.attempts or ()
        last = len(attempts) - 1
        for n, (endpoint, a, b, outcome) in enumerate(attempts):
            ep_host, ep_port = _split_host(endpoint)
            ep_host = ep_host or ""
            cattrs = {
                "http.request.method": otel_method,
                "server.address": ep_host,
                "network.peer.address": ep_host,
                "url.full": f"http://{endpoint}{full_target}",
                "network.protocol.version": "1.1",
            }
            if ep_port:
                cattrs["server.port"] = ep_port
                cattrs["network.peer.port"] = ep_port
            if n:
                cattrs["http.request.resend_count"] = n
            error = outcome != "ok"
            if error:
                cattrs["error.type"] = outcome
            elif status:
                cattrs["http.response.status_code"] = status
                if status >= 500:
                    error = True
                    cattrs["error.type"] = str(status)
            spans.append(finished((
                span_name, trace_id, tc.client_id if n == last else new_span_id(), server_id,
                False, _CLIENT, int((start + (a - t0)) * 1e9), int((start + (b - t0)) * 1e9),
                cattrs, _ERROR if error else _UNSET, None), resource))
        return spans

    def _report(self) -> None:
        """The export thread's counters into the worker's metrics (loop thread only)."""
        b = self.batcher
        now = (b.exported, b.failed, b.dropped)
        prev = self._reported
        if now != prev:
            for name, x, y in zip(("exported", "failed", "dropped"), now, prev):
                if x != y:
                    self.metrics.inc("dispa_trace_spans_total", (("outcome", name),), x - y)
            self._reported = now

    # -- lifecycle ----------------------------------------------------------------------

    async def flush(self) -> None:
        """Graceful shutdown: export everything queued (in a thread: it blocks)."""
        await asyncio.get_running_loop().run_in_executor(None, self.batcher.flush)
        if self.metrics is not None:
            self._collect(None)

    def close(self) -> None:
        """Dropped by a new snapshot: export what is queued and stop, off the loop."""
        if self.metrics is not None:
            self._collect(None)
            self.metrics.remove_collector(self._collect)
        threading.Thread(target=self.batcher.close, daemon=True,
                         name="dispa-span-close").start()


def preload(snapshot) -> None:
    """In the master, before it forks workers (fork mode): import the SDK and the configured
    exporter when ``snapshot`` turns tracing on, so every worker shares those pages instead
    of importing its own copy (docs/tracing.md#memory). Never raises: a worker that fails
    to import reports it itself."""
    part = (getattr(snapshot, "observability", None) or {}).get("tracing")
    if not part:
        return
    try:
        from dispa.observability import tracing_export
        tracing_export.preload(part)
        # the request filter makes the worker load the filter registry (every installed
        # filter's module) too
        from dispa.plugins import registry
        for spec in getattr(getattr(snapshot, "pipeline", None), "plugins", ()):
            if spec.type == FILTER_TYPE:
                registry.get(spec.type)
    except Exception as exc:  # noqa: BLE001 - the workers report the real error
        log.warning("tracing: preloading the exporter failed: %s", exc)


def tracing_sink(snapshot, ctx, previous):
    """Sink factory (observability/exchange.py): a :class:`TracingSink` when
    ``Snapshot.observability["tracing"]`` is set, reusing ``previous`` when unchanged."""
    obs = getattr(snapshot, "observability", None) or {}
    part = obs.get("tracing")
    if not part:
        return None
    redaction = obs.get("redaction")
    if isinstance(previous, TracingSink) and previous.same_settings(part, redaction):
        return previous
    return TracingSink(part, ctx, redaction)


SINK_FACTORIES.append(tracing_sink)
