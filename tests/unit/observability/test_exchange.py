"""The log-phase Exchange record, built identically by both Session twins."""

from __future__ import annotations

import importlib.util
import pathlib

import pytest

from dispa.observability import exchange as ex_mod

_spec = importlib.util.spec_from_file_location(
    "twins", pathlib.Path(__file__).resolve().parents[1] / "proxy" / "test_protocol_twins.py")
twins = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(twins)


@pytest.fixture
def collected(monkeypatch):
    got = []

    def factory(snapshot, ctx, previous):
        return got.append

    monkeypatch.setattr(ex_mod, "SINK_FACTORIES", [factory])
    return got


def _fields(ex):
    return {k: getattr(ex, k) for k in ex_mod.Exchange.__slots__
            if k not in ("start", "t0", "duration", "request", "attempts")}


@pytest.mark.parametrize("twin", ["compiled", "pure"])
def test_proxied_request_record(twin, collected):
    twins.run(twin, twins.SCENARIOS["get"])
    assert len(collected) == 1
    ex = collected[0]
    assert (ex.method, ex.target, ex.version, ex.status) == ("GET", "/a?b=1", "HTTP/1.1", 200)
    assert ex.host == "example.com" and ex.domain == "example.com"
    assert ex.client_ip == "10.0.0.7"
    assert ex.bytes_out == 5 and ex.bytes_in == 0
    assert ex.header("user-agent") == "t" and ex.header("Referer") is None
    assert ex.cluster == "default" and ex.endpoint == "127.0.0.1:18090"
    assert [a[0] for a in ex.attempts] == ["127.0.0.1:18090"]
    assert ex.attempts[0][3] == "ok" and ex.upstream_seconds >= 0
    assert ex.request_id.startswith("rid-") and ex.error is None
    assert ex.duration >= 0 and abs(ex.start - __import__("time").time()) < 60


@pytest.mark.parametrize("twin", ["compiled", "pure"])
def test_local_answer_has_no_attempts(twin, collected):
    twins.run(twin, twins.SCENARIOS["protocol_error"])
    assert len(collected) == 1
    assert collected[0].status == 400 and collected[0].attempts == []
    assert collected[0].endpoint is None


def test_twins_agree(collected):
    for name in ("get", "pipelined", "head_request", "protocol_error"):
        collected.clear()
        twins.run("compiled", twins.SCENARIOS[name])
        a = [_fields(e) for e in collected]
        collected.clear()
        twins.run("pure", twins.SCENARIOS[name])
        b = [_fields(e) for e in collected]
        assert a == b, name


def test_no_sink_no_record(monkeypatch):
    calls = []
    monkeypatch.setattr(ex_mod, "SINK_FACTORIES", [lambda s, c, p: None])
    monkeypatch.setattr(ex_mod, "make_exchange", lambda *a, **k: calls.append(a))
    twins.run("pure", twins.SCENARIOS["get"])
    assert calls == []


def test_failing_sink_is_counted_not_raised(monkeypatch):
    def boom(ex):
        raise RuntimeError("sink broke")

    monkeypatch.setattr(ex_mod, "SINK_FACTORIES", [lambda s, c, p: boom])
    log = twins.run("compiled", twins.SCENARIOS["get"])
    assert b"hello" in twins.writes(log, "down")
