"""Hypothesis properties of the ketama ring, the Maglev table and bounded loads.

Two kinds of property live here:

* **Exact** ones (the twins agree; a removed node's keys and only those move; an added node
  only takes keys) run on random inputs with Hypothesis' normal random search.
* **Statistical** ones (load spread, moved fraction, weights) hold with high probability,
  not always: a ketama node's share of the circle has a relative spread of about
  ``1/sqrt(points)``. They run with ``derandomize=True`` (a fixed example sequence, no
  example database) so CI is deterministic, and their bounds are set at 3-4 sigma of the
  measured spread (docs/consistent-hashing.md has the measurements).

Measured spread (coefficient of variation of keys per node, 200k keys, 120 random node
sets per row): nginx's 160 points per weight give a mean of 6-8% (95th percentile ~11%),
so 160 does **not** reach 5%; 1000 give 2.6-3.2% (p95 4.1-4.5%); 1600 kept every one of
480 sets below 4.7%. Maglev's spread is only the key sampling noise.
"""

from __future__ import annotations

import statistics

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from dispa import _rust  # imported directly: a missing build fails here, it never skips
from dispa.balancer import _maglev_py, _ring_py
from dispa.balancer.consistent import ConsistentHash

#: The points per weight at which the ring's load CV stays below 5% for any node set.
BALANCED_PPW = 1600

KEYS_20K = [f"/objects/{i}?v=1".encode() for i in range(20_000)]
KEYS_200K = [f"key-{i}".encode() for i in range(200_000)]

STATISTICAL = settings(max_examples=25, deadline=None, derandomize=True, database=None,
                       suppress_health_check=[HealthCheck.too_slow])
EXACT = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

PRIMES = [2, 3, 5, 7, 11, 13, 101, 251, 1009, 4099, 65537]

names = st.text(min_size=0, max_size=24)
node_lists = st.lists(st.tuples(names, st.integers(min_value=1, max_value=5)), min_size=1, max_size=12)
keys = st.lists(st.binary(max_size=64), min_size=1, max_size=40)


def _distinct_nodes(n: int, seed: int, weight: int = 1) -> list[tuple[str, int]]:
    return [(f"10.{seed % 250}.{i // 250}.{i % 250 + 1}:{8000 + seed % 1000}", weight) for i in range(n)]


def _cv(counts: list[int]) -> float:
    return statistics.pstdev(counts) / statistics.mean(counts)


def _counts(table, ks) -> list[int]:
    counts = [0] * len(table)
    for i in table.lookup_many(ks):
        counts[i] += 1
    return counts


# --------------------------------------------------------------------------- the twins agree

@EXACT
@given(nodes=node_lists, ppw=st.integers(1, 200), ks=keys, n=st.integers(0, 14),
       data=st.data())
def test_ring_twins_agree_including_bounded_loads(nodes, ppw, ks, n, data):
    rust = _rust.Ring(nodes, points_per_weight=ppw)
    py = _ring_py.Ring(nodes, points_per_weight=ppw)
    assert rust.lookup_many(ks) == py.lookup_many(ks)
    loads = data.draw(st.lists(st.integers(0, 50), min_size=len(nodes), max_size=len(nodes)))
    factor = data.draw(st.floats(1.0, 3.0))
    for k in ks:
        assert rust.lookup_n(k, n) == py.lookup_n(k, n)
        assert rust.lookup_bounded(k, loads, factor) == py.lookup_bounded(k, loads, factor)


@EXACT
@given(nodes=node_lists, size=st.sampled_from(PRIMES), ks=keys, n=st.integers(0, 14),
       data=st.data())
def test_maglev_twins_agree_including_bounded_loads(nodes, size, ks, n, data):
    assume(size >= len(nodes))
    rust = _rust.Maglev(nodes, table_size=size)
    py = _maglev_py.Maglev(nodes, table_size=size)
    assert rust.slot_counts() == py.slot_counts()
    assert rust.lookup_many(ks) == py.lookup_many(ks)
    loads = data.draw(st.lists(st.integers(0, 50), min_size=len(nodes), max_size=len(nodes)))
    factor = data.draw(st.floats(1.0, 3.0))
    for k in ks:
        assert rust.lookup_n(k, n) == py.lookup_n(k, n)
        assert rust.lookup_bounded(k, loads, factor) == py.lookup_bounded(k, loads, factor)


@EXACT
@given(weights=st.lists(st.integers(1, 4), min_size=2, max_size=8),
       mode=st.sampled_from(["nginx", "maglev"]),
       factor=st.floats(1.0, 2.0),
       ops=st.lists(st.tuples(st.binary(max_size=8), st.booleans()), min_size=1, max_size=60))
def test_bounded_selectors_agree_across_twins(weights, mode, factor, ops):
    nodes = [(f"10.9.0.{i + 1}:80", w) for i, w in enumerate(weights)]
    impls = ((_rust.Ring, _ring_py.Ring) if mode == "nginx" else (_rust.Maglev, _maglev_py.Maglev))
    a, b = (ConsistentHash(nodes, mode=mode, table_size=251, bounded_factor=factor, ring=c) for c in impls)
    healthy = [i % 3 != 1 for i in range(len(nodes))]
    for key, finish in ops:
        pa, pb = a.pick(None, key), b.pick(None, key)
        assert pa == pb
        a.acquire(pa)
        b.acquire(pb)
        assert a.pick(healthy, key) == b.pick(healthy, key)
        if finish:
            a.release(pa)
            b.release(pb)
    assert a.loads() == b.loads()


# --------------------------------------------------------------------------- exact disruption

@EXACT
@given(n=st.integers(2, 16), seed=st.integers(0, 10_000), ppw=st.integers(1, 200),
       impl=st.sampled_from([_rust.Ring, _ring_py.Ring]), data=st.data())
def test_ring_removing_a_node_moves_exactly_its_keys_to_their_next_node(n, seed, ppw, impl, data):
    nodes = _distinct_nodes(n, seed)
    gone = data.draw(st.integers(0, n - 1))
    full = impl(nodes, points_per_weight=ppw)
    rest = [i for i in range(n) if i != gone]
    less = impl([nodes[i] for i in rest], points_per_weight=ppw)
    ks = KEYS_20K[:2000]
    before = full.lookup_many(ks)
    after = [rest[i] for i in less.lookup_many(ks)]
    for k, a, b in zip(ks, before, after):
        if a == gone:
            assert b == full.lookup_n(k, 2)[1]
        else:
            assert a == b


@EXACT
@given(n=st.integers(1, 16), seed=st.integers(0, 10_000), ppw=st.integers(1, 200),
       impl=st.sampled_from([_rust.Ring, _ring_py.Ring]))
def test_ring_adding_a_node_only_moves_keys_onto_it(n, seed, ppw, impl):
    nodes = _distinct_nodes(n, seed)
    ks = KEYS_20K[:2000]
    before = impl(nodes, points_per_weight=ppw).lookup_many(ks)
    after = impl(nodes + [("172.31.255.254:1", 1)], points_per_weight=ppw).lookup_many(ks)
    assert all(b in (a, n) for a, b in zip(before, after))


# --------------------------------------------------------------------------- statistical

@STATISTICAL
@given(n=st.integers(3, 12), seed=st.integers(0, 10_000), data=st.data())
def test_removing_one_of_n_moves_about_one_nth_of_the_keys(n, seed, data):
    nodes = _distinct_nodes(n, seed)
    gone = data.draw(st.integers(0, n - 1))
    rest = [nodes[i] for i in range(n) if i != gone]
    ks = KEYS_200K[:100_000]
    for build in (lambda ns: _rust.Ring(ns, points_per_weight=BALANCED_PPW), _rust.Maglev):
        before = build(nodes).lookup_many(ks)
        idx = [i for i in range(n) if i != gone]
        after = [idx[i] for i in build(rest).lookup_many(ks)]
        moved = sum(a != b for a, b in zip(before, after)) / len(ks)
        assert abs(moved - 1 / n) < 0.10 / n, (build, moved, 1 / n)


@STATISTICAL
@given(n=st.integers(3, 12), seed=st.integers(0, 10_000))
def test_adding_one_to_n_moves_about_one_in_n_plus_one(n, seed):
    nodes = _distinct_nodes(n, seed)
    ks = KEYS_200K[:100_000]
    for build in (lambda ns: _rust.Ring(ns, points_per_weight=BALANCED_PPW), _rust.Maglev):
        before = build(nodes).lookup_many(ks)
        after = build(nodes + [(f"172.16.{seed % 250}.1:80", 1)]).lookup_many(ks)
        moved = sum(a != b for a, b in zip(before, after)) / len(ks)
        want = 1 / (n + 1)
        assert abs(moved - want) < 0.10 * want, (build, moved, want)


@STATISTICAL
@given(n=st.integers(3, 12), seed=st.integers(0, 10_000), data=st.data())
def test_nginx_placement_moves_the_removed_nodes_share_within_ketama_spread(n, seed, data):
    # At nginx's 160 points the moved fraction is the removed node's share, whose relative
    # spread is ~1/sqrt(160) = 7.9%: bound it at 4 sigma.
    nodes = _distinct_nodes(n, seed)
    gone = data.draw(st.integers(0, n - 1))
    ks = KEYS_200K[:100_000]
    before = _rust.Ring(nodes).lookup_many(ks)
    moved = before.count(gone) / len(ks)
    assert abs(moved - 1 / n) < 4 / 160 ** 0.5 / n


@STATISTICAL
@given(n=st.integers(3, 40), seed=st.integers(0, 10_000))
def test_load_cv_below_5_percent_at_balanced_points_and_for_maglev(n, seed):
    nodes = _distinct_nodes(n, seed)
    assert _cv(_counts(_rust.Ring(nodes, points_per_weight=BALANCED_PPW), KEYS_200K)) < 0.05
    assert _cv(_counts(_rust.Maglev(nodes), KEYS_200K)) < 0.05


def test_nginx_160_points_do_not_reach_5_percent():
    # Documents why points_per_weight exists: nginx's placement spreads load with a CV of ~7%.
    cvs = [_cv(_counts(_rust.Ring(_distinct_nodes(10, s)), KEYS_200K)) for s in range(20)]
    assert 0.05 < statistics.mean(cvs) < 0.09, cvs


@STATISTICAL
@given(weights=st.lists(st.integers(1, 8), min_size=2, max_size=10), seed=st.integers(0, 10_000))
def test_weights_are_honoured(weights, seed):
    nodes = [(f"10.{seed % 250}.1.{i + 1}:80", w) for i, w in enumerate(weights)]
    total = sum(weights)
    # Maglev: exact to a round of turns, so within 5% of the weighted share by slot count.
    m = _rust.Maglev(nodes)
    for c, w in zip(m.slot_counts(), weights):
        assert abs(c / m.table_size - w / total) < 0.05 * w / total
    # Ring: a node's share has a relative spread of 1/sqrt(points); within 5% once a node has
    # 6400 points (4 sigma), within 4/sqrt(points) below that. Plus the key sampling noise.
    ring = _rust.Ring(nodes, points_per_weight=BALANCED_PPW)
    counts = _counts(ring, KEYS_200K)
    for c, w in zip(counts, weights):
        want = w / total
        sampling = 4 * ((1 - want) / (want * len(KEYS_200K))) ** 0.5
        tol = max(0.05, 4 / (BALANCED_PPW * w) ** 0.5) + sampling
        assert abs(c / len(KEYS_200K) - want) < tol * want, (weights, counts)
