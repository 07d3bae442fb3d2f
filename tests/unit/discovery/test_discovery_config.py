"""[service_discovery] and [*.discovery] in the config file: defaults, errors with file, line
and field, and docs/configuration.md rows for every key."""

from __future__ import annotations

import pathlib
import re

import msgspec
import pytest

from dispa.config import load_config_text
from dispa.discovery import config as dc
from dispa.errors import ConfigError

DOC = pathlib.Path(__file__).resolve().parents[3] / "docs" / "configuration.md"

STATIC = """
[[targets.targets]]
name = "a"
url = "http://127.0.0.1:8001"
"""


def load(text: str):
    return load_config_text(text, fmt="toml", name="d.toml")


def line(text: str, snippet: str) -> int:
    """The 1-based line of ``text`` where ``snippet`` first appears."""
    return text[:text.index(snippet)].count("\n") + 1


def errors(text: str) -> list[tuple[int | None, str, str]]:
    with pytest.raises(ConfigError) as exc:
        load(text)
    return [(e.line, e.path, e.message) for e in exc.value.errors]


def test_defaults_and_a_group_without_static_targets():
    lc = load(STATIC + """
[service_discovery]
provider = "dns"
[[target_groups]]
name = "api"
[target_groups.discovery]
service = "_http._tcp.api.test"
""")
    sd = lc.model.service_discovery
    assert (sd.provider, sd.consul_address, sd.refresh_interval, sd.health_check_integration,
            sd.throttle, sd.register) == ("dns", "http://127.0.0.1:8500", 30.0, True, 1.0, None)
    assert sd.etcd.endpoints == ["http://127.0.0.1:2379"] and sd.dns.resolvers == ["127.0.0.1:53"]
    src = lc.model.target_groups[0].discovery
    assert (src.provider, src.record, src.keep_static, src.passing_only) == ("", "SRV", False, True)
    api = next(c for c in lc.snapshot.clusters if c.name == "api")
    assert api.endpoints == ()  # until the provider answers
    assert dc.source_kind(src, sd) == "dns"


def test_the_original_keys_load_unchanged():
    lc = load(STATIC + """
[service_discovery]
provider = "consul"
consul_address = "http://10.0.0.5:8500"
refresh_interval = 10
health_check_integration = false
""")
    assert lc.model.service_discovery.refresh_interval == 10.0


def test_the_default_cluster_may_be_discovered_only():
    lc = load("""
[targets.discovery]
provider = "dns"
service = "api.test"
record = "A"
port = 8080
""")
    assert lc.model.cluster.discovery.port == 8080
    assert lc.snapshot.clusters[0].endpoints == ()


def test_a_and_aaaa_need_a_port():
    assert errors("""
[targets.discovery]
provider = "dns"
service = "api.test"
record = "AAAA"
""") == [(2, "targets.discovery.port",
          "record 'AAAA' needs a port (SRV answers carry their own)")]


def test_unknown_keys_and_bad_values_name_the_line_and_field():
    text = STATIC + """
[service_discovery]
provider = "zookeeper"
throttle = -1
[service_discovery.dns]
resolver = ["127.0.0.1"]
[[target_groups]]
name = "api"
[target_groups.discovery]
service = "api"
record = "MX"
"""
    by_path = {path: (n, msg) for n, path, msg in errors(text)}
    assert by_path["service_discovery.provider"][0] == line(text, "provider =")
    assert "expected one of consul, etcd, kubernetes, dns" in by_path["service_discovery.provider"][1]
    assert by_path["service_discovery.throttle"][0] == line(text, "throttle")
    assert by_path["service_discovery.dns.resolver"] == (
        line(text, "resolver ="), "unknown key 'resolver'; did you mean 'resolvers'?")
    assert by_path["target_groups[0].discovery.record"][0] == line(text, "record")
    assert len(by_path) == 4


def test_cross_field_checks():
    text = STATIC + """
[service_discovery]
consul_address = "10.0.0.5:8500"
[service_discovery.dns]
resolvers = ["127.0.0.1:53", "dns.example:53"]
min_ttl = 10
max_ttl = 5
[service_discovery.etcd]
endpoints = ["127.0.0.1:2379"]
cert_file = "/c.pem"
"""
    assert {(path, n) for n, path, _ in errors(text)} == {
        ("service_discovery.consul_address", line(text, "consul_address")),
        ("service_discovery.dns.resolvers[1]", line(text, "resolvers")),
        ("service_discovery.dns.min_ttl", line(text, "min_ttl")),
        ("service_discovery.etcd.endpoints[0]", line(text, "endpoints")),
        ("service_discovery.etcd.cert_file", line(text, "cert_file"))}


def test_two_clusters_on_one_service_need_the_same_filters():
    base = STATIC + """
[[target_groups]]
name = "a"
[target_groups.discovery]
provider = "consul"
service = "api"
tags = ["v1"]
[[target_groups]]
name = "b"
[target_groups.discovery]
provider = "consul"
service = "api"
keep_static = true
"""
    found = errors(base + 'tags = ["v2"]\n')
    at = base.index('service = "api"', base.index('name = "b"'))
    assert found == [(base[:at].count("\n") + 1,
                      "target_groups[1].discovery.service",
                      "consul service 'api' is also discovered by target_groups[0].discovery "
                      "with other filters; one service, one set of filters")]
    load(base + 'tags = ["v1"]\n')  # same filters (keep_static may differ): fine


def test_register_table():
    lc = load(STATIC + """
[service_discovery]
provider = "consul"
[service_discovery.register]
service = "edge"
tags = ["a"]
meta = { zone = "z1" }
ttl = 10
provider = "etcd"
""")
    reg = lc.model.service_discovery.register
    assert (reg.service, reg.tags, reg.meta, reg.ttl, reg.provider) == (
        "edge", ["a"], {"zone": "z1"}, 10.0, "etcd")


def test_self_registration_with_a_provider_that_cannot_register_is_refused():
    text = STATIC + """
[service_discovery]
provider = "consul"
[service_discovery.register]
provider = "dns"
"""
    assert errors(text) == [(line(text, 'provider = "dns"'), "service_discovery.register.provider",
                             "the dns provider cannot register this node (consul and etcd can)")]
    text = STATIC + """
[service_discovery]
provider = "kubernetes"
[service_discovery.register]
"""
    assert [(n, path) for n, path, _ in errors(text)] == [
        (line(text, 'provider = "kubernetes"'), "service_discovery.provider")]


# ---------------------------------------------------------------- docs

def _section(text: str, heading: str) -> str:
    found = re.search(rf"^#+ {re.escape(heading)}\s*$", text, re.M)
    assert found, f"docs/configuration.md has no heading {heading}"
    rest = text[found.end():]
    following = re.search(r"^#+ ", rest, re.M)
    return rest[:following.start()] if following else rest


@pytest.mark.parametrize("heading, cls", [
    ("`[service_discovery]`", dc.ServiceDiscoveryConfig),
    ("`[service_discovery.register]`", dc.RegisterConfig),
    ("`[service_discovery.consul]`", dc.ConsulOptions),
    ("`[service_discovery.etcd]`", dc.EtcdOptions),
    ("`[service_discovery.kubernetes]`", dc.KubernetesOptions),
    ("`[service_discovery.dns]`", dc.DnsOptions),
    ("`[targets.discovery]`, `[target_groups.discovery]`", dc.DiscoverySource),
])
def test_every_key_is_documented_with_its_default(heading, cls):
    section = _section(DOC.read_text(encoding="utf-8"), heading)
    for field in msgspec.structs.fields(cls):
        if field.encode_name in ("consul", "etcd", "kubernetes", "dns"):
            continue  # sub-tables: their own headings
        row = re.search(rf"^\| `{field.encode_name}` \|(?:[^|\\]|\\.)*\| `?([^|`]*)`? \|",
                        section, re.M)
        assert row, f"docs/configuration.md: {heading} lacks a row for `{field.encode_name}`"
        default = field.default
        if default is msgspec.NODEFAULT or default is None:
            continue
        documented = row.group(1)
        if isinstance(default, bool):
            assert documented == str(default).lower(), field.name
        elif isinstance(default, (int, float)):
            assert float(documented) == float(default), field.name
        elif isinstance(default, str):
            assert documented == f'"{default}"', field.name


def test_registry_credentials_are_masked_in_admin_config():
    lc = load(STATIC + """
[service_discovery.consul]
token = "s3cret"
[service_discovery.etcd]
password = "hunter2"
""")
    data = lc.as_dict()["service_discovery"]
    assert data["consul"]["token"] == "***" and data["etcd"]["password"] == "***"
    assert lc.model.service_discovery.consul.token == "s3cret"
    assert load(STATIC).as_dict()["service_discovery"] is None
