"""YAML with the same structure as TOML gives the same snapshot; YAML lines are exact."""

from __future__ import annotations

import tomllib

import yaml

from dispa.config import load_config


def test_yaml_equivalent_of_compat_file_gives_same_version(compat_path, tmp_path):
    data = tomllib.loads(compat_path.read_text(encoding="utf-8"))
    path = tmp_path / "dispa.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    from_yaml = load_config(path, env={})
    from_toml = load_config(compat_path, env={})
    assert from_yaml.snapshot.version == from_toml.snapshot.version
    assert from_yaml.snapshot == from_toml.snapshot
    assert from_yaml.static == from_toml.static
    assert from_yaml.model == from_toml.model


def test_yml_extension_is_yaml(tmp_path, minimal):
    path = tmp_path / "dispa.yml"
    path.write_text("targets:\n  targets:\n    - name: a\n      url: http://10.1.1.1:81\n")
    assert load_config(path).snapshot.clusters[0].endpoints[0].id == "10.1.1.1:81"


def test_yaml_lines_are_exact(issues_of):
    text = """\
server:
  workers: 0
targets:
  targets:
    - name: a
      url: http://a
    - name: b
      url: gopher://b
      wieght: 3
domains:
  intercept_domains:
    - good.com
    - "bad host"
"""
    got = {(e.path, e.line) for e in issues_of(text, fmt="yaml")}
    assert got == {("server.workers", 2), ("targets.targets[1].url", 8),
                   ("targets.targets[1].wieght", 9), ("domains.intercept_domains[1]", 13)}


def test_yaml_non_string_keys_and_odd_values(issues_of):
    errors = issues_of("server:\n  1: x\n  via: 2020-01-01\ntargets: {targets: []}\n", fmt="yaml")
    paths = {e.path for e in errors}
    assert "server" in paths and "server.via" in paths


def test_yaml_alias_cycle_is_a_config_error(issues_of):
    errors = issues_of("a: &x [*x]\n", fmt="yaml")
    assert errors
