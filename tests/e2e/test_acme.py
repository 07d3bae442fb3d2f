"""ACME against the real pebble CA, with a real BIND 9 as its resolver and DNS-01 target.

Each test drives an :class:`AcmeManager` (the master's ACME component) directly; the
HTTP-01 path through a running dispa-server is in test_acme_server.py. One bind9 and one
pebble serve the whole module (pebble's TLS-ALPN-01 port is this module's small ssl
server, see ``AlpnServer``).
"""

from __future__ import annotations

import asyncio
import os
import random
import socket
import ssl
import stat
import tempfile
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from dispa.tls.acme.challenges import ACME_IDENTIFIER_OID, ALPN_PROTOCOL
from dispa.tls.acme.manager import AcmeManager
from dispa.tls.acme.storage import EtcdStorage
from dispa.tls.acme_config import (
    AcmeCertificate, AcmeConfig, Dns01Config, EtcdStorageConfig, Rfc2136Config,
)
from tests.support.bind9 import Bind9
from tests.support.dispa_proc import free_port
from tests.support.etcd_server import EtcdServer
from tests.support.pebble import Pebble

pytestmark = pytest.mark.timeout(120)


class AlpnServer:
    """A TLS server on loopback answering TLS-ALPN-01 (RFC 8737) from ``certs``:
    server name -> (cert_pem, key_pem); only the ``acme-tls/1`` protocol."""

    def __init__(self, port: int, workdir: Path):
        self.port = port
        self.workdir = workdir
        self.contexts: dict[str, ssl.SSLContext] = {}
        self.served: list[str] = []  # the ALPN protocol of each completed handshake
        self.sni_seen: list[str | None] = []
        self.sock = socket.create_server(("127.0.0.1", port))
        self.sock.settimeout(0.2)
        self.base = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.base.set_alpn_protocols([ALPN_PROTOCOL])
        self.base.sni_callback = self._sni
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def set_certs(self, certs: dict) -> None:
        contexts = {}
        for name, (cert_pem, key_pem) in certs.items():
            fd, path = tempfile.mkstemp(dir=self.workdir, suffix=".pem")
            with os.fdopen(fd, "w") as f:
                f.write(cert_pem + key_pem)
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(path)
            ctx.set_alpn_protocols([ALPN_PROTOCOL])
            contexts[name] = ctx
        self.contexts = contexts

    def _sni(self, sslobj, server_name, _ctx):
        ctx = self.contexts.get(server_name or "")
        self.sni_seen.append(server_name)
        if ctx is None:
            return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
        sslobj.context = ctx
        return None

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except (socket.timeout, OSError):
                continue
            conn.settimeout(5)
            try:
                with self.base.wrap_socket(conn, server_side=True) as tls:
                    self.served.append(tls.selected_alpn_protocol())
            except (ssl.SSLError, OSError):
                conn.close()

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(5)
        self.sock.close()


@pytest.fixture(scope="module")
def ca(tmp_path_factory):
    d = tmp_path_factory.mktemp("acme")
    ns = Bind9(d / "bind")
    tls_port = free_port()
    alpn = AlpnServer(tls_port, d)
    try:
        pb = Pebble(d / "pebble", dns_port=ns.port, tls_port=tls_port)
    except BaseException:
        alpn.stop()
        ns.stop()
        raise
    yield SimpleNamespace(ns=ns, pebble=pb, alpn=alpn, dir=d)
    pb.stop()
    alpn.stop()
    ns.stop()


class Clock:
    """An injected wall clock: real time plus ``offset`` seconds."""

    def __init__(self):
        import time
        self._time = time.time
        self.offset = 0.0

    def __call__(self) -> float:
        return self._time() + self.offset


def config(ca, store: Path, **kw) -> AcmeConfig:
    base = dict(enabled=True, directory_url=ca.pebble.directory_url,
                ca_bundle=str(ca.pebble.ca_bundle), storage_dir=str(store), renew_jitter=0.0,
                email="ops@acme.test", order_timeout=60.0, retry_min=5.0)
    base.update(kw)
    return AcmeConfig(**base)


def rfc2136(ca, **kw) -> Dns01Config:
    return Dns01Config(rfc2136=Rfc2136Config(
        server="127.0.0.1", port=ca.ns.port, tsig_key_name=ca.ns.key_name,
        tsig_secret=ca.ns.secret), **kw)


async def _quiet(_):
    return None


def read_pair(store: Path, name: str):
    d = store / "certs" / name
    chain = x509.load_pem_x509_certificates((d / "fullchain.pem").read_bytes())
    key = serialization.load_pem_private_key((d / "privkey.pem").read_bytes(), None)
    return chain, key, stat.S_IMODE(os.stat(d / "privkey.pem").st_mode)


def dns_names(cert) -> list[str]:
    return cert.extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)


def assert_issued_by_pebble(ca, chain, key, names) -> None:
    leaf = chain[0]
    assert sorted(dns_names(leaf)) == sorted(names)
    assert key.public_key().public_numbers() == leaf.public_key().public_numbers()
    leaf.verify_directly_issued_by(chain[1])
    root = x509.load_pem_x509_certificate(ca.pebble.roots())
    chain[-1].verify_directly_issued_by(root)


def test_dns01_rfc2136_issues_wildcard_and_multi_name_certificates(ca, tmp_path):
    store = tmp_path / "store"
    cfg = config(ca, store, challenge_type="dns-01", names=["*.w.acme.test"],
                 certificates=[AcmeCertificate(name="pair", names=["d1.acme.test",
                                                                    "d2.acme.test"])],
                 dns01=rfc2136(ca))
    issued = []

    async def main():
        m = AcmeManager(cfg, publish=_quiet, on_issued=issued.append)
        try:
            await m.run_once()
            return m
        finally:
            await m.close()

    m = asyncio.run(main())
    assert m.renewals == {"ok": 2, "failed": 0}, m.status()
    assert issued == ["_wildcard.w.acme.test", "pair"]
    chain, key, mode = read_pair(store, "_wildcard.w.acme.test")
    assert_issued_by_pebble(ca, chain, key, ["*.w.acme.test"])
    assert mode == 0o600
    chain, key, _ = read_pair(store, "pair")
    assert_issued_by_pebble(ca, chain, key, ["d1.acme.test", "d2.acme.test"])
    # the records were removed again (RFC 2136 delete)
    for n in ("w", "d1", "d2"):
        assert ca.ns.txt(f"_acme-challenge.{n}.acme.test.") == []
    # the account was stored, owner-only
    accounts = list((store / "accounts").glob("*/account.json"))
    assert len(accounts) == 1 and stat.S_IMODE(os.stat(accounts[0]).st_mode) == 0o600


def _nsupdate_script(ca, path: Path, calls: Path) -> Path:
    # an operator's hook: BIND's nsupdate with the TSIG key, and a call log for the test
    path.write_text(f"""#!/bin/sh
echo "$1 $2 $3 $DISPA_ACME_DOMAIN" >> {calls}
if [ "$1" = present ]; then op="update add $2 60 TXT \\"$3\\""
else op="update delete $2 TXT \\"$3\\""; fi
printf 'server 127.0.0.1 {ca.ns.port}\\nzone acme.test\\n%s\\nsend\\n' "$op" | \\
    nsupdate -y hmac-sha256:{ca.ns.key_name}:{ca.ns.secret}
""")
    path.chmod(0o755)
    return path


def test_dns01_exec_hook_publishes_and_removes_the_record(ca, tmp_path):
    calls = tmp_path / "calls.log"
    hook = _nsupdate_script(ca, tmp_path / "hook.sh", calls)
    cfg = config(ca, tmp_path / "store", challenge_type="dns-01", names=["exec.acme.test"],
                 dns01=Dns01Config(provider="exec", exec_command=[str(hook)],
                                   propagation_nameserver=f"127.0.0.1:{ca.ns.port}"))

    async def main():
        m = AcmeManager(cfg, publish=_quiet)
        try:
            await m.run_once()
            return m
        finally:
            await m.close()

    m = asyncio.run(main())
    assert m.renewals["ok"] == 1, m.status()
    lines = calls.read_text().splitlines()
    assert [ln.split()[0] for ln in lines] == ["present", "cleanup"]
    assert lines[0].split()[1] == "_acme-challenge.exec.acme.test."
    assert lines[0].split()[3] == "exec.acme.test"
    assert ca.ns.txt("_acme-challenge.exec.acme.test.") == []
    chain, key, _ = read_pair(tmp_path / "store", "exec.acme.test")
    assert_issued_by_pebble(ca, chain, key, ["exec.acme.test"])


def test_dns01_webhook_publishes_and_removes_the_record(ca, tmp_path):
    from aiohttp import web

    calls = tmp_path / "calls.log"
    hook = _nsupdate_script(ca, tmp_path / "hook.sh", calls)
    bodies = []

    async def handler(request):
        body = await request.json()
        bodies.append((request.headers.get("Authorization"), body))
        proc = await asyncio.create_subprocess_exec(str(hook), body["action"], body["fqdn"],
                                                    body["value"])
        await proc.wait()
        return web.json_response({"ok": proc.returncode == 0},
                                 status=200 if proc.returncode == 0 else 500)

    async def main():
        app = web.Application()
        app.router.add_post("/dns", handler)
        runner = web.AppRunner(app)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        cfg = config(ca, tmp_path / "store", challenge_type="dns-01", names=["hook.acme.test"],
                     dns01=Dns01Config(provider="webhook",
                                       webhook_url=f"http://127.0.0.1:{port}/dns",
                                       webhook_headers={"Authorization": "Bearer t0k"},
                                       propagation_nameserver=f"127.0.0.1:{ca.ns.port}"))
        m = AcmeManager(cfg, publish=_quiet)
        try:
            await m.run_once()
            return m
        finally:
            await m.close()
            await runner.cleanup()

    m = asyncio.run(main())
    assert m.renewals["ok"] == 1, m.status()
    assert [(auth, b["action"]) for auth, b in bodies] == [("Bearer t0k", "present"),
                                                           ("Bearer t0k", "cleanup")]
    assert bodies[0][1]["fqdn"] == "_acme-challenge.hook.acme.test."
    assert ca.ns.txt("_acme-challenge.hook.acme.test.") == []


def test_tls_alpn01_validation_certificate_is_accepted_by_pebble(ca, tmp_path):
    published = []

    async def publish(challenges):
        published.append(challenges)
        ca.alpn.set_certs((challenges or {}).get("tls_alpn01") or {})

    cfg = config(ca, tmp_path / "store", challenge_type="tls-alpn-01", names=["alpn.acme.test"])

    async def main():
        m = AcmeManager(cfg, publish=publish)
        try:
            await m.run_once()
            return m
        finally:
            await m.close()

    m = asyncio.run(main())
    assert m.renewals["ok"] == 1, (m.status(), ca.pebble.log())
    # pebble connected with SNI alpn.acme.test and negotiated acme-tls/1
    assert "alpn.acme.test" in ca.alpn.sni_seen and ca.alpn.served
    assert set(ca.alpn.served) == {ALPN_PROTOCOL}
    # the validation certificate carried the key authorization digest, and went away after
    cert_pem, _ = published[0]["tls_alpn01"]["alpn.acme.test"]
    ext = x509.load_pem_x509_certificate(cert_pem.encode()).extensions.get_extension_for_oid(
        ACME_IDENTIFIER_OID)
    assert ext.critical and len(ext.value.value) == 34
    assert published[-1] is None
    chain, key, _ = read_pair(tmp_path / "store", "alpn.acme.test")
    assert_issued_by_pebble(ca, chain, key, ["alpn.acme.test"])


def test_renewal_happens_at_two_thirds_of_the_lifetime(ca, tmp_path):
    store = tmp_path / "store"
    cfg = config(ca, store, challenge_type="dns-01", names=["renew.acme.test"],
                 dns01=rfc2136(ca), revoke_replaced=True)
    clock = Clock()

    async def main():
        m = AcmeManager(cfg, publish=_quiet, clock=clock)
        try:
            await m.run_once()
            first = m.certs[0]
            serial, nb, na = first.serial, first.not_before, first.not_after
            assert first.next_attempt == pytest.approx(nb + (na - nb) * 2 / 3)
            clock.offset = (nb + (na - nb) * 0.6) - clock._time()  # 60%: not yet
            await m.run_once()
            assert m.certs[0].serial == serial and m.renewals["ok"] == 1
            clock.offset = (nb + (na - nb) * 0.67) - clock._time()  # past 2/3: renew
            await m.run_once()
            return m, serial
        finally:
            await m.close()

    m, old_serial = asyncio.run(main())
    assert m.renewals == {"ok": 2, "failed": 0}
    assert m.certs[0].serial != old_serial
    # revoke_replaced: the first certificate was revoked as superseded, the new one not
    assert m.revocations == {"ok": 1, "failed": 0}
    old_status = ca.pebble.cert_status(old_serial)
    assert old_status["Status"] == "Revoked" and old_status.get("Reason") == 4, old_status
    assert ca.pebble.cert_status(m.certs[0].serial)["Status"] == "Valid"
    chain, key, _ = read_pair(store, "renew.acme.test")
    assert chain[0].serial_number == m.certs[0].serial
    assert_issued_by_pebble(ca, chain, key, ["renew.acme.test"])


def test_two_managers_on_one_directory_only_one_renews(ca, tmp_path):
    store = tmp_path / "store"
    cfg = config(ca, store, challenge_type="dns-01", names=["lock.acme.test"],
                 dns01=rfc2136(ca))
    clock = Clock()

    async def main():
        a = AcmeManager(cfg, publish=_quiet, clock=clock, rng=random.Random(1))
        b = AcmeManager(cfg, publish=_quiet, clock=clock, rng=random.Random(2))
        try:
            await asyncio.gather(a.run_once(), b.run_once())
            assert a.renewals["ok"] + b.renewals["ok"] == 1
            assert a.lock_busy + b.lock_busy == 1
            loser = b if b.lock_busy else a
            clock.offset = cfg.retry_min * 1.2  # the loser looks at storage again
            await loser.run_once()
            return a, b, loser
        finally:
            await a.close()
            await b.close()

    a, b, loser = asyncio.run(main())
    assert a.renewals["ok"] + b.renewals["ok"] == 1  # the loser found the winner's result
    assert a.certs[0].serial == b.certs[0].serial is not None
    assert loser.certs[0].next_attempt > loser.clock() + 86400


def test_two_managers_on_etcd_one_renews_and_the_other_copies_it(ca, tmp_path):
    etcd = EtcdServer(tmp_path / "etcd").start()
    try:
        etcd_cfg = EtcdStorageConfig(endpoints=[etcd.url], prefix="/t/acme/", lock_ttl=10)
        cfgs = [config(ca, tmp_path / f"local{i}", challenge_type="dns-01", storage="etcd",
                       etcd=etcd_cfg, names=["etcd.acme.test"], dns01=rfc2136(ca))
                for i in (0, 1)]
        clock = Clock()
        issued: list[tuple[int, str]] = []

        async def main():
            ms = [AcmeManager(c, publish=_quiet, clock=clock,
                              on_issued=lambda n, i=i: issued.append((i, n)))
                  for i, c in enumerate(cfgs)]
            try:
                await asyncio.gather(*(m.run_once() for m in ms))
                clock.offset = cfgs[0].retry_min * 1.2
                await asyncio.gather(*(m.run_once() for m in ms))
                # the winner released the lock: its key is gone (lease revoked)
                assert await _etcd_get(etcd_cfg, "renew.lock") is None
                return ms
            finally:
                for m in ms:
                    await m.close()

        ms = asyncio.run(main())
    finally:
        etcd.stop()
    assert sum(m.renewals["ok"] for m in ms) == 1, [m.status() for m in ms]
    assert sorted(i for i, _ in issued) == [0, 1]  # the winner issued, the other copied
    pems = [(tmp_path / f"local{i}" / "certs" / "etcd.acme.test" / "fullchain.pem").read_bytes()
            for i in (0, 1)]
    assert pems[0] == pems[1]
    chain, key, mode = read_pair(tmp_path / "local1", "etcd.acme.test")
    assert_issued_by_pebble(ca, chain, key, ["etcd.acme.test"])
    assert mode == 0o600


async def _etcd_get(cfg, key):
    s = EtcdStorage(cfg.endpoints, prefix=cfg.prefix)
    try:
        return await s.get(key)
    finally:
        await s.close()


EAB_KID = "kid-dispa"
EAB_KEY = "zWNDZM6eQGHWpSRTPal5eIUYFTu7EajVIoguysqZ9wG44nMEtx3MUAsUDkMTQ12W"  # base64url


def test_external_account_binding_is_sent_when_configured(ca, tmp_path):
    # a pebble that refuses accounts without a binding to one of its MAC keys
    pb = Pebble(tmp_path / "pebble-eab", dns_port=ca.ns.port, tls_port=ca.alpn.port,
                eab_keys={EAB_KID: EAB_KEY})
    try:
        base = dict(directory_url=pb.directory_url, ca_bundle=str(pb.ca_bundle),
                    challenge_type="dns-01", dns01=rfc2136(ca))
        store = tmp_path / "store"
        cfgs = {
            "none": config(ca, tmp_path / "none", names=["eab0.acme.test"], **base),
            "wrong": config(ca, tmp_path / "wrong", names=["eab1.acme.test"], eab_kid=EAB_KID,
                            eab_hmac_key=EAB_KEY[::-1], **base),
            "good": config(ca, store, names=["eab2.acme.test"], eab_kid=EAB_KID,
                           eab_hmac_key=EAB_KEY, **base),
            # the stored account again (newAccount answers 200 for a known key)
            "again": config(ca, store, names=["eab3.acme.test"], eab_kid=EAB_KID,
                            eab_hmac_key=EAB_KEY, **base),
        }

        async def main():
            out = {}
            for k, cfg in cfgs.items():
                m = AcmeManager(cfg, publish=_quiet)
                try:
                    await m.run_once()
                finally:
                    await m.close()
                out[k] = m
            return out

        ms = asyncio.run(main())
    finally:
        pb.stop()
    assert ms["none"].renewals == {"ok": 0, "failed": 1}
    assert "externalAccountRequired" in ms["none"].certs[0].last_error, ms["none"].status()
    assert ms["wrong"].renewals == {"ok": 0, "failed": 1}, ms["wrong"].status()
    assert ms["good"].renewals == {"ok": 1, "failed": 0}, (ms["good"].status(), pb.log())
    assert ms["again"].renewals == {"ok": 1, "failed": 0}, ms["again"].status()
    accounts = list((store / "accounts").glob("*/account.json"))
    assert len(accounts) == 1
    assert EAB_KEY not in accounts[0].read_text()  # configuration, never stored


def test_closing_during_an_order_is_prompt_and_leaves_nothing_talking_to_the_ca(ca, tmp_path):
    # pebble validates HTTP-01 on its http_port: a listener that accepts and never answers
    # keeps the authorisation pending, so the client is polling when the manager closes
    hold = socket.create_server(("127.0.0.1", ca.pebble.http_port))
    held = []
    published = []
    cfg = config(ca, tmp_path / "store", challenge_type="http-01", names=["hang.acme.test"],
                 order_timeout=60.0)

    async def publish(challenges):
        published.append(challenges)

    async def main():
        loop = asyncio.get_running_loop()
        hold.setblocking(False)
        m = AcmeManager(cfg, publish=publish)
        m.start()
        conn, _ = await asyncio.wait_for(loop.sock_accept(hold), 30)  # pebble validating
        held.append(conn)
        # and the client polls the authorisation (pebble logs each request it serves)
        end = loop.time() + 10
        while "POST /authZ/" not in ca.pebble.log().rpartition("POST /chalZ/")[2]:
            assert loop.time() < end, ca.pebble.log()
            await asyncio.sleep(0.05)  # polling a log file: nothing to wait on instead
        pid = m.client.pid  # the issuer process (dispa/tls/acme/issuer.py)
        assert pid is not None
        t0 = loop.time()
        await m.close()
        return m, loop.time() - t0, pid

    try:
        m, took, pid = asyncio.run(main())
        assert took < 3.0, took
        assert published[0]["http01"] and published[-1] is None  # the token was withdrawn
        assert m.renewals == {"ok": 0, "failed": 0}
        # the issuer process is gone although the validation still hangs (pebble gives up
        # on the silent listener only 3 s after it connected): nothing talks to the CA
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
        assert m.client.pid is None
    finally:
        for conn in held:
            conn.close()
        hold.close()


def test_a_crashed_issuer_process_is_a_counted_failure_and_its_challenge_is_withdrawn(
        ca, tmp_path):
    import signal

    hold = socket.create_server(("127.0.0.1", ca.pebble.http_port))  # as above
    held = []
    published = []
    cfg = config(ca, tmp_path / "store", challenge_type="http-01", names=["crash.acme.test"])

    async def publish(challenges):
        published.append(challenges)

    async def main():
        loop = asyncio.get_running_loop()
        hold.setblocking(False)
        m = AcmeManager(cfg, publish=publish)
        try:
            round_ = asyncio.ensure_future(m.run_once())
            conn, _ = await asyncio.wait_for(loop.sock_accept(hold), 30)  # validating
            held.append(conn)
            os.kill(m.client.pid, signal.SIGKILL)  # the OOM killer, say
            await asyncio.wait_for(round_, 10)
            return m
        finally:
            await m.close()

    try:
        m = asyncio.run(main())
    finally:
        for conn in held:
            conn.close()
        hold.close()
    assert m.renewals == {"ok": 0, "failed": 1}
    assert "issuer process ended" in m.certs[0].last_error, m.certs[0].last_error
    assert published[0]["http01"] and published[-1] is None  # withdrawn by the master
    assert not (tmp_path / "store" / "certs").exists()


def test_etcd_lock_is_kept_alive_while_held_and_expires_when_its_holder_dies(tmp_path):
    etcd = EtcdServer(tmp_path / "etcd").start()
    ttl = 3  # keepalives every second: 2 s of slack for a loaded machine

    async def main():
        a = EtcdStorage([etcd.url], prefix="/t/lock/", lock_ttl=ttl, owner="a")
        b = EtcdStorage([etcd.url], prefix="/t/lock/", lock_ttl=ttl, owner="b")
        loop = asyncio.get_running_loop()
        try:
            held = await a.try_lock()
            assert held is not None
            # held (kept alive) for well over its TTL: b never gets it
            end = loop.time() + 2 * ttl
            while loop.time() < end:
                assert await b.try_lock() is None
                await asyncio.sleep(0.25)  # a bounded observation window, not a wait
            assert not held.lost
            # the holder "dies" mid-renewal: no more keepalives, no release
            held._task.cancel()
            t0 = loop.time()
            deadline = t0 + ttl + 5
            taken = None
            while taken is None and loop.time() < deadline:
                taken = await b.try_lock()
                if taken is None:
                    await asyncio.sleep(0.1)
            assert taken is not None, "the lease of a dead holder never expired"
            waited = loop.time() - t0
            assert await b.get("renew.lock") == b"b"
            await taken.release()
            return waited
        finally:
            await a.close()
            await b.close()

    try:
        waited = asyncio.run(main())
    finally:
        etcd.stop()
    assert waited <= ttl + 5


def test_etcd_storage_logs_in_again_when_its_token_expired(tmp_path):
    from tests.support.etcd_server import ROOT_PASSWORD

    etcd = EtcdServer(tmp_path / "etcd", auth=True).start()

    async def main():
        s = EtcdStorage([etcd.url], prefix="/t/auth/", username="root",
                        password=ROOT_PASSWORD)
        try:
            await s.put("certs/x/fullchain.pem", b"one")
            old = s._token
            etcd.restart()  # etcd's simple tokens do not survive a restart (nor their TTL)
            assert await s.get("certs/x/fullchain.pem") == b"one"
            return old, s._token
        finally:
            await s.close()

    try:
        old, new = asyncio.run(main())
    finally:
        etcd.stop()
    assert old and new and old != new
