"""Fuzz target for the HTTP/1.1 parser (STYLE C10 habit 5).

Invariants, checked on every input:
  1. parsed, or ProtocolError: nothing else (no other exception, no hang);
  2. compiled == pure (same normalised events, same error status and message);
  3. whole == split (fed at once, byte by byte, and cut in two at an input-derived offset).

Run standalone:  python tests/fuzz/fuzz_http1.py [seconds]   (atheris when installed, else a
Hypothesis-driven loop with the same check). Seeds: tests/golden/http1/*.json.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
for p in (str(ROOT), str(ROOT / "tests" / "unit" / "protocols" / "http1")):
    if p not in sys.path:
        sys.path.insert(0, p)

import dispa._hotpath as hot  # noqa: E402  (fails loudly when not built)
from dispa.protocols.http1 import _pure as pure  # noqa: E402
from http1_support import run  # noqa: E402

SEEDS = [json.loads(p.read_text())["wire"].encode("latin-1")
         for p in sorted((ROOT / "tests" / "golden" / "http1").glob("*.json"))]
METHODS = (b"GET", b"HEAD", b"CONNECT", b"POST")
SMALL_LIMITS = dict(max_head_bytes=300, max_header_count=8, max_line_bytes=120,
                    max_chunk_ext_bytes=16)


def check(data: bytes) -> None:
    """Assert the three invariants for ``data`` (first byte selects the mode)."""
    if not data:
        return
    mode, wire = data[0], data[1:]
    response = bool(mode & 1)
    method = METHODS[(mode >> 1) & 3] if response else None
    limits = SMALL_LIMITS if mode & 8 else {}
    if mode & 16:
        limits = {**limits, "allow_bare_lf": True}
    kw = dict(response=response, method=method, **limits)
    expected = run(hot, wire, **kw)   # run() turns ProtocolError into an event; others raise
    assert run(pure, wire, **kw) == expected, "compiled != pure"
    if len(wire) <= 2048:
        assert run(hot, wire, split=1, **kw) == expected, "whole != byte by byte"
    if wire:
        cut = (mode * 7919) % (len(wire) + 1)
        assert run(hot, wire, cuts=[cut], **kw) == expected, f"whole != split at {cut}"
        assert run(pure, wire, cuts=[cut], **kw) == expected, f"pure whole != split at {cut}"


def strategy():
    """Hypothesis strategy: a seed message, mutated (bytes flipped, inserted, cut)."""
    from hypothesis import strategies as st

    interesting = st.sampled_from([b"\r", b"\n", b"\r\n", b" ", b"\t", b":", b";", b",", b"\x00",
                                   b"0", b"\r\n\r\n", b"chunked", b"Content-Length: 1\r\n",
                                   b"Transfer-Encoding: chunked\r\n", b"\x7f", b"\xff", b"\""])

    @st.composite
    def mutated(draw):
        wire = bytearray(draw(st.sampled_from(SEEDS)))
        for _ in range(draw(st.integers(0, 4))):
            pos = draw(st.integers(0, len(wire)))
            op = draw(st.integers(0, 2))
            if op == 0:
                wire[pos:pos] = draw(st.one_of(interesting, st.binary(min_size=1, max_size=3)))
            elif op == 1:
                del wire[pos:pos + draw(st.integers(1, 8))]
            elif pos < len(wire):
                wire[pos] = draw(st.integers(0, 255))
        return bytes([draw(st.integers(0, 255))]) + bytes(wire)

    return st.one_of(mutated(), st.binary(max_size=200))


def main(seconds: float) -> None:
    try:
        import atheris  # type: ignore[import-not-found]
    except ImportError:
        atheris = None
    if atheris is not None:
        atheris.Setup([sys.argv[0], f"-max_total_time={int(seconds)}"], check)
        atheris.Fuzz()
        return
    from hypothesis import HealthCheck, given, settings

    deadline = time.monotonic() + seconds
    runs = 0
    while time.monotonic() < deadline:
        def one(data):
            check(data)
        given(strategy())(settings(max_examples=500, deadline=None, database=None,
                                   suppress_health_check=list(HealthCheck))(one))()
        runs += 500
    print(f"fuzz_http1: {runs} examples, no invariant broken")


if __name__ == "__main__":
    main(float(sys.argv[1]) if len(sys.argv) > 1 else 60.0)
