"""The Maglev table: compiled (``dispa._rust.Maglev``) and pure (``_maglev_py.Maglev``) twins.

Every test runs against both (``maglev_cls``); ``test_ring_properties.py`` compares them on
random inputs.
"""

from __future__ import annotations

import statistics

import pytest

from dispa import _rust  # imported directly: a missing build fails here, it never skips
from dispa.balancer import _maglev_py

IMPLS = [pytest.param(_rust.Maglev, id="rust"), pytest.param(_maglev_py.Maglev, id="py")]


@pytest.fixture(params=IMPLS)
def maglev_cls(request):
    return request.param


def _nodes(n: int, seed: int = 0, weight: int = 1) -> list[tuple[str, int]]:
    return [(f"10.{seed}.{i // 250}.{i % 250 + 1}:8080", weight) for i in range(n)]


KEYS = [f"/objects/{i}?v=1".encode() for i in range(20_000)]


def _counts(table, keys=KEYS) -> list[int]:
    counts = [0] * len(table)
    for i in table.lookup_many(keys):
        counts[i] += 1
    return counts


# --------------------------------------------------------------------------- construction

def test_defaults_and_introspection(maglev_cls):
    m = maglev_cls(_nodes(3))
    assert len(m) == 3
    assert m.table_size == 65537
    assert sum(m.slot_counts()) == 65537
    assert "Maglev" in repr(m)


@pytest.mark.parametrize("nodes, size", [
    ([], 65537),
    ([("a:1", 1), ("b:1", 0)], 65537),
    ([("a:1", -1)], 65537),
    ([("a:1", 2**32)], 65537),
    ([("a:1", 1)], 65536),             # not a prime
    ([("a:1", 1)], 1),
    ([("a:1", 1)], 0),
    ([("a:1", 1)], -7),
    ([("a", 1), ("b", 1), ("c", 1)], 2),  # fewer slots than nodes
    ([("a:1", 1)], 16_777_259),        # a prime above MAX_TABLE_SIZE
])
def test_bad_input_is_value_error(maglev_cls, nodes, size):
    with pytest.raises(ValueError):
        maglev_cls(nodes, table_size=size)


def test_malformed_input_is_type_error(maglev_cls):
    with pytest.raises(TypeError):
        maglev_cls("a:1")
    with pytest.raises(TypeError):
        maglev_cls([(b"a:1", 1)])
    with pytest.raises(TypeError):
        maglev_cls([("a:1", "1")])
    with pytest.raises(TypeError):
        maglev_cls([("a:1", 1)], 65537)  # table_size is keyword-only
    m = maglev_cls([("a:1", 1)], table_size=7)
    with pytest.raises(TypeError):
        m.lookup("text")
    with pytest.raises(TypeError):
        m.lookup_many([b"ok", "text"])


# --------------------------------------------------------------------------- lookups

def test_deterministic_and_batch_equals_single(maglev_cls):
    a, b = maglev_cls(_nodes(5)), maglev_cls(_nodes(5))
    assert a.lookup_many(KEYS[:2000]) == b.lookup_many(KEYS[:2000])
    assert [a.lookup(k) for k in KEYS[:2000]] == a.lookup_many(KEYS[:2000])


def test_lookup_n_is_the_failover_walk(maglev_cls):
    m = maglev_cls(_nodes(5), table_size=251)
    for k in KEYS[:500]:
        walk = m.lookup_n(k, 10)
        assert sorted(walk) == [0, 1, 2, 3, 4]
        assert walk[0] == m.lookup(k)
        assert m.lookup_n(k, 2) == walk[:2]
        assert m.lookup_n(k, 0) == []
    with pytest.raises(OverflowError):
        m.lookup_n(b"k", -1)


def test_tiny_tables(maglev_cls):
    m = maglev_cls([("a", 1), ("b", 1), ("c", 1)], table_size=3)
    assert sorted(m.slot_counts()) == [1, 1, 1]
    assert set(m.lookup_many(KEYS[:100])) == {0, 1, 2}
    assert maglev_cls([("only", 7)], table_size=2).lookup_n(b"k", 3) == [0]


# --------------------------------------------------------------------------- balance

def test_equal_weights_own_equal_slots(maglev_cls):
    counts = maglev_cls(_nodes(10, 4)).slot_counts()
    assert set(counts) <= {6553, 6554}


def test_weights_are_honoured_to_a_round(maglev_cls):
    weights = [1, 2, 3, 4]
    counts = maglev_cls([(f"192.168.1.{i + 1}:80", w) for i, w in enumerate(weights)]).slot_counts()
    for c, w in zip(counts, weights):
        assert abs(c - 65537 * w / 10) <= w, counts


def test_weights_are_reduced_by_their_gcd(maglev_cls):
    a = maglev_cls([("a:1", 1), ("b:1", 2), ("c:1", 3)], table_size=1009)
    b = maglev_cls([("a:1", 4), ("b:1", 8), ("c:1", 12)], table_size=1009)
    assert a.lookup_many(KEYS[:3000]) == b.lookup_many(KEYS[:3000])


def test_every_node_owns_a_slot_whatever_the_weights(maglev_cls):
    # The first pass of each round gives every node a turn, so a weight that alone exceeds
    # the table cannot starve the others.
    m = maglev_cls([("big", 1000), ("a", 1), ("b", 1)], table_size=5)
    assert m.slot_counts() == [3, 1, 1]
    assert len(m.lookup_n(b"k", 3)) == 3


def test_key_load_cv_is_only_sampling_noise(maglev_cls):
    keys = [f"key-{i}".encode() for i in range(100_000)]
    for seed in range(3):
        counts = _counts(maglev_cls(_nodes(10, seed)), keys)
        # A perfectly balanced table leaves binomial noise: sqrt(0.9 / 10000) ~ 0.95%.
        assert statistics.pstdev(counts) / statistics.mean(counts) < 0.025, counts


# --------------------------------------------------------------------------- disruption

def test_removing_a_node_moves_its_keys_and_a_few_more(maglev_cls):
    nodes = _nodes(10, 2)
    full = maglev_cls(nodes)
    before = full.lookup_many(KEYS)
    for gone in (0, 4, 9):
        rest = [i for i in range(10) if i != gone]
        after = [rest[i] for i in maglev_cls([nodes[i] for i in rest]).lookup_many(KEYS)]
        moved = sum(a != b for a, b in zip(before, after))
        owned = before.count(gone)
        # Every key of the removed node moves; Maglev shifts a few others too (the paper's
        # "minimal disruption" is approximate). Measured: 1.02-1.03 x 1/N at N=10.
        assert moved >= owned
        assert moved / len(KEYS) < 0.1 * 1.10, (gone, moved)


def test_adding_a_node_moves_about_its_share(maglev_cls):
    nodes = _nodes(10, 3)
    before = maglev_cls(nodes).lookup_many(KEYS)
    after = maglev_cls(nodes + [("172.16.0.1:8080", 1)]).lookup_many(KEYS)
    moved = [(a, b) for a, b in zip(before, after) if a != b]
    onto_new = sum(1 for _, b in moved if b == 10)
    assert abs(onto_new / len(KEYS) - 1 / 11) < 0.01
    assert len(moved) / len(KEYS) < (1 / 11) * 1.10
