"""``tracing@dispa``: the request-phase half of tracing (docs/tracing.md).

Not configured by hand: ``config.compile`` puts one instance first in the global chain when
``[observability.tracing]`` is on and a propagator writes headers (tracecontext, b3,
b3multi). Its config is the compiled ``[observability.tracing]`` table.

``on_request`` extracts the client's parent, makes the head decision and, for a sampled
request or one that carries a parent, stores a TraceContext in ``req.ctx["tracing"]`` and
injects the propagation headers the upstream sees (``traceparent`` with Dispa's CLIENT
span as parent; ``tracestate`` and ``baggage`` are forwarded unchanged). An unsampled
request without a parent costs one header scan and one random draw, and leaves the request
untouched, so the pipeline keeps it on its fast path (no Plan object).

When this filter is the pipeline's only reason to exist, the Session does that check itself
without calling the pipeline (``trace_gate``, observability/tracing_gate.py). A request
with a parent header still comes here. A new trace, with W3C propagation alone, is started
by the Session itself (``TraceGate.start``) without this hook; with B3 the Session passes
the sampled draw on and this hook uses it as the trace id's low half.
"""

from __future__ import annotations

from dispa.config.tracing_model import TracingConfig
from dispa.observability.tracing import sampler_for
from dispa.observability.tracing_gate import TraceGate
from dispa.observability.tracing_context import (
    CTX_KEY, TraceContext, extract, inject, new_high64, new_low64, new_span_id,
)
from dispa.plugins.api import BuildContext, Filter, Request

__all__ = ["Tracing"]


class Tracing(Filter):
    """Extract, decide, inject (see the module docstring)."""

    name = "tracing"
    Config = TracingConfig

    def __init__(self, config: TracingConfig, ctx: BuildContext):
        super().__init__(config, ctx)
        props = set(config.propagators)
        self._w3c = "tracecontext" in props
        self._b3_single = "b3" in props
        self._b3_multi = "b3multi" in props
        self._b3 = self._b3_single or self._b3_multi
        import msgspec
        self._sampler = sampler_for(msgspec.to_builtins(config))
        # the request gate (Pipeline.trace_gate): the header names extract() reads, and the
        # ratio bound; none at ratio 1 (every request would pass it)
        names = ((b"traceparent",) if self._w3c else ()) + (
            (b"b3", b"x-b3-traceid") if self._b3 else ())
        bound = self._sampler.bound
        # W3C alone: a new trace needs one header, which the Session adds itself
        # (TraceGate.start), taking the rate limit's token as this hook would
        self.trace_gate = (TraceGate(bound, names, new_traces=self._w3c and not self._b3,
                                     allow=self._sampler.allow if self._sampler.rate else None)
                           if bound < (1 << 64) else None)

    def on_request(self, req: Request) -> None:
        # First in the chain, so the parser's header list is still the request's: reading it
        # directly skips building the lazy ``req.headers`` view (a few microseconds, most
        # of this hook's cost) for the requests this hook then leaves alone.
        lazy = req._head
        parent = extract(lazy[0].headers if lazy is not None and not req._lz & 2
                         else req.headers.raw, w3c=self._w3c, b3=self._b3)
        sampler = self._sampler
        gate = self.trace_gate
        low = gate.take() if gate is not None else -1  # the Session's draw, if it made one
        if parent is None:
            if low < 0:
                low = new_low64()
            if not sampler.root(low):
                return None  # the common case at low ratios: nothing else to do
            tc = TraceContext((new_high64() << 64) | low, 0, new_span_id(), new_span_id(), True)
        else:
            tc = TraceContext(parent.trace_id, parent.span_id, new_span_id(), new_span_id(),
                              sampler.child(parent))
        req.ctx[CTX_KEY] = tc
        inject(req.headers, tc, w3c=self._w3c, b3=self._b3_single, b3multi=self._b3_multi)
        return None
