"""The tracing gates (observability/tracing_gate.py): the Session skips the pipeline and the
Exchange record for requests tracing has nothing to do with, and both Session twins
(compiled and pure) make the same decisions, byte for byte.

Driven like tests/unit/proxy/test_protocol_twins.py: fake transports, a real runtime built
from a TOML config with ``[observability.tracing]`` on; the generators of both twins are
seeded alike, so the sampled requests are the same and predictable.
"""

from __future__ import annotations

import asyncio

import pytest

from dispa.config.load import load_config_text
from dispa.observability import tracing_context, tracing_gate
from dispa.observability.tracing import TracingSink
from dispa.observability.tracing_gate import LogGate, TraceGate, log_gate_of
from dispa.proxy.runtime import WorkerState, build_runtime
from tests.unit.proxy.test_protocol_twins import TWINS, FakeServer, FakeTransport, hotpath
from tests.support.span_catcher import Caught

CONFIG = """
[server]
bind_address = "127.0.0.1:18080"
workers = 1
{server}
[domains]
intercept_domains = {domains}
[[targets.targets]]
name = "a"
url = "http://127.0.0.1:18090"
[targets.health_check]
enabled = false
[monitoring]
enabled = false
[observability.tracing]
enabled = true
exporter = "otlp_http"
endpoint = "http://127.0.0.1:9/v1/traces"
{tracing}
{extra}
"""

GET = b"GET /a HTTP/1.1\r\nHost: example.com\r\n\r\n"
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
ERR = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 2\r\n\r\nno"
TP = b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
SEED = 0x5EED


@pytest.fixture(autouse=True)
def pure_codec_for_edited_heads(monkeypatch):
    # The pure Session forwards a filter-edited head (its _Edited wrapper) with the codec it
    # imported: the compiled one when built, which takes only its own RequestHead. Pure
    # mode (DISPA_NO_EXTENSIONS=1) pairs it with the pure codec, as here.
    from dispa.protocols.http1 import _pure
    from dispa.proxy import session as pure_session
    monkeypatch.setattr(pure_session, "proxy_request_head", _pure.proxy_request_head)
    monkeypatch.setattr(pure_session, "proxy_response_head", _pure.proxy_response_head)


_entered: list = []  # the targets the tracing filter's on_request saw (run's "starts")


@pytest.fixture(autouse=True)
def count_pipeline_entries(monkeypatch):
    # A request enters the pipeline when the tracing filter's hook runs: through
    # Pipeline.start, or the compiled Session's request-only path. The chain binds the
    # hook when the runtime is built, after this patch.
    from dispa.plugins.builtin.tracing import Tracing
    hook = Tracing.on_request

    def counted(self, req):
        _entered.append(req._head[1])
        return hook(self, req)
    monkeypatch.setattr(Tracing, "on_request", counted)


def run(twin: str, exchanges, *, tracing: str = "sampling_rate = 0.25", extra: str = "",
        domains: str = "[]", server: str = "", prepare=None):
    """Send each (request, response) pair through one twin on one keep-alive connection.
    Returns (transport log, targets that entered the pipeline, exchanges built or queued
    for the export thread (those of the traces the Session started, last), runtime)."""
    impl = TWINS[twin]
    loop = asyncio.new_event_loop()
    try:
        snapshot = load_config_text(CONFIG.format(tracing=tracing, extra=extra, domains=domains,
                                                  server=server),
                                    fmt="toml").snapshot
        state = WorkerState(loop)
        runtime = build_runtime(snapshot, state)
        if prepare is not None:
            prepare(runtime)
        for sink in state.observers.sinks:
            if isinstance(sink, TracingSink):
                sink.batcher.close(0.1)
                sink.batcher = Caught()
        built = []
        if runtime.log_exchange is not None:
            dispatch = runtime.log_exchange

            def record(ex):
                built.append((ex.status, ex.target))
                dispatch(ex)
            runtime.log_exchange = record
        starts = _entered
        starts.clear()
        cluster = runtime.default_cluster
        ep = cluster.endpoints[0]
        pool = impl.Pool(loop, ep.host, ep.port, cluster.spec.pool)
        cluster.pools = [pool]
        log: list = []
        conn = impl.UpstreamConnection(pool)
        conn.connection_made(FakeTransport("up0", log))
        pool.total += 1
        pool.idle.insert(0, conn)
        session = impl.Session(FakeServer(runtime))
        session.connection_made(FakeTransport("down", log))
        hotpath.trace_gate_seed(SEED)
        tracing_gate.seed(SEED)
        tracing_context._rand.seed(SEED)
        for request, response in exchanges:
            session.data_received(request)
            if response is not None:  # None: answered by Dispa, nothing goes upstream
                conn.data_received(response)
            log.append(("state", session.state, session.requests))
        runtime.test_sinks = state.observers.sinks
        # the exchanges of traces the Session started, queued unbuilt (put_started)
        for sink in state.observers.sinks:
            if isinstance(sink, TracingSink):
                built += [(args[5], args[3].target.decode()) for _, args, _ in sink.batcher.queue
                          if isinstance(args, tuple) and len(args) == 17]
        return log, list(starts), built, runtime
    finally:
        loop.close()


def upstream_heads(log) -> list[bytes]:
    return [e[2] for e in log if e[0] == "up0" and e[1] == "write"]


def traceparent(head: bytes) -> bytes | None:
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"traceparent:"):
            return line.split(b":", 1)[1].strip()
    return None


def expected_draws(n: int) -> list[int]:
    tracing_gate.seed(SEED)
    return [tracing_gate.draw() for _ in range(n)]


def expected_starts(n: int, bound: int) -> list:
    """Per request, (low draw, None) or, for a sampled one the Session starts itself,
    (low, (high, server span, client span)): the ids come from the same generator."""
    tracing_gate.seed(SEED)
    out = []
    for _ in range(n):
        low = tracing_gate.draw()
        out.append((low, tuple(tracing_gate._nonzero() for _ in range(3)) if low < bound
                    else None))
    return out


def numbered(n: int, response: bytes = OK):
    return [(GET.replace(b"/a", b"/r%d" % i), response) for i in range(n)]


@pytest.mark.parametrize("twin", sorted(TWINS))
def test_sampled_draws_start_their_trace_without_the_pipeline(twin):
    log, starts, built, runtime = run(twin, numbered(40))
    gate = runtime.pipeline.trace_gate
    assert isinstance(gate, TraceGate) and gate.names == (b"traceparent",)
    assert gate.new_traces  # W3C alone: the Session starts new traces itself
    expected = expected_starts(40, gate.bound)
    sampled = [i for i, (_, ids) in enumerate(expected) if ids is not None]
    assert 3 <= len(sampled) <= 20  # ratio 0.25 over 40 requests with this seed
    assert starts == []  # no request entered the pipeline: no Python filter call
    heads = upstream_heads(log)
    assert len(heads) == 40
    sent = {}
    for i, head in enumerate(heads):
        tp = traceparent(head)
        low, ids = expected[i]
        if ids is not None:
            # the gate's draw is the trace id's low 64 bits (ratio rule), the rest of the
            # ids come next from the same generator, and the header is added once
            high, _, client = ids
            assert tp == b"00-%016x%016x-%016x-01" % (high, low, client)
            assert head.lower().count(b"traceparent:") == 1
            assert head.index(b"traceparent:") > head.index(b"Host:")  # after the client's
            sent[(high << 64) | low] = ids
        else:
            assert tp is None
    # the log gate: only the traced exchanges are built (no errors, no slow threshold)
    assert [t for _, t in built] == ["/r%d" % i for i in sampled]
    assert gate.low == -1  # every draw passed on was taken
    # each kept trace: a SERVER span (the root) and the CLIENT span the upstream saw
    sink = next(s for s in runtime.test_sinks if isinstance(s, TracingSink))
    assert runtime.trace_sink is sink and sink.started == len(sampled)  # put_started's path
    servers = {s.context.trace_id: s for s in sink.batcher.spans if s.kind.name == "SERVER"}
    clients = {s.context.trace_id: s for s in sink.batcher.spans if s.kind.name == "CLIENT"}
    assert set(servers) == set(clients) == set(sent)
    for trace_id, (_, server_span, client_span) in sent.items():
        assert servers[trace_id].parent is None
        assert servers[trace_id].context.span_id == server_span
        assert clients[trace_id].context.span_id == client_span
        assert clients[trace_id].parent.span_id == servers[trace_id].context.span_id
        assert servers[trace_id].attributes["dispa.sampling.reason"] == "head"


@pytest.mark.parametrize("twin", sorted(TWINS))
def test_with_b3_to_write_sampled_draws_enter_the_filter_which_uses_the_draw(twin):
    log, starts, built, runtime = run(twin, numbered(40), tracing=(
        'sampling_rate = 0.25\npropagators = ["tracecontext", "b3"]'))
    gate = runtime.pipeline.trace_gate
    assert not gate.new_traces
    draws = expected_draws(40)
    sampled = [i for i, d in enumerate(draws) if d < gate.bound]
    assert starts == [b"/r%d" % i for i in sampled]
    for i, head in enumerate(upstream_heads(log)):
        tp = traceparent(head)
        assert (tp is not None) == (i in sampled)
        if tp is not None:
            assert int(tp[3:35], 16) & tracing_gate.MASK64 == draws[i]
            assert b"\r\nb3: " in head
    assert [t for _, t in built] == ["/r%d" % i for i in sampled]


@pytest.mark.parametrize("twin", sorted(TWINS))
def test_the_rate_limit_still_applies_to_traces_the_session_starts(twin):
    def frozen_clock(runtime):
        # a full bucket of one token that never refills, whatever the test's pace
        sampler = next(iter(runtime.pipeline.filters.values()))[0]._sampler
        sampler.clock = lambda: 0.0
        sampler.last, sampler.tokens = 0.0, 1.0

    log, starts, built, _ = run(twin, numbered(40), prepare=frozen_clock, tracing=(
        "sampling_rate = 0.5\nmax_traces_per_second = 1"))
    heads = upstream_heads(log)
    assert len(heads) == 40 and starts == []
    # one token: the first sampled draw is traced, the others are not
    assert sum(traceparent(h) is not None for h in heads) == 1
    assert len(built) == 1


@pytest.mark.parametrize("twin", sorted(TWINS))
def test_a_trusted_peer_goes_through_the_filter(twin):
    # the span's client.address is the filter API's resolved client behind a trusted
    # proxy, which only the pipeline computes
    log, starts, built, runtime = run(twin, numbered(40), server='trusted_proxies = ["0.0.0.0/0"]')
    gate = runtime.pipeline.trace_gate
    sampled = [i for i, d in enumerate(expected_draws(40)) if d < gate.bound]
    assert starts == [b"/r%d" % i for i in sampled]
    assert [t for _, t in built] == ["/r%d" % i for i in sampled]


def test_the_twins_agree_on_gated_requests():
    exchanges = numbered(30) + [(GET.replace(b"Host", b"TraceParent: %s\r\nHost" % TP), OK),
                                (GET, ERR)]
    compiled, pure = run("compiled", exchanges), run("pure", exchanges)
    assert compiled[:3] == pure[:3]


@pytest.mark.parametrize("twin", sorted(TWINS))
def test_a_host_outside_the_interception_is_still_rejected(twin):
    other = GET.replace(b"example.com", b"other.test")
    log, starts, _, runtime = run(twin, [(other, None), (GET, OK)], domains='["example.com"]',
                                  tracing="sampling_rate = 0.0")
    assert runtime.pipeline.trace_gate is not None
    assert starts == [b"/a"]  # the rejected host went through the pipeline, the other not
    down = b"".join(e[2] for e in log if e[0] == "down" and e[1] == "write")
    assert down.startswith(b"HTTP/1.1 404 ") or down.startswith(b"HTTP/1.1 421 ")
    assert len(upstream_heads(log)) == 1


def test_the_twins_agree_outside_the_interception():
    exchanges = [(GET.replace(b"example.com", b"other.test"), None), (GET, OK)]
    kw = dict(domains='["example.com"]', tracing="sampling_rate = 0.5")
    assert run("compiled", exchanges, **kw)[:3] == run("pure", exchanges, **kw)[:3]


@pytest.mark.parametrize("twin", sorted(TWINS))
def test_a_parent_header_enters_the_pipeline_and_continues_the_trace(twin):
    req = GET.replace(b"Host", b"TRACEPARENT: %s\r\nHost" % TP)
    log, starts, built, _ = run(twin, [(req, OK), (GET, OK)], tracing="sampling_rate = 0.0")
    assert starts == [b"/a"]
    heads = upstream_heads(log)
    tp = traceparent(heads[0])
    assert tp.startswith(b"00-0af7651916cd43dd8448eb211c80319c-") and tp.endswith(b"-01")
    assert traceparent(heads[1]) is None
    assert len(built) == 1  # the traced request's exchange; the other one is skipped


@pytest.mark.parametrize("twin", sorted(TWINS))
def test_b3_names_open_the_gate(twin):
    req = GET.replace(b"Host", b"X-B3-TraceId: 0af7651916cd43dd8448eb211c80319c\r\n"
                               b"X-B3-SpanId: b7ad6b7169203331\r\nX-B3-Sampled: 1\r\nHost")
    log, starts, _, runtime = run(twin, [(req, OK), (GET, OK)], tracing=(
        'sampling_rate = 0.0\npropagators = ["tracecontext", "b3multi"]'))
    assert runtime.pipeline.trace_gate.names == (b"traceparent", b"b3", b"x-b3-traceid")
    assert starts == [b"/a"]
    assert b"X-B3-TraceId: 0af7651916cd43dd8448eb211c80319c" in upstream_heads(log)[0]


@pytest.mark.parametrize("twin", sorted(TWINS))
def test_errors_are_built_for_the_tail_rule_and_kept(twin):
    _, starts, built, runtime = run(twin, [(GET, OK), (GET, ERR), (GET, OK)],
                                    tracing="sampling_rate = 0.0")
    assert starts == []
    assert built == [(503, "/a")]
    sink = next(s for s in runtime.test_sinks if isinstance(s, TracingSink))
    assert [s.attributes["http.response.status_code"] for s in sink.batcher.spans
            if s.kind.name == "SERVER"] == [503]


@pytest.mark.parametrize("twin", sorted(TWINS))
def test_without_the_error_rule_errors_are_not_built(twin):
    _, _, built, _ = run(twin, [(GET, ERR)],
                         tracing="sampling_rate = 0.0\nalways_sample_errors = false")
    assert built == []


@pytest.mark.parametrize("twin", sorted(TWINS))
def test_slow_exchanges_are_built(twin):
    _, _, built, _ = run(twin, [(GET, OK), (GET, OK)],
                         tracing="sampling_rate = 0.0\nslow_threshold = 0.000001")
    assert len(built) == 2


@pytest.mark.parametrize("twin", sorted(TWINS))
def test_another_filter_keeps_the_pipeline_for_every_request(twin):
    _, starts, built, runtime = run(twin, numbered(5), tracing="sampling_rate = 0.0", extra=(
        '[plugins]\nenabled = true\n[[plugins.plugins]]\nname = "tag"\n'
        'type = "tests.support.filters:Tag"\nconfig = { header = "x-tag", value = "v" }'))
    assert runtime.pipeline.trace_gate is None
    assert len(starts) == 5


@pytest.mark.parametrize("twin", sorted(TWINS))
def test_ratio_one_has_no_request_gate(twin):
    log, starts, built, runtime = run(twin, numbered(3), tracing="sampling_rate = 1.0")
    assert runtime.pipeline.trace_gate is None
    assert len(starts) == 3 and len(built) == 3
    assert all(traceparent(h) for h in upstream_heads(log))


@pytest.mark.parametrize("twin", sorted(TWINS))
def test_without_propagators_every_exchange_is_built(twin):
    # no request filter: the sink makes the head decision itself, so it needs them all
    _, starts, built, runtime = run(twin, numbered(4), tracing=(
        'sampling_rate = 0.0\npropagators = ["baggage"]'))
    assert runtime.pipeline is None and runtime.log_gate is None
    assert len(built) == 4


class _Sink:
    def __init__(self, gate=None):
        if gate is not None:
            self.log_gate = gate


def test_log_gate_of_combines_or_gives_up():
    assert log_gate_of(()) is None
    assert log_gate_of([_Sink(LogGate(True, 0.5, "tracing")), _Sink()]) is None
    g = log_gate_of([_Sink(LogGate(False, 0.5, "tracing")), _Sink(LogGate(True, 0.2, None))])
    assert (g.errors, g.slow, g.ctx_key) == (True, 0.2, "tracing")
    assert log_gate_of([_Sink(LogGate(False, 0, "a")), _Sink(LogGate(False, 0, "b"))]) is None


def test_trace_gate_checks_headers_then_a_low_draw():
    gate = TraceGate(0, (b"traceparent", b"b3"))
    assert gate.check([(b"Host", b"x"), (b"B3", b"1")]) == tracing_gate.PARENT
    assert gate.check([(b"Host", b"x")]) == tracing_gate.SKIP and gate.low == -1
    gate = TraceGate(tracing_gate.MASK64, (b"traceparent",))
    assert gate.check([]) == tracing_gate.DRAWN and gate.take() >= 0
    assert gate.check([]) == tracing_gate.DRAWN and gate.low >= 0
    assert gate.take() >= 0 and gate.take() == -1
    with pytest.raises(ValueError):
        TraceGate(1 << 64, ())


def test_the_draws_look_uniform():
    tracing_gate.seed(1)
    draws = [tracing_gate.draw() for _ in range(4000)]
    assert len(set(draws)) == 4000
    below = sum(d < (1 << 62) for d in draws)  # a quarter of the range
    assert 850 < below < 1150
