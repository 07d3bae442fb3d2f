"""docs/routing.md documents every key of the [routing] model; the model fits the loader."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys
import typing

import msgspec
import pytest

from dispa.config import model as m
from dispa.config import routing_model as rm

DOC = pathlib.Path(__file__).resolve().parents[3] / "docs" / "routing.md"


def _unwrap(tp):
    while typing.get_origin(tp) is typing.Annotated:
        tp = typing.get_args(tp)[0]
    return tp


def _structs(tp) -> list[type]:
    """The Struct types a field holds: itself, list items, Optional/Union members."""
    tp = _unwrap(tp)
    if isinstance(tp, type) and issubclass(tp, msgspec.Struct):
        return [tp]
    return [s for a in typing.get_args(tp) for s in _structs(a)]


def _tables(cls: type, prefix: str, out: dict) -> dict:
    out[prefix] = cls
    for field in msgspec.structs.fields(cls):
        found = _structs(field.type)
        if len(found) == 1:
            _tables(found[0], f"{prefix}.{field.encode_name}", out)
    return out


TABLES = _tables(rm.RoutingConfig, "routing", {})


def _section(text: str, table: str) -> str:
    heading = re.search(rf"^#+ `\[\[?{re.escape(table)}\]?\]`\s*$", text, re.M)
    assert heading, f"docs/routing.md has no heading for [{table}]"
    rest = text[heading.end():]
    following = re.search(r"^#+ ", rest, re.M)
    return rest[:following.start()] if following else rest


@pytest.mark.parametrize("table", sorted(TABLES))
def test_every_key_has_a_row_under_its_table(table):
    section = _section(DOC.read_text(encoding="utf-8"), table)
    for field in msgspec.structs.fields(TABLES[table]):
        assert re.search(rf"^\| `{field.encode_name}` \|", section, re.M), \
            f"docs/routing.md: [{table}] lacks a row for `{field.encode_name}`"


@pytest.mark.parametrize("table", sorted(TABLES))
def test_documented_defaults_match_the_model(table):
    section = _section(DOC.read_text(encoding="utf-8"), table)
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        if len(cells) == 4:
            rows[cells[0]] = cells[2]  # key | type | default | meaning
    for field in msgspec.structs.fields(TABLES[table]):
        documented = rows[f"`{field.encode_name}`"]
        default = field.default
        if field.default_factory is not msgspec.NODEFAULT:
            default = field.default_factory()
        if default is msgspec.NODEFAULT:
            assert documented == "(required)", (table, field.name)
        elif default is None:
            assert documented == "none", (table, field.name)
        elif isinstance(default, (bool, int, float, str, list, dict)) and \
                not isinstance(default, msgspec.Struct):
            text = documented.strip("`")
            want = {list: "[]", dict: "{}"}.get(type(default)) or (
                str(default).lower() if isinstance(default, bool) else
                f'"{default}"' if isinstance(default, str) else str(default))
            assert text == want, (table, field.name, text, want)


def test_every_value_match_type_is_documented():
    text = DOC.read_text(encoding="utf-8")
    for variant in typing.get_args(rm.ValueMatch):
        tag = variant.__struct_config__.tag
        key = msgspec.structs.fields(variant)[0].encode_name
        assert re.search(rf"^\| `{tag}`[^|]*\| `{key}` \|", text, re.M), tag


def test_the_base_table_keeps_the_options_of_the_model_base():
    mine, theirs = rm._Table.__struct_config__, m._Table.__struct_config__
    for option in ("frozen", "forbid_unknown_fields", "eq", "omit_defaults"):
        assert getattr(mine, option) == getattr(theirs, option), option


def test_routing_model_imports_first_without_a_cycle():
    for module in ("dispa.config.routing_model", "dispa.routing.rules", "dispa.config.model"):
        subprocess.run([sys.executable, "-c", f"import {module}"], check=True)


@pytest.mark.skipif("routing" not in m.Config.__struct_fields__,
                    reason="Config has no [routing] table yet")
def test_the_loader_builds_routing_and_reports_with_file_lines():
    from dispa.config.load import load_config_text
    from dispa.errors import ConfigError

    good = """
[[targets.targets]]
name = "backend"
url = "http://127.0.0.1:9000"

[routing]
default_target = "backend"

[[routing.rules]]
name = "api"
priority = 10
target = "backend"
[routing.rules.conditions.path]
template = "/users/{id}"
[[routing.rules.conditions.headers]]
name = "x-env"
value = { type = "regex", pattern = "^can" }
[routing.rules.actions.headers]
set = { "x-a" = "1" }
[routing.rules.actions.mirror]
target = "backend"
percent = 5.0

[[routing.rules]]
name = "moved"
[routing.rules.actions.redirect]
location = "https://example.com{path}"
status = 308
"""
    routing = load_config_text(good, fmt="toml").model.routing
    assert [r.name for r in routing.rules] == ["api", "moved"]
    assert routing.rules[1].actions.redirect == rm.RedirectConfig(
        location="https://example.com{path}", status=308)
    bad = good.replace('"^can"', '"^(can"').replace('"x-a" = "1"', '"x-a" = 1')
    with pytest.raises(ConfigError) as info:
        load_config_text(bad, fmt="toml")
    paths = {e.path: e for e in info.value.errors}
    assert set(paths) == {"routing.rules[0].conditions.headers[0].value.pattern",
                          "routing.rules[0].actions.headers.set.x-a"}
    line = bad.splitlines().index('value = { type = "regex", pattern = "^(can" }') + 1
    assert paths["routing.rules[0].conditions.headers[0].value.pattern"].line == line
