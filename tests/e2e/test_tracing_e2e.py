"""Tracing end to end: a real dispa-server exports to a real trace receiver on loopback
(tests/support/otlp_receiver.py: OTLP/HTTP, OTLP/gRPC, Zipkin), in front of a real origin
that records the headers it receives; parentage is checked across client, Dispa and origin.
"""

from __future__ import annotations

import pytest

from tests.support.dispa_proc import free_port, http_get
from tests.support.otlp_receiver import TraceReceiver

CLIENT_TRACE = "0af7651916cd43dd8448eb211c80319c"
CLIENT_SPAN = "b7ad6b7169203331"
CLIENT_TP = f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"


@pytest.fixture
def receiver():
    r = TraceReceiver().start()
    yield r
    r.stop()


def tracing_toml(endpoint: str, exporter: str = "otlp_http", **keys) -> str:
    lines = ["[observability.tracing]", "enabled = true", f'exporter = "{exporter}"',
             f'endpoint = "{endpoint}"']
    keys.setdefault("sampling_rate", 1.0)
    for k, v in keys.items():
        if isinstance(v, bool):
            v = "true" if v else "false"
        elif isinstance(v, str):
            v = f'"{v}"'
        elif isinstance(v, list):
            v = "[" + ", ".join(f'"{x}"' for x in v) + "]"
        lines.append(f"{k} = {v}")
    # short batching delay: spans arrive within the tests' deadlines
    lines += ["[observability.tracing.batch]", "schedule_delay = 0.1"]
    return "\n".join(lines) + "\n"


def header(origin_request, name: bytes) -> str | None:
    for k, v in origin_request[2]:
        if k.lower() == name:
            return v.decode("latin-1")
    return None


ENDPOINTS = {"otlp_http": lambda r: r.otlp_http_url, "otlp_grpc": lambda r: r.otlp_grpc_url,
             "zipkin": lambda r: r.zipkin_url}


@pytest.mark.parametrize("exporter", ["otlp_http", "otlp_grpc", "zipkin"])
def test_client_span_is_parent_of_server_span_which_is_parent_of_the_upstream(
        dispa, origin, receiver, exporter):
    d = dispa(targets=[("a", origin.url)],
              extra=tracing_toml(ENDPOINTS[exporter](receiver), exporter))
    status, _, _ = http_get(d.port, "/headers?card=4111111111111111&q=1", headers={
        "traceparent": CLIENT_TP, "tracestate": "vendor=opaque", "baggage": "user=42",
        "User-Agent": "tracing-test"})
    assert status == 200
    spans = receiver.wait_spans(lambda s: len([x for x in s if x.trace_id == CLIENT_TRACE]) >= 2,
                                what=f"the server and client spans via {exporter}")
    mine = [s for s in spans if s.trace_id == CLIENT_TRACE]
    assert {s.protocol for s in mine} == {exporter}
    server = [s for s in mine if s.kind == "SERVER"]
    client = [s for s in mine if s.kind == "CLIENT"]
    assert len(server) == 1 and len(client) == 1, mine
    server, client = server[0], client[0]
    # the client's span -> Dispa's SERVER span -> Dispa's CLIENT span -> the origin
    assert server.parent_span_id == CLIENT_SPAN
    assert client.parent_span_id == server.span_id
    # Zipkin's JSON has whole microseconds, its exporter rounding timestamp and duration
    # separately: a child's end can come out 1 us past its parent's
    slack = 1000 if exporter == "zipkin" else 0
    assert server.start_ns <= client.start_ns <= client.end_ns <= server.end_ns + slack
    tp = header(origin.requests[-1], b"traceparent")
    assert tp == f"00-{CLIENT_TRACE}-{client.span_id}-01"
    assert header(origin.requests[-1], b"tracestate") == "vendor=opaque"
    assert header(origin.requests[-1], b"baggage") == "user=42"
    # HTTP semantic conventions (Zipkin carries attributes as string tags)
    a = server.attributes
    assert a["http.request.method"] == "GET"
    assert a["url.path"] == "/headers"
    assert str(a["http.response.status_code"]) == "200"
    assert a["server.address"] == "example.com"
    assert a["client.address"] == "127.0.0.1"
    assert a["user_agent.original"] == "tracing-test"
    assert "4111111111111111" not in a["url.query"] and "q=1" in a["url.query"]
    c = client.attributes
    assert c["network.peer.address"] == "127.0.0.1"
    assert str(c["network.peer.port"]) == str(origin.port)
    assert server.service == "dispa"
    assert server.status != "ERROR" and client.status != "ERROR"


def test_a_retried_attempt_gives_two_client_spans(dispa, origin, receiver):
    dead = free_port()  # nothing listens: the connect is refused
    d = dispa(targets=[("dead", f"http://127.0.0.1:{dead}"), ("live", origin.url)],
              extra=tracing_toml(receiver.otlp_http_url))
    traces = []
    for n in range(4):  # round robin: one of the first two requests meets the dead endpoint
        trace = f"{n + 1:032x}"
        assert http_get(d.port, "/", headers={
            "traceparent": f"00-{trace}-{CLIENT_SPAN}-01"})[0] == 200
        traces.append(trace)

    def retried(spans):
        for t in traces:
            clients = [s for s in spans if s.trace_id == t and s.kind == "CLIENT"]
            if len(clients) == 2:
                return t
        return None

    spans = receiver.wait_spans(retried, what="a trace with two CLIENT spans")
    trace = retried(spans)
    server = next(s for s in spans if s.trace_id == trace and s.kind == "SERVER")
    first, second = sorted((s for s in spans if s.trace_id == trace and s.kind == "CLIENT"),
                           key=lambda s: s.start_ns)
    assert first.parent_span_id == second.parent_span_id == server.span_id
    assert first.status == "ERROR" and first.attributes["error.type"] == "connect_error"
    assert str(first.attributes["server.port"]) == str(dead)
    assert second.status != "ERROR" and second.attributes["http.request.resend_count"] == 1
    assert first.end_ns <= second.start_ns
    # the head that reached the origin names the attempt that delivered it
    got = [header(r, b"traceparent") for r in origin.requests]
    assert f"00-{trace}-{second.span_id}-01" in got


def test_ratio_zero_still_exports_the_error_trace(dispa, origin, receiver):
    d = dispa(targets=[("a", origin.url)],
              extra=tracing_toml(receiver.otlp_http_url, sampling_rate=0.0))
    for _ in range(20):
        assert http_get(d.port, "/")[0] == 200
    origin.force_status = 503
    assert http_get(d.port, "/")[0] == 503
    spans = receiver.wait_spans(lambda s: any(x.kind == "SERVER" for x in s),
                                what="the error trace")
    servers = [s for s in spans if s.kind == "SERVER"]
    # only the failed request was kept (the 20 good ones were not sampled)
    assert len(servers) == 1
    s = servers[0]
    assert s.status == "ERROR"
    assert s.attributes["http.response.status_code"] == 503
    assert s.attributes["error.type"] == "503"
    assert s.attributes["dispa.sampling.reason"] == "error"
    client = receiver.wait_spans(lambda sp: any(x.kind == "CLIENT" for x in sp))
    c = next(x for x in client if x.kind == "CLIENT")
    assert c.trace_id == s.trace_id and c.parent_span_id == s.span_id and c.status == "ERROR"


def test_a_slow_request_is_kept_at_ratio_zero(dispa, origin, receiver):
    d = dispa(targets=[("a", origin.url)],
              extra=tracing_toml(receiver.otlp_http_url, sampling_rate=0.0,
                                 slow_threshold=0.2))
    assert http_get(d.port, "/")[0] == 200
    assert http_get(d.port, "/delay?ms=300")[0] == 200
    spans = receiver.wait_spans(lambda s: any(x.kind == "SERVER" for x in s),
                                what="the slow trace")
    servers = [s for s in spans if s.kind == "SERVER"]
    assert [s.attributes["url.path"] for s in servers] == ["/delay"]
    assert servers[0].attributes["dispa.sampling.reason"] == "slow"
    assert servers[0].end_ns - servers[0].start_ns >= 300_000_000


def test_unsampled_parent_is_propagated_not_exported(dispa, origin, receiver):
    d = dispa(targets=[("a", origin.url)],
              extra=tracing_toml(receiver.otlp_http_url, sampling_rate=1.0))
    trace = "f" * 32
    assert http_get(d.port, "/", headers={"traceparent": f"00-{trace}-{CLIENT_SPAN}-00"})[0] == 200
    tp = header(origin.requests[-1], b"traceparent")
    # parent-based: the client's "not sampled" wins; the upstream still gets our span id
    assert tp.startswith(f"00-{trace}-") and tp.endswith("-00") and CLIENT_SPAN not in tp
    # a sampled request afterwards arrives; the unsampled one never does
    assert http_get(d.port, "/", headers={"traceparent": CLIENT_TP})[0] == 200
    spans = receiver.wait_spans(lambda s: any(x.trace_id == CLIENT_TRACE for x in s))
    assert not [s for s in spans if s.trace_id == trace]


def test_b3_headers_are_read_and_written(dispa, origin, receiver):
    d = dispa(targets=[("a", origin.url)],
              extra=tracing_toml(receiver.otlp_http_url, propagators=["b3", "b3multi"]))
    trace = "463ac35c9f6413ad48485a3953bb6124"
    assert http_get(d.port, "/", headers={"b3": f"{trace}-a2fb4a1d1a96d312-1"})[0] == 200
    spans = receiver.wait_spans(lambda s: len([x for x in s if x.trace_id == trace]) >= 2)
    server = next(s for s in spans if s.trace_id == trace and s.kind == "SERVER")
    client = next(s for s in spans if s.trace_id == trace and s.kind == "CLIENT")
    assert server.parent_span_id == "a2fb4a1d1a96d312"
    req = origin.requests[-1]
    assert header(req, b"b3") == f"{trace}-{client.span_id}-1-{server.span_id}"
    assert header(req, b"x-b3-traceid") == trace
    assert header(req, b"x-b3-spanid") == client.span_id
    assert header(req, b"x-b3-parentspanid") == server.span_id
    assert header(req, b"traceparent") is None  # tracecontext not configured


def test_graceful_shutdown_flushes_queued_spans(dispa, origin, receiver):
    text = tracing_toml(receiver.otlp_http_url).replace("schedule_delay = 0.1",
                                                        "schedule_delay = 600")
    d = dispa(targets=[("a", origin.url)], extra=text)
    for _ in range(3):
        assert http_get(d.port, "/", headers={"traceparent": CLIENT_TP})[0] == 200
    assert receiver.spans == []  # held by the 600 s batching delay
    assert d.stop() == 0
    spans = receiver.wait_spans(lambda s: len(s) >= 6, timeout=5, what="the flushed spans")
    assert len([s for s in spans if s.kind == "SERVER"]) == 3


def test_new_traces_the_session_starts_reach_the_origin_and_the_receiver(dispa, origin, receiver):
    # W3C alone at a ratio below 1: a sampled request without a parent gets its trace from
    # the Session itself (observability/tracing_gate.py), not from the tracing filter
    d = dispa(targets=[("a", origin.url)],
              extra=tracing_toml(receiver.otlp_http_url, sampling_rate=0.5))
    for i in range(40):
        assert http_get(d.port, f"/n{i}")[0] == 200
    sent = {}
    for r in origin.requests:
        tp = header(r, b"traceparent")
        if tp is not None:
            version, trace, parent, flags = tp.split("-")
            assert (version, flags) == ("00", "01") and trace != "0" * 32
            sent[trace] = parent
    assert 5 <= len(sent) <= 35  # about half of 40
    spans = receiver.wait_spans(
        lambda s: len({x.trace_id for x in s if x.kind == "SERVER"}) >= len(sent),
        what="a SERVER span for every traced request")
    assert {s.trace_id for s in spans} == set(sent)  # untraced requests exported nothing
    for trace, parent in sent.items():
        server = next(s for s in spans if s.trace_id == trace and s.kind == "SERVER")
        client = next(s for s in spans if s.trace_id == trace and s.kind == "CLIENT")
        assert not server.parent_span_id  # a new trace: Dispa's SERVER span is the root
        assert client.parent_span_id == server.span_id
        assert client.span_id == parent  # the origin's parent is Dispa's CLIENT span
        assert server.attributes["dispa.sampling.reason"] == "head"


def test_graceful_shutdown_flushes_the_traces_the_session_started(dispa, origin, receiver):
    text = tracing_toml(receiver.otlp_http_url, sampling_rate=0.999).replace(
        "schedule_delay = 0.1", "schedule_delay = 600")
    d = dispa(targets=[("a", origin.url)], extra=text)
    for _ in range(3):
        assert http_get(d.port, "/")[0] == 200
    traced = {header(r, b"traceparent").split("-")[1] for r in origin.requests
              if header(r, b"traceparent")}
    assert len(traced) >= 2  # at a ratio of 0.999, all three but for a rare draw
    assert receiver.spans == []  # held by the 600 s batching delay
    assert d.stop() == 0
    spans = receiver.wait_spans(lambda s: len(s) >= 2 * len(traced), timeout=5,
                                what="the flushed spans")
    assert {s.trace_id for s in spans if s.kind == "SERVER"} == traced
