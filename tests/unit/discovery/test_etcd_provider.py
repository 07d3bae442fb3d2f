"""The etcd provider against a real etcd server (Debian's etcd-server) on loopback.

Each test starts its own etcd (tests/support/etcd_server.py; about 0.3 s) and runs the
provider in an event loop on a thread, collecting what it emits. Disconnections go through
``TcpProxy`` so the test can keep writing to etcd while the provider is cut off, which is
what proves that a resumed watch misses nothing.
"""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from dispa.discovery.config import DiscoverySource, EtcdOptions, ServiceDiscoveryConfig
from dispa.discovery.etcd import EtcdProvider
from dispa.discovery.provider import Instance
from tests.support.dispa_proc import free_port, wait_for
from tests.support.etcd_server import EtcdServer, TcpProxy, etcd_available

PREFIX = "/services/api/"


class Running:
    """A provider's ``run`` on its own event loop; ``sets`` is everything it emitted."""

    def __init__(self, provider: EtcdProvider):
        self.provider = provider
        self.sets = []
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

        async def start():
            return asyncio.create_task(provider.run(self.sets.append))
        self.task: asyncio.Task = self.call(start())

    def call(self, coro, timeout: float = 15.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def latest(self, service: str = PREFIX) -> set[tuple[str, int]] | None:
        mine = [s for s in list(self.sets) if s.service == service]
        return {(e.host, e.port) for e in mine[-1].endpoints} if mine else None

    def status(self) -> dict:
        async def get():
            return self.provider.status()
        return self.call(get())

    def stop(self) -> None:
        async def stop():
            ended_early = self.task.done()
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
            await self.provider.close()
            return ended_early
        try:
            assert not self.call(stop()), "run() ended on its own"
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(5)
            if not self.thread.is_alive():
                self.loop.close()


def make_provider(endpoint: str | list[str], services=(PREFIX,), refresh: float = 30.0,
                  **etcd) -> EtcdProvider:
    endpoints = [endpoint] if isinstance(endpoint, str) else endpoint
    settings = ServiceDiscoveryConfig(provider="etcd", refresh_interval=refresh,
                                      etcd=EtcdOptions(endpoints=endpoints, dial_timeout=2.0,
                                                       **etcd))
    p = EtcdProvider("etcd", settings, [DiscoverySource(service=s) for s in services])
    p.backoff_initial, p.backoff_max = 0.1, 0.4  # fast reconnects in tests
    return p


@pytest.fixture
def etcd(tmp_path):
    etcd_available()
    servers = []

    def start(**kw) -> EtcdServer:
        s = EtcdServer(tmp_path / f"etcd{len(servers)}", **kw).start()
        servers.append(s)
        return s

    yield start
    for s in servers:
        s.stop()


@pytest.fixture
def running():
    started = []

    def start(provider):
        r = Running(provider)
        started.append(r)
        return r

    yield start
    for r in started:
        r.stop()


@pytest.fixture
def proxy():
    started = []

    def start(port):
        p = TcpProxy(port).start()
        started.append(p)
        return p

    yield start
    for p in started:
        p.stop()


def ep(port: int, host: str = "127.0.0.1", **extra) -> dict:
    return {"host": host, "port": port, **extra}


def test_lists_then_emits_puts_and_deletes(etcd, running):
    SVC = "/services/api"  # no trailing slash: the prefix is still "/services/api/"
    server = etcd()
    server.put(PREFIX + "a", ep(8001, weight=2, meta={"zone": "x"}))
    server.put(PREFIX + "b", "127.0.0.1:8002")  # plain host:port
    server.put(PREFIX + "bad", "not an address")
    server.put("/services/api2/z", ep(9999))  # a sibling prefix: not ours
    r = running(make_provider(server.url, services=(SVC,)))

    wait_for(lambda: r.latest(SVC) == {("127.0.0.1", 8001), ("127.0.0.1", 8002)}, 10,
             "initial list")
    first = [s for s in r.sets if s.service == SVC][0]
    a = [e for e in first.endpoints if e.port == 8001][0]
    assert (a.weight, a.meta) == (2, {"zone": "x"})
    st = r.status()["services"][SVC]
    assert "/services/api/bad" in st["invalid_keys"] and st["relists"] == 1
    assert r.provider.health.state == "ok"

    server.put(PREFIX + "c", ep(8003))
    wait_for(lambda: r.latest(SVC) == {("127.0.0.1", p) for p in (8001, 8002, 8003)}, 10, "put")
    server.delete(PREFIX + "a")
    wait_for(lambda: r.latest(SVC) == {("127.0.0.1", 8002), ("127.0.0.1", 8003)}, 10, "delete")
    server.put(PREFIX + "bad", ep(8004))  # fixed value: now valid
    wait_for(lambda: ("127.0.0.1", 8004) in (r.latest(SVC) or ()), 10, "fixed value")
    server.put("/services/api2/y", ep(9998))
    rev = server.put(PREFIX + "d", ep(8005))
    wait_for(lambda: ("127.0.0.1", 8005) in (r.latest(SVC) or ()), 10, "last put")
    assert ("127.0.0.1", 9998) not in r.latest(SVC)
    assert int(r.sets[-1].revision) == rev
    assert r.status()["services"][SVC]["relists"] == 1  # all by watch


def test_several_prefixes_and_idle_resume(etcd, running):
    server = etcd()
    server.put("/a/1", ep(7001))
    server.put("/b/1", ep(7002))
    r = running(make_provider(server.url, services=("/a/", "/b/"), refresh=1.0))
    wait_for(lambda: r.latest("/a/") == {("127.0.0.1", 7001)}
             and r.latest("/b/") == {("127.0.0.1", 7002)}, 10, "both prefixes")
    # a watch silent for refresh_interval is re-created from its revision, not re-listed
    wait_for(lambda: r.status()["services"]["/a/"]["resumes"] >= 1, 10, "idle resume")
    server.put("/b/2", ep(7003))
    wait_for(lambda: r.latest("/b/") == {("127.0.0.1", 7002), ("127.0.0.1", 7003)}, 10, "put b")
    st = r.status()["services"]
    assert st["/a/"]["relists"] == 1 and st["/b/"]["relists"] == 1
    assert r.provider.health.errors == 0


def test_fails_over_to_the_next_cluster_member(etcd, running):
    server = etcd()
    server.put(PREFIX + "a", ep(8001))
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    r = running(make_provider([dead, server.url]))
    wait_for(lambda: r.latest() == {("127.0.0.1", 8001)}, 10, "listed from the live member")
    assert r.provider.health.errors >= 1 and r.status()["endpoint"] == server.url
    server.put(PREFIX + "b", ep(8002))
    wait_for(lambda: r.latest() == {("127.0.0.1", 8001), ("127.0.0.1", 8002)}, 10, "watch")


def test_cut_connection_resumes_without_missing_events(etcd, running, proxy):
    server = etcd()
    server.put(PREFIX + "keep", ep(8001))
    server.put(PREFIX + "gone", ep(8002))
    px = proxy(server.client_port)
    r = running(make_provider(f"http://127.0.0.1:{px.port}"))
    wait_for(lambda: r.latest() == {("127.0.0.1", 8001), ("127.0.0.1", 8002)}, 10, "initial")
    emitted_before = len(r.sets)

    px.cut()
    wait_for(lambda: r.provider.health.state == "stale", 10, "stale after the cut")
    assert r.status()["services"][PREFIX]["state"] == "stale"
    # while the provider is cut off: adds, a delete, and a key that comes and goes
    server.put(PREFIX + "new1", ep(8003))
    server.delete(PREFIX + "gone")
    server.put(PREFIX + "blink", ep(8009))
    server.put(PREFIX + "new2", ep(8004))
    server.delete(PREFIX + "blink")
    last = server.put(PREFIX + "keep", ep(8001, weight=5))
    assert len(r.sets) == emitted_before  # nothing emitted: the last good set stays
    assert r.provider.health.last_error

    px.restore()
    want = {("127.0.0.1", 8001), ("127.0.0.1", 8003), ("127.0.0.1", 8004)}
    wait_for(lambda: r.latest() == want and r.provider.health.state == "ok", 15, "resync")
    wait_for(lambda: int(r.sets[-1].revision) == last, 10, "last revision")
    st = r.status()["services"][PREFIX]
    # the events came through the resumed watch: no re-list happened
    assert st["relists"] == 1 and st["resumes"] >= 1
    assert r.provider.health.reconnects >= 1
    assert [e.weight for e in r.sets[-1].endpoints if e.port == 8001] == [5]


def test_etcd_restart_mid_watch(etcd, running):
    server = etcd()
    server.put(PREFIX + "a", ep(8001))
    r = running(make_provider(server.url))
    wait_for(lambda: r.latest() == {("127.0.0.1", 8001)}, 10, "initial")
    server.kill()
    wait_for(lambda: r.provider.health.state == "stale", 10, "stale while etcd is down")
    assert r.latest() == {("127.0.0.1", 8001)}  # last known good stays
    assert r.provider.health.staleness_seconds() > 0
    server.start()
    server.put(PREFIX + "b", ep(8002))  # written before the provider is back
    server.delete(PREFIX + "a")
    wait_for(lambda: r.latest() == {("127.0.0.1", 8002)}, 15, "resync after restart")
    wait_for(lambda: r.provider.health.state == "ok", 10, "healthy again")
    assert r.status()["services"][PREFIX]["relists"] == 1


def test_compacted_revision_triggers_a_relist(etcd, running, proxy):
    server = etcd()
    server.put(PREFIX + "a", ep(8001))
    px = proxy(server.client_port)
    r = running(make_provider(f"http://127.0.0.1:{px.port}"))
    wait_for(lambda: r.latest() == {("127.0.0.1", 8001)}, 10, "initial")
    px.cut()
    wait_for(lambda: r.provider.health.state == "stale", 10, "stale")
    server.put(PREFIX + "b", ep(8002))
    server.delete(PREFIX + "a")
    server.put(PREFIX + "c", ep(8003))
    server.compact()  # the revisions the provider would resume from are gone
    px.restore()
    wait_for(lambda: r.latest() == {("127.0.0.1", 8002), ("127.0.0.1", 8003)}, 15, "re-list")
    assert r.status()["services"][PREFIX]["relists"] == 2
    server.put(PREFIX + "d", ep(8004))  # and the new watch works
    wait_for(lambda: ("127.0.0.1", 8004) in r.latest(), 10, "watch after re-list")


def test_lease_registration_keepalive_expiry_and_deregister(etcd, running, proxy):
    server = etcd()
    px = proxy(server.client_port)
    registrar = make_provider(f"http://127.0.0.1:{px.port}", services=())
    r = running(registrar)
    watcher = running(make_provider(server.url, services=("/dispa/",)))
    inst = Instance(service="/dispa", id="node-1", host="127.0.0.1", port=8080,
                    tags=("edge",), meta={"zone": "z1"}, ttl_seconds=2)
    t0 = time.monotonic()
    r.call(registrar.register(inst))
    values = server.get_prefix("/dispa/")
    assert list(values) == ["/dispa/node-1"]
    lease = int(r.status()["registration"]["lease"])
    assert server.lease_ttl(lease) > 0
    wait_for(lambda: watcher.latest("/dispa/") == {("127.0.0.1", 8080)}, 10, "watcher sees it")
    reg = [s for s in watcher.sets if s.service == "/dispa/"][-1].endpoints[0]
    assert reg.meta == {"zone": "z1", "tags": ["edge"]}
    # kept alive: still there well past the 2 s TTL
    wait_for(lambda: time.monotonic() - t0 > 4.0, 10, "two TTLs")
    assert "/dispa/node-1" in server.get_prefix("/dispa/")
    assert r.status()["registration"]["state"] == "registered"

    px.cut()  # the node loses etcd: its lease runs out and the key goes with it
    wait_for(lambda: watcher.latest("/dispa/") == set(), 10, "lease expiry removes the key")
    assert server.lease_ttl(lease) == -1
    wait_for(lambda: r.status()["registration"]["state"] == "retrying", 10, "retrying")
    px.restore()  # back: a new lease, the key again
    wait_for(lambda: watcher.latest("/dispa/") == {("127.0.0.1", 8080)}, 10, "re-registered")
    assert int(r.status()["registration"]["lease"]) != lease

    r.call(registrar.deregister())
    assert server.get_prefix("/dispa/") == {}  # revoked at once, not at lease expiry
    wait_for(lambda: watcher.latest("/dispa/") == set(), 10, "watcher sees it go")


def test_auth_and_reauthentication(etcd, running, proxy):
    server = etcd(auth=True, extra_args=("--auth-token-ttl", "1"))  # tokens die after 1 s idle
    server.add_user("dispa", "pw", PREFIX)
    server.put(PREFIX + "a", ep(8001))
    px = proxy(server.client_port)
    r = running(make_provider(f"http://127.0.0.1:{px.port}", username="dispa", password="pw"))
    wait_for(lambda: r.latest() == {("127.0.0.1", 8001)}, 10, "listed with a token")
    assert r.provider.authentications == 1

    bad = running(make_provider(server.url, username="dispa", password="wrong"))
    wait_for(lambda: bad.provider.health.errors >= 2, 10, "refused")
    assert "authentication failed" in bad.provider.health.last_error
    assert bad.sets == [] and not bad.task.done()  # never raises, never emits

    # cut off longer than the token TTL: the watch must come back with a new token
    token = r.provider._token
    px.cut()
    t0 = time.monotonic()
    wait_for(lambda: time.monotonic() - t0 > 2.0, 5, "the token TTL to pass")
    assert _rejected(server, token)  # (checking refreshes a live token: check once, after)
    server.put(PREFIX + "b", ep(8002))
    px.restore()
    wait_for(lambda: r.latest() == {("127.0.0.1", 8001), ("127.0.0.1", 8002)}, 15, "after the cut")
    assert r.provider.authentications >= 2 and r.provider._token != token
    assert r.status()["services"][PREFIX]["relists"] == 1  # resumed, not re-listed
    r.call(r.provider.register(Instance(service=PREFIX, id="me", host="127.0.0.1", port=9000,
                                        ttl_seconds=5)))
    assert PREFIX + "me" in server.get_prefix(PREFIX)
    assert r.status()["registration"]["state"] == "registered"


def _rejected(server: EtcdServer, token: str) -> bool:
    import http.client
    import json

    conn = http.client.HTTPConnection("127.0.0.1", server.client_port, timeout=5)
    try:
        conn.request("POST", "/v3/kv/range", body=json.dumps({"key": "Lw=="}),
                     headers={"Authorization": token})
        return conn.getresponse().status == 401
    finally:
        conn.close()


def test_tls_with_client_certificate(etcd, running):
    server = etcd(tls=True)
    pki = server.pki
    server.put(PREFIX + "a", ep(8001))
    r = running(make_provider(server.url, ca_file=pki["ca"], cert_file=pki["client_cert"],
                              key_file=pki["client_key"]))
    wait_for(lambda: r.latest() == {("127.0.0.1", 8001)}, 10, "listed over TLS")
    server.put(PREFIX + "b", ep(8002))
    wait_for(lambda: r.latest() == {("127.0.0.1", 8001), ("127.0.0.1", 8002)}, 10, "watch over TLS")
    r.call(r.provider.register(Instance(service=PREFIX, id="me", host="127.0.0.1", port=9000)))
    wait_for(lambda: ("127.0.0.1", 9000) in r.latest(), 10, "registered over TLS")

    # no client certificate: etcd (--client-cert-auth) refuses the handshake
    anon = running(make_provider(server.url, ca_file=pki["ca"]))
    wait_for(lambda: anon.provider.health.errors >= 2, 10, "refused without a client cert")
    assert anon.sets == [] and anon.provider.health.state == "stale"
    # a CA that did not sign the server's certificate
    untrusted = running(make_provider(server.url, ca_file=pki["client_cert"],
                                      cert_file=pki["client_cert"], key_file=pki["client_key"]))
    wait_for(lambda: untrusted.provider.health.errors >= 1, 10, "untrusted server")
    assert "certificate" in untrusted.provider.health.last_error.lower()
