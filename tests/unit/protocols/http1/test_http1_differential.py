"""Differential tests against h11 and httptools (llhttp): same accept/reject, same parsed
method, target, headers and body, on hand-written and Hypothesis-generated requests.

Disagreement classes (each deliberate; see docs/http1.md "Differences"):

* D1 CTL bytes in field values (\\x01..\\x08, \\x0b..\\x1f, \\x7f): h11 accepts any non-NUL,
  non-whitespace byte; Dispa rejects (RFC 9110 §5.5 allows only VCHAR, obs-text, SP, HTAB).
* D2 duplicate identical Content-Length: h11 folds equal values into one; Dispa rejects every
  duplicate (no ambiguity left for a downstream parser to resolve differently).
* D3 missing Host in HTTP/1.1: h11 and httptools accept; Dispa rejects (RFC 9112 §3.2 MUST).
* D4 leading empty lines: h11 0.16 rejects a leading CRLF ("no request line received");
  Dispa skips up to MAX_LEADING_EMPTY_LINES (RFC 9112 §2.2 SHOULD).
* D5 chunk size with trailing whitespace ("5 \\r\\n"): h11 accepts; Dispa follows the chunk
  grammar (BWS only before ";") and rejects.
* D6 unknown methods: httptools/llhttp only knows a fixed list; Dispa accepts any token.
* D7 trailing whitespace of field values: httptools keeps it; Dispa (and h11) strip OWS
  on both sides (RFC 9112 §5.1). The comparison strips httptools' values.
* D8 obs-fold: h11 unfolds continuation lines; Dispa rejects (RFC 9112 §5.2 allows a server
  to reject with 400, and unfolding is a smuggling vector).
* D9 trailers: httptools reports trailer fields through on_header like header fields;
  Dispa keeps them apart in ``parser.trailers`` (never merged into the head).
* Missing Host in HTTP/1.1: h11 rejects like Dispa; httptools accepts.
"""

from __future__ import annotations

import h11
import httptools
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dispa.protocols.http1 import _pure
from dispa.protocols.http1.errors import ProtocolError


def dispa_parse(mod, wire):
    p = mod.RequestParser()
    p.feed(wire)
    p.feed_eof()
    try:
        if p.next_event() != mod.HEAD:
            return "incomplete"
        h = p.head
        body = b""
        while True:
            ev = p.next_event()
            if ev == mod.DATA:
                body += p.take_data()
            elif ev in (mod.END, mod.UPGRADE):
                break
            else:
                return "incomplete"
        return (h.method, h.target, [(n.lower(), v) for n, v in h.headers], body)
    except ProtocolError:
        return "error"


def h11_parse(wire):
    c = h11.Connection(h11.SERVER)
    c.receive_data(wire)
    c.receive_data(b"")
    try:
        ev = c.next_event()
        if not isinstance(ev, h11.Request):
            return "incomplete"
        body = b""
        while True:
            e = c.next_event()
            if isinstance(e, h11.Data):
                body += e.data
            elif isinstance(e, h11.EndOfMessage):
                break
            else:
                return "incomplete"
        return (ev.method, ev.target, [(n.lower(), v) for n, v in ev.headers.raw_items()], body)
    except h11.RemoteProtocolError:
        return "error"


class _Cb:
    def __init__(self):
        self.url = b""
        self.headers = []
        self.body = b""
        self.done = False

    def on_url(self, url):
        self.url += url

    def on_header(self, name, value):
        self.headers.append((name.lower(), value.strip(b" \t")))   # D7

    def on_body(self, body):
        self.body += body

    def on_message_complete(self):
        self.done = True


def httptools_parse(wire):
    cb = _Cb()
    p = httptools.HttpRequestParser(cb)
    try:
        p.feed_data(wire)
    except httptools.HttpParserUpgrade:
        pass
    except httptools.HttpParserError:
        return "error"
    if not cb.done:
        return "incomplete"
    return (p.get_method(), cb.url, cb.headers, cb.body)


AGREE = [
    b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET /a?b=c HTTP/1.1\r\nHost: a\r\nX-A: \t spaced \t \r\nAccept: */*\r\n\r\n",
    b"POST /p HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello",
    b"POST /p HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    b"POST /p HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5;a=b\r\nhello\r\n0\r\n\r\n",
    b"GET / HTTP/1.0\r\n\r\n",
    b"GET http://ex.org/x HTTP/1.1\r\nHost: ex.org\r\n\r\n",
    b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n",
    # rejected by all three
    b"GET / HTTP/1.1\r\nHost: a\r\nX : 1\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
    b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: x\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nX\x00: 1\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nX: \x00\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
]


@pytest.mark.parametrize("wire", AGREE)
def test_agrees_with_h11_and_httptools(http1_impl, wire):
    ours = dispa_parse(http1_impl, wire)
    assert ours == h11_parse(wire)
    assert ours == httptools_parse(wire)


DISAGREE = [
    ("D1", b"GET / HTTP/1.1\r\nHost: a\r\nX: a\x01b\r\n\r\n", "h11"),
    ("D2", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\na", "h11"),
    ("D3", b"GET / HTTP/1.1\r\nX: 1\r\n\r\n", "httptools"),
    ("D8", b"GET / HTTP/1.1\r\nHost: a\r\nX: 1\r\n 2\r\n\r\n", "h11"),
    ("D5", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5 \r\nhello\r\n0\r\n\r\n", "h11"),
]


@pytest.mark.parametrize("cls,wire,who", DISAGREE, ids=[d[0] for d in DISAGREE])
def test_documented_disagreements(http1_impl, cls, wire, who):
    """Dispa rejects; the named reference accepts (documented class in the module doc)."""
    assert dispa_parse(http1_impl, wire) == "error"
    if who in ("h11", "both"):
        assert h11_parse(wire) not in ("error",)
    if who in ("httptools", "both"):
        assert httptools_parse(wire) not in ("error",)


def test_d4_leading_crlf(http1_impl):
    wire = b"\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n"
    assert dispa_parse(http1_impl, wire)[0] == b"GET"


def test_d6_any_token_method(http1_impl):
    wire = b"FROB / HTTP/1.1\r\nHost: a\r\n\r\n"
    assert dispa_parse(http1_impl, wire)[0] == b"FROB"
    assert h11_parse(wire)[0] == b"FROB"
    assert httptools_parse(wire) == "error"


_tchar = st.sampled_from(list(b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"))
_token = st.lists(_tchar, min_size=1, max_size=12).map(bytes)
_vchar = st.integers(0x21, 0x7E)
_value = st.lists(st.one_of(_vchar, st.just(0x20)), max_size=30).map(lambda b: bytes(b).strip())
_known = {b"host", b"content-length", b"transfer-encoding", b"connection", b"upgrade",
          b"expect", b"te", b"trailer", b"keep-alive"}


@st.composite
def requests(draw):
    method = draw(st.sampled_from([b"GET", b"POST", b"PUT", b"DELETE", b"PATCH", b"OPTIONS"]))
    target = b"/" + bytes(draw(st.lists(st.integers(0x21, 0x7E).filter(lambda c: c != 0x23),
                                        max_size=20)))
    fields = [(b"Host", b"example.org")]
    for name, value in draw(st.lists(st.tuples(_token, _value), max_size=6)):
        if name.lower() not in _known:
            fields.append((name, value))
    body = draw(st.binary(max_size=40))
    chunked = draw(st.booleans())
    if chunked:
        fields.append((b"Transfer-Encoding", b"chunked"))
        cuts = sorted(draw(st.lists(st.integers(0, len(body)), max_size=3)))
        pieces = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)]) if b > a]
        payload = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"
    else:
        fields.append((b"Content-Length", b"%d" % len(body)))
        payload = body
    head = b"%s %s HTTP/1.1\r\n" % (method, target)
    head += b"".join(b"%s: %s\r\n" % f for f in fields) + b"\r\n"
    return head + payload


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(wire=requests())
def test_generated_requests_agree_with_h11_and_httptools(wire):
    import dispa._hotpath as hot
    ours = dispa_parse(hot, wire)
    assert ours == dispa_parse(_pure, wire)
    assert ours != "error"
    assert ours == h11_parse(wire)
    assert ours == httptools_parse(wire)
