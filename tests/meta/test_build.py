"""The compiled parts are built and really in use (unless DISPA_NO_EXTENSIONS is set)."""

import os
import subprocess
import sys

import pytest

from tests.support.dispa_proc import ROOT

NO_EXT = os.environ.get("DISPA_NO_EXTENSIONS", "") not in ("", "0")
FIRST_IMPORTS = ["dispa._native", "dispa.balancer", "dispa.proxy.session",
                 "dispa.server.worker", "dispa._hotpath", "dispa.protocols.http1"]


@pytest.mark.parametrize("first", FIRST_IMPORTS)
def test_the_codec_implementation_does_not_depend_on_import_order(first):
    code = f"import {first}; from dispa.protocols import http1; print(http1.IMPLEMENTATION)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ("pure" if NO_EXT else "compiled")


def test_version_reports_the_compiled_parts():
    out = subprocess.run([sys.executable, "-m", "dispa", "--version"], capture_output=True,
                         text=True, cwd=ROOT)
    assert out.returncode == 0
    if NO_EXT:
        assert out.stdout.count("pure-Python twin in use") == 2
    else:
        assert "dispa._hotpath): compiled, in use" in out.stdout
        assert "dispa._rust): compiled, in use" in out.stdout
