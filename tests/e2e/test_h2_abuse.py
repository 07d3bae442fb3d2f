"""HTTP/2 abuse limits against a live dispa-server, scripted with the h2 library as a raw
client: rapid reset (CVE-2023-44487), CONTINUATION floods, HPACK bombs, SETTINGS and PING
floods, and a client that never reads. Each attack must end with GOAWAY
ENHANCE_YOUR_CALM (or a close), a ``dispa_h2_abuse_total{kind}`` count, bounded time and a
worker whose memory did not grow, and the server must still answer afterwards."""

from __future__ import annotations

import socket
import time

import h2.config
import h2.connection
import h2.events
import hpack
import pytest
from h2.errors import ErrorCodes
from hyperframe.frame import ContinuationFrame, HeadersFrame

from tests.support.dispa_proc import DispaProcess, free_port, render_config, wait_for

REQ = [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"example.com"),
       (b":path", b"/")]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from tests.support.origin import Origin
    origin = Origin("o1").start()
    port, admin = free_port(), free_port()
    cfg = render_config(port=port, admin_port=admin, targets=[("o1", origin.url)],
                        extra="[http2]\nenabled = true\nmax_resets_per_window = 100\n"
                              "max_control_frames_per_window = 200\n")
    path = tmp_path_factory.mktemp("abuse") / "dispa.toml"
    path.write_text(cfg)
    proc = DispaProcess(path, port=port, admin_port=admin).wait_ready()
    yield proc
    proc.stop()
    origin.stop()


def _client(port):
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True,
                                                                header_encoding=None))
    conn.initiate_connection()
    sock.sendall(conn.data_to_send())
    return sock, conn


def _until_closed(sock, conn, deadline=10.0):
    """Read until the server closes; the GOAWAY error code seen (or None)."""
    code = None
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        try:
            data = sock.recv(65536)
        except (ConnectionResetError, socket.timeout):
            break
        if not data:
            break
        try:
            for ev in conn.receive_data(data):
                if isinstance(ev, h2.events.ConnectionTerminated):
                    code = ev.error_code
        except h2.exceptions.ProtocolError:
            pass
    sock.close()
    return code


def _abuse_count(proc, kind):
    _, body = proc.admin_get("/metrics")
    for line in body.decode().splitlines():
        if line.startswith("dispa_h2_abuse_total") and f'kind="{kind}"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def _worker_rss_kb(proc) -> int:
    import subprocess
    pids = subprocess.run(["pgrep", "-P", str(proc.proc.pid)], capture_output=True,
                          text=True).stdout.split()
    total = 0
    for pid in pids:
        try:
            for line in open(f"/proc/{pid}/status"):
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total


def _still_serves(port):
    sock, conn = _client(port)
    conn.send_headers(1, REQ, end_stream=True)
    sock.sendall(conn.data_to_send())
    status = None
    end = time.monotonic() + 10
    while status is None and time.monotonic() < end:
        for ev in conn.receive_data(sock.recv(65536)):
            if isinstance(ev, h2.events.ResponseReceived):
                status = dict(ev.headers)[b":status"]
    sock.close()
    return status == b"200"


def _check(proc, kind, attack):
    before = _abuse_count(proc, kind)
    rss0 = _worker_rss_kb(proc)
    t0 = time.monotonic()
    code = attack()
    took = time.monotonic() - t0
    wait_for(lambda: _abuse_count(proc, kind) > before, what=f"{kind} counted")
    assert took < 10, f"{kind}: the attack kept the connection for {took:.1f}s"
    assert _worker_rss_kb(proc) - rss0 < 64 * 1024, f"{kind}: worker memory grew"
    assert _still_serves(proc.port)
    return code


def test_rapid_reset(server):
    def attack():
        sock, conn = _client(server.port)
        for i in range(500):  # open and cancel at once, far past 100 per second
            sid = conn.get_next_available_stream_id()
            conn.send_headers(sid, REQ, end_stream=True)
            conn.reset_stream(sid, ErrorCodes.CANCEL)
            try:
                sock.sendall(conn.data_to_send())
            except OSError:
                break
        return _until_closed(sock, conn)
    assert _check(server, "rapid_reset", attack) == ErrorCodes.ENHANCE_YOUR_CALM


def test_ping_flood(server):
    def attack():
        sock, conn = _client(server.port)
        for i in range(2000):
            conn.ping(i.to_bytes(8, "big"))
            try:
                sock.sendall(conn.data_to_send())
            except OSError:
                break
        return _until_closed(sock, conn)
    assert _check(server, "control_flood", attack) == ErrorCodes.ENHANCE_YOUR_CALM


def test_settings_flood(server):
    def attack():
        sock, conn = _client(server.port)
        for i in range(2000):
            conn.update_settings({h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 100 + i})
            try:
                sock.sendall(conn.data_to_send())
            except OSError:
                break
        return _until_closed(sock, conn)
    assert _check(server, "control_flood", attack) == ErrorCodes.ENHANCE_YOUR_CALM


def test_continuation_flood(server):
    def attack():
        sock, conn = _client(server.port)
        block = hpack.Encoder().encode(REQ)
        first = HeadersFrame(1, data=block)
        frames = [first.serialize()]
        for i in range(1000):  # never END_HEADERS
            frames.append(ContinuationFrame(1, data=b"\x40\x01a\x01b" * 100).serialize())
        try:
            sock.sendall(b"".join(frames))
        except OSError:
            pass
        return _until_closed(sock, conn)
    assert _check(server, "continuation_flood", attack) in (ErrorCodes.ENHANCE_YOUR_CALM,
                                                             ErrorCodes.PROTOCOL_ERROR, None)


def test_hpack_bomb(server):
    def attack():
        sock, conn = _client(server.port)
        # one big header in the dynamic table, then referenced many times: tiny input,
        # huge decoded header list
        enc = hpack.Encoder()
        big = (b"x-bomb", b"a" * 4000)
        first = enc.encode(REQ + [big])
        idx = enc.encode([big])  # now an index reference (1-2 bytes)
        block = first + idx * 2000
        frames = [HeadersFrame(1, data=block[:16000], flags=["END_STREAM"]).serialize()]
        rest = block[16000:]
        while rest:
            chunk, rest = rest[:16000], rest[16000:]
            frames.append(ContinuationFrame(1, data=chunk,
                                            flags=[] if rest else ["END_HEADERS"]).serialize())
        if len(frames) == 1:
            frames[0] = HeadersFrame(1, data=block, flags=["END_STREAM", "END_HEADERS"]
                                     ).serialize()
        try:
            sock.sendall(b"".join(frames))
        except OSError:
            pass
        return _until_closed(sock, conn)
    assert _check(server, "hpack_bomb", attack) == ErrorCodes.ENHANCE_YOUR_CALM
