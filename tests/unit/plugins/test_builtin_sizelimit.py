"""``sizelimit``: 413 for a declared length over the limit, or a counted body crossing it."""

from __future__ import annotations

import msgspec
import pytest

from dispa.plugins.api import BuildContext, Headers, HTTPError, Request
from dispa.plugins.builtin import BUILTIN_FILTERS, SizeLimit


def _build(**cfg) -> SizeLimit:
    return SizeLimit.build(msgspec.convert(cfg, SizeLimit.Config), BuildContext())


def _req(content_length=-1, chunked=False) -> Request:
    h = Headers([(b"Transfer-Encoding", b"chunked")] if chunked else
                [(b"Content-Length", str(content_length).encode())] if content_length >= 0
                else [])
    return Request("POST", "/upload", h, content_length=content_length, chunked=chunked)


# --------------------------------------------------------------------------- config

def test_type_name_and_body_declaration():
    assert SizeLimit.name == "sizelimit" and SizeLimit in BUILTIN_FILTERS
    assert SizeLimit.wants_request_body is True


def test_good_config_and_default():
    assert msgspec.convert({}, SizeLimit.Config).max_body_bytes == 1024 * 1024
    assert msgspec.convert({"max_body_bytes": 0}, SizeLimit.Config).max_body_bytes == 0


def test_unknown_key_is_refused():
    with pytest.raises(msgspec.ValidationError, match="unknown field"):
        msgspec.convert({"max_body_size": 10}, SizeLimit.Config)


@pytest.mark.parametrize("cfg", [{"max_body_bytes": -1}, {"max_body_bytes": "1m"},
                                 {"max_body_bytes": 1.5}])
def test_bad_values_are_refused(cfg):
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert(cfg, SizeLimit.Config)


# --------------------------------------------------------------------------- declared length

def test_declared_length_over_the_limit_is_refused_before_the_body():
    f = _build(max_body_bytes=100)
    with pytest.raises(HTTPError) as ei:
        f.on_request(_req(101))
    assert ei.value.status == 413
    assert ei.value.to_response().status == 413


@pytest.mark.parametrize("n", [0, 1, 100])
def test_declared_length_up_to_the_limit_passes(n):
    assert _build(max_body_bytes=100).on_request(_req(n)) is None


def test_no_body_and_chunked_pass_the_head_check():
    f = _build(max_body_bytes=0)
    assert f.on_request(_req()) is None
    assert f.on_request(_req(chunked=True)) is None


# --------------------------------------------------------------------------- counted bodies

def test_chunked_body_is_counted_and_refused_when_it_crosses_the_limit():
    f = _build(max_body_bytes=10)
    req = _req(chunked=True)
    f.on_request(req)
    assert f.on_request_body(req, b"12345", False) == b"12345"
    assert f.on_request_body(req, b"12345", False) == b"12345"    # exactly 10: fine
    with pytest.raises(HTTPError) as ei:
        f.on_request_body(req, b"1", True)
    assert ei.value.status == 413


def test_chunked_body_at_the_limit_passes_through_unchanged():
    f = _build(max_body_bytes=6)
    req = _req(chunked=True)
    out = [f.on_request_body(req, c, e) for c, e in ((b"ab", False), (b"", False),
                                                      (b"cdef", False), (b"", True))]
    assert out == [b"ab", b"", b"cdef", b""]


def test_counts_are_per_request():
    f = _build(max_body_bytes=4)
    a, b = _req(chunked=True), _req(chunked=True)
    f.on_request_body(a, b"1234", False)
    f.on_request_body(b, b"1234", False)
    with pytest.raises(HTTPError):
        f.on_request_body(a, b"5", True)


def test_two_instances_keep_separate_counts():
    small, big = _build(max_body_bytes=5), _build(max_body_bytes=8)
    req = _req(chunked=True)
    for chunk in (b"123", b"45"):
        small.on_request_body(req, chunk, False)
        big.on_request_body(req, chunk, False)
    big.on_request_body(req, b"678", True)
    with pytest.raises(HTTPError):
        small.on_request_body(req, b"6", True)


def test_zero_limit_refuses_the_first_body_byte():
    f = _build(max_body_bytes=0)
    req = _req(chunked=True)
    assert f.on_request_body(req, b"", False) == b""
    with pytest.raises(HTTPError):
        f.on_request_body(req, b"x", False)


def test_a_body_longer_than_its_declared_length_is_still_caught():
    f = _build(max_body_bytes=4)
    req = _req(3)
    f.on_request(req)
    with pytest.raises(HTTPError):
        f.on_request_body(req, b"12345", True)
