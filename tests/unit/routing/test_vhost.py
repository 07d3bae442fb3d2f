"""Domain interception semantics of the original Dispa `[domains]` section."""

import pytest

from dispa.config.snapshot import InterceptSpec
from dispa.routing.vhost import InterceptTable, normalize_host

SPEC = InterceptSpec(exact=("example.com", "api.myapp.com"),
                     wildcard_suffixes=(".test.com", ".dev.local"),
                     exclude_exact=("health.example.com", "ping.test.com"),
                     exclude_wildcard_suffixes=(".internal.test.com",))


@pytest.mark.parametrize("raw,expected", [
    (b"Example.COM", "example.com"), (b"example.com:8080", "example.com"),
    (b"example.com.", "example.com"), (b"[::1]:8080", "[::1]"), (b"  a.b  ", "a.b"),
    (b"127.0.0.1:80", "127.0.0.1"),
])
def test_normalize_host_lowercases_and_strips_port_and_trailing_dot(raw, expected):
    assert normalize_host(raw) == expected


@pytest.mark.parametrize("host,expected", [
    (b"example.com", True), (b"EXAMPLE.COM:1234", True), (b"www.example.com", False),
    (b"api.myapp.com", True), (b"a.test.com", True), (b"a.b.test.com", True),
    (b"test.com", False), (b"atest.com", False), (b"ping.test.com", False),
    (b"x.internal.test.com", False), (b"health.example.com", False), (b"x.dev.local", True),
    (b"", False),
])
def test_exact_wildcard_and_exclusions(host, expected):
    assert InterceptTable(SPEC).match(host) is expected


def test_wildcards_match_nothing_without_wildcard_support():
    t = InterceptTable(InterceptSpec(exact=("example.com",), wildcard_suffixes=(".test.com",),
                                     wildcard_support=False))
    assert t.match(b"example.com") and not t.match(b"a.test.com")


def test_an_empty_intercept_list_intercepts_every_host_except_exclusions():
    t = InterceptTable(InterceptSpec(exclude_exact=("no.example",)))
    assert t.match(b"anything.org") and t.match(b"127.0.0.1:8080")
    assert not t.match(b"no.example")


def test_memoisation_is_bounded():
    t = InterceptTable(SPEC)
    for i in range(10000):
        t.match(b"h%d.test.com" % i)
    assert len(t._cache) <= 4096
