"""The etcd provider's value format and key-range arithmetic (no server needed)."""

from __future__ import annotations

import pytest

from dispa.discovery.etcd import normalise_prefix, parse_instance, prefix_range_end


def test_json_value_with_weight_and_meta():
    ep = parse_instance(b'{"host": "10.0.0.5", "port": 8080, "weight": 3, "meta": {"zone": "a"}}')
    assert (ep.host, ep.port, ep.weight, ep.meta) == ("10.0.0.5", 8080, 3, {"zone": "a"})
    assert ep.id == "10.0.0.5:8080"


def test_json_value_defaults_and_ipv6():
    ep = parse_instance(b'{"host": "[::1]", "port": 9000}')
    assert (ep.host, ep.port, ep.weight, ep.meta) == ("::1", 9000, 1, {})
    assert ep.id == "[::1]:9000"


@pytest.mark.parametrize("raw,host,port", [
    (b"127.0.0.1:8080", "127.0.0.1", 8080),
    (b"  backend.internal:80\n", "backend.internal", 80),
    (b"[2001:db8::1]:443", "2001:db8::1", 443),
])
def test_plain_host_port(raw, host, port):
    ep = parse_instance(raw)
    assert (ep.host, ep.port, ep.weight) == (host, port, 1)


@pytest.mark.parametrize("raw", [
    b"", b"nohost", b"host:", b"host:http", b"2001:db8::1:80", b"[::1]80", b"h:70000",
    b'{"port": 80}', b'{"host": "", "port": 80}', b'{"host": "a", "port": "80"}',
    b'{"host": "a", "port": 0}', b'{"host": "a", "port": 80, "weight": 0}',
    b'{"host": "a", "port": 80, "weight": true}', b'{"host": "a", "port": 80, "meta": []}',
    b'{"host": "a b", "port": 80}', b'{"host": "a", "port": 80', b"\xff\xfe:80",
])
def test_invalid_values_are_refused(raw):
    with pytest.raises((ValueError, UnicodeDecodeError)):
        parse_instance(raw)


def test_prefix_range_end_increments_the_last_byte():
    assert prefix_range_end(b"/services/api/") == b"/services/api0"
    assert prefix_range_end(b"a\xff") == b"b"
    assert prefix_range_end(b"\xff\xff") == b"\0"


def test_prefix_always_ends_in_a_slash():
    assert normalise_prefix("/services/api") == "/services/api/"
    assert normalise_prefix("/services/api/") == "/services/api/"
