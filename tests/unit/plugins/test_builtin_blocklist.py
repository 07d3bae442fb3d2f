"""``blocklist``: listed hosts (exact or ``*.suffix``) and path prefixes get a local answer."""

from __future__ import annotations

import msgspec
import pytest

from dispa.plugins.api import BuildContext, Headers, Request, Response
from dispa.plugins.builtin import BUILTIN_FILTERS, Blocklist


def _build(**cfg) -> Blocklist:
    return Blocklist.build(msgspec.convert(cfg, Blocklist.Config), BuildContext())


def _req(path="/", host="example.com", header_host=None) -> Request:
    h = Headers([(b"Host", header_host.encode())] if header_host else [])
    return Request("GET", path, h, host=host)


# --------------------------------------------------------------------------- config

def test_type_name_is_the_original_one():
    assert Blocklist.name == "blocklist" and Blocklist in BUILTIN_FILTERS


def test_good_config_and_defaults():
    c = msgspec.convert({"hosts": ["a.com", "*.b.com"], "paths": ["/admin"]}, Blocklist.Config)
    assert c.hosts == ("a.com", "*.b.com") and c.status == 403 and c.body == ""


def test_unknown_key_is_refused():
    with pytest.raises(msgspec.ValidationError, match="unknown field"):
        msgspec.convert({"host": ["a.com"]}, Blocklist.Config)


@pytest.mark.parametrize("cfg", [
    {"status": 200},                 # not an error status
    {"status": 600},
    {"paths": ["admin"]},            # must start with '/'
    {"hosts": ["*"]},
    {"hosts": ["a.*.com"]},
    {"hosts": ["a.com/x"]},
    {"hosts": [""]},
    {"hosts": "a.com"},              # not a list
])
def test_bad_values_are_refused(cfg):
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert(cfg, Blocklist.Config)


# --------------------------------------------------------------------------- behaviour

def test_exact_host_is_blocked_case_insensitively():
    f = _build(hosts=["Bad.Example"])
    r = f.on_request(_req(host="bad.example"))
    assert isinstance(r, Response) and r.status == 403
    assert r.body == b"forbidden\n"
    assert r.headers.get("content-type").startswith("text/plain")
    assert f.on_request(_req(host="good.example")) is None


def test_trailing_dot_host_is_the_same_host():
    f = _build(hosts=["bad.example"])
    assert f.on_request(_req(host="bad.example.")) is not None


def test_wildcard_matches_subdomains_but_not_the_suffix_itself():
    f = _build(hosts=["*.evil.com"])
    assert f.on_request(_req(host="a.evil.com")) is not None
    assert f.on_request(_req(host="a.b.evil.com")) is not None
    assert f.on_request(_req(host="evil.com")) is None
    assert f.on_request(_req(host="notevil.com")) is None


def test_host_header_is_the_fallback_when_req_host_is_empty():
    f = _build(hosts=["bad.example"])
    assert f.on_request(_req(host="", header_host="BAD.example:8080")) is not None
    assert f.on_request(_req(host="", header_host="ok.example")) is None


def test_paths_are_plain_prefixes_as_in_the_original():
    f = _build(paths=["/admin"])
    assert f.on_request(_req("/admin")) is not None
    assert f.on_request(_req("/admin/users")) is not None
    assert f.on_request(_req("/administrator")) is not None       # plain prefix
    assert f.on_request(_req("/public/admin")) is None
    assert f.on_request(_req("/Admin")) is None                   # paths are case-sensitive


def test_the_query_is_not_part_of_the_path():
    f = _build(paths=["/x?debug"])
    assert f.on_request(_req("/x?debug=1")) is None


def test_custom_status_and_body():
    f = _build(paths=["/gone"], status=451, body="unavailable for legal reasons")
    r = f.on_request(_req("/gone/x"))
    assert r.status == 451 and r.body == b"unavailable for legal reasons"


def test_each_answer_is_a_fresh_response():
    f = _build(paths=["/"])
    a, b = f.on_request(_req()), f.on_request(_req())
    assert a is not b and a.headers is not b.headers


def test_empty_lists_block_nothing():
    assert _build().on_request(_req("/admin", host="x")) is None
