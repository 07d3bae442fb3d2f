"""Downstream HTTP/2 end to end: a real dispa-server with ``[http2] enabled``, real clients
(curl, the h2 library as a raw client), a real HTTP/1.1 origin on 127.0.0.1.

h2c prior knowledge and ``Upgrade: h2c`` on the plain listener (protocol detection), ALPN h2
on the TLS listener, request and response bodies both ways, multiplexing, backpressure
(a client that does not open its window does not make the proxy buffer the upstream's
body), GOAWAY on graceful shutdown with the stream in flight finishing, and HTTP/1.1 still
served on the same port."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time

import h2.config
import h2.connection
import h2.events
import h2.settings
import pytest

from tests.support.dispa_proc import DispaProcess, free_port, render_config, wait_for
from tests.support.origin import Origin
from tests.support.pki import CA, write_pair


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp("h2")
    ca = CA()
    (d / "ca.crt").write_bytes(ca.pem)
    write_pair(d / "certs", "h2", *ca.issue("h2.test", dns=["h2.test"]))
    origin = Origin("o1").start()
    port, tport, admin = free_port(), free_port(), free_port()
    extra = f'''
[http2]
enabled = true

[tls]
enabled = true
bind_address = "127.0.0.1:{tport}"
certificate_dirs = ["{d / 'certs'}"]
default_certificate = "h2.test"
alpn = ["h2", "http/1.1"]
'''
    cfg = d / "dispa.toml"
    cfg.write_text(render_config(port=port, admin_port=admin, targets=[("o1", origin.url)],
                                 extra=extra))
    proc = DispaProcess(cfg, port=port, admin_port=admin).wait_ready()
    proc.tport = tport
    proc.ca_file = str(d / "ca.crt")
    proc.origin = origin
    yield proc
    proc.stop()
    origin.stop()


def curl(*args, timeout=30):
    r = subprocess.run(["curl", "-sS", *args], capture_output=True, timeout=timeout)
    assert r.returncode == 0, r.stderr
    return r


def test_prior_knowledge_round_trip(env):
    r = curl("--http2-prior-knowledge", "-H", "Host: example.com", "-w", "\n%{http_version}",
             f"http://127.0.0.1:{env.port}/headers")
    body, version = r.stdout.rsplit(b"\n", 1)
    assert version == b"2"
    assert b'"x-forwarded-proto", "http"' in body and b'"x-request-id"' in body
    assert b'"host", "example.com"' in body


def test_upgrade_h2c_round_trip(env):
    r = curl("-v", "--http2", "-w", "\n%{http_version}", f"http://127.0.0.1:{env.port}/")
    assert b"101 Switching Protocols" in r.stderr
    assert r.stdout.endswith(b"ok from o1\n2")


def test_http1_still_served_on_the_same_port(env):
    r = curl("--http1.1", "-w", "\n%{http_version}", f"http://127.0.0.1:{env.port}/")
    assert r.stdout == b"ok from o1\n1.1"


def test_alpn_h2_over_tls(env):
    r = curl("--http2", "--cacert", env.ca_file, "--resolve",
             f"h2.test:{env.tport}:127.0.0.1", "-w", "\n%{http_version}",
             f"https://h2.test:{env.tport}/headers")
    body, version = r.stdout.rsplit(b"\n", 1)
    assert version == b"2"
    assert b'"x-forwarded-proto", "https"' in body


def test_request_and_response_bodies(env, tmp_path):
    blob = os.urandom(3 * 1024 * 1024)
    f = tmp_path / "blob"
    f.write_bytes(blob)
    out = tmp_path / "out"
    curl("--http2-prior-knowledge", "--data-binary", f"@{f}", "-o", str(out),
         f"http://127.0.0.1:{env.port}/echo")
    assert out.read_bytes() == blob
    r = curl("--http2-prior-knowledge", "-o", "/dev/null", "-w", "%{size_download}",
             f"http://127.0.0.1:{env.port}/bytes?n=20000000")
    assert r.stdout == b"20000000"
    r = curl("--http2-prior-knowledge", f"http://127.0.0.1:{env.port}/chunked?n=5&size=7")
    assert len(r.stdout) == 35


def _h2(port, window=None):
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True,
                                                                header_encoding=None))
    if window is not None:
        conn.local_settings = h2.settings.Settings(client=True, initial_values={
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: window})
    conn.initiate_connection()
    sock.sendall(conn.data_to_send())
    return sock, conn


def _req(path):
    return [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"example.com"),
            (b":path", path)]


def test_multiplexed_streams(env):
    sock, conn = _h2(env.port)
    sids = []
    for i in range(60):
        sid = conn.get_next_available_stream_id()
        conn.send_headers(sid, _req(b"/delay?ms=200" if i % 2 else b"/"), end_stream=True)
        sids.append(sid)
    sock.sendall(conn.data_to_send())
    done, status = set(), {}
    t0 = time.monotonic()
    while len(done) < len(sids) and time.monotonic() - t0 < 20:
        for ev in conn.receive_data(sock.recv(65536)):
            if isinstance(ev, h2.events.ResponseReceived):
                status[ev.stream_id] = dict(ev.headers)[b":status"]
            elif isinstance(ev, h2.events.DataReceived):
                conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            elif isinstance(ev, h2.events.StreamEnded):
                done.add(ev.stream_id)
        sock.sendall(conn.data_to_send())
    sock.close()
    assert done == set(sids) and set(status.values()) == {b"200"}
    # 30 requests of 200 ms each, concurrently on one connection
    assert time.monotonic() - t0 < 5


def _worker_rss_kb(proc) -> int:
    pids = subprocess.run(["pgrep", "-P", str(proc.proc.pid)], capture_output=True,
                          text=True).stdout.split()
    total = 0
    for pid in pids:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total


def test_backpressure_client_window_bounds_proxy_memory(env):
    """A client that never opens its window gets 64 KiB; the 200 MB body stays upstream."""
    rss0 = _worker_rss_kb(env)
    sock, conn = _h2(env.port)
    conn.send_headers(1, _req(b"/bytes?n=200000000"), end_stream=True)
    sock.sendall(conn.data_to_send())
    got = 0
    end = time.monotonic() + 2.0
    sock.settimeout(0.2)
    while time.monotonic() < end:
        try:
            data = sock.recv(65536)
        except socket.timeout:
            continue
        if not data:
            break
        for ev in conn.receive_data(data):
            if isinstance(ev, h2.events.DataReceived):
                got += len(ev.data)  # never acknowledged: no WINDOW_UPDATE
    grew = _worker_rss_kb(env) - rss0
    sock.close()
    assert got <= 65535
    assert grew < 16 * 1024, f"worker grew by {grew} KiB while the client read nothing"


def test_graceful_shutdown_sends_goaway_and_finishes_streams(tmp_path):
    origin = Origin("o2").start()
    port, admin = free_port(), free_port()
    cfg = tmp_path / "dispa.toml"
    cfg.write_text(render_config(port=port, admin_port=admin, targets=[("o2", origin.url)],
                                 extra="[http2]\nenabled = true\n"))
    proc = DispaProcess(cfg, port=port, admin_port=admin).wait_ready()
    try:
        # an idle connection (raw h2 client) and a stream in flight (curl)
        idle, conn = _h2(port)
        busy = subprocess.Popen(["curl", "-sS", "--http2-prior-knowledge",
                                 f"http://127.0.0.1:{port}/delay?ms=1000"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        wait_for(lambda: origin.connections >= 1, what="the request at the origin")
        proc.signal(signal.SIGTERM)
        goaway = None
        t0 = time.monotonic()
        while goaway is None and time.monotonic() - t0 < 10:
            data = idle.recv(65536)
            if not data:
                break
            for ev in conn.receive_data(data):
                if isinstance(ev, h2.events.ConnectionTerminated):
                    goaway = ev.error_code
        idle.close()
        out, err = busy.communicate(timeout=20)
        assert goaway == 0  # GOAWAY NO_ERROR
        assert busy.returncode == 0 and out == b"ok from o2", err
    finally:
        proc.stop()
        origin.stop()


def test_one_listener_detects_tls_h2c_and_http1(env):
    """Protocol detection: a TLS ClientHello on the plain port is handed to the TLS
    handshake (ALPN then picks h2), next to h2c and HTTP/1.1 on the same port."""
    for args, want in ((["--http2"], b"2"), (["--http1.1"], b"1.1")):
        r = curl(*args, "--cacert", env.ca_file, "--resolve",
                 f"h2.test:{env.port}:127.0.0.1", "-w", "\n%{http_version}",
                 f"https://h2.test:{env.port}/")
        assert r.stdout == b"ok from o1\n" + want
    with socket.create_connection(("127.0.0.1", env.port), timeout=5) as s:
        s.sendall(b"\x00\x01garbage that is neither protocol\r\n\r\n")
        assert s.recv(100) == b""  # closed without an answer
