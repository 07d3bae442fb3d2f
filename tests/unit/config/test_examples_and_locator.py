"""examples/ load cleanly; the TOML line locator finds keys, headers and array items."""

from __future__ import annotations

import pytest

from dispa.config import check_file, load_config
from dispa.config.load import format_path, mask_url_password, toml_locator


def test_examples_load(examples_dir):
    paths = sorted(examples_dir.glob("*.toml")) + sorted(examples_dir.glob("*.yaml"))
    assert len(paths) >= 3
    for path in paths:
        assert check_file(path) == [], path


def test_yaml_example_equals_toml_example(examples_dir):
    toml = load_config(examples_dir / "dispa.toml", env={})
    yaml = load_config(examples_dir / "dispa.yaml", env={})
    assert toml.snapshot == yaml.snapshot and toml.static == yaml.static


def test_locator_tracks_headers_keys_and_items():
    text = '''\
# comment
[server]
bind_address = "x"   # trailing comment
  "quoted" = 1
a.b = 2
[[targets.targets]]
name = """multi
line = not a key
"""
[[targets.targets]]
url = "u"
list = [
  "one", "two",  # comment, "not an item"
  [1, 2],
  { k = "v" },
]
[targets.health_check]
interval = 1
'''
    lines = {format_path(k): v for k, v in toml_locator(text).items()}
    assert lines["server"] == 2
    assert lines["server.bind_address"] == 3
    assert lines["server.quoted"] == 4
    assert lines["server.a.b"] == 5
    assert lines["targets.targets[0]"] == 6
    assert lines["targets.targets[0].name"] == 7
    assert "targets.targets[0].line" not in lines
    assert lines["targets.targets[1].url"] == 11
    assert [lines[f"targets.targets[1].list[{i}]"] for i in range(4)] == [13, 13, 14, 15]
    assert "targets.targets[1].list[4]" not in lines
    assert lines["targets.health_check.interval"] == 18


@pytest.mark.parametrize("url, masked", [
    ("postgresql://u:pw@h:5432/db", "postgresql://u:***@h:5432/db"),
    ("postgresql://u@h/db", "postgresql://u@h/db"),
    ("sqlite://./data/traffic.db", "sqlite://./data/traffic.db"),
    ("sqlite::memory:", "sqlite::memory:"),
])
def test_mask_url_password(url, masked):
    assert mask_url_password(url) == masked
