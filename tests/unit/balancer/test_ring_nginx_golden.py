"""The ring against real nginx: traces captured from ``hash $arg_k consistent``.

``tests/golden/nginx_hash/*.json`` were recorded from nginx 1.22.1 by
``tests/golden/nginx_hash/capture.py`` (4 layouts: 4 equal nodes, 3 weighted, 10 mixed
weights, 3 unix sockets; 2000 keys each; each TCP layout again with one node ``down``).
Both twins must agree with nginx on every key, and so must ``ConsistentHash`` given the
same health mask. Where nginx is installed the trace is also re-captured on the spot.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest

from dispa import _rust  # imported directly: a missing build fails here, it never skips
from dispa.balancer import _ring_py
from dispa.balancer.consistent import ConsistentHash

GOLDEN = Path(__file__).resolve().parents[2] / "golden" / "nginx_hash"
LAYOUTS = ["equal4", "weighted3", "ten", "unix3"]

IMPLS = [pytest.param(_rust.Ring, id="rust"), pytest.param(_ring_py.Ring, id="py")]


def _load_capture_module():
    spec = importlib.util.spec_from_file_location("nginx_hash_capture", GOLDEN / "capture.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


capture = _load_capture_module()


def _trace(layout: str) -> dict:
    return json.loads((GOLDEN / f"{layout}.json").read_text())


def _nodes(doc: dict) -> list[tuple[str, int]]:
    return [(name, weight) for name, weight in doc["nodes"]]


def _disagreements(ring, doc: dict) -> list[tuple]:
    """Rows where ``ring`` differs from nginx (owner, and failover owner with ``down``)."""
    bad = []
    down = doc["down"]
    n = len(doc["nodes"])
    for row in doc["rows"]:
        key = row[0].encode("ascii")
        if ring.lookup(key) != row[1]:
            bad.append(("owner", row))
        if down is not None:
            failover = next(i for i in ring.lookup_n(key, n) if i != down)
            if failover != row[2]:
                bad.append(("down", row))
    return bad


def test_every_layout_was_captured_from_nginx():
    for layout in LAYOUTS:
        doc = _trace(layout)
        assert doc["nginx"].startswith("nginx/")
        assert doc["directive"] == "hash $arg_k consistent"
        assert len(doc["rows"]) == 2000
        assert len({r[0] for r in doc["rows"]}) == 2000
        # Every node owns some keys: the trace exercises the whole ring.
        assert {r[1] for r in doc["rows"]} == set(range(len(doc["nodes"])))


@pytest.mark.parametrize("ring_cls", IMPLS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_ring_agrees_with_nginx_on_every_captured_key(ring_cls, layout):
    doc = _trace(layout)
    ring = ring_cls(_nodes(doc))  # nginx's placement: the default 160 points per weight
    assert _disagreements(ring, doc) == []


@pytest.mark.parametrize("ring_cls", IMPLS)
@pytest.mark.parametrize("layout", [lay for lay in LAYOUTS if _trace(lay)["down"] is not None])
def test_selector_fails_over_where_nginx_does(ring_cls, layout):
    doc = _trace(layout)
    s = ConsistentHash(_nodes(doc), ring=ring_cls)
    healthy = [i != doc["down"] for i in range(len(doc["nodes"]))]
    for key, owner, owner_when_down in doc["rows"]:
        assert s.pick(None, key.encode()) == owner, key
        assert s.pick(healthy, key.encode()) == owner_when_down, key


def test_nginx_round_robins_an_empty_key():
    # Why ConsistentHash callers should never hash an empty key expecting nginx's answer:
    # nginx does not hash it at all (``hp->key.len == 0`` → round robin).
    for layout in LAYOUTS:
        owners = _trace(layout)["empty_key_owners"]
        assert len(set(owners)) > 1, (layout, owners)


def _nginx_required() -> bool:
    return bool(os.environ.get("CI")) or os.environ.get("DISPA_REQUIRE_NGINX", "") not in ("", "0")


@pytest.mark.timeout(120)
def test_a_fresh_nginx_capture_agrees_with_both_twins_and_the_stored_trace():
    if not os.path.exists(capture.NGINX):
        if _nginx_required():
            pytest.fail(f"nginx not found at {capture.NGINX}; CI installs nginx-light (ci/install-system-deps.sh)")
        pytest.skip("nginx is not installed (set CI=1 or DISPA_REQUIRE_NGINX=1 to make this a failure)")
    keys = capture.make_keys(300)
    stored = {lay: _trace(lay) for lay in LAYOUTS}
    names = {lay: [n for n, _ in doc["nodes"]] for lay, doc in stored.items()}
    fresh = capture.capture(keys, names=names, start_timeout_seconds=15, request_timeout_seconds=5)
    assert set(fresh) == set(LAYOUTS)
    for layout, doc in fresh.items():
        assert len(doc["rows"]) == 300
        for ring_cls in (_rust.Ring, _ring_py.Ring):
            assert _disagreements(ring_cls(_nodes(doc)), doc) == [], (layout, ring_cls)
        # Same ports as the stored trace (they were free): then nginx must answer identically.
        if doc["nodes"] == stored[layout]["nodes"]:
            assert doc["rows"] == stored[layout]["rows"][:300], layout
