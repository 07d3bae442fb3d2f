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
    assert ours == sdk_encode([s.readable() for s in ss])
    # SDK ReadableSpans (what an extension could hand the exporter) encode the same
    assert encode_spans([s.readable() for s in ss]) == encode_spans(ss)
    assert len(ours.resource_spans) == 2
    span = ours.resource_spans[0].scope_spans[0].spans[0]
    assert span.parent_span_id == bytes.fromhex("b7ad6b7169203331")
    assert span.status.code == 2


@pytest.mark.parametrize("n", [1, 3])
def test_each_span_alone_too(n):
    ss = spans()[:n]
    assert decoded(encode_spans(ss)) == sdk_encode([s.readable() for s in ss])


def test_an_empty_batch():
    assert encode_spans([]) == b""
    assert decoded(b"") == sdk_encode([])


# -- the compiled twin of encode_span (_native/otlp.pyx) gives the pure twin's bytes -------

import importlib  # noqa: E402

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from dispa import _native  # noqa: E402
from dispa.observability import tracing_otlp  # noqa: E402

# imported directly (as tests/unit/proxy/test_protocol_twins.py does): the differential
# tests run in the pure-twin run too, where dispa._native does not use it
compiled = importlib.import_module("dispa._hotpath").otlp_encode_span

scalars = st.one_of(
    st.text(max_size=300), st.booleans(), st.integers(min_value=-(1 << 63), max_value=(1 << 64) - 1),
    st.floats(allow_nan=False), st.binary(max_size=200), st.none())
values = st.one_of(scalars, st.lists(st.one_of(st.text(max_size=20), st.integers(0, 1000)),
                                     max_size=4).map(tuple))
ids64 = st.integers(min_value=1, max_value=(1 << 64) - 1)


def test_the_compiled_encoder_is_used_unless_pure_twins_are_asked_for():
    assert tracing_otlp.IMPLEMENTATION == ("pure" if _native.NO_EXTENSIONS else "compiled")


@settings(max_examples=300, deadline=None)
@given(name=st.text(max_size=200), trace_id=st.integers(1, (1 << 128) - 1), span_id=ids64,
       parent_id=st.one_of(st.just(0), ids64), remote=st.booleans(), kind=st.integers(1, 5),
       start=st.integers(0, (1 << 64) - 1), end=st.integers(0, (1 << 64) - 1),
       attrs=st.dictionaries(st.text(max_size=40), values, max_size=12),
       code=st.integers(0, 2), message=st.one_of(st.none(), st.text(max_size=50)))
def test_compiled_and_pure_span_bytes_are_identical(name, trace_id, span_id, parent_id, remote,
                                                    kind, start, end, attrs, code, message):
    args = (name, trace_id, span_id, parent_id, remote, kind, start, end, attrs, code, message)
    assert compiled(*args) == tracing_otlp.encode_span(*args)


def test_both_twins_refuse_the_same_bad_input():
    base = ["GET", TRACE, 1, 0, False, 2, 0, 1, {}, 0, None]
    for i, bad in ((1, 1 << 128), (2, 1 << 64), (8, {1: "x"}), (8, {"k": object()}),
                   (0, "\ud800")):
        args = list(base)
        args[i] = bad
        with pytest.raises((OverflowError, TypeError, UnicodeEncodeError)) as pure:
            tracing_otlp.encode_span(*args)
        with pytest.raises((OverflowError, TypeError, UnicodeEncodeError)) as comp:
            compiled(*args)
        assert type(pure.value) is type(comp.value), (i, bad)
