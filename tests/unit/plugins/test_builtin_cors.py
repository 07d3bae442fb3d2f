"""``cors``: preflights answered locally, CORS fields on responses, Fetch-spec credentials
rules, and no reflection of an origin that is not allowed."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import given, settings, strategies as st

from dispa.plugins.api import BuildContext, Headers, Request, Response, ResponseHead
from dispa.plugins.builtin import BUILTIN_FILTERS, Cors

ACAO = "access-control-allow-origin"
ACAC = "access-control-allow-credentials"


def _build(**cfg) -> Cors:
    return Cors.build(msgspec.convert(cfg, Cors.Config), BuildContext())


def _req(method="GET", origin=None, *extra) -> Request:
    h = [(b"Host", b"api.example.com")]
    if origin is not None:
        h.append((b"Origin", origin.encode()))
    h += [(k.encode(), v.encode()) for k, v in extra]
    return Request(method, "/data", Headers(h), host="api.example.com")


def _preflight(f: Cors, origin: str, method="PUT", headers=None) -> Response | None:
    extra = [("Access-Control-Request-Method", method)]
    if headers is not None:
        extra.append(("Access-Control-Request-Headers", headers))
    return f.on_request(_req("OPTIONS", origin, *extra))


def _respond(f: Cors, req: Request, *fields) -> ResponseHead:
    resp = ResponseHead(200, Headers([(k.encode(), v.encode()) for k, v in fields]))
    assert f.on_response(req, resp) is None
    return resp


# --------------------------------------------------------------------------- config

def test_type_name():
    assert Cors.name == "cors" and Cors in BUILTIN_FILTERS


def test_good_config_and_defaults():
    c = msgspec.convert({}, Cors.Config)
    assert c.allow_origins == ("*",) and not c.allow_credentials and c.max_age is None
    assert "GET" in c.allow_methods
    c = msgspec.convert({"allow_origins": ["https://a.example", "https://*.b.example",
                                           "*.c.example:8443", "null"],
                         "allow_methods": ["GET", "*"], "allow_headers": ["X-Token"],
                         "expose_headers": ["X-Total"], "allow_credentials": True,
                         "max_age": 600}, Cors.Config)
    assert c.max_age == 600


def test_unknown_key_is_refused():
    with pytest.raises(msgspec.ValidationError, match="unknown field"):
        msgspec.convert({"origins": ["*"]}, Cors.Config)


@pytest.mark.parametrize("cfg", [
    {"allow_origins": []},
    {"allow_origins": ["https://a.example/"]},          # trailing slash: not an origin
    {"allow_origins": ["https://a.example/path"]},
    {"allow_origins": ["a.example"]},                    # no scheme, no wildcard
    {"allow_origins": ["https://*"]},
    {"allow_origins": ["https://a.*.example"]},
    {"allow_methods": ["GET POST"]},
    {"allow_headers": ["X-A, X-B"]},
    {"max_age": -1},
    {"max_age": 86401},
    {"allow_credentials": "yes"},
])
def test_bad_values_are_refused(cfg):
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert(cfg, Cors.Config)


# --------------------------------------------------------------------------- origin matching

@pytest.mark.parametrize("patterns,origin,allowed", [
    (["https://a.example"], "https://a.example", True),
    (["https://a.example"], "HTTPS://A.EXAMPLE", True),
    (["https://a.example"], "http://a.example", False),
    (["https://a.example"], "https://a.example:8443", False),
    (["https://a.example"], "https://a.example.evil", False),
    (["https://a.example"], "https://xa.example", False),
    (["https://*.a.example"], "https://x.a.example", True),
    (["https://*.a.example"], "https://x.y.a.example", True),
    (["https://*.a.example"], "https://a.example", False),       # not the suffix itself
    (["https://*.a.example"], "https://xa.example", False),      # label boundary
    (["https://*.a.example"], "http://x.a.example", False),      # scheme bound
    (["https://*.a.example"], "https://x.a.example:444", False),  # port bound
    (["*.a.example"], "http://x.a.example", True),
    (["*.a.example"], "https://x.a.example", True),
    (["*.a.example"], "ftp://x.a.example", False),
    (["*.a.example:8443"], "https://x.a.example:8443", True),
    (["*"], "https://anything.example", True),
    (["*"], "null", False),                                       # Rule 3
    (["null"], "null", True),
    (["*"], "not an origin", False),
])
def test_origin_matching(patterns, origin, allowed):
    assert _build(allow_origins=patterns).origin_allowed(origin) is allowed


# --------------------------------------------------------------------------- preflight

def test_preflight_for_allowed_origin_is_answered_with_204():
    f = _build(allow_origins=["https://app.example"], allow_methods=["GET", "PUT"],
               allow_headers=["X-Token", "Content-Type"], max_age=600)
    r = _preflight(f, "https://app.example", "PUT", "x-token")
    assert isinstance(r, Response) and r.status == 204 and r.body == b""
    h = r.headers
    assert h.get(ACAO) == "https://app.example"
    assert h.get("access-control-allow-methods") == "GET, PUT"
    assert h.get("access-control-allow-headers") == "X-Token, Content-Type"
    assert h.get("access-control-max-age") == "600"
    assert ACAC not in h
    assert "Origin" in h.get("vary")


def test_preflight_for_other_origin_gets_no_cors_fields():
    f = _build(allow_origins=["https://app.example"])
    r = _preflight(f, "https://evil.example")
    assert r is not None and r.status == 204
    assert not any(k.lower().startswith("access-control-") for k in r.headers.keys())
    assert "https://evil.example" not in repr(r.headers)


def test_preflight_with_any_origin_and_no_credentials_says_star():
    r = _preflight(_build(), "https://x.example")
    assert r.headers.get(ACAO) == "*"


def test_plain_options_requests_go_upstream():
    f = _build()
    assert f.on_request(_req("OPTIONS", "https://x.example")) is None        # no ACRM
    assert f.on_request(_req("OPTIONS", None, ("Access-Control-Request-Method", "GET"))) is None
    assert f.on_request(_req("GET", "https://x.example",
                             ("Access-Control-Request-Method", "GET"))) is None


def test_no_max_age_field_when_unset():
    assert "access-control-max-age" not in _preflight(_build(), "https://x.example").headers


# --------------------------------------------------------------------------- credentials (Rule 2)

def test_credentials_with_any_origin_reflect_the_exact_origin():
    f = _build(allow_origins=["*"], allow_credentials=True)
    r = _preflight(f, "https://app.example")
    assert r.headers.get(ACAO) == "https://app.example"
    assert r.headers.get(ACAC) == "true"
    resp = _respond(f, _req("GET", "https://app.example"))
    assert resp.headers.get(ACAO) == "https://app.example"
    assert resp.headers.get(ACAC) == "true"
    assert "Origin" in resp.headers.get("vary")


def test_credentials_with_star_methods_and_headers_reflect_the_request():
    f = _build(allow_methods=["*"], allow_headers=["*"], allow_credentials=True)
    r = _preflight(f, "https://app.example", "PURGE", "X-A, x-b ,bad header")
    assert r.headers.get("access-control-allow-methods") == "PURGE"
    assert r.headers.get("access-control-allow-headers") == "X-A, x-b"


def test_without_credentials_star_methods_and_headers_are_literal():
    f = _build(allow_methods=["*"], allow_headers=["*", "Authorization"])
    r = _preflight(f, "https://app.example", "PURGE", "X-A")
    assert r.headers.get("access-control-allow-methods") == "*"
    assert r.headers.get("access-control-allow-headers") == "*, Authorization"


def test_credentials_with_star_expose_lists_the_response_fields():
    f = _build(expose_headers=["*"], allow_credentials=True)
    resp = _respond(f, _req("GET", "https://a.example"), ("X-Total", "5"),
                    ("Content-Type", "text/plain"))
    assert resp.headers.get("access-control-expose-headers") == "x-total"


def test_null_origin_is_never_reflected_by_a_wildcard_even_with_credentials():
    f = _build(allow_origins=["*"], allow_credentials=True)
    r = _preflight(f, "null")
    assert ACAO not in r.headers
    assert ACAO not in _respond(f, _req("GET", "null")).headers


# --------------------------------------------------------------------------- normal responses

def test_allowed_origin_gets_fields_and_vary():
    f = _build(allow_origins=["https://app.example"], expose_headers=["X-Total", "ETag"])
    resp = _respond(f, _req("GET", "https://app.example"), ("Vary", "Accept-Encoding"))
    h = resp.headers
    assert h.get(ACAO) == "https://app.example"
    assert h.get("access-control-expose-headers") == "X-Total, ETag"
    assert h.get("vary") == "Accept-Encoding, Origin"


def test_other_origin_gets_vary_but_nothing_reflected():
    f = _build(allow_origins=["https://app.example"])
    resp = _respond(f, _req("GET", "https://evil.example"))
    assert ACAO not in resp.headers and resp.headers.get("vary") == "Origin"


def test_upstream_cors_fields_are_replaced_never_leaked():
    f = _build(allow_origins=["https://app.example"])
    upstream = [(ACAO, "https://evil.example"), (ACAC, "true"),
                ("Access-Control-Expose-Headers", "Secret")]
    resp = _respond(f, _req("GET", "https://evil.example"), *upstream)
    assert ACAO not in resp.headers and ACAC not in resp.headers
    assert "access-control-expose-headers" not in resp.headers
    resp = _respond(f, _req("GET", "https://app.example"), *upstream)
    assert resp.headers.get_all(ACAO) == ["https://app.example"]


def test_request_without_origin_gets_only_vary():
    resp = _respond(_build(), _req("GET"))
    assert ACAO not in resp.headers and resp.headers.get("vary") == "Origin"


def test_vary_star_is_left_alone_and_vary_origin_not_duplicated():
    f = _build()
    assert _respond(f, _req("GET", "https://a.example"), ("Vary", "*")).headers.get_all(
        "vary") == ["*"]
    assert _respond(f, _req("GET"), ("vary", "origin")).headers.get_all("vary") == ["origin"]


def test_any_origin_without_credentials_sends_star_on_responses():
    resp = _respond(_build(), _req("GET", "https://a.example"))
    assert resp.headers.get(ACAO) == "*" and ACAC not in resp.headers


# --------------------------------------------------------------------------- never reflects


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=60))
def test_arbitrary_origins_are_reflected_only_when_allowed(origin):
    f = _build(allow_origins=["https://app.example", "https://*.ok.example"],
               allow_credentials=True)
    resp = _respond(f, _req("GET", origin.strip() or "x"))
    acao = resp.headers.get(ACAO)
    assert acao is None or acao.lower() == "https://app.example" or (
        acao.lower().startswith("https://") and acao.lower().endswith(".ok.example"))
