"""A real trace receiver for tests, on 127.0.0.1: OTLP/HTTP, OTLP/gRPC and Zipkin v2 JSON.

What an OpenTelemetry Collector or Jaeger would accept, decoded with the reference
classes (opentelemetry-proto's generated protobuf messages and gRPC service, grpcio):

  POST http://127.0.0.1:<http_port>/v1/traces     ExportTraceServiceRequest (protobuf,
                                                    optionally gzip/deflate)
  gRPC 127.0.0.1:<grpc_port> TraceService/Export    the same message over gRPC
  POST http://127.0.0.1:<http_port>/api/v2/spans   Zipkin v2 JSON (a list of spans)

Every span becomes a :class:`Span` (ids as lowercase hex, ``kind`` and ``status`` as
upper-case words, ``attributes`` as a plain dict) in ``receiver.spans``, tagged with the
protocol it came by. ``wait_spans`` polls with a deadline (no sleeps in tests).

Run standalone for the perf harness: ``python -m tests.support.otlp_receiver --port N``
prints ``ready http=<port> grpc=<port>`` and counts spans until killed.
"""

from __future__ import annotations

import gzip
import json
import threading
import time
import zlib
from concurrent import futures
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.trace.v1 import trace_pb2

__all__ = ["Span", "TraceReceiver"]


@dataclass
class Span:
    """One received span, protocol-neutral."""

    protocol: str            # "otlp_http" | "otlp_grpc" | "zipkin"
    trace_id: str            # 32 hex digits
    span_id: str             # 16 hex digits
    parent_span_id: str      # "" for a root span
    name: str
    kind: str                # "SERVER" | "CLIENT" | ...
    start_ns: int
    end_ns: int
    status: str              # "ERROR" | "OK" | "UNSET"
    attributes: dict = field(default_factory=dict)
    service: str = ""
    headers: dict = field(default_factory=dict)  # of the export request that carried it


def _any_value(v):
    which = v.WhichOneof("value")
    if which == "array_value":
        return [_any_value(x) for x in v.array_value.values]
    if which == "kvlist_value":
        return {kv.key: _any_value(kv.value) for kv in v.kvlist_value.values}
    return getattr(v, which) if which else None


def spans_from_otlp(req: trace_service_pb2.ExportTraceServiceRequest, protocol: str,
                    headers: dict) -> list[Span]:
    out = []
    for rs in req.resource_spans:
        res = {kv.key: _any_value(kv.value) for kv in rs.resource.attributes}
        for ss in rs.scope_spans:
            for s in ss.spans:
                out.append(Span(
                    protocol=protocol, trace_id=s.trace_id.hex(), span_id=s.span_id.hex(),
                    parent_span_id=s.parent_span_id.hex(), name=s.name,
                    kind=trace_pb2.Span.SpanKind.Name(s.kind).removeprefix("SPAN_KIND_"),
                    start_ns=s.start_time_unix_nano, end_ns=s.end_time_unix_nano,
                    status=trace_pb2.Status.StatusCode.Name(s.status.code).removeprefix(
                        "STATUS_CODE_"),
                    attributes={kv.key: _any_value(kv.value) for kv in s.attributes},
                    service=str(res.get("service.name", "")), headers=headers))
    return out


def spans_from_zipkin(doc: list, headers: dict) -> list[Span]:
    out = []
    for s in doc:
        tags = dict(s.get("tags") or {})
        status = "UNSET"
        if tags.get("otel.status_code") == "ERROR" or "error" in tags:
            status = "ERROR"
        start_ns = int(s.get("timestamp", 0)) * 1000
        out.append(Span(
            protocol="zipkin", trace_id=s["traceId"].rjust(32, "0"), span_id=s["id"],
            parent_span_id=s.get("parentId", ""), name=s.get("name", ""),
            kind=s.get("kind", ""), start_ns=start_ns,
            end_ns=start_ns + int(s.get("duration", 0)) * 1000, status=status,
            attributes=tags, service=(s.get("localEndpoint") or {}).get("serviceName", ""),
            headers=headers))
    return out


class TraceReceiver:
    """Start with ``start()``; ``http_port``/``grpc_port`` are then set."""

    def __init__(self, host: str = "127.0.0.1", http_port: int = 0, grpc_port: int = 0):
        self.host = host
        self.http_port = http_port
        self.grpc_port = grpc_port
        self.spans: list[Span] = []
        self.requests = {"otlp_http": 0, "otlp_grpc": 0, "zipkin": 0}
        self.count_only = False  # perf mode: count spans (OTLP/HTTP: without decoding
        # them into Span objects, which would load the perf harness's load CPU), keep none
        self.span_count = 0
        self.fail_status: int | None = None  # HTTP: answer every export with this status
        self.refused = 0  # HTTP exports answered with fail_status
        self._cond = threading.Condition()
        self._http: ThreadingHTTPServer | None = None
        self._grpc = None

    # -- lifecycle --------------------------------------------------------------------
    def start(self) -> "TraceReceiver":
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):  # quiet
                pass

            def do_POST(self):  # noqa: N802 - http.server's name
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n)
                enc = (self.headers.get("Content-Encoding") or "").lower()
                if enc == "gzip":
                    body = gzip.decompress(body)
                elif enc == "deflate":
                    body = zlib.decompress(body)
                headers = {k.lower(): v for k, v in self.headers.items()}
                if receiver.fail_status:
                    with receiver._cond:
                        receiver.refused += 1
                    return self._answer(receiver.fail_status, b"", "text/plain")
                if self.path == "/v1/traces":
                    msg = trace_service_pb2.ExportTraceServiceRequest()
                    msg.ParseFromString(body)
                    if receiver.count_only:  # perf mode: count, skip the Span objects
                        receiver._count(sum(len(ss.spans) for rs in msg.resource_spans
                                            for ss in rs.scope_spans), "otlp_http")
                    else:
                        receiver._add(spans_from_otlp(msg, "otlp_http", headers), "otlp_http")
                    out = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
                    return self._answer(200, out, "application/x-protobuf")
                if self.path == "/api/v2/spans":
                    receiver._add(spans_from_zipkin(json.loads(body), headers), "zipkin")
                    return self._answer(202, b"", "application/json")
                self._answer(404, b"not found", "text/plain")

            def _answer(self, status: int, body: bytes, ctype: str):
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self._http = ThreadingHTTPServer((self.host, self.http_port), Handler)
        self._http.daemon_threads = True
        self.http_port = self._http.server_address[1]
        threading.Thread(target=self._http.serve_forever, daemon=True).start()

        class Servicer(trace_service_pb2_grpc.TraceServiceServicer):
            def Export(self, request, context):  # noqa: N802 - the service's name
                headers = {k: v for k, v in context.invocation_metadata()}
                receiver._add(spans_from_otlp(request, "otlp_grpc", headers), "otlp_grpc")
                return trace_service_pb2.ExportTraceServiceResponse()

        self._grpc = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Servicer(), self._grpc)
        self.grpc_port = self._grpc.add_insecure_port(f"{self.host}:{self.grpc_port}")
        self._grpc.start()
        return self

    def stop(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
        if self._grpc is not None:
            self._grpc.stop(0)

    @property
    def otlp_http_url(self) -> str:
        return f"http://{self.host}:{self.http_port}/v1/traces"

    @property
    def otlp_grpc_url(self) -> str:
        return f"http://{self.host}:{self.grpc_port}"

    @property
    def zipkin_url(self) -> str:
        return f"http://{self.host}:{self.http_port}/api/v2/spans"

    # -- data ---------------------------------------------------------------------------
    def _add(self, spans: list[Span], protocol: str) -> None:
        with self._cond:
            self.requests[protocol] += 1
            self.span_count += len(spans)
            if not self.count_only:
                self.spans.extend(spans)
            self._cond.notify_all()

    def _count(self, n: int, protocol: str) -> None:
        with self._cond:
            self.requests[protocol] += 1
            self.span_count += n
            self._cond.notify_all()

    def wait_spans(self, pred=lambda spans: bool(spans), timeout: float = 20.0,
                   what: str = "spans") -> list[Span]:
        """Block until ``pred(spans)`` is true (a copy of the received spans); on timeout
        raise AssertionError listing what arrived."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                snapshot = list(self.spans)
                if pred(snapshot):
                    return snapshot
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"timed out waiting for {what}; received "
                                         f"{[(s.kind, s.name, s.trace_id) for s in snapshot]}")
                self._cond.wait(min(left, 0.5))

    def trace(self, trace_id: str) -> list[Span]:
        with self._cond:
            return [s for s in self.spans if s.trace_id == trace_id]


def main(argv=None) -> int:
    import argparse
    import signal
    ap = argparse.ArgumentParser(description="OTLP/Zipkin receiver counting spans")
    ap.add_argument("--port", type=int, default=0, help="HTTP port (OTLP/HTTP and Zipkin)")
    ap.add_argument("--grpc-port", type=int, default=0)
    a = ap.parse_args(argv)
    r = TraceReceiver(http_port=a.port, grpc_port=a.grpc_port)
    r.count_only = True
    r.start()
    print(f"ready http={r.http_port} grpc={r.grpc_port}", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    print(f"spans={r.span_count} requests={r.requests}", flush=True)
    r.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
