"""Consul service discovery end to end: the Consul double (tests/support/consul_double.py,
the documented HTTP API with real blocking queries), real origins, a real dispa-server.

The target group ``api`` is discovered from the Consul service ``api`` (passing instances
only); a routing default sends every request to it. While a bounded keep-alive load runs:

* an instance is registered: traffic reaches it within ``BOUND``;
* an instance is deregistered while it keeps serving, and stopped only once /admin/status
  shows every worker on the set without it: zero failed requests;
* Dispa registered itself (TTL check kept passing well past its TTL) and shows the KV
  keys (digests, not values); a reload that changes the registration replaces it;
* the registry is stopped: traffic continues on the last known good set, status ``stale``,
  the staleness metric grows;
* the registry returns with a changed catalog: Dispa resyncs;
* Dispa stops (SIGTERM): it deregistered itself.

The bound: a blocking query answers at once, then the watcher's throttle (0.5 s) and the
snapshot swap; we assert ``BOUND`` seconds, generous for a loaded 2-core CI machine, and
print what we measured.
"""

from __future__ import annotations

import time
from contextlib import closing

import pytest

from dispa.discovery.consul import kv_digest
from tests.support.consul_double import ConsulDouble
from tests.support.discovery_load import Load, converged, metric, print_timings, provider, \
    published, start_origins, write_config
from tests.support.dispa_proc import DispaProcess, free_port, wait_for
from tests.support.origin import Origin

THROTTLE = 0.5
BOUND = 8.0  # seconds: blocking query + throttle + apply, with headroom for a busy machine
# (well under refresh_interval = 30: a change must arrive by the blocking query, not a poll)
RESYNC_BOUND = 25.0  # + one reconnect backoff (jittered, doubling to its 15 s cap) + BOUND
SELF_TTL = 1.0
SELF_ID = "dispa-e2e"


@pytest.fixture
def consul():
    with closing(ConsulDouble(reap_interval=0.2).start()) as d:
        yield d


@pytest.fixture
def origins():
    yield from start_origins(("o1", "o2", "o3"))


def _register(consul: ConsulDouble, origin: Origin) -> None:
    code, _, text = consul.api("PUT", "/v1/agent/service/register", {
        "ID": origin.name, "Name": "api", "Address": "127.0.0.1", "Port": origin.port,
        "Tags": ["e2e"], "Check": {"TTL": "10m", "Status": "passing"}})
    assert code == 200, text


def _config(tmp_path, consul: ConsulDouble, port: int, admin_port: int):
    return write_config(tmp_path, port, admin_port, f"""
[[targets.targets]]
name = "unused"
url = "http://127.0.0.1:9"

[targets.health_check]
enabled = false

[[target_groups]]
name = "api"
targets = []
[target_groups.discovery]
provider = "consul"
service = "api"
tags = ["e2e"]
passing_only = true
[target_groups.health_check]
enabled = false

[routing]
default_target = "api"

[service_discovery]
provider = "consul"
consul_address = "{consul.address}"
refresh_interval = 30
health_check_integration = true
throttle = {THROTTLE}

[service_discovery.consul]
kv_prefix = "dispa/"

[service_discovery.register]
service = "dispa"
id = "{SELF_ID}"
ttl = {SELF_TTL}
tags = ["edge"]
""")


def _consul_state(d: DispaProcess) -> str:
    return provider(d, "consul")["state"]


def test_consul_discovery_follows_the_catalog_under_load(tmp_path, consul, origins):
    _register(consul, origins["o1"])
    _register(consul, origins["o2"])
    consul.api("PUT", "/v1/kv/dispa/mode", b"blue")
    port, admin = free_port(), free_port()
    cfg = _config(tmp_path, consul, port, admin)
    d = DispaProcess(cfg, port=port, admin_port=admin)
    load = None
    timings: dict[str, float] = {}
    try:
        d.wait_ready(workers=2)
        # the master waited for the first answer: the workers started on o1 and o2
        st = wait_for(published(d, "api", 2), BOUND, "every worker on o1+o2")
        assert st["discovery"]["providers"]["consul"]["state"] == "ok"
        load = Load(port).start()
        wait_for(converged(load, {"o1", "o2"}), BOUND, "traffic on o1+o2")

        # 1. a new instance: reached within the bound (the blocking query answers at once)
        t0 = time.monotonic()
        _register(consul, origins["o3"])
        wait_for(lambda: "o3" in load.served_since(t0), BOUND, "traffic reaching o3")
        timings["add"] = time.monotonic() - t0
        wait_for(converged(load, {"o1", "o2", "o3"}), BOUND, "traffic on o1+o2+o3")

        # 2. graceful deregistration: deregister, wait until no worker routes to o3, stop it
        wait_for(published(d, "api", 3), BOUND, "every worker with o3")
        t0 = time.monotonic()
        code, _, _ = consul.api("PUT", "/v1/agent/service/deregister/o3")
        assert code == 200
        wait_for(published(d, "api", 2), BOUND, "every worker without o3")
        timings["remove"] = time.monotonic() - t0
        assert "o3" not in load.run_for(0.3, BOUND, "traffic after the removal")
        origins["o3"].stop()
        wait_for(converged(load, {"o1", "o2"}), BOUND, "traffic on o1+o2 after o3 stops")
        assert load.failures == [], load.failures[:5]

        # 3. Dispa registered itself; its TTL check stays passing well past the TTL
        wait_for(lambda: consul.service_ids("dispa") == [SELF_ID], BOUND, "self-registration")
        entry = consul.api("GET", "/v1/health/service/dispa?passing")[2]
        assert [(e["Service"]["Port"], e["Service"]["Tags"]) for e in entry] == [(port, ["edge"])]
        t_end = time.monotonic() + 3 * SELF_TTL
        while time.monotonic() < t_end:  # sampled over three TTLs, every 50 ms
            assert consul.check_status(SELF_ID) == "passing"
            time.sleep(0.05)
        st = d.status()["discovery"]
        assert st["registered"]["id"] == SELF_ID
        assert st["providers"]["consul"]["kv"]["keys"] == {"mode": kv_digest("blue")}
        consul.api("PUT", "/v1/kv/dispa/mode", b"green")
        wait_for(lambda: d.status()["discovery"]["providers"]["consul"]["kv"]["keys"]
                 == {"mode": kv_digest("green")}, BOUND, "the KV change in status")

        # a reload that changes [service_discovery.register] replaces the registration
        cfg.write_text(cfg.read_text().replace('tags = ["edge"]', 'tags = ["edge", "v2"]'))
        wait_for(lambda: [e["Service"]["Tags"] for e in consul.api(
            "GET", "/v1/health/service/dispa?passing")[2]] == [["edge", "v2"]], BOUND,
            "the registration with the reloaded tags")
        assert consul.service_ids("dispa") == [SELF_ID]

        # 4. the registry goes away: the last known good set stays, status says stale
        t0 = time.monotonic()
        consul.stop()
        wait_for(lambda: _consul_state(d) == "stale", BOUND, "provider state stale")
        timings["stale"] = time.monotonic() - t0
        wait_for(lambda: (metric(d, "dispa_discovery_staleness_seconds",
                                 'provider="consul"') or 0) >= 1.0, BOUND,
                 "staleness metric growing")
        assert load.run_for(1.0, BOUND, "traffic during the outage") == {"o1", "o2"}
        st = d.status()["discovery"]
        assert st["clusters"]["api"]["endpoints"] == 2
        assert st["providers"]["consul"]["last_error"]

        # 5. it returns with o2 gone from its catalog: Dispa resyncs
        consul.remove_service("o2")
        t0 = time.monotonic()
        consul.start()
        wait_for(lambda: _consul_state(d) == "ok", RESYNC_BOUND, "provider state ok again")
        wait_for(published(d, "api", 1), BOUND, "every worker on o1 only")
        wait_for(converged(load, {"o1"}), BOUND, "traffic on o1 only")
        timings["resync"] = time.monotonic() - t0
        load.finish()
        print_timings("consul discovery", timings, load)
    finally:
        if load is not None:
            load.stop()
        code = d.stop()
    assert code == 0, d.log()
    # 6. graceful shutdown deregistered Dispa (not the reaper: that needs a critical minute)
    assert consul.service_ids("dispa") == []
    assert any(m == "PUT" and p == f"/v1/agent/service/deregister/{SELF_ID}"
               for m, p, _, _ in consul.requests)
