"""json_schema() is a valid JSON Schema that accepts the original example file."""

from __future__ import annotations

import json
import tomllib

import jsonschema
import pytest
import yaml

from dispa.config import json_schema


def test_schema_is_valid_json_schema():
    schema = json_schema()
    json.dumps(schema)  # plain JSON
    jsonschema.validators.validator_for(schema).check_schema(schema)


def test_schema_validates_compat_file(compat_path):
    data = tomllib.loads(compat_path.read_text(encoding="utf-8"))
    jsonschema.validate(data, json_schema())


def test_schema_rejects_unknown_keys_and_bad_values():
    schema = json_schema()
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"server": {"bind_adress": "x"}}, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"server": {"workers": 0}}, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"targets": {"load_balancing": {"type": "fastest"}}}, schema)


def test_schema_accepts_examples(examples_dir):
    schema = json_schema()
    for path in sorted(examples_dir.glob("*.toml")):
        jsonschema.validate(tomllib.loads(path.read_text(encoding="utf-8")), schema)
    for path in sorted(examples_dir.glob("*.yaml")):
        jsonschema.validate(yaml.safe_load(path.read_text(encoding="utf-8")), schema)
