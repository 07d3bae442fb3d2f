"""Kubernetes service discovery end to end: the API double (tests/support/k8s_double.py),
real origins, a real dispa-server whose target group ``api`` comes from the EndpointSlices
of the Service ``shop/api`` through a kubeconfig.

The origins are the Service's pods: each on its own loopback address, all on one port (the
Service's named target port ``http``). While a bounded keep-alive load runs through Dispa:

* a not-ready pod becomes ready, and a new slice adds a pod: traffic reaches them;
* a pod starts terminating (ready=false, serving=true) while it keeps serving, and exits
  only once Dispa has stopped sending to it: zero failed requests; a pod turning not-ready
  leaves the set the same way;
* the API server is stopped: traffic continues on the last known good set and
  /admin/status says ``stale``;
* it returns, with slices changed meanwhile: Dispa re-watches from its resourceVersion and
  resyncs.

The bound: the watch event (milliseconds) + the watcher's throttle (0.5 s) + the snapshot
swap; after the API server returns, the reconnect backoff (0.5 s doubling, reset on
success) adds up to a few seconds. We assert ``BOUND`` seconds, generous for a loaded
2-core CI machine, and print what we measured.
"""

from __future__ import annotations

import time
from contextlib import closing

import pytest

from tests.support.discovery_load import Load, converged, discovered_api, kubeconfig, outage, \
    print_timings, provider, published, start_origins, write_config
from tests.support.dispa_proc import DispaProcess, free_port, wait_for
from tests.support.k8s_double import K8sDouble, endpoint_slice, service
from tests.support.origin import Origin

THROTTLE = 0.5
BOUND = 8.0  # seconds: event + throttle + apply, with headroom for a busy machine
# (under refresh_interval = 10: a change must arrive by the watch, not a re-list)
RESYNC_BOUND = 40.0  # after the API server returns: one backoff (capped at 30 s) + BOUND
ADDRESSES = {"o1": "127.0.0.21", "o2": "127.0.0.22", "o3": "127.0.0.23", "o4": "127.0.0.24"}
TOKEN = "e2e-token"
READY = True, True, False
NOT_READY = False, False, False
TERMINATING = False, True, True  # a pod being deleted that still serves


@pytest.fixture
def api():
    with closing(K8sDouble(token=TOKEN, bookmark_interval=1.0).start()) as d:
        yield d


@pytest.fixture
def pods():
    yield from start_origins(hosts=ADDRESSES)  # pods of one Service: one target port


def _slice(name: str, port: int, **states) -> dict:
    eps = [(ADDRESSES[n], *state) for n, state in states.items()]
    # the "metrics" port comes first: only port_name = "http" picks the right one
    return endpoint_slice("shop", "api", name, eps, ports=[("metrics", 9), ("http", port)])


def _config(tmp_path, api: K8sDouble, port: int, admin_port: int, static_url: str):
    group = discovered_api("kubernetes", static_url, 'service = "shop/api"\nport_name = "http"\n')
    return write_config(tmp_path, port, admin_port, group + f"""\
throttle = {THROTTLE}
refresh_interval = 10
health_check_integration = true

[service_discovery.kubernetes]
kubeconfig = "{kubeconfig(tmp_path, api.url, TOKEN)}"
""")


def _provider(d: DispaProcess) -> dict:
    return provider(d, "kubernetes")


def test_kubernetes_discovery_follows_endpoint_slices_under_load(tmp_path, api, pods):
    static = Origin("static").start()
    p = pods["o1"].port
    api.create(service("shop", "api", [("metrics", 9000, "metrics"), ("http", 80, "http")]))
    api.create(_slice("api-a", p, o1=READY, o2=READY, o3=NOT_READY))
    port, admin = free_port(), free_port()
    d = DispaProcess(_config(tmp_path, api, port, admin, static.url), port=port,
                     admin_port=admin)
    load = None
    timings = {}
    try:
        d.wait_ready(workers=2)
        # the master waited for the first answer: the workers started on the ready pods
        wait_for(published(d, "api", 2), BOUND, "every worker on o1+o2")
        assert _provider(d)["state"] == "ok"
        assert _provider(d)["services"]["shop/api"]["mode"] == "endpointslices"
        load = Load(port).start()
        wait_for(converged(load, {"o1", "o2"}), BOUND, "traffic on o1+o2")

        # 1. o3 turns ready; a second slice adds o4
        t0 = time.monotonic()
        api.update(_slice("api-a", p, o1=READY, o2=READY, o3=READY))
        wait_for(lambda: "o3" in load.served_since(t0), BOUND, "traffic reaching o3")
        timings["ready"] = time.monotonic() - t0
        t0 = time.monotonic()
        api.create(_slice("api-b", p, o4=READY))
        wait_for(lambda: "o4" in load.served_since(t0), BOUND, "traffic reaching o4")
        timings["add"] = time.monotonic() - t0
        wait_for(converged(load, {"o1", "o2", "o3", "o4"}), BOUND, "traffic on o1..o4")

        # 2. o4 terminates gracefully: it serves until Dispa has stopped sending to it
        wait_for(published(d, "api", 4), BOUND, "every worker with o1..o4")
        t0 = time.monotonic()
        api.update(_slice("api-b", p, o4=TERMINATING))
        wait_for(published(d, "api", 3), BOUND, "every worker without o4")
        timings["terminating"] = time.monotonic() - t0
        assert "o4" not in load.run_for(0.3, BOUND, "traffic after the removal")
        pods["o4"].stop()
        api.delete("EndpointSlice", "shop", "api-b")
        #    o2 fails its readiness probe (still up): it leaves the set the same way
        t0 = time.monotonic()
        api.update(_slice("api-a", p, o1=READY, o2=NOT_READY, o3=READY))
        wait_for(converged(load, {"o1", "o3"}), BOUND, "traffic on o1+o3")
        timings["not_ready"] = time.monotonic() - t0
        assert load.failures == [], load.failures[:5]

        # 3. the API server goes away: the last known good set stays, status says stale
        timings["stale"] = outage(d, load, "kubernetes", "api", {"o1", "o3"}, BOUND, api.stop)

        # 4. it returns; meanwhile o2 became ready again and o1 was scaled away (its pod
        #    still up, so the late removal costs nothing): Dispa resyncs
        api.update(_slice("api-a", p, o2=READY, o3=READY))
        t0 = time.monotonic()
        api.start()
        wait_for(lambda: _provider(d)["state"] == "ok", RESYNC_BOUND, "provider ok again")
        wait_for(published(d, "api", 2), RESYNC_BOUND, "every worker on o2+o3")
        wait_for(converged(load, {"o2", "o3"}), RESYNC_BOUND, "traffic on o2+o3")
        timings["resync"] = time.monotonic() - t0
        load.finish()
        assert "static" not in load.served_since(0)  # the group's traffic never fell back
        prov = _provider(d)
        # resumed from its resourceVersion: the outage cost no re-list
        assert prov["services"]["shop/api"]["lists"] == 1
        assert prov["reconnects"] >= 1
        print_timings("kubernetes discovery", timings, load)
    finally:
        if load is not None:
            load.stop()
        code = d.stop()
        static.stop()
    assert code == 0, d.log()
