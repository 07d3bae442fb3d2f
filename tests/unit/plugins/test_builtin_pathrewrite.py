"""``pathrewrite``: a leading ``from_prefix`` becomes ``to_prefix``; everything else stays."""

from __future__ import annotations

import msgspec
import pytest

from dispa.plugins.api import BuildContext, Headers, Request
from dispa.plugins.builtin import BUILTIN_FILTERS, PathRewrite


def _build(**cfg) -> PathRewrite:
    return PathRewrite.build(msgspec.convert(cfg, PathRewrite.Config), BuildContext())


def _run(f: PathRewrite, target: str) -> Request:
    req = Request("GET", target, Headers(), host="h")
    assert f.on_request(req) is None
    return req


# --------------------------------------------------------------------------- config

def test_type_name_is_the_original_one():
    assert PathRewrite.name == "pathrewrite" and PathRewrite in BUILTIN_FILTERS


def test_good_config():
    c = msgspec.convert({"from_prefix": "/api", "to_prefix": "/v2"}, PathRewrite.Config)
    assert (c.from_prefix, c.to_prefix) == ("/api", "/v2")
    assert msgspec.convert({"from_prefix": "/api"}, PathRewrite.Config).to_prefix == ""


def test_unknown_key_is_refused():
    with pytest.raises(msgspec.ValidationError, match="unknown field"):
        msgspec.convert({"from_prefix": "/a", "to": "/b"}, PathRewrite.Config)


@pytest.mark.parametrize("cfg", [
    {},                                          # from_prefix is required
    {"from_prefix": ""},
    {"from_prefix": "api"},
    {"from_prefix": "/a", "to_prefix": "b"},
    {"from_prefix": "/a", "to_prefix": "/b?x=1"},
    {"from_prefix": "/a b"},
    {"from_prefix": "/a", "to_prefix": "/b\r\n"},
    {"from_prefix": "/a#x"},
])
def test_bad_values_are_refused(cfg):
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert(cfg, PathRewrite.Config)


# --------------------------------------------------------------------------- behaviour

@pytest.mark.parametrize("frm,to,path,expected", [
    ("/api", "/v2", "/api/users", "/v2/users"),
    ("/api", "/v2", "/api", "/v2"),
    ("/api/", "/", "/api/users", "/users"),
    ("/api", "/", "/api/users", "/users"),          # no '//' at the junction
    ("/api", "", "/api/users", "/users"),           # strip
    ("/api", "", "/api", "/"),                      # never an empty path
    ("/api", "/v2", "/apiary", "/v2ary"),           # plain prefix, as in the original
    ("/old/", "/new/", "/old/a/b/", "/new/a/b/"),
    ("/a", "/b", "/b/a", "/b/a"),                   # not a prefix: untouched
    ("/a", "/b", "/A/x", "/A/x"),                   # case-sensitive
])
def test_rewrites(frm, to, path, expected):
    assert _run(_build(from_prefix=frm, to_prefix=to), path).path == expected


def test_query_is_kept_and_target_reflects_the_change():
    req = _run(_build(from_prefix="/api", to_prefix="/v2"), "/api/x?q=1&r=2")
    assert req.path == "/v2/x" and req.query == "q=1&r=2"
    assert req.target == "/v2/x?q=1&r=2"
    assert req.target_changed() and req.original_target == "/api/x?q=1&r=2"


def test_untouched_request_is_not_marked_changed():
    req = _run(_build(from_prefix="/api", to_prefix="/v2"), "/other?x")
    assert not req.target_changed()


def test_percent_encoding_is_kept():
    req = _run(_build(from_prefix="/api", to_prefix="/v2"), "/api/a%2Fb")
    assert req.path == "/v2/a%2Fb"
