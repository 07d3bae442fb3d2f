"""dispa/cache/filter.py: the hooks driven in the proxy's order with real Request and
ResponseHead objects (on_request → upstream → on_response → on_response_body… → on_log), a
fake clock and a fake origin that records what reached it."""

from __future__ import annotations

import asyncio
from collections import Counter

import msgspec
import pytest

from dispa.cache import CacheConfig, CacheFilter
from dispa.cache.policy import format_http_date
from dispa.plugins.api import BuildContext, Headers, Request, Response, ResponseHead

T0 = 1_700_000_000.0


class Clock:
    def __init__(self, t: float = T0):
        self.t = t

    def __call__(self) -> float:
        return self.t


class Metrics:
    def __init__(self):
        self.counters: Counter = Counter()

    def inc(self, name, labels=(), value=1):
        self.counters[(name, labels)] += value


class Origin:
    """Answers with ``handler(req) -> (status, [(name, value)], body)``; remembers requests."""

    def __init__(self, handler=None):
        self.handler = handler or (lambda req: (200, [("Cache-Control", "max-age=60")], b"hi"))
        self.seen: list[dict] = []

    def __call__(self, req: Request):
        self.seen.append({"method": req.method, "target": req.target,
                          "headers": dict((k.lower(), v) for k, v in req.headers.items())})
        return self.handler(req)

    @property
    def calls(self) -> int:
        return len(self.seen)


class Result:
    def __init__(self, source, status, headers: Headers, body: bytes):
        self.source = source  # "cache" (answered in on_request/on_response) or "upstream"
        self.status = status
        self.headers = headers
        self.body = body

    @property
    def xcache(self):
        return self.headers.get("x-cache")

    def __repr__(self):
        return f"<Result {self.source} {self.status} {self.xcache} {self.body!r}>"


def make(clock=None, metrics=None, name="", worker_id=0, **cfg) -> CacheFilter:
    config = msgspec.convert(cfg, CacheConfig)
    f = CacheFilter.build(config, BuildContext(metrics=metrics, instance_name=name,
                                               worker_id=worker_id))
    f.clock = clock or Clock()
    return f


def request(path="/a", method="GET", headers=(), host="example.com", **kw) -> Request:
    h = Headers([(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers])
    return Request(method, path, h, host=host, **kw)


def split(body: bytes) -> list[bytes]:
    if not body:
        return [b""]
    mid = max(1, len(body) // 2)
    return [body[:mid], body[mid:]] if len(body) > 1 else [body]


async def upstream_half(f: CacheFilter, req: Request, origin: Origin, *, fail: bool = False,
                        seen_chunks: list | None = None) -> Result:
    """What the proxy does after on_request returned None."""
    if fail:
        f.on_log(req, 0, "connect refused")
        return Result("error", 0, Headers(), b"")
    status, pairs, body = origin(req)
    head = ResponseHead(status, Headers([(k.encode("latin-1"), v.encode("latin-1"))
                                         for k, v in pairs]))
    replaced = f.on_response(req, head)
    if replaced is not None:
        f.on_log(req, replaced.status, None)
        return Result("cache", replaced.status, replaced.headers, replaced.body)
    out = []
    chunks = split(body)
    for i, c in enumerate(chunks):
        passed = f.on_response_body(req, head, c, i == len(chunks) - 1)
        out.append(passed)
        if seen_chunks is not None:
            seen_chunks.append((c, passed))
    f.on_log(req, status, None)
    return Result("upstream", status, head.headers, b"".join(out))


async def exchange(f: CacheFilter, req: Request, origin: Origin, **kw) -> Result:
    r = await f.on_request(req)
    if r is not None:
        f.on_log(req, r.status, None)
        return Result("cache", r.status, r.headers, r.body)
    return await upstream_half(f, req, origin, **kw)


def run(coro):
    return asyncio.run(coro)


def go(f, origin, *reqs, **kw) -> list[Result]:
    async def main():
        return [await exchange(f, r, origin, **kw) for r in reqs]
    return run(main())


def one(f, origin, req=None, **kw) -> Result:
    return go(f, origin, req or request(), **kw)[0]


# -- config -----------------------------------------------------------------------------------

class TestConfig:
    def test_defaults(self):
        c = CacheConfig()
        assert c.max_bytes == 64 * 1024 * 1024 and c.max_entry_bytes == 8 * 1024 * 1024
        assert c.key == ("method", "scheme", "host", "path", "query")
        assert c.status_header == "x-cache" and c.coalesce_timeout == 10
        assert c.default_ttl == 0 and c.cache_heuristic and not c.cache_set_cookie
        assert c.disk_path is None

    def test_unknown_keys_and_negative_sizes_are_refused(self):
        with pytest.raises(msgspec.ValidationError):
            msgspec.convert({"max_size": 1}, CacheConfig)
        with pytest.raises(msgspec.ValidationError):
            msgspec.convert({"max_bytes": -1}, CacheConfig)

    @pytest.mark.parametrize("key", [[], ["path", "nope"], ["header:"], ["cookie"]])
    def test_bad_key_template(self, key):
        with pytest.raises(ValueError):
            make(key=key)

    def test_bad_status_header_name(self):
        with pytest.raises(ValueError):
            make(status_header="x cache")

    def test_entry_larger_than_every_budget(self):
        with pytest.raises(ValueError):
            make(max_bytes=100, max_entry_bytes=200)

    def test_filter_identity(self):
        assert CacheFilter.name == "cache" and CacheFilter.wants_response_body
        assert CacheFilter.Config is CacheConfig


# -- hit / miss ---------------------------------------------------------------------------------

class TestHitMiss:
    def test_miss_then_hit_with_age(self):
        clock, m = Clock(), Metrics()
        f, o = make(clock, m), Origin()
        first = one(f, o)
        assert first.source == "upstream" and first.xcache == "MISS" and first.body == b"hi"
        clock.t += 7
        hit = one(f, o)
        assert hit.source == "cache" and hit.status == 200 and hit.body == b"hi"
        assert hit.xcache == "HIT" and hit.headers.get("age") == "7"
        assert hit.headers.get("cache-control") == "max-age=60"
        assert o.calls == 1
        assert (f.hits, f.misses, f.stored) == (1, 1, 1)
        assert m.counters[("dispa_cache_requests_total", (("result", "hit"),))] == 1
        assert m.counters[("dispa_cache_requests_total", (("result", "miss"),))] == 1
        assert m.counters[("dispa_cache_stored_total", ())] == 1

    def test_served_response_has_no_framing_and_no_stale_status_header(self):
        o = Origin(lambda r: (200, [("Cache-Control", "max-age=60"), ("Content-Length", "2"),
                                    ("Connection", "keep-alive")], b"hi"))
        f = make()
        _, hit = go(f, o, request(), request())
        names = [k.lower() for k in hit.headers.keys()]
        assert "content-length" not in names and "connection" not in names
        assert names.count("x-cache") == 1 and hit.xcache == "HIT"

    def test_date_is_added_when_the_origin_sent_none(self):
        f = make()
        _, hit = go(f, Origin(), request(), request())
        assert hit.headers.get("date") == format_http_date(T0)

    def test_expired_entry_without_validators_is_refetched(self):
        clock = Clock()
        f, o = make(clock), Origin()
        one(f, o)
        clock.t += 61
        r = one(f, o)
        assert r.source == "upstream" and r.xcache == "EXPIRED"
        assert "if-none-match" not in o.seen[-1]["headers"]
        assert f.expired == 1 and o.calls == 2
        assert one(f, o).xcache == "HIT"

    def test_head_is_answered_from_a_get_entry(self):
        f, o = make(), Origin()
        one(f, o)
        r = one(f, o, request(method="HEAD"))
        assert r.source == "cache" and r.xcache == "HIT" and r.body == b"hi"

    def test_head_miss_is_not_stored(self):
        f, o = make(), Origin()
        one(f, o, request(method="HEAD"))
        assert len(f.store) == 0
        assert one(f, o).xcache == "MISS"

    def test_default_ttl_and_heuristic(self):
        lm = format_http_date(T0 - 1000)
        o = Origin(lambda r: (200, [("Date", format_http_date(T0)), ("Last-Modified", lm)],
                              b"x"))
        clock = Clock()
        f = make(clock)
        one(f, o)
        clock.t += 99
        assert one(f, o).xcache == "HIT"          # 10% of 1000 s
        clock2 = Clock()
        g = make(clock2, cache_heuristic=False, default_ttl=5)
        one(g, o)
        clock2.t += 4
        assert one(g, o).xcache == "HIT"
        clock2.t += 2
        r = one(g, o)                              # stale; Last-Modified is a validator
        assert "if-modified-since" in o.seen[-1]["headers"]
        assert r.xcache == "EXPIRED" and r.source == "upstream"

    def test_no_freshness_and_no_validator_is_not_stored(self):
        f, o = make(), Origin(lambda r: (200, [], b"x"))
        go(f, o, request(), request())
        assert o.calls == 2 and len(f.store) == 0

    def test_status_header_can_be_renamed_or_disabled(self):
        f, o = make(status_header="cache-status"), Origin()
        _, hit = go(f, o, request(), request())
        assert hit.headers.get("cache-status") == "HIT" and "x-cache" not in hit.headers
        g = make(status_header="")
        first, hit = go(g, o, request(), request())
        assert "x-cache" not in hit.headers and "x-cache" not in first.headers


# -- keys -------------------------------------------------------------------------------------

class TestKeys:
    def test_default_key_distinguishes_query_host_and_scheme(self):
        f, o = make(), Origin()
        go(f, o, request("/a?x=1"), request("/a?x=2"), request("/a?x=1", host="other"),
           request("/a?x=1", scheme="https"))
        assert o.calls == 4
        assert one(f, o, request("/a?x=2")).xcache == "HIT"

    def test_key_text(self):
        f = make(key=["method", "scheme", "host", "path", "query", "header:X-Tenant",
                      "cookie:lang"])
        r = request("/p|q", "HEAD", [("X-Tenant", "a|b%"), ("Cookie", "x=1; lang=fr")])
        r.query = "q=1"
        assert f.key_for(r) == "GET|http|example.com|/p%7Cq|q=1|a%7Cb%25|fr"

    def test_header_and_cookie_parts(self):
        f, o = make(key=["path", "header:x-tenant", "cookie:lang"]), Origin()
        a = [("X-Tenant", "a"), ("Cookie", "lang=fr")]
        go(f, o, request(headers=a), request(headers=[("X-Tenant", "b"), ("Cookie", "lang=fr")]),
           request(headers=[("X-Tenant", "a"), ("Cookie", "lang=en")]))
        assert o.calls == 3
        assert one(f, o, request(headers=a)).xcache == "HIT"

    def test_without_method_in_the_key_head_and_get_share_anyway(self):
        f, o = make(key=["path"]), Origin()
        one(f, o)
        assert one(f, o, request(method="HEAD")).xcache == "HIT"


# -- Vary -------------------------------------------------------------------------------------

def vary_origin():
    def handler(req):
        enc = req.headers.get("accept-encoding") or "identity"
        return 200, [("Cache-Control", "max-age=60"), ("Vary", "Accept-Encoding")], \
            enc.encode()
    return Origin(handler)


class TestVary:
    def test_variants_are_stored_and_selected_separately(self):
        f, o = make(), vary_origin()
        gz, br, none = ([("Accept-Encoding", "gzip")], [("Accept-Encoding", "br")], [])
        go(f, o, request(headers=gz), request(headers=br), request(headers=none))
        assert o.calls == 3
        rs = go(f, o, request(headers=gz), request(headers=br), request(headers=none),
                request(headers=[("accept-encoding", " gzip ")]))
        assert [r.xcache for r in rs] == ["HIT"] * 4
        assert [r.body for r in rs] == [b"gzip", b"br", b"identity", b"gzip"]
        assert o.calls == 3

    def test_vary_star_is_never_stored(self):
        f = make()
        o = Origin(lambda r: (200, [("Cache-Control", "max-age=60"), ("Vary", "*")], b"x"))
        go(f, o, request(), request())
        assert o.calls == 2 and len(f.store) == 0

    def test_a_response_that_stops_varying_replaces_the_variants(self):
        f = make()
        vary = [True]

        def handler(req):
            h = [("Cache-Control", "max-age=60")] + ([("Vary", "Accept")] if vary[0] else [])
            return 200, h, b"v" if vary[0] else b"plain"
        o = Origin(handler)
        go(f, o, request(headers=[("Accept", "a")]), request(headers=[("Accept", "b")]))
        assert len(f.store) == 3  # marker + 2 variants
        vary[0] = False
        f.purge_key(f.key_for(request()))
        one(f, o)
        assert len(f.store) == 1
        assert one(f, o, request(headers=[("Accept", "a")])).body == b"plain"


# -- not storable ----------------------------------------------------------------------------------

class TestNotStored:
    @pytest.mark.parametrize("pairs", [
        [("Cache-Control", "no-store")],
        [("Cache-Control", "private, max-age=60")],
        [("Cache-Control", "max-age=60"), ("Set-Cookie", "sid=1")],
    ])
    def test_each_request_goes_upstream(self, pairs):
        f, o = make(), Origin(lambda r: (200, pairs, b"x"))
        rs = go(f, o, request(), request())
        assert o.calls == 2 and [r.xcache for r in rs] == ["MISS", "MISS"]

    def test_cache_set_cookie_stores_without_the_cookie(self):
        f = make(cache_set_cookie=True)
        o = Origin(lambda r: (200, [("Cache-Control", "max-age=60"), ("Set-Cookie", "sid=1")],
                              b"x"))
        first, hit = go(f, o, request(), request())
        assert first.headers.get("set-cookie") == "sid=1"
        assert hit.xcache == "HIT" and "set-cookie" not in hit.headers

    def test_large_body_passes_through_unchanged_and_is_not_stored(self):
        body = bytes(range(256)) * 40
        f = make(max_entry_bytes=1000)
        o = Origin(lambda r: (200, [("Cache-Control", "max-age=60")], body))
        seen: list = []
        r = one(f, o, seen_chunks=seen)
        assert r.body == body and all(a is b for a, b in seen)
        assert len(f.store) == 0
        assert one(f, o).xcache == "MISS"

    def test_declared_length_over_the_limit_is_not_collected(self):
        f = make(max_entry_bytes=100)
        o = Origin(lambda r: (200, [("Cache-Control", "max-age=60"),
                                    ("Content-Length", "5000")], b"x" * 5000))
        one(f, o)
        assert len(f.store) == 0

    def test_truncated_body_is_not_stored(self):
        f = make()
        o = Origin(lambda r: (200, [("Cache-Control", "max-age=60"), ("Content-Length", "10")],
                              b"short"))
        one(f, o)
        assert len(f.store) == 0

    def test_chunks_are_passed_through_when_collecting(self):
        f, o = make(), Origin(lambda r: (200, [("Cache-Control", "max-age=60")], b"abcdef"))
        seen: list = []
        r = one(f, o, seen_chunks=seen)
        assert r.body == b"abcdef" and all(a is b for a, b in seen)


# -- bypass -------------------------------------------------------------------------------------

class TestBypass:
    @pytest.mark.parametrize("req", [
        request(method="POST"), request(headers=[("Cache-Control", "no-store")]),
        request(headers=[("Authorization", "Bearer t")]), request(headers=[("Range", "bytes=0-")]),
        request(headers=[("Upgrade", "websocket")]), request(content_length=3),
    ])
    def test_bypassed_requests_go_upstream_and_are_labelled(self, req):
        f, o = make(), Origin()
        one(f, o)  # a stored entry exists for GET /a
        r = one(f, o, req)
        assert r.source == "upstream" and r.xcache == "BYPASS" and f.bypass == 1

    def test_unsafe_method_invalidates_the_uri(self):
        f = make()
        o = Origin(lambda r: (200, [("Cache-Control", "max-age=60")], b"x"))
        one(f, o)
        one(f, o, request(method="POST"))
        assert one(f, o).xcache == "MISS"

    def test_failed_unsafe_method_does_not_invalidate(self):
        f = make()
        o = Origin(lambda r: (200 if r.method == "GET" else 500,
                              [("Cache-Control", "max-age=60")], b"x"))
        one(f, o)
        one(f, o, request(method="DELETE"))
        assert one(f, o).xcache == "HIT"

    def test_authorization_response_stored_only_when_public(self):
        f = make()
        auth = [("Authorization", "Basic eDp5")]
        one(f, o := Origin(), request(headers=auth))
        assert len(f.store) == 0
        pub = Origin(lambda r: (200, [("Cache-Control", "public, max-age=60")], b"pub"))
        one(f, pub, request(headers=auth))
        hit = one(f, pub)
        assert hit.xcache == "HIT" and hit.body == b"pub"
        assert o.calls == 1


# -- conditionals from the client -------------------------------------------------------------

def etag_origin(etag='"v1"', max_age=60, body=b"body"):
    lm = format_http_date(T0 - 3600)

    def handler(req):
        inm = req.headers.get("if-none-match")
        h = [("Cache-Control", f"max-age={max_age}"), ("ETag", etag), ("Last-Modified", lm),
             ("Content-Type", "text/plain")]
        if inm == etag:
            return 304, [("Cache-Control", f"max-age={max_age}"), ("ETag", etag)], b""
        return 200, h, body
    return Origin(handler)


class TestClientConditional:
    def test_matching_if_none_match_is_answered_304_from_cache(self):
        f, o = make(), etag_origin()
        one(f, o)
        r = one(f, o, request(headers=[("If-None-Match", 'W/"v1"')]))
        assert r.source == "cache" and r.status == 304 and r.body == b""
        assert r.headers.get("etag") == '"v1"' and r.xcache == "HIT"
        assert "content-type" not in r.headers and o.calls == 1

    def test_non_matching_if_none_match_gets_the_full_response(self):
        f, o = make(), etag_origin()
        one(f, o)
        r = one(f, o, request(headers=[("If-None-Match", '"v0"')]))
        assert r.status == 200 and r.body == b"body"

    def test_if_modified_since(self):
        f, o = make(), etag_origin()
        one(f, o)
        r = one(f, o, request(headers=[("If-Modified-Since", format_http_date(T0))]))
        assert r.status == 304
        r = one(f, o, request(headers=[("If-Modified-Since", format_http_date(T0 - 7200))]))
        assert r.status == 200

    def test_a_conditional_miss_does_not_fill_but_a_200_is_stored(self):
        f, o = make(), etag_origin()
        r = one(f, o, request(headers=[("If-None-Match", '"v1"')]))
        assert r.source == "upstream" and r.status == 304 and len(f.store) == 0
        r = one(f, o, request(headers=[("If-None-Match", '"old"')]))
        assert r.status == 200 and len(f.store) == 1


# -- revalidation ---------------------------------------------------------------------------------

class TestRevalidation:
    def test_stale_entry_is_validated_with_its_etag_and_updated_by_304(self):
        clock = Clock()
        f, o = make(clock), etag_origin()
        one(f, o)
        clock.t += 61
        r = one(f, o)
        sent = o.seen[-1]["headers"]
        assert sent["if-none-match"] == '"v1"' and "if-modified-since" in sent
        assert r.source == "cache" and r.status == 200 and r.body == b"body"
        assert r.xcache == "REVALIDATED" and r.headers.get("age") == "0"
        assert r.headers.get("content-type") == "text/plain"
        assert f.revalidated == 1
        clock.t += 30
        hit = one(f, o)
        assert hit.xcache == "HIT" and hit.headers.get("age") == "30" and o.calls == 2

    def test_304_headers_are_merged_into_the_stored_response(self):
        clock = Clock()
        state = {"v": 1}

        def handler(req):
            if req.headers.get("if-none-match") == '"e"':
                return 304, [("Cache-Control", "max-age=100"), ("X-Version", str(state["v"]))], b""
            return 200, [("Cache-Control", "max-age=10"), ("ETag", '"e"'),
                         ("X-Version", "0")], b"B"
        f, o = make(clock), Origin(handler)
        one(f, o)
        clock.t += 11
        r = one(f, o)
        assert r.headers.get("x-version") == "1" and r.headers.get("cache-control") == \
            "max-age=100"
        clock.t += 99
        assert one(f, o).xcache == "HIT"

    def test_clients_conditional_is_answered_after_revalidation(self):
        clock = Clock()
        f, o = make(clock), etag_origin()
        one(f, o)
        clock.t += 61
        r = one(f, o, request(headers=[("If-None-Match", '"v1"')]))
        assert o.seen[-1]["headers"]["if-none-match"] == '"v1"'
        assert r.status == 304 and r.xcache == "REVALIDATED"
        clock.t += 61
        r = one(f, o, request(headers=[("If-None-Match", '"zzz"')]))
        assert o.seen[-1]["headers"]["if-none-match"] == '"v1"'  # ours, not the client's
        assert r.status == 200 and r.body == b"body"

    def test_changed_resource_replaces_the_entry(self):
        clock = Clock()
        f = make(clock)
        one(f, etag_origin('"v1"', body=b"old"))
        clock.t += 61
        r = one(f, etag_origin('"v2"', body=b"new"))
        assert r.source == "upstream" and r.xcache == "EXPIRED" and r.body == b"new"
        assert one(f, Origin()).body == b"new"

    def test_client_no_cache_revalidates_a_fresh_entry(self):
        f, o = make(), etag_origin()
        one(f, o)
        r = one(f, o, request(headers=[("Cache-Control", "no-cache")]))
        assert o.calls == 2 and r.xcache == "REVALIDATED"

    def test_response_no_cache_is_revalidated_every_time(self):
        o = Origin(lambda r: (304, [], b"") if r.headers.get("if-none-match") == '"n"'
                   else (200, [("Cache-Control", "no-cache"), ("ETag", '"n"')], b"nc"))
        f = make()
        rs = go(f, o, request(), request(), request())
        assert [r.xcache for r in rs] == ["MISS", "REVALIDATED", "REVALIDATED"]
        assert rs[-1].body == b"nc" and o.calls == 3

    def test_request_max_age_and_max_stale(self):
        clock = Clock()
        f, o = make(clock), etag_origin()
        one(f, o)
        clock.t += 20
        r = one(f, o, request(headers=[("Cache-Control", "max-age=10")]))
        assert r.xcache == "REVALIDATED"
        clock.t += 70  # 70 s after the revalidation: stale by 10
        r = one(f, o, request(headers=[("Cache-Control", "max-stale=15")]))
        assert r.xcache == "STALE" and r.source == "cache"
        assert f.stale == 1

    def test_304_with_another_etag_does_not_update_the_store(self):
        clock = Clock()
        o = Origin(lambda r: (304, [("ETag", '"other"')], b"")
                   if r.headers.get("if-none-match") else
                   (200, [("Cache-Control", "max-age=1"), ("ETag", '"e"')], b"B"))
        f = make(clock)
        one(f, o)
        clock.t += 5
        r = one(f, o)
        assert r.body == b"B" and len(f.store) == 0


# -- only-if-cached ---------------------------------------------------------------------------

class TestOnlyIfCached:
    def test_504_when_nothing_is_stored(self):
        f, o = make(), Origin()
        r = one(f, o, request(headers=[("Cache-Control", "only-if-cached")]))
        assert r.status == 504 and r.source == "cache" and o.calls == 0

    def test_fresh_entry_is_served(self):
        f, o = make(), Origin()
        one(f, o)
        r = one(f, o, request(headers=[("Cache-Control", "only-if-cached")]))
        assert r.status == 200 and r.xcache == "HIT"

    def test_stale_entry_gives_504(self):
        clock = Clock()
        f, o = make(clock), Origin()
        one(f, o)
        clock.t += 100
        r = one(f, o, request(headers=[("Cache-Control", "only-if-cached")]))
        assert r.status == 504 and o.calls == 1


# -- stale-if-error ---------------------------------------------------------------------------

class TestStaleIfError:
    def flaky(self, cc):
        state = {"down": False}

        def handler(req):
            if state["down"]:
                return 503, [("Content-Type", "text/plain")], b"down"
            return 200, [("Cache-Control", cc)], b"good"
        return Origin(handler), state

    def test_stale_entry_replaces_a_5xx_within_the_window(self):
        clock = Clock()
        o, state = self.flaky("max-age=10, stale-if-error=60")
        f = make(clock)
        one(f, o)
        clock.t += 30
        state["down"] = True
        r = one(f, o)
        assert r.status == 200 and r.body == b"good" and r.xcache == "STALE"
        clock.t += 41  # stale by 61 s
        r = one(f, o)
        assert r.status == 503 and r.body == b"down"

    def test_without_the_directive_the_error_passes(self):
        clock = Clock()
        o, state = self.flaky("max-age=10")
        f = make(clock)
        one(f, o)
        clock.t += 30
        state["down"] = True
        r = one(f, o)
        assert r.status == 503 and r.xcache == "EXPIRED"
        assert len(f.store) == 1  # an error does not evict the stale copy

    def test_request_stale_if_error(self):
        clock = Clock()
        o, state = self.flaky("max-age=10")
        f = make(clock)
        one(f, o)
        clock.t += 30
        state["down"] = True
        r = one(f, o, request(headers=[("Cache-Control", "stale-if-error=60")]))
        assert r.status == 200 and r.xcache == "STALE"


# -- stale-while-revalidate -------------------------------------------------------------------

class TestStaleWhileRevalidate:
    def test_one_request_pays_the_revalidation_others_are_served_stale(self):
        clock = Clock()
        f, o = make(clock), etag_origin(max_age=10)
        o.handler = _with_swr(o.handler)
        one(f, o)
        clock.t += 15

        async def main():
            a = await exchange(f, request(), o)           # stale: flag raised
            assert a.xcache == "STALE" and o.calls == 1
            b_req = request()
            assert await f.on_request(b_req) is None       # b claims the revalidation
            assert o.calls == 1
            c = await exchange(f, request(), o)           # concurrent: still STALE
            assert c.xcache == "STALE"
            b = await upstream_half(f, b_req, o)
            assert b.xcache == "REVALIDATED" and o.seen[-1]["headers"]["if-none-match"]
            d = await exchange(f, request(), o)
            assert d.xcache == "HIT"
            return o.calls
        assert run(main()) == 2
        assert f.stale == 2 and f.revalidated == 1

    def test_a_failed_revalidation_lets_a_later_request_try_again(self):
        clock = Clock()
        f, o = make(clock), etag_origin(max_age=10)
        o.handler = _with_swr(o.handler)
        one(f, o)
        clock.t += 15

        async def main():
            assert (await exchange(f, request(), o)).xcache == "STALE"
            await exchange(f, request(), o, fail=True)     # the claimant fails
            assert (await exchange(f, request(), o)).xcache == "STALE"
            r = await exchange(f, request(), o)
            assert r.xcache == "REVALIDATED"
        run(main())

    def test_outside_the_window_the_request_revalidates_itself(self):
        clock = Clock()
        f, o = make(clock), etag_origin(max_age=10)
        o.handler = _with_swr(o.handler)
        one(f, o)
        clock.t += 10 + 31
        assert one(f, o).xcache == "REVALIDATED"


def _with_swr(handler):
    def wrapped(req):
        status, h, body = handler(req)
        h = [(k, v + ", stale-while-revalidate=30" if k == "Cache-Control" else v)
             for k, v in h]
        return status, h, body
    return wrapped


# -- coalescing ---------------------------------------------------------------------------------

def _loop_factories():
    out = [pytest.param(asyncio.new_event_loop, id="asyncio")]
    try:
        import uvloop
        out.append(pytest.param(uvloop.new_event_loop, id="uvloop"))
    except ImportError:  # pragma: no cover
        pass
    return out


class TestCoalescing:
    @pytest.mark.parametrize("loop_factory", _loop_factories())
    def test_concurrent_misses_one_goes_upstream_others_get_the_stored_response(self,
                                                                               loop_factory):
        f, o = make(), Origin()
        n = 8

        async def main():
            reqs = [request() for _ in range(n)]
            tasks = [asyncio.ensure_future(f.on_request(r)) for r in reqs]
            await asyncio.sleep(0)
            await asyncio.sleep(0)
            done = [t for t in tasks if t.done()]
            assert len(done) == 1 and done[0].result() is None
            filler = reqs[tasks.index(done[0])]
            assert len(f._inflight) == 1
            await upstream_half(f, filler, o)
            results = await asyncio.gather(*tasks)
            served = [r for r in results if r is not None]
            assert len(served) == n - 1
            assert all(r.status == 200 and r.body == b"hi" and
                       r.headers.get("x-cache") == "HIT" for r in served)
            for r, resp in zip(reqs, results):
                if resp is not None:
                    f.on_log(r, resp.status, None)
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            runner.run(main())
        assert o.calls == 1 and f.coalesced == n - 1 and f.misses == 1
        assert not f._inflight

    def test_a_failed_filler_releases_the_waiters_upstream(self):
        f = make()

        async def main():
            reqs = [request() for _ in range(4)]
            tasks = [asyncio.ensure_future(f.on_request(r)) for r in reqs]
            await asyncio.sleep(0)
            filler = next(r for r, t in zip(reqs, tasks) if t.done())
            f.on_log(filler, 0, "upstream reset")          # failed before any response
            results = await asyncio.wait_for(asyncio.gather(*tasks), 1)
            assert results == [None] * 4
            # released waiters go upstream; the first of them fills for the next ones
            assert len(f._inflight) == 1
            for r in reqs[1:]:
                f.on_log(r, 0, "upstream reset")
        run(main())
        assert not f._inflight

    def test_an_unstorable_fill_releases_the_waiters_at_the_response_head(self):
        f = make()

        async def main():
            reqs = [request() for _ in range(3)]
            tasks = [asyncio.ensure_future(f.on_request(r)) for r in reqs]
            await asyncio.sleep(0)
            filler = next(r for r, t in zip(reqs, tasks) if t.done())
            head = ResponseHead(200, Headers([(b"Cache-Control", b"no-store")]))
            assert f.on_response(filler, head) is None
            results = await asyncio.wait_for(asyncio.gather(*tasks), 1)
            assert results == [None] * 3                   # before the body even started
            f.on_response_body(filler, head, b"x", True)
            f.on_log(filler, 200, None)
        run(main())

    def test_waiters_stop_waiting_after_coalesce_timeout(self):
        f = make(coalesce_timeout=0.05)

        async def main():
            reqs = [request() for _ in range(3)]
            tasks = [asyncio.ensure_future(f.on_request(r)) for r in reqs]
            await asyncio.sleep(0)
            (first_fill,) = f._inflight.values()
            results = await asyncio.wait_for(asyncio.gather(*tasks), 2)
            assert results == [None] * 3
            # the overrunning fill no longer captures new misses: a released waiter fills
            (new_fill,) = f._inflight.values()
            assert new_fill is not first_fill and not first_fill.done()
            for r in reqs:
                f.on_log(r, 0, "timeout")
            assert first_fill.done() and not f._inflight
        run(main())

    def test_coalesce_timeout_zero_disables_waiting(self):
        f = make(coalesce_timeout=0)

        async def main():
            reqs = [request() for _ in range(3)]
            results = await asyncio.gather(*(f.on_request(r) for r in reqs))
            assert results == [None] * 3
        run(main())

    def test_waiter_with_another_variant_goes_upstream(self):
        f, o = make(), vary_origin()

        async def main():
            a, b = request(headers=[("Accept-Encoding", "gzip")]), \
                request(headers=[("Accept-Encoding", "br")])
            ta = asyncio.ensure_future(f.on_request(a))
            tb = asyncio.ensure_future(f.on_request(b))
            await asyncio.sleep(0)
            assert ta.done() and not tb.done()
            await upstream_half(f, a, o)
            assert await tb is None                        # gzip variant does not fit br
            r = await upstream_half(f, b, o)
            assert r.body == b"br"
        run(main())
        assert o.calls == 2

    def test_concurrent_stale_validations_coalesce(self):
        clock = Clock()
        f, o = make(clock), etag_origin(max_age=10)
        one(f, o)
        clock.t += 20

        async def main():
            reqs = [request() for _ in range(3)]
            tasks = [asyncio.ensure_future(f.on_request(r)) for r in reqs]
            await asyncio.sleep(0)
            filler = next(r for r, t in zip(reqs, tasks) if t.done())
            r = await upstream_half(f, filler, o)
            assert r.xcache == "REVALIDATED"
            results = await asyncio.gather(*tasks)
            assert sum(x is not None and x.headers.get("x-cache") == "HIT"
                       for x in results) == 2
        run(main())
        assert o.calls == 2

    def test_client_forced_validation_does_not_wait(self):
        f = make()

        async def main():
            t1 = asyncio.ensure_future(f.on_request(request()))
            await asyncio.sleep(0)
            assert t1.done()
            forced = request(headers=[("Cache-Control", "no-cache")])
            assert await asyncio.wait_for(f.on_request(forced), 1) is None
        run(main())


# -- purge, counters, persistence -----------------------------------------------------------

class TestPurge:
    def test_purge_prefix_and_key(self):
        f, o = make(), Origin()
        go(f, o, request("/img/a"), request("/img/b"), request("/css/c"))
        assert f.purge("GET|http|example.com|/img/") == 2
        assert one(f, o, request("/img/a")).xcache == "MISS"
        assert f.purge_key(f.key_for(request("/css/c"))) == 1
        assert f.purge_key("nope") == 0
        assert f.purge("") == 1 and len(f.store) == 0

    def test_purge_key_removes_vary_variants(self):
        f, o = make(), vary_origin()
        go(f, o, request(headers=[("Accept-Encoding", "gzip")]),
           request(headers=[("Accept-Encoding", "br")]))
        assert f.purge_key(f.key_for(request())) == 3
        assert len(f.store) == 0


class TestCountersAndStore:
    def test_evictions_are_counted(self):
        m = Metrics()
        f = make(metrics=m, max_bytes=400, max_entry_bytes=400)
        o = Origin(lambda r: (200, [("Cache-Control", "max-age=60")], b"x" * 100))
        go(f, o, *[request(f"/{i}") for i in range(6)])
        assert f.evictions > 0 and f.store.size_bytes <= 400
        assert m.counters[("dispa_cache_evictions_total", ())] == f.evictions
        s = f.stats()
        assert s["evictions"] == f.evictions and s["entries"] == len(f.store)

    def test_every_request_is_counted_once(self):
        m = Metrics()
        f, o = make(metrics=m), Origin()
        go(f, o, request(), request(), request(method="POST"))
        one(f, o, request("/x"), fail=True)
        total = sum(v for (n, _), v in m.counters.items() if n == "dispa_cache_requests_total")
        assert total == 4 and f.misses == 2 and f.hits == 1 and f.bypass == 1

    def test_disk_tier_survives_a_new_instance(self, tmp_path):
        o = Origin()
        f = make(disk_path=str(tmp_path / "c"), disk_max_bytes=1 << 20)
        one(f, o)
        g = make(disk_path=str(tmp_path / "c"), disk_max_bytes=1 << 20)
        r = one(g, o)
        assert r.xcache == "HIT" and o.calls == 1

    def test_disk_path_worker_placeholder(self, tmp_path):
        f = make(disk_path=str(tmp_path / "w{worker_id}"), worker_id=3)
        one(f, Origin())
        assert (tmp_path / "w3").is_dir() and len(list((tmp_path / "w3").iterdir())) == 1

    def test_unusable_disk_path_is_a_build_error(self, tmp_path):
        (tmp_path / "file").write_text("x")
        with pytest.raises(ValueError):
            make(disk_path=str(tmp_path / "file" / "sub"))

    def test_a_reloaded_named_instance_keeps_its_store(self):
        o = Origin()
        f = make(name="edge-cache")
        one(f, o)
        g = make(name="edge-cache")                     # same settings: same store
        assert one(g, o).xcache == "HIT"
        h = make(name="edge-cache", max_bytes=1 << 24)  # other settings: a new store
        assert one(h, o).xcache == "MISS"
        assert o.calls == 2

    def test_hooks_ignore_requests_they_never_saw(self):
        f = make()
        r = request()
        head = ResponseHead(200, Headers())
        assert f.on_response(r, head) is None
        assert f.on_response_body(r, head, b"x", True) == b"x"
        f.on_log(r, 200, None)

    def test_returned_responses_are_api_responses(self):
        f, o = make(), Origin()
        one(f, o)

        async def main():
            return await f.on_request(request())
        assert isinstance(run(main()), Response)
