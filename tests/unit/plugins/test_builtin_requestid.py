"""``requestid``: every request carries an id upstream, and the response echoes it."""

from __future__ import annotations

import uuid

import msgspec
import pytest

from dispa.plugins.api import BuildContext, Headers, Request, ResponseHead
from dispa.plugins.builtin import BUILTIN_FILTERS, RequestId
from dispa.plugins.builtin.requestid import MAX_ID_CHARS, sane_id


def _build(**cfg) -> RequestId:
    return RequestId.build(msgspec.convert(cfg, RequestId.Config), BuildContext())


def _req(*headers, request_id="") -> Request:
    return Request("GET", "/", Headers([(k.encode("latin-1"), v.encode("latin-1"))
                                        for k, v in headers]), request_id=request_id)


def _exchange(f: RequestId, req: Request) -> ResponseHead:
    assert f.on_request(req) is None
    resp = ResponseHead(200, Headers([(b"X-Request-Id", b"from-upstream")]))
    assert f.on_response(req, resp) is None
    return resp


def _is_uuid4(s: str) -> bool:
    try:
        return uuid.UUID(s).version == 4
    except ValueError:
        return False


# --------------------------------------------------------------------------- config

def test_type_name():
    assert RequestId.name == "requestid" and RequestId in BUILTIN_FILTERS


def test_good_config_and_defaults():
    c = msgspec.convert({}, RequestId.Config)
    assert c.header == "x-request-id" and c.trust_incoming is False
    c = msgspec.convert({"header": "X-Correlation-Id", "trust_incoming": True}, RequestId.Config)
    assert c.header == "X-Correlation-Id" and c.trust_incoming


def test_unknown_key_is_refused():
    with pytest.raises(msgspec.ValidationError, match="unknown field"):
        msgspec.convert({"header_name": "x"}, RequestId.Config)


@pytest.mark.parametrize("cfg", [{"header": ""}, {"header": "x id"}, {"header": "x:id"},
                                 {"trust_incoming": "yes"}])
def test_bad_values_are_refused(cfg):
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert(cfg, RequestId.Config)


# --------------------------------------------------------------------------- behaviour

def test_generates_a_uuid4_and_echoes_it():
    f = _build()
    req = _req()
    resp = _exchange(f, req)
    rid = req.headers.get("x-request-id")
    assert _is_uuid4(rid)
    assert resp.headers.get_all("x-request-id") == [rid]     # the upstream's is replaced
    assert req.request_id == rid                             # empty before: now set


def test_each_request_gets_its_own_id():
    f = _build()
    ids = set()
    for _ in range(100):
        req = _req()
        f.on_request(req)
        ids.add(req.headers.get("x-request-id"))
    assert len(ids) == 100


def test_the_cores_request_id_is_used_and_never_overwritten():
    f = _build()
    req = _req(request_id="dispa-1f")
    resp = _exchange(f, req)
    assert req.headers.get("x-request-id") == "dispa-1f"
    assert resp.headers.get("x-request-id") == "dispa-1f"
    assert req.request_id == "dispa-1f"


def test_incoming_id_is_replaced_when_not_trusted():
    f = _build()
    req = _req(("X-Request-Id", "client-chosen"))
    _exchange(f, req)
    assert req.headers.get_all("x-request-id") != ["client-chosen"]
    assert _is_uuid4(req.headers.get("x-request-id"))


def test_sane_incoming_id_is_kept_when_trusted():
    f = _build(trust_incoming=True)
    req = _req(("X-Request-Id", "abc-123"), ("x-request-id", "second"), request_id="core-7")
    resp = _exchange(f, req)
    assert req.headers.get_all("x-request-id") == ["abc-123"]    # duplicates collapsed
    assert resp.headers.get("x-request-id") == "abc-123"
    assert req.request_id == "core-7"                            # the core's id stays


@pytest.mark.parametrize("bad", ["", "a b", "x" * (MAX_ID_CHARS + 1), "caf\xe9", "a\tb"])
def test_insane_incoming_id_is_replaced_even_when_trusted(bad):
    f = _build(trust_incoming=True)
    req = _req(("X-Request-Id", bad))
    _exchange(f, req)
    assert _is_uuid4(req.headers.get("x-request-id"))


def test_sane_id_bounds():
    assert sane_id("x" * MAX_ID_CHARS) and sane_id("!~")
    assert not sane_id(None) and not sane_id("") and not sane_id("x" * (MAX_ID_CHARS + 1))


def test_custom_header_name():
    f = _build(header="X-Correlation-Id")
    req = _req()
    resp = _exchange(f, req)
    rid = req.headers.get("x-correlation-id")
    assert _is_uuid4(rid) and resp.headers.get("x-correlation-id") == rid
    assert resp.headers.get("x-request-id") == "from-upstream"     # not ours: untouched


def test_response_without_a_request_pass_is_left_alone():
    # e.g. a response to a request this filter never saw (answered earlier in the chain)
    f = _build()
    resp = ResponseHead(200, Headers())
    f.on_response(_req(), resp)
    assert "x-request-id" not in resp.headers
