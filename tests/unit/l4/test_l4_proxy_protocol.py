"""PROXY protocol v1/v2 (dispa/l4/proxy_protocol.py): round trips, the spec's examples,
partial input at every split, and malformed headers refused."""

from __future__ import annotations

import struct

import pytest

from dispa.l4.proxy_protocol import (
    V2_SIGNATURE, ProxyProtocolError, encode_v1, encode_v2, parse,
)


def test_v1_is_the_spec_text():
    assert encode_v1(("192.168.0.1", 56324), ("192.168.0.11", 443)) == \
        b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n"
    assert encode_v1(("::1", 1), ("::2", 2)) == b"PROXY TCP6 ::1 ::2 1 2\r\n"
    assert encode_v1(("1.2.3.4", 1), ("::2", 2)) == b"PROXY UNKNOWN\r\n"


@pytest.mark.parametrize("src,dst", [
    (("10.1.2.3", 40000), ("10.9.9.9", 9000)),
    (("2001:db8::1", 1234), ("2001:db8::2", 443)),
])
@pytest.mark.parametrize("encode", [encode_v1, encode_v2])
def test_round_trip_at_every_split(encode, src, dst):
    data = encode(src, dst) + b"payload"
    for cut in range(len(data) - 7):
        assert parse(data[:cut]) is None, cut  # not enough yet: never an error
    hdr = parse(data)
    assert (hdr.source, hdr.dest) == (src, dst)
    assert data[hdr.length:] == b"payload"


def test_v2_layout_matches_the_spec():
    h = encode_v2(("127.0.0.1", 1), ("127.0.0.2", 2))
    assert h[:12] == V2_SIGNATURE and h[12] == 0x21 and h[13] == 0x11
    assert struct.unpack("!H", h[14:16])[0] == 12 and len(h) == 28


def test_v2_local_and_unknown_carry_no_address():
    hdr = parse(encode_v2(None, None))
    assert hdr.source is None and hdr.length == 16
    hdr = parse(b"PROXY UNKNOWN\r\nrest")
    assert hdr.source is None and hdr.length == 15


def test_v2_tlvs_are_skipped():
    body = bytes([127, 0, 0, 1, 127, 0, 0, 2]) + struct.pack("!HH", 5, 6) + b"\x04\x00\x01X"
    data = V2_SIGNATURE + b"\x21\x11" + struct.pack("!H", len(body)) + body + b"after"
    hdr = parse(data)
    assert hdr.source == ("127.0.0.1", 5) and data[hdr.length:] == b"after"


def test_mixed_families_are_mapped_into_ipv6_and_back():
    hdr = parse(encode_v2(("1.2.3.4", 5), ("::1", 6)))
    assert hdr.source == ("1.2.3.4", 5) and hdr.dest == ("::1", 6)


@pytest.mark.parametrize("data", [
    b"GET / HTTP/1.1\r\n\r\n",
    b"PROXY TCP4 1.2.3.4 5.6.7.8 1 \r\n",
    b"PROXY TCP4 ::1 ::2 1 2\r\n",
    b"PROXY TCP4 1.2.3.4 5.6.7.8 1 99999\r\n",
    b"PROXY TCP9 1.2.3.4 5.6.7.8 1 2\r\n",
    b"PROXY " + b"x" * 120,
    b"\r\n\r\n\x00\r\nQUIX\n",
    V2_SIGNATURE + b"\x31\x11\x00\x00",
    V2_SIGNATURE + b"\x2f\x11\x00\x00",
    V2_SIGNATURE + b"\x21\x11" + struct.pack("!H", 60000),
])
def test_malformed_headers_are_refused(data):
    with pytest.raises(ProxyProtocolError):
        parse(data)
