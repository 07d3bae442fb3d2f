"""WebSocket over HTTP/2 (RFC 8441 extended CONNECT) through a running dispa-server to real
``websockets`` servers (and a hand-made one for byte-exact checks) on loopback.

The client is a raw HTTP/2 client built on the ``h2`` library: SETTINGS_ENABLE_CONNECT_PROTOCOL,
``:method CONNECT`` + ``:protocol websocket``, WebSocket frames written and parsed by hand in
the stream's DATA. Covered: echo of text/binary messages with a subprotocol, fragmentation
and control frames passed byte for byte both ways, close codes both ways, masked/unmasked
violations closed with 1002, max message size (1009), many concurrent streams on one
connection, backpressure with h2 flow control both ways, refusals (400/501/502, upstream's
403) and the setting turned off."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import signal
import struct
import time

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import pytest
from h2.errors import ErrorCodes
from websockets.asyncio.server import serve
from websockets.exceptions import ConnectionClosed

from tests.support.dispa_proc import DispaProcess, free_port, render_config

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
MAX_MESSAGE = 256 * 1024


# -------------------------------------------------------------------------- framing helpers

def frame(opcode: int, payload: bytes = b"", *, fin: bool = True, mask: bool = True) -> bytes:
    """A raw RFC 6455 frame, as a client (mask) or a server (no mask) writes it."""
    b0 = (0x80 if fin else 0) | opcode
    n = len(payload)
    m = 0x80 if mask else 0
    if n < 126:
        head = bytes((b0, m | n))
    elif n < 65536:
        head = bytes((b0, m | 126)) + struct.pack("!H", n)
    else:
        head = bytes((b0, m | 127)) + struct.pack("!Q", n)
    if not mask:
        return head + payload
    key = os.urandom(4)
    k = (key * (n // 4 + 1))[:n]
    return head + key + (int.from_bytes(payload, "big") ^ int.from_bytes(k, "big")).to_bytes(
        n, "big") if n else head + key


def close_payload(code: int, reason: str = "") -> bytes:
    return struct.pack("!H", code) + reason.encode()


def parse_frame(buf: bytearray):
    """(opcode, fin, payload, raw length) of the first whole frame in ``buf``, or None."""
    if len(buf) < 2:
        return None
    b0, b1 = buf[0], buf[1]
    n, pos = b1 & 0x7F, 2
    if n == 126:
        if len(buf) < 4:
            return None
        n, pos = struct.unpack("!H", buf[2:4])[0], 4
    elif n == 127:
        if len(buf) < 10:
            return None
        n, pos = struct.unpack("!Q", buf[2:10])[0], 10
    key = None
    if b1 & 0x80:
        if len(buf) < pos + 4:
            return None
        key, pos = bytes(buf[pos:pos + 4]), pos + 4
    if len(buf) < pos + n:
        return None
    payload = bytes(buf[pos:pos + n])
    if key:
        payload = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    return b0 & 0x0F, bool(b0 & 0x80), payload, pos + n


# -------------------------------------------------------------------------- raw h2 client

class Stream:
    def __init__(self):
        self.headers = None
        self.buf = bytearray()
        self.ended = False
        self.reset = None
        self.ack = True  # acknowledge DATA at once (False: keep the window shut)
        self.unacked = 0
        self.received = 0


class H2Client:
    """A minimal asyncio HTTP/2 client on the ``h2`` library, for extended CONNECT."""

    async def connect(self, port: int) -> "H2Client":
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", port)
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(
            client_side=True, header_encoding=None))
        self.conn.initiate_connection()
        self.streams: dict[int, Stream] = {}
        self.changed = asyncio.Event()
        self.settings = asyncio.Event()
        self.closed = False
        self.goaway = None
        self.inbuf = bytearray()
        self.writer.write(self.conn.data_to_send())
        self.task = asyncio.create_task(self._read())
        await asyncio.wait_for(self.settings.wait(), 10)
        return self

    async def _read(self):
        try:
            while True:
                data = await self.reader.read(65536)
                if not data:
                    break
                # frame by frame: h2 as a client refuses every frame after a GOAWAY,
                # though streams up to its last stream id go on (RFC 9113 §6.8)
                buf = self.inbuf
                buf += data
                while len(buf) >= 9:
                    n = int.from_bytes(buf[:3], "big") + 9
                    if len(buf) < n:
                        break
                    chunk = bytes(buf[:n])
                    del buf[:n]
                    for ev in self.conn.receive_data(chunk):
                        self._event(ev)
                self.flush()
                self.changed.set()
        except (ConnectionError, h2.exceptions.ProtocolError):
            pass
        self.closed = True
        self.changed.set()

    def _event(self, ev):
        if isinstance(ev, h2.events.RemoteSettingsChanged):
            self.settings.set()
            return
        if isinstance(ev, h2.events.ConnectionTerminated):
            self.goaway = ev.error_code
            self.conn.state_machine.state = h2.connection.ConnectionState.CLIENT_OPEN
            return
        st = self.streams.get(getattr(ev, "stream_id", None))
        if st is None:
            return
        if isinstance(ev, h2.events.ResponseReceived):
            st.headers = dict(ev.headers)
        elif isinstance(ev, h2.events.DataReceived):
            st.buf += ev.data
            st.received += len(ev.data)
            if st.ack:
                self.conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            else:
                st.unacked += ev.flow_controlled_length
        elif isinstance(ev, h2.events.StreamEnded):
            st.ended = True
        elif isinstance(ev, h2.events.StreamReset):
            st.reset = ev.error_code

    def flush(self):
        data = self.conn.data_to_send()
        if data:
            self.writer.write(data)

    async def wait(self, cond, timeout: float = 10.0, what: str = ""):
        deadline = time.monotonic() + timeout
        while not cond():
            left = deadline - time.monotonic()
            assert left > 0, f"timed out waiting for {what or cond}"
            self.changed.clear()
            if cond():
                break
            try:
                await asyncio.wait_for(self.changed.wait(), left)
            except asyncio.TimeoutError:
                pass

    async def open(self, path: str = "/ws", *, protocol: bytes = b"websocket", extra=(),
                   end: bool = False, version: bytes | None = b"13") -> int:
        sid = self.conn.get_next_available_stream_id()
        headers = [(b":method", b"CONNECT"), (b":protocol", protocol), (b":scheme", b"http"),
                   (b":path", path.encode()), (b":authority", b"example.com")]
        if version is not None:
            headers.append((b"sec-websocket-version", version))
        headers += list(extra)
        self.streams[sid] = Stream()
        self.conn.send_headers(sid, headers, end_stream=end)
        self.flush()
        return sid

    async def response(self, sid: int) -> dict:
        st = self.streams[sid]
        await self.wait(lambda: st.headers is not None or st.reset is not None
                        or self.closed, what=f"response on stream {sid}")
        assert st.headers is not None, f"stream {sid} reset: {st.reset}"
        return st.headers

    async def websocket(self, path: str = "/ws", **kw) -> int:
        sid = await self.open(path, **kw)
        h = await self.response(sid)
        assert h[b":status"] == b"200", h
        return sid

    async def send(self, sid: int, data: bytes, *, end: bool = False, timeout: float = 20,
                   may_end: bool = False):
        """Send DATA as the windows allow (``may_end``: stop quietly if the proxy ends the
        stream meanwhile)."""
        while data:
            await self.wait(lambda: self.closed or self.streams[sid].reset is not None or
                            min(self.conn.local_flow_control_window(sid),
                                self.conn.max_outbound_frame_size) > 0,
                            timeout, "a send window")
            if may_end and (self.closed or self.streams[sid].reset is not None):
                return
            assert not self.closed and self.streams[sid].reset is None
            win = min(self.conn.local_flow_control_window(sid),
                      self.conn.max_outbound_frame_size)
            self.conn.send_data(sid, data[:win])
            data = data[win:]
            self.flush()
        if end:
            self.conn.end_stream(sid)
            self.flush()

    async def reply_close(self, sid: int, code: int):
        """Answer a close frame, unless the proxy already ended the stream (it does once
        the upstream has closed its connection: RST_STREAM NO_ERROR after END_STREAM)."""
        st = self.streams[sid]
        if st.reset is None and not self.closed:
            try:
                await self.send(sid, frame(0x8, close_payload(code)), may_end=True)
            except h2.exceptions.StreamClosedError:
                pass

    async def frame(self, sid: int, timeout: float = 10.0):
        """(opcode, fin, payload) of the next WebSocket frame on stream ``sid``."""
        st = self.streams[sid]
        got = []

        def ready():
            f = parse_frame(st.buf)
            if f is not None:
                got.append(f)
                return True
            return st.ended or st.reset is not None or self.closed

        await self.wait(ready, timeout, f"a frame on stream {sid}")
        assert got, f"stream {sid} ended (reset={st.reset}) with {bytes(st.buf)!r} buffered"
        opcode, fin, payload, n = got[0]
        del st.buf[:n]
        return opcode, fin, payload

    async def message(self, sid: int):
        """(opcode, payload) of the next whole data message (control frames skipped)."""
        parts, first = [], None
        while True:
            op, fin, payload = await self.frame(sid)
            if op >= 0x8:
                assert op != 0x8, f"close {payload!r} instead of a message"
                continue
            first = op if first is None else first
            parts.append(payload)
            if fin:
                return first, b"".join(parts)

    async def close_frame(self, sid: int) -> tuple[int, str]:
        while True:
            op, _, payload = await self.frame(sid)
            if op == 0x8:
                return struct.unpack("!H", payload[:2])[0], payload[2:].decode()

    async def ended(self, sid: int, timeout: float = 10.0):
        st = self.streams[sid]
        await self.wait(lambda: st.ended or st.reset is not None or self.closed, timeout,
                        f"the end of stream {sid}")

    def close(self):
        self.task.cancel()
        self.writer.close()


# -------------------------------------------------------------------------- upstreams

class RawUpstream:
    """A hand-made WebSocket server: answers the upgrade (optionally badly), records every
    byte after it, lets the test write raw frames, and can stop reading."""

    def __init__(self, *, accept_ok: bool = True, read: bool = True):
        self.accept_ok = accept_ok
        self.read = read
        self.received = bytearray()
        self.heads = []
        self.writers = []
        self.connected = asyncio.Event()

    async def start(self, port: int):
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", port)
        return self

    async def _handle(self, reader, writer):
        head = await reader.readuntil(b"\r\n\r\n")
        self.heads.append(head)
        key = next(line.split(b":", 1)[1].strip() for line in head.split(b"\r\n")
                   if line.lower().startswith(b"sec-websocket-key:"))
        accept = base64.b64encode(hashlib.sha1(key + (_GUID if self.accept_ok else b"x"))
                                  .digest())
        writer.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                     b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n")
        self.writers.append(writer)
        self.connected.set()
        if not self.read:
            await asyncio.sleep(3600)
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                self.received += data
        except ConnectionError:
            pass

    async def wait_bytes(self, n: int, timeout: float = 10.0) -> bytes:
        deadline = time.monotonic() + timeout
        while len(self.received) < n:
            assert time.monotonic() < deadline, f"got {len(self.received)} of {n} bytes"
            await asyncio.sleep(0.01)
        return bytes(self.received)

    def close(self):
        for w in self.writers:
            w.close()
        self.server.close()


async def echo_upstream(port: int, closes: list | None = None, requests: list | None = None,
                        **kw):
    """A ``websockets`` echo server; ``/close-4002`` closes with 4002 after one message;
    ``closes`` collects (code, reason) of each connection's received close."""

    async def handler(ws):
        if requests is not None:
            requests.append(ws.request)
        try:
            async for msg in ws:
                if ws.request.path == "/close-4002":
                    await ws.close(4002, "server bye")
                    break
                await ws.send(msg)
        except ConnectionClosed:
            pass
        if closes is not None:
            rcvd = ws.protocol.close_rcvd
            closes.append((rcvd.code, rcvd.reason) if rcvd else None)

    return await serve(handler, "127.0.0.1", port, max_size=None, **kw)


# -------------------------------------------------------------------------- fixtures

def _start(tmp_path_factory, name: str, extra: str) -> DispaProcess:
    up, port, admin = free_port(), free_port(), free_port()
    path = tmp_path_factory.mktemp(name) / "dispa.toml"
    path.write_text(render_config(port=port, admin_port=admin,
                                  targets=[("u0", f"http://127.0.0.1:{up}")], extra=extra))
    d = DispaProcess(path, port=port, admin_port=admin).wait_ready()
    d.up = up
    return d


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """One dispa-server (HTTP/2 on, RFC 8441 on by default, a small message limit); each
    test binds its own upstream on ``env.up`` and closes it before the next one."""
    d = _start(tmp_path_factory, "h2ws", f"[http2]\nenabled = true\n\n[websocket]\n"
                                         f"max_message_size = {MAX_MESSAGE}\n")
    yield d
    d.stop()


def run(coro, timeout: float = 60):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def metric(d, line_prefix: str) -> float:
    _, body = d.admin_get("/metrics")
    for line in body.decode().splitlines():
        if line.startswith(line_prefix + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


# -------------------------------------------------------------------------- tests


def test_echo_text_and_binary_with_subprotocol(env):
    before = metric(env, 'dispa_websocket_tunnels_total{via="h2"}')

    async def main():
        requests = []
        server = await echo_upstream(env.up, requests=requests, subprotocols=["chat"])
        c = await H2Client().connect(env.port)
        assert c.conn.remote_settings.enable_connect_protocol == 1
        sid = await c.open("/chat?room=1", extra=[(b"sec-websocket-protocol", b"chat, other")])
        h = await c.response(sid)
        assert h[b":status"] == b"200"
        assert h[b"sec-websocket-protocol"] == b"chat"
        assert b"sec-websocket-accept" not in h and b"upgrade" not in h
        await c.send(sid, frame(0x1, b"hello"))
        assert await c.message(sid) == (0x1, b"hello")
        await c.send(sid, frame(0x2, b"\x00\x01binary"))
        assert await c.message(sid) == (0x2, b"\x00\x01binary")
        big = os.urandom(200_000)  # more than the stream windows both ways
        await c.send(sid, frame(0x2, big))
        assert await c.message(sid) == (0x2, big)
        await c.send(sid, frame(0x8, close_payload(1000)))
        assert await c.close_frame(sid) == (1000, "")
        await c.ended(sid)
        assert c.streams[sid].reset in (None, ErrorCodes.NO_ERROR)
        c.close()
        server.close()
        return requests[0]

    req = run(main())
    # the upstream saw an HTTP/1.1 upgrade built from the stream, with forwarding headers
    assert req.path == "/chat?room=1"
    assert req.headers["Host"] == "example.com"
    assert req.headers["Upgrade"].lower() == "websocket"
    assert req.headers["Sec-WebSocket-Version"] == "13"
    assert len(base64.b64decode(req.headers["Sec-WebSocket-Key"])) == 16
    assert req.headers["X-Forwarded-For"] == "127.0.0.1"
    assert metric(env, 'dispa_websocket_tunnels_total{via="h2"}') == before + 1


def test_fragments_and_control_frames_pass_byte_for_byte(env):
    async def main():
        up = await RawUpstream().start(env.up)
        c = await H2Client().connect(env.port)
        sid = await c.websocket()
        sent = (frame(0x1, b"frag-1", fin=False) + frame(0x9, b"ping between") +
                frame(0x0, b"frag-2", fin=False) + frame(0x0, b"end"))
        await c.send(sid, sent[:7])  # a frame header cut across DATA frames
        await c.send(sid, sent[7:])
        assert await up.wait_bytes(len(sent)) == sent
        back = (frame(0x2, b"A" * 300, fin=False, mask=False) + frame(0xA, b"pong", mask=False)
                + frame(0x0, b"B" * 70000, fin=False, mask=False)
                + frame(0x0, b"C", mask=False))
        up.writers[0].write(back)
        await c.wait(lambda: len(c.streams[sid].buf) >= len(back), what="the fragments")
        assert bytes(c.streams[sid].buf) == back
        c.close()
        up.close()

    run(main())


def test_close_codes_both_ways(env):
    async def main():
        closes = []
        server = await echo_upstream(env.up, closes)
        c = await H2Client().connect(env.port)
        # client -> upstream
        sid = await c.websocket("/echo")
        await c.send(sid, frame(0x8, close_payload(4001, "bye")))
        assert await c.close_frame(sid) == (4001, "bye")  # websockets echoes the code
        await c.ended(sid)
        # upstream -> client
        sid2 = await c.websocket("/close-4002")
        await c.send(sid2, frame(0x1, b"x"))
        assert await c.close_frame(sid2) == (4002, "server bye")
        await c.reply_close(sid2, 4002)
        await c.ended(sid2)
        assert c.streams[sid2].reset in (None, ErrorCodes.NO_ERROR)
        deadline = time.monotonic() + 10
        while len(closes) < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        c.close()
        server.close()
        return closes

    closes = run(main())
    assert sorted(closes) == [(4001, "bye"), (4002, "")]  # our reply to its 4002


def test_unmasked_client_frame_closed_with_1002(env):
    async def main():
        closes = []
        server = await echo_upstream(env.up, closes)
        c = await H2Client().connect(env.port)
        sid = await c.websocket()
        await c.send(sid, frame(0x1, b"not masked", mask=False))
        assert (await c.close_frame(sid))[0] == 1002
        await c.reply_close(sid, 1002)
        await c.ended(sid)
        deadline = time.monotonic() + 10
        while not closes and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        c.close()
        server.close()
        return closes

    closes = run(main())
    assert closes and closes[0][0] == 1002  # the upstream never saw the bad frame


def test_masked_upstream_frame_closed_with_1002(env):
    async def main():
        up = await RawUpstream().start(env.up)
        c = await H2Client().connect(env.port)
        sid = await c.websocket()
        up.writers[0].write(frame(0x1, b"masked by a server", mask=True))
        assert (await c.close_frame(sid))[0] == 1002
        data = await up.wait_bytes(4)
        op, _, payload, _ = parse_frame(bytearray(data))
        assert op == 0x8 and struct.unpack("!H", payload[:2])[0] == 1002
        c.close()
        up.close()

    run(main())


def test_message_over_max_size_closed_with_1009(env):
    async def main():
        closes = []
        server = await echo_upstream(env.up, closes)
        c = await H2Client().connect(env.port)
        sid = await c.websocket()
        await c.send(sid, frame(0x2, b"k" * (MAX_MESSAGE - 10)))
        assert (await c.message(sid))[1] == b"k" * (MAX_MESSAGE - 10)
        # fragments add up: the second one crosses the limit
        await c.send(sid, frame(0x2, b"a" * 150000, fin=False) + frame(0x0, b"b" * 150000),
                     may_end=True)
        assert (await c.close_frame(sid))[0] == 1009
        await c.reply_close(sid, 1009)
        await c.ended(sid)
        deadline = time.monotonic() + 10
        while not closes and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        c.close()
        server.close()
        return closes

    closes = run(main())
    assert closes and closes[0][0] == 1009


def test_many_concurrent_streams_on_one_connection(env):
    n_streams, n_msgs = 100, 3

    async def main():
        server = await echo_upstream(env.up)
        c = await H2Client().connect(env.port)
        sids = [await c.open(f"/s{i}") for i in range(n_streams)]
        for sid in sids:
            assert (await c.response(sid))[b":status"] == b"200"

        async def talk(i, sid):
            for k in range(n_msgs):
                msg = f"stream {i} message {k}".encode() * (k + 1)
                await c.send(sid, frame(0x1, msg))
                assert await c.message(sid) == (0x1, msg)
            await c.send(sid, frame(0x8, close_payload(1000)))
            assert (await c.close_frame(sid))[0] == 1000
            await c.ended(sid)

        t0 = time.monotonic()
        await asyncio.gather(*(talk(i, sid) for i, sid in enumerate(sids)))
        elapsed = time.monotonic() - t0
        c.close()
        server.close()
        return elapsed

    elapsed = run(main(), 90)
    assert elapsed < 60
    deadline = time.monotonic() + 10
    while metric(env, "dispa_websocket_connections") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert metric(env, "dispa_websocket_connections") == 0


def test_backpressure_upstream_to_client_follows_the_stream_window(env):
    total = 24 * 1024 * 1024
    chunk = frame(0x2, b"z" * 65536, mask=False)

    async def main():
        up = await RawUpstream().start(env.up)
        c = await H2Client().connect(env.port)
        sid = await c.websocket()
        st = c.streams[sid]
        st.ack = False  # never open the stream window
        w = up.writers[0]
        written = 0
        stalled = False
        while written < total:
            w.write(chunk)
            written += len(chunk)
            try:
                await asyncio.wait_for(w.drain(), 1.0)
            except asyncio.TimeoutError:
                stalled = True
                break
        got_while_shut = st.received
        # open the window: everything written arrives
        c.conn.acknowledge_received_data(st.unacked, sid)
        st.ack = True
        c.flush()
        await c.wait(lambda: st.received >= written, 60, "the rest of the data")
        c.close()
        up.close()
        return stalled, written, got_while_shut

    stalled, written, got_while_shut = run(main(), 120)
    assert stalled, f"the upstream wrote {written} bytes without being held back"
    assert got_while_shut <= 65535  # the client's initial stream window
    assert written < 16 * 1024 * 1024  # measured: about 4.5 MiB (socket buffers + 64 KiB)


def test_backpressure_client_to_upstream_stops_window_updates(env):
    async def main():
        up = await RawUpstream(read=False).start(env.up)
        c = await H2Client().connect(env.port)
        sid = await c.websocket()
        msg = frame(0x2, b"q" * 60000)
        sent = 0
        stalled = False
        while sent < 64 * 1024 * 1024:
            try:
                await asyncio.wait_for(c.send(sid, msg, timeout=3600), 1.5)
            except asyncio.TimeoutError:
                stalled = True
                break
            sent += len(msg)
        c.close()
        up.close()
        return stalled, sent

    stalled, sent = run(main(), 120)
    assert stalled, f"the client sent {sent} bytes to an upstream that does not read"
    assert sent < 16 * 1024 * 1024  # measured: about 4.5 MiB (the upstream socket buffers)


def test_refusals(env):
    async def main():
        c = await H2Client().connect(env.port)
        sid = await c.open(protocol=b"h2c-tunnel")
        assert (await c.response(sid))[b":status"] == b"501"
        sid = await c.open(version=b"8")
        h = await c.response(sid)
        assert h[b":status"] == b"400" and h[b"sec-websocket-version"] == b"13"
        sid = await c.open(end=True)
        assert (await c.response(sid))[b":status"] == b"400"
        # an upstream that is not a WebSocket server: its answer passes through
        server = await asyncio.start_server(_http_403, "127.0.0.1", env.up)
        sid = await c.open()
        assert (await c.response(sid))[b":status"] == b"403"
        await c.ended(sid)
        server.close()
        await server.wait_closed()
        # an upstream whose 101 does not accept our key
        up = await RawUpstream(accept_ok=False).start(env.up)
        sid = await c.open()
        assert (await c.response(sid))[b":status"] == b"502"
        # the connection still serves other streams
        up.close()
        await up.server.wait_closed()
        server = await echo_upstream(env.up)
        sid = await c.websocket()
        await c.send(sid, frame(0x1, b"still here"))
        assert await c.message(sid) == (0x1, b"still here")
        c.close()
        server.close()

    run(main())
    assert metric(env, 'dispa_h2_websocket_refused_total{status="501"}') >= 1
    assert metric(env, 'dispa_h2_websocket_refused_total{status="502"}') >= 1


async def _http_403(reader, writer):
    await reader.readuntil(b"\r\n\r\n")
    writer.write(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 2\r\nConnection: close\r\n\r\nno")
    await writer.drain()
    writer.close()


def test_refused_when_the_setting_is_off(tmp_path_factory):
    d = _start(tmp_path_factory, "h2ws-off", "[http2]\nenabled = true\nwebsocket = false\n")
    try:
        async def main():
            c = await H2Client().connect(d.port)
            assert c.conn.remote_settings.enable_connect_protocol == 0
            sid = await c.open()
            st = c.streams[sid]
            await c.wait(lambda: st.reset is not None or st.headers is not None,
                         what="the refusal")
            assert st.headers is None and st.reset == ErrorCodes.PROTOCOL_ERROR
            c.close()

        run(main())
    finally:
        d.stop()


def test_graceful_shutdown_sends_1001_and_ends_the_stream(tmp_path_factory):
    d = _start(tmp_path_factory, "h2ws-drain", "[http2]\nenabled = true\n")

    async def main():
        closes = []
        server = await echo_upstream(d.up, closes)
        c = await H2Client().connect(d.port)
        sid = await c.websocket()
        await c.send(sid, frame(0x1, b"before"))
        assert await c.message(sid) == (0x1, b"before")
        d.signal(signal.SIGTERM)
        assert await c.close_frame(sid) == (1001, "going away")
        assert c.goaway == ErrorCodes.NO_ERROR
        await c.reply_close(sid, 1001)
        await c.ended(sid)
        deadline = time.monotonic() + 10
        while not closes and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        c.close()
        server.close()
        return closes

    try:
        closes = run(main())
        assert closes and closes[0][0] == 1001
        assert d.proc.wait(15) == 0  # drained cleanly, before the shutdown deadline
    finally:
        d.stop()
