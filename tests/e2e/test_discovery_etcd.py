"""etcd service discovery end to end: a real etcd (Debian's etcd-server), real origins, a
real dispa-server whose target group ``api`` comes from the key prefix ``/services/api/``.

Each origin is one key (``/services/api/<name>`` = ``{"host", "port"}``), written by the
test as an instance's agent would. While a bounded keep-alive load runs through Dispa:

* instances are added: traffic reaches them;
* an instance deregisters gracefully (its key is deleted, it keeps serving until Dispa has
  stopped sending to it, then exits): zero failed requests;
* etcd is stopped: traffic continues on the last known good set, /admin/status and the
  staleness metric say ``stale``;
* etcd returns and the prefix changes before Dispa has reconnected: Dispa resumes its watch
  from the last revision it saw (no re-list) and resyncs;
* Dispa registers itself under ``/dispa/nodes/`` with a lease it keeps alive, and revokes
  it on graceful shutdown (the key goes at once, not at lease expiry).

The bound: the watch event (milliseconds) + the watcher's throttle (0.5 s) + the snapshot
swap. After etcd returns, the reconnect backoff (0.5 s doubling from the first failure,
capped at 30 s; reset on success) adds up to a few seconds. We assert ``BOUND`` /
``RESYNC_BOUND``, generous for a loaded 2-core CI machine, and print what we measured.
"""

from __future__ import annotations

import json
import time

import pytest

from tests.support.discovery_load import Load, converged, discovered_api, metric, outage, \
    print_timings, provider, published, start_origins, write_config
from tests.support.dispa_proc import DispaProcess, free_port, wait_for
from tests.support.etcd_server import EtcdServer, etcd_available
from tests.support.origin import Origin

THROTTLE = 0.5
BOUND = 8.0  # seconds: event + throttle + apply, with headroom for a busy machine
# (under refresh_interval = 10: a change must arrive by the watch, not a re-created one)
RESYNC_BOUND = 40.0  # after etcd returns: one reconnect backoff (capped at 30 s) + BOUND
PREFIX = "/services/api/"
NODE_KEY = "/dispa/nodes/dispa-e2e"
REGISTER_TTL = 10  # long enough that "gone at once" cannot be a lease expiry


@pytest.fixture
def etcd(tmp_path):
    etcd_available()
    server = EtcdServer(tmp_path / "etcd").start()
    yield server
    server.stop()


@pytest.fixture
def origins():
    yield from start_origins(("o1", "o2", "o3", "o4"))


def _announce(etcd: EtcdServer, origin: Origin) -> int:
    return etcd.put(PREFIX + origin.name, {"host": origin.host, "port": origin.port,
                                           "meta": {"name": origin.name}})


def _config(tmp_path, etcd: EtcdServer, port: int, admin_port: int, static_url: str):
    group = discovered_api("etcd", static_url, f'service = "{PREFIX}"\n')
    return write_config(tmp_path, port, admin_port, group + f"""\
throttle = {THROTTLE}
refresh_interval = 10

[service_discovery.etcd]
endpoints = ["{etcd.url}"]
dial_timeout = 2

[service_discovery.register]
service = "/dispa/nodes"
id = "dispa-e2e"
address = "127.0.0.1"
ttl = {REGISTER_TTL}
""")


def _provider(d: DispaProcess) -> dict:
    return provider(d, "etcd")


def _staleness_metric(d: DispaProcess) -> float:
    value = metric(d, "dispa_discovery_staleness_seconds", 'provider="etcd"')
    assert value is not None, "no dispa_discovery_staleness_seconds for etcd"
    return value


def test_etcd_discovery_follows_the_prefix_under_load(tmp_path, etcd, origins):
    static = Origin("static").start()
    _announce(etcd, origins["o1"])
    _announce(etcd, origins["o2"])
    port, admin = free_port(), free_port()
    d = DispaProcess(_config(tmp_path, etcd, port, admin, static.url), port=port,
                     admin_port=admin)
    load = None
    timings = {}
    try:
        d.wait_ready(workers=2)
        # the master waited for the first answer: the workers started on o1 and o2
        wait_for(published(d, "api", 2), BOUND, "every worker on o1+o2")
        assert _provider(d)["state"] == "ok"

        # self-registration: Dispa's own key, on a lease
        wait_for(lambda: NODE_KEY in etcd.get_prefix("/dispa/nodes/"), BOUND, "Dispa's key")
        node = json.loads(etcd.get_prefix("/dispa/nodes/")[NODE_KEY])
        assert (node["host"], node["port"]) == ("127.0.0.1", port)
        lease = etcd.lease_of(NODE_KEY)
        assert lease and 0 < etcd.lease_ttl(lease) <= REGISTER_TTL
        registered_at = time.monotonic()

        load = Load(port).start()
        wait_for(converged(load, {"o1", "o2"}), BOUND, "traffic on o1+o2")

        # 1. instances register: traffic reaches them
        t0 = time.monotonic()
        _announce(etcd, origins["o3"])
        wait_for(lambda: "o3" in load.served_since(t0), BOUND, "traffic reaching o3")
        timings["add"] = time.monotonic() - t0
        wait_for(converged(load, {"o1", "o2", "o3"}), BOUND, "traffic on o1..o3")

        # 2. o2 deregisters gracefully: it serves until Dispa has stopped sending to it
        wait_for(published(d, "api", 3), BOUND, "every worker with o3")
        t0 = time.monotonic()
        etcd.delete(PREFIX + "o2")
        wait_for(published(d, "api", 2), BOUND, "every worker without o2")
        timings["deregister"] = time.monotonic() - t0
        assert "o2" not in load.run_for(0.3, BOUND, "traffic after the removal")
        origins["o2"].stop()
        wait_for(converged(load, {"o1", "o3"}), BOUND, "traffic on o1+o3")
        assert load.failures == [], load.failures[:5]

        # 3. etcd goes away: the last known good set stays, status says stale
        timings["stale"] = outage(d, load, "etcd", "api", {"o1", "o3"}, BOUND, etcd.kill)

        # 4. etcd returns and, before Dispa has reconnected, o4 registers and o1 is
        #    scaled away (still up, so the late removal costs nothing): Dispa resyncs
        etcd.start()
        t0 = time.monotonic()
        _announce(etcd, origins["o4"])
        etcd.delete(PREFIX + "o1")
        wait_for(lambda: _provider(d)["state"] == "ok", RESYNC_BOUND, "provider ok again")
        wait_for(published(d, "api", 2), RESYNC_BOUND, "every worker on o3+o4")
        wait_for(converged(load, {"o3", "o4"}), RESYNC_BOUND, "traffic on o3+o4")
        timings["resync"] = time.monotonic() - t0
        assert _staleness_metric(d) == 0
        load.finish()
        assert "static" not in load.served_since(0)  # the group's traffic never fell back
        prov = _provider(d)
        # resumed from its revision: the outage cost no re-list
        assert prov["services"][PREFIX]["relists"] == 1
        assert prov["reconnects"] >= 1

        # the registration was kept alive past its TTL (same lease), and survived the
        # etcd restart
        wait_for(lambda: time.monotonic() - registered_at > REGISTER_TTL + 1, 2 * REGISTER_TTL,
                 "one TTL past the registration")
        assert etcd.lease_of(NODE_KEY) == lease and etcd.lease_ttl(lease) > 0
        print_timings("etcd discovery", timings, load)
    finally:
        if load is not None:
            load.stop()
        code = d.stop()
        static.stop()
    assert code == 0, d.log()
    # graceful shutdown revoked the lease: the key is gone now, not REGISTER_TTL later
    assert NODE_KEY not in etcd.get_prefix("/dispa/nodes/")
    assert etcd.lease_ttl(lease) == -1
