"""WebSocket through a running dispa-server to real ``websockets`` servers on loopback:
load-balanced round trips, framing edge cases passed through intact, violations closed with
1002, message size (1009), idle and ping timeouts, graceful shutdown (1001), backpressure,
counters, and 1,000 concurrent connections."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import signal
import struct
import time

import pytest
from websockets.asyncio.client import connect
from websockets.asyncio.server import serve
from websockets.exceptions import ConnectionClosed

from tests.support.dispa_proc import DispaProcess, free_port, render_config

# -------------------------------------------------------------------------- helpers

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455 §1.3


def frame(opcode: int, payload: bytes = b"", *, fin: bool = True, mask: bool = True) -> bytes:
    """A raw RFC 6455 frame, as a test client (mask) or server (no mask) writes it."""
    b0 = (0x80 if fin else 0) | opcode
    n = len(payload)
    if n < 126:
        head = bytes((b0, (0x80 if mask else 0) | n))
    elif n < 65536:
        head = bytes((b0, (0x80 if mask else 0) | 126)) + struct.pack("!H", n)
    else:
        head = bytes((b0, (0x80 if mask else 0) | 127)) + struct.pack("!Q", n)
    if not mask:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


async def read_frame(reader) -> tuple[int, bool, bytes]:
    """(opcode, fin, payload) of the next frame from ``reader`` (unmasked if masked)."""
    b0, b1 = await reader.readexactly(2)
    n = b1 & 0x7F
    if n == 126:
        n = struct.unpack("!H", await reader.readexactly(2))[0]
    elif n == 127:
        n = struct.unpack("!Q", await reader.readexactly(8))[0]
    key = await reader.readexactly(4) if b1 & 0x80 else None
    payload = await reader.readexactly(n)
    if key:
        payload = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    return b0 & 0x0F, bool(b0 & 0x80), payload


async def raw_client(port: int):
    """A hand-made WebSocket client connection through Dispa (after the 101)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /ws HTTP/1.1\r\nHost: example.com\r\nUpgrade: websocket\r\n"
                 b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                 b"Sec-WebSocket-Version: 13\r\n\r\n")
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101"), head
    return reader, writer


class RawUpstream:
    """A hand-made WebSocket server: answers the upgrade, records every byte after it, and
    lets the test write raw frames back."""

    def __init__(self):
        self.received = bytearray()
        self.writers = []
        self.readers = []
        self.connected = asyncio.Event()
        self.server = None

    async def start(self, port: int = 0) -> int:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", port)
        return self.server.sockets[0].getsockname()[1]

    async def _handle(self, reader, writer):
        head = await reader.readuntil(b"\r\n\r\n")
        key = next(line.split(b":", 1)[1].strip() for line in head.split(b"\r\n")
                   if line.lower().startswith(b"sec-websocket-key:"))
        accept = base64.b64encode(hashlib.sha1(key + _GUID).digest())
        writer.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                     b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n")
        self.writers.append(writer)
        self.readers.append(reader)
        self.connected.set()
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


async def echo_server(name: str, closes: list | None = None, port: int = 0, **kw):
    """A websockets echo server on ``port`` (0: any); the first message on each connection
    is its ``name``; ``closes`` collects (code, reason) of each connection's close."""

    async def handler(ws):
        await ws.send(name)
        try:
            async for msg in ws:
                await ws.send(msg)
        except ConnectionClosed:
            pass
        if closes is not None:
            rcvd = ws.protocol.close_rcvd
            closes.append((rcvd.code, rcvd.reason) if rcvd else None)

    server = await serve(handler, "127.0.0.1", port, max_size=None, **kw)
    return server, server.sockets[0].getsockname()[1]


def start_dispa(dispa, upstream_ports, *, extra: str = "", workers: str = "1", lb="roundrobin"):
    port, admin = free_port(), free_port()
    text = render_config(port=port, admin_port=admin, lb=lb,
                         targets=[(f"u{i}", f"http://127.0.0.1:{p}")
                                  for i, p in enumerate(upstream_ports)], extra=extra)
    return dispa(config_text=text, port=port, admin_port=admin, workers=workers)


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """One dispa-server for the tests that need only the default config and one upstream
    (a cold start costs about a second each). Its upstream is ``shared.upstream_port``:
    each test binds its own server there and closes it before the next test; counters are
    compared as deltas. Tests that change the config or stop the server start their own."""
    up, port, admin = free_port(), free_port(), free_port()
    path = tmp_path_factory.mktemp("ws-shared") / "dispa.toml"
    path.write_text(render_config(port=port, admin_port=admin,
                                  targets=[("u0", f"http://127.0.0.1:{up}")]))
    d = DispaProcess(path, port=port, admin_port=admin).wait_ready()
    d.upstream_port = up
    yield d
    d.stop()


def metric(d, line_prefix: str) -> float:
    _, body = d.admin_get("/metrics")
    for line in body.decode().splitlines():
        if line.startswith(line_prefix + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


# -------------------------------------------------------------------------- tests


def test_websocket_round_trips_are_load_balanced_and_counted(dispa):
    async def main():
        s1, p1 = await echo_server("one")
        s2, p2 = await echo_server("two")
        ports = [p1, p2]
        d = start_dispa(dispa, ports)
        seen = []
        for _ in range(4):
            async with connect(f"ws://127.0.0.1:{d.port}/chat") as ws:
                seen.append(await ws.recv())
                await ws.send("hello")
                assert await ws.recv() == "hello"
                await ws.send(b"\x00\x01binary")
                assert await ws.recv() == b"\x00\x01binary"
                big = os.urandom(300_000)  # several reads, one frame
                await ws.send(big)
                assert await ws.recv() == big
        s1.close()
        s2.close()
        return d, seen

    d, seen = asyncio.run(asyncio.wait_for(main(), 60))
    assert sorted(seen) == ["one", "one", "two", "two"]  # round robin over both upstreams
    # per connection: 3 messages up; 4 down (name + 3 echoes); plus the close frames
    assert metric(d, 'dispa_websocket_messages_total{direction="to_upstream"}') == 12
    assert metric(d, 'dispa_websocket_messages_total{direction="to_downstream"}') == 16
    assert metric(d, 'dispa_websocket_frames_total{direction="to_upstream"}') >= 16
    assert metric(d, "dispa_websocket_connections") == 0


def test_fragments_and_control_frames_between_them_pass_through_intact(shared):
    async def main():
        up = RawUpstream()
        await up.start(shared.upstream_port)
        reader, writer = await raw_client(shared.port)
        # a text message in three fragments with a ping and a pong between them, then a
        # close with an application code: the upstream must see exactly these bytes
        sent = (frame(0x1, b"Hel", fin=False) + frame(0x9, b"are you there")
                + frame(0x0, b"lo ", fin=False) + frame(0xA, b"unsolicited")
                + frame(0x0, b"world", fin=True) + frame(0x2, b"")
                + frame(0x1, b"x" * 70000) + frame(0x8, struct.pack("!H", 4000) + b"bye"))
        for i in range(0, len(sent), 7):  # split at every 7th byte: headers cut anywhere
            writer.write(sent[i:i + 7])
            await writer.drain()
        assert await up.wait_bytes(len(sent)) == sent
        # and the other way: server frames (unmasked), fragmented with a ping inside
        back = (frame(0x2, b"ab", fin=False, mask=False) + frame(0x9, b"", mask=False)
                + frame(0x0, b"cd", fin=True, mask=False)
                + frame(0x8, struct.pack("!H", 4000) + b"bye", mask=False))
        up.writers[0].write(back)
        got = await asyncio.wait_for(reader.readexactly(len(back)), 10)
        assert got == back
        writer.close()
        up.close()

    asyncio.run(asyncio.wait_for(main(), 60))


def test_text_payloads_pass_through_unvalidated_and_the_endpoint_answers_1007(shared):
    """The decision in docs/websocket.md: Dispa does not UTF-8-check text payloads (RFC 6455
    §8.1 is the endpoints' duty, and permessage-deflate payloads cannot be checked by an
    intermediary); invalid text reaches the upstream byte for byte, whose 1007 close then
    comes back through intact."""
    errors = 'dispa_websocket_closed_total{reason="protocol_error"}'
    e0 = metric(shared, errors)

    async def main():
        s, _ = await echo_server("u", port=shared.upstream_port)
        reader, writer = await raw_client(shared.port)
        assert await read_frame(reader) == (0x1, True, b"u")  # the server's greeting
        # valid UTF-8 cut inside a sequence across two fragments, then invalid UTF-8
        writer.write(frame(0x1, "é".encode()[:1], fin=False) + frame(0x0, "é".encode()[1:]))
        assert await read_frame(reader) == (0x1, True, "é".encode())
        writer.write(frame(0x1, b"\xff\xfe not utf-8"))
        op, fin, payload = await asyncio.wait_for(read_frame(reader), 10)
        assert op == 0x8 and struct.unpack("!H", payload[:2])[0] == 1007, payload
        writer.close()
        s.close()
        await s.wait_closed()

    asyncio.run(asyncio.wait_for(main(), 30))
    assert metric(shared, errors) == e0  # the 1007 was the endpoint's, not Dispa's


def test_a_fragmented_message_from_the_websockets_library_arrives_whole(shared):
    messages = 'dispa_websocket_messages_total{direction="to_upstream"}'
    frames = 'dispa_websocket_frames_total{direction="to_upstream"}'
    m0, f0 = metric(shared, messages), metric(shared, frames)

    async def main():
        s, _ = await echo_server("e", port=shared.upstream_port)
        async with connect(f"ws://127.0.0.1:{shared.port}/") as ws:
            assert await ws.recv() == "e"
            await ws.send(iter(["frag", "ment", "ed"]))  # one message, three frames
            assert await ws.recv() == "fragmented"
        s.close()
        await s.wait_closed()

    asyncio.run(asyncio.wait_for(main(), 30))
    # frames up: 3 fragments, the empty final continuation websockets ends an iterable
    # with, and the close; messages up: 1 (counted when the tunnel ends: poll)
    deadline = time.monotonic() + 10
    while metric(shared, frames) - f0 < 5:
        assert time.monotonic() < deadline, metric(shared, frames) - f0
        time.sleep(0.05)
    assert metric(shared, messages) - m0 == 1
    assert metric(shared, frames) - f0 == 5


def test_close_codes_and_reasons_pass_through_both_ways(shared):
    async def main():
        closes = []
        s, _ = await echo_server("c", closes, port=shared.upstream_port)
        async with connect(f"ws://127.0.0.1:{shared.port}/") as ws:
            await ws.recv()
            await ws.close(4321, "custom reason")
        assert ws.protocol.close_rcvd.code == 4321 and ws.protocol.close_rcvd.reason == "custom reason"
        deadline = time.monotonic() + 5
        while not closes:  # the server's side of the close handshake
            assert time.monotonic() < deadline, "the server saw no close"
            await asyncio.sleep(0.01)
        s.close()
        await s.wait_closed()

        async def closing_handler(w):
            await w.close(3001, "server says bye")

        s2 = await serve(closing_handler, "127.0.0.1", shared.upstream_port)
        async with connect(f"ws://127.0.0.1:{shared.port}/") as ws:
            with pytest.raises(ConnectionClosed):
                await ws.recv()
        assert ws.protocol.close_rcvd.code == 3001 and ws.protocol.close_rcvd.reason == "server says bye"
        assert closes == [(4321, "custom reason")]
        s2.close()
        await s2.wait_closed()

    asyncio.run(asyncio.wait_for(main(), 30))


def test_an_unmasked_client_frame_is_closed_with_1002_on_both_sides(shared):
    errors = 'dispa_websocket_closed_total{reason="protocol_error"}'
    e0 = metric(shared, errors)

    async def main():
        closes = []
        s, _ = await echo_server("m", closes, port=shared.upstream_port)
        reader, writer = await raw_client(shared.port)
        op, _, payload = await read_frame(reader)  # "m" from the server
        assert (op, payload) == (0x1, b"m")
        writer.write(frame(0x1, b"not masked", mask=False))
        op, _, payload = await asyncio.wait_for(read_frame(reader), 10)
        assert op == 0x8 and struct.unpack("!H", payload[:2])[0] == 1002
        deadline = time.monotonic() + 5
        while not closes and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert closes and closes[0][0] == 1002  # the server never saw the bad frame
        writer.close()
        s.close()
        await s.wait_closed()

    asyncio.run(asyncio.wait_for(main(), 30))
    assert metric(shared, errors) - e0 == 1


def test_a_masked_server_frame_is_closed_with_1002_on_both_sides(shared):
    async def main():
        up = RawUpstream()
        await up.start(shared.upstream_port)
        async with connect(f"ws://127.0.0.1:{shared.port}/") as ws:
            await asyncio.wait_for(up.connected.wait(), 10)
            up.writers[0].write(frame(0x1, b"masked by a server", mask=True))
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(ws.recv(), 10)
        assert ws.protocol.close_rcvd is not None and ws.protocol.close_rcvd.code == 1002
        # the upstream got a (masked) close 1002 from the proxy
        data = await up.wait_bytes(8)
        assert data[0] == 0x88 and data[1] & 0x80
        key = data[2:6]
        code = bytes(b ^ key[i] for i, b in enumerate(data[6:8]))
        assert struct.unpack("!H", code)[0] == 1002
        up.close()

    asyncio.run(asyncio.wait_for(main(), 30))


def test_a_message_over_max_message_size_is_closed_with_1009(dispa):
    async def main():
        closes = []
        s, p = await echo_server("big", closes)
        d = start_dispa(dispa, [p], extra="[websocket]\nmax_message_size = 1024\n")
        # the limit counts payload bytes on the wire: no compression, so they are the text's
        async with connect(f"ws://127.0.0.1:{d.port}/", compression=None) as ws:
            await ws.recv()
            await ws.send("a" * 1024)  # at the limit: fine
            assert await ws.recv() == "a" * 1024
            await ws.send(iter(["b" * 600, "c" * 600]))  # fragments adding up past it
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(ws.recv(), 10)
        assert ws.protocol.close_rcvd.code == 1009
        deadline = time.monotonic() + 5
        while not closes and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert closes and closes[0][0] == 1009
        s.close()

    asyncio.run(asyncio.wait_for(main(), 30))


def test_an_idle_connection_is_closed_with_1001(dispa):
    async def main():
        closes = []
        s, p = await echo_server("idle", closes)
        d = start_dispa(dispa, [p], extra="[websocket]\nidle_timeout = 0.5\n")
        t0 = time.monotonic()
        async with connect(f"ws://127.0.0.1:{d.port}/", ping_interval=None) as ws:
            await ws.recv()
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(ws.recv(), 10)
        assert ws.protocol.close_rcvd.code == 1001
        assert 0.4 < time.monotonic() - t0 < 5
        s.close()
        return d

    d = asyncio.run(asyncio.wait_for(main(), 30))
    assert metric(d, 'dispa_websocket_closed_total{reason="idle_timeout"}') == 1


def test_pings_keep_a_live_client_and_drop_a_dead_one(dispa):
    async def main():
        closes = []
        s, p = await echo_server("ping", closes)
        d = start_dispa(dispa, [p], extra="[websocket]\nping_interval = 0.3\n"
                                          "ping_timeout = 0.6\n")
        # a websockets client answers the proxy's pings: it stays up across several rounds
        async with connect(f"ws://127.0.0.1:{d.port}/", ping_interval=None) as ws:
            assert await ws.recv() == "ping"
            t0 = time.monotonic()
            while time.monotonic() - t0 < 1.5:  # the behaviour under test is time passing
                await asyncio.sleep(0.1)
            await ws.send("still here")
            assert await ws.recv() == "still here"
        # a raw client that reads but never answers: pinged, then dropped; the server is told
        reader, writer = await raw_client(d.port)
        assert await read_frame(reader) == (0x1, True, b"ping")
        op, _, payload = await asyncio.wait_for(read_frame(reader), 5)
        assert op == 0x9 and payload.startswith(b"dispa-ping:")
        deadline = time.monotonic() + 10
        while len(closes) < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert closes[-1] is not None and closes[-1][0] == 1001
        writer.close()
        s.close()
        return d

    d = asyncio.run(asyncio.wait_for(main(), 30))
    assert metric(d, 'dispa_websocket_closed_total{reason="ping_timeout"}') == 1


def test_graceful_shutdown_sends_1001_going_away_to_both_sides(dispa):
    async def main():
        closes = []
        s, p = await echo_server("bye", closes)
        d = start_dispa(dispa, [p])
        async with connect(f"ws://127.0.0.1:{d.port}/") as ws:
            await ws.recv()
            d.signal(signal.SIGTERM)
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(ws.recv(), 10)
        assert ws.protocol.close_rcvd.code == 1001
        deadline = time.monotonic() + 5
        while not closes and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert closes and closes[0][0] == 1001
        s.close()
        return d

    d = asyncio.run(asyncio.wait_for(main(), 30))
    assert d.proc.wait(15) == 0  # drained cleanly, well before the shutdown deadline


def test_a_client_that_stops_reading_stalls_the_upstream(dispa):
    """Backpressure: a slow client holds the sender back instead of growing buffers."""
    chunk = os.urandom(65536)  # incompressible, and compression is off anyway
    total = 1536  # 96 MiB
    sent = [0]

    async def main():
        async def firehose(ws):
            for _ in range(total):
                await ws.send(chunk)
                sent[0] += 1

        s = await serve(firehose, "127.0.0.1", 0, max_size=None, compression=None)
        d = start_dispa(dispa, [s.sockets[0].getsockname()[1]])
        async with connect(f"ws://127.0.0.1:{d.port}/", max_size=None, max_queue=4,
                           compression=None) as ws:
            # not reading: wait until the sender stalls (no progress for 0.5 s)
            last, still_since = -1, time.monotonic()
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                await asyncio.sleep(0.1)
                if sent[0] != last:
                    last, still_since = sent[0], time.monotonic()
                elif time.monotonic() - still_since > 0.5:
                    break
            stalled_at = sent[0]
            got = 0
            while got < total:
                msg = await ws.recv()
                assert len(msg) == len(chunk)
                got += 1
        s.close()
        return stalled_at

    stalled_at = asyncio.run(asyncio.wait_for(main(), 90))
    print(f"sender stalled {stalled_at * 64} KiB ahead of a client that stopped reading")
    # socket buffers plus one 256 KiB transport buffer: far less than the 96 MiB sent
    assert stalled_at * 64 < 48 * 1024, f"sender got {stalled_at * 64} KiB ahead"


def test_1000_concurrent_connections(dispa):
    n = 1000
    peak = []  # dispa_websocket_connections when the last one opened

    async def main():
        s, p = await echo_server("many")
        d = start_dispa(dispa, [p], workers="2")
        sem = asyncio.Semaphore(200)  # connect in waves; all stay open together
        opened = []
        all_open = asyncio.Event()

        async def one(i):
            async with sem:
                ws = await connect(f"ws://127.0.0.1:{d.port}/", ping_interval=None,
                                   open_timeout=30)
                assert await ws.recv() == "many"
            opened.append(ws)
            if len(opened) == n:
                # every tunnel is open in Dispa at once (the greeting came through each)
                peak.append(metric(d, "dispa_websocket_connections"))
                all_open.set()
            await all_open.wait()
            await ws.send(f"m{i}")
            assert await ws.recv() == f"m{i}"
            await ws.close()

        t0 = time.monotonic()
        await asyncio.gather(*(one(i) for i in range(n)))
        elapsed = time.monotonic() - t0
        s.close()
        return d, elapsed

    d, elapsed = asyncio.run(asyncio.wait_for(main(), 120))
    print(f"1000 concurrent websocket connections: {elapsed:.1f} s")
    assert peak == [n]
    assert metric(d, 'dispa_websocket_messages_total{direction="to_upstream"}') == n
    assert metric(d, 'dispa_websocket_messages_total{direction="to_downstream"}') == 2 * n


def test_wss_through_the_tls_listener(dispa, tmp_path):
    """The tunnel takes over a TLS transport too (set_protocol on the TLS layer)."""
    import ssl

    from tests.support.pki import CA, write_pair

    ca = CA()
    certs = tmp_path / "certs"
    write_pair(certs, "ws", *ca.issue("ws.test", dns=["ws.test"]))
    (tmp_path / "ca.crt").write_bytes(ca.pem)

    async def main():
        s, p = await echo_server("tls")
        tport = free_port()
        d = start_dispa(dispa, [p], extra=f'''
[tls]
enabled = true
bind_address = "127.0.0.1:{tport}"
certificate_dirs = ["{certs}"]
default_certificate = "ws.test"
''')
        ctx = ssl.create_default_context(cafile=str(tmp_path / "ca.crt"))
        async with connect(f"wss://127.0.0.1:{tport}/", ssl=ctx,
                           server_hostname="ws.test") as ws:
            assert await ws.recv() == "tls"
            big = os.urandom(200_000)
            await ws.send(big)
            assert await ws.recv() == big
            await ws.close(4001, "tls bye")
        assert ws.protocol.close_rcvd.code == 4001
        s.close()
        return d

    d = asyncio.run(asyncio.wait_for(main(), 30))
    assert metric(d, 'dispa_websocket_messages_total{direction="to_upstream"}') == 1
