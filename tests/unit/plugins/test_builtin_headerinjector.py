"""``headerinjector``: configured fields are added only when absent, on both directions."""

from __future__ import annotations

import msgspec
import pytest

from dispa.plugins.api import BuildContext, Headers, Request, ResponseHead
from dispa.plugins.builtin import BUILTIN_FILTERS, HeaderInjector


def _build(**cfg) -> HeaderInjector:
    return HeaderInjector.build(msgspec.convert(cfg, HeaderInjector.Config), BuildContext())


def _req(*headers) -> Request:
    return Request("GET", "/x", Headers([(k.encode(), v.encode()) for k, v in headers]),
                   host="example.com")


# --------------------------------------------------------------------------- config

def test_type_name_is_the_original_one():
    assert HeaderInjector.name == "headerinjector"
    assert HeaderInjector in BUILTIN_FILTERS


def test_good_config_parses_and_defaults_are_empty():
    assert msgspec.convert({}, HeaderInjector.Config) == HeaderInjector.Config()
    c = msgspec.convert({"request_headers": {"X-A": "1"}, "response_headers": {"X-B": "2"}},
                        HeaderInjector.Config)
    assert c.request_headers == {"X-A": "1"} and c.response_headers == {"X-B": "2"}


def test_unknown_key_is_refused():
    with pytest.raises(msgspec.ValidationError, match="unknown field"):
        msgspec.convert({"headers": {"a": "b"}}, HeaderInjector.Config)


@pytest.mark.parametrize("table", [
    {"request_headers": {"bad name": "v"}},
    {"request_headers": {"x-a": "line\r\nInjected: 1"}},
    {"response_headers": {"x-a:": "v"}},
    {"response_headers": {"x-a": "caf\u20ac"}},          # not latin-1
    {"request_headers": {"Content-Length": "5"}},        # framing
    {"response_headers": {"transfer-encoding": "chunked"}},
    {"request_headers": {"x-a": 1}},                       # wrong type
])
def test_bad_fields_are_refused_by_the_loader(table):
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert(table, HeaderInjector.Config)


def test_build_validates_too_when_the_struct_is_made_directly():
    # a Struct built in code skips msgspec.convert's __post_init__ wrapping: still a ValueError
    with pytest.raises(ValueError):
        HeaderInjector.Config(request_headers={"x-a": "a\nb"})


# --------------------------------------------------------------------------- behaviour

def test_absent_request_field_is_added():
    f = _build(request_headers={"X-Env": "prod"})
    req = _req(("Accept", "*/*"))
    assert f.on_request(req) is None
    assert req.headers.get("x-env") == "prod"
    assert req.headers.changed


def test_present_request_field_is_kept_whatever_its_case():
    f = _build(request_headers={"X-Env": "prod"})
    req = _req(("x-env", "dev"), ("X-ENV", "dev2"))
    f.on_request(req)
    assert req.headers.get_all("x-env") == ["dev", "dev2"]


def test_response_fields_are_added_only_when_absent():
    f = _build(response_headers={"X-Frame-Options": "DENY", "Server": "dispa"})
    resp = ResponseHead(200, Headers([(b"Server", b"origin")]))
    assert f.on_response(_req(), resp) is None
    assert resp.headers.get("server") == "origin"
    assert resp.headers.get("x-frame-options") == "DENY"


def test_an_empty_config_changes_nothing():
    f = _build()
    req = _req(("a", "b"))
    resp = ResponseHead(200, Headers())
    f.on_request(req)
    f.on_response(req, resp)
    assert not req.headers.changed and not resp.headers.changed


def test_configured_order_is_kept():
    f = _build(response_headers={"x-1": "a", "x-2": "b", "x-3": "c"})
    resp = ResponseHead(200, Headers())
    f.on_response(_req(), resp)
    assert resp.headers.keys() == ["x-1", "x-2", "x-3"]
