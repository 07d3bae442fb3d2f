"""Bounded property test: load_config_text raises nothing but ConfigError.

The unbounded version is the atheris target tests/fuzz/fuzz_config.py; for a longer local
run, set DISPA_FUZZ_EXAMPLES (examples per test, default about 70).
"""

from __future__ import annotations

import os
import pathlib

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dispa.config import load_config_text
from dispa.config.model import Config
from dispa.errors import ConfigError

def _examples(default: int) -> int:
    return int(os.environ.get("DISPA_FUZZ_EXAMPLES", default))


GOLDEN = pathlib.Path(__file__).resolve().parents[2] / "golden" / "config"
SEEDS = [p.read_text(encoding="utf-8") for p in sorted(GOLDEN.glob("*.toml"))]


def _keys(cls, out: set) -> set:
    import msgspec

    for field in msgspec.structs.fields(cls):
        out.add(field.encode_name)
    return out


KEYS = sorted({"server", "domains", "targets", "logging", "monitoring", "load_balancing",
               "health_check", "pool", "database", "file", "type", "url", "name", "weight",
               "bind_address", "workers", "intercept_domains", "timeout", "interval",
               "metrics_port", "enabled", "trusted_proxies", "via"} | _keys(Config, set()))

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
    st.text(max_size=20), st.sampled_from(["http://a:1", "https://x", "*.a.com", "auto",
                                           "${SET}", "${UNSET}", "${X:-5}", "[::1]:80",
                                           "0.0.0.0:8080", "weighted", "", "*", "$${"]),
)
documents = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.one_of(st.sampled_from(KEYS), st.text(max_size=8)), children,
                        max_size=5),
    ),
    max_leaves=25,
)


def _load(text: str, fmt: str) -> None:
    try:
        load_config_text(text, fmt=fmt, name="<fuzz>", env={"SET": "1"})
    except ConfigError:
        pass


@settings(max_examples=_examples(70), deadline=None, suppress_health_check=list(HealthCheck))
@given(st.text(max_size=300), st.sampled_from(["toml", "yaml"]))
def test_arbitrary_text_raises_only_config_error(text, fmt):
    _load(text, fmt)


@settings(max_examples=_examples(70), deadline=None, suppress_health_check=list(HealthCheck))
@given(documents)
def test_arbitrary_structures_raise_only_config_error(doc):
    try:
        text = yaml.safe_dump(doc, allow_unicode=True)
    except yaml.YAMLError:
        return
    _load(text, "yaml")


@settings(max_examples=_examples(60), deadline=None, suppress_health_check=list(HealthCheck))
@given(st.sampled_from(SEEDS), st.data())
def test_mutated_real_files_raise_only_config_error(seed, data):
    lines = seed.splitlines()
    for _ in range(data.draw(st.integers(1, 4))):
        if not lines:
            break
        i = data.draw(st.integers(0, len(lines) - 1))
        action = data.draw(st.sampled_from(["drop", "dup", "edit", "value"]))
        if action == "drop":
            del lines[i]
        elif action == "dup":
            lines.insert(i, lines[i])
        elif action == "edit":
            j = data.draw(st.integers(0, len(lines[i])))
            lines[i] = lines[i][:j] + data.draw(st.text(max_size=5)) + lines[i][j:]
        elif "=" in lines[i]:
            key = lines[i].split("=", 1)[0]
            value = data.draw(st.sampled_from(['0', '-1', '"x"', 'true', '[]', '{}', '1e400',
                                               '"${UNSET}"', '"http://"', '[1, "a"]', 'nan']))
            lines[i] = f"{key}= {value}"
    _load("\n".join(lines), "toml")
