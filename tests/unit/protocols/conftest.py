"""Fixtures for the protocol codecs: every behaviour runs on both twins (STYLE C8).

The compiled twin is imported directly: if ``dispa._hotpath`` is not built, the tests fail
loudly instead of skipping (build it with
``DISPA_NO_RUST=1 python setup.py build_ext --inplace``).
"""

from __future__ import annotations

import importlib

import pytest

HTTP1_IMPLS = ("dispa._hotpath", "dispa.protocols.http1._pure")


@pytest.fixture(params=HTTP1_IMPLS, ids=("hotpath", "pure"))
def http1_impl(request):
    """The module of one HTTP/1.1 twin (compiled, then pure)."""
    return importlib.import_module(request.param)


@pytest.fixture(scope="session")
def http1_both():
    """(compiled, pure), for tests that compare the twins directly."""
    return tuple(importlib.import_module(name) for name in HTTP1_IMPLS)
