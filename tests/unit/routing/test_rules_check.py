"""check_routing: every problem of a built [routing] table is reported, with its key path."""

from __future__ import annotations

import msgspec
import pytest

from dispa.config.routing_model import RoutingConfig, check_routing

TARGETS = {"default", "backend", "canary", "stable", "shadow"}
PLUGINS = {"route-tag", "auth"}


def issues(*rules: dict, **top) -> list[tuple[str, tuple]]:
    config = msgspec.convert({"rules": list(rules), **top}, RoutingConfig)
    found: list[tuple[str, tuple]] = []
    check_routing(config, targets=TARGETS, plugins=PLUGINS,
                  issue=lambda message, path: found.append((message, path)))
    return found


def rule(**kw) -> dict:
    return {"name": "r", "target": "backend", **kw}


def only(found: list, path: tuple, *words: str) -> None:
    assert len(found) == 1, found
    message, where = found[0]
    assert where == path, found
    for word in words:
        assert word in message, message


R0 = ("routing", "rules", 0)


def test_a_good_table_has_no_issues():
    assert issues(
        rule(priority=100, plugins_request=["route-tag"], plugins_response=["auth"],
             conditions={"method": ["GET"], "client_ip": ["10.0.0.0/8", "::1"],
                         "path": {"template": "/u/{id}", "regex": "^/u/(?P<n>[0-9]+)"},
                         "host": {"patterns": ["api.example.com", "*.example.com", "[::1]"]},
                         "headers": [{"name": "x-env", "value": {"type": "exact",
                                                                  "value": "canary"}}],
                         "query_params": [{"name": "v"}]},
             actions={"headers": {"set": {"x-a": "1"}, "rename": {"x-old": "x-new"}},
                      "path": {"replace": "/users/{id}", "prepend": "/v1",
                               "regex_replace": {"pattern": "^/(.*)$",
                                                 "replacement": "/new/$1"}},
                      "mirror": {"target": "shadow", "percent": 10}}),
        rule(name="split", target="", actions={"split": [{"target": "canary", "weight": 5},
                                                         {"target": "stable", "weight": 95}]}),
        rule(name="direct", target="", actions={"custom_response": {"body": "hi"}}),
        # the original format always had a target; with a direct response it is ignored
        rule(name="compat", actions={"custom_response": {"status": 503}}),
        rule(name="moved", target="", actions={"redirect": {
            "location": "https://example.com/new{path}?{query}", "status": 301}}),
        default_target="backend") == []


def test_duplicate_rule_names():
    found = issues(rule(name="a"), rule(name="b"), rule(name="a"))
    only(found, ("routing", "rules", 2, "name"), "duplicate rule name 'a'", "rules[0]")


def test_unknown_target_suggests_the_nearest_name():
    only(issues(rule(target="backnd")), R0 + ("target",), "'backnd'", "did you mean 'backend'")


def test_unknown_split_mirror_and_default_target():
    found = issues(rule(target="", actions={"split": [{"target": "canry"}]}),
                   rule(name="m", actions={"mirror": {"target": "shadw"}}),
                   default_target="nope")
    assert found == [
        ("default_target 'nope' is not a known target",
         ("routing", "default_target")),
        ("split target 'canry' is not a known target; did you mean 'canary'?",
         R0 + ("actions", "split", 0, "target")),
        ("mirror target 'shadw' is not a known target; did you mean 'shadow'?",
         ("routing", "rules", 1, "actions", "mirror", "target")),
    ]


def test_a_rule_must_send_somewhere():
    only(issues(rule(target="")), R0 + ("target",), "sends nowhere")


@pytest.mark.parametrize("key,pattern", [
    ("regex", "^/v(["), ("regex", "(?P<a>x)(?P<a>y)"),
])
def test_bad_path_regex_carries_pythons_message(key, pattern):
    found = issues(rule(conditions={"path": {key: pattern}}))
    only(found, R0 + ("conditions", "path", key), "invalid regular expression")
    assert any(word in found[0][0] for word in ("unterminated", "redefinition"))


def test_bad_header_and_query_regexes():
    found = issues(rule(conditions={
        "headers": [{"name": "x", "value": {"type": "regex", "pattern": "*x"}}],
        "query_params": [{"name": "q", "value": {"type": "regex", "pattern": "a{2,1}"}}]}))
    assert [p for _, p in found] == [
        R0 + ("conditions", "headers", 0, "value", "pattern"),
        R0 + ("conditions", "query_params", 0, "value", "pattern")]
    assert "nothing to repeat" in found[0][0] and "min repeat greater" in found[1][0]


def test_bad_regex_replace():
    found = issues(rule(actions={"path": {"regex_replace": {"pattern": "(", "replacement": ""}}}))
    only(found, R0 + ("actions", "path", "regex_replace", "pattern"), "missing )")
    found = issues(rule(actions={"path": {"regex_replace": {"pattern": "^/(a)",
                                                            "replacement": "/$2${x}"}}}))
    assert [p for _, p in found] == [R0 + ("actions", "path", "regex_replace", "replacement")]
    assert "group 2" in found[0][0]


@pytest.mark.parametrize("template,word", [
    ("/u/{id", "unbalanced"), ("/u/{1x}", "not an identifier"), ("/u/{a}/{a}", "twice"),
    ("u/{a}", "start with"),
])
def test_bad_templates(template, word):
    found = issues(rule(conditions={"path": {"template": template}}))
    only(found, R0 + ("conditions", "path", "template"), word)


@pytest.mark.parametrize("key", ["exact", "prefix"])
def test_paths_that_cannot_match(key):
    only(issues(rule(conditions={"path": {key: "api"}})), R0 + ("conditions", "path", key),
         "never matches")


def test_bad_cidr():
    found = issues(rule(conditions={"client_ip": ["10.0.0.0/8", "10.0.0.0/33", "nope"]}))
    assert [p for _, p in found] == [R0 + ("conditions", "client_ip", 1),
                                     R0 + ("conditions", "client_ip", 2)]
    assert "'10.0.0.0/33' is not an IP address or CIDR network" in found[0][0]


@pytest.mark.parametrize("pattern,word", [
    ("*", "leave out the host condition"), ("a.*.com", "only as a leading"),
    ("api.example.com:8080", "without its port"), ("bad_host!", "not a valid host name"),
    ("*.", "not a valid host name pattern"), ("-a.com", "not a valid host name"),
])
def test_bad_host_patterns(pattern, word):
    found = issues(rule(conditions={"host": {"patterns": ["ok.com", pattern]}}))
    only(found, R0 + ("conditions", "host", "patterns", 1), word)


def test_bad_methods():
    only(issues(rule(conditions={"method": ["GET", "GE T"]})),
         R0 + ("conditions", "method", 1), "not an HTTP method")


def test_redirect_status_must_be_a_redirect():
    only(issues(rule(target="", actions={"redirect": {"location": "/x", "status": 200}})),
         R0 + ("actions", "redirect", "status"), "200 is not a redirect", "301, 302")


def test_redirect_placeholders_must_be_known():
    found = issues(rule(target="", conditions={"path": {"template": "/u/{id}"}},
                        actions={"redirect": {"location": "/x{pth}/{id}"}}))
    only(found, R0 + ("actions", "redirect", "location"), "{pth}", "did you mean 'path'")


@pytest.mark.parametrize("location", ["example.com/x", "", "?a=1"])
def test_redirect_location_must_be_absolute_or_a_path(location):
    found = issues(rule(target="", actions={"redirect": {"location": location or "x"}}))
    only(found, R0 + ("actions", "redirect", "location"), "absolute URL")


def test_redirect_location_with_crlf():
    only(issues(rule(target="", actions={"redirect": {"location": "/x\r\nSet-Cookie: a"}})),
         R0 + ("actions", "redirect", "location"), "CR, LF")


def test_split_weights_all_zero():
    only(issues(rule(target="", actions={"split": [{"target": "canary", "weight": 0},
                                                   {"target": "stable", "weight": 0}]})),
         R0 + ("actions", "split"), "every split weight is 0")


def test_unknown_plugins():
    found = issues(rule(plugins_request=["route-tag", "route-tga"], plugins_response=["nope"]))
    assert [p for _, p in found] == [R0 + ("plugins_request", 1), R0 + ("plugins_response", 0)]
    assert "did you mean 'route-tag'" in found[0][0]


def test_unknown_plugins_without_any_configured():
    config = msgspec.convert({"rules": [rule(plugins_request=["x"])]}, RoutingConfig)
    found = []
    check_routing(config, targets=TARGETS, plugins=set(),
                  issue=lambda m, p: found.append((m, p)))
    only(found, R0 + ("plugins_request", 0), "no [[plugins.plugins]]")


@pytest.mark.parametrize("actions,first", [
    ({"custom_response": {}, "redirect": {"location": "/x"}}, "redirect"),
    ({"custom_response": {}, "split": [{"target": "canary"}]}, "split"),
    ({"redirect": {"location": "/x"}, "split": [{"target": "canary"}]}, "split"),
])
def test_direct_responses_and_split_are_mutually_exclusive(actions, first):
    only(issues(rule(target="", actions=actions)), R0 + ("actions", first), "mutually exclusive")


def test_target_and_split_conflict():
    only(issues(rule(actions={"split": [{"target": "canary"}]})), R0 + ("target",),
         "split replaces target")


def test_mirror_with_a_direct_response_conflicts():
    only(issues(rule(actions={"custom_response": {}, "mirror": {"target": "shadow"}})),
         R0 + ("actions", "mirror"), "nothing to copy")


def test_present_false_with_a_value_conflicts():
    only(issues(rule(conditions={"headers": [{"name": "x", "present": False,
                                              "value": {"type": "exact", "value": "1"}}]})),
         R0 + ("conditions", "headers", 0, "present"), "contradicts")


@pytest.mark.parametrize("edits,path,word", [
    ({"set": {"bad name": "1"}}, ("set", "bad name"), "not a valid header name"),
    ({"add": {"x-a": "1\r\nx-b: 2"}}, ("add", "x-a"), "CR, LF"),
    ({"set": {"x-a": "caf\u00e9\u2603"}}, ("set", "x-a"), "latin-1"),
    ({"remove": ["x:y"]}, ("remove", 0), "not a valid header name"),
    ({"rename": {"x-a": "x b"}}, ("rename", "x-a"), "not a valid header name"),
    ({"remove": ["X-A"], "set": {"x-a": "1"}}, ("set", "x-a"), "both removed and in set"),
    ({"remove": ["x-a"], "rename": {"X-A": "b"}}, ("rename", "X-A"), "both removed and renamed"),
])
@pytest.mark.parametrize("table", ["headers", "response_headers"])
def test_bad_header_edits(table, edits, path, word):
    only(issues(rule(actions={table: edits})), R0 + ("actions", table) + path, word)


def test_bad_custom_response_headers_and_content_type():
    found = issues(rule(actions={"custom_response": {"headers": {"x y": "1"},
                                                     "content_type": "text/plain\n"}}))
    assert [p for _, p in found] == [R0 + ("actions", "custom_response", "headers", "x y"),
                                     R0 + ("actions", "custom_response", "content_type")]


def test_bad_header_condition_name():
    only(issues(rule(conditions={"headers": [{"name": "x(y)"}]})),
         R0 + ("conditions", "headers", 0, "name"), "not a valid header name")


def test_path_action_placeholders_must_be_captured():
    found = issues(rule(conditions={"path": {"template": "/u/{id}"}},
                        actions={"path": {"replace": "/x/{idd}"}}))
    only(found, R0 + ("actions", "path", "replace"), "{idd}", "did you mean 'id'")


@pytest.mark.parametrize("key,value,word", [
    ("replace", "relative", "must start with"), ("strip_prefix", "api", "must start with"),
    ("prepend", "/a b", "spaces"), ("replace", "/a?b", "'?'"), ("prepend", "/a\nb", "CR, LF"),
])
def test_bad_path_actions(key, value, word):
    only(issues(rule(actions={"path": {key: value}})), R0 + ("actions", "path", key), word)


def test_every_problem_is_reported_not_only_the_first():
    found = issues(rule(target="nope", conditions={"path": {"regex": "("},
                                                   "client_ip": ["x"]}),
                   rule(target="", actions={"redirect": {"location": "/", "status": 200}}),
                   rule(name="r2", target="backend"))
    assert len(found) == 5, found  # target, regex, cidr, (rule 1) status, (rule 2) duplicate
