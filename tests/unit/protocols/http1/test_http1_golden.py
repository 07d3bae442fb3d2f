"""Golden vectors (tests/golden/http1/*.json): wire -> normalised events (h11 SIMPLE_CASES).

Each vector is fed whole, byte by byte, and cut in two at every offset, to both twins; every
run must give exactly the recorded events. Wire and body bytes are stored as latin-1 text.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from http1_support import run

GOLDEN = Path(__file__).resolve().parents[3] / "golden" / "http1"
CASES = sorted(GOLDEN.glob("*.json"))


def _load(path):
    doc = json.loads(path.read_text())
    events = []
    for e in doc["events"]:
        if e[0] in ("data", "upgrade"):
            e = [e[0], e[1].encode("latin-1")]
        events.append(tuple(e))
    method = doc["method"].encode() if doc["method"] else None
    return doc["wire"].encode("latin-1"), doc["kind"] == "response", method, events


def test_golden_vectors_exist():
    assert len(CASES) >= 20


@pytest.mark.parametrize("path", CASES, ids=[p.stem for p in CASES])
def test_golden_whole_split_and_every_cut(http1_impl, path):
    wire, response, method, expected = _load(path)
    assert run(http1_impl, wire, response=response, method=method) == expected
    assert run(http1_impl, wire, response=response, method=method, split=1) == expected
    for cut in range(1, len(wire)):
        assert run(http1_impl, wire, response=response, method=method, cuts=[cut]) == expected, cut
