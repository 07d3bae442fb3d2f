"""The log phase's fast paths give exactly what the reference (field-by-field) paths give.

docs/logging.md#cost: the access log and the traffic log render a line with one
``Redactor.suspect`` check and one escaping check per line, and fall back to the
reference rendering when either fails. These tests feed both paths a corpus of exchanges
(secrets in every field, quotes, control and non-ASCII bytes, %-encoded parameter names,
header rules of every action) built by a real HTTP/1.1 parser through ``make_exchange``
(what the Session builds) and require identical output, and check that a clean request
does take the fast path.
"""

from __future__ import annotations

import json

import pytest

from dispa.config.logging_model import PRESETS
from dispa.observability import access_log as al
from dispa.observability.exchange import CLOCKS, Exchange, make_exchange
from dispa.observability.redaction import NULL_REDACTOR, Redactor
from dispa.observability.traffic_log import make_row, make_row_slow
from dispa.protocols.http1 import RequestParser

REDACTIONS = {
    "default": {"mask_headers": ["authorization", "cookie", "x-api-key"],
                "mask_query_params": ["token", "access_token", "password"],
                "card_numbers": True, "bearer_tokens": True},
    "rules": {"mask_headers": ["authorization"], "header_action": "redact",
              "mask_query_params": ["api key"], "emails": True,
              "fields": [["client_ip", "hash"], ["host", "mask"], ["header:user-agent", "hash"],
                         ["header:cookie", "hash"]], "hash_key": "k"},
    "patterns": {"patterns": [["order", r"ORD-\d+", "redact"]]},
}

HEADS = [
    b"GET /api/v1/items?page=2&sort=asc HTTP/1.1\r\nHost: api.example.com\r\n"
    b"User-Agent: Mozilla/5.0 (X11; Linux x86_64) Chrome/120.0.0.0 Safari/537.36\r\n"
    b"Referer: https://www.example.com/list?page=1\r\n\r\n",
    b"GET /pay?card=4111-1111-1111-1111&token=s3cr3t HTTP/1.1\r\nHost: h\r\n"
    b"Authorization: Bearer abcdefghijkl\r\nCookie: sid=COOKIE\r\n\r\n",
    b"GET /a?%74oken=s3cr3t&x=1 HTTP/1.0\r\nHost: h\r\nUser-Agent: t token abcdefgh\r\n\r\n",
    b"GET /a HTTP/1.1\r\nHost: h\r\nUser-Agent: q\"uo\\te \xc3\xa9\r\n"
    b"Referer: http://r/?password=pw&page=3\r\n\r\n",
    b"POST /o?ref=ORD-12345&api+key=zz HTTP/1.1\r\nHost: shop\r\nContent-Length: 0\r\n"
    b"User-Agent: eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.sig\r\nX-Mail: a.b@example.com\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: h\r\nUser-Agent: 4 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1\r\n"
    b"Referer: \r\n\r\n",
]


class Exhaustive(Redactor):
    """The reference redactor: every rule's regex runs on every string (no pre-check)."""

    def suspect(self, s: str) -> bool:
        return True


class _Cluster:
    name = "default"


def _exchange(raw: bytes, error=None, status=200):
    p = RequestParser()
    p.feed(raw)
    p.next_event()
    t0 = 1000.0
    return make_exchange(t0, t0 + 0.0123, "10.0.0.7", p.head, "h", status, len(raw), 512,
                         b"rid-1", _Cluster, "127.0.0.1:9000",
                         [("127.0.0.1:9000", t0 + 0.001, t0 + 0.01, "ok")], None, error)


CORPUS = [_exchange(h) for h in HEADS] + [
    _exchange(HEADS[0], error="upstream said Bearer abcdefghij", status=502)]
FORMATS = [PRESETS["combined"], PRESETS["common"],
           '$host "$request_uri" $http_authorization $http_cookie "$http_x_mail" $error '
           '$upstream_addr $request_id 100%% $remote_addr $http_referer']


class _Ctx:
    loop = None
    metrics = None
    worker_id = 1


@pytest.mark.parametrize("red", list(REDACTIONS), ids=str)
@pytest.mark.parametrize("fmt", FORMATS, ids=["combined", "common", "custom"])
def test_text_fast_path_equals_reference(fmt, red):
    render = al.compile_format(fmt, Redactor(REDACTIONS[red]), newline=True)
    reference = al.compile_format(fmt, Exhaustive(REDACTIONS[red]), newline=True).slow
    for ex in CORPUS:
        assert render(ex) == reference(ex), ex.target


@pytest.mark.parametrize("red", list(REDACTIONS) + [None], ids=str)
def test_json_fast_path_equals_reference(red, tmp_path):
    sink = al.AccessLog({"path": str(tmp_path / "a.log"), "format": "json"},
                        REDACTIONS.get(red), _Ctx())
    ref = al.AccessLog({"path": str(tmp_path / "b.log"), "format": "json"},
                       REDACTIONS.get(red), _Ctx())
    if red is not None:
        ref.red = Exhaustive(REDACTIONS[red])
    for ex in CORPUS:
        assert sink._json(ex) == ref._json_slow(ex), ex.target
        json.loads(sink._json(ex))
    sink.close()
    ref.close()


@pytest.mark.parametrize("red", list(REDACTIONS), ids=str)
def test_traffic_row_fast_path_equals_reference(red):
    r = Redactor(REDACTIONS[red])
    ref = Exhaustive(REDACTIONS[red])
    for ex in CORPUS:
        assert make_row(ex, r, 3) == make_row_slow(ex, ref, 3), ex.target
    assert make_row(CORPUS[0], NULL_REDACTOR, 3) == make_row_slow(CORPUS[0], NULL_REDACTOR, 3)


def test_secrets_never_pass_the_fast_path(tmp_path):
    sink = al.AccessLog({"path": str(tmp_path / "a.log"), "format": PRESETS["combined"]},
                        REDACTIONS["default"], _Ctx())
    lines = "".join(sink._render(ex) for ex in CORPUS)
    for secret in ("4111-1111-1111-1111", "s3cr3t", "abcdefghijkl", "pw&", "eyJhbGci"):
        assert secret not in lines
    sink.close()


def test_clean_request_takes_the_fast_path(tmp_path, monkeypatch):
    """A request with nothing to redact or escape never calls the reference paths (which
    is what makes the log phase cheap)."""
    red = REDACTIONS["default"]
    sink = al.AccessLog({"path": str(tmp_path / "a.log"), "format": PRESETS["combined"]},
                        red, _Ctx())
    jsink = al.AccessLog({"path": str(tmp_path / "j.log"), "format": "json"}, red, _Ctx())

    def boom(*a):
        raise AssertionError("reference path used for a clean request")

    sink._render.__globals__["slow"] = boom
    monkeypatch.setattr(jsink, "_json_slow", boom)
    monkeypatch.setattr("dispa.observability.traffic_log.make_row_slow", boom)
    ex = CORPUS[0]
    assert sink._render(ex).startswith('10.0.0.7 - - [')
    assert json.loads(jsink._json(ex))["uri"] == "/api/v1/items?page=2&sort=asc"
    assert make_row(ex, Redactor(red), 0)[7] == "/api/v1/items?page=2&sort=asc"
    with pytest.raises(AssertionError):
        sink._render(CORPUS[1])  # a card number: the reference path must run
    sink.close()
    jsink.close()


@pytest.mark.parametrize("spec", list(REDACTIONS.values()), ids=list(REDACTIONS))
def test_suspect_is_a_necessary_condition(spec):
    r = Redactor(spec)
    ref = Exhaustive(spec)
    strings = [ex.target for ex in CORPUS] + [
        v.decode("latin-1") for ex in CORPUS for _, v in ex.request_headers] + [
        "Basic dXNlcjpwYXNz", "BEARER abcdefghij", "5555 5555 5555 4444", "x@y.org",
        "4111+1111+1111+1111", "/q?Token=a", "/q?PASSWORD=b", "ORD-1"]
    for s in strings:
        if ref.text(s) != s or ref.target(s) != s:
            assert r.suspect(s), s
            assert (r.text(s), r.target(s)) == (ref.text(s), ref.target(s))
    assert not r.suspect("/api/v1/items?page=2&sort=asc") or r._always


def test_make_exchange_fields():
    ex = CORPUS[0]
    assert isinstance(ex, Exchange)
    assert (ex.method, ex.version, ex.host, ex.request_id, ex.cluster, ex.route) == (
        "GET", "HTTP/1.1", "api.example.com", "rid-1", "default", None)
    assert ex.header("USER-AGENT").startswith("Mozilla") and ex.header("x-none") is None
    assert ex.header_bytes(b"referer") == b"https://www.example.com/list?page=1"
    assert abs(ex.duration - 0.0123) < 1e-9 and ex.upstream_seconds == pytest.approx(0.009)
    # start = the worker's wall/monotonic offset + t0: within the refresh interval of
    # what time.time() would have said
    import time
    assert abs(CLOCKS.wall(time.monotonic()) - time.time()) < 0.01
    with pytest.raises(AttributeError):
        ex.host = "other"  # read-only: every sink sees the same record


def test_short_parameter_names_do_not_make_every_path_suspect(monkeypatch):
    """The default mask list holds "key", "code", "auth", "sig": only a parameter of that
    name makes a target suspect, not the word in a path (else most lines would take the
    slow path). The memo of header values stays bounded."""
    from dispa.observability import redaction
    r = Redactor({"mask_query_params": ["key", "code", "auth", "sig", "token"]})
    for clean in ("/api/keys/1", "/signup?next=/author", "/a?monkey=1&barcode=2",
                  "/oauth/callback?state=x"):
        assert not r.suspect(clean), clean
    for dirty in ("/a?key=1", "/a?x=1&CODE=2", "/a?%6Bey=1", "/a?si-g=1"):
        assert r.suspect(dirty), dirty
    monkeypatch.setattr(redaction, "SUSPECT_CACHE", 10)
    for i in range(25):
        r.suspect_cached(f"ua/{i}")
    assert 0 < len(r._memo) <= 10
    assert r.suspect_cached("Bearer abcdefghij") and r.suspect_cached("Bearer abcdefghij")
