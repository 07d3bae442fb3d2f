"""Client-certificate OCSP (mTLS ``client_ocsp``) end to end: a real dispa-server, a real
``openssl ocsp`` responder on loopback (behind a counting TCP relay, so the test knows how
many queries reached it), real Python ``ssl`` clients.

Names served with different ``[[tls.sni]] client_auth`` settings:
soft.test / hard.test ask the responder in the client certificate's AIA; softdown.test /
harddown.test use ``client_ocsp_url`` pointing at a closed port (responder down).
"""

from __future__ import annotations

import datetime
import socket
import ssl
import subprocess
import threading
import time

import pytest

from tests.support.dispa_proc import (
    DispaProcess, free_port, read_one_response, render_config, wait_for,
)
from tests.support.origin import Origin
from tests.support.pki import CA, key_pem, write_pair


class _Relay:
    """A TCP relay 127.0.0.1:port -> 127.0.0.1:target that counts connections."""

    def __init__(self, target: int):
        self.target = target
        self.count = 0
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self.closed:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            self.count += 1
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    def _serve(self, c):
        try:
            u = socket.create_connection(("127.0.0.1", self.target), timeout=10)
        except OSError:
            c.close()
            return
        c.settimeout(10)
        u.settimeout(10)

        def pipe(a, b):
            try:
                while True:
                    data = a.recv(65536)
                    if not data:
                        break
                    b.sendall(data)
            except OSError:
                pass
            finally:
                for s in (a, b):
                    try:
                        s.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass

        t = threading.Thread(target=pipe, args=(u, c), daemon=True)
        t.start()
        pipe(c, u)
        t.join(10)
        c.close()
        u.close()

    def stop(self):
        self.closed = True
        self.sock.close()


def _index(entries) -> str:
    """An ``openssl ocsp`` index: (cert, revoked) pairs."""
    lines = []
    for cert, revoked in entries:
        serial = format(cert.serial_number, "X")
        serial = ("0" + serial) if len(serial) % 2 else serial
        expiry = cert.not_valid_after_utc.strftime("%y%m%d%H%M%SZ")
        when = (datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(hours=1)) \
            .strftime("%y%m%d%H%M%SZ") if revoked else ""
        lines.append(f"{'R' if revoked else 'V'}\t{expiry}\t{when}\t{serial}\tunknown\t"
                     f"/CN={serial}\n")
    return "".join(lines)


class Env:
    """The PKI, the responder and the running proxy."""


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp("cocsp")
    e = Env()
    server_ca = CA("server CA")
    (d / "ca.crt").write_bytes(server_ca.pem)
    e.ca_file = str(d / "ca.crt")
    names = ["soft.test", "hard.test", "softdown.test", "harddown.test", "slow.test"]
    write_pair(d / "certs", "site", *server_ca.issue("site", dns=names))
    cca = CA("client OCSP CA")
    (d / "cca.crt").write_bytes(cca.pem)
    (d / "cca.key").write_bytes(key_pem(cca.key))
    rport = free_port()
    e.relay = _Relay(rport)
    url = f"http://127.0.0.1:{e.relay.port}/ocsp"
    certs = {}
    for cn in ("alice", "mallory", "carol", "dave", "erin"):
        certs[cn] = cca.issue(cn, client=True, ocsp_url=url)
        e.__dict__[cn] = write_pair(d, cn, *certs[cn])
    (d / "index.txt").write_text(_index([(certs["alice"][0], False), (certs["carol"][0], False),
                                         (certs["dave"][0], False),
                                         (certs["mallory"][0], True)]))
    e.responder_log = open(d / "responder.log", "wb")
    e.responder = subprocess.Popen(
        ["openssl", "ocsp", "-index", str(d / "index.txt"), "-port", str(rport),
         "-rsigner", str(d / "cca.crt"), "-rkey", str(d / "cca.key"),
         "-CA", str(d / "cca.crt"), "-nmin", "10", "-ignore_err"],
        stdout=subprocess.DEVNULL, stderr=e.responder_log)
    dead = free_port()  # nothing listens there: the responder is "down"
    e.hang = socket.create_server(("127.0.0.1", 0))  # a responder that never answers

    def sni(name, mode, extra="", timeout=2.0):
        return f'''
[[tls.sni]]
names = ["{name}"]
[tls.sni.client_auth]
mode = "required"
ca_file = "{d}/cca.crt"
client_ocsp = "{mode}"
client_ocsp_timeout = {timeout}
{extra}
'''
    down = f'client_ocsp_url = "http://127.0.0.1:{dead}/"'
    extra = f'''
[tls]
enabled = true
bind_address = "127.0.0.1:{{tport}}"
certificate_dirs = ["{d}/certs"]
''' + sni("soft.test", "soft") + sni("hard.test", "hard") + \
        sni("softdown.test", "soft", down) + sni("harddown.test", "hard", down) + \
        sni("slow.test", "soft",
            f'client_ocsp_url = "http://127.0.0.1:{e.hang.getsockname()[1]}/"', timeout=4.0)
    e.origin = Origin().start()
    e.port, e.tport, e.admin = free_port(), free_port(), free_port()
    cfg = d / "dispa.toml"
    cfg.write_text(render_config(port=e.port, admin_port=e.admin,
                                 targets=[("o", e.origin.url)], workers=1,
                                 extra=extra.replace("{tport}", str(e.tport))))
    # ready once it says so (a probe connection would stall the one-at-a-time responder)
    wait_for(lambda: b"waiting for OCSP client" in (d / "responder.log").read_bytes(), 15,
             "openssl ocsp listening")
    e.proc = DispaProcess(cfg, port=e.port, admin_port=e.admin).wait_ready(workers=1)
    yield e
    e.proc.stop()
    e.origin.stop()
    e.responder.terminate()
    e.responder.wait(10)
    e.responder_log.close()
    e.relay.stop()
    e.hang.close()


def request(env, sni: str, cert) -> int | None:
    """The status of one request with client certificate ``cert``; None when the proxy
    closed the connection instead of answering."""
    ctx = ssl.create_default_context(cafile=env.ca_file)
    ctx.load_cert_chain(*cert)
    try:
        with socket.create_connection(("127.0.0.1", env.tport), timeout=10) as s, \
                ctx.wrap_socket(s, server_hostname=sni) as t:
            t.sendall(f"GET /{sni} HTTP/1.1\r\nHost: {sni}\r\nConnection: close\r\n\r\n"
                      .encode())
            return read_one_response(t)[0]
    except (OSError, ValueError, ssl.SSLError):
        return None


def metric(env, name: str, **labels) -> float:
    _, body = env.proc.admin_get("/metrics")
    total = 0.0
    for line in body.decode().splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def errors(env, reason: str) -> float:
    return metric(env, "dispa_tls_handshake_errors_total", reason=reason)


def test_good_client_is_accepted(env):
    before = metric(env, "dispa_tls_client_ocsp_total", result="good")
    assert request(env, "soft.test", env.alice) == 200
    assert request(env, "hard.test", env.alice) == 200
    assert metric(env, "dispa_tls_client_ocsp_total", result="good") == before + 2


def test_revoked_client_is_refused_soft_and_hard(env):
    before = errors(env, "client_ocsp_revoked")
    assert request(env, "soft.test", env.mallory) is None
    assert request(env, "hard.test", env.mallory) is None
    wait_for(lambda: errors(env, "client_ocsp_revoked") == before + 2, 10,
             "two client_ocsp_revoked refusals counted")
    wait_for(lambda: "CN=mallory" in env.proc.log() and "OCSP revoked" in env.proc.log(),
             10, "the refusal logged with the subject")


def test_responder_down_soft_accepts_hard_refuses(env):
    soft_before = metric(env, "dispa_tls_client_ocsp_total", result="unavailable")
    hard_before = errors(env, "client_ocsp_unavailable")
    t0 = time.monotonic()
    assert request(env, "softdown.test", env.dave) == 200
    assert metric(env, "dispa_tls_client_ocsp_total", result="unavailable") == soft_before + 1
    assert request(env, "harddown.test", env.dave) is None
    wait_for(lambda: errors(env, "client_ocsp_unavailable") == hard_before + 1, 10,
             "a client_ocsp_unavailable refusal counted")
    # a refused connection is fast: nothing listens, no timeout is waited out
    assert time.monotonic() - t0 < 5


def test_answer_is_cached_until_next_update(env):
    """Two connections with the same certificate: the responder is asked once."""
    before = env.relay.count
    cached = metric(env, "dispa_tls_client_ocsp_total", source="cache")
    assert request(env, "soft.test", env.carol) == 200
    assert env.relay.count == before + 1
    assert request(env, "hard.test", env.carol) == 200
    assert env.relay.count == before + 1  # the second answer came from the cache
    assert metric(env, "dispa_tls_client_ocsp_total", source="cache") == cached + 1


def test_other_connections_proceed_while_one_waits(env):
    """A connection waiting for its OCSP answer holds up nobody else on the worker: while
    slow.test's responder (accepts, never answers) keeps one connection waiting, a plain
    request and an mTLS request are answered; the waiting one goes on after the timeout
    (soft: accepted, counted unavailable)."""
    box = {}
    th = threading.Thread(target=lambda: box.setdefault(
        "status", request(env, "slow.test", env.erin)), daemon=True)
    t0 = time.monotonic()
    th.start()
    env.hang.settimeout(10)
    stalled, _ = env.hang.accept()  # Dispa's OCSP query reached the silent responder
    try:
        with socket.create_connection(("127.0.0.1", env.port), timeout=5) as s:
            s.sendall(b"GET /meanwhile HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert read_one_response(s)[0] == 200
        assert request(env, "soft.test", env.alice) == 200
        assert th.is_alive() and "status" not in box  # still waiting for its answer
        th.join(15)
        assert box["status"] == 200
        assert time.monotonic() - t0 >= 3.5  # it did wait (client_ocsp_timeout = 4 s)
    finally:
        stalled.close()
