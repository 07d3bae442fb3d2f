"""The log phase's record of one exchange, and the per-worker fan-out to its sinks.

ARCHITECTURE §2 step 9: access logs, traffic records, trace spans and custom metrics all
read the same facts about a finished exchange. The Session (compiled or pure) builds one
:class:`Exchange` per request, *only* when at least one sink is configured (the runtime's
``log_exchange`` is None otherwise, so the fast path pays one pointer test), and hands it
to :meth:`Observers.dispatch`, which calls each sink in turn.

Sinks must not block: they append to a buffer or a bounded queue and return (the writers
flush off the request path). A sink that raises is counted
(``dispa_log_sink_errors_total{sink}``) and never breaks the request or the other sinks.

Adding a sink: write a factory ``f(snapshot, ctx: SinkContext, previous) -> sink | None``
and append it to :data:`SINK_FACTORIES`. ``configure`` calls every factory on each new
snapshot with the sink it built last time (``previous``, or None) so a sink can keep its
open files and queues across reloads when its settings did not change; it returns None
when its feature is off. A sink is a callable ``sink(exchange)`` with optional ``close()``
(called when it is dropped) and ``flush()`` (called on graceful shutdown; may be async).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from typing import Any, Callable, Optional

log = logging.getLogger("dispa.observability")

__all__ = ["Exchange", "Observers", "SinkContext", "SINK_FACTORIES", "make_exchange"]


class Exchange:
    """One finished request/response exchange (read-only for sinks).

    Times: ``start`` is wall-clock epoch seconds of the first byte of the request head;
    ``t0`` the same instant on ``time.monotonic()``; ``duration`` seconds until the last
    byte (or the failure). ``attempts`` lists the upstream attempts in order, as
    ``(endpoint_id, start_monotonic, end_monotonic, outcome)`` with outcome ``"ok"`` or
    the failure kind (``connect_error``, ``timeout``, ``reset``, ``bad_response``);
    empty when no upstream was tried (local answers). ``request_headers`` are the client's
    raw ``(name, value)`` byte pairs as received (casing kept). ``request`` is the filter
    API's :class:`~dispa.plugins.api.Request` when the pipeline ran (its ``ctx`` carries
    filter state, e.g. the tracing context), else None. ``trace`` is the TraceContext of a
    trace the Session started itself, without the pipeline (observability/tracing_gate.py),
    else None.
    """

    __slots__ = ("start", "t0", "duration", "client_ip", "method", "target", "version",
                 "host", "domain", "status", "bytes_in", "bytes_out", "request_headers",
                 "request_id", "route", "cluster", "endpoint", "attempts", "error",
                 "request", "scheme", "tls", "trace")

    def __init__(self, **kw: Any):
        for k in self.__slots__:
            setattr(self, k, kw.get(k))

    def header(self, name: str | bytes) -> Optional[str]:
        """The first request header of that name (case-insensitive), decoded, or None."""
        n = name.encode("latin-1") if isinstance(name, str) else name
        n = n.lower()
        for k, v in self.request_headers or ():
            if k.lower() == n:
                return v.decode("latin-1")
        return None

    def header_bytes(self, name: bytes) -> Optional[bytes]:
        """The first request header ``name`` (given in lower case), raw bytes, or None."""
        for k, v in self.request_headers or ():
            if len(k) == len(name) and k.lower() == name:
                return v
        return None

    @property
    def upstream_seconds(self) -> Optional[float]:
        """Time spent on the last upstream attempt, or None without one."""
        if not self.attempts:
            return None
        _, a, b, _ = self.attempts[-1]
        return max(0.0, b - a)

    def __repr__(self) -> str:
        return (f"<Exchange {self.method} {self.target} {self.status} "
                f"{self.duration * 1000 if self.duration else 0:.3f}ms>")


def make_exchange(t0: float, now: float, client_ip: str, head, domain: str, status: int,
                  bytes_in: int, bytes_out: int, rid: bytes, cluster, endpoint: str,
                  attempts, plan, error: Optional[str], scheme: str = "http",
                  tls: Optional[dict] = None, trace=None) -> Exchange:
    """Build the record from the Session's state (both twins call this).

    Cheap by construction (docs/logging.md#cost; ~0.5 us): slot stores of values the
    Session already holds, two dict lookups, one decode; no header loop and no clock
    call (``start`` comes from the worker's wall/monotonic offset, :data:`CLOCKS`). The
    fields that cost more and that not every sink reads (``host``: a header lookup;
    ``request_id``, ``route``, ``cluster``, ``request``) are properties of
    :class:`_LazyExchange`, computed on first read.
    """
    ex = _new_lazy(_LazyExchange)
    c = CLOCKS
    if t0 >= c.until:
        c.refresh()
    ex.start = t0 + c.offset
    ex.t0 = t0
    ex.duration = now - t0
    ex.client_ip = client_ip
    if head is not None:
        m = head.method
        ex.method = _METHODS.get(m) or m.decode("latin-1")
        ex.target = head.target.decode("latin-1")
        ex.version = _VERSIONS.get(head.version, "HTTP/1.0")
        ex.request_headers = head.headers
    else:
        ex.method = ex.target = ex.version = "-"
        ex.request_headers = _EMPTY
    ex.domain = domain or "-"
    ex.status = status
    ex.bytes_in = bytes_in
    ex.bytes_out = bytes_out
    ex.endpoint = endpoint or None
    ex.attempts = attempts if attempts else _EMPTY
    ex.error = error
    ex.scheme = scheme
    ex.tls = tls
    ex.trace = trace
    ex._h = head
    ex._rid = rid
    ex._cl = cluster
    ex._plan = plan
    ex._host = _UNSET
    return ex


_new_lazy = object.__new__
_UNSET: Any = object()
#: shared empty list for "no headers" / "no attempts" (sinks only read it)
_EMPTY: list = []
_VERSIONS = {11: "HTTP/1.1", 10: "HTTP/1.0"}
#: method bytes -> str (an unknown method is decoded, not cached: a client cannot grow it)
_METHODS = {m.encode(): m for m in ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH",
                                    "OPTIONS", "CONNECT", "TRACE")}


class _Clocks:
    """``time.time() - time.monotonic()``, refreshed at most every ``REFRESH`` seconds of
    monotonic time: one clock pair per worker and interval, not two calls per request.
    The error is the wall clock's slew over the interval (NTP slews <= 0.5 ms/s), below
    the logs' millisecond resolution; a wall-clock step shows after at most ``REFRESH``."""

    REFRESH = 1.0
    __slots__ = ("offset", "until")

    def __init__(self):
        self.offset = 0.0
        self.until = -1.0

    def refresh(self) -> None:
        m = time.monotonic()
        self.offset = time.time() - m
        self.until = m + self.REFRESH

    def wall(self, mono: float) -> float:
        """The wall-clock time (epoch seconds) of monotonic instant ``mono``."""
        if mono >= self.until:
            self.refresh()
        return mono + self.offset


#: the worker's clock offset (one per process)
CLOCKS = _Clocks()


class _LazyExchange(Exchange):
    """The Session's Exchange (see :func:`make_exchange`): the same attributes as
    :class:`Exchange`, read-only; the properties below shadow Exchange's slots of the
    same names and compute on read from the raw values kept in the private slots."""

    __slots__ = ("_h", "_rid", "_cl", "_plan", "_host")

    @property
    def host(self) -> Optional[str]:
        v = self._host
        if v is _UNSET:
            h = self._h
            b = h.get(b"host") if h is not None else None
            v = self._host = None if b is None else b.decode("latin-1")
        return v

    @property
    def request_id(self) -> str:
        r = self._rid
        return r.decode("latin-1") if r else ""

    @property
    def request(self):
        p = self._plan
        return p.req if p is not None else None

    @property
    def route(self):
        p = self._plan
        return getattr(p.req, "route", None) if p is not None else None

    @property
    def cluster(self) -> Optional[str]:
        c = self._cl
        return getattr(c, "name", None) if c is not None else None

    def header(self, name: str | bytes) -> Optional[str]:
        """The first request header of that name (case-insensitive), decoded, or None."""
        h = self._h
        if h is None:
            return None
        n = name.encode("latin-1") if isinstance(name, str) else name
        v = h.get(n.lower())
        return None if v is None else v.decode("latin-1")

    def header_bytes(self, name: bytes) -> Optional[bytes]:
        """The first request header ``name`` (lower-case bytes), raw, or None."""
        h = self._h
        return None if h is None else h.get(name)


class SinkContext:
    """What a sink factory gets besides the snapshot."""

    __slots__ = ("loop", "metrics", "worker_id")

    def __init__(self, loop, metrics, worker_id: int):
        self.loop = loop
        self.metrics = metrics  # observability.metrics.WorkerMetrics
        self.worker_id = worker_id


#: Sink factories, called in this order on every snapshot (see the module docstring).
SINK_FACTORIES: list[Callable[[Any, SinkContext, Any], Any]] = []

#: Modules that append their factories to SINK_FACTORIES when imported; imported by the
#: first Observers (in workers only, so the master never loads sink code).
BUILTIN_SINK_MODULES: list[str] = [
    "dispa.observability.custom_metrics",
    "dispa.observability.tracing",
    "dispa.observability.access_log",
    "dispa.observability.traffic_log",
]


def _load_builtin_sinks() -> None:
    import importlib
    for name in BUILTIN_SINK_MODULES:
        importlib.import_module(name)


class Observers:
    """A worker's sinks: rebuilt on each snapshot, flushed on graceful shutdown."""

    def __init__(self, ctx: SinkContext):
        _load_builtin_sinks()
        self.ctx = ctx
        self._by_factory: dict[Callable, Any] = {}
        self.sinks: tuple = ()

    def configure(self, snapshot) -> Optional[Callable[[Exchange], None]]:
        """Build the sinks for ``snapshot``; return the dispatch function, or None when
        no sink is configured (the Session then builds no Exchange at all)."""
        built: dict[Callable, Any] = {}
        for factory in SINK_FACTORIES:
            previous = self._by_factory.get(factory)
            try:
                sink = factory(snapshot, self.ctx, previous)
            except Exception:  # noqa: BLE001 - a broken sink must not block a snapshot
                log.exception("log sink %s failed to build; keeping it off",
                              getattr(factory, "__name__", factory))
                sink = None
            if previous is not None and sink is not previous:
                _close(previous)
            if sink is not None:
                built[factory] = sink
        self._by_factory = built
        self.sinks = tuple(built.values())
        if len(self.sinks) == 1:
            return self._dispatch_one(self.sinks[0])
        return self.dispatch if self.sinks else None

    def _dispatch_one(self, sink) -> Callable[[Exchange], None]:
        """:meth:`dispatch` for one sink, without the loop (the common configuration:
        one Python frame less per request). A sink may offer ``emit`` as a cheaper
        entry point than ``__call__`` (a bound method instead of a slot lookup)."""
        call = getattr(sink, "emit", sink)
        error = self._error

        def dispatch(ex: Exchange) -> None:
            try:
                call(ex)
            except Exception:  # noqa: BLE001 - logging must never break a request
                error(sink)
        return dispatch

    def dispatch(self, ex: Exchange) -> None:
        for sink in self.sinks:
            try:
                sink(ex)
            except Exception:  # noqa: BLE001 - logging must never break a request
                self._error(sink)

    def _error(self, sink) -> None:
        if self.ctx.metrics is not None:
            self.ctx.metrics.inc("dispa_log_sink_errors_total",
                                 (("sink", type(sink).__name__),))

    async def flush(self) -> None:
        """Graceful shutdown: let every sink write what it holds."""
        for sink in self.sinks:
            fn = getattr(sink, "flush", None)
            if fn is None:
                continue
            try:
                r = fn()
                if inspect.isawaitable(r):
                    await r
            except Exception:  # noqa: BLE001
                log.exception("log sink %s failed to flush", type(sink).__name__)

    def close(self) -> None:
        for sink in self.sinks:
            _close(sink)
        self.sinks = ()
        self._by_factory = {}


def _close(sink) -> None:
    fn = getattr(sink, "close", None)
    if fn is not None:
        try:
            r = fn()
            if inspect.isawaitable(r):
                asyncio.ensure_future(r)
        except Exception:  # noqa: BLE001
            log.exception("log sink %s failed to close", type(sink).__name__)
