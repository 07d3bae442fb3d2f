"""``ratelimiter``: token buckets per key, a bounded key table, 429 with the rate headers.

The clock is injected (``clock=``), so no test sleeps.
"""

from __future__ import annotations

import gc

import msgspec
import pytest

from dispa.plugins.api import BuildContext, Headers, HTTPError, Request
from dispa.plugins.builtin import BUILTIN_FILTERS, RateLimiter
from dispa.plugins.builtin.ratelimiter import MAX_KEY_CHARS


class Clock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def _build(clock=None, name="", **cfg) -> RateLimiter:
    return RateLimiter(msgspec.convert(cfg, RateLimiter.Config),
                       BuildContext(instance_name=name), clock=clock or Clock())


def _req(method="GET", path="/", host="example.com", ip="192.0.2.1", route=None,
         headers=()) -> Request:
    return Request(method, path, Headers([(k.encode(), v.encode()) for k, v in headers]),
                   host=host, client_ip=ip, route=route)


def _allowed(f: RateLimiter, req: Request) -> bool:
    try:
        return f.on_request(req) is None
    except HTTPError as e:
        assert e.status == 429
        return False


# --------------------------------------------------------------------------- config

def test_type_name_is_the_original_one():
    assert RateLimiter.name == "ratelimiter" and RateLimiter in BUILTIN_FILTERS


def test_good_config_and_defaults():
    c = msgspec.convert({}, RateLimiter.Config)
    assert (c.rate_per_sec, c.burst, c.key, c.max_keys) == (10.0, 20, "method_host_path", 10_000)
    c = msgspec.convert({"rate_per_sec": 0.5, "burst": 1, "key": "header:X-Api-Key",
                         "max_keys": 3}, RateLimiter.Config)
    assert c.key == "header:X-Api-Key"


def test_unknown_key_is_refused():
    with pytest.raises(msgspec.ValidationError, match="unknown field"):
        msgspec.convert({"rate": 5}, RateLimiter.Config)


@pytest.mark.parametrize("cfg", [
    {"rate_per_sec": 0}, {"rate_per_sec": -1}, {"burst": 0}, {"max_keys": 0},
    {"key": "ip"}, {"key": "header:"}, {"key": "header:bad name"}, {"burst": 1.5},
])
def test_bad_values_are_refused(cfg):
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert(cfg, RateLimiter.Config)


# --------------------------------------------------------------------------- the bucket

def test_burst_then_refusal_then_refill_at_the_rate():
    clock = Clock()
    f = _build(clock, rate_per_sec=2, burst=3)
    assert [_allowed(f, _req()) for _ in range(4)] == [True, True, True, False]
    clock.t += 0.25                     # half a token
    assert not _allowed(f, _req())
    clock.t += 0.25                     # one token
    assert _allowed(f, _req())
    assert not _allowed(f, _req())
    clock.t += 100                      # refill is capped at burst
    assert [_allowed(f, _req()) for _ in range(4)] == [True, True, True, False]


def test_refusal_carries_retry_after_and_ratelimit_headers():
    clock = Clock()
    f = _build(clock, rate_per_sec=0.5, burst=2)
    f.on_request(_req())
    f.on_request(_req())
    with pytest.raises(HTTPError) as ei:
        f.on_request(_req())
    e = ei.value
    assert e.status == 429
    assert e.headers == {"ratelimit-limit": "2", "ratelimit-remaining": "0",
                         "ratelimit-reset": "4", "retry-after": "2"}
    resp = e.to_response()
    assert resp.status == 429 and resp.headers.get("retry-after") == "2"
    clock.t += 1.0                      # half a token back: one more second to wait
    with pytest.raises(HTTPError) as ei:
        f.on_request(_req())
    assert ei.value.headers["retry-after"] == "1"
    assert ei.value.headers["ratelimit-reset"] == "3"


def test_retry_after_is_at_least_one_second_for_fast_rates():
    f = _build(rate_per_sec=1000, burst=1)
    f.on_request(_req())
    with pytest.raises(HTTPError) as ei:
        f.on_request(_req())
    assert ei.value.headers["retry-after"] == "1"


def test_take_reports_tokens_left():
    f = _build(rate_per_sec=1, burst=3)
    assert f.take("k") == (True, 2.0)
    assert f.headers_for(2.0) == {"ratelimit-limit": "3", "ratelimit-remaining": "2",
                                  "ratelimit-reset": "1"}


# --------------------------------------------------------------------------- keys

def test_default_key_is_method_host_path():
    f = _build(rate_per_sec=1, burst=1)
    assert f.key_of(_req("POST", "/a", "h.example")) == "POST:h.example:/a"
    assert _allowed(f, _req("GET", "/a"))
    assert not _allowed(f, _req("GET", "/a"))
    assert _allowed(f, _req("POST", "/a"))           # other method
    assert _allowed(f, _req("GET", "/b"))            # other path
    assert _allowed(f, _req("GET", "/a", "other"))   # other host
    assert not _allowed(f, _req("GET", "/a?x=1"))    # the query is not part of the key


def test_client_ip_key():
    f = _build(rate_per_sec=1, burst=1, key="client_ip")
    assert _allowed(f, _req(path="/a", ip="10.0.0.1"))
    assert not _allowed(f, _req(path="/b", ip="10.0.0.1"))
    assert _allowed(f, _req(path="/a", ip="10.0.0.2"))


def test_host_key():
    f = _build(rate_per_sec=1, burst=1, key="host")
    assert _allowed(f, _req(path="/a", host="a.example"))
    assert not _allowed(f, _req(path="/b", host="a.example", ip="10.9.9.9"))
    assert _allowed(f, _req(host="b.example"))


def test_route_key():
    f = _build(rate_per_sec=1, burst=1, key="route")
    assert _allowed(f, _req(route="api"))
    assert not _allowed(f, _req(path="/other", route="api"))
    assert _allowed(f, _req(route="static"))


def test_header_key_and_its_client_ip_fallback():
    f = _build(rate_per_sec=1, burst=1, key="header:X-Api-Key")
    assert _allowed(f, _req(headers=[("x-api-key", "k1")], ip="10.0.0.1"))
    assert not _allowed(f, _req(headers=[("X-API-KEY", "k1")], ip="10.0.0.2"))
    assert _allowed(f, _req(headers=[("x-api-key", "k2")], ip="10.0.0.1"))
    # no header: keyed by client IP, not one shared bucket for everyone without it
    assert _allowed(f, _req(ip="10.0.0.3"))
    assert _allowed(f, _req(ip="10.0.0.4"))
    assert not _allowed(f, _req(ip="10.0.0.3"))
    # a header value equal to an IP does not share the IP's bucket
    assert _allowed(f, _req(headers=[("x-api-key", "10.0.0.4")], ip="10.0.0.9"))


def test_long_keys_are_hashed_to_a_fixed_size():
    f = _build(rate_per_sec=1, burst=1)
    long_path = "/" + "a" * (MAX_KEY_CHARS * 10)
    k = f.key_of(_req(path=long_path))
    assert isinstance(k, bytes) and len(k) == 16
    assert f.key_of(_req(path=long_path)) == k
    assert f.key_of(_req(path=long_path + "b")) != k
    assert _allowed(f, _req(path=long_path))
    assert not _allowed(f, _req(path=long_path))


# --------------------------------------------------------------------------- bounded memory

def test_key_table_is_bounded_with_lru_eviction():
    clock = Clock()
    f = _build(clock, rate_per_sec=1, burst=1, key="client_ip", max_keys=3)
    for ip in ("a", "b", "c"):
        assert _allowed(f, _req(ip=ip))
    assert not _allowed(f, _req(ip="a"))          # 'a' is now the most recently used
    assert _allowed(f, _req(ip="d"))              # evicts 'b', the least recently used
    assert f.bucket_count() == 3
    assert not _allowed(f, _req(ip="a"))          # 'a' survived the eviction
    assert not _allowed(f, _req(ip="c"))          # so did 'c'
    assert _allowed(f, _req(ip="b"))              # 'b' came back with a full bucket


def test_a_flood_of_keys_never_grows_the_table_past_max_keys():
    f = _build(rate_per_sec=1, burst=1, key="client_ip", max_keys=100)
    for i in range(10_000):
        f.on_request(_req(ip=f"10.{i >> 8}.{i & 255}.1"))
    assert f.bucket_count() == 100


# --------------------------------------------------------------------------- reloads

def test_buckets_survive_a_rebuild_of_the_same_instance():
    clock = Clock()
    old = _build(clock, name="api-limit", rate_per_sec=1, burst=2)
    old.on_request(_req())
    old.on_request(_req())
    new = _build(clock, name="api-limit", rate_per_sec=1, burst=2)   # the next snapshot
    assert not _allowed(new, _req())
    other = _build(clock, name="other-limit", rate_per_sec=1, burst=2)
    assert _allowed(other, _req())


def test_a_smaller_burst_after_reload_caps_the_old_bucket():
    clock = Clock()
    old = _build(clock, name="l", rate_per_sec=1, burst=10)
    old.on_request(_req())                        # 9 tokens left
    new = _build(clock, name="l", rate_per_sec=1, burst=2)
    assert [_allowed(new, _req()) for _ in range(3)] == [True, True, False]


def test_the_table_is_freed_with_its_last_instance():
    from dispa.plugins.builtin import ratelimiter
    clock = Clock()
    f = _build(clock, name="gone", key="host")
    assert any(k[0] == "gone" for k in ratelimiter._TABLES.keys())
    del f
    gc.collect()
    assert not any(k[0] == "gone" for k in ratelimiter._TABLES.keys())


def test_the_filter_stays_truthy_with_an_empty_table():
    assert bool(_build())
