"""Every metric name the code emits is documented in docs/ (observability.md lists them all,
with links to the feature documents)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# string literals that look like metric names but are attributes or ABI symbols
NOT_METRICS = {"dispa_client_ocsp", "dispa_reason", "dispa_sni", "dispa_versions",
               "dispa_sticky", "dispa_get_result_len", "dispa_on_request", "dispa_on_response",
               # original config names accepted for compatibility (no such histogram)
               "dispa_log_write_duration_ms", "dispa_target_health_check_duration_ms"}


def test_every_emitted_metric_is_in_observability_md():
    names = set()
    for path in (ROOT / "dispa").rglob("*.py"):
        names |= set(re.findall(r'"(dispa_[a-z0-9_]+)"', path.read_text()))
    doc = (ROOT / "docs" / "observability.md").read_text()
    missing = sorted(n for n in names - NOT_METRICS if n not in doc)
    assert not missing, f"metrics missing from docs/observability.md: {missing}"
