"""Micro-benchmark: ``RouteTable.match`` against 10,000 routing rules.

Run: ``python -m pytest perf/micro/bench_routes.py --benchmark-only`` (figures), or with
``--benchmark-disable`` to run each case once as a test (quick; CI does this).

Fixture: 10,000 enabled rules, priorities mixed, in four kinds of 2,500 each:

- exact host   ``app{i}.example.com`` + path prefix ``/api/{i}/``
- wildcard     ``*.tenant{i}.example.net`` + path prefix ``/``
- prefix       no host, ``GET``/``HEAD`` + path prefix ``/svc{i}/``
- regex        no host, ``^/r{i}/v[0-9]+/items/(?P<id>[0-9]+)$`` (a path parameter)

plus a catch-all at the lowest priority, so a miss walks every index. Each case measures one
``match`` call with a real browser header list (what the proxy does per request). A separate
table of 1,000 *unanchored* regex rules (``/legacy{i}\\.php$``, nothing to index them by)
shows the worst case: one joined alternation scanned in C.
"""

from __future__ import annotations

import msgspec
import pytest

from dispa.config.routing_model import RoutingConfig, check_routing
from dispa.routing.rules import RouteTable

N_PER_KIND = 2500

HEADERS = [
    (b"Host", b""), (b"Connection", b"keep-alive"),
    (b"User-Agent", b"Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
                    b"Chrome/124.0.0.0 Safari/537.36"),
    (b"Accept", b"text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"),
    (b"Accept-Encoding", b"gzip, deflate, br, zstd"), (b"Accept-Language", b"en-US,en;q=0.9"),
]


def _rules() -> list[dict]:
    rules = []
    for i in range(N_PER_KIND):
        rules.append({"name": f"exact{i}", "priority": i % 7, "target": "t", "conditions": {
            "host": {"patterns": [f"app{i}.example.com"]}, "path": {"prefix": f"/api/{i}/"}}})
        rules.append({"name": f"wild{i}", "priority": i % 5, "target": "t", "conditions": {
            "host": {"patterns": [f"*.tenant{i}.example.net"]}, "path": {"prefix": "/"}}})
        rules.append({"name": f"prefix{i}", "priority": i % 3, "target": "t", "conditions": {
            "method": ["GET", "HEAD"], "path": {"prefix": f"/svc{i}/"}}})
        rules.append({"name": f"regex{i}", "priority": i % 4, "target": "t", "conditions": {
            "path": {"regex": f"^/r{i}/v[0-9]+/items/(?P<id>[0-9]+)$"}}})
    rules.append({"name": "catch-all", "priority": -1, "target": "t",
                  "conditions": {"headers": [{"name": "x-never"}]}})
    return rules


def _build(rules: list[dict]) -> RouteTable:
    config = msgspec.convert({"rules": rules}, RoutingConfig)
    problems: list = []
    check_routing(config, targets={"t"}, plugins=set(), issue=lambda *a: problems.append(a))
    assert not problems, problems[:3]
    return RouteTable.build(config)


@pytest.fixture(scope="module")
def rules() -> list[dict]:
    return _rules()


@pytest.fixture(scope="module")
def table(rules) -> RouteTable:
    t = _build(rules)
    assert len(t) == 4 * N_PER_KIND + 1
    return t


@pytest.fixture(scope="module")
def legacy() -> RouteTable:
    return _build([{"name": f"legacy{i}", "target": "t",
                    "conditions": {"path": {"regex": f"/legacy{i}\\.php$"}}}
                   for i in range(1000)])


def _match(benchmark, table, host, path, query=""):
    """One ``match`` call, measured without a wrapper frame."""
    return benchmark(table.match, b"GET", host, path, query, HEADERS, "10.0.0.7")


@pytest.mark.benchmark(group="route-match-10k")
def test_match_exact_host(benchmark, table):
    m = _match(benchmark, table, "app1234.example.com", "/api/1234/users/7")
    assert m.route.name == "exact1234"


@pytest.mark.benchmark(group="route-match-10k")
def test_match_wildcard_host(benchmark, table):
    m = _match(benchmark, table, "eu.web.tenant777.example.net:8443", "/index.html")
    assert m.route.name == "wild777"


@pytest.mark.benchmark(group="route-match-10k")
def test_match_prefix(benchmark, table):
    m = _match(benchmark, table, "www.example.org", "/svc2000/orders/17", "page=2")
    assert m.route.name == "prefix2000"


@pytest.mark.benchmark(group="route-match-10k")
def test_match_regex_with_params(benchmark, table):
    m = _match(benchmark, table, "www.example.org", "/r1500/v2/items/99")
    assert m.route.name == "regex1500" and m.params == {"id": "99"}


@pytest.mark.benchmark(group="route-match-10k")
def test_match_miss(benchmark, table):
    assert _match(benchmark, table, "www.example.org", "/nothing/here/at/all") is None


@pytest.mark.benchmark(group="route-match-1k-unanchored-regex")
def test_match_unanchored_regex_hit(benchmark, legacy):
    m = _match(benchmark, legacy, "www.example.org", "/old/site/legacy500.php")
    assert m.route.name == "legacy500"


@pytest.mark.benchmark(group="route-match-1k-unanchored-regex")
def test_match_unanchored_regex_miss(benchmark, legacy):
    assert _match(benchmark, legacy, "www.example.org", "/old/site/index.html") is None


@pytest.mark.benchmark(group="route-build-10k")
def test_build(benchmark, rules):
    config = msgspec.convert({"rules": rules}, RoutingConfig)
    t = benchmark.pedantic(RouteTable.build, (config,), rounds=3, iterations=1)
    assert len(t) == 4 * N_PER_KIND + 1
