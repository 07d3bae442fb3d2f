"""tracing_otlp.encode_spans writes the message the SDK's OTLP encoder builds (decoded and
compared with opentelemetry-proto's classes), for every kind of value Dispa's spans hold."""

from __future__ import annotations

import pytest

from dispa.observability import tracing_export as tx
from dispa.observability.tracing_otlp import encode_spans
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans as sdk_encode
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.trace import SpanKind, Status, StatusCode

TRACE = 0x0af7651916cd43dd8448eb211c80319c


def decoded(data: bytes) -> ExportTraceServiceRequest:
    msg = ExportTraceServiceRequest()
    msg.ParseFromString(data)
    return msg


def spans():
    r1 = tx.make_resource({"service_name": "svc", "resource_attributes": {"env": "t"}}, 1)
    r2 = Resource.create({"service.name": "other", "n": 7, "ok": True, "f": 0.5})
    attrs = {"http.request.method": "GET", "url.path": "/p?é", "server.port": 8080,
             "http.response.status_code": 503, "neg": -3, "big": (1 << 62), "flag": False,
             "ratio": 0.25, "list": ("a", "b"), "ints": (1, 2), "empty": ""}
    return [
        tx.span("GET", TRACE, 0x1111, 0xb7ad6b7169203331, True, tx.SERVER, 1_700_000_000_000,
                1_700_000_000_500, dict(attrs), tx.ERROR_STATUS, r1),
        tx.span("GET", TRACE, 0x2222, 0x1111, False, tx.CLIENT, 1_700_000_000_100,
                1_700_000_000_400, {"error.type": "connect_error"}, tx.UNSET_STATUS, r1),
        tx.span("HTTP", TRACE + 1, 0x3333, 0, False, tx.SERVER, 5, 6, {}, tx.UNSET_STATUS, r2),
        tx.span("x" * 300, TRACE, 0x4444, 0, False, SpanKind.INTERNAL, 0, 1,
                {"k" * 200: "v" * 5000}, Status(StatusCode.ERROR, "broke"), r1),
    ]


def test_the_same_message_as_the_sdk_encoder():
    ss = spans()
    ours = decoded(encode_spans(ss))
    assert ours == sdk_encode(ss)
    assert len(ours.resource_spans) == 2
    span = ours.resource_spans[0].scope_spans[0].spans[0]
    assert span.parent_span_id == bytes.fromhex("b7ad6b7169203331")
    assert span.status.code == 2


@pytest.mark.parametrize("n", [1, 3])
def test_each_span_alone_too(n):
    ss = spans()[:n]
    assert decoded(encode_spans(ss)) == sdk_encode(ss)


def test_an_empty_batch():
    assert encode_spans([]) == b""
    assert decoded(b"") == sdk_encode([])
