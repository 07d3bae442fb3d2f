"""``hostrewrite``: the upstream request carries the configured ``Host``."""

from __future__ import annotations

import msgspec
import pytest

from dispa.plugins.api import BuildContext, Headers, Request, overridden_hooks
from dispa.plugins.builtin import BUILTIN_FILTERS, HostRewrite


def _build(**cfg) -> HostRewrite:
    return HostRewrite.build(msgspec.convert(cfg, HostRewrite.Config), BuildContext())


# --------------------------------------------------------------------------- config

def test_type_name_is_the_original_one():
    assert HostRewrite.name == "hostrewrite" and HostRewrite in BUILTIN_FILTERS


@pytest.mark.parametrize("host", ["backend.internal", "backend.internal:8080", "10.0.0.1",
                                  "10.0.0.1:80", "[::1]", "[2001:db8::1]:443", "svc_a"])
def test_good_hosts(host):
    assert msgspec.convert({"host": host}, HostRewrite.Config).host == host


def test_unknown_key_is_refused():
    with pytest.raises(msgspec.ValidationError, match="unknown field"):
        msgspec.convert({"host": "a", "port": 80}, HostRewrite.Config)


@pytest.mark.parametrize("cfg", [
    {},                                 # required
    {"host": ""},
    {"host": "a b"},
    {"host": "a\r\nX-Injected: 1"},
    {"host": "http://a"},
    {"host": "a/b"},
    {"host": "a:99999"},
    {"host": "a:0"},
    {"host": "user@a"},
    {"host": 5},
])
def test_bad_hosts_are_refused(cfg):
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert(cfg, HostRewrite.Config)


# --------------------------------------------------------------------------- behaviour

def test_runs_in_the_upstream_request_phase_only():
    assert overridden_hooks(HostRewrite) == ("on_upstream_request",)


def test_host_is_replaced_and_routing_host_kept():
    f = _build(host="backend.internal:8080")
    req = Request("GET", "/", Headers([(b"Host", b"www.example.com"), (b"host", b"dup")]),
                  host="www.example.com")
    assert f.on_upstream_request(req) is None
    assert req.headers.get_all("host") == ["backend.internal:8080"]
    assert req.host == "www.example.com"      # the access log keeps the client's host


def test_host_is_added_when_absent():
    f = _build(host="b")
    req = Request("GET", "/", Headers(), version="1.0")
    f.on_upstream_request(req)
    assert req.headers.get("host") == "b"
