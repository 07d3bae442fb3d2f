"""The two gates that keep an untraced request off the Python paths (docs/tracing.md#cost).

Theory of operation
-------------------
With tracing on at a low ratio, almost every request is neither sampled nor carrying a
parent, and tracing has nothing to do for it. Two checks, made by the Session (both twins:
the compiled one in C, dispa/proxy/session.py in Python), decide that without a Python call:

1. **Request gate** (:class:`TraceGate`, ``Pipeline.trace_gate``): when the tracing filter
   is the only reason the pipeline exists, the Session looks for the propagation header
   names in the parsed head (``traceparent``; ``b3`` and ``x-b3-traceid`` with B3) and,
   when none is there, draws the low 64 bits of a new trace id itself (:func:`draw`: a
   xorshift64* per worker). Only a request with a header, or whose draw is below the
   sampler's ratio bound, goes on; the draw is the trace id's low half, so the ratio is
   applied once (the OpenTelemetry TraceIdRatioBased rule on the id actually sent) and the
   rate limit is still taken by the filter's Sampler. A request with a parent header enters
   the pipeline (the filter continues the trace). A drawn one, when the filter only writes
   ``traceparent`` (W3C propagation alone, ``TraceGate.new_traces``), does not: the Session
   starts the trace itself (:meth:`TraceGate.start`: the rate limit, then the remaining ids
   from the same generator), adds the header to the upstream head and carries the
   TraceContext to the log phase (``Session.trace``). That skips the filter-API Request,
   the hook and the Plan. With B3 to write, the draw is left in ``TraceGate.low`` and the
   request enters the pipeline, whose filter uses it.
2. **Log gate** (:func:`log_gate_of`, ``Runtime.log_gate``): when every log-phase sink
   declares the only exchanges it can use (``sink.log_gate``, a :class:`LogGate`), the
   Session builds the Exchange record only for those: status >= 500 (``errors``), a
   duration >= ``slow`` seconds, a trace the Session started itself, or a request whose
   filter state (``req.ctx``) holds ``ctx_key``. One sink without a gate (access log, traffic log, custom metrics) means
   every exchange is built, as before.
3. **Started traces** (``Runtime.trace_sink``): when the tracing sink is the only log sink,
   the exchange of a trace the Session started is not built on the event loop at all: the
   Session queues make_exchange's arguments for the export thread
   (``TracingSink.put_started``), which builds the Exchange and the spans a batch at a
   time. On the loop a kept trace then costs a few C-level stores; run once every hundred
   requests, the Python path it replaced ran with cold caches and cost several times its
   warm price (docs/tracing.md#cost).

Rule: both gates only *prefilter*; the filter and the sink still make the decision (the
sampler's rate limit, the tail rules), so a gate never keeps what the sink would drop, it
only skips what the sink would ignore.
"""

from __future__ import annotations

import os

from dispa.observability.tracing_context import TraceContext

__all__ = ["TraceGate", "LogGate", "log_gate_of", "draw", "seed", "MASK64", "SKIP", "PARENT",
           "DRAWN"]

MASK64 = (1 << 64) - 1
#: TraceGate.check's answers: nothing to trace; a parent header (the pipeline continues the
#: trace); a draw below the bound (a new trace, decided by ``start`` or the filter)
SKIP, PARENT, DRAWN = 0, 1, 2


class TraceGate:
    """The request gate of one tracing filter instance (see the module docstring).

    ``bound``: a new trace is sampled when the low 64 bits of its id are below it (the
    Sampler's bound, always < 2**64 here: at ratio 1.0 there is no gate). ``names``: the
    lower-case header names that carry a parent. ``low``: the draw the Session made for the
    request it is passing on (-1: none; the filter then draws its own). ``new_traces``: the
    Session may start a new trace itself (:meth:`start`). ``allow``: the sampler's rate
    limit (``Sampler.allow``), or None when it has none."""

    __slots__ = ("bound", "names", "low", "new_traces", "allow")

    def __init__(self, bound: int, names: tuple[bytes, ...], new_traces: bool = False,
                 allow=None):
        if not 0 <= bound <= MASK64:
            raise ValueError("bound must fit in 64 bits")
        self.bound = bound
        self.names = names
        self.low = -1
        self.new_traces = new_traces
        self.allow = allow

    def start(self, low: int):
        """A new trace for a request whose draw ``low`` passed the ratio bound:
        ``(TraceContext, traceparent value)``, or None when the rate limit says no. The
        high half of the trace id and both span ids come from :func:`draw` too (non-zero;
        the compiled Session does the same in C, so the twins send the same bytes)."""
        if self.allow is not None and not self.allow():
            return None
        high = _nonzero()
        server = _nonzero()
        client = _nonzero()
        tc = TraceContext((high << 64) | low, 0, server, client, True)
        return tc, b"00-%016x%016x-%016x-01" % (high, low, client)

    def take(self) -> int:
        """The Session's pending draw for this request, or -1; clears it."""
        low = self.low
        self.low = -1
        return low

    def check(self, headers) -> int:
        """The pure Session's check (the compiled one does the same in C): PARENT when a
        propagation header is there, else DRAWN when a draw is below the bound (the draw
        is left in ``low``), else SKIP."""
        names = self.names
        for k, _ in headers:
            if len(k) <= 12 and k.lower() in names:
                return PARENT
        low = draw()
        if low < self.bound:
            self.low = low
            return DRAWN
        return SKIP


class LogGate:
    """What one log-phase sink needs (see the module docstring)."""

    __slots__ = ("errors", "slow", "ctx_key")

    def __init__(self, errors: bool, slow: float, ctx_key: str | None):
        self.errors = errors      # every status >= 500
        self.slow = slow          # every exchange lasting >= slow seconds (0: none)
        self.ctx_key = ctx_key    # every request whose req.ctx holds this key

    def __repr__(self) -> str:
        return f"LogGate(errors={self.errors}, slow={self.slow}, ctx_key={self.ctx_key!r})"


def log_gate_of(sinks) -> LogGate | None:
    """The union of the sinks' gates, or None when some sink needs every exchange."""
    if not sinks:
        return None
    errors = False
    slow = 0.0
    keys = set()
    for sink in sinks:
        g = getattr(sink, "log_gate", None)
        if g is None:
            return None
        errors = errors or g.errors
        if g.slow > 0 and (slow == 0 or g.slow < slow):
            slow = g.slow
        if g.ctx_key is not None:
            keys.add(g.ctx_key)
    if len(keys) > 1:
        return None  # one key is all the Session checks; more: build every exchange
    return LogGate(errors, slow, next(iter(keys), None))


# -- the per-worker draw (the compiled Session has the same generator in C) ---------------

_state = [1]


def seed(value: int) -> None:
    """Reset the generator (tests; the compiled twin has ``_hotpath.trace_gate_seed``)."""
    _state[0] = (value & MASK64) or 0x9E3779B97F4A7C15


def draw() -> int:
    """The next 64-bit value of xorshift64* (Vigna 2016): three shifts and one multiply,
    statistically fine for trace ids and cheap enough in C to run for every request."""
    x = _state[0]
    x ^= x >> 12
    x ^= (x << 25) & MASK64
    x ^= x >> 27
    _state[0] = x
    return (x * 0x2545F4914F6CDD1D) & MASK64


def _nonzero() -> int:
    """The next non-zero draw (span ids and the trace id's high half must not be 0)."""
    while True:
        v = draw()
        if v:
            return v


def _reseed() -> None:
    seed(int.from_bytes(os.urandom(8), "little"))


_reseed()
if hasattr(os, "register_at_fork"):
    # each forked worker must draw its own ids
    os.register_at_fork(after_in_child=_reseed)
