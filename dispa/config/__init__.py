"""Configuration: load (TOML/YAML) -> validate -> compile into a Snapshot.

Public API::

    load_config(path, *, env=None, workers_override=None) -> LoadedConfig
    load_config_text(text, *, fmt, name="<string>", env=None) -> LoadedConfig
    check_file(path) -> list[ConfigIssue]
    json_schema() -> dict

Bad files raise :class:`dispa.errors.ConfigError` listing every problem; see
docs/configuration.md for the format.
"""

# Lazy (PEP 562): workers import dispa.config.snapshot only, and must not pay for the
# loaders (PyYAML, tomllib, the model) in time or memory.
_EXPORTS = {
    "LoadedConfig": "dispa.config.load", "check_file": "dispa.config.load",
    "load_config": "dispa.config.load", "load_config_text": "dispa.config.load",
    "json_schema": "dispa.config.schema",
}


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'dispa.config' has no attribute {name!r}")
    import importlib
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__all__ = ["LoadedConfig", "check_file", "json_schema", "load_config", "load_config_text"]
