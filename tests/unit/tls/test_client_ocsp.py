"""Client-certificate OCSP (tls/client_ocsp.py) without a server: the checker against a
real ``openssl ocsp`` responder on loopback (good, revoked, unknown, cache, expiry, bound,
back-off, issuer lookup), the soft/hard decision, and the configuration errors with file,
line and field."""

from __future__ import annotations

import asyncio
import datetime
import subprocess
import time

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from dispa.config import load_config_text
from dispa.errors import ConfigError
from dispa.tls.client_ocsp import ClientOcsp, Policy, parse_http_url
from tests.support.dispa_proc import free_port, wait_for
from tests.support.pki import CA, key_pem, write_pair


def _index(entries) -> str:
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


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """(ca, {name: cert}, url, {name: key}) with an ``openssl ocsp`` responder answering for ``ca``:
    good (alice, bob), revoked (mallory); stranger is not in its index (unknown)."""
    d = tmp_path_factory.mktemp("cocsp-unit")
    ca = CA("unit OCSP CA")
    (d / "ca.crt").write_bytes(ca.pem)
    (d / "ca.key").write_bytes(key_pem(ca.key))
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    pairs = {n: ca.issue(n, client=True, ocsp_url=url)
             for n in ("alice", "bob", "mallory", "stranger")}
    pairs["noaia"] = ca.issue("noaia", client=True)
    certs = {n: c for n, (c, _) in pairs.items()}
    keys = {n: k for n, (_, k) in pairs.items()}
    (d / "index.txt").write_text(_index([(certs["alice"], False), (certs["bob"], False),
                                         (certs["mallory"], True)]))
    log = open(d / "responder.log", "wb")
    proc = subprocess.Popen(
        ["openssl", "ocsp", "-index", str(d / "index.txt"), "-port", str(port),
         "-rsigner", str(d / "ca.crt"), "-rkey", str(d / "ca.key"), "-CA", str(d / "ca.crt"),
         "-nmin", "10", "-ignore_err"], stdout=subprocess.DEVNULL, stderr=log)
    wait_for(lambda: b"waiting for OCSP client" in (d / "responder.log").read_bytes(), 15,
             "openssl ocsp listening")
    yield ca, certs, url, keys
    proc.terminate()
    proc.wait(10)
    log.close()


def _der(cert) -> bytes:
    return cert.public_bytes(Encoding.DER)


def _check(checker, cert, policy):
    async def run():
        return await checker.query(_der(cert), policy)
    return asyncio.run(run())


def test_answers_of_a_real_responder(pki):
    ca, certs, *_ = pki
    policy = Policy("soft", "", 3.0, ca.pem.decode())
    checker = ClientOcsp()
    assert _check(checker, certs["alice"], policy).status == "good"
    r = _check(checker, certs["mallory"], policy)
    assert r.status == "revoked" and "revoked at" in r.detail
    assert _check(checker, certs["stranger"], policy).status == "unknown"
    assert checker.queries == 3
    # no responder named and no override: nothing to ask
    assert _check(checker, certs["noaia"], policy).status == "unavailable"
    # an issuer that is not in the configured bundle: cannot be asked about
    other = Policy("soft", "", 3.0, CA("other").pem.decode())
    r = _check(ClientOcsp(), certs["bob"], other)
    assert r.status == "unavailable" and "issuer" in r.detail


def test_cache_honours_next_update_and_is_bounded(pki):
    ca, certs, *_ = pki
    policy = Policy("hard", "", 3.0, ca.pem.decode())
    now = [time.time()]
    checker = ClientOcsp(cache_size=1, clock=lambda: now[0])
    assert checker.cached(_der(certs["alice"])) is None
    assert _check(checker, certs["alice"], policy).status == "good"
    hit = checker.cached(_der(certs["alice"]))
    assert hit.status == "good" and hit.source == "cache" and checker.queries == 1
    # -nmin 10: the answer is good for 10 minutes, not after
    now[0] += 11 * 60
    assert checker.cached(_der(certs["alice"])) is None
    now[0] -= 11 * 60
    assert _check(checker, certs["alice"], policy).status == "good"
    assert _check(checker, certs["bob"], policy).status == "good"  # pushes alice out (size 1)
    assert checker.cached(_der(certs["alice"])) is None
    assert checker.cached(_der(certs["bob"])).status == "good"


def test_two_connections_share_one_query(pki):
    ca, certs, *_ = pki
    policy = Policy("soft", "", 3.0, ca.pem.decode())
    checker = ClientOcsp()

    async def both():
        return await asyncio.gather(checker.query(_der(certs["bob"]), policy),
                                    checker.query(_der(certs["bob"]), policy))
    a, b = asyncio.run(both())
    assert a.status == b.status == "good" and checker.queries == 1


def test_dead_responder_backs_off(pki):
    ca, certs, *_ = pki
    policy = Policy("soft", f"http://127.0.0.1:{free_port()}/", 3.0, ca.pem.decode())
    checker = ClientOcsp()
    first = _check(checker, certs["alice"], policy)
    assert first.status == "unavailable" and first.source == "responder"
    again = _check(checker, certs["alice"], policy)
    assert again.status == "unavailable" and again.source == "backoff"
    assert checker.queries == 1
    assert checker.cached(_der(certs["alice"])) is None  # failures are never cached


def test_soft_and_hard_decisions():
    soft, hard = Policy("soft", "", 1, ""), Policy("hard", "", 1, "")
    assert [soft.accepts(s) for s in ("good", "revoked", "unknown", "unavailable")] == \
        [True, False, True, True]
    assert [hard.accepts(s) for s in ("good", "revoked", "unknown", "unavailable")] == \
        [True, False, False, False]
    assert Policy.from_auth({"mode": "off", "client_ocsp": "hard"}) is None
    assert Policy.from_auth({"mode": "required"}) is None
    assert Policy.from_auth({"mode": "optional", "client_ocsp": "hard", "ca_pem": "x"}).mode \
        == "hard"


def test_responder_urls():
    assert parse_http_url("http://ocsp.example:8080/a?b=1") == ("ocsp.example", 8080, "/a?b=1")
    assert parse_http_url("http://[::1]") == ("::1", 80, "/")
    assert isinstance(parse_http_url("https://ocsp.example/"), str)
    assert isinstance(parse_http_url("http://"), str)
    assert isinstance(parse_http_url("http://h:99999/"), str)


TARGET = '[[targets.targets]]\nname = "a"\nurl = "http://127.0.0.1:9"\n'


def test_config_errors_name_file_line_and_field(pki, tmp_path):
    ca, *_ = pki
    crt = write_pair(tmp_path, "s", *ca.issue("s.test", dns=["s.test"]))[0]
    (tmp_path / "ca.crt").write_bytes(ca.pem)
    text = TARGET + f'''
[tls]
enabled = true
[[tls.certificates]]
cert_file = "{crt}"
key_file = "{tmp_path}/s.key"
[tls.client_auth]
client_ocsp = "hard"
[[tls.sni]]
names = ["s.test"]
[tls.sni.client_auth]
mode = "required"
ca_file = "{tmp_path}/ca.crt"
client_ocsp = "soft"
client_ocsp_url = "https://ocsp.example/"
'''
    with pytest.raises(ConfigError) as e:
        load_config_text(text, fmt="toml", name="dispa.toml")
    got = {i.path: i for i in e.value.errors}
    lines = text.splitlines()
    off = got["tls.client_auth.client_ocsp"]
    assert "needs client_auth mode" in off.message and off.file == "dispa.toml"
    assert lines[off.line - 1].startswith("client_ocsp = \"hard\"")
    url = got["tls.sni[0].client_auth.client_ocsp_url"]
    assert "only http://" in url.message
    assert lines[url.line - 1].startswith("client_ocsp_url")
    # type errors name the field too
    for bad, field in (('client_ocsp = "maybe"', "client_ocsp"),
                       ("client_ocsp_timeout = 0", "client_ocsp_timeout")):
        with pytest.raises(ConfigError) as e:
            load_config_text(TARGET + f"[tls.client_auth]\n{bad}\n", fmt="toml",
                             name="d.toml")
        issue = e.value.errors[0]
        assert issue.path == f"tls.client_auth.{field}" and issue.line == 5, str(issue)
    with pytest.raises(ConfigError) as e:
        load_config_text(TARGET + "[tls]\nclient_ocsp_cache_size = 0\n", fmt="toml")
    assert e.value.errors[0].path == "tls.client_ocsp_cache_size"


@pytest.fixture(params=["uvloop", "asyncio"])
def accepting(pki, tmp_path, request):
    """(port, plane, server ca) of a TlsAccept server in a thread (uvloop, as workers run,
    and asyncio's loop, whose SSL transport differs) with client_auth required and
    client_ocsp hard against the module's responder."""
    import threading

    from dispa.observability.metrics import WorkerMetrics
    from dispa.tls.config import ClientAuthConfig, TlsConfig, compile_tls
    from dispa.tls.context import TlsServer
    from dispa.tls.handshake import TlsAccept
    from dispa.tls.store import CertStore
    ca, *_ = pki
    server_ca = CA("server")
    write_pair(tmp_path / "certs", "a", *server_ca.issue("a.test", dns=["a.test"]))
    (tmp_path / "cca.crt").write_bytes(ca.pem)
    cfg = TlsConfig(enabled=True, certificate_dirs=[str(tmp_path / "certs")],
                    client_auth=ClientAuthConfig(mode="required", ca_file=str(tmp_path / "cca.crt"),
                                                 client_ocsp="hard"))
    store = CertStore()
    store.configure(cfg, compile_tls(cfg, []))
    store.refresh(force=True)

    class Echo(asyncio.Protocol):
        tls = None

        def connection_made(self, transport):
            self.t = transport

        def data_received(self, data):
            self.t.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    class Plane:
        metrics = WorkerMetrics()
        tls = TlsServer(metrics)
        session_factory = Echo

    Plane.tls.update(store.payload())
    if request.param == "uvloop":
        import uvloop
        loop = uvloop.new_event_loop()
    else:
        loop = asyncio.new_event_loop()
    box, ready = {}, threading.Event()

    async def start():
        box["srv"] = await loop.create_server(lambda: TlsAccept(Plane), "127.0.0.1", 0)
        box["port"] = box["srv"].sockets[0].getsockname()[1]
        ready.set()

    th = threading.Thread(target=lambda: (loop.run_until_complete(start()), loop.run_forever()),
                          daemon=True)
    th.start()
    assert ready.wait(10)
    yield box["port"], Plane, server_ca, tmp_path
    loop.call_soon_threadsafe(loop.stop)
    th.join(10)
    loop.close()


def _mtls_get(port, server_ca, pair) -> bytes:
    import socket
    import ssl
    ctx = ssl.create_default_context(cadata=server_ca.pem.decode())
    ctx.load_cert_chain(*pair)
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s, \
                ctx.wrap_socket(s, server_hostname="a.test") as t:
            t.sendall(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
            data = b""
            while not data.endswith(b"ok"):
                chunk = t.recv(4096)
                if not chunk:
                    break
                data += chunk
            return data
    except (OSError, ssl.SSLError):
        return b""


def test_accept_path_waits_for_the_answer(pki, accepting):
    """The request sent with the handshake's last flight is held while the responder is
    asked, then served (good) or the connection closed (revoked), on both loops."""
    ca, certs, _, keys = pki
    port, plane, server_ca, d = accepting
    good = write_pair(d, "alice", certs["alice"], keys["alice"])
    revoked = write_pair(d, "mallory", certs["mallory"], keys["mallory"])
    assert _mtls_get(port, server_ca, good).endswith(b"ok")
    assert _mtls_get(port, server_ca, good).endswith(b"ok")  # from the cache
    assert _mtls_get(port, server_ca, revoked) == b""
    wait_for(lambda: {dict(k[1])["reason"]: v for k, v in list(plane.metrics._counters.items())
                      if k[0] == "dispa_tls_handshake_errors_total"}
             == {"client_ocsp_revoked": 1}, 5, "the client_ocsp_revoked refusal")
    checks = {tuple(v for _, v in k[1]): n for k, n in list(plane.metrics._counters.items())
              if k[0] == "dispa_tls_client_ocsp_total"}
    assert checks[("good", "cache")] == 1 and checks[("revoked", "responder")] == 1
