"""Bounded run of the HTTP/1.1 fuzz target in the normal suite (~300 examples)."""

from __future__ import annotations

import sys
from pathlib import Path

from hypothesis import HealthCheck, given, settings

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fuzz_http1  # noqa: E402


@settings(max_examples=300, deadline=None, database=None,
          suppress_health_check=list(HealthCheck))
@given(data=fuzz_http1.strategy())
def test_parsed_or_protocol_error_and_twins_agree(data):
    fuzz_http1.check(data)


def test_seeds_pass():
    for seed in fuzz_http1.SEEDS:
        for mode in range(32):
            fuzz_http1.check(bytes([mode]) + seed)
