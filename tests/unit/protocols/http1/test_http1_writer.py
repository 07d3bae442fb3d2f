"""The serializer: validation (header injection) and the proxy head rules (RFC 9110 §7.6.1)."""

from __future__ import annotations

import pytest


def _head(mod, wire, response=False, method=None):
    p = mod.ResponseParser() if response else mod.RequestParser()
    if method:
        p.expect(method)
    p.feed(wire)
    assert p.next_event() == mod.HEAD
    return p.head


def test_write_request_head(http1_impl):
    out = http1_impl.write_request_head(b"GET", b"/x", [(b"Host", b"a"), (b"X-Y", b"1 2")])
    assert out == b"GET /x HTTP/1.1\r\nHost: a\r\nX-Y: 1 2\r\n\r\n"


def test_write_response_head(http1_impl):
    out = http1_impl.write_response_head(404, b"Not Found", [(b"Content-Length", b"0")])
    assert out == b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"
    assert http1_impl.write_response_head(200, b"", []) == b"HTTP/1.1 200 \r\n\r\n"


@pytest.mark.parametrize("bad", [b"a\rb", b"a\nb", b"a\x00b", b"a\r\nX-Injected: 1"])
def test_writer_rejects_cr_lf_nul(http1_impl, bad):
    with pytest.raises(ValueError):
        http1_impl.write_request_head(b"GET", b"/", [(b"X", bad)])
    with pytest.raises(ValueError):
        http1_impl.write_request_head(b"GET", b"/" + bad, [])
    with pytest.raises(ValueError):
        http1_impl.write_request_head(b"G" + bad, b"/", [])
    with pytest.raises(ValueError):
        http1_impl.write_response_head(200, bad, [])
    with pytest.raises(ValueError):
        http1_impl.write_response_head(200, b"OK", [(b"X" + bad, b"v")])


@pytest.mark.parametrize("name", [b"", b"X Y", b"X:Y", b"X(Y)", b"\xff"])
def test_writer_rejects_invalid_names(http1_impl, name):
    with pytest.raises(ValueError):
        http1_impl.write_response_head(200, b"OK", [(name, b"v")])


@pytest.mark.parametrize("status", [99, 1000, -1, "200"])
def test_writer_rejects_invalid_status(http1_impl, status):
    with pytest.raises(ValueError):
        http1_impl.write_response_head(status, b"OK", [])


def test_encode_chunk(http1_impl):
    assert http1_impl.encode_chunk(b"hello") == b"5\r\nhello\r\n"
    assert http1_impl.encode_chunk(b"x" * 4096) == b"1000\r\n" + b"x" * 4096 + b"\r\n"
    assert http1_impl.encode_chunk(bytearray(b"ab")) == b"2\r\nab\r\n"
    with pytest.raises(ValueError):
        http1_impl.encode_chunk(b"")
    assert http1_impl.LAST_CHUNK == b"0\r\n\r\n"


def test_proxy_request_head_drops_hop_by_hop(http1_impl):
    head = _head(http1_impl, b"POST /in HTTP/1.1\r\nHost: ex.org\r\nConnection: keep-alive, X-Secret\r\n"
                             b"Keep-Alive: 5\r\nProxy-Connection: x\r\nTE: trailers\r\nTrailer: X\r\n"
                             b"Transfer-Encoding: chunked\r\nX-Secret: s\r\nx-secret: t\r\n"
                             b"Upgrade: websocket\r\nAccept: */*\r\nCookie: c\r\nX-Drop: d\r\n\r\n")
    out = http1_impl.proxy_request_head(head, b"/out", frozenset({b"x-drop"}),
                                        [(b"X-Forwarded-For", b"1.2.3.4")])
    assert out == (b"POST /out HTTP/1.1\r\nHost: ex.org\r\nAccept: */*\r\nCookie: c\r\n"
                   b"X-Forwarded-For: 1.2.3.4\r\n\r\n")


def test_proxy_request_head_drops_content_length(http1_impl):
    head = _head(http1_impl, b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\n")
    assert http1_impl.proxy_request_head(head, b"/", frozenset(), ()) == b"POST / HTTP/1.1\r\nHost: a\r\n\r\n"


def test_proxy_request_head_keeps_upgrade_for_upgrades(http1_impl):
    head = _head(http1_impl, b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\n"
                             b"Upgrade: websocket\r\nSec-WebSocket-Key: k\r\n\r\n")
    assert head.upgrade
    out = http1_impl.proxy_request_head(head, b"/ws", frozenset(), [(b"Connection", b"upgrade")])
    assert out == (b"GET /ws HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nSec-WebSocket-Key: k\r\n"
                   b"Connection: upgrade\r\n\r\n")


def test_proxy_request_head_validates_extra_and_target(http1_impl):
    head = _head(http1_impl, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    with pytest.raises(ValueError):
        http1_impl.proxy_request_head(head, b"/", frozenset(), [(b"X", b"a\r\nb")])
    with pytest.raises(ValueError):
        http1_impl.proxy_request_head(head, b"/ x", frozenset(), [])
    with pytest.raises(ValueError):
        http1_impl.proxy_request_head(head, b"/", frozenset(), [(b"X Y", b"v")])


def test_proxy_request_head_many_headers_and_tokens(http1_impl):
    names = [b"X-H%d" % i for i in range(200)]
    conn = b", ".join(names[::2])
    wire = (b"GET / HTTP/1.1\r\nHost: a\r\nConnection: " + conn + b"\r\n"
            + b"".join(n + b": v\r\n" for n in names) + b"\r\n")
    p = http1_impl.RequestParser(max_header_count=300)
    p.feed(wire)
    assert p.next_event() == http1_impl.HEAD
    drop = frozenset(n.lower() for n in names[1:80:2])
    out = http1_impl.proxy_request_head(p.head, b"/", drop, [])
    kept = [n for n in names[1::2] if n.lower() not in drop]
    assert out == b"GET / HTTP/1.1\r\nHost: a\r\n" + b"".join(n + b": v\r\n" for n in kept) + b"\r\n"


def test_proxy_response_head(http1_impl):
    head = _head(http1_impl, b"HTTP/1.0 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n"
                             b"Server: s\r\nSet-Cookie: a\r\n\r\n", response=True)
    assert http1_impl.proxy_response_head(head, frozenset({b"server"}), [(b"Via", b"1.1 dispa")]) == (
        b"HTTP/1.1 200 OK\r\nSet-Cookie: a\r\nVia: 1.1 dispa\r\n\r\n")


def test_proxy_response_head_keeps_upgrade_for_101(http1_impl):
    head = _head(http1_impl, b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                             b"Connection: Upgrade\r\n\r\n", response=True)
    assert http1_impl.proxy_response_head(head, frozenset(), [(b"Connection", b"upgrade")]) == (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n")


def test_writers_agree(http1_both):
    hot, pure = http1_both
    wire = (b"GET /a HTTP/1.1\r\nHost: a\r\nConnection: close, Foo\r\nFoo: 1\r\nBar: 2\r\n"
            b"TE: trailers\r\n\r\n")
    outs = {m.proxy_request_head(_head(m, wire), b"/b", frozenset({b"bar"}), [(b"X", b"y")])
            for m in (hot, pure)}
    assert len(outs) == 1
