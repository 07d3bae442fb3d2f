"""DNS provider logic without a network: the TTL cache (clamps, negative caching, expiry),
SRV priority/weight selection, and resolution from a pre-filled cache (a fake clock).

Against a real DNS server (dnsmasq): tests/e2e/test_discovery_dns.py.
"""

from __future__ import annotations

import asyncio

import pytest

from dispa.discovery.config import DiscoverySource, DnsOptions, ServiceDiscoveryConfig
from dispa.discovery.dns import DnsCache, DnsProvider, SrvRecord, select_srv


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_positive_ttls_are_clamped_to_min_and_max():
    clock = Clock()
    cache = DnsCache(min_ttl=2, max_ttl=60, negative_ttl=5, clock=clock)
    assert cache.put("a.", "A", ("10.0.0.1",), ttl=0) == clock.now + 2
    assert cache.put("b.", "A", ("10.0.0.2",), ttl=3600) == clock.now + 60
    assert cache.put("c.", "A", ("10.0.0.3",), ttl=30) == clock.now + 30
    clock.now += 1.9
    assert cache.get("a.", "A") == (("10.0.0.1",), 1002.0)
    clock.now += 0.1
    assert cache.get("a.", "A") is None  # expired at exactly min_ttl
    clock.now += 57.9
    assert cache.get("b.", "A") is not None
    clock.now += 0.1
    assert cache.get("b.", "A") is None
    assert len(cache) == 1  # c. (30 s) expired too but was not looked up


def test_negative_answers_are_cached_for_negative_ttl():
    clock = Clock()
    cache = DnsCache(min_ttl=1, max_ttl=300, negative_ttl=5, clock=clock)
    cache.put_negative("gone.", "SRV")
    assert cache.get("gone.", "SRV") == ((), 1005.0)
    assert cache.is_negative("gone.", "SRV")
    clock.now += 4.99
    assert cache.get("gone.", "SRV") == ((), 1005.0)
    clock.now += 0.01
    assert cache.get("gone.", "SRV") is None and not cache.is_negative("gone.", "SRV")


def test_zero_negative_ttl_caches_nothing():
    clock = Clock()
    cache = DnsCache(min_ttl=0, max_ttl=300, negative_ttl=0, clock=clock)
    cache.put_negative("gone.", "A")
    assert cache.get("gone.", "A") is None


def srv(priority, weight, port, target):
    return SrvRecord(priority, weight, port, target)


def test_srv_uses_the_lowest_priority_group_with_its_weights():
    records = [srv(10, 60, 8001, "a.test"), srv(10, 0, 8002, "b.test"),
               srv(20, 100, 8003, "c.test")]
    addresses = {"a.test": ("10.0.0.1",), "b.test": ("10.0.0.2", "fd00::2"),
                 "c.test": ("10.0.0.3",)}
    got = [(e.host, e.port, e.weight) for e in select_srv(records, addresses)]
    # weight 0 ("rarely") becomes 1: the balancers take weights >= 1
    assert got == [("10.0.0.1", 8001, 60), ("10.0.0.2", 8002, 1), ("fd00::2", 8002, 1)]


def test_srv_falls_back_to_the_next_priority_when_a_group_has_no_targets():
    records = [srv(1, 10, 8001, "."), srv(1, 10, 8002, "unresolved.test"),
               srv(5, 10, 8003, "c.test"), srv(9, 10, 8004, "d.test")]
    addresses = {"unresolved.test": (), "c.test": ("10.0.0.3",), "d.test": ("10.0.0.4",)}
    assert [e.port for e in select_srv(records, addresses)] == [8003]


def test_srv_with_nothing_usable_is_empty():
    assert select_srv([], {}) == ()
    assert select_srv([srv(0, 0, 1, ".")], {}) == ()


def provider(clock, **dns):
    settings = ServiceDiscoveryConfig(provider="dns", dns=DnsOptions(**dns))
    # the resolver address is never contacted: every answer comes from the cache
    return DnsProvider("dns", settings, [], clock=clock)


def test_resolve_srv_from_the_cache_and_the_earliest_expiry():
    clock = Clock()
    p = provider(clock, resolvers=["127.0.0.1:9"], min_ttl=1, max_ttl=300)
    p.cache.put("_http._tcp.api.test.", "SRV",
                (srv(1, 5, 8001, "a.test"), srv(1, 1, 8002, "b.test")), ttl=60)
    p.cache.put("a.test.", "A", ("10.0.0.1",), ttl=30)
    p.cache.put_negative("a.test.", "AAAA")
    p.cache.put("b.test.", "A", ("10.0.0.2",), ttl=10)
    p.cache.put("b.test.", "AAAA", ("fd00::2",), ttl=120)
    endpoints, expires = asyncio.run(p.resolve(DiscoverySource(service="_http._tcp.api.test")))
    assert sorted((e.host, e.port, e.weight) for e in endpoints) == [
        ("10.0.0.1", 8001, 5), ("10.0.0.2", 8002, 1), ("fd00::2", 8002, 1)]
    assert expires == clock.now + 5  # the negative AAAA of a.test (negative_ttl 5) first
    assert p.queries == 0


def test_resolve_a_records_with_the_source_port():
    clock = Clock()
    p = provider(clock, resolvers=["127.0.0.1:9"])
    p.cache.put("api.test.", "A", ("10.0.0.1", "10.0.0.2"), ttl=0.2)  # clamped to 1 s
    endpoints, expires = asyncio.run(p.resolve(
        DiscoverySource(service="api.test.", record="A", port=8080)))
    assert [(e.host, e.port) for e in endpoints] == [("10.0.0.1", 8080), ("10.0.0.2", 8080)]
    assert expires == clock.now + 1


def test_nxdomain_in_the_cache_is_an_empty_answer_not_an_error():
    clock = Clock()
    p = provider(clock, resolvers=["127.0.0.1:9"])
    p.cache.put_negative("gone.test.", "AAAA")
    endpoints, _ = asyncio.run(p.resolve(
        DiscoverySource(service="gone.test", record="AAAA", port=80)))
    assert endpoints == ()


@pytest.mark.parametrize("text, expected", [
    ("127.0.0.1", ("127.0.0.1", 53)), ("127.0.0.1:5353", ("127.0.0.1", 5353)),
    ("[::1]:5353", ("::1", 5353)), ("::1", ("::1", 53)), ("[::1]", ("::1", 53))])
def test_resolver_addresses(text, expected):
    from dispa.discovery.config import resolver_address
    assert resolver_address(text) == expected


def test_names_nobody_asks_for_any_more_are_pruned():
    """SRV targets come and go: their expired entries must not pile up forever."""
    now = [0.0]
    cache = DnsCache(min_ttl=1, max_ttl=10, negative_ttl=1, clock=lambda: now[0])
    for n in range(1000):
        cache.put(f"t{n}.example.", "A", ("10.0.0.1",), ttl=1)
        now[0] += 0.1  # each entry lives 1 s: about ten are live at any time
    assert len(cache) < 64 * 2
    assert cache.get("t999.example.", "A") is not None  # live entries are kept
