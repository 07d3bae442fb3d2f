"""The OTLP/HTTP exporter (tracing_export.OtlpHttpExporter: protobuf over http.client)
against the real receiver in tests/support/otlp_receiver.py, and the master's preload."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from dispa.observability import tracing_export as tx
from opentelemetry.sdk.trace.export import SpanExportResult
from tests.support.dispa_proc import ROOT, free_port
from tests.support.otlp_receiver import TraceReceiver

TRACE = 0x0af7651916cd43dd8448eb211c80319c


@pytest.fixture
def receiver():
    r = TraceReceiver().start()
    yield r
    r.stop()


def spans(n: int = 2):
    resource = tx.make_resource({"service_name": "svc"}, 1)
    return [tx.span("GET", TRACE, 0x1000 + i, 0, False, tx.SERVER, 1_000, 2_000,
                    {"url.path": f"/p{i}"}, tx.UNSET_STATUS, resource) for i in range(n)]


@pytest.mark.parametrize("gzip", [False, True])
def test_spans_arrive_with_the_configured_headers(receiver, gzip):
    exp = tx.OtlpHttpExporter(receiver.otlp_http_url, {"x-api-key": "k1"}, 5.0, gzip)
    try:
        assert exp.export(spans(2)) == SpanExportResult.SUCCESS
        assert exp.export(spans(1)) == SpanExportResult.SUCCESS  # the kept-alive connection
    finally:
        exp.shutdown()
    got = receiver.wait_spans(lambda s: len(s) == 3)
    assert {s.attributes["url.path"] for s in got} == {"/p0", "/p1"}
    assert {s.trace_id for s in got} == {f"{TRACE:032x}"} and got[0].service == "svc"
    assert got[0].headers["x-api-key"] == "k1"
    assert got[0].headers["content-type"] == "application/x-protobuf"
    assert got[0].headers.get("content-encoding") == ("gzip" if gzip else None)
    assert receiver.requests["otlp_http"] == 2


def test_a_refused_batch_fails_without_retrying(receiver):
    receiver.fail_status = 400
    exp = tx.OtlpHttpExporter(receiver.otlp_http_url, {}, 5.0, False)
    t = time.monotonic()
    assert exp.export(spans()) == SpanExportResult.FAILURE
    assert time.monotonic() - t < 1.0 and receiver.refused == 1


def test_unavailable_is_retried_within_the_timeout(receiver):
    receiver.fail_status = 503
    exp = tx.OtlpHttpExporter(receiver.otlp_http_url, {}, 1.5, False)
    assert exp.export(spans()) == SpanExportResult.FAILURE
    assert receiver.refused == 2  # at once, then after 1 s; the next try (2 s) is too late
    receiver.fail_status = None
    assert exp.export(spans()) == SpanExportResult.SUCCESS


def test_no_collector_fails_and_shutdown_stops_the_retries():
    exp = tx.OtlpHttpExporter(f"http://127.0.0.1:{free_port()}/v1/traces", {}, 30.0, False)
    import threading
    threading.Timer(0.3, exp.shutdown).start()
    t = time.monotonic()
    assert exp.export(spans()) == SpanExportResult.FAILURE
    assert time.monotonic() - t < 5.0
    assert exp.export(spans()) == SpanExportResult.FAILURE  # shut down: not even tried


def test_otlp_http_and_its_preload_import_neither_requests_nor_protobuf_nor_grpc():
    code = (
        "import sys\n"
        "from dispa.observability import tracing_export as tx\n"
        "part = {'exporter': 'otlp_http', 'endpoint': 'http://127.0.0.1:9/v1/traces'}\n"
        "tx.preload(part)\n"
        "tx.make_exporter(part)\n"
        "print(sorted(m for m in ('requests', 'grpc', 'urllib3', 'google.protobuf') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
