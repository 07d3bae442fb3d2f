"""${NAME} and ${NAME:-default} substitution in string values."""

from __future__ import annotations

import pytest

from dispa.config import load_config_text

TEXT = '''
[server]
bind_address = "${HOST:-127.0.0.1}:${PORT:-8080}"
workers = "${WORKERS:-auto}"
request_timeout = "${TIMEOUT:-12.5}"
via = "${VIA}"

[[targets.targets]]
name = "${NAME:-one}"
url = "http://${UPSTREAM:-127.0.0.1}:3000"
weight = "${WEIGHT:-2}"

[targets.health_check]
enabled = "${HC:-false}"

[logging.database]
url = "postgresql://dispa:${DB_PASSWORD}@db:5432/dispa"
'''


def test_defaults_fill_typed_fields():
    loaded = load_config_text(TEXT, fmt="toml", env={"VIA": "edge", "DB_PASSWORD": "s3cret"})
    listener = loaded.static.listeners[0]
    assert (listener.host, listener.port) == ("127.0.0.1", 8080)
    assert loaded.static.workers == 0  # "auto"
    assert loaded.snapshot.proxy.request_timeout_seconds == 12.5
    assert loaded.snapshot.proxy.via == "edge"
    (endpoint,) = loaded.snapshot.clusters[0].endpoints
    assert (endpoint.name, endpoint.weight) == ("one", 2)
    assert loaded.snapshot.clusters[0].health_check.enabled is False


def test_environment_wins_over_defaults():
    env = {"VIA": "", "DB_PASSWORD": "pw", "PORT": "9000", "WORKERS": "3", "WEIGHT": "5",
           "UPSTREAM": "backend.internal", "HC": "true"}
    loaded = load_config_text(TEXT, fmt="toml", env=env)
    assert loaded.static.listeners[0].port == 9000
    assert loaded.static.workers == 3
    assert loaded.snapshot.proxy.via == ""
    (endpoint,) = loaded.snapshot.clusters[0].endpoints
    assert (endpoint.id, endpoint.weight) == ("backend.internal:3000", 5)
    assert loaded.snapshot.clusters[0].health_check.enabled is True


def test_secrets_are_masked_in_as_dict():
    loaded = load_config_text(TEXT, fmt="toml", env={"VIA": "x", "DB_PASSWORD": "s3cret"})
    assert loaded.model.logging.database.url == "postgresql://dispa:s3cret@db:5432/dispa"
    url = loaded.as_dict()["logging"]["database"]["url"]
    assert url == "postgresql://dispa:***@db:5432/dispa"
    assert "s3cret" not in repr(loaded.as_dict())


def test_undefined_variable_names_variable_and_field(issues_of):
    errors = issues_of(TEXT, env={"DB_PASSWORD": "x"})
    assert len(errors) == 1
    (issue,) = errors
    assert issue.path == "server.via" and issue.line == 6
    assert "'VIA'" in issue.message


def test_every_undefined_variable_is_reported(issues_of):
    errors = issues_of(TEXT, env={})
    assert {e.path for e in errors} == {"server.via", "logging.database.url"}


def test_substituted_value_still_validated(one_issue):
    issue = one_issue(TEXT, env={"VIA": "x", "DB_PASSWORD": "x", "WEIGHT": "zero"})
    assert issue.path == "targets.targets[0].weight"
    assert "zero" in issue.message


def test_literal_strings_are_not_coerced(one_issue):
    text = '[server]\nworkers = "4"\n[[targets.targets]]\nname = "a"\nurl = "http://a"\n'
    assert one_issue(text).path == "server.workers"


def test_dollar_escape_and_malformed_reference(one_issue, minimal):
    issue = one_issue('[domains]\nreject_body = "${not closed"\n' + minimal)
    assert issue.path == "domains.reject_body" and "malformed" in issue.message
    loaded = load_config_text('[domains]\nreject_body = "cost: $${X}"\n' + minimal,
                              fmt="toml", env={})
    assert loaded.snapshot.intercept.reject_body == "cost: ${X}"


@pytest.mark.parametrize("fmt, text", [
    ("yaml",
     "server:\n  workers: ${W:-2}\ntargets:\n  targets:\n    - {name: a, url: 'http://a'}\n"),
    ("toml", '[server]\nworkers = "${W:-2}"\n[[targets.targets]]\nname = "a"\nurl = "http://a"\n'),
])
def test_both_formats_substitute(fmt, text):
    assert load_config_text(text, fmt=fmt, env={}).static.workers == 2
