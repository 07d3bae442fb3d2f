"""The access log sink: JSON and nginx-style text lines, redacted, escaped, buffered."""

from __future__ import annotations

import json
import time

import pytest

from dispa.config.logging_model import PRESETS
from dispa.observability.access_log import AccessLog, compile_format, factory
from dispa.observability.exchange import Exchange
from dispa.observability.redaction import NULL_REDACTOR, Redactor

RED = Redactor({"mask_headers": ["authorization", "cookie"], "mask_query_params": ["token"],
                "card_numbers": True, "bearer_tokens": True})


def _ex(**kw) -> Exchange:
    base = dict(start=time.mktime((2026, 11, 29, 4, 28, 28, 0, 0, -1)) + 0.25, t0=0.0,
                duration=0.0123, client_ip="10.0.0.7", method="GET",
                target="/a?token=s3cr3t&card=4111111111111111", version="HTTP/1.1",
                host="example.com", domain="example.com", status=200, bytes_in=3,
                bytes_out=512,
                request_headers=[(b"Host", b"example.com"), (b"User-Agent", b"curl/8"),
                                 (b"Authorization", b"Bearer SECRET-TOKEN-1"),
                                 (b"Referer", b"http://r/?token=abc"),
                                 (b"Cookie", b"sid=COOKIE-VALUE")],
                request_id="rid-1", route=None, cluster="default", endpoint="127.0.0.1:9000",
                attempts=[("127.0.0.1:9000", 1.0, 1.01, "ok")], error=None, request=None,
                scheme="http", tls=None)
    base.update(kw)
    return Exchange(**base)


class _Ctx:
    loop = None
    metrics = None
    worker_id = 2


def test_combined_preset_matches_nginx_shape():
    line = compile_format(PRESETS["combined"], RED)(_ex())
    assert line.startswith('10.0.0.7 - - [29/Nov/2026:04:28:28 ')
    assert '"GET /a?token=***&card=************1111 HTTP/1.1" 200 512 ' in line
    assert line.endswith('"http://r/?token=***" "curl/8"')


def test_custom_variables():
    fmt = ("$request_id $host $status $request_time $upstream_addr "
           "$upstream_response_time $http_authorization $http_x_missing $worker")
    line = compile_format(fmt, RED, worker=3)(_ex())
    assert line == "rid-1 example.com 200 0.012 127.0.0.1:9000 0.010 *** - 3"


def test_text_escapes_like_nginx():
    line = compile_format('"$request" "$http_user_agent"', NULL_REDACTOR)(
        _ex(target='/x"y\n', request_headers=[(b"User-Agent", b'a"b\\c\xff')]))
    assert line == '"GET /x\\x22y\\x0A HTTP/1.1" "a\\x22b\\x5Cc\\xC3\\xBF"'
    assert "\n" not in line


def test_json_line_is_redacted(tmp_path):
    spec = {"path": str(tmp_path / "a.log"), "format": "json", "buffer_size": 1 << 20,
            "flush_interval": 1.0}
    sink = AccessLog(spec, {"mask_headers": ["authorization"], "mask_query_params": ["token"]},
                     _Ctx())
    sink(_ex())
    sink(_ex(status=502, error="upstream connect_error", attempts=[], endpoint=None))
    assert (tmp_path / "a.log").read_bytes() == b""  # buffered, not written per request
    sink.close()
    lines = [json.loads(x) for x in (tmp_path / "a.log").read_text().splitlines()]
    assert len(lines) == 2
    a, b = lines
    assert a["uri"] == "/a?token=***&card=************1111" and a["status"] == 200
    assert a["remote_addr"] == "10.0.0.7" and a["user_agent"] == "curl/8"
    assert a["referer"] == "http://r/?token=***" and a["worker"] == 2
    assert a["upstream_addr"] == "127.0.0.1:9000" and a["upstream_attempts"] == 1
    assert a["time"].endswith("Z") and a["request_time"] == pytest.approx(0.0123)
    assert b["error"] == "upstream connect_error" and "upstream_addr" not in b
    text = (tmp_path / "a.log").read_text()
    for secret in ("s3cr3t", "4111111111111111", "SECRET-TOKEN-1", "COOKIE-VALUE"):
        assert secret not in text


def test_factory_reuses_the_sink_when_unchanged(tmp_path):
    class Snap:
        observability = {"access_log": {"path": str(tmp_path / "f.log"), "format": "json",
                                        "buffer_size": 10, "flush_interval": 1.0}}

    s1 = factory(Snap(), _Ctx(), None)
    assert factory(Snap(), _Ctx(), s1) is s1
    Snap.observability = {}
    assert factory(Snap(), _Ctx(), s1) is None
    s1.close()
