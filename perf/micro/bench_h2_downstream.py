"""Micro-benchmark of Dispa's downstream HTTP/2 path, in-process (docs/http2.md#measured).

Run:  python perf/micro/bench_h2_downstream.py              (CPU us per request)
      python perf/micro/bench_h2_downstream.py --compare    (also with h2's own HPACK and
                                                            header checks, alternated)
      python perf/micro/bench_h2_downstream.py --profile    (plus a cProfile top-25)
      BENCH_N=4000 BENCH_REPEAT=3 ...                       (requests per run, runs)
      python perf/micro/bench_h2_downstream.py --h2-connection
                                  (h2's own H2Connection instead of Dispa's subclass,
                                   dispa/protocols/http2/connection.py)
      python perf/micro/bench_h2_downstream.py --floor
                                  (also the h2 library alone: the floor)

h2load-like traffic through a real :class:`~dispa.proxy.h2_session.H2Session` and the
HTTP/1.1 Session it bridges each stream to (compiled or pure, see dispa.proxy.protocol),
with fake transports: one connection, batches of 16 concurrent streams (h2load ``-m 16``),
each a GET with 6 regular request headers as h2load sends them (HPACK-indexed after the
first batch, like a real client), answered by a fake HTTP/1.1 upstream with nginx's 64-byte
response. One batch = one ``data_received`` with 16 HEADERS frames, the 16 upstream
responses, then one event-loop turn (the session's write flush). The client's bytes are
encoded before the clock starts (hpack + hyperframe, the client is not measured) and the
server's output is only counted, not decoded. CPU time (``time.process_time``), best of
``BENCH_REPEAT`` runs: the machine is shared, wall time would measure the neighbours.

``--floor`` (:func:`floor`) times what no glue can remove: the same client bytes fed to an
:class:`~dispa.protocols.http2.H2Core` alone (``h2`` with Dispa's limits and compiled
HPACK), each request answered straight away with ``send_headers`` and one ``send_data``
carrying the same response, one ``data_to_send`` per batch; no streams, no Session, no
upstream, no event loop. perf/load/h2load_bench.py reports it next to the CPU budget the
target leaves (docs/http2.md#measured).
"""

from __future__ import annotations

import asyncio
import cProfile
import os
import pstats
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

N = int(os.environ.get("BENCH_N", "8000"))
REPEAT = int(os.environ.get("BENCH_REPEAT", "5"))
STREAMS = int(os.environ.get("BENCH_STREAMS", "16"))  # concurrent streams per batch

CONFIG = """
[server]
bind_address = "127.0.0.1:18080"
workers = 1
[domains]
intercept_domains = []
[[targets.targets]]
name = "a"
url = "http://127.0.0.1:18090"
[targets.health_check]
enabled = false
[monitoring]
enabled = false
[http2]
enabled = true
"""
BODY = b"d" * 63 + b"\n"
OK = (b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Sun, 29 Nov 2026 07:30:00 GMT\r\n"
      b"Content-Type: text/plain\r\nContent-Length: 64\r\nConnection: keep-alive\r\n\r\n" + BODY)
# what h2load (nghttp2) sends per request
REQUEST = [(b":method", b"GET"), (b":path", b"/"), (b":scheme", b"http"),
           (b":authority", b"127.0.0.1:18080"), (b"accept", b"*/*"),
           (b"accept-encoding", b"gzip, deflate"), (b"user-agent", b"h2load nghttp2/1.52.0"),
           (b"x-bench", b"1"), (b"cache-control", b"no-cache"), (b"te", b"trailers")]


class _Transport:
    """Downstream (client) socket: counts what the session writes."""

    def __init__(self):
        self.written = 0
        self.writes = 0

    def get_extra_info(self, key, default=None):
        return ("10.0.0.7", 53211) if key == "peername" else default

    def set_write_buffer_limits(self, high=None, low=None):
        pass

    def get_write_buffer_size(self):
        return 0

    def write(self, data):
        self.written += len(data)
        self.writes += 1

    def pause_reading(self):
        pass

    def resume_reading(self):
        pass

    def is_closing(self):
        return False

    def can_write_eof(self):
        return False

    def close(self):
        pass

    abort = close


class _UpstreamTransport(_Transport):
    """Upstream socket: a request written to it makes its connection wait for a response."""

    def __init__(self, waiting: list):
        super().__init__()
        self.waiting = waiting
        self.conn = None

    def write(self, data):
        self.waiting.append(self.conn)


def client_bytes(batches: int, first_sid: int = 1) -> list[bytes]:
    """The client's bytes: ``batches`` x 16 HEADERS frames (END_STREAM), one bytes per batch."""
    import hpack
    from hyperframe.frame import HeadersFrame
    enc = hpack.Encoder()
    out = []
    sid = first_sid
    for _ in range(batches):
        parts = []
        for _ in range(STREAMS):
            f = HeadersFrame(sid)
            f.flags.add("END_HEADERS")
            f.flags.add("END_STREAM")
            f.data = enc.encode(REQUEST)
            parts.append(f.serialize())
            sid += 2
        out.append(b"".join(parts))
    return out


def preface() -> bytes:
    """h2load's preface: SETTINGS (1 GiB stream windows) and a 1 GiB connection window."""
    from hyperframe.frame import SettingsFrame, WindowUpdateFrame
    s = SettingsFrame(0)
    s.settings = {SettingsFrame.MAX_CONCURRENT_STREAMS: 100,
                  SettingsFrame.INITIAL_WINDOW_SIZE: (1 << 30) - 1,
                  SettingsFrame.ENABLE_PUSH: 0}
    w = WindowUpdateFrame(0)
    w.window_increment = (1 << 30) - 1 - 65535
    ack = SettingsFrame(0, flags=["ACK"])
    return b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + s.serialize() + w.serialize() + ack.serialize()


class Bench:
    """One H2Session with a runtime, a pool of fake upstream connections and a fake loop turn."""

    def __init__(self):
        from dispa.config.load import load_config_text
        from dispa.observability.metrics import WorkerMetrics
        from dispa.protocols.http2 import limits_from
        from dispa.proxy.h2_session import H2Session
        from dispa.proxy.protocol import Pool, RequestIds, Session, UpstreamConnection
        from dispa.proxy.runtime import WorkerState, build_runtime
        from dispa.routing.vhost import normalize_host

        self.loop = loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        snap = load_config_text(CONFIG, fmt="toml").snapshot
        state = WorkerState(loop)
        runtime = build_runtime(snap, state)

        class Server:
            def __init__(self):
                self.runtime = runtime
                self.sessions = set()
                self.draining = False
                self.slowdown_us = 0
                self.tls = None
                self.metrics = WorkerMetrics()
                self.next_request_id = RequestIds("bench-")
                self.session_factory = lambda: Session(self)

            def domain_label(self, raw_host):
                return normalize_host(raw_host) or "-"

            def report_passive(self, *a):
                pass

        self.server = Server()
        cluster = runtime.default_cluster
        ep = cluster.endpoints[0]
        pool = Pool(loop, ep.host, ep.port, cluster.spec.pool)
        cluster.pools = [pool]
        self.waiting: list = []
        for _ in range(STREAMS * 2):
            conn = UpstreamConnection(pool)
            t = _UpstreamTransport(self.waiting)
            t.conn = conn
            conn.connection_made(t)
            pool.total += 1
            pool.release(conn)
        self.h2s = H2Session(self.server, limits_from(snap.http2))
        self.transport = _Transport()
        self.sid = 1

    async def _start(self):
        self.h2s.connection_made(self.transport)
        self.h2s.data_received(preface())
        await asyncio.sleep(0)

    async def _run(self, batches: list[bytes]) -> None:
        h2s = self.h2s
        waiting = self.waiting
        sleep = asyncio.sleep
        for data in batches:
            h2s.data_received(data)
            while waiting:
                conns = waiting[:]
                del waiting[:]
                for conn in conns:
                    conn.data_received(OK)
            await sleep(0)  # the session's flush (call_soon)
            await sleep(0)  # the closed bridge streams' connection_lost (call_soon)

    def run(self, n: int, profile: cProfile.Profile | None = None) -> float:
        """CPU us per request for ``n`` requests (rounded down to whole batches)."""
        batches = client_bytes(max(1, n // STREAMS), self.sid)
        self.sid += 2 * STREAMS * len(batches)
        t = time.process_time()
        if profile is not None:
            profile.enable()
        self.loop.run_until_complete(self._run(batches))
        if profile is not None:
            profile.disable()
        return (time.process_time() - t) / (len(batches) * STREAMS) * 1e6


def floor(n: int = N, repeat: int = REPEAT) -> float:
    """CPU us per request of the ``h2`` library alone serving this traffic (best of
    ``repeat``): an H2Core answers each request at once, no glue (see the module doc)."""
    import h2.events

    from dispa.config.load import load_config_text
    from dispa.protocols.http2 import H2Core, limits_from
    from dispa.proxy.h2_session import _response_headers

    # the HEADERS the bridge sends for OK (hop-by-hop fields dropped)
    head = OK.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]
    response = _response_headers(200, [tuple(line.split(b": ", 1)) for line in head])
    limits = limits_from(load_config_text(CONFIG, fmt="toml").snapshot.http2)
    best = float("inf")
    for _ in range(repeat):
        core = H2Core(limits)
        core.initiate()
        core.receive(preface())
        core.data_to_send()
        conn = core.conn
        batches = client_bytes(max(1, n // STREAMS))
        answered = 0
        request_received = h2.events.RequestReceived
        t = time.process_time()
        for data in batches:
            for ev in core.receive(data):
                if type(ev) is request_received:
                    sid = ev.stream_id
                    conn.send_headers(sid, response)
                    conn.send_data(sid, BODY, end_stream=True)
                    answered += 1
            core.data_to_send()
        best = min(best, (time.process_time() - t) / answered * 1e6)
        assert answered == len(batches) * STREAMS and not conn.open_inbound_streams
    return best


_SAVED: dict = {}


def use_codec(compiled: bool) -> None:
    """Switch new and running H2Cores between hpack_codec's compiled HPACK and header checks
    and h2's own (the ``hpack`` library, h2's inbound validation): ``--compare``."""
    from dispa.protocols.http2 import hpack_codec
    if not _SAVED:
        _SAVED.update(check_headers=hpack_codec.check_headers, Encoder=hpack_codec.Encoder,
                      IMPLEMENTATION=hpack_codec.IMPLEMENTATION)
    if compiled:
        for k, v in _SAVED.items():
            setattr(hpack_codec, k, v)
    else:
        hpack_codec.check_headers = None
        hpack_codec.Encoder = hpack_codec.CappedEncoder
        hpack_codec.IMPLEMENTATION = "pure"


def _ready(compiled: bool) -> Bench:
    use_codec(compiled)
    b = Bench()
    b.loop.run_until_complete(b._start())
    b.run(STREAMS * 20)  # warm-up; also checks that every stream was answered
    assert not b.h2s.streams, f"{len(b.h2s.streams)} streams still open"
    assert b.transport.written > STREAMS * 20 * len(BODY), b.transport.written
    return b


def _best(benches: dict) -> dict:
    """Best-of-REPEAT per variant, the variants' runs alternated (same noise for each)."""
    best = {k: float("inf") for k in benches}
    for _ in range(REPEAT):
        for compiled, b in benches.items():
            use_codec(compiled)
            asyncio.set_event_loop(b.loop)
            best[compiled] = min(best[compiled], b.run(N))
    return best


def main() -> None:
    from dispa.protocols.http2 import hpack_codec
    from dispa.proxy.protocol import IMPLEMENTATION
    compare = "--compare" in sys.argv and hpack_codec.IMPLEMENTATION == "compiled"
    if "--h2-connection" in sys.argv:
        import h2.connection

        from dispa.protocols.http2 import connection
        connection.Connection = h2.connection.H2Connection
    benches = {True: _ready(True)}
    if compare:
        benches[False] = _ready(False)
    b = benches[True]
    w0, n0 = b.transport.writes, b.transport.written
    best = _best(benches)
    use_codec(True)
    batches = REPEAT * max(1, N // STREAMS)
    print(f"HTTP/1.1 Session: {IMPLEMENTATION}; HPACK: {hpack_codec.IMPLEMENTATION}; "
          f"{N} requests x best of {REPEAT}, {STREAMS} streams per batch")
    print(f"h2 downstream -> HTTP/1.1 upstream   {best[True]:7.1f} us/request CPU")
    if compare:
        print(f"  same, h2's own HPACK and checks  {best[False]:7.1f} us/request CPU")
    if "--floor" in sys.argv:
        print(f"  h2 library alone (the floor)     {floor():7.1f} us/request CPU")
    print(f"transport writes per batch {(b.transport.writes - w0) / batches:.2f}, "
          f"bytes out per request {(b.transport.written - n0) / (batches * STREAMS):.0f}")
    if "--profile" in sys.argv:
        use_codec(True)
        asyncio.set_event_loop(b.loop)
        prof = cProfile.Profile()
        b.run(N, prof)
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)
        pstats.Stats(prof).sort_stats("cumulative").print_stats(25)
    for x in benches.values():
        x.loop.close()


if __name__ == "__main__":
    main()
