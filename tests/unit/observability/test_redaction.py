"""Redaction ([logging.sanitization]): what each rule does to headers, targets and text."""

from __future__ import annotations

import pytest

from dispa.config.load import load_config_text as _load
from dispa.config.logging_model import compile_redaction
from dispa.errors import ConfigError
from dispa.observability.redaction import NULL_REDACTOR, Redactor, build_redactor, luhn_ok

KEY = "0123456789abcdef-test-key"
BASE = '[[targets.targets]]\nname = "a"\nurl = "http://127.0.0.1:9"\n'


def load_config_text(text, fmt):
    return _load(BASE + text, fmt=fmt)


def _red(**kw) -> Redactor:
    """A redactor from the compiled defaults of a config with the access log on."""
    lines = ["[logging.access_log]", "enabled = true", "[logging.sanitization]"]
    for k, v in kw.items():
        lines.append(f"{k} = {v}")
    loaded = load_config_text("\n".join(lines), fmt="toml")
    return build_redactor(compile_redaction(loaded.model))


def test_luhn():
    assert luhn_ok("4111111111111111") and luhn_ok("5500005555555559")
    assert not luhn_ok("4111111111111112")


@pytest.mark.parametrize("raw, expected", [
    ("/pay?card=4111111111111111", "/pay?card=************1111"),
    ("/pay?card=4111-1111-1111-1111&x=1", "/pay?card=************1111&x=1"),
    ("/pay?card=4111+1111+1111+1111", "/pay?card=************1111"),
    ("/p/5500005555555559/x", "/p/************5559/x"),
    # not Luhn-valid: an order id or a timestamp survives
    ("/order?id=4111111111111112", "/order?id=4111111111111112"),
    ("/t?ts=1732850000123", "/t?ts=1732850000123"),
    # too short to be a card
    ("/x?n=411111111111", "/x?n=411111111111"),
])
def test_card_numbers_in_targets_are_masked_when_luhn_valid(raw, expected):
    assert _red().target(raw) == expected


def test_masked_query_params_default_and_custom():
    r = _red(mask_query_params='["token", "otp"]')
    assert r.target("/cb?token=abc&otp=123456&page=2") == "/cb?token=***&otp=***&page=2"
    assert _red().target("/cb?access_token=x.y.z&state=1") == "/cb?access_token=***&state=1"
    # names are case-insensitive and percent-decoded
    assert _red().target("/cb?Pass%77ord=hunter2") == "/cb?Pass%77ord=***"


def test_default_headers_masked_and_others_scanned():
    r = _red()
    out = dict(r.headers([(b"Authorization", b"Basic dXNlcjpwYXNz"), (b"Cookie", b"sid=abc"),
                          (b"X-Forwarded", b"Bearer abcdefghijkl"),
                          (b"Referer", b"https://shop/?card=4111111111111111&token=t"),
                          (b"Accept", b"*/*")]))
    assert out == {"Authorization": "***", "Cookie": "***", "X-Forwarded": "Bearer ***",
                   "Referer": "https://shop/?card=************1111&token=***",
                   "Accept": "*/*"}


def test_header_actions_redact_drops_and_hash_is_keyed():
    r = _red(header_action='"redact"')
    assert r.headers([("Cookie", "a=b"), ("Accept", "x")]) == [("Accept", "x")]
    h1 = _red(header_action='"hash"', hash_key=f'"{KEY}"').headers([("Cookie", "sid=1")])
    h2 = _red(header_action='"hash"', hash_key=f'"{KEY}"').headers([("Cookie", "sid=1")])
    h3 = _red(header_action='"hash"', hash_key='"another-key-0123456"').headers(
        [("Cookie", "sid=1")])
    assert h1 == h2 and h1[0][1].startswith("h:") and len(h1[0][1]) == 18
    assert h1 != h3  # keyed: without the key the hash cannot be recomputed


def test_bearer_jwt_email_and_custom_patterns():
    r = _red(emails="true")
    assert r.text("auth Bearer abc.def-123456 end") == "auth Bearer *** end"
    assert r.text("eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.c2ln") == "***"
    assert r.text("from bob@example.com") == "from ***@example.com"
    assert _red().text("from bob@example.com") == "from bob@example.com"  # opt-in
    loaded = load_config_text(
        '[logging.access_log]\nenabled = true\n[logging.sanitization]\n'
        f'hash_key = "{KEY}"\n'
        '[[logging.sanitization.patterns]]\nname = "ssn"\nregex = "\\\\b\\\\d{3}-\\\\d{2}-\\\\d{4}\\\\b"\n'
        'action = "redact"\n'
        '[[logging.sanitization.fields]]\nname = "client_ip"\naction = "hash"\n'
        '[[logging.sanitization.fields]]\nname = "query:email"\naction = "redact"\n',
        fmt="toml")
    r = build_redactor(compile_redaction(loaded.model))
    assert r.text("ssn 123-45-6789 ok") == "ssn [REDACTED] ok"
    assert r.field("client_ip", "10.1.2.3").startswith("h:")
    # the same rule reaches the span attribute of that field
    assert r.value("client.address", "10.1.2.3") == r.field("client_ip", "10.1.2.3")
    assert r.field("method", "GET") == "GET"
    assert r.target("/u?email=a@b.c&x=1") == "/u?email=[REDACTED]&x=1"


def test_span_attribute_names():
    r = _red()
    assert r.value("http.request.header.authorization", ["Bearer x"]) == ["***"]
    assert r.value("url.full", "http://h/p?token=1&c=4111111111111111") == \
        "http://h/p?token=***&c=************1111"
    assert r.value("http.response.status_code", 200) == 200
    assert r.value("db.statement", "card 4111111111111111") == "card ************1111"


def test_disabled_passes_through():
    lines = ("[logging.access_log]\nenabled = true\n[logging.sanitization]\nenabled = false\n")
    assert compile_redaction(load_config_text(lines, fmt="toml").model) is None
    assert build_redactor(None) is NULL_REDACTOR
    assert NULL_REDACTOR.target("/?card=4111111111111111") == "/?card=4111111111111111"
    assert NULL_REDACTOR.headers([(b"Cookie", b"a")]) == [("Cookie", "a")]


@pytest.mark.parametrize("toml, path", [
    ('[logging.sanitization]\nheader_action = "hash"\n', "logging.sanitization.hash_key"),
    ('[[logging.sanitization.patterns]]\nname = "x"\nregex = "(unclosed"\n',
     "logging.sanitization.patterns[0].regex"),
    ('[[logging.sanitization.fields]]\nname = "header:"\n',
     "logging.sanitization.fields[0].name"),
    ('[logging.sanitization]\nmask_headers = ["bad header"]\n',
     "logging.sanitization.mask_headers[0]"),
    ('[logging.sanitization]\nmask = 1\n', "logging.sanitization"),
    ('[logging.access_log]\nformat = "$remote_addr $nope"\n', "logging.access_log.format"),
    ('[logging]\nenabled = true\ntype = "database"\n[logging.database]\nurl = "mysql://x"\n',
     "logging.database.url"),
    ('[logging.file]\ncompression = "bzip2"\n', "logging.file.compression"),
    ('[logging.database]\ntable = "t; DROP TABLE x"\n', "logging.database.table"),
])
def test_bad_sanitization_is_refused_with_its_path(toml, path):
    with pytest.raises(ConfigError) as e:
        load_config_text(toml, fmt="toml")
    text = str(e.value)
    assert path in text, text
    assert ":" in text  # file:line


def test_hash_key_is_masked_in_admin_config():
    loaded = load_config_text(f'[logging.sanitization]\nhash_key = "{KEY}"\n', fmt="toml")
    assert loaded.as_dict()["logging"]["sanitization"]["hash_key"] == "***"
    assert loaded.model.logging.sanitization.hash_key == KEY
