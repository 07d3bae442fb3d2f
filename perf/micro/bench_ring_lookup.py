"""Micro-benchmark: consistent-hash lookups, compiled (``dispa._rust``) against pure twins.

Run: ``python -m pytest perf/micro/bench_ring_lookup.py -o python_files='bench_*.py'
--benchmark-only``. Build the extension in release mode first
(``cd rust && cargo build --release --features python`` and copy ``lib_rust.so`` over
``dispa/_rust*.so``, or ``python setup.py build_rust --inplace --release``); a debug build is
about 10x slower.

Fixture: a realistic cluster (10 endpoints, mixed weights) and request-path-like keys.
Structures: the ketama ``Ring`` at nginx's 160 points per weight, and a ``Maglev`` table of
65537 slots. Groups:

* ``*-lookup-per-call``: one ``lookup`` (what the proxy does per request);
* ``*-lookup-batch-1000``: ``lookup_many`` over 1000 keys (reported per batch);
* ``*-lookup_n-3``: the failover walk for 3 endpoints;
* ``*-lookup_bounded``: a bounded-load lookup with realistic in-flight counts;
* ``*-build``: building the structure (once per endpoint-set change).
"""

from __future__ import annotations

import pytest

from dispa import _native
from dispa.balancer import _maglev_py, _ring_py

NODES = [(f"10.1.0.{i + 1}:8080", 1 + i % 3) for i in range(10)]
KEYS = [f"/api/v1/users/{i * 7919}/orders?page={i % 13}".encode() for i in range(1000)]
LOADS = [3, 5, 2, 8, 4, 4, 6, 1, 7, 3]

RINGS = [pytest.param(_ring_py.Ring, id="py")]
MAGLEVS = [pytest.param(_maglev_py.Maglev, id="py")]
if _native.rust is not None:
    RINGS.insert(0, pytest.param(_native.rust.Ring, id="rust"))
    MAGLEVS.insert(0, pytest.param(_native.rust.Maglev, id="rust"))


@pytest.fixture(params=RINGS)
def impl(request):
    return request.param


@pytest.fixture
def ring(impl):
    return impl(NODES)


@pytest.fixture(params=MAGLEVS, scope="module")
def maglev_impl(request):
    return request.param


@pytest.fixture(scope="module")
def maglev(maglev_impl):
    return maglev_impl(NODES)


# --------------------------------------------------------------------------- ring

@pytest.mark.benchmark(group="ring-lookup-per-call")
def test_lookup(benchmark, ring):
    key = KEYS[17]
    result = benchmark(ring.lookup, key)
    assert 0 <= result < len(NODES)


@pytest.mark.benchmark(group="ring-lookup_n-3")
def test_lookup_n(benchmark, ring):
    assert len(benchmark(ring.lookup_n, KEYS[17], 3)) == 3


@pytest.mark.benchmark(group="ring-lookup-batch-1000")
def test_lookup_many(benchmark, ring):
    assert len(benchmark(ring.lookup_many, KEYS)) == len(KEYS)


@pytest.mark.benchmark(group="ring-lookup_bounded")
def test_lookup_bounded(benchmark, ring):
    assert 0 <= benchmark(ring.lookup_bounded, KEYS[17], LOADS, 1.25) < len(NODES)


@pytest.mark.benchmark(group="ring-build")
def test_build(benchmark, impl):
    assert len(benchmark(impl, NODES)) == len(NODES)


# --------------------------------------------------------------------------- maglev

@pytest.mark.benchmark(group="maglev-lookup-per-call")
def test_maglev_lookup(benchmark, maglev):
    assert 0 <= benchmark(maglev.lookup, KEYS[17]) < len(NODES)


@pytest.mark.benchmark(group="maglev-lookup_n-3")
def test_maglev_lookup_n(benchmark, maglev):
    assert len(benchmark(maglev.lookup_n, KEYS[17], 3)) == 3


@pytest.mark.benchmark(group="maglev-lookup-batch-1000")
def test_maglev_lookup_many(benchmark, maglev):
    assert len(benchmark(maglev.lookup_many, KEYS)) == len(KEYS)


@pytest.mark.benchmark(group="maglev-lookup_bounded")
def test_maglev_lookup_bounded(benchmark, maglev):
    assert 0 <= benchmark(maglev.lookup_bounded, KEYS[17], LOADS, 1.25) < len(NODES)


@pytest.mark.benchmark(group="maglev-build-65537")
def test_maglev_build(benchmark, maglev_impl):
    if maglev_impl is _maglev_py.Maglev:
        # ~0.1 s a build: a few rounds are enough for a stable figure.
        result = benchmark.pedantic(maglev_impl, args=(NODES,), rounds=5, iterations=1)
    else:
        result = benchmark(maglev_impl, NODES)
    assert len(result) == len(NODES)
