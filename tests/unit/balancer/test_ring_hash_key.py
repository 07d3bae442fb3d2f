"""Hash keys (``dispa.balancer.hash_key``): which request bytes a consistent-hash selector hashes."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dispa.balancer.hash_key import DEFAULT_SEPARATOR, PART_KINDS, compile_hash_key

HEADERS = [
    (b"Host", b"example.com"),
    (b"X-User", b"alice"),
    (b"Cookie", b"theme=dark; sid=abc123"),
    (b"cookie", b"lang=en; sid=shadowed"),
    (b"Accept", b"text/html"),
    (b"accept", b"application/json"),
    (b"X-Empty", b""),
]


def build(spec, *, method="GET", path="/shop/cart", query="item=42&Ref=home&k=",
          headers=HEADERS, client_ip="203.0.113.7", **kw):
    return compile_hash_key(spec, **kw).build(method, path, query, headers, client_ip)


@pytest.mark.parametrize("spec, expected", [
    ("client_ip", b"203.0.113.7"),
    ("method", b"GET"),
    ("path", b"/shop/cart"),
    ("uri", b"/shop/cart?item=42&Ref=home&k="),
    ("header:x-user", b"alice"),
    ("header:X-USER", b"alice"),                       # field names are case-insensitive
    ("header:accept", b"text/html, application/json"),  # RFC 9110 §5.3 combination
    ("cookie:theme", b"dark"),
    ("cookie:sid", b"abc123"),                         # first occurrence across Cookie fields
    ("cookie:lang", b"en"),
    ("query:item", b"42"),
    ("query:ref", b"home"),                            # nginx $arg_: name case-insensitive
])
def test_single_parts_are_the_raw_value(spec, expected):
    assert build(spec) == expected


@pytest.mark.parametrize("spec", [
    "header:x-missing", "header:x-empty", "cookie:nope", "cookie:Theme",
    "query:nope", "query:k",  # absent, and present but empty
])
def test_missing_or_empty_parts_fall_back_to_the_client_ip(spec):
    assert build(spec) == b"203.0.113.7"


def test_uri_without_query_is_the_path():
    assert build("uri", query="") == b"/shop/cart"
    assert build("uri", query=None) == b"/shop/cart"
    assert build("query:item", query=None) == b"203.0.113.7"


def test_combinations_join_with_the_separator():
    assert build("client_ip+header:x-user") == b"203.0.113.7\x1falice"
    assert build(" client_ip + header:x-user ") == b"203.0.113.7\x1falice"
    assert build("client_ip+header:x-user", separator=b":") == b"203.0.113.7:alice"
    # A missing part is replaced in place, so the key stays per client.
    assert build("header:x-missing+path") == b"203.0.113.7\x1f/shop/cart"
    assert DEFAULT_SEPARATOR == b"\x1f"


def test_the_separator_prevents_ambiguous_joins():
    a = build("header:x-a+header:x-b", headers=[(b"x-a", b"ab"), (b"x-b", b"c")])
    b = build("header:x-a+header:x-b", headers=[(b"x-a", b"a"), (b"x-b", b"bc")])
    assert a != b


def test_text_inputs_are_the_latin1_wire_bytes():
    # dispa.proxy keeps the target as latin-1 text; the key must be the wire bytes again.
    wire = "/caf\xc3\xa9"  # the UTF-8 bytes of "/café" decoded as latin-1
    assert build("path", path=wire) == b"/caf\xc3\xa9"
    assert build("path", path=b"/raw") == b"/raw"
    assert build("path", path="/\u2603") == "/\u2603".encode()  # beyond latin-1: UTF-8
    assert build("client_ip", client_ip=b"::1") == b"::1"


def test_cookie_parsing_tolerates_spaces_and_junk():
    headers = [(b"Cookie", b" a=1 ;junk; b = 2;c=")]
    assert build("cookie:a", headers=headers) == b"1"
    assert build("cookie:b", headers=headers) == b"2"
    assert build("cookie:c", headers=headers) == b"203.0.113.7"
    assert build("cookie:junk", headers=headers) == b"203.0.113.7"


def test_query_needs_an_equals_sign_like_nginx():
    assert build("query:flag", query="flag&x=1") == b"203.0.113.7"
    assert build("query:x", query="flag&x=1") == b"1"
    assert build("query:x", query="x=%2F+a") == b"%2F+a"  # raw, never decoded


@pytest.mark.parametrize("spec", [
    "", "  ", "+", "client_ip+", "host", "header", "header:", "header: ",
    "header:bad name", "header:x(y)", "cookie:a;b", "query:a=b", "query:a&b", "nope:x",
])
def test_bad_specs_are_value_errors(spec):
    with pytest.raises(ValueError):
        compile_hash_key(spec)


def test_bad_types_are_type_errors():
    with pytest.raises(TypeError):
        compile_hash_key(b"path")
    with pytest.raises(TypeError):
        compile_hash_key("path", separator="|")


def test_compiled_key_is_reusable_and_describes_itself():
    key = compile_hash_key("client_ip+header:X-User")
    assert key.parts == (("client_ip", ""), ("header", "x-user"))
    assert key.spec == "client_ip+header:X-User"
    assert key("GET", "/", "", [(b"x-user", b"bob")], "10.0.0.1") == b"10.0.0.1\x1fbob"
    assert key("GET", "/", "", [], "10.0.0.2") == b"10.0.0.2\x1f10.0.0.2"
    assert set(PART_KINDS) == {"client_ip", "method", "path", "uri", "header", "cookie", "query"}


_values = st.binary(min_size=0, max_size=20).filter(lambda b: b"\x1f" not in b)


@settings(max_examples=200, deadline=None)
@given(ip=st.sampled_from(["10.0.0.1", "::1", ""]), user=_values, sid=_values)
def test_build_never_raises_and_is_deterministic(ip, user, sid):
    key = compile_hash_key("client_ip+header:x-user+cookie:sid+query:q+uri+method")
    headers = [(b"X-User", user), (b"Cookie", b"sid=" + sid.replace(b";", b""))]
    out = key.build("GET", "/p", "q=1", headers, ip)
    assert out == key.build("GET", "/p", "q=1", headers, ip)
    assert isinstance(out, bytes)
    assert out.count(b"\x1f") == 5
