"""The selectors behind ``[targets.load_balancing] type`` and consistent hashing.

Table-driven where the behaviour is a sequence; statistical where it is a distribution
(10k picks, weights honoured within 5% relative).
"""

from __future__ import annotations

import random
from collections import Counter

import pytest

from dispa import _native
from dispa.balancer import (
    SELECTORS,
    ConsistentHash,
    LeastConnections,
    RoundRobin,
    Selector,
    SmoothWeighted,
    WeightedRandom,
    build_selector,
)
from dispa.balancer import _ring_py

PICKS = 10_000
# Random picks are binomial: over 10k picks the weight-1 endpoint of [1, 2, 3, 4] has a 3%
# relative standard deviation, so "within 5%" would be a 1.7-sigma test. 100k picks make it
# a 5-sigma one.
RANDOM_PICKS = 100_000


def _build(kind: str, weights):
    if kind == "random":
        return WeightedRandom(weights, rng=random.Random(1234))
    return build_selector(kind, weights)


ALL_KINDS = sorted(SELECTORS)


def _rings():
    out = [pytest.param(_ring_py.Ring, id="ring-py")]
    if _native.rust is not None:
        out.insert(0, pytest.param(_native.rust.Ring, id="ring-rust"))
    return out


# --------------------------------------------------------------------------- registry

def test_registry_matches_config_values():
    assert set(SELECTORS) == {"roundrobin", "weighted", "leastconnections", "random"}


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_every_selector_satisfies_the_protocol(kind):
    assert isinstance(build_selector(kind, [1, 2]), Selector)


def test_consistent_satisfies_the_protocol():
    assert isinstance(ConsistentHash([("a:1", 1)]), Selector)


@pytest.mark.parametrize("weights, exc", [([], ValueError), ([1, 0], ValueError), ([-1], ValueError),
                                          ([1.5], TypeError)])
@pytest.mark.parametrize("kind", ALL_KINDS)
def test_bad_weights_rejected(kind, weights, exc):
    with pytest.raises(exc):
        build_selector(kind, weights)


def test_unknown_kind_rejected():
    with pytest.raises(ValueError, match="unknown load balancing type"):
        build_selector("fastest", [1])


# --------------------------------------------------------------------------- sequences

def test_round_robin_rotates_ignoring_weights():
    s = build_selector("roundrobin", [5, 1, 1])
    assert [s.pick(None) for _ in range(7)] == [0, 1, 2, 0, 1, 2, 0]


def test_round_robin_skips_unhealthy_keeping_rotation():
    s = build_selector("roundrobin", [1, 1, 1, 1])
    healthy = [True, False, True, True]
    assert [s.pick(healthy) for _ in range(6)] == [0, 2, 3, 0, 2, 3]


def test_weighted_matches_nginx_smooth_sequence():
    # nginx's documented example: weights {a: 5, b: 1, c: 1} -> a a b a c a a
    s = build_selector("weighted", [5, 1, 1])
    assert ["abc"[s.pick(None)] for _ in range(14)] == list("aabacaa" * 2)


def test_weighted_skips_unhealthy_and_keeps_ratio_of_others():
    s = build_selector("weighted", [5, 3, 1])
    healthy = [False, True, True]
    picks = Counter(s.pick(healthy) for _ in range(400))
    assert picks == {1: 300, 2: 100}


def test_weighted_recovers_exact_cycle_after_outage():
    s = build_selector("weighted", [2, 1])
    for _ in range(5):
        s.pick([False, True])
    picks = Counter(s.pick(None) for _ in range(300))
    assert abs(picks[0] - 200) <= 3 and abs(picks[1] - 100) <= 3


def test_least_conn_picks_fewest_in_flight():
    s = build_selector("leastconnections", [1, 1, 1])
    for i in (0, 0, 1):
        s.acquire(i)
    assert s.pick(None) == 2
    s.acquire(2)
    assert s.pick(None) in (1, 2)
    s.release(0)
    s.release(0)
    assert s.pick(None) == 0


def test_least_conn_ties_share_by_smooth_weighted_round_robin():
    s = build_selector("leastconnections", [1, 3, 3])
    # All idle (no acquire): ties are broken by smooth weighted round robin, as nginx does,
    # so over 7 picks the shares are exactly 1:3:3.
    picks = [s.pick(None) for _ in range(7 * 10)]
    assert [picks.count(i) for i in range(3)] == [10, 30, 30]
    # an endpoint with fewer in flight per weight wins outright
    s.acquire(1)
    s.acquire(2)
    assert s.pick(None) == 0

def test_least_conn_spreads_concurrent_requests():
    s = build_selector("leastconnections", [1, 1, 1, 1])
    started = []
    for _ in range(8):
        i = s.pick(None)
        s.acquire(i)
        started.append(i)
    assert Counter(started) == {0: 2, 1: 2, 2: 2, 3: 2}
    for i in started:
        s.release(i)
    assert all(s.inflight(i) == 0 for i in range(4))


def test_least_conn_release_never_goes_negative():
    s = build_selector("leastconnections", [1, 1])
    s.release(0)
    assert s.inflight(0) == 0
    s.acquire(1)
    assert s.pick(None) == 0


def test_least_conn_skips_unhealthy_even_when_idle():
    s = build_selector("leastconnections", [1, 1])
    s.acquire(1)
    s.acquire(1)
    assert s.pick([False, True]) == 1


# --------------------------------------------------------------------------- distributions

@pytest.mark.parametrize("kind", ["weighted", "random"])
def test_weights_honoured_within_5_percent(kind):
    weights = [1, 2, 3, 4]
    s = _build(kind, weights)
    n = RANDOM_PICKS if kind == "random" else PICKS
    picks = Counter(s.pick(None) for _ in range(n))
    for i, w in enumerate(weights):
        want = n * w / sum(weights)
        assert abs(picks[i] - want) / want < 0.05, (i, picks)


@pytest.mark.parametrize("kind", ["roundrobin", "leastconnections"])
def test_unweighted_kinds_spread_evenly(kind):
    s = _build(kind, [1, 1, 1, 1, 1])
    picks = Counter(s.pick(None) for _ in range(PICKS))
    assert all(abs(c - PICKS / 5) / (PICKS / 5) < 0.05 for c in picks.values()), picks


@pytest.mark.parametrize("kind", ["weighted", "random"])
def test_shares_of_healthy_kept_when_one_is_down(kind):
    weights = [1, 2, 3, 4]
    healthy = [True, True, False, True]
    s = _build(kind, weights)
    n = RANDOM_PICKS if kind == "random" else PICKS
    picks = Counter(s.pick(healthy) for _ in range(n))
    assert 2 not in picks
    total = 1 + 2 + 4
    for i in (0, 1, 3):
        want = n * weights[i] / total
        assert abs(picks[i] - want) / want < 0.05, (i, picks)


# --------------------------------------------------------------------------- availability

@pytest.mark.parametrize("kind", ALL_KINDS)
def test_minus_one_when_all_down(kind):
    s = _build(kind, [1, 2, 3])
    assert s.pick([False, False, False]) == -1
    assert s.pick_excluding([False, False, False], {0}) == -1


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_never_picks_unhealthy(kind):
    s = _build(kind, [3, 1, 2, 1])
    healthy = [False, True, False, True]
    assert {s.pick(healthy) for _ in range(500)} <= {1, 3}


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_pick_excluding(kind):
    s = _build(kind, [1, 2, 3, 4])
    for _ in range(300):
        assert s.pick_excluding(None, {0, 3}) in (1, 2)
        assert s.pick_excluding([True, False, True, True], {0, 3}) == 2
    assert s.pick_excluding(None, {0, 1, 2, 3}) == -1
    assert s.pick_excluding([True, True, False, True], {0, 1, 3}) == -1
    # An empty exclude set behaves like pick.
    assert s.pick_excluding(None, set()) in range(4)


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_single_endpoint(kind):
    s = _build(kind, [7])
    assert [s.pick(None) for _ in range(5)] == [0] * 5
    assert s.pick([False]) == -1
    assert s.pick_excluding(None, {0}) == -1


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_acquire_release_accepted_by_all(kind):
    s = _build(kind, [1, 1])
    s.acquire(0)
    s.release(0)
    s.release(1)


def test_random_float_edge_is_clamped():
    class Edge:
        def random(self):
            return 1.0 - 2 ** -53

    s = WeightedRandom([1, 1, 1], rng=Edge())
    assert s.pick(None) == 2
    assert s.pick([True, True, False]) == 1


# --------------------------------------------------------------------------- consistent

@pytest.mark.parametrize("ring", _rings())
def test_consistent_is_sticky_per_key_and_matches_the_ring(ring):
    nodes = [(f"10.0.0.{i}:80", 1) for i in range(1, 6)]
    s = ConsistentHash(nodes, ring=ring)
    ref = _ring_py.Ring(nodes)
    for k in (b"/a", b"/b", b"user-42", b""):
        assert s.pick(None, k) == s.pick(None, k) == ref.lookup(k)
    assert s.pick(None, None) == ref.lookup(b"")


@pytest.mark.parametrize("ring", _rings())
def test_consistent_fails_over_along_the_ring(ring):
    nodes = [(f"10.0.0.{i}:80", 1) for i in range(1, 6)]
    s = ConsistentHash(nodes, ring=ring)
    ref = _ring_py.Ring(nodes)
    keys = [f"k{i}".encode() for i in range(500)]
    healthy = [True, False, True, True, True]
    for k in keys:
        walk = ref.lookup_n(k, 5)
        got = s.pick(healthy, k)
        assert got == next(i for i in walk if healthy[i])
        # Keys not owned by the down endpoint stay where they were.
        if walk[0] != 1:
            assert got == walk[0]
        assert s.pick_excluding(None, {walk[0]}, k) == walk[1]
    assert s.pick([False] * 5, b"x") == -1
    assert s.pick_excluding(None, set(range(5)), b"x") == -1


def test_consistent_uses_the_compiled_ring_when_built():
    s = ConsistentHash([("a:1", 1)])
    expected = _native.rust.Ring if _native.rust is not None else _ring_py.Ring
    assert type(s.ring) is expected


def test_consistent_rejects_bad_nodes():
    with pytest.raises(ValueError):
        ConsistentHash([])
    with pytest.raises(ValueError):
        ConsistentHash([("a:1", 0)])
