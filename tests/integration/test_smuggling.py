"""Request smuggling through Dispa: the upstream (an h11-parsed recording origin) must see
exactly the requests it should, and nothing of a rejected request."""

from __future__ import annotations

import pytest

from tests.integration.test_proxy_http1 import raw_exchange

H = b"Host: example.com\r\n"

REJECTED = {
    "cl-te": b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nG",
    "te-cl": b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n5c\r\nGPOST / HTTP/1.1\r\n\r\n0\r\n\r\n",
    "te-space-before-colon": b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding : chunked\r\n\r\n0\r\n\r\n",
    "te-xchunked": b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: xchunked\r\n\r\n0\r\n\r\n",
    "te-chunked-not-last": b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n",
    "te-duplicate-headers": b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: x\r\n\r\n0\r\n\r\n",
    "te-obs-fold": b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding:\r\n chunked\r\n\r\n0\r\n\r\n",
    "cl-duplicate-different": b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 3\r\nContent-Length: 5\r\n\r\nabcde",
    "cl-comma-list": b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 3, 3\r\n\r\nabc",
    "cl-plus-sign": b"POST / HTTP/1.1\r\n" + H + b"Content-Length: +3\r\n\r\nabc",
    "chunk-size-overflow": b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\nffffffffffffffffff1\r\nx\r\n0\r\n\r\n",
    "chunk-size-hex-prefix": b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n0x3\r\nabc\r\n0\r\n\r\n",
    "chunk-missing-crlf": b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n3\r\nabcX\r\n0\r\n\r\n",
    "chunk-bare-lf": b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n3\nabc\r\n0\r\n\r\n",
    "header-bare-cr": b"GET / HTTP/1.1\r\n" + H + b"X-A: a\rX-B: b\r\n\r\n",
    "header-nul": b"GET / HTTP/1.1\r\n" + H + b"X-A: a\x00b\r\n\r\n",
    "bare-lf-line-ends": b"GET / HTTP/1.1\n" + H + b"\n",
    "space-in-header-name": b"GET / HTTP/1.1\r\n" + H + b"X A: b\r\n\r\n",
    "duplicate-host": b"GET / HTTP/1.1\r\n" + H + H + b"\r\n",
    "missing-host": b"GET / HTTP/1.1\r\n\r\n",
}


@pytest.fixture
def proxy(dispa, origin):
    return dispa(targets=[("a", origin.url)])


@pytest.mark.parametrize("case", sorted(REJECTED))
def test_smuggling_attempt_is_rejected_and_nothing_reaches_the_upstream(proxy, origin, case):
    out = raw_exchange(proxy.port, REJECTED[case])
    assert out.startswith(b"HTTP/1.1 400") or out.startswith(b"HTTP/1.1 501"), out[:200]
    assert b"connection: close" in out.lower()
    assert origin.requests == []
    assert origin.connections == 0


def test_a_request_hidden_in_a_body_stays_a_body(proxy, origin):
    inner = b"GET /admin HTTP/1.1\r\nHost: example.com\r\n\r\n"
    req = (b"POST /echo HTTP/1.1\r\n" + H + b"Content-Length: " + str(len(inner)).encode()
           + b"\r\nConnection: close\r\n\r\n" + inner)
    out = raw_exchange(proxy.port, req)
    assert out.startswith(b"HTTP/1.1 200")
    assert [(r[0], r[1], r[3]) for r in origin.requests] == [(b"POST", b"/echo", inner)]


def test_a_valid_request_followed_by_garbage_forwards_only_the_valid_one(proxy, origin):
    req = b"GET /one HTTP/1.1\r\n" + H + b"\r\nGET /two HTTP/1.1\r\nHost: e\r\nX: \x01\r\n\r\n"
    out = raw_exchange(proxy.port, req)
    assert out.startswith(b"HTTP/1.1 200")
    assert b"HTTP/1.1 400" in out
    assert origin.targets() == [b"/one"]


def test_chunked_request_bodies_are_rechunked_cleanly(proxy, origin):
    req = (b"POST /echo HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
           b"3;name=val\r\nabc\r\n2\r\nde\r\n0\r\nX-Trailer: t\r\n\r\n")
    out = raw_exchange(proxy.port, req)
    assert out.startswith(b"HTTP/1.1 200") and out.endswith(b"abcde")
    assert origin.requests[0][3] == b"abcde"
    # the chunk extension did not travel upstream
    assert b"name=val" not in bytes(origin.raw[0])


def test_oversized_heads_get_431_and_long_request_lines_414(proxy, origin):
    out = raw_exchange(proxy.port, b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n" + H + b"\r\n")
    assert out.startswith(b"HTTP/1.1 414")
    many = b"".join(b"X-%d: v\r\n" % i for i in range(150))
    out = raw_exchange(proxy.port, b"GET / HTTP/1.1\r\n" + H + many + b"\r\n")
    assert out.startswith(b"HTTP/1.1 431")
    assert origin.requests == []


def test_unknown_transfer_coding_gets_501(proxy, origin):
    out = raw_exchange(proxy.port, b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n")
    # gzip then chunked is a valid coding list, but re-chunking would silently drop the gzip
    # coding, so a proxy that does not decode it must refuse it (RFC 9112 §6.1: 501)
    assert out.startswith(b"HTTP/1.1 501")
    out = raw_exchange(proxy.port, b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: foo, chunked\r\n\r\n0\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 501")
