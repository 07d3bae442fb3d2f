"""Shared helpers for the configuration tests."""

from __future__ import annotations

import pathlib

import pytest

from dispa.config import load_config_text
from dispa.errors import ConfigError

ROOT = pathlib.Path(__file__).resolve().parents[3]
COMPAT = pathlib.Path("/work/shared/compat/config.example.toml")
if not COMPAT.exists():  # a checkout next to ../shared
    COMPAT = ROOT.parent / "shared" / "compat" / "config.example.toml"

MINIMAL = '''
[[targets.targets]]
name = "one"
url = "http://127.0.0.1:3000"
'''


@pytest.fixture
def compat_path() -> pathlib.Path:
    if not COMPAT.exists():
        pytest.skip("shared/compat/config.example.toml is not available")
    return COMPAT


def _issues_of(text: str, fmt: str = "toml", env: dict | None = None):
    """Load ``text`` expecting a ConfigError; return its issues."""
    with pytest.raises(ConfigError) as info:
        load_config_text(text, fmt=fmt, name="test." + fmt, env=env or {})
    return info.value.errors


def _one_issue(text: str, fmt: str = "toml", env: dict | None = None):
    errors = _issues_of(text, fmt, env)
    assert len(errors) == 1, [e.format() for e in errors]
    return errors[0]


@pytest.fixture
def issues_of():
    """``issues_of(text, fmt="toml", env=None)`` -> the ConfigIssues of a bad config."""
    return _issues_of


@pytest.fixture
def one_issue():
    """``one_issue(text, fmt="toml", env=None)`` -> the single ConfigIssue of a bad config."""
    return _one_issue


@pytest.fixture
def minimal() -> str:
    """The smallest valid configuration (TOML)."""
    return MINIMAL


@pytest.fixture
def examples_dir() -> pathlib.Path:
    return ROOT / "examples"
