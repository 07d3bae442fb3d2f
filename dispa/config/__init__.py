"""Configuration: load (TOML/YAML) -> validate -> compile into a Snapshot.

Public API::

    load_config(path, *, env=None, workers_override=None) -> LoadedConfig
    load_config_text(text, *, fmt, name="<string>", env=None) -> LoadedConfig
    check_file(path) -> list[ConfigIssue]
    json_schema() -> dict

Bad files raise :class:`dispa.errors.ConfigError` listing every problem; see
docs/configuration.md for the format.
"""

from dispa.config.load import LoadedConfig, check_file, load_config, load_config_text
from dispa.config.schema import json_schema

__all__ = ["LoadedConfig", "check_file", "json_schema", "load_config", "load_config_text"]
