"""``headeroverride``: configured fields replace every existing field of that name."""

from __future__ import annotations

import msgspec
import pytest

from dispa.plugins.api import BuildContext, Headers, Request, ResponseHead
from dispa.plugins.builtin import BUILTIN_FILTERS, HeaderOverride


def _build(**cfg) -> HeaderOverride:
    return HeaderOverride.build(msgspec.convert(cfg, HeaderOverride.Config), BuildContext())


def _req(*headers) -> Request:
    return Request("GET", "/x", Headers([(k.encode(), v.encode()) for k, v in headers]),
                   host="example.com")


# --------------------------------------------------------------------------- config

def test_type_name_is_the_original_one():
    assert HeaderOverride.name == "headeroverride"
    assert HeaderOverride in BUILTIN_FILTERS


def test_good_config_parses():
    c = msgspec.convert({"request_headers": {"X-A": "1"}}, HeaderOverride.Config)
    assert c.request_headers == {"X-A": "1"} and c.response_headers == {}


def test_unknown_key_is_refused():
    with pytest.raises(msgspec.ValidationError, match="unknown field"):
        msgspec.convert({"request_headers": {}, "mode": "set"}, HeaderOverride.Config)


@pytest.mark.parametrize("table", [
    {"request_headers": {"": "v"}},
    {"response_headers": {"x-a": "a\x00b"}},
    {"response_headers": {"Connection": "close"}},
    {"request_headers": ["x-a", "v"]},
])
def test_bad_values_are_refused(table):
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert(table, HeaderOverride.Config)


# --------------------------------------------------------------------------- behaviour

def test_request_field_replaces_all_existing_ones():
    f = _build(request_headers={"X-Forwarded-Proto": "https"})
    req = _req(("x-forwarded-proto", "http"), ("Accept", "*/*"), ("X-Forwarded-Proto", "ftp"))
    assert f.on_request(req) is None
    assert req.headers.get_all("x-forwarded-proto") == ["https"]
    # the first occurrence's position is kept
    assert [k.lower() for k in req.headers.keys()] == ["x-forwarded-proto", "accept"]


def test_absent_field_is_appended():
    f = _build(request_headers={"X-A": "1"})
    req = _req(("Accept", "*/*"))
    f.on_request(req)
    assert req.headers.keys() == ["Accept", "X-A"]


def test_response_field_is_overridden():
    f = _build(response_headers={"Server": "dispa", "Cache-Control": "no-store"})
    resp = ResponseHead(200, Headers([(b"server", b"nginx"), (b"cache-control", b"max-age=60")]))
    assert f.on_response(_req(), resp) is None
    assert resp.headers.get("server") == "dispa"
    assert resp.headers.get_all("cache-control") == ["no-store"]


def test_values_are_stored_stripped_like_the_api_does():
    f = _build(response_headers={"x-a": "  v  "})
    resp = ResponseHead(200, Headers())
    f.on_response(_req(), resp)
    assert resp.headers.raw == [(b"x-a", b"v")]
