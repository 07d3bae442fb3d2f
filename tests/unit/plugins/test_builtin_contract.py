"""What every built-in filter promises (STYLE C4), checked over ``BUILTIN_FILTERS``."""

from __future__ import annotations

import inspect

import msgspec
import pytest

from dispa.plugins.api import BuildContext, Filter, Headers, HTTPError, Request, ResponseHead
from dispa.plugins.api import overridden_hooks
from dispa.plugins.builtin import BUILTIN_FILTERS

# the smallest config each filter builds from (most need none)
MINIMAL = {"pathrewrite": {"from_prefix": "/a"}, "hostrewrite": {"host": "b.internal"}}

IDS = [c.name for c in BUILTIN_FILTERS]


def test_names_are_unique_and_keep_the_original_type_strings():
    names = [c.name for c in BUILTIN_FILTERS]
    assert len(set(names)) == len(names)
    assert {"headerinjector", "headeroverride", "blocklist", "pathrewrite", "hostrewrite",
            "ratelimiter"} <= set(names)
    assert set(names) == {"headerinjector", "headeroverride", "blocklist", "pathrewrite",
                          "hostrewrite", "ratelimiter", "cors", "sizelimit", "compression",
                          "requestid"}


@pytest.mark.parametrize("cls", BUILTIN_FILTERS, ids=IDS)
def test_config_is_a_frozen_strict_struct(cls):
    assert issubclass(cls, Filter)
    cfg = cls.Config.__struct_config__
    assert cfg.frozen and cfg.forbid_unknown_fields
    with pytest.raises(msgspec.ValidationError, match="unknown field"):
        msgspec.convert({**MINIMAL.get(cls.name, {}), "no_such_key": 1}, cls.Config)


@pytest.mark.parametrize("cls", BUILTIN_FILTERS, ids=IDS)
def test_builds_from_its_minimal_config_through_the_loader_path(cls):
    config = msgspec.convert(MINIMAL.get(cls.name, {}), cls.Config)
    f = cls.build(config, BuildContext(instance_name=f"{cls.name}-1"))
    assert isinstance(f, cls) and f.config is config and f.instance_name == f"{cls.name}-1"
    assert bool(f)


@pytest.mark.parametrize("cls", BUILTIN_FILTERS, ids=IDS)
def test_hooks_are_sync_and_body_flags_match_the_body_hooks(cls):
    hooks = overridden_hooks(cls)
    assert hooks, "a filter without hooks does nothing"
    for h in hooks:
        assert not inspect.iscoroutinefunction(getattr(cls, h)), h
    assert cls.wants_request_body == ("on_request_body" in hooks)
    assert cls.wants_response_body == ("on_response_body" in hooks)


@pytest.mark.parametrize("cls", BUILTIN_FILTERS, ids=IDS)
def test_instances_do_not_change_while_serving(cls):
    f = cls.build(msgspec.convert(MINIMAL.get(cls.name, {}), cls.Config), BuildContext())
    before = dict(vars(f))
    for _ in range(3):
        req = Request("POST", "/a/b?x=1", Headers([(b"Host", b"h.example"),
                                                   (b"Origin", b"https://o.example"),
                                                   (b"Accept-Encoding", b"gzip")]),
                      host="h.example", client_ip="192.0.2.1", content_length=4)
        try:
            f.on_request(req)
            f.on_request_body(req, b"body", True)
            f.on_upstream_request(req)
            resp = ResponseHead(200, Headers([(b"Content-Type", b"text/plain")]))
            f.on_response(req, resp)
            f.on_response_body(req, resp, b"x" * 1000, True)
            f.on_log(req, 200, None)
        except HTTPError:
            pass
    assert vars(f) == before
