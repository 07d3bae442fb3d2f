"""The worker's TLS accept path in process: TlsAccept + TlsServer on a real loopback
socket with a real ssl client. Covers the handshake driver (no byte lost), the failure
counter, TLS-ALPN-01 challenge certificates (RFC 8737) and a certificate swap."""

from __future__ import annotations

import asyncio
import socket
import ssl
import threading

import pytest
from cryptography import x509

from dispa.observability.metrics import WorkerMetrics
from dispa.tls.config import TlsConfig, compile_tls
from dispa.tls.context import TlsServer
from dispa.tls.handshake import TlsAccept
from dispa.tls.store import CertStore
from tests.support.pki import CA, write_pair


class _Echo(asyncio.Protocol):
    """Stands in for the Session: answers every request with the path it got."""

    tls = None

    def connection_made(self, transport):
        self.t = transport

    def data_received(self, data):
        path = data.split(b" ", 2)[1]
        self.t.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(path), path))


class _Plane:
    def __init__(self, tls):
        self.metrics = WorkerMetrics()
        self.tls = tls
        self.session_factory = _Echo


@pytest.fixture
def served(tmp_path):
    """(port, plane, ca, store, loop) of a TlsAccept server in a thread."""
    ca = CA()
    write_pair(tmp_path, "a", *ca.issue("a.test", dns=["a.test"]))
    cfg = TlsConfig(enabled=True, certificate_dirs=[str(tmp_path)], handshake_timeout=1.0)
    store = CertStore()
    store.configure(cfg, compile_tls(cfg, []))
    store.refresh(force=True)
    plane = _Plane(TlsServer())
    plane.tls.update(store.payload())
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    box = {}

    async def start():
        box["srv"] = await loop.create_server(lambda: TlsAccept(plane), "127.0.0.1", 0)
        box["port"] = box["srv"].sockets[0].getsockname()[1]
        ready.set()

    th = threading.Thread(target=lambda: (loop.run_until_complete(start()), loop.run_forever()),
                          daemon=True)
    th.start()
    assert ready.wait(10)
    yield box["port"], plane, ca, store, loop
    loop.call_soon_threadsafe(loop.stop)
    th.join(10)


def _get(port, ca, sni, path=b"/x", alpn=None, verify=True):
    ctx = ssl.create_default_context()
    ctx.load_verify_locations(cadata=ca.pem.decode()) if verify else None
    if not verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if alpn:
        ctx.set_alpn_protocols(alpn)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s, \
            ctx.wrap_socket(s, server_hostname=sni) as t:
        # the request goes with the client's last handshake flight (TLS 1.3): it must
        # reach the Session even though it arrives before the Session is attached
        t.sendall(b"GET " + path + b" HTTP/1.1\r\nHost: a\r\n\r\n")
        data = b""
        while b"\r\n\r\n" not in data or not data.endswith(path):
            chunk = t.recv(4096)
            if not chunk:
                break
            data += chunk
        return data, t.getpeercert(binary_form=True), t.selected_alpn_protocol()


def test_requests_flow_after_the_handshake(served):
    port, plane, ca, _, _ = served
    for i in range(20):
        data, der, alpn = _get(port, ca, "a.test", b"/r%d" % i, alpn=["http/1.1"])
        assert data.endswith(b"/r%d" % i) and alpn == "http/1.1"
    assert plane.metrics.export()  # counters exported like the others


def test_tls_alpn_01_challenge_certificate(served):
    from dispa.tls.acme.challenges import tls_alpn01_certificate
    port, plane, ca, store, loop = served
    cert_pem, key_pem = tls_alpn01_certificate("new.test", "token.thumb")
    done = threading.Event()
    loop.call_soon_threadsafe(lambda: (plane.tls.update(
        store.payload(), {"tls_alpn01": {"new.test": [cert_pem, key_pem]}}), done.set()))
    assert done.wait(5)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["acme-tls/1"])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s, \
            ctx.wrap_socket(s, server_hostname="new.test") as t:
        assert t.selected_alpn_protocol() == "acme-tls/1"
        cert = x509.load_der_x509_certificate(t.getpeercert(binary_form=True))
    assert cert.extensions.get_extension_for_oid(
        x509.ObjectIdentifier("1.3.6.1.5.5.7.1.31")).critical
    # other names still get their certificate
    assert _get(port, ca, "a.test")[0].endswith(b"/x")


def test_garbage_is_counted_and_closed(served):
    port, plane, _, _, _ = served
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"\x16\x03\x01\x00\x05hello-this-is-not-tls" * 4)
        s.settimeout(5)
        try:
            while s.recv(4096):
                pass
        except ConnectionResetError:
            pass
    import time
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        errors = [c for c in plane.metrics.export().get("counters", [])
                  if "dispa_tls_handshake_errors_total" in str(c)]
        if errors:
            break
        time.sleep(0.05)
    assert errors
