"""The tracing sink (tail decision, span building), the request-phase filter, the span
batcher and the ``[observability.tracing]`` configuration. No sockets: spans are caught
before the exporter."""

from __future__ import annotations

import asyncio
import threading

import msgspec
import pytest

from dispa.config.load import load_config_text
from dispa.config.tracing_model import TracingConfig
from dispa.errors import ConfigError
from dispa.observability.exchange import Exchange, SinkContext
from dispa.observability.tracing import TracingSink, tracing_sink
from dispa.observability.tracing_context import CTX_KEY, TraceContext
from dispa.observability.tracing_export import SpanBatcher
from dispa.plugins.api import BuildContext, Headers, Request
from dispa.plugins.builtin.tracing import Tracing
from opentelemetry.sdk.trace.export import SpanExportResult
from opentelemetry.trace import SpanKind, StatusCode
from tests.support.span_catcher import Caught

TRACE = 0x0af7651916cd43dd8448eb211c80319c
TP = b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def part(**kw) -> dict:
    data = msgspec.to_builtins(TracingConfig(enabled=True, **kw))
    data["endpoint"] = "http://127.0.0.1:9/v1/traces"  # never reached: spans are caught
    return data


@pytest.fixture
def make_sink():
    made = []

    def make(redaction=None, **kw):
        sink = TracingSink(part(**kw), SinkContext(None, None, 3), redaction)
        sink.batcher.close(0.1)
        sink.batcher = Caught()
        made.append(sink)
        return sink
    yield make


def exchange(*, status=200, tc=None, headers=(), attempts=None, duration=0.05, error=None,
             target="/a/b?x=1&card=4111111111111111"):
    req = None
    if tc is not None:
        req = Request("GET", target, Headers(list(headers)))
        req.ctx[CTX_KEY] = tc
    t0 = 1000.0
    return Exchange(start=1700000000.0, t0=t0, duration=duration, client_ip="10.0.0.7",
                    method="GET", target=target, version="HTTP/1.1", host="api.example:8080",
                    domain="api.example", status=status, bytes_in=0, bytes_out=12,
                    request_headers=list(headers), request_id="rid-1", route=None,
                    cluster="default", endpoint="10.1.1.1:80",
                    attempts=attempts if attempts is not None else [
                        ("10.1.1.1:80", t0 + 0.01, t0 + 0.04, "ok")],
                    error=error, request=req, scheme="http", tls=None)


def test_a_head_sampled_request_gives_a_server_span_and_a_client_span(make_sink):
    sink = make_sink()
    tc = TraceContext(TRACE, 0xb7ad6b7169203331, 0x1111, 0x2222, True)
    sink(exchange(tc=tc))
    server, client = sink.batcher.spans
    assert server.kind is SpanKind.SERVER and client.kind is SpanKind.CLIENT
    assert server.context.trace_id == client.context.trace_id == TRACE
    assert server.context.span_id == 0x1111 and server.parent.span_id == 0xb7ad6b7169203331
    assert server.parent.is_remote
    assert client.context.span_id == 0x2222 and client.parent.span_id == 0x1111
    # explicit timestamps: the exchange's wall-clock start plus monotonic offsets
    assert server.start_time == 1700000000 * 10**9
    assert server.end_time == int((1700000000.0 + 0.05) * 1e9)
    assert client.start_time == int((1700000000.0 + 0.01) * 1e9)
    assert client.end_time == int((1700000000.0 + 0.04) * 1e9)
    a = server.attributes
    assert a["http.request.method"] == "GET" and a["url.path"] == "/a/b"
    assert a["http.response.status_code"] == 200
    assert a["server.address"] == "api.example" and a["server.port"] == 8080
    assert a["client.address"] == "10.0.0.7"
    assert "error.type" not in a and server.status.status_code is StatusCode.UNSET
    c = client.attributes
    assert c["network.peer.address"] == "10.1.1.1" and c["network.peer.port"] == 80
    assert c["url.full"].startswith("http://10.1.1.1:80/a/b?")
    assert server.resource.attributes["service.name"] == "dispa"
    assert server.resource.attributes["service.instance.id"] == "worker-3"


def test_each_attempt_is_a_client_span_and_the_last_carries_the_injected_id(make_sink):
    sink = make_sink()
    tc = TraceContext(TRACE, 0, 0x1111, 0x2222, True)
    t0 = 1000.0
    sink(exchange(tc=tc, attempts=[("10.1.1.2:80", t0 + 0.001, t0 + 0.002, "connect_error"),
                                   ("10.1.1.1:80", t0 + 0.003, t0 + 0.04, "ok")]))
    server, first, second = sink.batcher.spans
    assert server.parent is None  # no client parent: Dispa's SERVER span is the root
    assert first.parent.span_id == second.parent.span_id == 0x1111
    assert second.context.span_id == 0x2222 and first.context.span_id != 0x2222
    assert first.status.status_code is StatusCode.ERROR
    assert first.attributes["error.type"] == "connect_error"
    assert second.attributes["http.request.resend_count"] == 1


def test_a_started_trace_is_queued_unbuilt_and_counted_when_metrics_are_read():
    # TracingSink.put_started: the Session's own traces (tracing_gate.py) reach the export
    # thread as make_exchange's arguments; the count reaches the metrics at export time
    from dispa.observability.metrics import WorkerMetrics
    from dispa.protocols.http1 import RequestParser
    wm = WorkerMetrics()
    sink = TracingSink(part(), SinkContext(None, wm, 3), None)
    sink.batcher.close(0.1)
    sink.batcher = Caught()
    parser = RequestParser()
    parser.feed(b"GET /a?q=1 HTTP/1.1\r\nHost: api.example\r\nUser-Agent: t\r\n\r\n")
    parser.next_event()
    head = parser.head
    tc = TraceContext(TRACE, 0, 0x1111, 0x2222, True)
    t0 = 1000.0
    args = (t0, t0 + 0.05, "10.0.0.7", head, "api.example", 200, 0, 12, b"rid-1", None,
            "10.1.1.1:80", [("10.1.1.1:80", t0 + 0.01, t0 + 0.04, "ok")], None, None, "http",
            None, tc)
    for _ in range(3):
        sink.put_started(args)
    assert len(sink.batcher.queue) == 3 and sink.started == 3  # nothing built yet
    spans = sink.batcher.spans
    assert [s.kind for s in spans] == [SpanKind.SERVER, SpanKind.CLIENT] * 3
    server, client = spans[:2]
    assert server.context.trace_id == TRACE and server.context.span_id == 0x1111
    assert server.parent is None and client.context.span_id == 0x2222
    assert server.attributes["url.path"] == "/a" and server.attributes["url.query"] == "q=1"
    assert server.attributes["dispa.sampling.reason"] == "head"

    def traces_head():
        exp = wm.export()
        return sum(v for n, l, v in exp["counters"]
                   if n == "dispa_traces_total" and [list(x) for x in l] == [["outcome", "head"]])
    assert traces_head() == 3
    sink.put_started(args)
    assert traces_head() == 4  # folded once, not again
    sink.close()  # a dropped sink folds what is left and stops being read
    assert sink._collect not in wm._collectors


def test_an_unsampled_request_builds_nothing(make_sink):
    sink = make_sink(sampling_rate=0.0)
    sink(exchange())
    sink(exchange(tc=TraceContext(TRACE, 5, 6, 7, False)))
    assert sink.batcher.spans == []


def test_a_5xx_is_kept_at_ratio_zero_and_joins_the_clients_trace(make_sink):
    sink = make_sink(sampling_rate=0.0)
    sink(exchange(status=502, error="502", headers=[(b"traceparent", TP[:-2] + b"00")],
                  attempts=[("10.1.1.1:80", 1000.01, 1000.02, "reset")]))
    server, client = sink.batcher.spans
    assert server.context.trace_id == TRACE and server.parent.span_id == 0xb7ad6b7169203331
    assert server.status.status_code is StatusCode.ERROR
    assert server.attributes["error.type"] == "502"
    assert server.attributes["dispa.sampling.reason"] == "error"
    assert client.attributes["error.type"] == "reset"


def test_errors_can_be_left_to_the_ratio(make_sink):
    sink = make_sink(sampling_rate=0.0, always_sample_errors=False)
    sink(exchange(status=500, error="500"))
    assert sink.batcher.spans == []


def test_a_slow_request_is_kept(make_sink):
    sink = make_sink(sampling_rate=0.0, slow_threshold=0.5)
    sink(exchange(duration=0.4))
    assert sink.batcher.spans == []
    sink(exchange(duration=0.6))
    assert sink.batcher.spans[0].attributes["dispa.sampling.reason"] == "slow"


def test_the_rate_limit_also_caps_tail_decisions(make_sink):
    sink = make_sink(sampling_rate=0.0, max_traces_per_second=2)
    for _ in range(10):
        sink(exchange(status=503, error="503"))
    assert len([s for s in sink.batcher.spans if s.kind is SpanKind.SERVER]) == 2


def test_span_attributes_are_redacted(make_sink):
    sink = make_sink(redaction={"mask_query_params": ["token"]})
    tc = TraceContext(TRACE, 0, 1, 2, True)
    sink(exchange(tc=tc, target="/p?token=secret&card=4111111111111111&q=1"))
    server, client = sink.batcher.spans
    q = server.attributes["url.query"]
    assert "secret" not in q and "4111111111111111" not in q and "q=1" in q
    assert "secret" not in client.attributes["url.full"]
    assert "4111111111111111" not in client.attributes["url.full"]


def test_without_injecting_propagators_the_sink_makes_the_head_decision(make_sink):
    # no tracecontext/b3: no filter runs, headers are neither read nor written, and the
    # ratio is applied in the log phase to a new trace
    sink = make_sink(propagators=["baggage"], sampling_rate=1.0)
    sink(exchange(headers=[(b"traceparent", TP)]))
    server = sink.batcher.spans[0]
    assert server.context.trace_id != TRACE and server.parent is None
    assert make_sink(propagators=[], sampling_rate=0.0)(exchange()) is None


def test_the_factory_reuses_an_unchanged_sink():
    class Snap:
        observability = {"tracing": part()}
    ctx = SinkContext(None, None, 0)
    first = tracing_sink(Snap, ctx, None)
    try:
        assert tracing_sink(Snap, ctx, first) is first
        Snap.observability = {"tracing": part(sampling_rate=0.5)}
        second = tracing_sink(Snap, ctx, first)
        assert second is not first
        second.batcher.close(0.1)
        Snap.observability = None
        assert tracing_sink(Snap, ctx, None) is None
    finally:
        first.batcher.close(0.1)


# -- the request-phase filter --------------------------------------------------------

def _req(headers):
    return Request("GET", "/x", Headers(list(headers)))


def test_the_filter_leaves_an_unsampled_parentless_request_untouched():
    f = Tracing(TracingConfig(enabled=True, sampling_rate=0.0), BuildContext())
    req = _req([(b"host", b"a")])
    assert f.on_request(req) is None
    assert CTX_KEY not in req.ctx and not req.headers.changed


def test_the_filter_continues_the_clients_trace_and_injects_its_client_span():
    f = Tracing(TracingConfig(enabled=True, sampling_rate=0.0), BuildContext())
    req = _req([(b"traceparent", TP), (b"baggage", b"k=v")])
    f.on_request(req)
    tc = req.ctx[CTX_KEY]
    assert tc.trace_id == TRACE and tc.parent_id == 0xb7ad6b7169203331 and tc.sampled
    assert req.headers.get("traceparent") == (
        f"00-{TRACE:032x}-{tc.client_id:016x}-01")
    assert req.headers.get("baggage") == "k=v"


def test_the_filter_starts_a_trace_when_the_ratio_says_so():
    f = Tracing(TracingConfig(enabled=True, sampling_rate=1.0), BuildContext())
    req = _req([])
    f.on_request(req)
    tc = req.ctx[CTX_KEY]
    assert tc.parent_id == 0 and tc.sampled and tc.trace_id >> 64
    assert req.headers.get("traceparent").endswith(f"-{tc.client_id:016x}-01")


# -- the batcher ------------------------------------------------------------------------

class SlowExporter:
    def __init__(self):
        self.gate = threading.Event()
        self.batches = []

    def export(self, batch):
        self.gate.wait(5)
        self.batches.append(list(batch))
        return SpanExportResult.SUCCESS

    def shutdown(self):
        self.gate.set()


def test_the_batcher_drops_and_counts_beyond_its_queue_then_flushes_the_rest():
    exp = SlowExporter()
    b = SpanBatcher(exp, max_queue_size=5, max_export_batch_size=2, schedule_delay=600)
    b.put(list(range(4)))
    b.put(list(range(4, 8)))
    assert b.dropped == 3 and len(b.queue) <= 5
    exp.gate.set()
    assert b.flush(5)
    assert sorted(x for batch in exp.batches for x in batch) == [0, 1, 2, 3, 4]
    assert all(len(batch) <= 2 for batch in exp.batches)
    assert b.exported == 5
    b.close(1)


def test_a_failing_exporter_is_counted_not_raised():
    class Broken:
        def export(self, batch):
            raise OSError("collector down")

        def shutdown(self):
            pass
    b = SpanBatcher(Broken(), schedule_delay=600)
    b.put([1, 2, 3])
    b.flush(1)
    assert b.failed == 3
    b.close(1)


def test_deferred_entries_are_built_in_the_export_thread_and_bounded():
    exp = SlowExporter()
    b = SpanBatcher(exp, max_queue_size=3, max_export_batch_size=4, schedule_delay=600)
    built_in = []

    def build(*xs):
        built_in.append(threading.current_thread().name)
        if xs[0] == "bad":
            raise ValueError("broken record")
        return list(xs)
    b.put_deferred(build, ("a1", "a2"), 2)
    b.put_deferred(build, ("bad", "x"), 2)
    b.put_deferred(build, ("b1", "b2", "b3"), 3)
    b.put_deferred(build, ("c1",), 1)  # the queue holds 3 entries: dropped, counted
    assert b.dropped == 1 and built_in == []  # nothing built on the caller's thread yet
    exp.gate.set()
    b.kick()
    assert b.flush(5)
    assert [x for batch in exp.batches for x in batch] == ["a1", "a2", "b1", "b2", "b3"]
    assert all(len(batch) <= 4 for batch in exp.batches)
    assert b.exported == 5 and b.failed == 2  # the broken record's spans
    b.close(1)


class LoopExporter:
    """Hands each exported batch, and the thread that exported it, to the loop's queue."""

    def __init__(self, loop):
        self.loop = loop
        self.done: asyncio.Queue = asyncio.Queue()

    def export(self, batch):
        self.loop.call_soon_threadsafe(self.done.put_nowait,
                                       (list(batch), threading.current_thread()))
        return SpanExportResult.SUCCESS

    def shutdown(self):
        pass


def test_a_batcher_with_a_loop_keeps_no_thread_between_exports():
    # a worker must stay single-threaded while it serves (tracing_export's docstring)
    async def main():
        loop = asyncio.get_running_loop()
        before = set(threading.enumerate())
        exp = LoopExporter(loop)
        b = SpanBatcher(exp, max_export_batch_size=4, schedule_delay=0.05, loop=loop)
        b.put([1, 2])
        assert set(threading.enumerate()) == before and b.threads_started == 0
        batch, thread = await asyncio.wait_for(exp.done.get(), 5)  # the timer's export
        assert batch == [1, 2] and thread is not threading.main_thread()
        b._thread.join(5)
        assert set(threading.enumerate()) == before  # the export thread has exited
        b.put([3])
        batch, _ = await asyncio.wait_for(exp.done.get(), 5)  # the next tick, a new thread
        b._thread.join(5)  # export() has returned, and its count is in
        assert batch == [3] and b.threads_started == 2 and b.exported == 3
        b.close(1)
        await asyncio.sleep(0)  # the cancel close scheduled on the loop
        assert b._timer.cancelled()
        b.put([4])
        b.kick()
        assert b.threads_started == 2  # closed: nothing more starts
    asyncio.run(main())


def test_a_full_batch_starts_an_export_at_once_and_the_idle_timer_starts_none():
    async def main():
        loop = asyncio.get_running_loop()
        exp = LoopExporter(loop)
        b = SpanBatcher(exp, max_export_batch_size=3, schedule_delay=0.01, loop=loop)
        for _ in range(3):  # ticks with an empty queue start no thread
            await asyncio.sleep(0.02)
        assert b.threads_started == 0
        b.close(1)
        b = SpanBatcher(exp, max_export_batch_size=3, schedule_delay=600, loop=loop)
        b.put_deferred(lambda *xs: list(xs), ("a", "b"), 2)
        assert b.threads_started == 0
        b.put([1, 2])  # the queue reaches a batch
        assert b.threads_started == 1
        batches = [(await asyncio.wait_for(exp.done.get(), 5))[0] for _ in range(2)]
        assert batches == [["a", "b", 1], [2]]
        b._thread.join(5)
        b.close(1)
    asyncio.run(main())


def test_a_tracing_sink_in_a_worker_batches_in_loop_mode():
    async def main():
        loop = asyncio.get_running_loop()
        before = set(threading.enumerate())
        sink = TracingSink(part(), SinkContext(loop, None, 0), None)
        assert sink.batcher._loop is loop and set(threading.enumerate()) == before
        sink.close()
        sink.batcher._thread and sink.batcher._thread.join(5)
    asyncio.run(main())


# -- configuration -------------------------------------------------------------------------

BASE = '''
[[targets.targets]]
name = "a"
url = "http://127.0.0.1:8081"
'''


def test_tracing_compiles_into_the_snapshot_and_the_global_chain():
    loaded = load_config_text(BASE + '''
[observability.tracing]
enabled = true
exporter = "jaeger"
sampling_rate = 0.01
''', fmt="toml")
    t = loaded.snapshot.observability["tracing"]
    assert t["exporter"] == "otlp_http"  # Jaeger takes OTLP
    assert t["endpoint"] == "http://localhost:4318/v1/traces"
    assert t["sampling_rate"] == 0.01
    first = loaded.snapshot.pipeline.plugins[0]
    assert first.type == "dispa.plugins.builtin.tracing:Tracing" and first.is_global


def test_tracing_off_adds_nothing():
    loaded = load_config_text(BASE + "[observability.tracing]\nsampling_rate = 0.5\n",
                              fmt="toml")
    assert not (loaded.snapshot.observability or {}).get("tracing")
    assert loaded.snapshot.pipeline.plugins == ()


@pytest.mark.parametrize("table, path, words", [
    ('exporter = "jaegr"', "observability.tracing.exporter", "otlp_grpc"),
    ("sampling_rate = 1.5", "observability.tracing.sampling_rate", "1.0"),
    ('endpoint = "ftp://x"', "observability.tracing.endpoint", "http"),
    ('exporter = "otlp_grpc"\nendpoint = "http://h:4317/v1/traces"',
     "observability.tracing.endpoint", "no path"),
    ('headers = { "bad name" = "x" }', "observability.tracing.headers", "header name"),
    ('propagators = ["w3c"]', "observability.tracing.propagators", "tracecontext"),
    ("samplingrate = 1", "observability.tracing.samplingrate", "sampling_rate"),
    ("[observability.tracing.batch]\nmax_queue_size = 10\nmax_export_batch_size = 20",
     "observability.tracing.batch.max_export_batch_size", "must not exceed"),
])
def test_bad_tracing_config_is_refused_with_its_path_and_line(table, path, words):
    text = BASE + "[observability.tracing]\nenabled = true\n" + table + "\n"
    with pytest.raises(ConfigError) as err:
        load_config_text(text, fmt="toml", name="t.toml")
    issues = [i for i in err.value.errors if (i.path or "").startswith(path)]
    assert issues, err.value
    assert words in issues[0].message
    assert issues[0].line is not None and issues[0].file == "t.toml"


def test_a_missing_exporter_package_is_a_config_error(monkeypatch):
    from dispa.config import tracing_model
    monkeypatch.setitem(tracing_model.EXPORTER_DISTRIBUTIONS, "zipkin",
                        ("opentelemetry-sdk", "no-such-dispa-test-distribution"))
    text = BASE + '[observability.tracing]\nenabled = true\nexporter = "zipkin"\n'
    with pytest.raises(ConfigError) as err:
        load_config_text(text, fmt="toml")
    assert "no-such-dispa-test-distribution" in str(err.value)
    assert "dispa[tracing]" in str(err.value)
    # off: not needed
    load_config_text(text.replace("enabled = true", "enabled = false"), fmt="toml")


def test_exporter_headers_are_masked_in_the_effective_config():
    loaded = load_config_text(BASE + '[observability.tracing]\nenabled = true\n'
                              'headers = { "x-api-key" = "s3cret" }\n', fmt="toml")
    assert loaded.as_dict()["observability"]["tracing"]["headers"] == {"x-api-key": "***"}
    assert loaded.snapshot.observability["tracing"]["headers"] == {"x-api-key": "s3cret"}
