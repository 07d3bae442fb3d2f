"""Routing rules: each condition, each action, and the RouteTable contract (docs/routing.md)."""

from __future__ import annotations

import msgspec
import pytest

from dispa.config.routing_model import RoutingConfig
from dispa.plugins.api import Headers
from dispa.routing.rules import Match, Route, RouteTable


def table(*rules: dict, **top) -> RouteTable:
    raw = [{"target": "t", **r} for r in rules]
    return RouteTable.build(msgspec.convert({"rules": raw, **top}, RoutingConfig))


def route(**rule) -> Route:
    return table({"name": "r", **rule}).rules[0]


def name(t: RouteTable, method=b"GET", host="example.com", path="/", query="", headers=(),
         ip="127.0.0.1"):
    m = t.match(method, host, path, query, list(headers), ip)
    return None if m is None else m.route.name


# ---------------------------------------------------------------- order


def test_higher_priority_wins_and_ties_keep_file_order():
    t = table({"name": "low", "priority": 1}, {"name": "first-tie", "priority": 5},
              {"name": "second-tie", "priority": 5})
    assert [r.name for r in t.rules] == ["first-tie", "second-tie", "low"]
    assert name(t) == "first-tie"


def test_disabled_rules_are_left_out():
    t = table({"name": "off", "priority": 9, "enabled": False}, {"name": "on"})
    assert [r.name for r in t.rules] == ["on"] and name(t) == "on"


def test_no_match_returns_none_and_default_target_is_exposed():
    t = table({"name": "a", "conditions": {"path": {"exact": "/a"}}}, default_target="backend")
    assert name(t, path="/b") is None
    assert t.default_target == "backend"
    assert table().default_target is None
    assert table().match(b"GET", "h", "/", "", [], "") is None


def test_a_rule_without_conditions_matches_everything():
    assert name(table({"name": "all"}), host="", path="*", ip="") == "all"


def test_a_match_carries_route_and_params():
    t = table({"name": "u", "conditions": {"path": {"template": "/u/{id}"}}})
    m = t.match(b"GET", "h", "/u/7", "", [], "")
    assert isinstance(m, Match) and m.route is t.rules[0] and m.params == {"id": "7"}


# ---------------------------------------------------------------- method


def test_method_is_any_of_the_list_and_config_case_is_folded():
    t = table({"name": "r", "conditions": {"method": ["get", "POST"]}})
    assert name(t, method=b"GET") == "r" and name(t, method=b"POST") == "r"
    assert name(t, method=b"PUT") is None
    # RFC 9110 §9.1: the method token is case-sensitive on the wire
    assert name(t, method=b"get") is None


# ---------------------------------------------------------------- path


@pytest.mark.parametrize("cond,path,ok", [
    ({"exact": "/x"}, "/x", True), ({"exact": "/x"}, "/x/", False),
    ({"prefix": "/api"}, "/api/v1", True), ({"prefix": "/api"}, "/apix", True),
    ({"prefix": "/api"}, "/ap", False), ({"prefix": ""}, "/anything", True),
    ({"suffix": ".json"}, "/a/b.json", True), ({"suffix": ".json"}, "/a/b.jsonx", False),
    ({"contains": "foo"}, "/a/xfooy", True), ({"contains": "foo"}, "/a/fo", False),
    ({"regex": "^/v[0-9]+/"}, "/v12/x", True), ({"regex": "^/v[0-9]+/"}, "/v/x", False),
    ({"regex": "[0-9]{3}"}, "/a/b123", True),  # re.search: anywhere
    ({"template": "/users/{id}"}, "/users/42", True),
    ({"template": "/users/{id}"}, "/users/42/x", False),  # a template matches the whole path
    ({"template": "/users/{id}"}, "/users/", False),  # a parameter is never empty
    ({"prefix": "/api", "suffix": ".json"}, "/api/a.json", True),  # AND
    ({"prefix": "/api", "suffix": ".json"}, "/api/a.xml", False),
])
def test_path_conditions(cond, path, ok):
    t = table({"name": "r", "conditions": {"path": cond}})
    assert (name(t, path=path) == "r") is ok


def test_template_captures_parameters_segment_by_segment():
    t = table({"name": "r", "conditions": {"path": {
        "template": "/users/{id}/orders/{order}.json"}}})
    m = t.match(b"GET", "h", "/users/a%20b/orders/17.json", "", [], "")
    assert m.params == {"id": "a%20b", "order": "17"}  # raw, percent-encoding kept


def test_named_regex_groups_are_parameters_too():
    t = table({"name": "r", "conditions": {"path": {"regex": r"^/v(?P<version>\d+)(?P<opt>/x)?"}}})
    assert t.match(b"GET", "h", "/v3/y", "", [], "").params == {"version": "3"}


def test_template_and_prefix_must_both_hold():
    t = table({"name": "r", "conditions": {"path": {"prefix": "/a/b", "template": "/a/{x}"}}})
    assert name(t, path="/a/bc") == "r"
    assert name(t, path="/a/c") is None


# ---------------------------------------------------------------- host


@pytest.mark.parametrize("host,ok", [
    ("api.example.com", True), ("API.Example.COM", True), ("api.example.com:8443", True),
    ("api.example.com.", True), ("a.b.other.org", True), ("b.other.org", True),
    ("other.org", False),  # "*.other.org" is one or more labels deeper, not the name itself
    ("xother.org", False), ("example.com", False), ("", False),
])
def test_host_patterns_exact_and_wildcard_on_the_normalised_host(host, ok):
    t = table({"name": "r", "conditions": {"host": {"patterns": ["api.example.com",
                                                                   "*.other.org"]}}})
    assert (name(t, host=host) == "r") is ok


def test_case_sensitive_host_patterns_compare_the_host_as_sent():
    t = table({"name": "r", "conditions": {"host": {"patterns": ["Api.Example.com", "*.Dev.io"],
                                                    "case_sensitive": True}}})
    assert name(t, host="Api.Example.com:80") == "r"
    assert name(t, host="api.example.com") is None
    assert name(t, host="x.Dev.io") == "r" and name(t, host="x.dev.io") is None


def test_case_sensitive_ip_patterns_match_the_bracketed_host():
    t = table({"name": "r", "conditions": {"host": {"patterns": ["::1"], "case_sensitive": True}}})
    assert name(t, host="[::1]:80") == "r"


def test_ip_literal_host_patterns():
    t = table({"name": "v4", "conditions": {"host": {"patterns": ["127.0.0.1"]}}},
              {"name": "v6", "conditions": {"host": {"patterns": ["::1"]}}})
    assert name(t, host="127.0.0.1:8080") == "v4"
    assert name(t, host="[::1]:8080") == "v6"


def test_host_buckets_and_hostless_rules_merge_in_priority_order():
    t = table({"name": "any-low", "priority": 0},
              {"name": "wild", "priority": 5, "conditions": {"host": {"patterns": ["*.a.com"]}}},
              {"name": "exact", "priority": 3, "conditions": {"host": {"patterns": ["x.a.com"]}}},
              {"name": "any-high", "priority": 9, "conditions": {"method": ["POST"]}})
    assert name(t, host="x.a.com") == "wild"
    assert name(t, host="x.a.com", method=b"POST") == "any-high"
    assert name(t, host="y.com") == "any-low"


# ---------------------------------------------------------------- client ip


@pytest.mark.parametrize("ip,ok", [
    ("10.1.2.3", True), ("127.0.0.1", True), ("127.0.0.2", False), ("::ffff:10.0.0.9", True),
    ("2001:db8::5", True), ("2001:db9::5", False), ("[2001:db8::1]", True),
    ("fe80::1%eth0", False), ("not-an-ip", False), ("", False),
])
def test_client_ip_cidrs_and_addresses(ip, ok):
    t = table({"name": "r", "conditions": {"client_ip": ["10.0.0.0/8", "127.0.0.1",
                                                         "2001:db8::/32"]}})
    assert (name(t, ip=ip) == "r") is ok


# ---------------------------------------------------------------- headers


@pytest.mark.parametrize("value,sent,ok", [
    ({"type": "exact", "value": "canary"}, b"canary", True),
    ({"type": "exact", "value": "canary"}, b"Canary", False),
    ({"type": "contains", "value": "nar"}, b"canary", True),
    ({"type": "prefix", "value": "can"}, b"canary", True),
    ({"type": "suffix", "value": "ary"}, b"canary", True),
    ({"type": "suffix", "value": "arx"}, b"canary", False),
    ({"type": "regex", "pattern": "^c.n"}, b"canary", True),
    ({"type": "regex", "pattern": "^x"}, b"canary", False),
])
def test_header_value_matchers(value, sent, ok):
    t = table({"name": "r", "conditions": {"headers": [{"name": "X-Env", "value": value}]}})
    assert (name(t, headers=[(b"x-ENV", sent)]) == "r") is ok


def test_header_names_are_case_insensitive_and_any_field_line_may_match():
    t = table({"name": "r", "conditions": {"headers": [
        {"name": "x-env", "value": {"type": "exact", "value": "b"}}]}})
    assert name(t, headers=[(b"X-Env", b"a"), (b"X-ENV", b"b")]) == "r"


def test_header_presence_and_absence():
    t = table({"name": "needs", "conditions": {"headers": [{"name": "authorization"}]}},
              {"name": "absent",
               "conditions": {"headers": [{"name": "cookie", "present": False}]}})
    assert name(t, headers=[(b"Authorization", b"x")]) == "needs"
    assert name(t, headers=[(b"Cookie", b"a=1")]) is None
    assert name(t, headers=[]) == "absent"


def test_all_header_conditions_must_hold():
    t = table({"name": "r", "conditions": {"headers": [
        {"name": "a"}, {"name": "b", "present": True}]}})
    assert name(t, headers=[(b"a", b"1")]) is None
    assert name(t, headers=[(b"a", b"1"), (b"B", b"")]) == "r"


# ---------------------------------------------------------------- query


@pytest.mark.parametrize("query,ok", [
    ("v=2", True), ("a=1&v=2", True), ("v=1&v=2", True), ("v=%32", True), ("v=3", False),
    ("", False), ("vv=2", False),
])
def test_query_param_value(query, ok):
    t = table({"name": "r", "conditions": {"query_params": [
        {"name": "v", "value": {"type": "exact", "value": "2"}}]}})
    assert (name(t, query=query) == "r") is ok


def test_query_param_presence_counts_blank_values():
    t = table({"name": "r", "conditions": {"query_params": [{"name": "debug"}]}},
              {"name": "no-x", "conditions": {"query_params": [{"name": "x", "present": False}]}})
    assert name(t, query="debug") == "r" and name(t, query="debug=") == "r"
    assert name(t, query="x=1") is None and name(t, query="") == "no-x"


def test_query_is_parsed_once_per_match_and_only_when_needed(monkeypatch):
    from dispa.routing import rules as mod
    calls = []
    real = mod.parse_qsl
    monkeypatch.setattr(mod, "parse_qsl", lambda *a, **k: calls.append(a) or real(*a, **k))
    t = table({"name": "a", "priority": 3, "conditions": {"query_params": [{"name": "x"}]}},
              {"name": "b", "priority": 2, "conditions": {"query_params": [{"name": "y"}]}},
              {"name": "c", "priority": 1})
    assert name(t, query="z=1") == "c" and len(calls) == 1
    calls.clear()
    t2 = table({"name": "plain", "conditions": {"path": {"prefix": "/"}}})
    assert name(t2, query="a=1") == "plain" and calls == []


# ---------------------------------------------------------------- split, mirror, plugins


def test_split_picks_by_cumulative_weight_with_a_deterministic_sequence():
    r = route(target="", actions={"split": [{"target": "canary", "weight": 5},
                                            {"target": "off", "weight": 0},
                                            {"target": "stable", "weight": 95}]})
    assert r.target == "" and r.split == (("canary", 5), ("off", 0), ("stable", 95))
    assert r.pick_target(0.0) == "canary" and r.pick_target(0.0499) == "canary"
    assert r.pick_target(0.05) == "stable" and r.pick_target(0.999999) == "stable"
    picks = [r.pick_target(i / 1000) for i in range(1000)]
    assert picks.count("canary") == 50 and picks.count("stable") == 950
    assert "off" not in picks


def test_a_zero_weight_share_is_never_picked_even_at_the_edges():
    r = route(target="", actions={"split": [{"target": "off", "weight": 0},
                                            {"target": "on", "weight": 1},
                                            {"target": "off2", "weight": 0}]})
    assert {r.pick_target(x) for x in (-0.1, 0.0, 0.5, 0.999999, 1.0)} == {"on"}


def test_pick_target_without_split_is_the_target():
    assert route(target="backend").pick_target(0.7) == "backend"


def test_mirror_is_exposed_as_target_and_percent():
    r = route(actions={"mirror": {"target": "shadow", "percent": 12.5}})
    assert r.mirror == ("shadow", 12.5)
    assert route().mirror is None


@pytest.mark.parametrize("order,dedup,want", [
    ("as_listed", False, ("b", "a", "b", "c")), ("as_listed", True, ("b", "a", "c")),
    ("name_asc", True, ("a", "b", "c")), ("name_desc", False, ("c", "b", "b", "a")),
])
def test_plugin_lists_are_ordered_and_deduplicated(order, dedup, want):
    r = route(plugins_request=["b", "a", "b", "c"], plugins_response=["b", "a", "b", "c"],
              plugins_order=order, plugins_dedup=dedup)
    assert r.plugins_request == want and r.plugins_response == want


# ---------------------------------------------------------------- direct responses


def test_custom_response():
    r = route(actions={"custom_response": {"status": 418, "body": "tea ☕",
                                           "headers": {"x-a": "b"}}})
    assert r.direct and r.target == ""
    status, headers, body = r.local_response("h", "/", "")
    assert status == 418 and body == "tea ☕".encode()
    assert headers == [(b"Content-Type", b"text/plain; charset=utf-8"), (b"x-a", b"b")]


def test_custom_response_headers_may_override_the_content_type():
    r = route(actions={"custom_response": {"headers": {"Content-Type": "application/json"},
                                           "body": "{}", "content_type": "text/html"}})
    assert r.local_response("h", "/", "")[1] == [(b"Content-Type", b"application/json")]


def test_a_forwarding_rule_has_no_local_response():
    r = route(target="backend")
    assert not r.direct and r.local_response("h", "/", "") is None


@pytest.mark.parametrize("location,query,want", [
    ("https://example.com/new{path}", "", "https://example.com/new/old/x"),
    ("https://example.com/new{path}?{query}", "a=1", "https://example.com/new/old/x?a=1"),
    ("https://example.com/new{path}?{query}", "", "https://example.com/new/old/x"),
    ("https://{host}/n?x=1&{query}", "", "https://h.example/n?x=1"),
    ("https://{host}/n?x=1&{query}", "y=2", "https://h.example/n?x=1&y=2"),
    ("/users/{id}/profile", "", "/users/42/profile"),
    ("/q={query}", "a b", "/q=a%20b"),  # controls and spaces are percent-encoded
])
def test_redirect_placeholders(location, query, want):
    r = route(target="", conditions={"path": {"template": "/old/{id}"}},
              actions={"redirect": {"location": location, "status": 308}})
    params = {"id": "42"}
    status, headers, body = r.local_response("h.example", "/old/x", query, params)
    assert status == 308 and body == b""
    assert headers == [(b"Location", want.encode())]


def test_redirect_status_defaults_to_302():
    r = route(target="", actions={"redirect": {"location": "/x"}})
    assert r.local_response("h", "/", "")[0] == 302


# ---------------------------------------------------------------- path actions


@pytest.mark.parametrize("actions,path,want", [
    ({"prepend": "/v1"}, "/users", "/v1/users"),
    ({"prepend": "/v1/"}, "/users", "/v1/users"),  # no doubled slash
    ({"strip_prefix": "/api"}, "/api/users", "/users"),
    ({"strip_prefix": "/api"}, "/api", "/"),
    ({"strip_prefix": "/api"}, "/apiv2/x", "/v2/x"),  # a plain string prefix
    ({"strip_prefix": "/api"}, "/other", "/other"),
    ({"replace": "/fixed"}, "/anything", "/fixed"),
    ({"regex_replace": {"pattern": "^/old/(.*)$", "replacement": "/new/$1"}}, "/old/a/b",
     "/new/a/b"),
    ({"regex_replace": {"pattern": "^/(?P<a>[^/]+)/(?P<b>[^/]+)",
                        "replacement": "/${b}/${a}"}}, "/x/y/z", "/y/x/z"),
    ({"regex_replace": {"pattern": "o", "replacement": "0"}}, "/foo", "/f0o"),  # first only
    ({"regex_replace": {"pattern": "^/(.*)", "replacement": "/$$1\\${1}"}}, "/a",
     "/$1\\a"),  # $$ and backslashes are literal
    # the documented order: replace, strip_prefix, regex_replace, prepend
    ({"replace": "/api/users/x", "strip_prefix": "/api",
      "regex_replace": {"pattern": "^/users", "replacement": "/people"}, "prepend": "/v2"},
     "/ignored", "/v2/people/x"),
])
def test_rewrite_path(actions, path, want):
    r = route(actions={"path": actions})
    assert r.has_request_edits
    assert r.rewrite_path(path, {}) == want


def test_replace_and_prepend_use_template_parameters():
    r = route(conditions={"path": {"template": "/users/{id}/orders/{order}"}},
              actions={"path": {"replace": "/orders/{order}", "prepend": "/u{id}"}})
    assert r.rewrite_path("/users/7/orders/99", {"id": "7", "order": "99"}) == "/u7/orders/99"


def test_without_path_actions_the_path_is_unchanged():
    r = route()
    assert not r.has_request_edits and not r.has_response_edits
    assert r.rewrite_path("/a?b", {}) == "/a?b"


# ---------------------------------------------------------------- header actions


def test_request_header_edits_rename_remove_set_add():
    r = route(actions={"headers": {"rename": {"X-Old": "x-new"}, "remove": ["x-c"],
                                   "set": {"x-a": "1"}, "add": {"x-b": "2"}}})
    assert r.has_request_edits and not r.has_response_edits
    h = Headers([(b"Host", b"h"), (b"x-old", b"o1"), (b"X-C", b"gone"), (b"X-A", b"0"),
                 (b"X-OLD", b"o2"), (b"x-a", b"00"), (b"x-b", b"kept")])
    r.edit_request_headers(h)
    assert h.raw == [(b"Host", b"h"), (b"x-new", b"o1"), (b"x-a", b"1"), (b"x-new", b"o2"),
                     (b"x-b", b"kept"), (b"x-b", b"2")]
    assert h.changed


def test_renames_are_simultaneous():
    r = route(actions={"headers": {"rename": {"a": "b", "b": "c"}}})
    h = Headers([(b"a", b"1"), (b"b", b"2")])
    r.edit_request_headers(h)
    assert h.raw == [(b"b", b"1"), (b"c", b"2")]


def test_header_edits_that_change_nothing_leave_headers_unchanged():
    r = route(actions={"headers": {"rename": {"x-old": "x-new"}, "remove": ["x-c"]}})
    h = Headers([(b"Host", b"h")])
    r.edit_request_headers(h)
    assert h.raw == [(b"Host", b"h")] and not h.changed


def test_response_header_edits():
    r = route(actions={"response_headers": {"set": {"Cache-Control": "no-store"},
                                            "remove": ["server"]}})
    assert r.has_response_edits and not r.has_request_edits
    h = Headers([(b"Server", b"nginx"), (b"cache-control", b"max-age=60")])
    r.edit_response_headers(h)
    assert h.raw == [(b"Cache-Control", b"no-store")]


# ---------------------------------------------------------------- model round trip


def test_the_table_survives_the_snapshot_round_trip():
    """compile ships ``msgspec.to_builtins(routing)``; the worker converts it back."""
    config = msgspec.convert({"enable_logging": True, "default_target": "b", "rules": [
        {"name": "r", "target": "t", "conditions": {
            "headers": [{"name": "x", "value": {"type": "regex", "pattern": "a"}}],
            "path": {"regex": "^/a"}},
         "actions": {"redirect": {"location": "/b"}, "mirror": {"target": "s"}}}]},
        RoutingConfig)
    again = msgspec.convert(msgspec.to_builtins(config), RoutingConfig)
    assert again == config
    t = RouteTable.build(again)
    assert t.enable_logging and t.default_target == "b" and len(t) == 1


# ---------------------------------------------------------------- the index (white box)


def test_pure_regex_rules_of_one_group_are_joined_into_one_alternation():
    t = table(*[{"name": f"r{n}", "conditions": {"path": {"regex": f"x{n}y"}}}
                for n in range(20)])
    ids, joined, _, anchored, _ = t._any[4]  # the loose group of the host-less bucket
    assert joined is not None and ids == () and not anchored
    assert name(t, path="/ax7y") == "r7" and name(t, path="/nothing") is None


def test_anchored_regexes_are_indexed_by_their_literal_prefix():
    t = table({"name": "a", "conditions": {"path": {"regex": "^/svc1/v[0-9]+/"}}},
              {"name": "b", "conditions": {"path": {"regex": "^/svc2/v[0-9]+/"}}})
    assert set(t._any[1]) == {"/svc1/v", "/svc2/v"} and t._any[4] is None
    assert name(t, path="/svc2/v3/x") == "b"


def test_regexes_with_backreferences_are_tested_alone():
    # joined after "(a|b)", the "\1" of the second rule would name the first rule's group
    t = table({"name": "ab", "conditions": {"path": {"regex": "^/(a|b)/x"}}},
              {"name": "twice", "conditions": {"path": {"regex": r"^/(\w)/\1"}}},
              {"name": "other", "conditions": {"path": {"regex": "^/z"}}})
    assert name(t, path="/c/c") == "twice" and name(t, path="/a/x") == "ab"


def test_case_insensitive_and_multiline_regexes_are_not_prefix_indexed():
    t = table({"name": "i", "conditions": {"path": {"regex": "(?i)^/API"}}},
              {"name": "m", "conditions": {"path": {"regex": "(?m)^/b"}}})
    assert name(t, path="/api/x") == "i" and name(t, path="/x\n/b") == "m"


def test_host_and_ip_memos_are_bounded():
    t = table({"name": "r", "conditions": {"client_ip": ["10.0.0.0/8"]}})
    for i in range(10000):
        t.match(b"GET", f"h{i}.example", "/", "", [], f"10.0.{i % 256}.{i // 256}")
    assert len(t._plans) <= 4096 and len(t._ips) <= 4096
