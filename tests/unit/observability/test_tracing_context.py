"""Propagation headers (W3C trace-context, B3) and the head sampler."""

from __future__ import annotations

import pytest

from dispa.observability.tracing_context import (
    Sampler, TraceContext, extract, format_traceparent, inject, parse_b3, parse_traceparent,
)
from dispa.plugins.api import Headers

TP = b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def test_traceparent_is_parsed_into_ints_and_the_sampled_flag():
    p = parse_traceparent(TP)
    assert p.trace_id == 0x0af7651916cd43dd8448eb211c80319c
    assert p.span_id == 0xb7ad6b7169203331
    assert p.sampled is True
    assert parse_traceparent(TP[:-2] + b"00").sampled is False


@pytest.mark.parametrize("bad", [
    b"", b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331",          # no flags
    b"00-00000000000000000000000000000000-b7ad6b7169203331-01",            # zero trace id
    b"00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",            # zero span id
    b"ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",            # forbidden version
    b"00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01",            # upper case
    b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-extra",      # v00 with more
    b"00-0af7651916cd43dd8448eb211c80319g-b7ad6b7169203331-01",            # not hex
])
def test_an_invalid_traceparent_is_ignored(bad):
    assert parse_traceparent(bad) is None


def test_a_future_version_is_read_as_00():
    p = parse_traceparent(b"01" + TP[2:] + b"-what-comes-next")
    assert p is not None and p.span_id == 0xb7ad6b7169203331


def test_format_round_trips():
    assert format_traceparent(0x0af7651916cd43dd8448eb211c80319c, 0xb7ad6b7169203331,
                              True) == TP


def test_extract_prefers_w3c_and_reads_b3_only_when_asked():
    hs = [(b"Host", b"x"), (b"b3", b"80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1"),
          (b"TraceParent", TP)]
    assert extract(hs).fmt == "tracecontext"
    assert extract(hs[:2]) is None  # b3 not configured
    p = extract(hs[:2], b3=True)
    assert p.fmt == "b3" and p.span_id == 0xe457b5a2e4d86bd1 and p.sampled is True


def test_b3_single_and_multi_forms():
    assert parse_b3(b"a3ce929d0e0e4736-00f067aa0ba902b7-0").trace_id == 0xa3ce929d0e0e4736
    assert parse_b3(b"a3ce929d0e0e4736-00f067aa0ba902b7").sampled is None
    assert parse_b3(b"1") is None  # a lone sampling decision carries no parent
    hs = [(b"X-B3-TraceId", b"463ac35c9f6413ad48485a3953bb6124"),
          (b"X-B3-SpanId", b"a2fb4a1d1a96d312"), (b"X-B3-Flags", b"1")]
    p = extract(hs, w3c=False, b3=True)
    assert p.fmt == "b3multi" and p.sampled is True  # debug means sampled


def test_inject_names_the_client_span_as_parent_and_keeps_tracestate():
    h = Headers([(b"traceparent", TP), (b"tracestate", b"a=b"), (b"X-B3-Flags", b"1")])
    tc = TraceContext(0x0af7651916cd43dd8448eb211c80319c, 0xb7ad6b7169203331, 0x1111, 0x2222,
                      True)
    inject(h, tc, w3c=True, b3=True, b3multi=True)
    assert h.get("traceparent") == "00-0af7651916cd43dd8448eb211c80319c-0000000000002222-01"
    assert h.get("tracestate") == "a=b"
    assert h.get("b3") == "0af7651916cd43dd8448eb211c80319c-0000000000002222-1-0000000000001111"
    assert h.get("x-b3-parentspanid") == "0000000000001111"
    assert "x-b3-flags" not in h
    assert len(h.get_all("traceparent")) == 1


def test_inject_replaces_in_place_like_headers_set():
    raw = [(b"Host", b"h"), (b"TraceParent", TP), (b"Accept", b"*/*"), (b"traceparent", TP)]
    tc = TraceContext(0x0af7651916cd43dd8448eb211c80319c, 0xb7ad6b7169203331, 0x1111, 0x2222,
                      False)
    ours, reference = Headers._shared(raw), Headers._shared(raw)
    inject(ours, tc, w3c=True, b3=False, b3multi=False)
    reference.set(b"traceparent", b"00-0af7651916cd43dd8448eb211c80319c-0000000000002222-00")
    assert ours.raw == reference.raw and ours.changed
    assert raw[1] == (b"TraceParent", TP)  # the parser's list is never modified
    fresh = Headers([(b"Host", b"h")])
    inject(fresh, tc, w3c=True, b3=True, b3multi=False)
    assert [k for k, _ in fresh.raw] == [b"Host", b"traceparent", b"b3"]


def test_ratio_decides_on_the_low_64_bits_of_the_trace_id():
    s = Sampler(0.25)
    assert s.root(0) and s.root((1 << 62) - 1)
    assert not s.root(1 << 62) and not s.root((1 << 64) - 1)
    # deterministic: the same trace id always gets the same answer
    assert [Sampler(0.25).root(x) for x in (5, 1 << 63)] == [True, False]
    assert Sampler(1.0).root((1 << 64) - 1) and not Sampler(0.0).root(0)


def test_parent_based_follows_the_parent_flag():
    s = Sampler(0.0)
    sampled = parse_traceparent(TP)
    unsampled = parse_traceparent(TP[:-2] + b"00")
    assert s.child(sampled) is True
    assert Sampler(1.0).child(unsampled) is False
    # not parent-based: the ratio decides on the parent's trace id
    assert Sampler(0.0, parent_based=False).child(sampled) is False


def test_rate_limit_caps_new_decisions_per_second():
    now = [100.0]
    s = Sampler(1.0, max_per_second=5, clock=lambda: now[0])
    kept = sum(s.root(1) for _ in range(50))
    assert kept == 5  # the burst is one second's worth
    now[0] += 0.4
    assert sum(s.root(1) for _ in range(50)) == 2  # refilled at 5/s
    unlimited = Sampler(1.0)
    assert all(unlimited.root(1) for _ in range(1000))
