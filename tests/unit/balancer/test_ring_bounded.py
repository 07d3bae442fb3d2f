"""Consistent hashing with bounded loads (``lookup_bounded``) on the ring and on Maglev.

The rule (Mirrokni, Thorup, Zadimoghaddam; HAProxy ``hash-balance-factor``): a key goes to
the first node along its failover walk whose in-flight load is below
``ceil(factor * (sum(loads) + 1) * weight / sum(weights))``. Every test runs on the four
implementations (ring/Maglev × Rust/pure).
"""

from __future__ import annotations

import math

import pytest

from dispa import _rust
from dispa.balancer import _maglev_py, _ring_py


def _ring(cls):
    return lambda nodes: cls(nodes)


def _maglev(cls):
    return lambda nodes: cls(nodes, table_size=1009)


IMPLS = [
    pytest.param(_ring(_rust.Ring), id="ring-rust"),
    pytest.param(_ring(_ring_py.Ring), id="ring-py"),
    pytest.param(_maglev(_rust.Maglev), id="maglev-rust"),
    pytest.param(_maglev(_maglev_py.Maglev), id="maglev-py"),
]


@pytest.fixture(params=IMPLS)
def build(request):
    return request.param


def _nodes(n: int, weights=None) -> list[tuple[str, int]]:
    weights = weights or [1] * n
    return [(f"10.7.0.{i + 1}:8080", w) for i, w in enumerate(weights)]


KEYS = [f"user-{i}".encode() for i in range(3000)]


def test_idle_cluster_is_the_plain_lookup(build):
    t = build(_nodes(6))
    idle = [0] * 6
    for k in KEYS[:1000]:
        assert t.lookup_bounded(k, idle, 1.25) == t.lookup(k)


def test_a_full_owner_spills_to_the_next_node_of_the_walk(build):
    t = build(_nodes(5))
    for k in KEYS[:500]:
        walk = t.lookup_n(k, 5)
        loads = [0] * 5
        loads[walk[0]] = 20  # capacity ceil(1.25 * 21 / 5) = 6
        assert t.lookup_bounded(k, loads, 1.25) == walk[1]
        loads[walk[1]] = 20  # total 40: capacity ceil(1.25 * 41 / 5) = 11
        assert t.lookup_bounded(k, loads, 1.25) == walk[2]
        # Strictly below capacity: with the second node at 20, the owner at 6 has room
        # (ceil(1.25 * 27 / 5) = 7), at 7 it has not (ceil(1.25 * 28 / 5) = 7).
        loads[walk[0]] = 6
        assert t.lookup_bounded(k, loads, 1.25) == walk[0]
        loads[walk[0]] = 7
        assert t.lookup_bounded(k, loads, 1.25) == walk[2]


def test_capacity_formula_at_the_boundary(build):
    t = build(_nodes(4))
    k = KEYS[0]
    owner = t.lookup(k)
    loads = [3, 3, 3, 3]
    # total 12, +1: 1.25 * 13 / 4 = 4.0625 -> 5; owner at 4 has room, at 5 it has not.
    loads[owner] = 4
    assert t.lookup_bounded(k, loads, 1.25) == owner
    loads[owner] = 5
    # total 14, +1: 1.25 * 15 / 4 = 4.6875 -> 5: full.
    assert t.lookup_bounded(k, loads, 1.25) != owner


def test_weights_scale_capacity(build):
    t = build(_nodes(2, [1, 3]))
    # total 8 + 1 = 9: capacities ceil(1.0 * 9 * 1/4) = 3 and ceil(9 * 3/4) = 7.
    assert _ring_py.bounded_capacities([4, 4], [1, 3], 1.0) == [3, 7]
    # total 9 + 1 = 10: capacities 3 and 8.
    assert _ring_py.bounded_capacities([1, 8], [1, 3], 1.0) == [3, 8]
    for k in KEYS[:200]:
        assert t.lookup_bounded(k, [4, 4], 1.0) == 1  # the weight-1 node is full at 3
        assert t.lookup_bounded(k, [1, 8], 1.0) == 0  # the weight-3 node is full at 8
        assert t.lookup_bounded(k, [2, 7], 1.0) == t.lookup(k)  # both have room


def test_simulated_stream_never_exceeds_the_bound(build):
    n, factor = 8, 1.25
    t = build(_nodes(n))
    loads = [0] * n
    for i in range(6000):
        # A skewed stream: one request in three carries the same hot key.
        k = b"hot" if i % 3 == 0 else KEYS[i % len(KEYS)]
        node = t.lookup_bounded(k, loads, factor)
        assert loads[node] < math.ceil(factor * (sum(loads) + 1) / n)
        loads[node] += 1
        if i % 7 == 0:  # some requests finish
            j = max(range(n), key=loads.__getitem__)
            loads[j] -= 1
    assert max(loads) <= math.ceil(factor * sum(loads) / n) + 1


@pytest.mark.parametrize("loads, factor, exc", [
    ([0, 0], 1.25, ValueError),          # wrong length
    ([0, 0, 0, 0], 1.25, ValueError),
    ([0, 0, 0], 0.99, ValueError),       # below 1
    ([0, 0, 0], float("nan"), ValueError),
    ([0, 0, 0], float("inf"), ValueError),
    ([0, 0, 0], 2e6, ValueError),
    ([0, -1, 0], 1.25, OverflowError),   # u64 in the binding
    ([0, 2**64, 0], 1.25, OverflowError),
    ([0, 1.5, 0], 1.25, TypeError),
    ("abc", 1.25, TypeError),
    ([0, 0, 0], "1.25", TypeError),
])
def test_bad_arguments(build, loads, factor, exc):
    with pytest.raises(exc):
        build(_nodes(3)).lookup_bounded(b"k", loads, factor)


def test_integer_factor_and_tuple_loads_are_accepted(build):
    t = build(_nodes(3))
    assert t.lookup_bounded(b"k", (0, 0, 0), 2) == t.lookup(b"k")
