"""JSON Schema of the configuration file, for editors and ``dispa config schema``.

Generated from ``config.model`` with ``msgspec.json.schema``, so it cannot drift from what
the loader accepts. It describes the file before ``${ENV}`` substitution only loosely: a
``"${PORT:-8080}"`` string where a number is expected is valid for the loader, not for the
schema. Cross-field rules (duplicate endpoints, timeout <= interval, ...) are not in it.
"""

from __future__ import annotations

import msgspec

from dispa.config import model as m

SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"


def json_schema() -> dict:
    """The JSON Schema (draft 2020-12) of the whole configuration file, as a dict."""
    schema = msgspec.json.schema(m.Config)
    return {
        "$schema": SCHEMA_DIALECT,
        "title": "Dispa configuration",
        "description": "Dispa configuration file (TOML or YAML); see docs/configuration.md.",
        **schema,
    }
