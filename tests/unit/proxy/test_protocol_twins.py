"""The compiled Session/UpstreamConnection/Pool against their pure twins, without sockets.

Each scenario drives a Session of one twin through fake transports (uvicorn MockTransport
style): bytes from the client, bytes from the upstream, EOFs. Everything either transport is
asked to do (writes, closes, pauses) is logged in order; the two twins must produce the same
log, byte for byte. A few scenarios also check the log against the expected wire bytes.

The compiled twin is imported directly (``dispa._hotpath``): if it is not built this module
fails loudly, as the codec tests do.
"""

from __future__ import annotations

import asyncio
import importlib
from types import SimpleNamespace

import pytest

from dispa.config.load import load_config_text
from dispa.observability.metrics import WorkerMetrics
from dispa.proxy import pool as pure_pool
from dispa.proxy import session as pure_session
from dispa.proxy.runtime import WorkerState, build_runtime
from dispa.routing.vhost import normalize_host

hotpath = importlib.import_module("dispa._hotpath")

TWINS = {
    "compiled": SimpleNamespace(Session=hotpath.Session, Pool=hotpath.Pool,
                                UpstreamConnection=hotpath.UpstreamConnection),
    "pure": SimpleNamespace(Session=pure_session.Session, Pool=pure_pool.Pool,
                            UpstreamConnection=pure_pool.UpstreamConnection),
}

BASE_CONFIG = """
[server]
bind_address = "127.0.0.1:18080"
workers = 1
{server_extra}
[domains]
intercept_domains = {domains}
[[targets.targets]]
name = "a"
url = "http://127.0.0.1:18090"
[targets.load_balancing]
type = "leastconnections"
[targets.health_check]
enabled = false
[monitoring]
enabled = false
"""


class FakeTransport:
    """Records every call into a log shared by both transports of a scenario."""

    def __init__(self, name: str, log: list, peer=("10.0.0.7", 53211)):
        self.name = name
        self.log = log
        self.peer = peer
        self.closing = False

    def get_extra_info(self, key, default=None):
        if key == "peername":
            return self.peer
        return default

    def set_write_buffer_limits(self, high=None, low=None):
        pass

    def write(self, data):
        self.log.append((self.name, "write", bytes(data)))

    def write_eof(self):
        self.log.append((self.name, "write_eof"))

    def pause_reading(self):
        self.log.append((self.name, "pause_reading"))

    def resume_reading(self):
        self.log.append((self.name, "resume_reading"))

    def is_closing(self):
        return self.closing

    def close(self):
        self.closing = True
        self.log.append((self.name, "close"))

    def abort(self):
        self.closing = True
        self.log.append((self.name, "abort"))


class FakeServer:
    """What a Session sees of dispa.server.worker.DataPlane."""

    def __init__(self, runtime):
        self.runtime = runtime
        self.sessions = set()
        self.draining = False
        self.slowdown_us = 0
        self.metrics = WorkerMetrics()
        self.passive = []
        self._rid = 0

    def next_request_id(self) -> bytes:
        self._rid += 1
        return f"rid-{self._rid:x}".encode()

    def domain_label(self, raw_host: bytes) -> str:
        return normalize_host(raw_host) or "-"

    def report_passive(self, cluster, endpoint_id, event):
        self.passive.append((cluster, endpoint_id, event))

    def busy_wait(self):
        pass


def run(twin: str, steps, *, server_extra: str = "", domains: str = "[]", peer=None,
        idle_conns: int = 1, extra: str = ""):
    """Run ``steps`` against one twin; return the transport log and the final state."""
    impl = TWINS[twin]
    loop = asyncio.new_event_loop()
    try:
        snapshot = load_config_text(
            BASE_CONFIG.format(server_extra=server_extra, domains=domains) + extra,
            fmt="toml").snapshot
        runtime = build_runtime(snapshot, WorkerState(loop))
        cluster = runtime.default_cluster
        ep = cluster.endpoints[0]
        pool = impl.Pool(loop, ep.host, ep.port, cluster.spec.pool)
        cluster.pools = [pool]
        log: list = []
        conns = []
        for k in range(idle_conns):
            conn = impl.UpstreamConnection(pool)
            conn.connection_made(FakeTransport(f"up{k}", log))
            pool.total += 1
            pool.idle.insert(0, conn)
            conns.append(conn)
        server = FakeServer(runtime)
        session = impl.Session(server)
        session.connection_made(FakeTransport("down", log, peer or ("10.0.0.7", 53211)))
        for step in steps:
            kind = step[0]
            if kind == "down":
                session.data_received(step[1])
            elif kind == "down_eof":
                log.append(("session", "eof_received", session.eof_received()))
            elif kind == "up":
                conns[step[2] if len(step) > 2 else 0].data_received(step[1])
            elif kind == "up_lost":
                conns[step[1] if len(step) > 1 else 0].connection_lost(None)
            elif kind == "pause_writing":
                session.pause_writing()
            elif kind == "resume_writing":
                session.resume_writing()
            elif kind == "deadline":
                session.on_deadline(0.0)
            elif kind == "drain":
                session.drain()
            else:  # pragma: no cover - a typo in a scenario
                raise AssertionError(kind)
            log.append(("state", session.state, session.requests))
        log.append(("pool", pool.total, len(pool.idle), pool.reuses))
        log.append(("inflight", cluster.selector.inflight(0)))
        log.append(("passive", tuple(server.passive)))
        log.append(("in_sessions", session in server.sessions))
        return log
    finally:
        loop.close()


def writes(log, name):
    return b"".join(e[2] for e in log if e[0] == name and e[1] == "write")


GET = b"GET /a?b=1 HTTP/1.1\r\nHost: example.com\r\nUser-Agent: t\r\nAccept: */*\r\n\r\n"
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nServer: o\r\n\r\nhello"

SCENARIOS = {
    "get": [("down", GET), ("up", OK)],
    "get_split_reads": [("down", GET[:10]), ("down", GET[10:]), ("up", OK[:20]),
                        ("up", OK[20:-2]), ("up", OK[-2:])],
    "pipelined": [("down", GET + GET.replace(b"/a?b=1", b"/second")),
                  ("up", OK), ("up", OK.replace(b"hello", b"world"))],
    "pipelined_third_arrives_later": [
        ("down", GET + GET), ("up", OK), ("down", GET), ("up", OK), ("up", OK)],
    "protocol_error": [("down", b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n")],
    "protocol_error_bad_line": [("down", b"GARBAGE\r\n\r\n")],
    "head_request": [("down", GET.replace(b"GET", b"HEAD")),
                     ("up", b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n")],
    "http10_client_chunked_origin": [
        ("down", b"GET / HTTP/1.0\r\nHost: example.com\r\nConnection: keep-alive\r\n\r\n"),
        ("up", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n")],
    "chunked_response": [("down", GET),
                         ("up", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                                b"5\r\nhello\r\n"),
                         ("up", b"6\r\n world\r\n0\r\n\r\n")],
    "chunked_request_with_trailers": [
        ("down", b"POST /p HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                 b"3\r\nabc\r\n"),
        ("down", b"0\r\nX-T: 1\r\n\r\n"), ("up", OK)],
    "content_length_request": [
        ("down", b"POST /p HTTP/1.1\r\nHost: x\r\nContent-Length: 6\r\n\r\nabc"),
        ("down", b"def"), ("up", OK)],
    "early_response_closes": [
        ("down", b"POST /p HTTP/1.1\r\nHost: x\r\nContent-Length: 6\r\n\r\nabc"),
        ("up", OK)],
    "interim_103_and_100": [
        ("down", GET),
        ("up", b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </s>\r\n\r\n"),
        ("up", OK)],
    "204_and_304": [("down", GET + GET),
                    ("up", b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n"),
                    ("up", b"HTTP/1.1 304 Not Modified\r\nContent-Length: 12\r\n\r\n")],
    "close_delimited_response": [("down", GET), ("up", b"HTTP/1.1 200 OK\r\n\r\nbody..."),
                                 ("up", b"more"), ("up_lost",)],
    "upstream_lost_mid_response": [("down", GET),
                                   ("up", b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc"),
                                   ("up_lost",)],
    "upstream_lost_before_response_not_reused": [
        ("down", b"POST /p HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\nz"), ("up_lost",)],
    "invalid_upstream_response": [("down", GET), ("up", b"HTTP/9.9 200 OK\r\n\r\n")],
    "connection_close_request": [
        ("down", b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"), ("up", OK)],
    "upstream_keep_alive_off": [
        ("down", GET), ("up", b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")],
    "absolute_form_target": [
        ("down", b"GET http://Example.COM:81/x/y HTTP/1.1\r\nHost: ignored\r\n\r\n"), ("up", OK)],
    "incoming_request_id_and_forwarding": [
        ("down", b"GET / HTTP/1.1\r\nHost: h\r\nX-Request-ID: abc-123\r\n"
                 b"X-Forwarded-For: 6.6.6.6\r\nForwarded: for=1.1.1.1\r\nExpect: foo\r\n\r\n"),
        ("up", OK)],
    "prior_via": [("down", b"GET / HTTP/1.1\r\nHost: h\r\nVia: 1.0 edge\r\n\r\n"), ("up", OK)],
    "host_with_quote": [("down", b'GET / HTTP/1.1\r\nHost: a"b\r\n\r\n'), ("up", OK)],
    "no_host_http10": [("down", b"GET / HTTP/1.0\r\n\r\n"), ("up", OK)],
    "upgrade_tunnel": [
        ("down", b"GET /ws HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"),
        ("up", b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n"
               b"Upgrade: websocket\r\n\r\nserver-frame"),
        ("down", b"client-frame"), ("up", b"more-server"), ("down_eof",), ("up_lost",)],
    "expect_100_continue": [
        ("down", b"PUT /u HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\n"),
        ("down", b"abc"), ("up", OK)],
    "client_eof_mid_request": [
        ("down", b"POST /p HTTP/1.1\r\nHost: x\r\nContent-Length: 6\r\n\r\nabc"), ("down_eof",)],
    "client_eof_while_waiting": [("down", GET), ("down_eof",)],
    "client_eof_idle": [("down", GET), ("up", OK), ("down_eof",)],
    "backpressure": [("down", GET), ("pause_writing",),
                     ("up", b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n12345"),
                     ("resume_writing",), ("up", b"67890")],
    "deadline_while_proxying": [("down", GET), ("deadline",)],
    "deadline_in_head": [("down", b"GET / HTTP/1.1\r\nHost"), ("deadline",)],
    "deadline_idle": [("deadline",)],
    "drain_mid_request": [("down", GET), ("drain",), ("up", OK)],
    "request_head_too_large": [("down", b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n")],
    "bad_body_mid_request": [
        ("down", b"POST /p HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n"),
        ("down", b"zz\r\n")],
}


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_twins_write_the_same_bytes(name):
    steps = SCENARIOS[name]
    compiled = run("compiled", steps)
    pure = run("pure", steps)
    assert compiled == pure


@pytest.mark.parametrize("config", [
    dict(server_extra='trusted_proxies = ["10.0.0.0/8"]'),
    dict(server_extra='via = ""'),
    dict(server_extra='request_id_header = ""'),
    dict(domains='["example.com"]'),
    dict(peer=("2001:db8::1", 1, 0, 0)),
], ids=["trusted", "no_via", "no_request_id", "intercept_miss", "ipv6_peer"])
@pytest.mark.parametrize("name", ["get", "pipelined", "incoming_request_id_and_forwarding",
                                  "prior_via", "content_length_request"])
def test_twins_agree_under_other_settings(config, name):
    steps = SCENARIOS[name]
    assert run("compiled", steps, **config) == run("pure", steps, **config)


@pytest.mark.parametrize("twin", sorted(TWINS))
def test_get_through_a_pooled_connection(twin):
    log = run(twin, SCENARIOS["get"])
    assert writes(log, "up0") == (
        b"GET /a?b=1 HTTP/1.1\r\nHost: example.com\r\nUser-Agent: t\r\nAccept: */*\r\n"
        b"X-Forwarded-For: 10.0.0.7\r\nX-Forwarded-Proto: http\r\n"
        b"X-Forwarded-Host: example.com\r\n"
        b'Forwarded: for=10.0.0.7;proto=http;host="example.com"\r\nVia: 1.1 dispa\r\n'
        b"x-request-id: rid-1\r\n\r\n")
    assert writes(log, "down") == (
        b"HTTP/1.1 200 OK\r\nServer: o\r\nContent-Length: 5\r\nX-Request-Id: rid-1\r\n\r\nhello")
    # Rule 2: one write per direction per message
    assert [e[0] for e in log if e[1:2] == ("write",)] == ["up0", "down"]
    assert ("pool", 1, 1, 1) in log


@pytest.mark.parametrize("twin", sorted(TWINS))
def test_pipelined_requests_answer_in_order(twin):
    log = run(twin, SCENARIOS["pipelined"])
    up = writes(log, "up0")
    assert up.index(b"GET /a?b=1 ") < up.index(b"GET /second ")
    down = writes(log, "down")
    assert down.index(b"hello") < down.index(b"world")
    assert [e[0] for e in log if e[1:2] == ("write",)] == ["up0", "down", "up0", "down"]


@pytest.mark.parametrize("twin", sorted(TWINS))
def test_protocol_error_answers_400_and_closes(twin):
    log = run(twin, SCENARIOS["protocol_error"])
    down = writes(log, "down")
    assert down.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert b"Connection: close\r\n" in down
    assert down.endswith(b"\r\n\r\nbad request: duplicate Host header\n")
    assert ("down", "close") in log
    assert writes(log, "up0") == b""


def test_request_ids_match_the_worker_format():
    from dispa.proxy import protocol
    for gen in (hotpath.RequestIds("abc-"), hotpath.RequestIds(b"abc-")):
        assert [gen() for _ in range(17)][::8] == [b"abc-1", b"abc-9", b"abc-11"]
    compiled, pure = hotpath.RequestIds("p-"), protocol.RequestIds("p-")
    assert [compiled() for _ in range(300)] == [f"p-{i:x}".encode() for i in range(1, 301)]
    assert [pure() for _ in range(300)] == [f"p-{i:x}".encode() for i in range(1, 301)]


@pytest.mark.parametrize("twin", sorted(TWINS))
def test_a_worker_request_id_generator_is_used(twin):
    def fast(server):
        server.next_request_id = hotpath.RequestIds("fast-")
    log = run_with(twin, SCENARIOS["get"], fast)
    assert b"x-request-id: fast-1\r\n" in writes(log, "up0")


def run_with(twin, steps, patch):
    orig = FakeServer.__init__

    def init(self, runtime):
        orig(self, runtime)
        patch(self)
    FakeServer.__init__ = init
    try:
        return run(twin, steps)
    finally:
        FakeServer.__init__ = orig


def _entry(log, kind):
    return next(e for e in log if e[0] == kind)


@pytest.mark.parametrize("twin", sorted(TWINS))
def test_bytes_after_a_response_are_never_pooled(twin):
    # an upstream that sends a body with a HEAD response: the extra bytes would otherwise be
    # read as the next request's response (possibly another client's)
    log = run(twin, [("down", GET.replace(b"GET", b"HEAD")),
                     ("up", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"
                            b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nevil")])
    assert writes(log, "down").startswith(b"HTTP/1.1 200 OK")
    assert b"evil" not in writes(log, "down")
    assert _entry(log, "pool")[1:3] == (0, 0)  # closed, not pooled
    assert _entry(log, "inflight") == ("inflight", 0)


@pytest.mark.parametrize("twin", sorted(TWINS))
def test_an_upstream_lost_mid_response_releases_its_in_flight_count(twin):
    log = run(twin, [("down", GET),
                     ("up", b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhel"),
                     ("up_lost",)])
    assert _entry(log, "inflight") == ("inflight", 0)


@pytest.mark.parametrize("twin", sorted(TWINS))
def test_absolute_form_authority_replaces_the_host_header(twin):
    log = run(twin, [("down", b"GET HTTP://Example.COM:81?q=1 HTTP/1.1\r\nHost: admin.internal\r\n\r\n"),
                     ("up", OK)])
    up = writes(log, "up0")
    assert up.startswith(b"GET /?q=1 HTTP/1.1\r\nHost: Example.COM:81\r\n")
    assert b"admin.internal" not in up


@pytest.mark.parametrize("twin", sorted(TWINS))
def test_absolute_form_with_userinfo_is_refused(twin):
    log = run(twin, [("down", b"GET http://user@example.com/ HTTP/1.1\r\nHost: example.com\r\n\r\n")])
    assert writes(log, "down").startswith(b"HTTP/1.1 400")
    assert writes(log, "up0") == b""


def test_domain_labels_are_bounded():
    from dispa.server.worker import DataPlane, _DOMAIN_LABEL_LIMIT
    plane = SimpleNamespace(_domains={})
    for i in range(3 * _DOMAIN_LABEL_LIMIT):
        DataPlane.domain_label(plane, b"h%d.example" % i)
    assert len(plane._domains) == _DOMAIN_LABEL_LIMIT
    assert DataPlane.domain_label(plane, b"new.example") == "other"


# -- a request-only pipeline (sync on_request hooks only): the compiled Session runs it
# without Pipeline.start (_native/protocol.pyx _run_sync_hooks); the pure one through it

PLUGINS = "".join(
    f'\n[[plugins.plugins]]\nname = "{name}"\ntype = "tests.support.filters:{cls}"\n{more}'
    for name, cls, more in (("noop", "Noop", ""), ("retarget", "Retarget", ""),
                            ("flaky", "Flaky", 'error_strategy = "{flaky}"\n'),
                            ("deny", "Deny", "")))


def _get(target: bytes, extra: bytes = b"") -> bytes:
    return b"GET " + target + b" HTTP/1.1\r\nHost: h\r\n" + extra + b"\r\n"


REQUESTS = ((b"/a?x=1", b""), (b"/deny/1", b""), (b"/b", b"X-Retarget: /moved\r\n"),
            (b"/c?q=2", b"X-Retarget: /moved2\r\n"), (b"/d", b""), (b"/deny/2", b""),
            (b"/e", b""), (b"/f", b""), (b"/g", b""))


def filtered_steps(strategy: str) -> list:
    """One GET per REQUESTS entry; the upstream answers those that reach it (the flaky
    hook raises on requests 3, 6 and 9, which "fail" answers with 500)."""
    steps = []
    for i, (target, extra) in enumerate(REQUESTS):
        steps.append(("down", _get(target, extra)))
        local = target.startswith(b"/deny") or (strategy == "fail" and i in (2, 5, 8))
        if not local:
            steps.append(("up", OK))
    return steps


@pytest.mark.parametrize("strategy", ["continue", "fail"])
def test_twins_agree_on_a_request_only_pipeline(strategy):
    plugins = PLUGINS.format(flaky=strategy)
    steps = filtered_steps(strategy)
    compiled = run("compiled", steps, extra=plugins)
    assert compiled == run("pure", steps, extra=plugins)
    up = b"".join(e[2] for e in compiled if e[:2] == ("up0", "write"))
    down = b"".join(e[2] for e in compiled if e[:2] == ("down", "write"))
    # the hook that wrote the path without reading it was obeyed, the query kept
    assert b"GET /moved2?q=2 HTTP/1.1" in up
    assert (b"GET /moved HTTP/1.1" in up) == (strategy == "continue")
    assert b"GET /a?x=1 HTTP/1.1" in up and b"GET /f HTTP/1.1" in up  # untouched ones
    assert b"/deny" not in up  # answered by the hook, never sent upstream
    assert down.count(b"HTTP/1.1 200 ") == (7 if strategy == "continue" else 5)
    assert down.count(b"HTTP/1.1 403 ") == (2 if strategy == "continue" else 1)
    assert down.count(b"HTTP/1.1 500 ") == (0 if strategy == "continue" else 3)


VIEW_FIELDS = ("method", "host", "client_ip", "scheme", "route", "cluster", "endpoint",
               "params", "path", "query", "original_target", "version", "content_length",
               "chunked", "request_id", "ctx")


def test_the_compiled_request_view_has_every_field_of_the_python_one(monkeypatch):
    # the compiled Session makes the Request view itself (_native/protocol.pyx
    # _new_request); the pure one through Pipeline._request / Request._of_head
    from tests.support.filters import Record
    plugins = '\n[[plugins.plugins]]\nname = "rec"\ntype = "tests.support.filters:Record"\n'
    steps = [("down", _get(b"/v/1?a=b&c", b"Cookie: k=v\r\n")), ("up", OK),
             ("down", b"POST /v/2 HTTP/1.0\r\nHost: Other.Example:8080\r\n"
                      b"Content-Length: 2\r\nConnection: keep-alive\r\n\r\nhi"), ("up", OK),
             ("down", b"DELETE /v/3 HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
                      b"0\r\n\r\n"), ("up", OK)]
    steps = steps + steps  # the second time, host and method are memoised: made in C
    from dispa.proxy.pipeline import Pipeline
    python_made = []
    make = Pipeline._request

    def counted(self, *args, **kw):
        python_made.append(args[2])
        return make(self, *args, **kw)
    monkeypatch.setattr(Pipeline, "_request", counted)
    views = {}
    made = {}
    for twin in TWINS:
        Record.seen = []
        python_made.clear()
        run(twin, steps, extra=plugins)
        made[twin] = list(python_made)
        views[twin] = [(tuple(getattr(r, f) for f in VIEW_FIELDS), r.headers.raw, r.untouched())
                       for r in Record.seen]
    assert len(views["compiled"]) == 6
    assert views["compiled"] == views["pure"]
    assert len(made["pure"]) == 6
    assert 0 < len(made["compiled"]) < 6  # only the first of each host went through Python
    first = dict(zip(VIEW_FIELDS, views["compiled"][0][0]))
    assert (first["method"], first["path"], first["query"], first["host"]) == (
        "GET", "/v/1", "a=b&c", "h")
    second = dict(zip(VIEW_FIELDS, views["compiled"][1][0]))
    assert (second["host"], second["version"], second["content_length"]) == (
        "other.example", "1.0", 2)
    assert dict(zip(VIEW_FIELDS, views["compiled"][2][0]))["chunked"] is True


@pytest.mark.parametrize("config", [
    dict(server_extra='trusted_proxies = ["10.0.0.0/8"]'),
    dict(domains='["example.com"]'),
    dict(peer=("2001:db8::1", 1, 0, 0)),
], ids=["trusted", "intercept_miss", "ipv6_peer"])
def test_twins_agree_on_a_request_only_pipeline_off_its_fast_path(config):
    # trusted peers (X-Forwarded-For resolved) and hosts outside the interception go
    # through Pipeline.start in both twins; an IPv6 peer takes the compiled path
    plugins = PLUGINS.format(flaky="continue")
    steps = [("down", _get(b"/a", b"X-Forwarded-For: 192.0.2.9\r\n")), ("up", OK),
             ("down", _get(b"/deny/x")), ("down", _get(b"/b", b"X-Retarget: /moved\r\n")),
             ("up", OK)]
    compiled = run("compiled", steps, extra=plugins, **config)
    assert compiled == run("pure", steps, extra=plugins, **config)
    down = b"".join(e[2] for e in compiled if e[:2] == ("down", "write"))
    if "domains" not in config:
        assert down.count(b"HTTP/1.1 403 ") == 1
