"""Routing rules on a running dispa-server with real origins: each condition and action,
target groups, canary split, mirroring, per-route plugin chains."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from tests.support.dispa_proc import http_get


def groups(**named) -> str:
    out = []
    for name, origin in named.items():
        out += ["[[target_groups]]", f'name = "{name}"', "[[target_groups.targets]]",
                f'name = "{name}-1"', f'url = "{origin.url}"', "[target_groups.health_check]",
                "enabled = false", ""]
    return "\n".join(out) + "\n"


def last(origin):
    method, target, headers, body = origin.requests[-1]
    return method, target, {k.lower(): v for k, v in headers}, body


@pytest.fixture
def three(origins):
    return origins("origin-default"), origins("origin-api"), origins("origin-canary")


def start(dispa, three, rules: str, **kw):
    default, api, canary = three
    return dispa(targets=[("d", default.url)], extra=groups(api=api, canary=canary) + rules, **kw)


def test_conditions_select_the_target_group(dispa, three):
    default, api, canary = three
    rules = '''
[[routing.rules]]
name = "exact"
priority = 50
target = "canary"
[routing.rules.conditions.path]
exact = "/exact"

[[routing.rules]]
name = "api-prefix"
priority = 40
target = "api"
[routing.rules.conditions]
method = ["GET", "HEAD"]
[routing.rules.conditions.path]
prefix = "/api/"

[[routing.rules]]
name = "by-host"
priority = 30
target = "api"
[routing.rules.conditions.host]
patterns = ["*.api.test"]

[[routing.rules]]
name = "by-header"
priority = 20
target = "canary"
[[routing.rules.conditions.headers]]
name = "x-env"
value = { type = "exact", value = "canary" }

[[routing.rules]]
name = "by-query"
priority = 10
target = "canary"
[[routing.rules.conditions.query_params]]
name = "beta"
value = { type = "exact", value = "1" }

[[routing.rules]]
name = "by-regex"
priority = 5
target = "api"
[routing.rules.conditions.path]
regex = "^/v[0-9]+/"

[[routing.rules]]
name = "by-client"
priority = 1
target = "canary"
[routing.rules.conditions]
client_ip = ["10.0.0.0/8"]
'''
    d = start(dispa, three, rules)

    def who(path, **kw):
        status, headers, body = http_get(d.port, path, **kw)
        assert status == 200, (path, status, body)
        return headers["x-origin"]

    assert who("/exact") == "origin-canary"
    assert who("/api/users") == "origin-api"
    assert who("/api/users", method="POST", body=b"") == "origin-default"  # method condition
    assert who("/", host="x.api.test") == "origin-api"
    assert who("/", host="api.test") == "origin-default"  # wildcard needs a deeper label
    assert who("/", headers={"x-env": "canary"}) == "origin-canary"
    assert who("/?beta=1") == "origin-canary"
    assert who("/?beta=2") == "origin-default"
    assert who("/v2/things") == "origin-api"
    assert who("/other") == "origin-default"  # client 127.0.0.1 is not in 10/8
    _, metrics = d.admin_get("/metrics")
    assert b'dispa_routing_matches_total{rule="api-prefix"} 1' in metrics


def test_actions_rewrite_edit_headers_redirect_and_answer(dispa, three):
    default, api, canary = three
    rules = '''
[[routing.rules]]
name = "rewrite"
target = "api"
[routing.rules.conditions.path]
template = "/users/{id}"
[routing.rules.actions.path]
replace = "/headers"
[routing.rules.actions.headers]
set = { "x-set" = "1" }
remove = ["x-drop"]
rename = { "x-old" = "x-new" }
[routing.rules.actions.response_headers]
set = { "x-route" = "rewrite" }

[[routing.rules]]
name = "strip"
target = "api"
[routing.rules.conditions.path]
prefix = "/svc/"
[routing.rules.actions.path]
strip_prefix = "/svc"
prepend = "/v1"

[[routing.rules]]
name = "redirect"
[routing.rules.conditions.path]
prefix = "/old/"
[routing.rules.actions.redirect]
location = "https://example.com/new{path}"
status = 308

[[routing.rules]]
name = "direct"
[routing.rules.conditions.path]
exact = "/ping"
[routing.rules.actions.custom_response]
status = 418
body = "pong"
headers = { "x-direct" = "yes" }
'''
    d = start(dispa, three, rules)
    status, headers, _ = http_get(d.port, "/users/42", headers={"x-drop": "a", "x-old": "b"})
    assert status == 200 and headers["x-route"] == "rewrite"
    _, target, h, _ = last(api)
    assert target == b"/headers"
    assert h[b"x-set"] == b"1" and b"x-drop" not in h and h[b"x-new"] == b"b" and b"x-old" not in h
    http_get(d.port, "/svc/items?q=1")
    assert last(api)[1] == b"/v1/items?q=1"
    n = sum(len(o.requests) for o in three)
    status, headers, _ = http_get(d.port, "/old/page")
    assert status == 308 and headers["location"] == "https://example.com/new/old/page"
    status, headers, body = http_get(d.port, "/ping")
    assert status == 418 and body == b"pong" and headers["x-direct"] == "yes"
    assert sum(len(o.requests) for o in three) == n  # local answers never reach an origin


def test_weighted_split_sends_the_configured_share(dispa, three):
    default, api, canary = three
    rules = '''
[[routing.rules]]
name = "canary"
[routing.rules.conditions.path]
prefix = "/"
[[routing.rules.actions.split]]
target = "canary"
weight = 20
[[routing.rules.actions.split]]
target = "api"
weight = 80
'''
    d = start(dispa, three, rules)
    for _ in range(400):
        assert http_get(d.port, "/")[0] == 200
    share = len(canary.requests) / 400
    assert len(api.requests) + len(canary.requests) == 400
    assert 0.12 < share < 0.28, share  # 20 % within a binomial 4-sigma band


def test_mirroring_reaches_the_shadow_and_the_client_does_not_wait(dispa, origins):
    main = origins("origin-main")
    shadow = origins("origin-shadow")
    rules = '''
[[routing.rules]]
name = "mirror"
target = "default"
[routing.rules.conditions.path]
prefix = "/"
[routing.rules.actions.mirror]
target = "shadow"
'''
    extra = groups(shadow=shadow) + rules
    d = dispa(targets=[("m", main.url)], extra=extra)
    # the shadow answers /delay after 1.5 s; the client must get its answer long before
    t0 = time.monotonic()
    status, _, body = http_get(d.port, "/echo", method="POST", body=b"copy me")
    assert status == 200 and body == b"copy me"
    t0 = time.monotonic()
    status, _, _ = http_get(d.port, "/delay?ms=1500")
    elapsed = time.monotonic() - t0
    assert status == 200
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and len(shadow.requests) < 2:
        time.sleep(0.02)
    methods = [(m, t, b) for m, t, _, b in shadow.requests]
    assert (b"POST", b"/echo", b"copy me") in methods
    # both copies took 1.5 s (main and shadow delay alike): the client waited for main only
    assert elapsed < 2.5
    _, metrics = d.admin_get("/metrics")
    assert b'dispa_mirror_requests_total{outcome="ok",target="shadow"}' in metrics or \
        b'dispa_mirror_requests_total{target="shadow",outcome="ok"}' in metrics


def test_a_dead_shadow_never_affects_the_client(dispa, origins):
    main = origins("origin-main")
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))
    port = dead.getsockname()[1]
    dead.close()
    extra = f'''
[[target_groups]]
name = "shadow"
[[target_groups.targets]]
name = "s"
url = "http://127.0.0.1:{port}"
[target_groups.health_check]
enabled = false

[[routing.rules]]
name = "mirror"
target = "default"
[routing.rules.conditions.path]
prefix = "/"
[routing.rules.actions.mirror]
target = "shadow"
'''
    d = dispa(targets=[("m", main.url)], extra=extra)
    for _ in range(5):
        assert http_get(d.port, "/")[0] == 200


def test_a_rule_may_name_a_targets_endpoint_like_the_original(dispa, origins):
    a, b = origins("origin-a"), origins("origin-b")
    rules = '''
[[routing.rules]]
name = "to-b"
target = "b"
[routing.rules.conditions.path]
prefix = "/b"
'''
    d = dispa(targets=[("a", a.url), ("b", b.url)], extra=rules)
    assert {http_get(d.port, "/b/x")[1]["x-origin"] for _ in range(4)} == {"origin-b"}


def test_route_plugins_run_only_on_their_route(dispa, three):
    rules = '''
[[plugins.plugins]]
name = "tag"
type = "tests.support.filters:Tag"
global = false
config = { header = "x-tag", value = "route" }

[[routing.rules]]
name = "tagged"
target = "api"
plugins_request = ["tag"]
plugins_response = ["tag"]
[routing.rules.conditions.path]
prefix = "/tagged"
'''
    d = start(dispa, three, rules)
    _, headers, _ = http_get(d.port, "/tagged")
    assert headers.get("x-tag") == "route"
    _, headers, _ = http_get(d.port, "/plain")
    assert "x-tag" not in headers


def test_default_target_applies_when_no_rule_matches(dispa, three):
    rules = '''
[routing]
default_target = "canary"

[[routing.rules]]
name = "api"
target = "api"
[routing.rules.conditions.path]
prefix = "/api"
'''
    d = start(dispa, three, rules)
    assert http_get(d.port, "/api")[1]["x-origin"] == "origin-api"
    assert http_get(d.port, "/x")[1]["x-origin"] == "origin-canary"


GEO_DB = __import__("pathlib").Path(__file__).resolve().parents[3] / "shared" / "data" / \
    "maxmind" / "test-data" / "GeoIP2-City-Test.mmdb"


def test_geo_routing_sends_clients_to_their_region_and_fails_over(dispa, origins):
    eu, us = origins("origin-eu"), origins("origin-us")
    rules = groups(eu=eu, us=us) + f'''
[geo]
database = "{GEO_DB}"
failover = ["eu", "us"]

[[geo.regions]]
name = "eu"
target = "eu"
countries = ["GB", "SE"]
latitude = 51.5
longitude = -0.1

[[geo.regions]]
name = "us"
target = "us"
continents = ["NA"]

[routing]
default_target = "@geo"
'''
    d = dispa(targets=[("d", eu.url)], extra=rules, server_extra='trusted_proxies = ["127.0.0.1/32"]')

    def region(ip):
        return http_get(d.port, "/", headers={"x-forwarded-for": ip})[1]["x-origin"]

    assert region("81.2.69.142") == "origin-eu"     # London, GB (MaxMind test data)
    assert region("89.160.20.112") == "origin-eu"   # Linkoping, SE
    assert region("216.160.83.56") == "origin-us"   # Milton, US
    assert region("10.1.2.3") == "origin-eu"        # unknown: failover order
    # the EU region goes down: London fails over to the next region
    eu.stop()
    http_get(d.port, "/", headers={"x-forwarded-for": "81.2.69.142"})  # marks it down
    assert region("81.2.69.142") == "origin-us"


def test_geo_conditions_in_routing_rules(dispa, origins):
    eu, us = origins("origin-eu"), origins("origin-us")
    rules = groups(eu=eu, us=us) + f'''
[geo]
database = "{GEO_DB}"
[[geo.regions]]
name = "eu"
target = "eu"

[[routing.rules]]
name = "europe"
target = "eu"
[routing.rules.conditions.geo]
continents = ["EU"]

[[routing.rules]]
name = "not-europe"
target = "us"
[routing.rules.conditions.geo]
not_continents = ["EU"]
unknown = false
'''
    d = dispa(targets=[("d", eu.url)], extra=rules,
              server_extra='trusted_proxies = ["127.0.0.1/32"]')

    def who(ip):
        return http_get(d.port, "/", headers={"x-forwarded-for": ip})[1]["x-origin"]

    assert who("81.2.69.142") == "origin-eu"
    assert who("216.160.83.56") == "origin-us"
    assert who("10.9.9.9") == "origin-eu"  # unknown location: neither rule, the default


def test_a_corrupt_geo_database_is_refused_at_load(tmp_path):
    from dispa.config.load import load_config_text
    from dispa.errors import ConfigError

    bad = GEO_DB.parents[1] / "bad-data" / "maxminddb-golang" / "cyclic-data-structure.mmdb"
    if not bad.exists():
        bad = next((GEO_DB.parents[1] / "bad-data").rglob("*.mmdb"))
    text = f'''
[[targets.targets]]
name = "a"
url = "http://127.0.0.1:9"

[geo]
database = "{bad}"
[[geo.regions]]
name = "r"
target = "default"
'''
    with pytest.raises(ConfigError) as err:
        load_config_text(text, fmt="toml", name="g.toml")
    assert "geo.database" in str(err.value) and "GeoIP database" in str(err.value)
