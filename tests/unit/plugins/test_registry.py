"""The filter registry: entry-point discovery (as a third-party package would register),
import paths, and config-time checks."""

from __future__ import annotations

import sys
import textwrap

import msgspec
import pytest

from dispa.config import model as m
from dispa.plugins import registry
from dispa.plugins.api import Filter


@pytest.fixture
def fake_distribution(tmp_path, monkeypatch):
    """A minimal installed distribution on sys.path that registers one filter."""
    pkg = tmp_path / "acme_filters"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(textwrap.dedent('''
        from dispa.plugins.api import Filter

        class Stamp(Filter):
            name = "acme-stamp"
            def on_request(self, req):
                req.headers.set("x-acme", "1")
    '''))
    dist = tmp_path / "acme_filters-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-filters\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(
        "[dispa.filters]\nacme-stamp = acme_filters:Stamp\nbroken = acme_filters:Missing\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "_classes", None)
    monkeypatch.setattr(registry, "_load_errors", {})
    yield
    sys.modules.pop("acme_filters", None)


def test_a_third_party_filter_is_found_through_its_entry_point(fake_distribution):
    cls = registry.get("acme-stamp")
    assert issubclass(cls, Filter) and cls.__module__ == "acme_filters"
    assert "headerinjector" in registry.available()  # built-ins come the same way


def test_a_broken_entry_point_is_reported_when_used(fake_distribution):
    with pytest.raises(KeyError) as err:
        registry.get("broken")
    assert "failed to load" in err.value.args[0] and "Missing" in err.value.args[0]


def test_unknown_types_get_a_suggestion():
    with pytest.raises(KeyError) as err:
        registry.get("headerinjecter")
    assert "did you mean 'headerinjector'" in err.value.args[0]


def test_import_path_types():
    assert registry.get("tests.support.filters:Noop").name == "test-noop"
    with pytest.raises(KeyError):
        registry.get("tests.support.filters:Nope")
    with pytest.raises(KeyError):
        registry.get("json:dumps")  # not a Filter


def test_check_plugins_reports_every_problem_with_its_path():
    plugins = msgspec.convert({"plugins": [
        {"name": "a", "type": "headerinjector", "config": {"request_headers": {"x": "1"}}},
        {"name": "a", "type": "headerinjector"},
        {"name": "b", "type": "nope"},
        {"name": "c", "type": "headerinjector", "config": {"bogus": 1}},
        {"name": "d", "type": "wasm", "config": {"module_path": "/nonexistent.wasm"}},
    ]}, m.PluginsConfig)
    issues = []
    registry.check_plugins(plugins, lambda msg, path: issues.append((path, msg)))
    paths = [p for p, _ in issues]
    assert ("plugins", "plugins", 1, "name") in paths
    assert ("plugins", "plugins", 2, "type") in paths
    assert ("plugins", "plugins", 3, "config") in paths
    assert ("plugins", "plugins", 4, "config") in paths  # trial build: file missing
    assert len(issues) == 4, issues
