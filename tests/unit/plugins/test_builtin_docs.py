"""docs/plugins-builtin.md documents every built-in filter and every config key, with
defaults that match the code and examples that load — so the page cannot drift."""

from __future__ import annotations

import json
import pathlib
import re
import tomllib

import msgspec
import pytest

from dispa.plugins.api import BuildContext
from dispa.plugins.builtin import BUILTIN_FILTERS

DOC = pathlib.Path(__file__).resolve().parents[3] / "docs" / "plugins-builtin.md"
BY_NAME = {c.name: c for c in BUILTIN_FILTERS}
IDS = list(BY_NAME)


def _section(name: str) -> str:
    text = DOC.read_text(encoding="utf-8")
    m = re.search(rf"^## `{re.escape(name)}`\s*$", text, re.M)
    assert m, f"docs/plugins-builtin.md has no section for `{name}`"
    rest = text[m.end():]
    nxt = re.search(r"^## ", rest, re.M)
    return rest[:nxt.start()] if nxt else rest


def _rows(cls, prefix=""):
    """(documented key, default) for every config field, sub-struct fields as a.b."""
    for f in msgspec.structs.fields(cls):
        key = prefix + f.encode_name
        yield key, f.default
        if isinstance(f.default, msgspec.Struct):
            yield from _rows(type(f.default), key + ".")


@pytest.mark.parametrize("name", IDS)
def test_every_key_has_a_row(name):
    section = _section(name)
    for key, _ in _rows(BY_NAME[name].Config):
        assert re.search(rf"^\| `{re.escape(key)}` \|", section, re.M), \
            f"`{name}` lacks a row for `{key}`"


@pytest.mark.parametrize("name", IDS)
def test_documented_defaults_match_the_code(name):
    section = _section(name)
    for key, default in _rows(BY_NAME[name].Config):
        if default is msgspec.NODEFAULT or default is None or isinstance(default,
                                                                           msgspec.Struct):
            continue
        row = re.search(rf"^\| `{re.escape(key)}` \|[^|]*\| `([^`]*)` \|", section, re.M)
        assert row, f"`{name}`.`{key}`: default column is not a literal"
        expected = json.dumps(msgspec.to_builtins(default), ensure_ascii=False)
        assert row.group(1) == expected, f"`{name}`.`{key}`"


@pytest.mark.parametrize("name", IDS)
def test_examples_load_and_build(name):
    blocks = re.findall(r"```toml\n(.*?)```", _section(name), re.S)
    assert blocks, f"`{name}` has no example"
    for block in blocks:
        entries = tomllib.loads(block)["plugins"]["plugins"]
        for entry in entries:
            assert entry["type"] == name
            cls = BY_NAME[entry["type"]]
            config = msgspec.convert(entry.get("config", {}), cls.Config)
            cls.build(config, BuildContext(instance_name=entry["name"]))


def test_the_introduction_example_loads():
    text = DOC.read_text(encoding="utf-8")
    first = re.search(r"```toml\n(.*?)```", text, re.S).group(1)
    entry = tomllib.loads(first)["plugins"]["plugins"][0]
    msgspec.convert(entry["config"], BY_NAME[entry["type"]].Config)


def test_the_overview_table_lists_every_filter():
    text = DOC.read_text(encoding="utf-8")
    for name in BY_NAME:
        assert re.search(rf"^\| `{name}` \|", text, re.M), name
