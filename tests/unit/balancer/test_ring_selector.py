"""``ConsistentHash`` over its hashing modes: ``mode="nginx"|"maglev"``, ``points_per_weight``
and ``bounded_factor`` (the default behaviour is covered in ``test_selectors.py``)."""

from __future__ import annotations

import pytest

from dispa import _native, _rust
from dispa.balancer import _maglev_py, _ring_py
from dispa.balancer.base import Selector
from dispa.balancer.consistent import MODES, ConsistentHash, maglev_class

NODES = [(f"10.0.0.{i}:80", 1 + i % 2) for i in range(1, 7)]
KEYS = [f"k{i}".encode() for i in range(600)]

CASES = [
    pytest.param("nginx", _rust.Ring, id="nginx-rust"),
    pytest.param("nginx", _ring_py.Ring, id="nginx-py"),
    pytest.param("maglev", _rust.Maglev, id="maglev-rust"),
    pytest.param("maglev", _maglev_py.Maglev, id="maglev-py"),
]


def _ref(mode, nodes=NODES, **kw):
    if mode == "nginx":
        return _ring_py.Ring(nodes, points_per_weight=kw.get("points_per_weight", 160))
    return _maglev_py.Maglev(nodes, table_size=kw.get("table_size", 65537))


def test_modes_and_defaults():
    assert MODES == ("nginx", "maglev")
    s = ConsistentHash(NODES)
    assert s.mode == "nginx" and s.bounded_factor is None
    assert isinstance(ConsistentHash(NODES, mode="maglev"), Selector)
    expected = _native.rust.Maglev if _native.rust is not None else _maglev_py.Maglev
    assert maglev_class() is expected
    assert type(ConsistentHash(NODES, mode="maglev").ring) is expected


@pytest.mark.parametrize("kw", [
    {"mode": "ketama"},
    {"mode": "maglev", "table_size": 1000},
    {"points_per_weight": 0},
    {"bounded_factor": 0.5},
    {"bounded_factor": float("nan")},
])
def test_bad_options_are_value_errors(kw):
    with pytest.raises(ValueError):
        ConsistentHash(NODES, **kw)


@pytest.mark.parametrize("mode, impl", CASES)
def test_pick_is_the_structure_lookup_and_fails_over_along_its_walk(mode, impl):
    s = ConsistentHash(NODES, mode=mode, ring=impl, table_size=1009)
    ref = _ref(mode, table_size=1009)
    healthy = [True, True, False, True, True, True]
    for k in KEYS:
        walk = ref.lookup_n(k, 6)
        assert s.pick(None, k) == walk[0]
        assert s.pick(healthy, k) == next(i for i in walk if healthy[i])
        assert s.pick_excluding(None, {walk[0]}, k) == walk[1]
    assert s.pick([False] * 6, b"x") == -1


def test_points_per_weight_reaches_the_ring():
    s = ConsistentHash(NODES, points_per_weight=1000)
    ref = _ring_py.Ring(NODES, points_per_weight=1000)
    assert [s.pick(None, k) for k in KEYS] == ref.lookup_many(KEYS)


@pytest.mark.parametrize("mode, impl", CASES)
def test_bounded_selector_counts_in_flight_and_spills(mode, impl):
    s = ConsistentHash(NODES, mode=mode, ring=impl, table_size=1009, bounded_factor=1.25)
    assert s.bounded_factor == 1.25
    k = b"hot"
    owner = s.pick(None, k)
    assert owner == _ref(mode, table_size=1009).lookup(k)
    picks = []
    for _ in range(40):  # 40 concurrent requests for one key
        i = s.pick(None, k)
        s.acquire(i)
        picks.append(i)
    loads = s.loads()
    assert sum(loads) == 40
    total_weight = sum(w for _, w in NODES)
    for i, (_, w) in enumerate(NODES):
        assert loads[i] <= -(-1.25 * 40 * w // total_weight)  # ceil(c * total * w / W)
    assert picks[0] == owner and len(set(picks)) > 1
    for i in picks:
        s.release(i)
    assert s.loads() == [0] * 6
    s.release(0)  # never below zero
    assert s.loads() == [0] * 6
    assert s.pick(None, k) == owner


@pytest.mark.parametrize("mode, impl", CASES)
def test_bounded_with_unhealthy_endpoints_uses_only_usable_ones(mode, impl):
    s = ConsistentHash(NODES, mode=mode, ring=impl, table_size=1009, bounded_factor=1.25)
    ref = _ref(mode, table_size=1009)
    healthy = [True] * 6
    healthy[ref.lookup(b"hot")] = False
    picks = []
    for _ in range(30):
        i = s.pick(healthy, b"hot")
        assert i >= 0 and healthy[i]
        s.acquire(i)
        picks.append(i)
    assert len(set(picks)) > 1
    # Retries never return an excluded endpoint.
    walk = ref.lookup_n(b"hot", 6)
    assert s.pick_excluding(healthy, set(walk[:3]), b"hot") not in set(walk[:3])
    assert s.pick_excluding(None, set(range(6)), b"hot") == -1
    assert s.pick([False] * 6, b"hot") == -1


def test_unbounded_selector_ignores_acquire_and_release():
    s = ConsistentHash(NODES)
    s.acquire(0)
    s.release(0)
    assert s.loads() == [0] * 6
