"""The Consul double against the documented HTTP API semantics (api-docs: health, catalog,
agent, kv, features/blocking, ACL errors), so that the provider tests prove something."""

from __future__ import annotations

import base64
import threading
import time

import pytest

from tests.support.consul_double import ConsulDouble, parse_duration
from tests.support.dispa_proc import wait_for


@pytest.fixture
def consul():
    d = ConsulDouble(datacenters=("dc2",), reap_interval=0.05, min_deregister_after=0.3).start()
    yield d
    d.close()


def _register(d: ConsulDouble, sid: str, **extra) -> None:
    body = {"ID": sid, "Name": extra.pop("name", "api"), "Port": extra.pop("port", 8080),
            **extra}
    status, _, text = d.api("PUT", "/v1/agent/service/register", body)
    assert status == 200, text


def _blocking_get(d: ConsulDouble, path: str) -> dict:
    """Start a GET in a thread; the dict gets 'status', 'index', 'body', 'elapsed'."""
    out: dict = {}

    def run() -> None:
        t0 = time.monotonic()
        status, headers, body = d.api("GET", path, timeout=30)
        out.update(status=status, index=int(headers["x-consul-index"]), body=body,
                   elapsed=time.monotonic() - t0)
    t = threading.Thread(target=run, daemon=True)
    t.start()
    out["thread"] = t
    return out


def _wait_blocked(d: ConsulDouble, index: str) -> None:
    """Until the double has received the blocking request (so a write comes after it)."""
    wait_for(lambda: any(q.get("index") == index for _, _, q, _ in d.requests), timeout=5,
             what="the blocking request")


def test_parse_duration_is_go_syntax():
    assert parse_duration("10s") == 10.0
    assert parse_duration("1m30s") == 90.0
    assert parse_duration("250ms") == 0.25
    assert parse_duration("5") == 5.0
    for bad in ("", "s", "10x", "1m 2s"):
        with pytest.raises(ValueError):
            parse_duration(bad)


def test_health_service_documented_shape_and_node_address_fallback(consul):
    _register(consul, "api-1", Address="127.0.0.2", Tags=["v1"], Meta={"zone": "a"},
              Weights={"Passing": 5, "Warning": 1}, Check={"TTL": "30s", "Status": "passing"})
    status, _, ok = consul.api("PUT", "/v1/catalog/register", {
        "Node": "web-2", "Address": "127.0.0.9", "Service": {"ID": "api-2", "Service": "api",
                                                             "Port": 9090}})
    assert (status, ok) == (200, True)
    status, headers, body = consul.api("GET", "/v1/health/service/api")
    assert status == 200 and int(headers["x-consul-index"]) >= 1
    assert [set(e) for e in body] == [{"Node", "Service", "Checks"}] * 2
    by_id = {e["Service"]["ID"]: e for e in body}
    svc = by_id["api-1"]["Service"]
    assert {"ID", "Service", "Tags", "Address", "Port", "Meta", "Weights"} <= set(svc)
    assert svc["Weights"] == {"Passing": 5, "Warning": 1}
    assert (svc["Address"], svc["Port"], svc["Tags"], svc["Meta"]) == \
        ("127.0.0.2", 8080, ["v1"], {"zone": "a"})
    # registered without an address: Service.Address is empty, Node.Address is the host
    other = by_id["api-2"]
    assert other["Service"]["Address"] == "" and other["Node"]["Address"] == "127.0.0.9"
    checks = {c["CheckID"]: c for c in by_id["api-1"]["Checks"]}
    assert checks["serfHealth"]["Status"] == "passing"
    assert checks["service:api-1"]["Status"] == "passing"
    assert checks["service:api-1"]["ServiceID"] == "api-1"
    # catalog: the flat shape
    status, _, flat = consul.api("GET", "/v1/catalog/service/api")
    row = {r["ServiceID"]: r for r in flat}["api-2"]
    assert (row["ServiceAddress"], row["Address"], row["ServicePort"]) == ("", "127.0.0.9", 9090)


def test_ttl_check_starts_critical_passing_filter_expiry_and_reaping(consul):
    _register(consul, "api-1", Check={"TTL": "400ms", "DeregisterCriticalServiceAfter": "1s"})
    assert consul.check_status("api-1") == "critical"  # Consul: TTL checks start critical
    assert consul.api("GET", "/v1/health/service/api?passing")[2] == []
    assert len(consul.api("GET", "/v1/health/service/api")[2]) == 1
    assert consul.api("PUT", "/v1/agent/check/pass/service:api-1")[0] == 200
    assert [e["Service"]["ID"] for e in consul.api("GET", "/v1/health/service/api?passing")[2]] \
        == ["api-1"]
    # no pass within the TTL: critical, "TTL expired"
    wait_for(lambda: consul.check_status("api-1") == "critical", timeout=3)
    checks = consul.api("GET", "/v1/health/service/api")[2][0]["Checks"]
    assert {c["CheckID"]: c["Output"] for c in checks}["service:api-1"] == "TTL expired"
    # critical longer than DeregisterCriticalServiceAfter: the reaper removes the service
    wait_for(lambda: consul.service_ids("api") == [], timeout=5)
    assert consul.api("PUT", "/v1/agent/check/pass/service:api-1")[0] == 404


def test_every_write_moves_the_index_and_queries_report_it(consul):
    _, h, _ = consul.api("GET", "/v1/health/service/api")
    first = int(h["x-consul-index"])
    _register(consul, "api-1", Check={"TTL": "30s"})
    _, h, _ = consul.api("GET", "/v1/health/service/api")
    after_register = int(h["x-consul-index"])
    assert after_register > first
    consul.api("PUT", "/v1/agent/check/pass/service:api-1")
    _, h, _ = consul.api("GET", "/v1/health/service/api")
    assert int(h["x-consul-index"]) > after_register  # a check change is a change
    # an unrelated service's write does not move this service's index
    before = int(h["x-consul-index"])
    _register(consul, "db-1", name="db")
    _, h, _ = consul.api("GET", "/v1/health/service/api")
    assert int(h["x-consul-index"]) == before and consul.index > before


def test_blocking_query_returns_promptly_on_change(consul):
    _, h, _ = consul.api("GET", "/v1/health/service/api?passing")
    index = int(h["x-consul-index"])
    pending = _blocking_get(consul, f"/v1/health/service/api?passing&index={index}&wait=20s")
    _wait_blocked(consul, str(index))
    assert "status" not in pending
    _register(consul, "api-1", Check={"TTL": "30s", "Status": "passing"})
    pending["thread"].join(10)
    assert pending["status"] == 200 and pending["index"] > index
    assert pending["elapsed"] < 5  # far below wait=20s
    assert [e["Service"]["ID"] for e in pending["body"]] == ["api-1"]


def test_blocking_query_without_change_waits_until_wait_then_answers(consul):
    _, h, _ = consul.api("GET", "/v1/health/service/api")
    index = int(h["x-consul-index"])
    t0 = time.monotonic()
    status, h2, body = consul.api("GET", f"/v1/health/service/api?index={index}&wait=500ms")
    elapsed = time.monotonic() - t0
    assert status == 200 and int(h2["x-consul-index"]) == index and body == []
    assert 0.45 <= elapsed < 5  # answered at wait, not at a 10 s default
    # index=0 never blocks
    t0 = time.monotonic()
    consul.api("GET", "/v1/health/service/api?index=0&wait=10s")
    assert time.monotonic() - t0 < 5  # far below wait=10s


def test_jitter_adds_at_most_wait_over_16():
    with ConsulDouble(jitter=True) as d:
        _, h, _ = d.api("GET", "/v1/kv/x?recurse")
        t0 = time.monotonic()
        d.api("GET", f"/v1/kv/x?recurse&index={h['x-consul-index']}&wait=800ms")
        elapsed = time.monotonic() - t0
        assert 0.8 <= elapsed < 0.8 + 0.05 + 2.0  # (+ scheduling slack on a busy host)


def test_tag_filter_requires_every_tag_and_dc_selects_the_datacenter(consul):
    _register(consul, "a", Tags=["v1", "blue"], Port=1)
    _register(consul, "b", Tags=["v1"], Port=2)
    status, _, ok = consul.api("PUT", "/v1/catalog/register", {
        "Datacenter": "dc2", "Node": "far", "Address": "127.0.0.7",
        "Service": {"ID": "c", "Service": "api", "Port": 3, "Tags": ["v1"]}})
    assert status == 200

    def ids(query: str) -> list[str]:
        body = consul.api("GET", f"/v1/health/service/api{query}")[2]
        return sorted(e["Service"]["ID"] for e in body)
    assert ids("?tag=v1") == ["a", "b"]
    assert ids("?tag=v1&tag=blue") == ["a"]
    assert ids("?dc=dc2") == ["c"]
    assert consul.api("GET", "/v1/health/service/api?dc=nowhere")[:3:2] == \
        (500, "No path to datacenter")


def test_kv_put_get_delete_recurse_base64_and_404(consul):
    status, headers, _ = consul.api("GET", "/v1/kv/cfg/?recurse")
    assert status == 404 and int(headers["x-consul-index"]) >= 1  # index even when empty
    assert consul.api("PUT", "/v1/kv/cfg/a", b"hello")[2] is True
    assert consul.api("PUT", "/v1/kv/cfg/b", "wörld".encode())[2] is True
    consul.api("PUT", "/v1/kv/other", b"x")
    status, headers, entries = consul.api("GET", "/v1/kv/cfg/?recurse")
    assert status == 200
    assert {e["Key"]: base64.b64decode(e["Value"]).decode() for e in entries} == \
        {"cfg/a": "hello", "cfg/b": "wörld"}
    assert int(headers["x-consul-index"]) == max(e["ModifyIndex"] for e in entries)
    assert consul.api("GET", "/v1/kv/cfg/a?raw")[2] == "hello"
    # a blocking query on the prefix wakes up on a write under it
    index = headers["x-consul-index"]
    pending = _blocking_get(consul, f"/v1/kv/cfg/?recurse&index={index}&wait=20s")
    _wait_blocked(consul, index)
    consul.api("DELETE", "/v1/kv/cfg/a")
    pending["thread"].join(10)
    assert pending["elapsed"] < 5 and [e["Key"] for e in pending["body"]] == ["cfg/b"]
    # the tombstone keeps the prefix index from going backwards ...
    after_delete = pending["index"]
    assert after_delete > int(index)
    assert consul.api("DELETE", "/v1/kv/cfg/?recurse")[2] is True
    status, headers, _ = consul.api("GET", "/v1/kv/cfg/?recurse")
    assert status == 404 and int(headers["x-consul-index"]) > after_delete
    # ... until the tombstones are reaped: then it does (the case clients must handle)
    consul.api("PUT", "/v1/kv/cfg/c", b"c")
    consul.api("PUT", "/v1/kv/cfg/d", b"d")
    consul.api("DELETE", "/v1/kv/cfg/d")
    _, headers, entries = consul.api("GET", "/v1/kv/cfg/?recurse")
    with_tombstone = int(headers["x-consul-index"])
    assert with_tombstone > entries[0]["ModifyIndex"]
    consul.reap_tombstones()
    _, headers, _ = consul.api("GET", "/v1/kv/cfg/?recurse")
    assert int(headers["x-consul-index"]) == entries[0]["ModifyIndex"] < with_tombstone


def test_rewind_makes_the_index_go_backwards(consul):
    _register(consul, "api-1")
    _, h, _ = consul.api("GET", "/v1/health/service/api")
    high = int(h["x-consul-index"])
    consul.rewind(3)
    _, h, _ = consul.api("GET", "/v1/health/service/api")
    assert int(h["x-consul-index"]) == 3 < high


def test_acl_tokens():
    with ConsulDouble(acl_tokens={"reader": "read", "writer": "write", "blind": "none"}) as d:
        assert d.api("GET", "/v1/health/service/api", token="bogus")[::2] == (403, "ACL not found")
        assert d.api("GET", "/v1/health/service/api")[::2] == (403, "Permission denied")
        assert d.api("GET", "/v1/health/service/api", token="reader")[0] == 200
        body = {"ID": "x", "Name": "api", "Port": 1}
        assert d.api("PUT", "/v1/agent/service/register", body, token="reader")[::2] == \
            (403, "Permission denied")
        assert d.api("PUT", "/v1/agent/service/register", body, token="writer")[0] == 200
        assert d.requests[-1][3] == "writer"
        # a valid token without service:read: Consul filters, and says so in a header
        status, headers, entries = d.api("GET", "/v1/health/service/api", token="blind")
        assert (status, entries) == (200, [])
        assert headers["x-consul-results-filtered-by-acls"] == "true"
        assert "x-consul-results-filtered-by-acls" not in d.api(
            "GET", "/v1/health/service/api", token="reader")[1]


def test_stop_keeps_state_and_start_serves_on_the_same_port(consul):
    _register(consul, "api-1")
    port = consul.port
    consul.stop()
    with pytest.raises(OSError):
        consul.api("GET", "/v1/health/service/api", timeout=2)
    consul.start()
    assert consul.port == port
    assert [e["Service"]["ID"] for e in consul.api("GET", "/v1/health/service/api")[2]] == \
        ["api-1"]


def test_unmodelled_features_are_refused_loudly(consul):
    status, _, text = consul.api("GET", "/v1/health/service/api?filter=Service.Port%3D%3D1")
    assert status == 400 and "filter" in text
