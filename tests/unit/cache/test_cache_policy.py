"""dispa/cache/policy.py: the RFC 9111 / RFC 5861 rules, with literal headers and a fake clock."""

from __future__ import annotations

import pytest

from dispa.cache import policy
from dispa.cache.policy import (FRESH, REVALIDATE, STALE_OK, STALE_WHILE_REVALIDATE, assess,
                                client_not_modified, conditional_headers, current_age,
                                format_http_date, freshness_lifetime, headers_to_store,
                                maybe_bypass_reason, maybe_unstorable_reason,
                                merge_not_modified, not_modified_headers, parse_cache_control,
                                parse_delta_seconds, parse_http_date, request_directives,
                                stale_if_error_ok, validators_match, vary_key, vary_names,
                                vary_values, weak_match, worth_storing)
from dispa.plugins.api import Headers

T0 = 1_700_000_000.0  # the fake clock's origin
D0 = format_http_date(T0)


def H(*pairs: tuple[str, str]) -> Headers:
    return Headers([(k.encode("latin-1"), v.encode("latin-1")) for k, v in pairs])


def cc_of(h: Headers) -> dict:
    return policy.response_directives(h)


def life(status: int, *pairs, response_time: float = T0, **kw) -> float:
    h = H(*pairs)
    return freshness_lifetime(status, h, cc_of(h), response_time, **kw)


# -- parsing ----------------------------------------------------------------------------------

class TestParseCacheControl:
    def test_directives_are_lowercased_and_arguments_kept(self):
        assert parse_cache_control(["Max-Age=60, Public"]) == {"max-age": "60", "public": None}

    def test_multiple_field_lines_are_combined(self):
        assert parse_cache_control(["max-age=5", "no-transform"]) == {
            "max-age": "5", "no-transform": None}

    def test_quoted_argument_is_unquoted_and_its_commas_do_not_split(self):
        assert parse_cache_control(['no-cache="set-cookie, x-a", max-age=3']) == {
            "no-cache": "set-cookie, x-a", "max-age": "3"}

    def test_backslash_escape_inside_quotes(self):
        assert parse_cache_control(['ext="a\\"b"']) == {"ext": 'a"b'}

    def test_first_duplicate_wins(self):
        assert parse_cache_control(["max-age=10, max-age=99"])["max-age"] == "10"

    def test_empty_members_and_whitespace_are_ignored(self):
        assert parse_cache_control([" , ,no-store ,, "]) == {"no-store": None}


@pytest.mark.parametrize("value,expected", [
    ("0", 0), ("60", 60), (" 7 ", 7), ("99999999999", policy.DELTA_SECONDS_MAX),
    ("-1", None), ("1.5", None), ("abc", None), ("", None), (None, None), ("１２", None),
])
def test_delta_seconds(value, expected):
    assert parse_delta_seconds(value) == expected


@pytest.mark.parametrize("value", [
    "Sun, 06 Nov 1994 08:49:37 GMT",      # IMF-fixdate
    "Sunday, 06-Nov-94 08:49:37 GMT",     # obsolete RFC 850
    "Sun Nov  6 08:49:37 1994",           # asctime
])
def test_http_date_accepts_the_three_formats(value):
    assert parse_http_date(value) == 784111777.0


@pytest.mark.parametrize("value", ["0", "-1", "garbage", "", None])
def test_invalid_http_date_is_none(value):
    assert parse_http_date(value) is None


def test_format_http_date_round_trips():
    assert format_http_date(784111777) == "Sun, 06 Nov 1994 08:49:37 GMT"
    assert parse_http_date(format_http_date(T0)) == T0


class TestRequestDirectives:
    def test_pragma_no_cache_without_cache_control_means_no_cache(self):
        assert request_directives(H(("Pragma", "no-cache"))) == {"no-cache": None}

    def test_pragma_is_ignored_when_cache_control_is_present(self):
        assert request_directives(H(("Pragma", "no-cache"), ("Cache-Control", "max-age=5"))) \
            == {"max-age": "5"}


# -- bypass and storability ---------------------------------------------------------------------

@pytest.mark.parametrize("method,pairs,body,reason", [
    ("GET", [], False, None),
    ("HEAD", [], False, None),
    ("POST", [], False, "method"),
    ("OPTIONS", [], False, "method"),
    ("GET", [("Cache-Control", "no-store")], False, "no-store"),
    ("GET", [("Authorization", "Bearer x")], False, "authorization"),
    ("GET", [("Range", "bytes=0-1")], False, "range"),
    ("GET", [("Upgrade", "websocket")], False, "upgrade"),
    ("GET", [], True, "body"),
])
def test_bypass_reasons(method, pairs, body, reason):
    h = H(*pairs)
    assert maybe_bypass_reason(method, h, request_directives(h), has_body=body) == reason


def unstorable(status=200, resp=(), req=(), method="GET", **kw):
    rq, rs = H(*req), H(*resp)
    return maybe_unstorable_reason(method, rq, request_directives(rq), status, rs, cc_of(rs),
                                   **kw)


class TestStorable:
    @pytest.mark.parametrize("status", sorted(policy.HEURISTICALLY_CACHEABLE - {206}))
    def test_heuristically_cacheable_statuses_are_storable_without_freshness(self, status):
        assert unstorable(status) is None

    @pytest.mark.parametrize("status", [201, 202, 302, 303, 307, 400, 403, 500, 502, 503])
    def test_other_statuses_need_explicit_freshness(self, status):
        assert unstorable(status) == "not-cacheable"
        assert unstorable(status, [("Cache-Control", "max-age=10")]) is None
        assert unstorable(status, [("Cache-Control", "s-maxage=10")]) is None
        assert unstorable(status, [("Expires", D0)]) is None

    def test_public_makes_any_final_status_storable(self):
        assert unstorable(302, [("Cache-Control", "public")]) is None

    @pytest.mark.parametrize("status", [206, 304, 100])
    def test_partial_not_modified_and_interim_are_never_stored(self, status):
        assert unstorable(status, [("Cache-Control", "max-age=60")]) == "status"

    def test_only_get_responses_are_stored(self):
        assert unstorable(method="HEAD") == "method"
        assert unstorable(method="POST", resp=[("Cache-Control", "max-age=9")]) == "method"

    def test_no_store_in_response_or_request(self):
        assert unstorable(resp=[("Cache-Control", "no-store, max-age=60")]) == "no-store"
        assert unstorable(req=[("Cache-Control", "no-store")]) == "no-store"

    def test_private_is_not_stored_by_a_shared_cache(self):
        assert unstorable(resp=[("Cache-Control", "private, max-age=60")]) == "private"

    def test_qualified_private_is_storable_without_the_named_fields(self):
        assert unstorable(resp=[("Cache-Control", 'private="x-user", max-age=60')]) is None

    @pytest.mark.parametrize("cc,reason", [
        ("max-age=60", "authorization"),
        ("public", None), ("s-maxage=60", None), ("must-revalidate, max-age=60", None),
    ])
    def test_authorization_needs_public_s_maxage_or_must_revalidate(self, cc, reason):
        assert unstorable(resp=[("Cache-Control", cc)],
                          req=[("Authorization", "Basic eDp5")]) == reason

    def test_vary_star_is_never_stored(self):
        assert unstorable(resp=[("Vary", "Accept, *")]) == "vary-star"

    def test_set_cookie_only_when_configured(self):
        assert unstorable(resp=[("Set-Cookie", "a=b")]) == "set-cookie"
        assert unstorable(resp=[("Set-Cookie", "a=b")], cache_set_cookie=True) is None

    def test_worth_storing_needs_lifetime_or_validator(self):
        assert worth_storing(10, H(), {})
        assert worth_storing(0, H(("ETag", '"a"')), {})
        assert worth_storing(0, H(("Last-Modified", D0)), {})
        assert not worth_storing(0, H(), {})


class TestHeadersToStore:
    def test_hop_by_hop_framing_and_connection_listed_fields_are_dropped(self):
        h = H(("Connection", "x-hop"), ("X-Hop", "1"), ("Keep-Alive", "t=5"),
              ("Transfer-Encoding", "chunked"), ("Content-Length", "5"),
              ("Content-Type", "text/plain"), ("Proxy-Authenticate", "Basic"))
        assert headers_to_store(h, {}) == ((b"Content-Type", b"text/plain"),)

    def test_qualified_no_cache_and_private_fields_are_dropped(self):
        h = H(("Cache-Control", 'no-cache="X-A", private="x-b"'), ("X-A", "1"), ("X-B", "2"),
              ("X-C", "3"))
        kept = [k for k, _ in headers_to_store(h, cc_of(h))]
        assert kept == [b"Cache-Control", b"X-C"]

    def test_set_cookie_and_extra_names_are_dropped_on_request(self):
        h = H(("Set-Cookie", "a=b"), ("X-Cache", "MISS"), ("ETag", '"1"'))
        assert headers_to_store(h, {}, strip_set_cookie=True, extra=("x-cache",)) == (
            (b"ETag", b'"1"'),)


# -- Vary -------------------------------------------------------------------------------------

class TestVary:
    def test_names_are_lowercased_deduplicated_and_sorted(self):
        assert vary_names(H(("Vary", "User-Agent, accept-encoding"), ("Vary", "Accept-Encoding"))) \
            == ("accept-encoding", "user-agent")

    def test_star_wins(self):
        assert vary_names(H(("Vary", "accept, *"))) == ("*",)

    def test_no_vary(self):
        assert vary_names(H()) == ()

    def test_values_are_normalised_across_lines_and_whitespace(self):
        a = vary_values(("accept-encoding",), H(("Accept-Encoding", "gzip,  br")))
        b = vary_values(("accept-encoding",), H(("accept-encoding", "gzip"),
                                                ("Accept-Encoding", " br ")))
        assert a == b == (("accept-encoding", "gzip, br"),)

    def test_absent_differs_from_empty(self):
        absent = vary_values(("x-a",), H())
        empty = vary_values(("x-a",), H(("X-A", "")))
        assert absent == (("x-a", None),) and empty == (("x-a", ""),)
        assert vary_key(absent) != vary_key(empty)

    def test_different_values_give_different_keys(self):
        k1 = vary_key(vary_values(("accept",), H(("Accept", "text/html"))))
        k2 = vary_key(vary_values(("accept",), H(("Accept", "application/json"))))
        assert k1 != k2


# -- freshness --------------------------------------------------------------------------------

class TestFreshnessLifetime:
    def test_s_maxage_beats_max_age_beats_expires(self):
        exp = ("Expires", format_http_date(T0 + 1000))
        date = ("Date", D0)
        assert life(200, ("Cache-Control", "max-age=10, s-maxage=20"), exp, date) == 20
        assert life(200, ("Cache-Control", "max-age=10"), exp, date) == 10
        assert life(200, exp, date) == 1000

    def test_invalid_max_age_makes_it_stale(self):
        assert life(200, ("Cache-Control", "max-age=soon")) == 0
        assert life(200, ("Cache-Control", "s-maxage=-5, max-age=60")) == 0

    def test_expires_without_date_uses_response_time(self):
        assert life(200, ("Expires", format_http_date(T0 + 30)), response_time=T0 + 10) == 20

    @pytest.mark.parametrize("expires", ["0", "-1", "yesterday"])
    def test_invalid_expires_is_in_the_past(self, expires):
        assert life(200, ("Expires", expires), ("Last-Modified", format_http_date(T0 - 1e5))) \
            == 0

    def test_expires_before_date_is_zero(self):
        assert life(200, ("Date", D0), ("Expires", format_http_date(T0 - 60))) == 0

    def test_heuristic_is_ten_percent_of_date_minus_last_modified(self):
        assert life(200, ("Date", D0), ("Last-Modified", format_http_date(T0 - 1000))) == 100

    def test_heuristic_is_capped(self):
        assert life(200, ("Date", D0), ("Last-Modified", format_http_date(T0 - 1e9))) \
            == policy.HEURISTIC_MAX_SECONDS

    def test_heuristic_only_for_heuristically_cacheable_or_public(self):
        lm = ("Last-Modified", format_http_date(T0 - 1000))
        assert life(302, ("Date", D0), lm) == 0
        assert life(302, ("Date", D0), lm, ("Cache-Control", "public")) == 100

    def test_heuristic_can_be_disabled_then_default_ttl_applies(self):
        lm = ("Last-Modified", format_http_date(T0 - 1000))
        assert life(200, ("Date", D0), lm, heuristic=False) == 0
        assert life(200, ("Date", D0), lm, heuristic=False, default_ttl=42) == 42

    def test_default_ttl_applies_when_no_last_modified(self):
        assert life(200, default_ttl=30) == 30
        assert life(404, default_ttl=30) == 30

    def test_default_ttl_never_applies_to_non_heuristic_statuses(self):
        assert life(500, default_ttl=30) == 0

    def test_explicit_freshness_ignores_default_ttl(self):
        assert life(200, ("Cache-Control", "max-age=5"), default_ttl=30) == 5


class TestCurrentAge:
    def test_resident_time_adds_to_age(self):
        h = H(("Date", D0))
        assert current_age(h, T0, T0, T0 + 25) == 25

    def test_age_header_and_response_delay_are_corrected(self):
        # age_value 10 + response_delay 2 = 12 > apparent age 0
        h = H(("Date", D0), ("Age", "10"))
        assert current_age(h, T0 - 2, T0, T0 + 5) == 17

    def test_apparent_age_from_date(self):
        h = H(("Date", format_http_date(T0 - 30)))
        assert current_age(h, T0, T0, T0) == 30

    def test_date_in_the_future_is_no_negative_age(self):
        h = H(("Date", format_http_date(T0 + 300)))
        assert current_age(h, T0, T0, T0) == 0

    def test_invalid_age_is_zero(self):
        h = H(("Date", D0), ("Age", "many"))
        assert current_age(h, T0, T0, T0 + 1) == 1


# -- reuse --------------------------------------------------------------------------------------

def verdict(resp_pairs, req_pairs=(), *, at: float, status: int = 200, **kw):
    h = H(("Date", D0), *resp_pairs)
    rq = H(*req_pairs)
    return assess(status, h, T0, T0, request_directives(rq), at, **kw)


class TestAssess:
    def test_fresh_then_stale(self):
        cc = ("Cache-Control", "max-age=60")
        assert verdict([cc], at=T0 + 59).verdict == FRESH
        a = verdict([cc], at=T0 + 60)
        assert a.verdict == REVALIDATE and not a.client_forced and a.staleness == 0

    def test_request_no_cache_forces_validation_of_a_fresh_response(self):
        a = verdict([("Cache-Control", "max-age=60")], [("Cache-Control", "no-cache")],
                    at=T0 + 1)
        assert a.verdict == REVALIDATE and a.client_forced

    def test_pragma_no_cache_forces_validation(self):
        assert verdict([("Cache-Control", "max-age=60")], [("Pragma", "no-cache")],
                       at=T0 + 1).client_forced

    def test_request_max_age(self):
        cc = ("Cache-Control", "max-age=60")
        assert verdict([cc], [("Cache-Control", "max-age=10")], at=T0 + 10).verdict == FRESH
        a = verdict([cc], [("Cache-Control", "max-age=10")], at=T0 + 11)
        assert a.verdict == REVALIDATE and a.client_forced

    def test_request_max_age_zero_on_an_aged_response(self):
        a = verdict([("Cache-Control", "max-age=60")], [("Cache-Control", "max-age=0")],
                    at=T0 + 1)
        assert a.verdict == REVALIDATE and a.client_forced

    def test_min_fresh(self):
        cc = ("Cache-Control", "max-age=60")
        assert verdict([cc], [("Cache-Control", "min-fresh=20")], at=T0 + 40).verdict == FRESH
        a = verdict([cc], [("Cache-Control", "min-fresh=20")], at=T0 + 41)
        assert a.verdict == REVALIDATE and a.client_forced

    def test_response_no_cache_always_validates(self):
        a = verdict([("Cache-Control", "no-cache, max-age=600")], at=T0 + 1)
        assert a.verdict == REVALIDATE and not a.client_forced

    def test_qualified_response_no_cache_does_not_force_validation(self):
        assert verdict([("Cache-Control", 'no-cache="set-cookie", max-age=600')],
                       at=T0 + 1).verdict == FRESH

    def test_max_stale_with_and_without_a_value(self):
        cc = ("Cache-Control", "max-age=10")
        assert verdict([cc], [("Cache-Control", "max-stale=5")], at=T0 + 15).verdict == STALE_OK
        assert verdict([cc], [("Cache-Control", "max-stale=5")],
                       at=T0 + 16).verdict == REVALIDATE
        assert verdict([cc], [("Cache-Control", "max-stale")], at=T0 + 1e6).verdict == STALE_OK

    def test_invalid_max_stale_accepts_nothing(self):
        assert verdict([("Cache-Control", "max-age=10")], [("Cache-Control", "max-stale=x")],
                       at=T0 + 11).verdict == REVALIDATE

    @pytest.mark.parametrize("cc", ["max-age=10, must-revalidate", "max-age=10, proxy-revalidate",
                                    "s-maxage=10"])
    def test_max_stale_is_refused_when_the_response_requires_revalidation(self, cc):
        assert verdict([("Cache-Control", cc)], [("Cache-Control", "max-stale")],
                       at=T0 + 11).verdict == REVALIDATE

    def test_stale_while_revalidate_window(self):
        cc = ("Cache-Control", "max-age=10, stale-while-revalidate=30")
        assert verdict([cc], at=T0 + 5).verdict == FRESH
        assert verdict([cc], at=T0 + 40).verdict == STALE_WHILE_REVALIDATE
        assert verdict([cc], at=T0 + 41).verdict == REVALIDATE

    def test_stale_while_revalidate_yields_to_the_clients_no_cache(self):
        cc = ("Cache-Control", "max-age=10, stale-while-revalidate=30")
        assert verdict([cc], [("Cache-Control", "no-cache")], at=T0 + 20).verdict == REVALIDATE

    def test_stale_while_revalidate_yields_to_response_no_cache(self):
        cc = ("Cache-Control", "no-cache, stale-while-revalidate=30")
        assert verdict([cc], at=T0 + 1).verdict == REVALIDATE

    def test_stale_while_revalidate_is_honoured_with_s_maxage(self):
        cc = ("Cache-Control", "s-maxage=10, stale-while-revalidate=30")
        assert verdict([cc], at=T0 + 20).verdict == STALE_WHILE_REVALIDATE

    def test_heuristic_and_default_ttl_flow_into_assess(self):
        lm = ("Last-Modified", format_http_date(T0 - 1000))
        assert verdict([lm], at=T0 + 99).verdict == FRESH
        assert verdict([lm], at=T0 + 99, heuristic=False).verdict == REVALIDATE
        assert verdict([], at=T0 + 9, default_ttl=10).verdict == FRESH


class TestStaleIfError:
    def test_response_directive_within_window(self):
        cc = {"max-age": "10", "stale-if-error": "60"}
        assert stale_if_error_ok(cc, {}, 60)
        assert not stale_if_error_ok(cc, {}, 61)

    def test_response_directive_overrides_must_revalidate(self):
        assert stale_if_error_ok({"must-revalidate": None, "stale-if-error": "60"}, {}, 5)

    def test_request_directive(self):
        assert stale_if_error_ok({"max-age": "1"}, {"stale-if-error": "30"}, 30)
        assert not stale_if_error_ok({"max-age": "1"}, {"stale-if-error": "30"}, 31)

    @pytest.mark.parametrize("cc", [{"must-revalidate": None}, {"proxy-revalidate": None},
                                    {"s-maxage": "1"}, {"no-cache": None}])
    def test_request_directive_does_not_override_the_origin(self, cc):
        assert not stale_if_error_ok(cc, {"stale-if-error": "30"}, 1)

    def test_nothing_means_no(self):
        assert not stale_if_error_ok({"max-age": "1"}, {}, 0.5)


# -- conditionals ------------------------------------------------------------------------------

@pytest.mark.parametrize("a,b,match", [
    ('"x"', '"x"', True), ('W/"x"', '"x"', True), ('W/"x"', 'W/"x"', True),
    ('"x"', '"y"', False), ('W/"x"', 'W/"y"', False),
])
def test_weak_comparison(a, b, match):
    assert weak_match(a, b) is match


class TestClientConditional:
    stored = H(("ETag", 'W/"v1"'), ("Last-Modified", format_http_date(T0 - 100)), ("Date", D0))

    def nm(self, *req, method="GET", status=200, stored=None):
        return client_not_modified(method, H(*req), status,
                                   self.stored if stored is None else stored, T0)

    def test_if_none_match_weak_comparison(self):
        assert self.nm(("If-None-Match", '"v1"'))
        assert self.nm(("If-None-Match", '"v0", W/"v1"'))
        assert not self.nm(("If-None-Match", '"v2"'))

    def test_if_none_match_star(self):
        assert self.nm(("If-None-Match", "*"))

    def test_if_none_match_takes_precedence_over_if_modified_since(self):
        assert not self.nm(("If-None-Match", '"v2"'), ("If-Modified-Since", format_http_date(T0)))

    def test_if_modified_since(self):
        assert self.nm(("If-Modified-Since", format_http_date(T0 - 100)))
        assert self.nm(("If-Modified-Since", format_http_date(T0)))
        assert not self.nm(("If-Modified-Since", format_http_date(T0 - 101)))

    def test_if_modified_since_falls_back_to_date(self):
        stored = H(("Date", format_http_date(T0 - 50)))
        assert self.nm(("If-Modified-Since", format_http_date(T0 - 50)), stored=stored)
        assert not self.nm(("If-Modified-Since", format_http_date(T0 - 51)), stored=stored)

    def test_invalid_if_modified_since_is_ignored(self):
        assert not self.nm(("If-Modified-Since", "yesterday"))

    def test_only_a_stored_200_for_get_or_head(self):
        assert self.nm(("If-None-Match", '"v1"'), method="HEAD")
        assert not self.nm(("If-None-Match", '"v1"'), status=404)
        assert not self.nm(("If-None-Match", '"v1"'), method="POST")

    def test_not_modified_headers(self):
        h = H(("Content-Type", "text/html"), ("ETag", '"1"'), ("Cache-Control", "max-age=5"),
              ("Date", D0), ("Vary", "accept"), ("X-Other", "1"), ("Expires", D0),
              ("Content-Location", "/a"), ("Last-Modified", D0))
        names = [k for k, _ in not_modified_headers(h)]
        assert names == [b"ETag", b"Cache-Control", b"Date", b"Vary", b"Expires",
                         b"Content-Location", b"Last-Modified"]


class TestRevalidation:
    def test_conditional_headers_from_validators(self):
        lm = format_http_date(T0 - 5)
        assert conditional_headers(H(("ETag", '"e"'), ("Last-Modified", lm))) == [
            ("If-None-Match", '"e"'), ("If-Modified-Since", lm)]
        assert conditional_headers(H(("Last-Modified", lm))) == [("If-Modified-Since", lm)]
        assert conditional_headers(H(("Last-Modified", "bogus"))) == []
        assert conditional_headers(H()) == []

    def test_merge_replaces_fields_and_keeps_others(self):
        stored = ((b"Content-Type", b"text/plain"), (b"Cache-Control", b"max-age=1"),
                  (b"ETag", b'"e"'), (b"Date", D0.encode()), (b"Age", b"30"),
                  (b"X-Multi", b"1"), (b"X-Multi", b"2"))
        new = H(("Cache-Control", "max-age=100"), ("Date", format_http_date(T0 + 9)),
                ("X-Multi", "3"), ("Content-Length", "0"), ("Connection", "x-hop"),
                ("X-Hop", "1"), ("X-Cache", "MISS"))
        merged = merge_not_modified(stored, new, extra=("x-cache",))
        assert merged == ((b"Content-Type", b"text/plain"), (b"ETag", b'"e"'),
                          (b"Cache-Control", b"max-age=100"),
                          (b"Date", format_http_date(T0 + 9).encode()), (b"X-Multi", b"3"))

    def test_merge_keeps_a_new_age(self):
        merged = merge_not_modified(((b"Age", b"30"),), H(("Age", "2")))
        assert merged == ((b"Age", b"2"),)

    @pytest.mark.parametrize("new,ok", [
        ([], True),
        ([("ETag", '"e"')], True),
        ([("ETag", 'W/"e"')], True),
        ([("ETag", '"other"')], False),
        ([("Last-Modified", format_http_date(T0 - 10))], True),
        ([("Last-Modified", format_http_date(T0 - 11))], False),
    ])
    def test_validators_select_the_stored_response(self, new, ok):
        stored = H(("ETag", '"e"'), ("Last-Modified", format_http_date(T0 - 10)))
        assert validators_match(stored, H(*new)) is ok

    def test_a_304_etag_cannot_select_a_response_without_one(self):
        assert not validators_match(H(), H(("ETag", '"e"')))
