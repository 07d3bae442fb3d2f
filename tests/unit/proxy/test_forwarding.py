"""Forwarding headers: replaced from untrusted peers, extended from trusted proxies."""

import pytest

from dispa.protocols.http1 import HEAD, RequestParser
from dispa.proxy.forwarding import TrustedProxies, forwarding_headers


def head_of(raw: bytes):
    p = RequestParser()
    p.feed(raw)
    assert p.next_event() == HEAD
    return p.head


def test_untrusted_peer_gets_fresh_headers():
    h = head_of(b"GET / HTTP/1.1\r\nHost: a.com\r\nX-Forwarded-For: 1.2.3.4\r\n"
                b"Forwarded: for=1.2.3.4\r\nX-Forwarded-Proto: https\r\n\r\n")
    out = dict(forwarding_headers(h, "10.0.0.9", False, b"dispa"))
    assert out[b"X-Forwarded-For"] == b"10.0.0.9"
    assert out[b"X-Forwarded-Proto"] == b"http"
    assert out[b"X-Forwarded-Host"] == b"a.com"
    assert out[b"Forwarded"] == b'for=10.0.0.9;proto=http;host="a.com"'
    assert out[b"Via"] == b"1.1 dispa"


def test_trusted_peer_chain_is_extended():
    h = head_of(b"GET / HTTP/1.1\r\nHost: a.com\r\nX-Forwarded-For: 1.2.3.4\r\n"
                b"X-Forwarded-For: 5.6.7.8\r\nForwarded: for=1.2.3.4\r\nVia: 1.0 edge\r\n\r\n")
    out = dict(forwarding_headers(h, "::1", True, b"dispa"))
    assert out[b"X-Forwarded-For"] == b"1.2.3.4, 5.6.7.8, ::1"
    assert out[b"Forwarded"] == b'for=1.2.3.4, for="[::1]";proto=http;host="a.com"'
    assert out[b"Via"] == b"1.0 edge, 1.1 dispa"


def test_empty_via_pseudonym_disables_via():
    h = head_of(b"GET / HTTP/1.0\r\n\r\n")
    assert b"Via" not in dict(forwarding_headers(h, "1.1.1.1", False, b""))


@pytest.mark.parametrize("ip,expected", [("127.0.0.1", True), ("10.1.2.3", True),
                                         ("192.168.0.1", False), ("::1", True), ("junk", False)])
def test_trusted_proxies_cidrs(ip, expected):
    t = TrustedProxies(["127.0.0.0/8", "10.0.0.0/8", "::1"])
    assert t.contains(ip) is expected
