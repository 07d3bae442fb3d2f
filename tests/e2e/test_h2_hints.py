"""103 Early Hints passed through to HTTP/2 clients, and server push of ``Link:
rel=preload`` targets when ``server_push = true`` (off by default). The origin is a tiny
raw HTTP/1.1 server on 127.0.0.1 (the test origin cannot send 1xx)."""

from __future__ import annotations

import socket
import socketserver
import threading
import time

import h2.config
import h2.connection
import h2.events
import pytest

from tests.support.dispa_proc import DispaProcess, free_port, render_config

LINK = b"</a.css>; rel=preload; as=style"


class _Handler(socketserver.BaseRequestHandler):
    def handle(self):
        buf = b""
        while True:
            while b"\r\n\r\n" not in buf:
                data = self.request.recv(65536)
                if not data:
                    return
                buf += data
            head, buf = buf.split(b"\r\n\r\n", 1)
            path = head.split(b" ")[1]
            if path == b"/hints":
                self.request.sendall(b"HTTP/1.1 103 Early Hints\r\nLink: " + LINK + b"\r\n\r\n")
                time.sleep(0.05)
                self.request.sendall(b"HTTP/1.1 200 OK\r\nLink: " + LINK +
                                     b"\r\nContent-Length: 4\r\n\r\npage")
            elif path == b"/a.css":
                self.request.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/css\r\n"
                                     b"Content-Length: 3\r\n\r\ncss")
            else:
                self.request.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")


@pytest.fixture(scope="module")
def origin():
    srv = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Handler)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv.server_address[1]
    srv.shutdown()
    srv.server_close()


def _start(tmp_path, origin, push: bool):
    port, admin = free_port(), free_port()
    cfg = tmp_path / "dispa.toml"
    cfg.write_text(render_config(
        port=port, admin_port=admin, targets=[("o", f"http://127.0.0.1:{origin}")],
        extra=f"[http2]\nenabled = true\nserver_push = {'true' if push else 'false'}\n"))
    return DispaProcess(cfg, port=port, admin_port=admin).wait_ready()


def _get(port, path, enable_push: bool):
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True,
                                                             header_encoding=None))
    c.initiate_connection()
    if not enable_push:
        c.update_settings({h2.settings.SettingCodes.ENABLE_PUSH: 0})
    c.send_headers(1, [(b":method", b"GET"), (b":scheme", b"http"),
                       (b":authority", b"example.com"), (b":path", path)], end_stream=True)
    sock.sendall(c.data_to_send())
    events, ended = [], set()
    t0 = time.monotonic()
    while 1 not in ended and time.monotonic() - t0 < 10:
        for ev in c.receive_data(sock.recv(65536)):
            events.append(ev)
            if isinstance(ev, h2.events.StreamEnded):
                ended.add(ev.stream_id)
        sock.sendall(c.data_to_send())
    # a pushed stream may end just after the parent
    while any(isinstance(e, h2.events.PushedStreamReceived) for e in events) and \
            len(ended) < 2 and time.monotonic() - t0 < 10:
        for ev in c.receive_data(sock.recv(65536)):
            events.append(ev)
            if isinstance(ev, h2.events.StreamEnded):
                ended.add(ev.stream_id)
    sock.close()
    return events


def test_early_hints_pass_through_and_no_push_by_default(tmp_path, origin):
    proc = _start(tmp_path, origin, push=False)
    try:
        events = _get(proc.port, b"/hints", enable_push=True)
    finally:
        proc.stop()
    info = [e for e in events if isinstance(e, h2.events.InformationalResponseReceived)]
    assert info and dict(info[0].headers)[b":status"] == b"103"
    assert dict(info[0].headers)[b"link"] == LINK
    final = [e for e in events if isinstance(e, h2.events.ResponseReceived)]
    assert dict(final[0].headers)[b":status"] == b"200"
    assert not any(isinstance(e, h2.events.PushedStreamReceived) for e in events)


def test_server_push_of_preload_links(tmp_path, origin):
    proc = _start(tmp_path, origin, push=True)
    try:
        events = _get(proc.port, b"/hints", enable_push=True)
    finally:
        proc.stop()
    pushed = [e for e in events if isinstance(e, h2.events.PushedStreamReceived)]
    assert pushed and dict(pushed[0].headers)[b":path"] == b"/a.css"
    body = b"".join(e.data for e in events if isinstance(e, h2.events.DataReceived)
                    and e.stream_id == pushed[0].pushed_stream_id)
    assert body == b"css"
