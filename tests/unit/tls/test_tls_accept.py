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
from tests.support.dispa_proc import wait_for
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


@pytest.fixture(params=["uvloop", "asyncio"])
def served(tmp_path, request):
    """(port, plane, ca, store, loop) of a TlsAccept server in a thread, on uvloop (what
    workers run) and on asyncio's loop (whose SSLProtocol differs)."""
    ca = CA()
    write_pair(tmp_path, "a", *ca.issue("a.test", dns=["a.test"]))
    cfg = TlsConfig(enabled=True, certificate_dirs=[str(tmp_path)], handshake_timeout=1.0)
    store = CertStore()
    store.configure(cfg, compile_tls(cfg, []))
    store.refresh(force=True)
    plane = _Plane(TlsServer())
    plane.tls.update(store.payload())
    if request.param == "uvloop":
        import uvloop
        loop = uvloop.new_event_loop()
    else:
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
    loop.close()


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
    handshakes = sum(v for k, v in list(plane.metrics._counters.items())
                     if k[0] == "dispa_tls_handshakes_total")
    assert handshakes == 20 and _errors(plane) == {}


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
    wait_for(lambda: _errors(plane), 5, "the handshake error counter")
    assert set(_errors(plane)) == {"bad_client_hello"}


def _errors(plane) -> dict:
    """{reason: count} of dispa_tls_handshake_errors_total."""
    out = {}
    for key, value in list(plane.metrics._counters.items()):
        if key[0] == "dispa_tls_handshake_errors_total":
            out[dict(key[1])["reason"]] = value
    return out


def _apply(loop, plane, payload):
    done = threading.Event()
    loop.call_soon_threadsafe(lambda: (plane.tls.update(payload), done.set()))
    assert done.wait(5)


def test_strict_sni_refuses_unknown_names_with_its_own_label(served, tmp_path):
    port, plane, ca, store, loop = served
    cfg = TlsConfig(enabled=True, certificate_dirs=[str(tmp_path)], strict_sni=True)
    store.configure(cfg, compile_tls(cfg, []))
    store.refresh(force=True)
    _apply(loop, plane, store.payload())
    # (the alert itself may not reach the client: the loop's SSL protocol drops the
    # connection on a handshake error; what matters is the refusal and its label)
    with pytest.raises((ssl.SSLError, ConnectionError)):
        _get(port, ca, "unknown.test", verify=False)
    wait_for(lambda: _errors(plane).get("unknown_sni") == 1, 5, "the unknown_sni label")
    assert _get(port, ca, "a.test")[0].endswith(b"/x")  # known names are served
    assert set(_errors(plane)) == {"unknown_sni"}


def _resume(port, ctx, session=None):
    """(reused, session) of one request over a new connection offering ``session``."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s, \
            ctx.wrap_socket(s, server_hostname="a.test", session=session) as t:
        t.sendall(b"GET /t HTTP/1.1\r\nHost: a\r\n\r\n")
        data = b""
        while not data.endswith(b"/t"):  # reading also takes the TLS 1.3 tickets in
            chunk = t.recv(4096)
            assert chunk, data
            data += chunk
        return t.session_reused, t.session


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_tickets_of_the_previous_key_still_resume(served, version):
    """After one rotation a ticket made with the previous key resumes (and is renewed
    under the current key); after two it is unknown and the handshake is a full one."""
    from dispa.tls import tickets
    port, plane, ca, store, loop = served

    def rotate():
        store.rotate_ticket_keys(force=True)
        _apply(loop, plane, store.payload())

    ctx = ssl.create_default_context()
    ctx.load_verify_locations(cadata=ca.pem.decode())
    ctx.minimum_version = ctx.maximum_version = version
    rotate()
    assert plane.tls.ticket_mode == "callback"
    reused, first = _resume(port, ctx)
    assert not reused and first.has_ticket
    assert _resume(port, ctx, first)[0]  # same key: resumes
    rotate()
    before = tickets.stats["decrypted_previous"]
    reused, renewed = _resume(port, ctx, first)
    assert reused and tickets.stats["decrypted_previous"] == before + 1
    rotate()
    assert not _resume(port, ctx, first)[0]  # two rotations ago: unknown
    assert _resume(port, ctx, renewed)[0]  # the renewed ticket: previous key now


def _get_version(port, ca, sni, version):
    ctx = ssl.create_default_context(cadata=ca.pem.decode())
    ctx.minimum_version = ctx.maximum_version = version
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s, \
            ctx.wrap_socket(s, server_hostname=sni) as t:
        t.sendall(b"GET /v HTTP/1.1\r\nHost: a\r\n\r\n")
        data = b""
        while not data.endswith(b"/v"):
            chunk = t.recv(4096)
            if not chunk:
                break
            data += chunk
        return data


def test_per_name_versions_are_enforced_after_the_handshake(served, tmp_path):
    """[[tls.sni]] min_version = "1.3" for one name: TLS 1.2 to that name is closed before
    any request is read and counted; TLS 1.3 to it, and TLS 1.2 to other names, are served."""
    from dispa.tls.config import SniConfig
    port, plane, ca, store, loop = served
    write_pair(tmp_path, "b", *ca.issue("b.test", dns=["b.test"]))
    cfg = TlsConfig(enabled=True, certificate_dirs=[str(tmp_path)],
                    sni=[SniConfig(names=["b.test"], min_version="1.3")])
    store.configure(cfg, compile_tls(cfg, []))
    store.refresh(force=True)
    _apply(loop, plane, store.payload())
    assert _get_version(port, ca, "a.test", ssl.TLSVersion.TLSv1_2).endswith(b"/v")
    assert _get_version(port, ca, "b.test", ssl.TLSVersion.TLSv1_3).endswith(b"/v")
    try:
        got = _get_version(port, ca, "b.test", ssl.TLSVersion.TLSv1_2)
    except (ssl.SSLError, ConnectionError):
        got = b""
    assert not got.endswith(b"/v")
    wait_for(lambda: _errors(plane).get("version_not_allowed_for_name") == 1, 5,
             "the version_not_allowed_for_name label")


def test_per_name_versions_must_narrow_the_listener(tmp_path):
    from dispa.tls.config import SniConfig, check_tls
    issues = []
    check_tls(TlsConfig(enabled=False, max_version="1.2",
                        sni=[SniConfig(names=["b.test"], min_version="1.3")]),
              lambda msg, path: issues.append((msg, path)), None)
    assert any(p == ("tls", "sni", 0, "min_version") for _, p in issues), issues
