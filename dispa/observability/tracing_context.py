"""Trace context on the request path: propagation headers and the head sampler.

Theory of operation
-------------------
This module is what tracing costs on *every* request, so it imports nothing heavy (no
opentelemetry) and does plain integer work:

* :func:`extract` finds a parent in the client's headers: W3C ``traceparent``
  (https://www.w3.org/TR/trace-context/#traceparent-header) and, when configured, B3 in its
  single-header (``b3``) or multi-header (``X-B3-*``) form
  (https://github.com/openzipkin/b3-propagation). ``tracestate`` and ``baggage`` need no
  work: Dispa forwards request headers, so they reach the upstream unchanged.
* :class:`Sampler` makes the head decision: a trace-id ratio (the OpenTelemetry
  ``TraceIdRatioBased`` rule: the low 64 bits of the trace id below ``rate * 2**64``, so
  every hop that uses the rule agrees), optionally parent-based (a remote parent's sampled
  flag wins), and a token bucket (``max_traces_per_second`` per worker) on new decisions.
* :func:`inject` writes the context the upstream sees: a ``traceparent`` whose parent is
  Dispa's CLIENT span (and/or B3 headers).
* :class:`TraceContext` is the per-request record the tracing filter leaves in
  ``req.ctx["tracing"]``; the log-phase sink (observability/tracing.py) reads it.

Rule: ids are ints (trace 128-bit, span 64-bit); hex only at the edges.
"""

from __future__ import annotations

import os
import random
import time

__all__ = ["TraceContext", "Parent", "Sampler", "extract", "inject", "parse_traceparent",
           "format_traceparent", "new_span_id", "new_low64", "new_high64", "reseed", "CTX_KEY"]

CTX_KEY = "tracing"  # req.ctx key of the TraceContext
_MASK64 = (1 << 64) - 1
_HEX = frozenset(b"0123456789abcdef")

_rand = random.Random()
if hasattr(os, "register_at_fork"):
    # forked workers must not draw the same ids (the random module does this only for its
    # own global instance)
    os.register_at_fork(after_in_child=_rand.seed)


def new_span_id() -> int:
    """A random non-zero 64-bit span id."""
    while True:
        v = _rand.getrandbits(64)
        if v:
            return v


def new_low64() -> int:
    """The low half of a new trace id (the sampler decides on it; may be 0)."""
    return _rand.getrandbits(64)


def new_high64() -> int:
    """The high half of a new trace id; never 0, so the whole id is never 0."""
    while True:
        v = _rand.getrandbits(64)
        if v:
            return v


def reseed() -> None:
    """New random state (call in each worker after fork: ids must not repeat across
    workers)."""
    _rand.seed()


class Parent:
    """A remote parent found in the request headers."""

    __slots__ = ("trace_id", "span_id", "sampled", "fmt")

    def __init__(self, trace_id: int, span_id: int, sampled: bool | None, fmt: str):
        self.trace_id = trace_id
        self.span_id = span_id
        self.sampled = sampled  # None: the parent made no decision (B3 without a flag)
        self.fmt = fmt          # "tracecontext" | "b3" | "b3multi"


class TraceContext:
    """One request's trace ids and head decision (``req.ctx["tracing"]``)."""

    __slots__ = ("trace_id", "parent_id", "server_id", "client_id", "sampled")

    def __init__(self, trace_id: int, parent_id: int, server_id: int, client_id: int,
                 sampled: bool):
        self.trace_id = trace_id
        self.parent_id = parent_id  # the client's span (0: Dispa's SERVER span is the root)
        self.server_id = server_id  # Dispa's SERVER span
        self.client_id = client_id  # the CLIENT span of the attempt that sent the head
        self.sampled = sampled


def _hexint(b: bytes, n: int) -> int:
    """``b`` as an int if it is exactly ``n`` lowercase hex digits, else -1."""
    if len(b) != n or not _HEX.issuperset(b):
        return -1
    return int(b, 16)


def parse_traceparent(value: bytes) -> Parent | None:
    """A ``traceparent`` value, or None when invalid (W3C trace-context §3.2: then the
    header is ignored and a new trace starts). Future versions are read as version 00."""
    v = value.strip()
    if len(v) < 55 or v[2:3] != b"-" or v[35:36] != b"-" or v[52:53] != b"-":
        return None
    version = v[:2]
    if _hexint(version, 2) < 0 or version == b"ff":
        return None
    if version == b"00" and len(v) != 55:
        return None
    if len(v) > 55 and v[55:56] != b"-":
        return None
    trace_id = _hexint(v[3:35], 32)
    span_id = _hexint(v[36:52], 16)
    flags = _hexint(v[53:55], 2)
    if trace_id <= 0 or span_id <= 0 or flags < 0:
        return None
    return Parent(trace_id, span_id, bool(flags & 1), "tracecontext")


def format_traceparent(trace_id: int, span_id: int, sampled: bool) -> bytes:
    return b"00-%032x-%016x-%s" % (trace_id, span_id, b"01" if sampled else b"00")


def _b3_sampled(flag: bytes) -> bool | None:
    f = flag.strip().lower()
    if f in (b"1", b"d", b"true"):
        return True
    if f in (b"0", b"false"):
        return False
    return None


def _b3_trace(b: bytes) -> int:
    b = b.strip().lower()
    return _hexint(b, 32) if len(b) == 32 else _hexint(b, 16)


def parse_b3(value: bytes) -> Parent | None:
    """The single ``b3`` header: ``{trace}-{span}[-{sampled}[-{parent}]]`` (a lone
    sampling flag carries no parent and gives None)."""
    parts = value.strip().split(b"-")
    if len(parts) < 2:
        return None
    trace_id = _b3_trace(parts[0])
    span_id = _hexint(parts[1].strip().lower(), 16)
    if trace_id <= 0 or span_id <= 0:
        return None
    sampled = _b3_sampled(parts[2]) if len(parts) > 2 else None
    return Parent(trace_id, span_id, sampled, "b3")


def parse_b3_multi(trace: bytes, span: bytes, sampled: bytes | None,
                   flags: bytes | None) -> Parent | None:
    """``X-B3-TraceId``/``X-B3-SpanId``/``X-B3-Sampled``/``X-B3-Flags`` (debug means
    sampled)."""
    trace_id = _b3_trace(trace)
    span_id = _hexint(span.strip().lower(), 16)
    if trace_id <= 0 or span_id <= 0:
        return None
    s = True if flags is not None and flags.strip() == b"1" else (
        _b3_sampled(sampled) if sampled is not None else None)
    return Parent(trace_id, span_id, s, "b3multi")


# names the extractor looks for, by length first (one len() per header on the hot path)
_TP = b"traceparent"
_B3 = b"b3"
_B3_NAMES = {b"x-b3-traceid": 0, b"x-b3-spanid": 1, b"x-b3-sampled": 2, b"x-b3-flags": 3}
_LENGTHS_W3C = frozenset((len(_TP),))
_LENGTHS_B3 = frozenset((len(_TP), len(_B3), *map(len, _B3_NAMES)))


def extract(raw_headers, *, w3c: bool = True, b3: bool = False) -> Parent | None:
    """The remote parent in ``raw_headers`` (``(name, value)`` byte pairs), W3C first, or
    None. Cost without any tracing header: one ``len()`` per header."""
    lengths = _LENGTHS_B3 if b3 else _LENGTHS_W3C
    tp = single = None
    multi: list | None = None
    for k, v in raw_headers:
        if len(k) not in lengths:
            continue
        low = k.lower()
        if low == _TP:
            if w3c and tp is None:
                tp = v
        elif b3:
            if low == _B3:
                single = v
            else:
                i = _B3_NAMES.get(low)
                if i is not None:
                    if multi is None:
                        multi = [None, None, None, None]
                    multi[i] = v
    if tp is not None:
        p = parse_traceparent(tp)
        if p is not None:
            return p
    if single is not None:
        p = parse_b3(single)
        if p is not None:
            return p
    if multi is not None and multi[0] is not None and multi[1] is not None:
        return parse_b3_multi(multi[0], multi[1], multi[2], multi[3])
    return None


def _set(headers, name: bytes, value: bytes) -> None:
    """``Headers.set`` without its per-character validation: the names are constants here
    and the values hex digits and dashes (that check was most of inject's cost)."""
    low = name.lower()
    n = len(low)
    out, placed = [], False
    for kv in headers.raw:
        k = kv[0]
        if len(k) == n and k.lower() == low:
            if not placed:  # where the client's was, like Headers.set
                out.append((name, value))
                placed = True
        else:
            out.append(kv)
    if not placed:
        out.append((name, value))
    headers.raw = out
    headers.changed = True


def inject(headers, tc: TraceContext, *, w3c: bool, b3: bool, b3multi: bool) -> None:
    """Write ``tc`` into the upstream request's ``headers`` (a filter-API Headers): the
    parent the upstream sees is Dispa's CLIENT span. ``tracestate``/``baggage`` stay."""
    if w3c:
        _set(headers, b"traceparent", format_traceparent(tc.trace_id, tc.client_id, tc.sampled))
    if b3:
        _set(headers, b"b3", b"%032x-%016x-%s-%016x" % (
            tc.trace_id, tc.client_id, b"1" if tc.sampled else b"0", tc.server_id))
    if b3multi:
        _set(headers, b"X-B3-TraceId", b"%032x" % tc.trace_id)
        _set(headers, b"X-B3-SpanId", b"%016x" % tc.client_id)
        _set(headers, b"X-B3-ParentSpanId", b"%016x" % tc.server_id)
        _set(headers, b"X-B3-Sampled", b"1" if tc.sampled else b"0")
        headers.remove(b"X-B3-Flags")


class Sampler:
    """The head decision: trace-id ratio, parent-based, rate-limited (per worker).

    ``root(low64)`` decides for a new trace from the low 64 bits of its id (so the caller
    can draw the high bits only when the trace is kept); ``child(parent)`` for a request
    with a remote parent. ``allow()`` takes one token of the rate limit (also used by the
    tail rules in observability/tracing.py).
    """

    __slots__ = ("bound", "parent_based", "rate", "tokens", "last", "clock")

    def __init__(self, ratio: float, *, parent_based: bool = True,
                 max_per_second: float = 0.0, clock=time.monotonic):
        # TraceIdRatioBased: sampled iff low64(trace_id) < round(ratio * 2**64)
        self.bound = round(ratio * (1 << 64))
        self.parent_based = parent_based
        self.rate = float(max_per_second)
        self.tokens = max(1.0, self.rate)
        self.clock = clock
        self.last = clock()

    def ratio_keeps(self, low64: int) -> bool:
        return low64 < self.bound

    def allow(self) -> bool:
        """One token of the ``max_traces_per_second`` bucket (burst: one second's worth);
        always True without a limit."""
        if not self.rate:
            return True
        now = self.clock()
        t = self.tokens + (now - self.last) * self.rate
        self.last = now
        cap = max(1.0, self.rate)
        if t > cap:
            t = cap
        if t >= 1.0:
            self.tokens = t - 1.0
            return True
        self.tokens = t
        return False

    def root(self, low64: int) -> bool:
        return low64 < self.bound and self.allow()

    def child(self, parent: Parent) -> bool:
        if self.parent_based and parent.sampled is not None:
            return parent.sampled
        return self.root(parent.trace_id & _MASK64)
