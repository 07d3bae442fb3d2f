"""RFC 9112 parsing rules, run on both twins, whole and byte by byte (STYLE C8)."""

from __future__ import annotations

import pytest
from http1_support import first_error, run

from dispa.protocols.http1 import limits
from dispa.protocols.http1.errors import ProtocolError

H = b"Host: a\r\n"

# (id, wire, expected status_hint) — every one must be rejected, identically in both twins.
REJECT = [
    ("te_and_content_length", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
    ("content_length_then_te", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n", 400),
    ("duplicate_content_length_equal", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 3\r\nContent-Length: 3\r\n\r\nabc", 400),
    ("content_length_list", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 3, 3\r\n\r\nabc", 400),
    ("content_length_sign", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: +3\r\n\r\nabc", 400),
    ("content_length_negative", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: -1\r\n\r\n", 400),
    ("content_length_empty", b"POST / HTTP/1.1\r\n" + H + b"Content-Length:\r\n\r\n", 400),
    ("content_length_hex", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 0x10\r\n\r\n", 400),
    ("content_length_overflow", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 99999999999999999999\r\n\r\n", 400),
    # any coding but chunked: re-framing would drop it, so a proxy refuses it (501)
    ("te_final_not_chunked", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: gzip\r\n\r\n", 501),
    ("te_gzip_then_chunked", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: gzip, chunked\r\n\r\n", 501),
    ("te_unknown", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: foo\r\n\r\n", 501),
    ("te_chunked_not_last", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked, gzip\r\n\r\n", 400),
    ("te_chunked_twice", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
    ("te_malformed", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked;x=1\r\n\r\n", 400),
    ("te_empty_element", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: ,chunked\r\n\r\n", 400),
    ("te_in_http10", b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    ("header_name_non_tchar", b"GET / HTTP/1.1\r\n" + H + b"X(y): 1\r\n\r\n", 400),
    ("header_name_empty", b"GET / HTTP/1.1\r\n" + H + b": 1\r\n\r\n", 400),
    ("header_no_colon", b"GET / HTTP/1.1\r\n" + H + b"Xy\r\n\r\n", 400),
    ("header_value_nul", b"GET / HTTP/1.1\r\n" + H + b"X: a\x00b\r\n\r\n", 400),
    ("header_value_ctl", b"GET / HTTP/1.1\r\n" + H + b"X: a\x01b\r\n\r\n", 400),
    ("header_value_del", b"GET / HTTP/1.1\r\n" + H + b"X: a\x7fb\r\n\r\n", 400),
    ("header_value_bare_cr", b"GET / HTTP/1.1\r\n" + H + b"X: a\rb\r\n\r\n", 400),
    ("whitespace_before_colon", b"GET / HTTP/1.1\r\n" + H + b"X : 1\r\n\r\n", 400),
    ("tab_before_colon", b"GET / HTTP/1.1\r\n" + H + b"X\t: 1\r\n\r\n", 400),
    ("obs_fold", b"GET / HTTP/1.1\r\n" + H + b"X: 1\r\n 2\r\n\r\n", 400),
    ("first_header_starts_with_space", b"GET / HTTP/1.1\r\n Host: a\r\n\r\n", 400),
    ("bare_cr_in_request_line", b"GET /\r HTTP/1.1\r\n" + H + b"\r\n", 400),
    ("bare_lf_line_end", b"GET / HTTP/1.1\n" + H + b"\r\n", 400),
    ("bare_lf_blank_line", b"GET / HTTP/1.1\r\n" + H + b"\n", 400),
    ("leading_bare_lf", b"\nGET / HTTP/1.1\r\n" + H + b"\r\n", 400),
    ("duplicate_host", b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
    ("duplicate_host_http10", b"GET / HTTP/1.0\r\nHost: a\r\nhost: a\r\n\r\n", 400),
    ("missing_host_http11", b"GET / HTTP/1.1\r\nX: 1\r\n\r\n", 400),
    ("invalid_method", b"G(T / HTTP/1.1\r\n" + H + b"\r\n", 400),
    ("empty_method", b" / HTTP/1.1\r\n" + H + b"\r\n", 400),
    ("target_with_space", b"GET /a b HTTP/1.1\r\n" + H + b"\r\n", 400),
    ("target_with_ctl", b"GET /a\x01b HTTP/1.1\r\n" + H + b"\r\n", 400),
    ("target_obs_text", b"GET /\xff HTTP/1.1\r\n" + H + b"\r\n", 400),
    ("double_space", b"GET  / HTTP/1.1\r\n" + H + b"\r\n", 400),
    ("http2_version", b"GET / HTTP/2.0\r\n" + H + b"\r\n", 505),
    ("http12_version", b"GET / HTTP/1.2\r\n" + H + b"\r\n", 505),
    ("http09_version", b"GET / HTTP/0.9\r\n\r\n", 400),
    ("http09_simple_request", b"GET /\r\n\r\n", 400),
    ("lowercase_version", b"GET / http/1.1\r\n" + H + b"\r\n", 400),
    ("version_two_digits", b"GET / HTTP/1.10\r\n" + H + b"\r\n", 400),
    ("chunk_size_non_hex", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n", 400),
    ("chunk_size_empty", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n\r\n", 400),
    ("chunk_size_negative", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n-1\r\n", 400),
    ("chunk_size_overflow_digits", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n" + b"1" * 17 + b"\r\n", 400),
    ("chunk_size_overflow_value", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n" + b"8" + b"0" * 15 + b"\r\n", 400),
    ("chunk_size_trailing_space", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n5 \r\nhello\r\n0\r\n\r\n", 400),
    ("chunk_ext_malformed", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n5;=x\r\nhello\r\n0\r\n\r\n", 400),
    ("chunk_ext_unterminated_quote", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n5;a=\"x\r\nhello\r\n0\r\n\r\n", 400),
    ("chunk_ext_too_long", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n5;a=" + b"x" * 2000 + b"\r\nhello\r\n0\r\n\r\n", 400),
    ("chunk_missing_crlf", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhelloX0\r\n\r\n", 400),
    ("chunk_cr_then_junk", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\rX0\r\n\r\n", 400),
    ("chunk_bare_lf_after_data", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\n0\r\n\r\n", 400),
    ("trailer_invalid", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n0\r\nX y: 1\r\n\r\n", 400),
    ("too_many_leading_crlf", b"\r\n" * (limits.MAX_LEADING_EMPTY_LINES + 1) + b"GET / HTTP/1.1\r\n" + H + b"\r\n", 400),
]


@pytest.mark.parametrize("wire,status", [c[1:] for c in REJECT], ids=[c[0] for c in REJECT])
def test_rejects_with_status(http1_impl, wire, status):
    whole = run(http1_impl, wire)
    err = first_error(whole)
    assert err is not None, whole
    assert err[1] == status
    assert run(http1_impl, wire, split=1) == whole


@pytest.mark.parametrize("wire,status", [c[1:] for c in REJECT], ids=[c[0] for c in REJECT])
def test_twins_give_the_same_error(http1_both, wire, status):
    hot, pure = http1_both
    assert run(hot, wire) == run(pure, wire)


def _simple(mod, wire, **kw):
    p = mod.RequestParser(**kw)
    p.feed(wire)
    assert p.next_event() == mod.HEAD
    return p


def test_get_head_fields(http1_impl):
    p = _simple(http1_impl, b"GET /p?q=1 HTTP/1.1\r\nHost: ex.org\r\nX-A:  v 1 \t\r\nx-a: 2\r\n\r\n")
    h = p.head
    assert (h.method, h.target, h.version) == (b"GET", b"/p?q=1", 11)
    assert h.headers == [(b"Host", b"ex.org"), (b"X-A", b"v 1"), (b"x-a", b"2")]
    assert h.get(b"x-a") == b"v 1" and h.get_all(b"x-a") == [b"v 1", b"2"]
    assert h.get(b"nope") is None and h.get_all(b"nope") == []
    assert h.content_length == -1 and not h.chunked and h.keep_alive and not h.upgrade
    assert p.next_event() == http1_impl.END
    assert p.next_event() == http1_impl.NEED_DATA


def test_head_is_read_only(http1_impl):
    h = _simple(http1_impl, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n").head
    with pytest.raises(AttributeError):
        h.method = b"POST"


def test_keep_alive_rules(http1_impl):
    assert not _simple(http1_impl, b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n").head.keep_alive
    assert not _simple(http1_impl, b"GET / HTTP/1.0\r\n\r\n").head.keep_alive
    assert _simple(http1_impl, b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n").head.keep_alive
    assert not _simple(http1_impl, b"GET / HTTP/1.0\r\nConnection: keep-alive, close\r\n\r\n").head.keep_alive


def test_expect_continue(http1_impl):
    h = _simple(http1_impl, b"POST / HTTP/1.1\r\nHost: a\r\nExpect: 100-Continue\r\nContent-Length: 1\r\n\r\n").head
    assert h.expect_continue


def test_interned_common_methods(http1_impl):
    h = _simple(http1_impl, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n").head
    assert h.method == b"GET"


def test_websocket_upgrade_returns_upgrade_after_head(http1_impl):
    wire = (b"GET /chat HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"\r\n\x81\x05hello")
    assert run(http1_impl, wire)[1:] == [("upgrade", b"\x81\x05hello")]


def test_upgrade_header_without_connection_token_is_plain(http1_impl):
    wire = b"GET / HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\n\r\n"
    assert [e[0] for e in run(http1_impl, wire)] == ["head", "end", "eof"]


def test_upgrade_ignored_in_http10(http1_impl):
    # RFC 9110 §7.8: a server MUST ignore Upgrade received in an HTTP/1.0 request
    wire = b"GET / HTTP/1.0\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n"
    assert [e[0] for e in run(http1_impl, wire)] == ["head", "end", "eof"]


def test_upgrade_with_body_reads_body_then_upgrade(http1_impl):
    wire = (b"POST / HTTP/1.1\r\nHost: a\r\nUpgrade: h2c\r\nConnection: upgrade\r\n"
            b"Content-Length: 3\r\n\r\nabcREST")
    ev = run(http1_impl, wire)
    assert ev[1:] == [("data", b"abc"), ("upgrade", b"REST")]


def test_connect_is_upgrade(http1_impl):
    wire = b"CONNECT ex.org:443 HTTP/1.1\r\nHost: ex.org:443\r\n\r\n\x16\x03"
    ev = run(http1_impl, wire)
    assert ev[0][1]["target"] == "ex.org:443" and ev[0][1]["upgrade"]
    assert ev[1] == ("upgrade", b"\x16\x03")


def test_content_length_body_in_large_chunks(http1_impl):
    p = http1_impl.RequestParser()
    p.feed(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\n0123")
    assert p.next_event() == http1_impl.HEAD
    assert p.next_event() == http1_impl.DATA and p.take_data() == b"0123"
    assert p.next_event() == http1_impl.NEED_DATA
    p.feed(b"456789GET")
    assert p.next_event() == http1_impl.DATA and p.take_data() == b"456789"
    assert p.next_event() == http1_impl.END
    assert p.next_event() == http1_impl.NEED_DATA
    assert p.take_rest() == b"GET"


def test_chunked_body_decoded_in_one_data_event(http1_impl):
    p = http1_impl.RequestParser()
    p.feed(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: Chunked\r\n\r\n"
           b"3;ext=1;q=\"a\\\"b\"\r\nabc\r\n2\r\nde\r\n0\r\nX-Sum: 1\r\n\r\n")
    assert p.next_event() == http1_impl.HEAD and p.head.chunked
    assert p.next_event() == http1_impl.DATA and p.take_data() == b"abcde"
    assert p.next_event() == http1_impl.END
    assert p.trailers == [(b"X-Sum", b"1")]


def test_data_before_error_is_delivered_first(http1_impl):
    wire = (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3\r\nabc\r\nzz\r\n")
    ev = run(http1_impl, wire)
    assert ev[1] == ("data", b"abc") and ev[2][0] == "error"


def test_error_is_sticky(http1_impl):
    p = http1_impl.RequestParser()
    p.feed(b"GET / HTTP/9.9\r\nHost: a\r\n\r\n")
    for _ in range(2):
        with pytest.raises(ProtocolError) as ei:
            p.next_event()
        assert ei.value.status_hint == 505
        assert str(ei.value) == ei.value.message


def test_protocol_error_is_one_class(http1_both):
    hot, pure = http1_both
    assert hot.ProtocolError is pure.ProtocolError is ProtocolError


def test_leading_empty_lines_tolerated(http1_impl):
    wire = b"\r\n" * limits.MAX_LEADING_EMPTY_LINES + b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"
    assert [e[0] for e in run(http1_impl, wire)] == ["head", "end", "eof"]


def test_allow_bare_lf(http1_impl):
    wire = b"POST / HTTP/1.1\nHost: a\nTransfer-Encoding: chunked\n\n3\nabc\n0\n\n"
    ev = run(http1_impl, wire, allow_bare_lf=True)
    assert [e[0] for e in ev] == ["head", "data", "end", "eof"]
    assert ev[1] == ("data", b"abc")


def test_eof_mid_message_is_incomplete(http1_impl):
    ev = run(http1_impl, b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nab")
    assert ev[-1] == ("error", 400, "incomplete request")
    ev = run(http1_impl, b"GET / HTTP/1.1\r\nHost")
    assert ev == [("error", 400, "incomplete request")]


def test_eof_at_boundary_is_clean(http1_impl):
    p = http1_impl.RequestParser()
    p.feed(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    assert p.next_event() == http1_impl.HEAD
    assert p.next_event() == http1_impl.END
    p.feed_eof()
    assert p.next_event() == http1_impl.NEED_DATA and p.eof
    with pytest.raises(RuntimeError):
        p.feed(b"x")


def test_feed_accepts_buffers(http1_impl):
    p = http1_impl.RequestParser()
    p.feed(bytearray(b"GET / HTTP/1.1\r\n"))
    p.feed(memoryview(b"Host: a\r\n\r\n"))
    assert p.next_event() == http1_impl.HEAD


def test_reset(http1_impl):
    p = http1_impl.RequestParser()
    p.feed(b"GET / HTTP/9.9\r\n\r\n")
    with pytest.raises(ProtocolError):
        p.next_event()
    p.reset()
    p.feed(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    assert p.next_event() == http1_impl.HEAD


# -- limits ------------------------------------------------------------------------------


def test_request_line_too_long_is_414(http1_impl):
    wire = b"GET /" + b"a" * 100 + b" HTTP/1.1\r\nHost: a\r\n\r\n"
    for split in (None, 1):
        assert first_error(run(http1_impl, wire, split=split, max_line_bytes=64))[1] == 414
    # unterminated: detected as soon as the window is full, without waiting for the LF
    p = http1_impl.RequestParser(max_line_bytes=64)
    p.feed(b"GET /" + b"a" * 100)
    with pytest.raises(ProtocolError) as ei:
        p.next_event()
    assert ei.value.status_hint == 414


def test_line_limit_counts_crlf(http1_impl):
    line = b"GET /" + b"a" * 10 + b" HTTP/1.1"      # 24 bytes + CRLF = 26
    ok = run(http1_impl, line + b"\r\nHost: a\r\n\r\n", max_line_bytes=26)
    assert ok[0][0] == "head"
    bad = run(http1_impl, line + b"\r\nHost: a\r\n\r\n", max_line_bytes=25)
    assert bad[0][:2] == ("error", 414)


def test_header_line_too_long_is_431(http1_impl):
    wire = b"GET / HTTP/1.1\r\nHost: a\r\nX: " + b"v" * 100 + b"\r\n\r\n"
    assert first_error(run(http1_impl, wire, max_line_bytes=64))[1] == 431


def test_head_too_large_is_431(http1_impl):
    wire = b"GET / HTTP/1.1\r\nHost: a\r\n" + b"X-Y: zzzzzzzzzz\r\n" * 20 + b"\r\n"
    for split in (None, 1, 7):
        assert first_error(run(http1_impl, wire, split=split, max_head_bytes=200))[1] == 431
    assert run(http1_impl, wire, max_head_bytes=len(wire))[0][0] == "head"
    assert first_error(run(http1_impl, wire, max_head_bytes=len(wire) - 1))[1] == 431


def test_too_many_headers_is_431(http1_impl):
    wire = b"GET / HTTP/1.1\r\nHost: a\r\n" + b"X: 1\r\n" * 10 + b"\r\n"
    assert run(http1_impl, wire, max_header_count=11)[0][0] == "head"
    assert first_error(run(http1_impl, wire, max_header_count=10))[1:] == (431, "too many headers")


def test_compiled_defaults_match_limits_module(http1_both):
    import inspect
    hot, pure = http1_both
    for mod in (hot, pure):
        p = mod.RequestParser()
        wire = b"GET / HTTP/1.1\r\nHost: a\r\nX: " + b"v" * (limits.MAX_LINE_BYTES - 5) + b"\r\n\r\n"
        p.feed(wire)
        assert p.next_event() == mod.HEAD
        p = mod.RequestParser()
        p.feed(b"GET / HTTP/1.1\r\nHost: a\r\nX: " + b"v" * (limits.MAX_LINE_BYTES - 4) + b"\r\n\r\n")
        with pytest.raises(ProtocolError):
            p.next_event()
    sig = inspect.signature(pure.RequestParser.__init__).parameters
    assert sig["max_head_bytes"].default == limits.MAX_HEAD_BYTES


# -- responses -----------------------------------------------------------------------------


def test_response_content_length(http1_impl):
    ev = run(http1_impl, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi", response=True)
    assert ev[0][1]["status"] == 200 and ev[0][1]["reason"] == "OK"
    assert ev[1:] == [("data", b"hi"), ("end", None), ("eof",)]


def test_response_close_delimited(http1_impl):
    ev = run(http1_impl, b"HTTP/1.1 200 OK\r\n\r\nbody bytes", response=True)
    assert not ev[0][1]["keep_alive"]
    assert ev[1:] == [("data", b"body bytes"), ("end", None), ("eof",)]


def test_response_transfer_codings_other_than_chunked_are_refused(http1_impl):
    # RFC 9112 §6.3 would read such a body until close, but a proxy that re-frames bodies
    # would hand the client gzip bytes with no coding to say so: refuse it (502 downstream).
    for te in (b"gzip", b"gzip, chunked"):
        p = http1_impl.ResponseParser()
        p.expect(b"GET")
        p.feed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: " + te + b"\r\n\r\nzz")
        with pytest.raises(http1_impl.ProtocolError) as exc:
            p.next_event()
        assert exc.value.status_hint == 502


@pytest.mark.parametrize("status", [204, 304])
def test_response_no_body_statuses(http1_impl, status):
    wire = b"HTTP/1.1 %d X\r\nContent-Length: 5\r\n\r\n" % status
    assert [e[0] for e in run(http1_impl, wire, response=True)] == ["head", "end", "eof"]


def test_response_to_head_has_no_body(http1_impl):
    wire = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"
    ev = run(http1_impl, wire, response=True, method=b"HEAD")
    assert [e[0] for e in ev] == ["head", "end", "eof"] and ev[0][1]["content_length"] == 5


def test_interim_responses_then_final(http1_impl):
    wire = (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nx")
    ev = run(http1_impl, wire, response=True)
    assert [e[0] for e in ev] == ["head", "end", "head", "end", "head", "data", "end", "eof"]


def test_101_switching_protocols(http1_impl):
    wire = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\nWS"
    ev = run(http1_impl, wire, response=True)
    assert ev[1] == ("upgrade", b"WS")


def test_connect_2xx_is_tunnel(http1_impl):
    ev = run(http1_impl, b"HTTP/1.1 200 Connection established\r\n\r\nTLS", response=True,
             method=b"CONNECT")
    assert ev[1] == ("upgrade", b"TLS")


def test_response_chunked_with_trailers(http1_impl):
    wire = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nWiki\r\n0\r\nA: b\r\n\r\n"
    ev = run(http1_impl, wire, response=True)
    assert ev[1:] == [("data", b"Wiki"), ("end", [["A", "b"]]), ("eof",)]


def test_status_line_without_reason(http1_impl):
    ev = run(http1_impl, b"HTTP/1.1 200\r\nContent-Length: 0\r\n\r\n", response=True)
    assert ev[0][1]["reason"] == ""


@pytest.mark.parametrize("line", [b"HTTP/1.1 20 OK", b"HTTP/1.1 2000 OK", b"HTTP/1.1 099 X",
                                  b"HTTP/1.1 abc X", b"HTTP/2 200 OK", b"HTTP/1.1 200 O\x00K",
                                  b"ICY 200 OK"])
def test_bad_status_lines_are_502(http1_impl, line):
    ev = run(http1_impl, line + b"\r\nContent-Length: 0\r\n\r\n", response=True)
    assert first_error(ev)[1] == 502


def test_response_errors_are_502_and_upstream(http1_impl):
    p = http1_impl.ResponseParser()
    p.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n")
    with pytest.raises(ProtocolError) as ei:
        p.next_event()
    assert ei.value.status_hint == 502 and ei.value.source.value == "upstream"


def test_response_duplicate_host_is_fine(http1_impl):
    ev = run(http1_impl, b"HTTP/1.1 200 OK\r\nHost: a\r\nHost: b\r\nContent-Length: 0\r\n\r\n",
             response=True)
    assert ev[0][0] == "head"


def test_response_incomplete(http1_impl):
    ev = run(http1_impl, b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nabc", response=True)
    assert ev[-1] == ("error", 502, "incomplete response")
