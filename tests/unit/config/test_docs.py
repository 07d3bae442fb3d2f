"""docs/configuration.md documents every key of the model, so the docs cannot drift."""

from __future__ import annotations

import pathlib
import re
import typing

import msgspec
import pytest

from dispa.config import model as m
from dispa.config.load import _unwrap

DOC = pathlib.Path(__file__).resolve().parents[3] / "docs" / "configuration.md"


def _tables(cls: type, prefix: str, out: dict) -> dict:
    """{"[targets.health_check]": HealthCheckConfig, ...} for every table of the model."""
    out[prefix] = cls
    for field in msgspec.structs.fields(cls):
        tp = _unwrap(field.type)
        args = typing.get_args(tp)
        if isinstance(tp, type) and issubclass(tp, msgspec.Struct):
            _tables(tp, f"{prefix}.{field.encode_name}".lstrip("."), out)
        elif typing.get_origin(tp) is list and args and isinstance(args[0], type) \
                and issubclass(args[0], msgspec.Struct):
            _tables(args[0], f"{prefix}.{field.encode_name}".lstrip("."), out)
        elif args and all(isinstance(a, type) and issubclass(a, msgspec.Struct) for a in args):
            _tables(args[0], f"{prefix}.{field.encode_name}".lstrip("."), out)
            out[f"{prefix}.{field.encode_name}".lstrip(".") + "#type"] = args[0]
    return out


TABLES = {k: v for k, v in _tables(m.Config, "", {}).items() if k}


def _section(text: str, table: str) -> str:
    """The part of the document under the heading for ``table``, up to the next heading."""
    heading = re.search(rf"^#+ `\[\[?{re.escape(table)}\]?\]`\s*$", text, re.M)
    assert heading, f"docs/configuration.md has no heading for [{table}]"
    rest = text[heading.end():]
    following = re.search(r"^#+ ", rest, re.M)
    return rest[:following.start()] if following else rest


@pytest.mark.parametrize("table", sorted(t for t in TABLES if "#" not in t))
def test_every_key_has_a_row_in_its_table(table):
    text = DOC.read_text(encoding="utf-8")
    section = _section(text, table)
    cls = TABLES[table]
    for field in msgspec.structs.fields(cls):
        if isinstance(field.type, type) and issubclass(field.type, msgspec.Struct):
            continue  # a sub-table: it has its own heading, checked on its own
        assert re.search(rf"^\| `{field.encode_name}` \|", section, re.M) or \
            f"`[{table}.{field.encode_name}]`" in text or \
            f"`[[{table}.{field.encode_name}]]`" in text, \
            f"docs/configuration.md: [{table}] lacks a row for `{field.encode_name}`"


def test_tagged_choices_are_documented():
    text = DOC.read_text(encoding="utf-8")
    section = _section(text, "targets.load_balancing")
    row = re.search(r"^\| `type` \|.*$", section, re.M)
    assert row, "load_balancing lacks a `type` row"
    for variant in m.LoadBalancing.__subclasses__():
        assert f"`{variant.__struct_config__.tag}`" in row.group(0)


def test_documented_defaults_match_the_model():
    """Spot-check: each row's default column equals the model default where it is a literal."""
    text = DOC.read_text(encoding="utf-8")
    checked = 0
    for table, cls in TABLES.items():
        if "#" in table:
            continue
        section = _section(text, table)
        for field in msgspec.structs.fields(cls):
            row = re.search(rf"^\| `{field.encode_name}` \|[^|]*\| `([^`]*)` \|", section, re.M)
            if not row or field.default is msgspec.NODEFAULT:
                continue
            default = field.default
            documented = row.group(1)
            if isinstance(default, bool):
                assert documented == str(default).lower(), (table, field.encode_name)
            elif isinstance(default, (int, float)):
                assert float(documented) == float(default), (table, field.encode_name)
            elif isinstance(default, str):
                assert documented == f'"{default}"'.replace("\n", "\\n") or \
                    documented == default, (table, field.encode_name)
            checked += 1
    assert checked > 40
