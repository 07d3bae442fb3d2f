"""Dynamic configuration from Consul KV end to end: the Consul double
(tests/support/consul_double.py), real origins, a real dispa-server.

The file routes everything to the target group ``web`` (origin ``web``); ``kv_prefix =
"dispa/config/"``. Then, while Dispa keeps running (no reload of the file, no restart):

* a fragment ``api.toml`` adds the target group ``api`` (origin ``api``) and a rule sending
  ``/api`` to it: ``/api`` reaches ``api`` within ``BOUND``, ``/`` still reaches ``web``;
  a reload of the file keeps it;
* an invalid fragment (a rule naming an unknown target) is refused: routing is unchanged
  and /admin/status shows the error with the provider, key, field and line;
* ``api.toml`` replaced by an invalid version: refused, the last good one stays in force;
* a fragment whose target group is itself discovered from Consul (the reload restarts the
  provider that delivered it): its rule reaches the discovered instance;
* ``api.toml`` deleted: ``/api`` goes back to ``web``.
"""

from __future__ import annotations

import time
from contextlib import closing

import pytest

from tests.support.consul_double import ConsulDouble
from tests.support.discovery_load import served_by as _served_by, start_origins, write_config
from tests.support.dispa_proc import DispaProcess, free_port, wait_for

BOUND = 8.0  # seconds: blocking query answer + validate + compile + apply on 2 workers

FRAGMENT = """
[[target_groups]]
name = "api"
targets = [{{ name = "api-1", url = "{url}" }}]
[target_groups.health_check]
enabled = false

[[routing.rules]]
name = "api"
priority = 10
target = "api"
[routing.rules.conditions.path]
prefix = "/api"
"""

DISCOVERED = """
[[target_groups]]
name = "disc"
targets = []
[target_groups.discovery]
service = "disc"
[target_groups.health_check]
enabled = false

[[routing.rules]]
name = "disc"
target = "disc"
[routing.rules.conditions.path]
prefix = "/disc"
"""

BAD = """
[[routing.rules]]
name = "broken"

target = "nowhere"
"""


@pytest.fixture
def consul():
    with closing(ConsulDouble().start()) as d:
        yield d


@pytest.fixture
def origins():
    yield from start_origins(("web", "api", "disc"))


def test_consul_kv_fragments_change_routing_without_a_restart(tmp_path, consul, origins):
    port, admin = free_port(), free_port()
    cfg = write_config(tmp_path, port, admin, f"""
[[targets.targets]]
name = "unused"
url = "http://127.0.0.1:9"
[targets.health_check]
enabled = false

[[target_groups]]
name = "web"
targets = [{{ name = "web-1", url = "{origins['web'].url}" }}]
[target_groups.health_check]
enabled = false

[routing]
default_target = "web"

[service_discovery]
provider = "consul"
consul_address = "{consul.address}"
refresh_interval = 30

[service_discovery.consul]
kv_prefix = "dispa/config/"
""")
    d = DispaProcess(cfg, port=port, admin_port=admin)
    try:
        d.wait_ready(workers=2)
        assert _served_by(port, "/api/x") == "web"
        pid = d.status()["master_pid"]
        reloads = d.status()["reloads"]["ok"]

        # 1. a fragment adds a target group and a rule: reached within the bound
        t0 = time.monotonic()
        code, _, _ = consul.api("PUT", "/v1/kv/dispa/config/api.toml",
                                FRAGMENT.format(url=origins["api"].url).encode())
        assert code == 200
        wait_for(lambda: _served_by(port, "/api/x") == "api", BOUND, "/api on the new group")
        took = time.monotonic() - t0
        print(f"consul fragment -> traffic on the new group: {took:.2f}s (bound {BOUND}s)")
        assert _served_by(port, "/other") == "web"
        st = d.status()
        assert st["master_pid"] == pid
        dyn = st["dynamic_config"]
        assert dyn["providers"]["consul"]["keys"] == ["api.toml"]
        assert dyn["errors"] == {}
        assert st["reloads"]["ok"] == reloads + 1  # the reload path, the file not re-read
        # the names are qualified: the group is api@consul, next to the file's web
        assert {"api@consul", "web"} <= {c["name"] for c in d_config_groups(d)}
        # a reload of the file keeps the fragments in force, merged into the new file
        cfg.write_text(cfg.read_text() + "\n# touched\n")
        wait_for(lambda: d.status()["reloads"]["ok"] == reloads + 2, BOUND, "the reload")
        assert _served_by(port, "/api/x") == "api"

        # 2. an invalid fragment: refused, routing unchanged, the error in the status
        consul.api("PUT", "/v1/kv/dispa/config/bad.toml", BAD.encode())
        wait_for(lambda: "consul:bad.toml" in d.status()["dynamic_config"]["errors"], BOUND,
                 "the refused fragment in the status")
        [err] = d.status()["dynamic_config"]["errors"]["consul:bad.toml"]
        assert err["file"] == "consul:bad.toml"
        assert err["path"] == "routing.rules[0].target"
        assert err["line"] == 5
        assert "nowhere@consul" in err["message"]
        assert _served_by(port, "/api/x") == "api"
        assert _served_by(port, "/") == "web"
        assert d.status()["dynamic_config"]["providers"]["consul"]["keys"] == ["api.toml"]

        # 3. the good fragment replaced by a broken one: the last good version stays
        consul.api("PUT", "/v1/kv/dispa/config/api.toml", b"[[target_groups]]\nname = 1\n")
        wait_for(lambda: "consul:api.toml" in d.status()["dynamic_config"]["errors"], BOUND,
                 "the broken api.toml in the status")
        assert _served_by(port, "/api/x") == "api"

        # a fragment's group may itself be discovered: the reload restarts the provider
        # that delivered the fragment (with the new service to watch), and its KV again
        code, _, text = consul.api("PUT", "/v1/agent/service/register", {
            "ID": "disc-1", "Name": "disc", "Address": "127.0.0.1",
            "Port": origins["disc"].port, "Check": {"TTL": "10m", "Status": "passing"}})
        assert code == 200, text
        consul.api("PUT", "/v1/kv/dispa/config/disc.toml", DISCOVERED.encode())
        wait_for(lambda: _served_by(port, "/disc") == "disc", BOUND, "/disc via discovery")
        assert _served_by(port, "/api/x") == "api"
        consul.api("DELETE", "/v1/kv/dispa/config/disc.toml")
        wait_for(lambda: _served_by(port, "/disc") == "web", BOUND, "/disc gone")

        # 4. deleted (both keys): /api falls back to the default target
        t0 = time.monotonic()
        consul.api("DELETE", "/v1/kv/dispa/config/?recurse")
        wait_for(lambda: _served_by(port, "/api/x") == "web", BOUND, "/api back on web")
        print(f"consul fragment deleted -> rule gone: {time.monotonic() - t0:.2f}s")
        dyn = d.status()["dynamic_config"]
        assert dyn["providers"] == {} and dyn["errors"] == {}
        assert "api@consul" not in {c["name"] for c in d_config_groups(d)}
    finally:
        d.stop()


def d_config_groups(d: DispaProcess) -> list[dict]:
    import json
    code, body = d.admin_get("/admin/config")
    assert code == 200
    return json.loads(body)["target_groups"]
