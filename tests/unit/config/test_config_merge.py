"""Dynamic configuration fragments (dispa/config/merge.py): allowed tables, qualification
``name@provider``, validation of the merged config with errors naming the provider, the
key, the field and the line, and the last good fragments kept."""

from __future__ import annotations

import pytest

from dispa.config.load import load_config_text
from dispa.config.merge import DynamicConfig, Fragment, merge_document, parse_fragment, qualify
from dispa.errors import ConfigError

FILE = """
[server]
bind_address = "127.0.0.1:8080"

[domains]
intercept_domains = ["example.com"]

[[targets.targets]]
name = "a"
url = "http://127.0.0.1:9000"

[[target_groups]]
name = "web"
targets = [{ name = "w", url = "http://127.0.0.1:9001" }]

[[plugins.plugins]]
name = "hdr"
type = "requestid"
"""

GROUP = """
[[target_groups]]
name = "api"
targets = [{ name = "x", url = "http://127.0.0.1:9002" }]

[[routing.rules]]
name = "r"
target = "api"
[routing.rules.conditions.path]
prefix = "/api"
"""


@pytest.fixture
def base():
    return load_config_text(FILE, fmt="toml", name="dispa.toml")


def _groups(loaded) -> list[str]:
    return [c.name for c in loaded.snapshot.clusters]


def test_a_fragment_adds_qualified_groups_and_rules(base):
    dyn = DynamicConfig()
    merged = dyn.offer("consul", {"api.toml": GROUP}, base)
    assert _groups(merged) == ["default", "web", "api@consul"]
    [rule] = merged.model.routing.rules
    assert (rule.name, rule.target) == ("r@consul", "api@consul")
    # the file's own elements keep their names; the file itself is unchanged
    assert _groups(base) == ["default", "web"]
    assert dyn.status()["providers"]["consul"]["keys"] == ["api.toml"]


def test_same_names_from_two_providers_do_not_clash(base):
    dyn = DynamicConfig()
    dyn.offer("consul", {"a.toml": GROUP}, base)
    merged = dyn.offer("kubernetes", {"ns/cm/a.toml": GROUP}, base)
    assert _groups(merged) == ["default", "web", "api@consul", "api@kubernetes"]
    assert dyn.errors == {}


def test_references_qualify_and_at_file_names_the_files_element():
    data = {"routing": {"rules": [{
        "name": "r", "target": "web@file", "plugins_request": ["hdr@file", "mine"],
        "actions": {"split": [{"target": "g"}, {"target": "x@kubernetes"}],
                    "mirror": {"target": "web@file"}}}]},
        "plugins": {"plugins": [{"name": "mine", "type": "requestid"}]}}
    out = qualify(data, "consul")
    rule = out["routing"]["rules"][0]
    assert rule["name"] == "r@consul"
    assert rule["target"] == "web"
    assert rule["plugins_request"] == ["hdr", "mine@consul"]
    assert [s["target"] for s in rule["actions"]["split"]] == ["g@consul", "x@kubernetes"]
    assert rule["actions"]["mirror"]["target"] == "web"
    assert out["plugins"]["plugins"][0]["name"] == "mine@consul"
    assert data["routing"]["rules"][0]["name"] == "r"  # the input is not changed


def test_a_fragment_may_route_to_the_files_group(base):
    merged = DynamicConfig().offer("consul", {"r.json": '{"routing": {"rules": [{"name": "r",'
                                              ' "target": "web@file"}]}}'}, base)
    assert merged.model.routing.rules[0].target == "web"


@pytest.mark.parametrize("text, path", [
    ("[server]\nworkers = 2\n", "server"),
    ("[tls]\nenabled = true\n", "tls"),
    ("[routing]\ndefault_target = \"web@file\"\n", "routing.default_target"),
    ("[domains]\nexclude_domains = [\"a.com\"]\n", "domains.exclude_domains"),
    ("[plugins]\nenabled = false\n", "plugins.enabled"),
])
def test_only_the_allowed_tables(text, path):
    with pytest.raises(ConfigError) as exc:
        parse_fragment(Fragment("consul", "x.toml", text))
    [issue] = exc.value.errors
    assert issue.file == "consul:x.toml" and issue.path == path and issue.line
    assert "cannot come from dynamic configuration" in issue.message


def test_intercept_domains_add_to_the_files_list(base):
    merged = DynamicConfig().offer("consul", {"d.toml": '[domains]\nintercept_domains = '
                                              '["api.example.org"]\n'}, base)
    assert merged.model.domains.intercept_domains == ["example.com", "api.example.org"]


def test_intercept_domains_cannot_narrow_every_host():
    everything = load_config_text(FILE.replace('["example.com"]', "[]"), fmt="toml")
    dyn = DynamicConfig()
    assert dyn.offer("consul", {"d.toml": '[domains]\nintercept_domains = ["a.org"]\n'},
                     everything) is None
    [issue] = dyn.errors["consul:d.toml"]
    assert "every host" in issue["message"]


def test_errors_name_provider_key_field_and_line(base):
    dyn = DynamicConfig()
    text = GROUP.replace('url = "http://127.0.0.1:9002"', 'url = "ftp://x"')
    assert dyn.offer("kubernetes", {"shop/cm/api.toml": text}, base) is None
    issues = dyn.errors["kubernetes:shop/cm/api.toml"]
    url = [i for i in issues if i["path"] == "target_groups[0].targets[0].url"]
    assert url and url[0]["line"] == 4 and url[0]["file"] == "kubernetes:shop/cm/api.toml"
    assert "ftp" in url[0]["message"]


def test_syntax_errors_carry_the_fragments_line(base):
    dyn = DynamicConfig()
    dyn.offer("consul", {"a.toml": "[[routing.rules]]\nname = \n", "b.json": '{\n "x": }'},
              base)
    assert dyn.errors["consul:a.toml"][0]["line"] == 2
    assert dyn.errors["consul:b.json"][0]["line"] == 2
    assert "syntax" in dyn.errors["consul:b.json"][0]["message"]


def test_a_duplicate_with_the_file_cannot_happen_but_within_a_provider_it_is_refused(base):
    dyn = DynamicConfig()
    merged = dyn.offer("consul", {"a.toml": GROUP, "b.toml": GROUP}, base)
    # a.toml comes first (sorted keys) and is kept; b.toml repeats its names: refused
    assert _groups(merged) == ["default", "web", "api@consul"]
    assert "consul:b.toml" in dyn.errors and "consul:a.toml" not in dyn.errors
    assert any("duplicate" in i["message"] for i in dyn.errors["consul:b.toml"])


def test_last_good_version_stays_and_the_other_fragments_apply(base):
    dyn = DynamicConfig()
    dyn.offer("consul", {"api.toml": GROUP}, base)
    other = "[[target_groups]]\nname = \"more\"\ntargets = [{ name = \"m\", url = " \
            "\"http://127.0.0.1:9003\" }]\n"
    merged = dyn.offer("consul", {"api.toml": "[[target_groups]]\nname = 7\n",
                                  "more.toml": other}, base)
    assert _groups(merged) == ["default", "web", "api@consul", "more@consul"]
    assert "consul:api.toml" in dyn.errors
    assert dyn.good["consul"]["api.toml"].text == GROUP
    # the same offer again changes nothing; removing the key removes its elements
    assert dyn.offer("consul", {"api.toml": "[[target_groups]]\nname = 7\n",
                                "more.toml": other}, base) is None
    merged = dyn.offer("consul", {"more.toml": other}, base)
    assert _groups(merged) == ["default", "web", "more@consul"]
    assert dyn.errors == {}


def test_a_rule_to_a_group_of_another_fragment_of_the_same_provider(base):
    rule = '[[routing.rules]]\nname = "r"\ntarget = "api"\n'
    group = GROUP.split("[[routing.rules]]")[0]
    dyn = DynamicConfig()
    merged = dyn.offer("consul", {"group.toml": group, "rule.toml": rule}, base)
    assert merged.model.routing.rules[0].target == "api@consul"
    # the group's key is deleted: the rule (unchanged) now points nowhere, so it goes too,
    # with its error in the status; the file's routing is what remains
    merged = dyn.offer("consul", {"rule.toml": rule}, base)
    assert _groups(merged) == ["default", "web"] and merged.model.routing.rules == []
    assert "not a known target" in dyn.errors["consul:rule.toml"][0]["message"]


def test_merge_document_origins_and_the_base_untouched(base):
    document = base.document[0]
    frag = Fragment("consul", "api.toml", GROUP)
    merged, origins = merge_document(document, [(frag,) + parse_fragment(frag)])
    assert len(document["target_groups"]) == 1
    assert merged["target_groups"][1]["name"] == "api@consul"
    assert origins[("target_groups", 1)][0] == "consul:api.toml"
    assert origins[("target_groups", 1)][2] == ("target_groups", 0)
    assert origins[("routing", "rules", 0)][2] == ("routing", "rules", 0)


def test_forget_drops_a_provider(base):
    dyn = DynamicConfig()
    dyn.offer("consul", {"api.toml": GROUP}, base)
    assert dyn.forget("consul") is True
    assert dyn.merge(base) is base


def test_fragment_plugins_are_checked_like_the_files(base):
    dyn = DynamicConfig()
    text = '[[plugins.plugins]]\nname = "p"\ntype = "nosuchfilter"\n'
    assert dyn.offer("consul", {"p.toml": text}, base) is None
    [issue] = dyn.errors["consul:p.toml"]
    assert issue["path"] == "plugins.plugins[0].type" and issue["line"] == 3
    merged = dyn.offer("consul", {"p.toml": text.replace("nosuchfilter", "requestid")}, base)
    assert [p.name for p in merged.model.plugins.plugins] == ["hdr", "p@consul"]


def test_a_missing_required_key_points_at_the_fragments_table(base):
    dyn = DynamicConfig()
    text = '# a comment\n\n[[target_groups]]\nname = "g"\n[[target_groups.targets]]\nname = "x"\n'
    assert dyn.offer("consul", {"g.toml": text}, base) is None
    [issue] = dyn.errors["consul:g.toml"]
    assert issue["path"] == "target_groups[0].targets[0].url" and issue["line"] == 5
    assert "missing required key 'url'" in issue["message"]
