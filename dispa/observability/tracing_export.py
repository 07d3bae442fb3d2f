"""Span export: the exporter (OTLP/HTTP, OTLP/gRPC, Zipkin JSON) and the batching thread.

Theory of operation
-------------------
Imported by a worker whose snapshot turns tracing on (observability/tracing.py imports it
lazily), and by the master before it forks workers for such a snapshot (:func:`preload`, so
the forked workers share its pages): it is the one module that loads opentelemetry-sdk and
an exporter.

:class:`SpanBatcher` is Dispa's own batcher, the SDK BatchSpanProcessor's algorithm
without its per-drop warning log line: the event loop appends finished spans to a bounded
deque (``put``, O(1), never blocks), and a thread exports them in batches of
``max_export_batch_size`` every ``schedule_delay`` seconds, or as soon as a batch is full.
When the deque is full, new spans are dropped and counted (``dropped``), so a slow or absent
collector never grows memory or slows requests. ``flush`` (graceful shutdown) exports
everything queued, from the calling thread; ``close`` stops the schedule and shuts the
exporter down.

In a worker (a batcher given the event loop) the export thread lives only while it exports:
the loop's timer (``schedule_delay``) or a full batch (:meth:`SpanBatcher.kick`) starts one,
it exports everything queued and exits. A worker with a second thread, even an idle one,
loses single-threaded fast paths (the kernel's, most likely: while the file table is shared,
every system call's fd lookup takes and drops a reference): in ``pair64`` runs an idle
extra thread cost Dispa 1-4 % of its CPU per request, a thread that had exited nothing
(docs/tracing.md#overhead). Without a loop (tools, tests) one standing thread keeps the
schedule, as the SDK's processor does.

Spans are :class:`FinishedSpan` records, built with explicit ids and start/end timestamps
(the request already happened): the arguments of the OTLP encoder
(tracing_otlp.encode_span, compiled when built), so the OTLP/HTTP exporter writes them
without building SDK objects; the gRPC and Zipkin exporters get the SDK's
:class:`~opentelemetry.sdk.trace.ReadableSpan` (:meth:`FinishedSpan.readable`), converted
in the export thread.
"""

from __future__ import annotations

import collections
import http.client
import logging
import threading
import time

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExportResult
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags

from dispa.observability.tracing_otlp import encode_spans, readable

log = logging.getLogger("dispa.observability.tracing")

__all__ = ["SpanBatcher", "FinishedSpan", "make_exporter", "make_resource", "SCOPE", "span",
           "SERVER", "CLIENT", "ERROR_STATUS", "UNSET_STATUS"]

SERVER = SpanKind.SERVER
CLIENT = SpanKind.CLIENT
ERROR_STATUS = Status(StatusCode.ERROR)
UNSET_STATUS = Status(StatusCode.UNSET)
_SAMPLED = TraceFlags(TraceFlags.SAMPLED)


def _scope() -> InstrumentationScope:
    try:
        from dispa import __version__ as version
    except ImportError:  # pragma: no cover
        version = None
    return InstrumentationScope("dispa", version)


SCOPE = _scope()


def make_resource(part: dict, worker_id: int) -> Resource:
    """``service.name``, the operator's ``resource_attributes`` and the worker id (the
    SDK adds its own telemetry.sdk.* and OTEL_RESOURCE_ATTRIBUTES)."""
    attrs = {"service.name": part.get("service_name") or "dispa",
             "service.instance.id": f"worker-{worker_id}"}
    attrs.update(part.get("resource_attributes") or {})
    return Resource.create(attrs)


class FinishedSpan:
    """One finished span of Dispa's, as the arguments of tracing_otlp.encode_span
    (``otlp_args``) plus its resource: building it costs one tuple, where an SDK
    ReadableSpan (two SpanContexts, a Status, bounded attributes) cost ~6 us on the event
    loop per span. The OTLP/HTTP exporter encodes it directly; the other exporters get
    :meth:`readable` (in the export thread). The read-only properties mirror ReadableSpan's
    for code that inspects spans (tests, the fallback encoder)."""

    __slots__ = ("otlp_args", "resource")

    instrumentation_scope = SCOPE
    events = ()
    links = ()
    dropped_attributes = 0

    def __init__(self, otlp_args: tuple, resource: Resource):
        self.otlp_args = otlp_args
        self.resource = resource

    @property
    def name(self) -> str:
        return self.otlp_args[0]

    @property
    def context(self) -> SpanContext:
        a = self.otlp_args
        return SpanContext(a[1], a[2], is_remote=False, trace_flags=_SAMPLED)

    @property
    def parent(self) -> SpanContext | None:
        a = self.otlp_args
        return (SpanContext(a[1], a[3], is_remote=a[4], trace_flags=_SAMPLED)
                if a[3] else None)

    @property
    def kind(self) -> SpanKind:
        return SpanKind(self.otlp_args[5] - 1)

    @property
    def start_time(self) -> int:
        return self.otlp_args[6]

    @property
    def end_time(self) -> int:
        return self.otlp_args[7]

    @property
    def attributes(self) -> dict:
        return self.otlp_args[8]

    @property
    def status(self) -> Status:
        a = self.otlp_args
        if a[10]:
            return Status(StatusCode(a[9]), a[10])
        return ERROR_STATUS if a[9] == StatusCode.ERROR.value else (
            UNSET_STATUS if a[9] == 0 else Status(StatusCode(a[9])))

    def readable(self) -> ReadableSpan:
        """The SDK's ReadableSpan of this span (for the gRPC and Zipkin exporters)."""
        return ReadableSpan(
            name=self.name, context=self.context, parent=self.parent,
            resource=self.resource, attributes=self.attributes, kind=self.kind,
            status=self.status, start_time=self.start_time, end_time=self.end_time,
            instrumentation_scope=SCOPE)


def span(name: str, trace_id: int, span_id: int, parent_id: int, remote_parent: bool,
         kind, start_ns: int, end_ns: int, attributes: dict, status: Status,
         resource: Resource) -> FinishedSpan:
    """One finished span with explicit ids and times (always exported: sampled flag)."""
    return FinishedSpan((name, trace_id, span_id, parent_id, remote_parent, kind.value + 1,
                         start_ns, end_ns, attributes, status.status_code.value,
                         status.description), resource)


def make_exporter(part: dict):
    """The SpanExporter for ``part`` (``Snapshot.observability["tracing"]``)."""
    kind = part["exporter"]
    endpoint = part["endpoint"]
    headers = dict(part.get("headers") or {})
    timeout = float(part.get("timeout") or 10.0)
    gzip = part.get("compression") == "gzip"
    if kind == "otlp_http":
        return OtlpHttpExporter(endpoint, headers, timeout, gzip)
    if kind == "otlp_grpc":
        from grpc import Compression as GrpcCompression
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        insecure = not endpoint.startswith("https://")
        target = endpoint.split("://", 1)[-1].rstrip("/")
        return _ReadableSpans(OTLPSpanExporter(
            endpoint=target, insecure=insecure, headers=headers or None, timeout=timeout,
            compression=GrpcCompression.Gzip if gzip else None))
    if kind == "zipkin":
        from opentelemetry.exporter.zipkin.json import ZipkinExporter
        return _ReadableSpans(_ZipkinWithHeaders(
            ZipkinExporter(endpoint=endpoint, timeout=int(timeout) or 1), headers))
    raise ValueError(f"unknown exporter {kind!r}")


class OtlpHttpExporter:
    """OTLP/HTTP with protobuf bodies (the SDK exporter's wire format, written by
    tracing_otlp.encode_spans: ``POST`` to the endpoint, ``Content-Type:
    application/x-protobuf``) over the standard library's http.client. The SDK's own
    exporter sends through ``requests``, which adds about 6 MB to every process for one
    POST per batch (docs/tracing.md#memory), and encodes three times slower.

    Retries, like the SDK's: a connection failure or a 429/502/503/504 answer is retried
    with a doubling delay (from 1 s) while it fits within ``timeout``; any other answer
    fails the batch at once. One kept-alive connection, used only by the export thread (or
    the shutdown flush, after that thread stopped)."""

    RETRYABLE = frozenset((429, 502, 503, 504))

    def __init__(self, endpoint: str, headers: dict, timeout: float, gzip: bool):
        import urllib.parse
        u = urllib.parse.urlsplit(endpoint)
        self.https = u.scheme == "https"
        self.host = u.hostname or "localhost"
        self.port = u.port or (443 if self.https else 80)
        self.path = (u.path or "/v1/traces") + (f"?{u.query}" if u.query else "")
        self.timeout = timeout
        self.gzip = gzip
        self.headers = {"Content-Type": "application/x-protobuf", **headers}
        if gzip:
            self.headers["Content-Encoding"] = "gzip"
        self._conn = None
        self._shutdown = threading.Event()

    def _connection(self):
        if self._conn is None:
            if self.https:
                import ssl
                self._conn = http.client.HTTPSConnection(
                    self.host, self.port, timeout=self.timeout,
                    context=ssl.create_default_context())
            else:
                self._conn = http.client.HTTPConnection(self.host, self.port,
                                                        timeout=self.timeout)
        return self._conn

    def _post(self, body: bytes) -> int | None:
        """The response status, or None when the connection failed."""
        conn = self._connection()
        try:
            conn.request("POST", self.path, body=body, headers=self.headers)
            resp = conn.getresponse()
            resp.read()
            if resp.will_close:
                self._close_conn()
            return resp.status
        except (OSError, http.client.HTTPException) as exc:
            log.debug("span export to %s:%s failed: %s", self.host, self.port, exc)
            self._close_conn()
            return None

    def _close_conn(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def export(self, spans) -> SpanExportResult:
        if self._shutdown.is_set():
            return SpanExportResult.FAILURE
        body = encode_spans(spans)
        if self.gzip:
            import gzip
            body = gzip.compress(body)
        deadline = time.monotonic() + self.timeout
        delay = 1.0
        while True:
            status = self._post(body)
            if status is not None and 200 <= status < 300:
                return SpanExportResult.SUCCESS
            if status is not None and status not in self.RETRYABLE:
                log.warning("span export to %s:%s: HTTP %s", self.host, self.port, status)
                return SpanExportResult.FAILURE
            if time.monotonic() + delay > deadline or self._shutdown.wait(delay):
                return SpanExportResult.FAILURE
            delay *= 2

    def shutdown(self) -> None:
        self._shutdown.set()
        self._close_conn()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True  # nothing is buffered here


def preload(part: dict) -> None:
    """Import what :func:`make_exporter` and :func:`make_resource` will import for ``part``,
    without building anything (no session, channel or thread): the master calls this before
    forking workers so the pages are shared (dispa/server/master.py). Only the configured
    exporter's modules: OTLP/HTTP loads neither ``requests`` nor ``grpc``."""
    import importlib
    kind = part.get("exporter")
    modules = {
        "otlp_http": ("http.client",),
        "otlp_grpc": ("opentelemetry.exporter.otlp.proto.grpc.trace_exporter",),
        "zipkin": ("opentelemetry.exporter.zipkin.json", "requests"),
    }.get(kind, ())
    for name in modules:
        importlib.import_module(name)
    make_resource(part, 0)  # the SDK's resource detection imports on first use


class _ReadableSpans:
    """An SDK exporter fed Dispa's FinishedSpans: converts them (in the export thread)."""

    def __init__(self, inner):
        self.inner = inner

    def export(self, spans):
        return self.inner.export([readable(s) for s in spans])

    def shutdown(self):
        return self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


class _ZipkinWithHeaders:
    """The Zipkin exporter plus the configured extra headers (it has no such option)."""

    def __init__(self, inner, headers: dict):
        self.inner = inner
        if headers:
            inner.session.headers.update(headers)

    def export(self, spans):
        return self.inner.export(spans)

    def shutdown(self):
        return self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


class SpanBatcher:
    """A bounded queue of finished spans, exported in batches off the event loop (see the
    module docstring: with ``loop``, by short-lived threads the loop starts; without, by
    one standing daemon thread)."""

    def __init__(self, exporter, *, max_queue_size: int = 2048,
                 max_export_batch_size: int = 512, schedule_delay: float = 5.0,
                 export_timeout: float = 30.0, loop=None):
        self.exporter = exporter
        self.max_queue_size = max_queue_size
        self.max_batch = max_export_batch_size
        self.delay = schedule_delay
        self.export_timeout = export_timeout
        self.queue: collections.deque = collections.deque()
        self.dropped = 0    # spans refused because the queue was full
        self.exported = 0   # spans the exporter accepted
        self.failed = 0     # spans in batches the exporter failed
        self.threads_started = 0  # export threads started (loop mode)
        self._lock = threading.Lock()  # one export at a time (thread vs flush)
        self._closed = False
        self._loop = loop
        self._thread: threading.Thread | None = None
        self._timer = None
        if loop is not None:
            self._wake = None
            self._timer = loop.call_later(schedule_delay, self._tick)
        else:
            self._wake = threading.Event()
            self._thread = threading.Thread(target=self._run, name="dispa-span-export",
                                            daemon=True)
            self._thread.start()

    def kick(self) -> None:
        """Export what is queued now, off the calling thread (the event loop's, in loop
        mode: a put that fills a batch, and the timer). Never blocks; a no-op while an
        export thread is still running, which exports what was queued meanwhile too."""
        if self._wake is not None:
            self._wake.set()
            return
        if self._closed or not self.queue:
            return
        t = self._thread
        if t is not None and t.is_alive():
            return
        t = threading.Thread(target=self._export_all, name="dispa-span-export",
                             daemon=True)
        self._thread = t
        self.threads_started += 1
        t.start()

    def _tick(self) -> None:
        # loop mode: the schedule_delay timer, on the loop
        if self._closed:
            return
        self.kick()
        self._timer = self._loop.call_later(self.delay, self._tick)

    def put_deferred(self, build, args: tuple, n: int) -> None:
        """Queue the ``n`` spans ``build(*args)`` will return, built in the export thread
        (event loop; never blocks): the loop appends one tuple, and the spans of a whole
        batch are built together, with the interpreter's caches warm, instead of one
        request at a time between two system calls. ``args`` must not change afterwards.
        One such entry counts as one of ``max_queue_size``; beyond it, its ``n`` spans
        are dropped and counted."""
        q = self.queue
        if len(q) >= self.max_queue_size:
            self.dropped += n
            return
        q.append((build, args, n))
        if len(q) >= self.max_batch:
            self.kick()

    def put(self, spans) -> None:
        """Queue finished spans (event loop; never blocks)."""
        q = self.queue
        room = self.max_queue_size - len(q)
        if room < len(spans):
            self.dropped += len(spans) - max(room, 0)
            spans = spans[:max(room, 0)]
        q.extend(spans)
        if len(q) >= self.max_batch:
            self.kick()

    def _run(self) -> None:
        # the standing thread (no loop)
        while not self._closed:
            self._wake.wait(self.delay)
            self._wake.clear()
            if self._closed:
                break
            self._export_all()

    def _export_all(self) -> None:
        with self._lock:
            q = self.queue
            while q:
                batch = []
                pop = q.popleft
                try:
                    while q:
                        item = q[0]  # only this thread pops: the head stays put
                        n = item[2] if type(item) is tuple else 1
                        if batch and len(batch) + n > self.max_batch:
                            break
                        pop()
                        if type(item) is tuple:  # put_deferred: build the spans now
                            try:
                                batch.extend(item[0](*item[1]))
                            except Exception:  # noqa: BLE001 - one bad record, not the batch
                                log.exception("building spans failed")
                                self.failed += item[2]
                        else:
                            batch.append(item)
                except IndexError:  # pragma: no cover - only this thread pops
                    pass
                if not batch:
                    continue
                try:
                    result = self.exporter.export(batch)
                except Exception:  # noqa: BLE001 - a broken collector must not kill us
                    log.exception("span export failed")
                    result = SpanExportResult.FAILURE
                if result == SpanExportResult.SUCCESS:
                    self.exported += len(batch)
                else:
                    self.failed += len(batch)

    def flush(self, timeout: float | None = None) -> bool:
        """Export everything queued now (blocking; call from a thread, not the loop).
        True when the queue is empty afterwards."""
        deadline = time.monotonic() + (timeout if timeout is not None else self.export_timeout)
        while self.queue and time.monotonic() < deadline:
            self._export_all()
        return not self.queue

    def close(self, timeout: float = 5.0) -> None:
        """Flush, stop the thread, shut the exporter down (blocking)."""
        if self._closed:
            return
        self.flush(timeout)
        self._closed = True
        timer = self._timer
        if timer is not None:
            # cancelled on the loop's thread (close may run in another one); _tick also
            # checks _closed, for a timer already due
            try:
                self._loop.call_soon_threadsafe(timer.cancel)
            except RuntimeError:  # the loop is closed already: nothing will run it
                pass
        if self._wake is not None:
            self._wake.set()
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(timeout)
        try:
            self.exporter.shutdown()
        except Exception:  # noqa: BLE001
            log.exception("span exporter shutdown failed")
