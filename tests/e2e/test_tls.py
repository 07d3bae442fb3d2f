"""TLS end to end: a real dispa-server with a TLS listener, real clients (Python ssl, curl,
openssl s_client), real origins on 127.0.0.1 (plain and TLS).

Covers SNI (exact, wildcard, default), hot rotation under a bounded load, a bad replacement
refused, mTLS (good, revoked by CRL, untrusted, missing), session resumption across
workers, bad input on the TLS port, and upstream TLS with verification and a client
certificate.
"""

from __future__ import annotations

import os
import re
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

from tests.support.dispa_proc import (
    DispaProcess, free_port, read_one_response, render_config, wait_for,
)
from tests.support.origin import Origin
from tests.support.pki import CA, cert_pem, fingerprint, key_pem, write_pair


def _cn(der: bytes) -> str:
    cert = x509.load_der_x509_certificate(der)
    return cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value


class Env:
    """The PKI and the running proxy shared by the tests of this module."""


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp("tls")
    e = Env()
    e.dir = d
    e.ca = CA()
    (d / "ca.crt").write_bytes(e.ca.pem)
    e.ca_file = str(d / "ca.crt")
    certs = d / "certs"
    write_pair(certs, "default", *e.ca.issue("default.test", dns=["default.test"]))
    write_pair(certs, "exact", *e.ca.issue("exact.test", dns=["exact.test"]))
    write_pair(certs, "wild", *e.ca.issue("wildcard", dns=["*.wild.test"]))
    e.rot_cert, e.rot_key = write_pair(certs, "rot", *e.ca.issue("rot-v1", dns=["rot.test"]))
    write_pair(certs, "mtls", *e.ca.issue("m.test", dns=["m.test"]))
    # client PKI: a CA, a good client, a revoked one, one from an unknown CA
    e.cca = CA("client CA")
    (d / "cca.crt").write_bytes(e.cca.pem)
    good, good_key = e.cca.issue("alice", client=True, dns=["alice.example"])
    bad, bad_key = e.cca.issue("mallory", client=True)
    e.good = write_pair(d, "good", good, good_key)
    e.good_fp = fingerprint(good)
    e.revoked = write_pair(d, "revoked", bad, bad_key)
    (d / "crl.pem").write_bytes(e.cca.crl([bad]))
    e.untrusted = write_pair(d, "untrusted", *CA("other").issue("eve", client=True))
    e.origin = Origin().start()
    e.port, e.tport, e.admin = free_port(), free_port(), free_port()
    extra = f'''
[tls]
enabled = true
bind_address = "127.0.0.1:{e.tport}"
certificate_dirs = ["{certs}"]
default_certificate = "default.test"
handshake_timeout = 1.5
reload_interval = 0.2
expiry_warning_days = 30

[[plugins.plugins]]
name = "tls-echo"
type = "tests.support.tls_filters:TlsEcho"

[[tls.sni]]
names = ["m.test"]
[tls.sni.client_auth]
mode = "required"
ca_file = "{d}/cca.crt"
crl_file = "{d}/crl.pem"
'''
    cfg = d / "dispa.toml"
    cfg.write_text(render_config(port=e.port, admin_port=e.admin, targets=[("o", e.origin.url)],
                                 workers=2, extra=extra))
    e.proc = DispaProcess(cfg, port=e.port, admin_port=e.admin).wait_ready(workers=2)
    yield e
    e.proc.stop()
    e.origin.stop()


def _client_ctx(env, *, verify=True, cert=None):
    ctx = ssl.create_default_context(cafile=env.ca_file)
    if not verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if cert is not None:
        ctx.load_cert_chain(*cert)
    return ctx


def served_cn(env, sni: str | None, *, verify=True) -> str:
    ctx = _client_ctx(env, verify=verify and sni is not None)
    with socket.create_connection(("127.0.0.1", env.tport), timeout=5) as s, \
            ctx.wrap_socket(s, server_hostname=sni) as t:
        return _cn(t.getpeercert(binary_form=True))


def https_get(env, sni: str, path: str = "/", *, cert=None, headers: dict | None = None):
    """(status, head, body) of one request over a new TLS connection."""
    ctx = _client_ctx(env, cert=cert)
    with socket.create_connection(("127.0.0.1", env.tport), timeout=5) as s, \
            ctx.wrap_socket(s, server_hostname=sni) as t:
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        t.sendall(f"GET {path} HTTP/1.1\r\nHost: {sni}\r\n{extra}Connection: close\r\n\r\n"
                  .encode())
        return read_one_response(t)


def metric(env, metric_name: str, **labels) -> float:
    code, body = env.proc.admin_get("/metrics")
    total = 0.0
    for line in body.decode().splitlines():
        if line.startswith(metric_name + "{") or line.startswith(metric_name + " "):
            if all(f'{k}="{v}"' in line for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
    return total


def origin_headers(env, path: str) -> dict:
    for method, target, headers, _ in reversed(env.origin.requests):
        if target == path.encode():
            return {k.decode().lower(): v.decode() for k, v in headers}
    raise AssertionError(f"origin never saw {path}")


# ------------------------------------------------------------------------------ SNI

def test_sni_picks_exact_wildcard_and_default(env):
    assert served_cn(env, "exact.test") == "exact.test"
    assert served_cn(env, "a.wild.test") == "wildcard"
    assert served_cn(env, "B.Wild.Test") == "wildcard"
    assert served_cn(env, "unknown.test", verify=False) == "default.test"
    assert served_cn(env, None) == "default.test"
    # a wildcard covers one label only
    assert served_cn(env, "x.y.wild.test", verify=False) == "default.test"


def test_proxied_over_tls_with_forwarding_headers(env):
    status, _, body = https_get(env, "exact.test", "/over-tls",
                                headers={"X-Client-Cert": "forged", "X-Forwarded-Proto": "http"})
    assert status == 200 and body.startswith(b"ok")
    h = origin_headers(env, "/over-tls")
    assert h["x-forwarded-proto"] == "https"
    assert "x-client-cert" not in h  # stripped: no client certificate on this connection
    assert "proto=https" in h["forwarded"]


def test_client_cert_header_is_stripped_on_the_plain_listener(env):
    with socket.create_connection(("127.0.0.1", env.port), timeout=5) as s:
        s.sendall(b"GET /plain-forged HTTP/1.1\r\nHost: x\r\nX-Client-Cert: Hash=00\r\n"
                  b"Connection: close\r\n\r\n")
        assert read_one_response(s)[0] == 200
    h = origin_headers(env, "/plain-forged")
    assert "x-client-cert" not in h and h["x-forwarded-proto"] == "http"


def test_curl_and_openssl_clients(env):
    out = subprocess.run(
        ["curl", "-sS", "--cacert", env.ca_file, "--resolve", f"exact.test:{env.tport}:127.0.0.1",
         "-w", "%{http_code} %{http_version}", "-o", "/dev/null",
         f"https://exact.test:{env.tport}/curl"], capture_output=True, text=True, timeout=20)
    assert out.stdout == "200 1.1", out.stderr
    s = subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{env.tport}",
                        "-servername", "a.wild.test", "-alpn", "h2,http/1.1", "-tls1_2"],
                       input="", capture_output=True, text=True, timeout=20)
    assert "CN = wildcard" in s.stdout or "CN=wildcard" in s.stdout, s.stdout[-2000:]
    assert "ALPN protocol: http/1.1" in s.stdout
    assert "Protocol  : TLSv1.2" in s.stdout or "TLSv1.2" in s.stdout


# ------------------------------------------------------------------------------ rotation

class _Load:
    """Bounded load over TLS: each thread makes new connections (one request each) until
    ``stop`` is set, at most ``n`` of them and for at most 60 s."""

    def __init__(self, env, threads=3, n=2000, sni="rot.test"):
        self.env, self.n, self.sni = env, n, sni
        self.stop = threading.Event()
        self.ok = 0
        self.failures: list[str] = []
        self.cns: list[str] = []
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def _run(self):
        ctx = _client_ctx(self.env)
        deadline = time.monotonic() + 60
        for _ in range(self.n):
            if time.monotonic() > deadline or self.stop.is_set():
                break
            try:
                with socket.create_connection(("127.0.0.1", self.env.tport), timeout=5) as s, \
                        ctx.wrap_socket(s, server_hostname=self.sni) as t:
                    cn = _cn(t.getpeercert(binary_form=True))
                    t.sendall(b"GET /load HTTP/1.1\r\nHost: rot.test\r\nConnection: close\r\n\r\n")
                    status = read_one_response(t)[0]
                with self.lock:
                    if status == 200:
                        self.ok += 1
                        self.cns.append(cn)
                    else:
                        self.failures.append(f"status {status}")
            except Exception as exc:  # noqa: BLE001 - every failure counts
                with self.lock:
                    self.failures.append(repr(exc))

    def start(self):
        for t in self.threads:
            t.start()
        return self

    def join(self):
        for t in self.threads:
            t.join(90)


def _replace(path: str, data: bytes) -> None:
    tmp = path + ".tmp"
    Path(tmp).write_bytes(data)
    os.replace(tmp, path)  # atomic: a reader sees the old or the new file


def test_rotation_under_load_drops_nothing(env):
    assert served_cn(env, "rot.test") == "rot-v1"
    load = _Load(env).start()
    wait_for(lambda: load.ok >= 30, 30, "load to start")
    cert, key = env.ca.issue("rot-v2", dns=["rot.test"])
    # the key first, then the certificate: in between the pair does not match and is
    # refused, and v1 keeps serving
    _replace(env.rot_key, key_pem(key))
    _replace(env.rot_cert, cert_pem(cert))
    wait_for(lambda: served_cn(env, "rot.test") == "rot-v2", 20, "the new certificate")
    wait_for(lambda: load.cns.count("rot-v2") >= 30 or load.failures, 30,
             "requests on the new certificate")
    load.stop.set()
    load.join()
    assert load.failures == []
    assert load.cns.count("rot-v1") >= 30 and load.cns.count("rot-v2") >= 30
    # once every worker switched, every new connection gets the new certificate
    assert set(load.cns[-20:]) == {"rot-v2"}
    # the previous version is kept for rollback
    status = env.proc.status()["tls"]
    rot = [c for c in status["certificates"] if c["cert_file"].endswith("rot.crt")][0]
    assert rot["previous_id"] and rot["previous_id"] != rot["id"]


def _admin_post(env, path: str, body: bytes) -> tuple[int, dict]:
    import json
    import urllib.error
    import urllib.request
    req = urllib.request.Request(f"http://127.0.0.1:{env.admin}{path}", data=body,
                                 method="POST", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_admin_rollback_serves_the_previous_certificate(env):
    """POST /admin/tls/rollback swaps in the previous version on every worker without a
    restart; it holds through a SIGHUP; a second rollback undoes the first."""
    import json
    import signal
    rot = [c for c in env.proc.status()["tls"]["certificates"]
           if c["cert_file"].endswith("rot.crt")][0]
    assert rot["previous_id"]  # test_rotation_under_load_drops_nothing made one
    before = served_cn(env, "rot.test")
    code, body = _admin_post(env, "/admin/tls/rollback",
                             json.dumps({"cert_file": env.rot_cert}).encode())
    assert code == 200 and body["id"] == rot["previous_id"] and body["applied"], body
    old_cn = served_cn(env, "rot.test")
    assert old_cn != before
    for _ in range(6):  # every worker serves it (new connections spread over both)
        assert served_cn(env, "rot.test") == old_cn
    reloads = env.proc.status()["reloads"]["ok"]
    env.proc.signal(signal.SIGHUP)  # a forced re-read of unchanged files keeps it
    wait_for(lambda: env.proc.status()["reloads"]["ok"] > reloads, 20, "the reload")
    assert any(c["rolled_back"] for c in env.proc.status()["tls"]["certificates"])
    assert served_cn(env, "rot.test") == old_cn
    code, body = _admin_post(env, "/admin/tls/rollback",
                             json.dumps({"cert_file": env.rot_cert}).encode())
    assert code == 200 and body["id"] == rot["id"]
    assert served_cn(env, "rot.test") == before
    assert _admin_post(env, "/admin/tls/rollback", b"{}")[0] == 400
    assert _admin_post(env, "/admin/tls/rollback", b'{"cert_file": "/nope.crt"}')[0] == 404
    code, body = _admin_post(env, "/admin/tls/rollback", json.dumps(
        {"cert_file": [c for c in env.proc.status()["tls"]["certificates"]
                       if c["cert_file"].endswith("exact.crt")][0]["cert_file"]}).encode())
    assert code == 409 and "no previous version" in body["error"]


def test_bad_replacement_is_refused_and_the_old_one_keeps_serving(env):
    before = served_cn(env, "rot.test")
    other_key = env.ca.issue("x")[1]
    _replace(env.rot_key, key_pem(other_key))  # does not match the certificate
    try:
        wait_for(lambda: any("does not match" in (c.get("error") or "")
                             for c in env.proc.status()["tls"]["certificates"]), 20,
                 "the refusal in /admin/status")
        assert served_cn(env, "rot.test") == before
        assert https_get(env, "rot.test")[0] == 200
        assert "does not match the certificate" in env.proc.log()
    finally:
        cert, key = env.ca.issue(before, dns=["rot.test"])
        _replace(env.rot_key, key_pem(key))
        _replace(env.rot_cert, cert_pem(cert))
    wait_for(lambda: not env.proc.status()["tls"]["errors"], 20, "the error to clear")


# ------------------------------------------------------------------------------ mTLS

def test_mtls_accepts_a_good_client_and_forwards_its_certificate(env):
    status, _, _ = https_get(env, "m.test", "/mtls-good", cert=env.good)
    assert status == 200
    h = origin_headers(env, "/mtls-good")
    assert h["x-client-cert"].startswith(f"Hash={env.good_fp};")
    assert 'Subject="CN=alice"' in h["x-client-cert"] and "DNS=alice.example" in h["x-client-cert"]


def test_filters_see_the_scheme_and_the_client_certificate(env):
    import json
    status, _, body = https_get(env, "m.test", "/tls-info", cert=env.good)
    assert status == 200
    info = json.loads(body)
    assert info["scheme"] == "https"
    tls = info["tls"]
    assert tls["sni"] == "m.test" and tls["version"] == "TLSv1.3" and tls["alpn"] == ""
    cc = tls["client_cert"]
    assert cc["subject"] == "CN=alice" and cc["fingerprint_sha256"] == env.good_fp
    assert cc["sans"] == ["DNS:alice.example"]
    with socket.create_connection(("127.0.0.1", env.port), timeout=5) as s:
        s.sendall(b"GET /tls-info HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        _, _, plain = read_one_response(s)
    assert json.loads(plain) == {"scheme": "http", "tls": None}


@pytest.mark.parametrize("who,reason", [("revoked", "client_cert_revoked"),
                                        ("untrusted", "client_cert_untrusted"),
                                        ("none", "client_cert_missing")])
def test_mtls_rejects(env, who, reason):
    cert = {"revoked": env.revoked, "untrusted": env.untrusted, "none": None}[who]
    before = metric(env, "dispa_tls_handshake_errors_total", reason=reason)
    with pytest.raises((ssl.SSLError, ConnectionError)):
        # TLS 1.3: the server's verdict on the client certificate arrives after the
        # client's side of the handshake, so it shows on the first read
        https_get(env, "m.test", "/mtls-bad", cert=cert)
    wait_for(lambda: metric(env, "dispa_tls_handshake_errors_total", reason=reason) > before,
             10, f"the {reason} counter")


def test_names_without_client_auth_do_not_ask_for_a_certificate(env):
    assert https_get(env, "exact.test", "/no-mtls")[0] == 200


# ------------------------------------------------------------------------------ resumption

def test_session_tickets_resume_across_workers(env):
    sess = env.dir / "sess.pem"
    first = subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{env.tport}",
                            "-servername", "exact.test", "-tls1_2", "-sess_out", str(sess)],
                           input="", capture_output=True, text=True, timeout=20)
    assert "New," in first.stdout
    reused = 0
    for _ in range(8):  # SO_REUSEPORT spreads these over both workers (new source ports)
        r = subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{env.tport}",
                            "-servername", "exact.test", "-tls1_2", "-sess_in", str(sess)],
                           input="", capture_output=True, text=True, timeout=20)
        reused += "Reused," in r.stdout
    assert reused == 8


# ------------------------------------------------------------------------------ bad input

def _closed_within(sock: socket.socket, seconds: float) -> bool:
    sock.settimeout(seconds)
    try:
        while sock.recv(4096):
            pass
        return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except socket.timeout:
        return False


@pytest.mark.parametrize("payload,reason", [
    (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "http_on_tls_port"),
    (os.urandom(64).replace(b"\x16", b"\x17"), "bad_client_hello"),
    (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 20, "timeout"),  # truncated
    (b"", "timeout"),  # says nothing
])
def test_bad_input_fails_cleanly(env, payload, reason):
    pids = {w["pid"] for w in env.proc.status()["workers"]}
    before = metric(env, "dispa_tls_handshake_errors_total", reason=reason)
    t0 = time.monotonic()
    with socket.create_connection(("127.0.0.1", env.tport), timeout=5) as s:
        if payload:
            s.sendall(payload)
        assert _closed_within(s, 5)
    assert time.monotonic() - t0 < 4  # handshake_timeout is 1.5 s
    wait_for(lambda: metric(env, "dispa_tls_handshake_errors_total", reason=reason) > before,
             10, f"the {reason} counter")
    assert {w["pid"] for w in env.proc.status()["workers"]} == pids
    assert https_get(env, "exact.test")[0] == 200


def test_expiry_gauge_and_handshake_counter(env):
    assert metric(env, "dispa_tls_certificate_expiry_seconds", name="exact.test") > 80 * 86400
    assert re.search(r'dispa_tls_handshakes_total\{version="TLSv1\.[23]"\}',
                     env.proc.admin_get("/metrics")[1].decode())


def test_private_keys_are_not_exposed_by_the_admin_api(env):
    key_body = "".join(Path(env.rot_key).read_text().splitlines()[1:-1])[:40]
    for path in ("/admin/config", "/admin/status", "/metrics", "/metrics/json"):
        code, body = env.proc.admin_get(path)
        assert code == 200
        assert b"PRIVATE KEY" not in body and key_body.encode() not in body, path
    assert key_body not in env.proc.log() and "PRIVATE KEY" not in env.proc.log()


# ------------------------------------------------------------------------------ upstream TLS

class TlsOrigin(Origin):
    """The test origin behind TLS, asking for a client certificate."""

    def __init__(self, ctx: ssl.SSLContext):
        super().__init__("tls-origin")
        self.ctx = ctx

    async def _start(self):
        import asyncio
        self._server = await asyncio.start_server(self._handle, self.host, self.port,
                                                  ssl=self.ctx, reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]


def test_upstream_tls_with_verification_and_client_certificate(tmp_path):
    ca = CA("upstream CA")
    (tmp_path / "ca.crt").write_bytes(ca.pem)
    srv = write_pair(tmp_path, "origin", *ca.issue("origin.internal", dns=["origin.internal"]))
    client = write_pair(tmp_path, "client", *ca.issue("dispa", client=True))
    sctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    sctx.load_cert_chain(*srv)
    sctx.load_verify_locations(str(tmp_path / "ca.crt"))
    sctx.verify_mode = ssl.CERT_REQUIRED
    origin = TlsOrigin(sctx).start()
    port, admin = free_port(), free_port()
    extra = f'''
[tls.upstream]
ca_file = "{tmp_path}/ca.crt"
server_name = "origin.internal"
cert_file = "{client[0]}"
key_file = "{client[1]}"
'''
    cfg = tmp_path / "d.toml"
    cfg.write_text(render_config(port=port, admin_port=admin,
                                 targets=[("o", f"https://127.0.0.1:{origin.port}")],
                                 health={"enabled": True, "interval": 0.3, "timeout": 0.3,
                                         "path": "/health"}, extra=extra))
    proc = DispaProcess(cfg, port=port, admin_port=admin).wait_ready()
    try:
        # the master's health checks speak TLS to the https:// endpoint too
        wait_for(lambda: origin.targets().count(b"/health") >= 3, 20, "TLS health probes")
        assert all(h.get("healthy", True) for h in proc.status()["health"].values())
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(b"GET /via-tls HTTP/1.1\r\nHost: x\r\n\r\n")
            status, _, body = read_one_response(s)
        assert status == 200 and body == b"ok from tls-origin"
        assert b"/via-tls" in origin.targets()
        # [targets.tls] overrides [tls.upstream] for this cluster: a wrong expected name
        # fails verification: 502, nothing reaches the origin
        base = cfg.read_text()
        cfg.write_text(base + extra.replace("[tls.upstream]", "[targets.tls]").replace(
            'server_name = "origin.internal"', 'server_name = "other.internal"'))
        wait_for(lambda: proc.status()["reloads"]["ok"] >= 1, 20, "the reload")
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(b"GET /wrong-name HTTP/1.1\r\nHost: x\r\n\r\n")
            status, _, _ = read_one_response(s)
        assert status == 502
        assert b"/wrong-name" not in origin.targets()
        # the cluster's table with the right name: served again
        cfg.write_text(base + extra.replace("[tls.upstream]", "[targets.tls]"))
        wait_for(lambda: proc.status()["reloads"]["ok"] >= 2, 20, "the second reload")
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(b"GET /group-tls HTTP/1.1\r\nHost: x\r\n\r\n")
            assert read_one_response(s)[0] == 200
    finally:
        proc.stop()
        origin.stop()


# ------------------------------------------------------------------------------ OCSP

def test_ocsp_stapling_from_the_responder(tmp_path):
    from tests.support.pki import ocsp_index
    ca = CA("OCSP CA")
    (tmp_path / "ca.crt").write_bytes(ca.pem)
    (tmp_path / "ca.key").write_bytes(key_pem(ca.key))
    rport = free_port()
    leaf, leaf_key = ca.issue("ocsp.test", dns=["ocsp.test"],
                              ocsp_url=f"http://127.0.0.1:{rport}")
    write_pair(tmp_path / "certs", "site", leaf, leaf_key, chain=[ca.cert])
    (tmp_path / "index.txt").write_text(ocsp_index([leaf]))
    responder = subprocess.Popen(
        ["openssl", "ocsp", "-index", str(tmp_path / "index.txt"), "-port", str(rport),
         "-rsigner", str(tmp_path / "ca.crt"), "-rkey", str(tmp_path / "ca.key"),
         "-CA", str(tmp_path / "ca.crt"), "-nmin", "10", "-ignore_err"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    port, tport, admin = free_port(), free_port(), free_port()
    extra = f'''
[tls]
enabled = true
bind_address = "127.0.0.1:{tport}"
certificate_dirs = ["{tmp_path}/certs"]
ocsp_stapling = true
reload_interval = 0.2
'''
    cfg = tmp_path / "d.toml"
    cfg.write_text(render_config(port=port, admin_port=admin, targets=[("o", "http://127.0.0.1:9")],
                                 extra=extra))
    proc = DispaProcess(cfg, port=port, admin_port=admin).wait_ready()

    def stapled():
        r = subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{tport}",
                            "-servername", "ocsp.test", "-status"],
                           input="", capture_output=True, text=True, timeout=20)
        return "OCSP Response Status: successful" in r.stdout and \
            "Cert Status: good" in r.stdout and r.stdout
    try:
        wait_for(stapled, 30, "a stapled OCSP response")
        assert proc.status()["tls"]["certificates"][0]["ocsp_stapled"]
    finally:
        proc.stop()
        responder.terminate()
        responder.wait(10)
