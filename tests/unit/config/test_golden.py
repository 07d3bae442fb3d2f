"""Golden vectors: tests/golden/config/<name>.toml compiles to <name>.snapshot.json.

Regenerate after a deliberate change with ``DISPA_UPDATE_GOLDEN=1 pytest tests/unit/config``
and review the diff: a change in ``version`` means workers see a new snapshot.
"""

from __future__ import annotations

import json
import os
import pathlib

import msgspec
import pytest

from dispa.config import load_config

GOLDEN = pathlib.Path(__file__).resolve().parents[2] / "golden" / "config"
CASES = sorted(GOLDEN.glob("*.toml"))


def render(path: pathlib.Path) -> str:
    loaded = load_config(path, env={})
    doc = {"static": msgspec.to_builtins(loaded.static),
           "snapshot": msgspec.to_builtins(loaded.snapshot)}
    return json.dumps(doc, indent=2, ensure_ascii=False) + "\n"


def test_there_are_golden_cases():
    assert len(CASES) >= 3


@pytest.mark.parametrize("path", CASES, ids=[p.stem for p in CASES])
def test_golden_snapshot(path):
    expected_path = path.with_suffix(".snapshot.json")
    got = render(path)
    if os.environ.get("DISPA_UPDATE_GOLDEN") == "1":
        expected_path.write_text(got, encoding="utf-8")
    assert expected_path.exists(), f"missing {expected_path.name}; run with DISPA_UPDATE_GOLDEN=1"
    assert json.loads(got) == json.loads(expected_path.read_text(encoding="utf-8"))
