"""Micro-benchmark: ketama ring lookups, compiled (``dispa._rust.Ring``) against pure.

Run: ``python -m pytest perf/micro/bench_ring_lookup.py -o python_files='bench_*.py'
--benchmark-only``. Build the extension in release mode first
(``python setup.py build_rust --inplace --release``); an in-place build is debug by default
and about 10x slower.

Fixture: a realistic cluster (10 endpoints, mixed weights, nginx's 160 points per weight)
and request-path-like keys. ``per call`` measures one ``lookup`` (what the proxy does per
request); ``batch`` measures ``lookup_many`` over 1000 keys (reported per batch).
"""

from __future__ import annotations

import pytest

from dispa import _native
from dispa.balancer import _ring_py

NODES = [(f"10.1.0.{i + 1}:8080", 1 + i % 3) for i in range(10)]
KEYS = [f"/api/v1/users/{i * 7919}/orders?page={i % 13}".encode() for i in range(1000)]

IMPLS = [pytest.param(_ring_py.Ring, id="py")]
if _native.rust is not None:
    IMPLS.insert(0, pytest.param(_native.rust.Ring, id="rust"))


@pytest.fixture(params=IMPLS)
def impl(request):
    return request.param


@pytest.fixture
def ring(impl):
    return impl(NODES)


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


@pytest.mark.benchmark(group="ring-build")
def test_build(benchmark, impl):
    assert len(benchmark(impl, NODES)) == len(NODES)
