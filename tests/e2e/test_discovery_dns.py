"""DNS service discovery end to end: a real dnsmasq, real origins, a real dispa-server.

The zone's ``api.test`` A records list the live origins (each on its own loopback address,
all on one port). While a bounded keep-alive load runs through Dispa, the zone changes:

* an origin is added: traffic reaches it within the bound;
* an origin is removed from the zone while it keeps serving, and stopped only once Dispa has
  stopped sending to it: zero failed requests; slow requests in flight on it when the new
  snapshot is swapped in complete (200);
* a reload that changes the discovery source but is refused (its new listener cannot be
  bound) leaves the running source in force;
* dnsmasq is stopped: traffic continues on the last known good set, /admin/status says
  ``stale`` and the staleness metric grows;
* dnsmasq restarts with a changed zone: Dispa resyncs;
* the name disappears (NXDOMAIN, an authoritative empty answer): requests get 503.

The bound: dnsmasq's TTL (1 s, also ``min_ttl``) + the watcher's throttle (0.5 s) + the
snapshot swap; we assert ``BOUND`` seconds, generous for a loaded 2-core CI machine, and
print what we measured.
"""

from __future__ import annotations

import http.client
import signal
import socket
import threading
import time

import pytest

from tests.support.discovery_load import Load, converged, metric, print_timings, provider, \
    published, start_origins, write_config
from tests.support.dispa_proc import DispaProcess, free_port, wait_for
from tests.support.dnsmasq import Dnsmasq

TTL = 1.0
THROTTLE = 0.5
BOUND = 8.0  # seconds: TTL + throttle + apply, with headroom for a busy machine
ADDRESSES = {"o1": "127.0.0.11", "o2": "127.0.0.12", "o3": "127.0.0.13"}


#: A slow request's duration: longer than removing an endpoint takes (TTL + throttle +
#: apply, ~1.5 s; BOUND at worst), so that it is still in flight when the snapshot swaps.
SLOW_MS = 7000


class SlowRequests:
    """``n`` concurrent ``GET /delay?ms=..`` through Dispa, each on its own connection;
    ``join`` returns ``(status, X-Origin)`` per request (status 0: a transport error)."""

    def __init__(self, port: int, n: int, delay_ms: int):
        self.results: list[tuple[int, str]] = []
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._one, args=(port, delay_ms), daemon=True)
                         for _ in range(n)]
        for t in self._threads:
            t.start()

    def _one(self, port: int, delay_ms: int) -> None:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=delay_ms / 1000 + 30)
        try:
            c.request("GET", f"/delay?ms={delay_ms}", headers={"Host": "example.com"})
            r = c.getresponse()
            r.read()
            outcome = (r.status, r.getheader("X-Origin", ""))
        except (OSError, http.client.HTTPException) as exc:
            outcome = (0, repr(exc))
        finally:
            c.close()
        with self._lock:
            self.results.append(outcome)

    def pending(self) -> bool:
        return any(t.is_alive() for t in self._threads)

    def join(self, timeout: float) -> list[tuple[int, str]]:
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        assert not self.pending(), "slow requests still running"
        return list(self.results)


@pytest.fixture
def dnsmasq(tmp_path):
    server = Dnsmasq(tmp_path / "dns", ttl=int(TTL))
    yield server
    server.stop()


@pytest.fixture
def origins():
    # A records carry no port: every origin listens on the same one
    yield from start_origins(hosts=ADDRESSES)


def _config(tmp_path, dns: Dnsmasq, port: int, admin_port: int, origin_port: int):
    return write_config(tmp_path, port, admin_port, f"""
[targets.discovery]
provider = "dns"
service = "api.test"
record = "A"
port = {origin_port}

[targets.health_check]
enabled = false

[service_discovery]
provider = "dns"
throttle = {THROTTLE}

[service_discovery.dns]
resolvers = ["{dns.address}"]
timeout = 0.5
min_ttl = {TTL}
max_ttl = 5
negative_ttl = {TTL}
""")


def _hosts(*names: str) -> dict[str, list[str]]:
    return {"api.test": [ADDRESSES[n] for n in names]}


def test_dns_discovery_follows_the_zone_under_load(tmp_path, dnsmasq, origins):
    dnsmasq.set_hosts(_hosts("o1", "o2"), reload=False)
    dnsmasq.start()
    port, admin = free_port(), free_port()
    cfg = _config(tmp_path, dnsmasq, port, admin, origins["o1"].port)
    d = DispaProcess(cfg, port=port, admin_port=admin)
    load = None
    timings = {}
    try:
        d.wait_ready(workers=2)
        # the master waited for the first answer: the workers started on the zone's set
        st = wait_for(published(d, "default", 2), BOUND, "every worker on o1+o2")
        assert st["discovery"]["providers"]["dns"]["state"] == "ok"
        load = Load(port).start()
        wait_for(converged(load, {"o1", "o2"}), BOUND, "traffic on o1+o2")

        # 1. add o3 to the zone
        t0 = time.monotonic()
        dnsmasq.set_hosts(_hosts("o1", "o2", "o3"))
        wait_for(lambda: "o3" in load.served_since(t0), BOUND, "traffic reaching o3")
        timings["add"] = time.monotonic() - t0
        wait_for(converged(load, {"o1", "o2", "o3"}), BOUND, "traffic on o1+o2+o3")

        # 2. remove o3 from the zone while it still serves; stop it once Dispa is done.
        #    Slow requests in flight on o3 when the new snapshot is swapped in finish.
        wait_for(published(d, "default", 3), BOUND, "every worker with o3")
        slow = SlowRequests(port, n=24, delay_ms=SLOW_MS)
        wait_for(lambda: any(r[1].startswith(b"/delay") for r in list(origins["o3"].requests)),
                 BOUND, "a slow request in flight on o3")
        t0 = time.monotonic()
        dnsmasq.set_hosts(_hosts("o1", "o2"))
        wait_for(published(d, "default", 2), BOUND, "every worker without o3")
        timings["remove"] = time.monotonic() - t0
        assert slow.pending(), "the slow requests ended before the swap: raise SLOW_MS"
        assert "o3" not in load.run_for(0.3, BOUND, "traffic after the removal")
        results = slow.join(SLOW_MS / 1000 + BOUND)
        assert all(status == 200 for status, _ in results), results
        assert "o3" in {origin for _, origin in results}  # in flight across the swap
        origins["o3"].stop()
        wait_for(converged(load, {"o1", "o2"}), BOUND, "traffic on o1+o2 after o3 stops")
        assert load.failures == [], load.failures[:5]

        # a config reload (a hot key changed) keeps the discovered endpoints in force
        cfg.write_text(cfg.read_text().replace("workers = 2", "workers = 2\nvia = \"edge\""))
        d.signal(signal.SIGHUP)
        wait_for(lambda: d.status()["reloads"]["ok"] >= 1, BOUND, "reload")
        wait_for(published(d, "default", 2), BOUND, "workers on the reloaded snapshot")
        assert load.run_for(0.3, BOUND, "traffic after the reload") == {"o1", "o2"}

        # a reload that changes the discovery source but is refused late (its new listener
        # cannot be bound) leaves the running source in force: the watcher is untouched
        busy = socket.socket()
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        good = cfg.read_text()
        try:
            cfg.write_text(good.replace(f"127.0.0.1:{port}", f"127.0.0.1:{busy.getsockname()[1]}")
                           .replace('service = "api.test"', 'service = "other.test"'))
            d.signal(signal.SIGHUP)
            wait_for(lambda: d.status()["reloads"]["failed"] >= 1, BOUND, "reload refused")
        finally:
            busy.close()
        st = d.status()
        assert st["reloads"]["last"]["ok"] is False and st["reloads"]["ok"] == 1
        cluster = st["discovery"]["clusters"]["default"]
        assert (cluster["service"], cluster["state"]) == ("api.test", "discovered"), cluster
        wait_for(published(d, "default", 2), BOUND, "workers still on the zone's set")
        cfg.write_text(good)  # the file watcher reloads the good config back
        wait_for(lambda: d.status()["reloads"]["ok"] >= 2, BOUND, "reload of the good config")

        # 3. the registry goes away: last known good stays, status says stale
        t0 = time.monotonic()
        dnsmasq.stop()
        wait_for(lambda: provider(d, "dns")["state"] == "stale", BOUND + 5, "provider state stale")
        timings["stale"] = time.monotonic() - t0
        wait_for(lambda: (metric(d, "dispa_discovery_staleness_seconds",
                                  'provider="dns"') or 0) >= 1.0, BOUND,
                 "staleness metric growing")
        assert load.run_for(1.0, BOUND, "traffic during the outage") == {"o1", "o2"}
        st = d.status()
        assert st["discovery"]["clusters"]["default"]["endpoints"] == 2
        assert (metric(d, "dispa_discovery_errors_total", 'provider="dns"') or 0) >= 1

        # 4. it returns, with o2 gone from the zone: Dispa resyncs
        dnsmasq.set_hosts(_hosts("o1"), reload=False)
        t0 = time.monotonic()
        dnsmasq.start()
        wait_for(lambda: provider(d, "dns")["state"] == "ok", BOUND + 5, "provider state ok again")
        wait_for(published(d, "default", 1), BOUND + 5, "every worker on o1 only")
        wait_for(converged(load, {"o1"}), BOUND + 5, "traffic on o1 only")
        timings["resync"] = time.monotonic() - t0
        load.finish()
        assert metric(d, "dispa_discovery_endpoints", 'cluster="default"') == 1.0
        assert (metric(d, "dispa_discovery_updates_total", 'provider="dns"') or 0) >= 4

        # 5. an authoritative empty answer (NXDOMAIN) empties the cluster: 503
        dnsmasq.set_hosts({})

        def answered_503():
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            try:
                c.request("GET", "/", headers={"Host": "example.com"})
                return c.getresponse().status == 503
            finally:
                c.close()
        wait_for(answered_503, BOUND, "503 for an empty cluster")
        st = wait_for(published(d, "default", 0), BOUND, "every worker on the empty set")
        assert st["discovery"]["providers"]["dns"]["state"] == "ok"
        print_timings("discovery", timings, load)
    finally:
        if load is not None:
            load.stop()
        code = d.stop()
    assert code == 0, d.log()


# ---------------------------------------------------------------- the provider itself

def _provider(resolvers, **dns):
    from dispa.discovery.config import DnsOptions, ServiceDiscoveryConfig
    from dispa.discovery.dns import DnsProvider
    opts = DnsOptions(resolvers=resolvers, **dns)
    return DnsProvider("dns", ServiceDiscoveryConfig(provider="dns", dns=opts), [])


def test_srv_priority_and_weight_from_a_real_server(dnsmasq):
    import asyncio
    from dispa.discovery.config import DiscoverySource
    dnsmasq.set_hosts({"t1.test": ["127.0.0.21"], "t2.test": ["127.0.0.22"],
                       "t3.test": ["127.0.0.23"]}, reload=False)
    name = "_http._tcp.api.test"
    dnsmasq.set_srv([(name, "gone.test", 9000, 1, 10),   # best priority, does not resolve
                     (name, "t1.test", 8001, 10, 60), (name, "t2.test", 8002, 10, 0),
                     (name, "t3.test", 8003, 20, 100)])
    dnsmasq.start()
    p = _provider([dnsmasq.address], timeout=1)
    endpoints, _ = asyncio.run(p.resolve(DiscoverySource(service=name)))
    assert sorted((e.host, e.port, e.weight) for e in endpoints) == [
        ("127.0.0.21", 8001, 60), ("127.0.0.22", 8002, 1)]
    # the priority-10 group disappears: the priority-20 group takes over
    dnsmasq.set_srv([(name, "t3.test", 8003, 20, 100)])
    dnsmasq.restart()
    p = _provider([dnsmasq.address], timeout=1)
    endpoints, _ = asyncio.run(p.resolve(DiscoverySource(service=name)))
    assert [(e.host, e.port, e.weight) for e in endpoints] == [("127.0.0.23", 8003, 100)]


def test_failover_across_resolvers_and_negative_caching(tmp_path, dnsmasq):
    import asyncio
    import socket
    from dispa.discovery.config import DiscoverySource
    dnsmasq.set_hosts({"api.test": ["127.0.0.11"]}, reload=False)
    dnsmasq.start()
    # resolver 1 never answers (timeout); resolver 2 is a real server that refuses the name
    # (not its zone); resolver 3 has the zone
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    silent.bind(("127.0.0.1", 0))
    refusing = Dnsmasq(tmp_path / "other", domain="other").start()
    try:
        p = _provider([f"127.0.0.1:{silent.getsockname()[1]}", refusing.address,
                       dnsmasq.address], timeout=0.3, negative_ttl=30, min_ttl=1)
        source = DiscoverySource(service="api.test", record="A", port=80)

        async def main():
            endpoints, _ = await p.resolve(source)
            assert [e.host for e in endpoints] == ["127.0.0.11"]
            assert p.resolver_failures == [1, 1, 0]
            assert p.status()["preferred_resolver"] == dnsmasq.address
            # NXDOMAIN is an answer: cached for negative_ttl, no query while it lasts
            gone = DiscoverySource(service="gone.test", record="A", port=80)
            assert (await p.resolve(gone))[0] == ()
            queries = p.queries
            assert (await p.resolve(gone))[0] == ()
            assert p.queries == queries and p.cache.is_negative("gone.test.", "A")
            # every resolver failing is an error, never an empty answer
            dnsmasq.stop()
            fresh = DiscoverySource(service="new.test", record="A", port=80)
            try:
                await p.resolve(fresh)
            except Exception as exc:
                assert type(exc).__name__ == "DnsError"
            else:
                raise AssertionError("a failed resolution must raise")
        asyncio.run(main())
    finally:
        silent.close()
        refusing.stop()
