"""The WebSocket tunnel (dispa/proxy/websocket.py) over fake transports: pass-through,
backpressure, pings and pongs, proxy-initiated closes, and clean-up at the end."""

from __future__ import annotations

import struct

from dispa.protocols.websocket import FrameInspector, encode_frame
from dispa.proxy.websocket import CLOSE_TIMEOUT_SECONDS, WebSocketProxy, WebSocketSettings


class FakeTransport:
    def __init__(self):
        self.out = bytearray()
        self.closed = self.aborted = False
        self.reading = True

    def write(self, data):
        assert not (self.closed or self.aborted), "write after close"
        self.out += data

    def close(self):
        self.closed = True

    def abort(self):
        self.aborted = True

    def pause_reading(self):
        self.reading = False

    def resume_reading(self):
        self.reading = True


class FakeSelector:
    def __init__(self):
        self.released = []

    def release(self, i):
        self.released.append(i)


class FakeCluster:
    def __init__(self):
        self.selector = FakeSelector()


class FakeServer:
    def __init__(self):
        self.sessions = set()


class FakeConn:
    def __init__(self):
        self.lost = 0

    def connection_lost(self, exc):
        self.lost += 1


def frames_of(data: bytes, *, from_client: bool) -> list:
    """(opcode, payload) of every whole frame in ``data``."""
    from dispa.protocols.websocket import Control
    insp = FrameInspector(from_client=from_client)
    out = []
    pieces = insp.feed(bytes(data))
    for p in pieces:
        if isinstance(p, Control):
            out.append((p.opcode, p.payload))
        else:
            out.append(("data", bytes(p)))
    return out


def make(settings=None):
    proxy = WebSocketProxy()
    if settings is not None:
        proxy.settings = settings
    server, cluster, conn = FakeServer(), FakeCluster(), FakeConn()
    down, up = FakeTransport(), FakeTransport()
    t = proxy.tunnel(server, down, up, cluster=cluster, ep=3, up_conn=conn)
    return proxy, server, cluster, conn, down, up, t


def test_frames_pass_both_ways_and_the_end_cleans_up():
    proxy, server, cluster, conn, down, up, t = make()
    assert t in server.sessions and proxy.totals()["connections"] == 1
    c = encode_frame(0x1, b"hello", mask=True)
    t.downstream.data_received(c)
    assert bytes(up.out) == c
    s = encode_frame(0x2, b"\x00" * 1000, mask=False)
    t.upstream.data_received(s[:10])
    t.upstream.data_received(s[10:])
    assert bytes(down.out) == s
    # normal close handshake passes through; the upstream closes TCP first
    cl = encode_frame(0x8, struct.pack("!H", 1000), mask=True)
    t.downstream.data_received(cl)
    t.upstream.data_received(encode_frame(0x8, struct.pack("!H", 1000), mask=False))
    t.upstream.connection_lost(None)
    assert down.closed and conn.lost == 1
    t.downstream.connection_lost(None)
    assert t not in server.sessions and cluster.selector.released == [3]
    tot = proxy.totals()
    assert tot["frames"] == [2, 2] and tot["messages"] == [1, 1]
    assert tot["closed"] == {"normal": 1} and tot["connections"] == 0


def test_a_full_write_buffer_pauses_the_other_side():
    _, _, _, _, down, up, t = make()
    t.downstream.pause_writing()  # the client is slow
    assert not up.reading and down.reading
    t.downstream.resume_writing()
    assert up.reading
    t.upstream.pause_writing()
    assert not down.reading
    t.upstream.resume_writing()
    assert down.reading


def test_drain_sends_1001_to_both_sides_then_closes_on_their_replies():
    _, server, _, _, down, up, t = make()
    t.drain()
    assert frames_of(down.out, from_client=False) == [(0x8, struct.pack("!H", 1001)
                                                       + b"going away")]
    assert frames_of(up.out, from_client=True)[0][0] == 0x8  # masked: read as client frames
    n_down, n_up = len(down.out), len(up.out)
    # frames still in flight from the client are not forwarded any more
    t.downstream.data_received(encode_frame(0x1, b"late", mask=True))
    assert len(up.out) == n_up
    t.downstream.data_received(encode_frame(0x8, struct.pack("!H", 1001), mask=True))
    assert down.closed
    t.upstream.data_received(encode_frame(0x8, struct.pack("!H", 1001), mask=False))
    assert up.closed and len(down.out) == n_down


def test_no_close_reply_in_time_aborts_both():
    _, _, _, _, down, up, t = make()
    t.drain()
    assert t.deadline > 0
    t.on_deadline(t.deadline + CLOSE_TIMEOUT_SECONDS)
    assert down.aborted and up.aborted


def test_a_close_is_never_injected_mid_frame():
    _, _, _, _, down, up, t = make()
    big = encode_frame(0x2, b"x" * 1000, mask=False)
    t.upstream.data_received(big[:100])  # the client has part of a frame
    t.drain()
    assert bytes(down.out) == big[:100] and down.closed  # TCP close only
    assert frames_of(up.out, from_client=True)[0][0] == 0x8


def test_pings_go_to_a_silent_side_and_their_pongs_are_dropped():
    settings = WebSocketSettings(ping_interval_seconds=1.0, ping_timeout_seconds=2.0,
                                 idle_timeout_seconds=0)
    _, _, _, _, down, up, t = make(settings)
    now = t.downstream.last_rx + 1.5
    t.on_deadline(now)
    ping = frames_of(down.out, from_client=False)
    assert ping[0][0] == 0x9 and ping[0][1].startswith(b"dispa-ping:")
    assert frames_of(up.out, from_client=True)[0][0] == 0x9  # the upstream is pinged too
    # the client's pong answers the proxy: not forwarded to the upstream
    n_up = len(up.out)
    t.downstream.data_received(encode_frame(0xA, ping[0][1], mask=True))
    assert len(up.out) == n_up
    # the upstream never answers: after ping_timeout it is dropped, the client told 1001
    t.on_deadline(now + 2.5)
    assert up.aborted
    closes = [f for f in frames_of(down.out, from_client=False) if f[0] == 0x8]
    assert closes and struct.unpack("!H", closes[0][1][:2])[0] == 1001


def test_a_violation_closes_both_sides_with_its_code():
    proxy, _, _, _, down, up, t = make()
    t.downstream.data_received(encode_frame(0x1, b"unmasked", mask=False))
    assert up.out[:1] == b"\x88"  # only our close went upstream, not the bad frame
    code = frames_of(down.out, from_client=False)[0][1][:2]
    assert struct.unpack("!H", code)[0] == 1002
    t.downstream.connection_lost(None)
    t.upstream.connection_lost(None)
    assert proxy.totals()["closed"] == {"protocol_error": 1}
