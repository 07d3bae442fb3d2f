"""H2Session scheduling and flow control in memory: an h2 client connection on one side,
a recording transport on the other, and test streams handed in through the session's
stream hand-off (no sockets, no worker)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import h2.config
import h2.connection
import h2.events

from dispa.protocols.http2 import H2Limits
from dispa.proxy.h2_session import H2Session, StreamBase


class Transport:
    def __init__(self):
        self.data = bytearray()
        self.closed = False

    def get_extra_info(self, name, default=None):
        return ("127.0.0.1", 5555) if name == "peername" else default

    def set_write_buffer_limits(self, high=None, low=None):
        pass

    def get_write_buffer_size(self):
        return 0

    def write(self, data):
        self.data += data

    def close(self):
        self.closed = True

    abort = close

    def can_write_eof(self):
        return True

    def write_eof(self):  # our FIN; the session closes after a linger
        self.closed = True

    def take(self):
        out, self.data = bytes(self.data), bytearray()
        return out


class Stream(StreamBase):
    received = None

    def on_data(self, data):
        self.received = (self.received or b"") + data

    def on_end(self, trailers):
        pass

    def on_reset(self):
        pass


def server():
    return SimpleNamespace(metrics=SimpleNamespace(inc=lambda *a, **k: None), sessions=set(),
                           draining=False, runtime=SimpleNamespace(
                               proxy=SimpleNamespace(keep_alive_timeout_seconds=60.0)))


async def setup(**limits):
    t = Transport()
    s = H2Session(server(), H2Limits(enabled=True, **limits))
    s.connection_made(t)
    streams = {}

    def handoff(h2s, sid, pseudo, fields, ended):
        st = streams[sid] = Stream(h2s, sid)
        return st
    s._handoff = handoff
    c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True,
                                                             header_encoding=None))
    c.initiate_connection()
    s.data_received(c.data_to_send())
    c.receive_data(t.take())
    s.data_received(c.data_to_send())
    await asyncio.sleep(0)
    c.receive_data(t.take())
    return s, t, c, streams


def req(path=b"/", priority=None):
    h = [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"a.test"),
         (b":path", path)]
    return h + ([(b"priority", priority)] if priority else [])


def data_order(c, t):
    order = []
    for ev in c.receive_data(t.take()):
        if isinstance(ev, h2.events.DataReceived):
            order.append(ev.stream_id)
    return order


def respond(s, st, size):
    s.response_head(st, 200, [])
    s.queue_data(st, b"x" * size)
    s.queue_end(st, None)


def test_urgency_orders_data():
    async def main():
        s, t, c, streams = await setup()
        for sid, prio in ((1, b"u=5"), (3, b"u=1"), (5, None)):
            c.send_headers(sid, req(priority=prio), end_stream=True)
        s.data_received(c.data_to_send())
        for sid in (1, 3, 5):
            respond(s, streams[sid], 20000)
        await asyncio.sleep(0)
        order = data_order(c, t)
        firsts = list(dict.fromkeys(order))
        assert firsts == [3, 5, 1], order
        assert order == sorted(order, key=firsts.index)  # non-incremental: one at a time
    asyncio.run(main())


def test_incremental_streams_interleave():
    async def main():
        s, t, c, streams = await setup()
        for sid in (1, 3):
            c.send_headers(sid, req(priority=b"u=3, i"), end_stream=True)
        s.data_received(c.data_to_send())
        for sid in (1, 3):
            respond(s, streams[sid], 30000)
        await asyncio.sleep(0)
        order = data_order(c, t)
        assert order[:4] == [1, 3, 1, 3], order
    asyncio.run(main())


def test_priority_update_frame():
    async def main():
        s, t, c, streams = await setup()
        for sid in (1, 3):
            c.send_headers(sid, req(), end_stream=True)
        s.data_received(c.data_to_send())
        # PRIORITY_UPDATE (RFC 9218 §7.1): type 0x10 on stream 0, prioritized id + field
        payload = (3).to_bytes(4, "big") + b"u=0"
        s.data_received(len(payload).to_bytes(3, "big") + b"\x10\x00" + b"\x00" * 4 + payload)
        assert streams[3].urgency == 0
        for sid in (1, 3):
            respond(s, streams[sid], 10000)
        await asyncio.sleep(0)
        assert data_order(c, t)[0] == 3
    asyncio.run(main())


def test_request_window_follows_the_consumer():
    """WINDOW_UPDATE for a stream only while its consumer reads (backpressure)."""
    async def main():
        s, t, c, streams = await setup(initial_window_size=1000)
        c.send_headers(1, req(), end_stream=False)
        s.data_received(c.data_to_send())
        st = streams[1]
        st.pause_in()
        c.send_data(1, b"a" * 1000)
        s.data_received(c.data_to_send())
        await asyncio.sleep(0)
        c.receive_data(t.take())
        assert c.local_flow_control_window(1) == 0  # nothing acknowledged while paused
        st.resume_in()
        await asyncio.sleep(0)
        c.receive_data(t.take())
        assert c.local_flow_control_window(1) == 1000
        assert st.received == b"a" * 1000
    asyncio.run(main())


def test_response_waits_for_the_client_window_and_pauses_the_producer():
    async def main():
        s, t, c, streams = await setup(stream_buffer_bytes=20000)
        c.send_headers(1, req(), end_stream=True)
        s.data_received(c.data_to_send())
        st = streams[1]
        paused = []
        st.pause_producer = lambda: paused.append(True)
        s.response_head(st, 200, [])
        s.queue_data(st, b"x" * 100000)
        await asyncio.sleep(0)
        got = sum(len(ev.data) for ev in c.receive_data(t.take())
                  if isinstance(ev, h2.events.DataReceived))
        assert got == 65535 and paused  # the client's window, and the upstream paused
    asyncio.run(main())


def test_drain_sends_goaway_and_keeps_streams():
    async def main():
        s, t, c, streams = await setup()
        c.send_headers(1, req(), end_stream=True)
        s.data_received(c.data_to_send())
        s.drain()
        assert not t.closed
        ev = [e for e in c.receive_data(t.take())
              if isinstance(e, h2.events.ConnectionTerminated)]
        assert ev and ev[0].error_code == 0 and ev[0].last_stream_id == 1
        respond(s, streams[1], 10)
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert t.closed  # closed once the last stream ended
    asyncio.run(main())
