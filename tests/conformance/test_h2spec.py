"""HTTP/2 conformance: h2spec (installed by ci/test.sh, a pinned version) against a live
dispa-server with ``[http2] enabled``, h2c prior knowledge, every request proxied to a real
HTTP/1.1 origin. All tests must pass except those listed in ``EXPECTED_FAILURES`` (each
with its reason in docs/http2.md, "Conformance")."""

from __future__ import annotations

import os
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

from tests.support.dispa_proc import DispaProcess, free_port, render_config
from tests.support.origin import Origin

# h2spec test ids that may fail, with the reason (docs/http2.md#conformance); none today.
EXPECTED_FAILURES: dict[str, str] = {}


def _h2spec() -> str:
    for cand in (os.environ.get("H2SPEC"), shutil.which("h2spec"),
                 str(Path.home() / "go/bin/h2spec")):
        if cand and Path(cand).is_file():
            return cand
    raise AssertionError("h2spec is not installed (ci/test.sh installs it with go install)")


def test_h2spec_all_pass(tmp_path):
    binary = _h2spec()
    origin = Origin("o1").start()
    port, admin = free_port(), free_port()
    cfg = render_config(port=port, admin_port=admin, targets=[("o1", origin.url)],
                        extra="[http2]\nenabled = true\n")
    path = tmp_path / "dispa.toml"
    path.write_text(cfg)
    proc = DispaProcess(path, port=port, admin_port=admin).wait_ready()
    report = tmp_path / "h2spec.xml"
    try:
        r = subprocess.run([binary, "--strict", "-h", "127.0.0.1", "-p", str(port), "-o", "5",
                            "-j", str(report)], capture_output=True, timeout=240)
    finally:
        proc.stop()
        origin.stop()
    out = r.stdout.decode(errors="replace")
    tree = ET.parse(report)
    total = 0
    failed_ids = []
    for suite in tree.iter("testsuite"):
        for case in suite.iter("testcase"):
            total += 1
            if case.find("failure") is not None or case.find("error") is not None:
                failed_ids.append(f"{suite.get('package', '')} {case.get('package', '')}"
                                  f" {case.get('classname', '')}".strip())
    assert total >= 140, out[-2000:]
    unexpected = [f for f in failed_ids if not any(k in f for k in EXPECTED_FAILURES)]
    assert not unexpected, "\n".join(unexpected) + "\n" + out[-3000:]
    assert len(failed_ids) <= len(EXPECTED_FAILURES), out[-3000:]
