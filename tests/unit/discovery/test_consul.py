"""The Consul provider against the Consul double (tests/support/consul_double.py): blocking
queries, filters, index semantics, stale/last-known-good/resync, KV, self-registration."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time

import msgspec
import pytest

from dispa.discovery.config import ConsulOptions, DiscoverySource, ServiceDiscoveryConfig
from dispa.discovery.consul import ConsulProvider, go_duration
from dispa.discovery.provider import Instance
from tests.support.consul_double import ConsulDouble


@pytest.fixture
def consul():
    d = ConsulDouble(datacenters=("dc2",), reap_interval=0.05, min_deregister_after=0.3).start()
    yield d
    d.close()


def make(consul: ConsulDouble, *sources: DiscoverySource, wait: float = 30.0,
         integration: bool = True, **consul_opts) -> ConsulProvider:
    settings = ServiceDiscoveryConfig(consul_address=consul.address, refresh_interval=wait,
                                      health_check_integration=integration,
                                      consul=ConsulOptions(**consul_opts))
    p = ConsulProvider("consul", settings, list(sources))
    p.backoff_initial, p.backoff_max = 0.05, 0.2  # registry-down tests in a second or two
    p.min_unchanged_interval = 0.2
    return p


def api(consul: ConsulDouble, sid: str, port: int, *, status: str = "passing", **extra) -> None:
    body = {"ID": sid, "Name": extra.pop("name", "api"), "Address": "127.0.0.1", "Port": port,
            "Check": {"TTL": "60s", "Status": status}, **extra}
    code, _, text = consul.api("PUT", "/v1/agent/service/register", body,
                               token=extra.pop("token", ""))
    assert code == 200, text


class Running:
    """A provider's run() as a task; ``sets`` receives every emitted EndpointSet."""

    def __init__(self, provider: ConsulProvider):
        self.provider = provider
        self.sets: asyncio.Queue = asyncio.Queue()
        self.all: list = []

    def emit(self, update) -> None:
        self.all.append(update)
        self.sets.put_nowait(update)

    async def __aenter__(self) -> "Running":
        self.task = asyncio.ensure_future(self.provider.run(self.emit))
        return self

    async def __aexit__(self, *exc) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        await self.provider.close()

    async def next(self, timeout: float = 5.0):
        return await asyncio.wait_for(self.sets.get(), timeout)

    async def until_ports(self, ports: set, timeout: float = 5.0):
        """The next emitted set whose ports are ``ports`` (earlier ones skipped)."""
        deadline = time.monotonic() + timeout
        while True:
            s = await self.next(max(0.01, deadline - time.monotonic()))
            if {e.port for e in s.endpoints} == ports:
                return s


async def until(cond, timeout: float = 5.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def blocking(consul: ConsulDouble, path: str) -> list[dict]:
    return [q for m, p, q, _ in consul.requests if p == path and "index" in q]


def test_go_duration():
    assert go_duration(15) == "15s"
    assert go_duration(0.5) == "500ms"
    assert go_duration(90) == "90s"


def test_register_and_deregister_while_watching_reach_the_set_promptly(consul):
    api(consul, "api-1", 8001)

    async def main():
        p = make(consul, DiscoverySource(service="api"), wait=30.0)
        async with Running(p) as run:
            first = await run.next()
            assert (first.provider, first.service) == ("consul", "api")
            assert [(e.host, e.port, e.meta["name"]) for e in first.endpoints] == \
                [("127.0.0.1", 8001, "api-1")]
            assert first.revision.isdigit()
            await until(lambda: blocking(consul, "/v1/health/service/api"), what="blocking")
            # a change reaches us long before wait (30 s): the query was blocking
            t0 = time.monotonic()
            api(consul, "api-2", 8002)
            s = await run.until_ports({8001, 8002}, timeout=10)
            added = time.monotonic() - t0
            consul.api("PUT", "/v1/agent/service/deregister/api-1")
            await run.until_ports({8002}, timeout=10)
            # a critical check leaves the passing-only set
            consul.api("PUT", "/v1/agent/check/fail/service:api-2")
            await run.until_ports(set(), timeout=10)
            assert p.health.state == "ok" and p.health.last_error is None
            q = blocking(consul, "/v1/health/service/api")[-1]
            assert q["wait"] == "30s" and "passing" in q and int(q["index"]) >= 1
            assert int(s.revision) >= 1
            return added
    added = asyncio.run(main())
    assert added < 3


def test_filters_tags_meta_datacenter_token_and_weights():
    with ConsulDouble(datacenters=("dc2",), acl_tokens={"secret": "write"}) as consul:
        def reg(dc, sid, port, tags, meta, status="passing"):
            code, _, text = consul.api("PUT", "/v1/catalog/register", {
                "Datacenter": dc, "Node": f"n-{sid}", "Address": f"127.0.1.{port % 100}",
                "Service": {"ID": sid, "Service": "api", "Port": port, "Tags": tags,
                            "Meta": meta, "Weights": {"Passing": 7, "Warning": 2}},
                "Check": {"ServiceID": sid, "Status": status}}, token="secret")
            assert code == 200, text
        reg("dc2", "good", 9001, ["v2", "blue"], {"zone": "a"})
        reg("dc2", "warn", 9002, ["v2"], {"zone": "a"}, status="warning")
        reg("dc2", "wrong-tag", 9003, ["v1"], {"zone": "a"})
        reg("dc2", "wrong-meta", 9004, ["v2"], {"zone": "b"})
        reg("dc1", "other-dc", 9005, ["v2"], {"zone": "a"})

        async def main():
            src = DiscoverySource(service="api", tags=["v2"], meta={"zone": "a"},
                                  passing_only=False, datacenter="dc2")
            p = make(consul, src, token="secret")
            async with Running(p) as run:
                s = await run.next()
                return {(e.host, e.port, e.weight) for e in s.endpoints}, p
        got, p = asyncio.run(main())
        # passing_only=false: passing and warning instances; a warning one weighs Warning
        assert got == {("127.0.1.1", 9001, 7), ("127.0.1.2", 9002, 2)}
        query = [q for m, path, q, tok in consul.requests if path == "/v1/health/service/api"]
        assert query[0]["dc"] == "dc2" and query[0]["tag"] == "v2" and "passing" not in query[0]
        assert {tok for _, path, _, tok in consul.requests if path.startswith("/v1/health/s")} \
            == {"secret"}

        async def health():
            src = DiscoverySource(service="api", tags=["v2"], datacenter="dc2")
            p = make(consul, src, token="secret")
            async with Running(p) as run:
                return {(e.port, e.weight) for e in (await run.next()).endpoints}
        # passing only: the instance in "warning" is out; the weight is Weights.Passing
        assert asyncio.run(health()) == {(9001, 7), (9004, 7)}


def test_without_health_check_integration_the_catalog_serves_every_instance(consul):
    api(consul, "api-1", 8001, status="warning", Weights={"Passing": 10, "Warning": 3})
    api(consul, "api-2", 8002, status="critical")
    api(consul, "api-3", 8003, Weights={"Passing": 4, "Warning": 0})

    async def main():
        p = make(consul, DiscoverySource(service="api"), integration=False)
        async with Running(p) as run:
            first = await run.next()
            # no health in a catalog answer: all three, each with Weights.Passing
            assert {(e.port, e.weight) for e in first.endpoints} == \
                {(8001, 10), (8002, 1), (8003, 4)}
    asyncio.run(main())
    assert any(p == "/v1/catalog/service/api" for _, p, _, _ in consul.requests)
    assert not any(p.startswith("/v1/health/") for _, p, _, _ in consul.requests)


def test_passing_only_off_keeps_warning_drops_critical_and_zero_weights(consul):
    api(consul, "api-1", 8001, status="warning", Weights={"Passing": 10, "Warning": 3})
    api(consul, "api-2", 8002, status="critical")
    api(consul, "api-3", 8003, status="warning", Weights={"Passing": 4, "Warning": 0})
    api(consul, "api-4", 8004)

    async def main():
        p = make(consul, DiscoverySource(service="api", passing_only=False))
        async with Running(p) as run:
            first = await run.next()
            assert {(e.port, e.weight) for e in first.endpoints} == {(8001, 3), (8004, 1)}
            consul.api("PUT", "/v1/agent/check/pass/service:api-1")
            s = await run.until_ports({8001, 8004})
            assert {(e.port, e.weight) for e in s.endpoints} == {(8001, 10), (8004, 1)}
    asyncio.run(main())


def test_node_address_is_used_when_service_address_is_empty(consul):
    consul.api("PUT", "/v1/catalog/register", {
        "Node": "web", "Address": "127.0.0.5",
        "Service": {"ID": "x", "Service": "api", "Port": 7000}})

    async def main():
        async with Running(make(consul, DiscoverySource(service="api"))) as run:
            return [(e.host, e.port) for e in (await run.next()).endpoints]
    assert asyncio.run(main()) == [("127.0.0.5", 7000)]


def test_registry_stopped_goes_stale_keeps_last_good_then_resyncs(consul):
    api(consul, "api-1", 8001)

    async def main():
        p = make(consul, DiscoverySource(service="api"))
        async with Running(p) as run:
            await run.until_ports({8001})
            assert p.health.state == "ok"
            await until(lambda: blocking(consul, "/v1/health/service/api"), what="blocking")
            await asyncio.to_thread(consul.stop)
            await until(lambda: p.health.state == "stale", what="stale")
            assert p.health.last_error and p.status()["services"]["api"]["error"]
            await until(lambda: p.health.errors >= 3, what="retries")  # backing off, retrying
            assert run.sets.empty()  # nothing emitted: the last known good set stays
            assert p.health.staleness_seconds() > 0
            # back, with a change made while we were away (the agent kept its state)
            await asyncio.to_thread(consul.start)
            api(consul, "api-2", 8002)
            await run.until_ports({8001, 8002}, timeout=5)
            await until(lambda: p.health.state == "ok", what="ok again")
            assert p.health.reconnects >= 1 and p.status()["services"]["api"]["error"] is None
    asyncio.run(main())


def test_registry_restarted_with_lower_indexes_still_resyncs(consul):
    """A fresh agent starts its indexes over: the index after an error is reset, so the
    first query after the outage is not a blocking one waiting on the old, higher index."""
    api(consul, "api-1", 8001)

    async def main():
        p = make(consul, DiscoverySource(service="api"), wait=30.0)
        async with Running(p) as run:
            await run.until_ports({8001})
            await until(lambda: blocking(consul, "/v1/health/service/api"), what="blocking")
            await asyncio.to_thread(consul.stop)
            await until(lambda: p.health.state == "stale", what="stale")
            consul.rewind(2)
            await asyncio.to_thread(consul.start)
            consul.api("PUT", "/v1/agent/service/deregister/api-1")
            await run.until_ports(set(), timeout=5)
    asyncio.run(main())


def test_index_going_backwards_resets_to_a_plain_query(consul):
    api(consul, "api-1", 8001)

    async def main():
        p = make(consul, DiscoverySource(service="api"), wait=0.3)
        async with Running(p) as run:
            await run.until_ports({8001})
            await until(lambda: blocking(consul, "/v1/health/service/api"), what="blocking")
            high = p.watches["api"].index
            consul.rewind(3)  # a snapshot restore: the next answer carries index 3
            n = len(consul.requests)
            await until(lambda: any("index" not in q for _, path, q, _ in consul.requests[n:]
                                    if path == "/v1/health/service/api"), timeout=5,
                        what="a query without index")
            await until(lambda: p.watches["api"].index == 3, what="index 3")
            assert high > 3
            # and it blocks again on the new index
            await until(lambda: any(q.get("index") == "3" for _, _, q, _ in consul.requests[n:]),
                        what="blocking on index 3")
    asyncio.run(main())


def test_index_zero_is_treated_as_one_and_the_loop_is_rate_limited(consul):
    consul.force_index_zero = True  # every answer: X-Consul-Index: 0, "nothing changed"

    async def main():
        p = make(consul, DiscoverySource(service="api"), wait=30.0)
        p.min_unchanged_interval = 0.25
        async with Running(p) as run:
            await run.next()
            await until(lambda: blocking(consul, "/v1/health/service/api"), what="blocking")
            assert p.watches["api"].index == 1
            # index=1 blocks until index > 1: a write under the service answers it
            n = len(consul.requests)
            t0 = time.monotonic()
            api(consul, "api-1", 8001)
            await run.until_ports({8001}, timeout=10)
            assert time.monotonic() - t0 < 10  # far below wait (30 s): it was blocking
            # while the double keeps answering 0 with wait short, the loop stays slow
            p.wait = 0.01
            await asyncio.sleep(1.0)  # a time window to count requests in, not a sync point
            sent = [q for _, path, q, _ in consul.requests[n:] if path == "/v1/health/service/api"]
            assert all(q.get("index", "1") == "1" for q in sent)
            return len(sent)
    sent = asyncio.run(main())
    assert sent <= 8  # ~1 s / 0.25 s rate limit (+ the change); unthrottled: hundreds


def test_acl_error_is_a_registry_error_not_an_empty_set():
    with ConsulDouble(acl_tokens={"right": "write"}) as consul:
        api(consul, "api-1", 8001, token="right")

        async def main():
            p = make(consul, DiscoverySource(service="api"), token="wrong")
            async with Running(p) as run:
                await until(lambda: p.health.errors >= 2, what="errors")
                assert run.sets.empty()
                assert "403" in p.health.last_error and "ACL not found" in p.health.last_error
                assert p.health.state == "stale"  # never answered: an outage, not "starting"
                assert p.health.last_success is None
        asyncio.run(main())


def test_an_answer_filtered_by_acls_is_an_error_not_an_empty_set():
    """A token without service:read gets a 200 with the instances filtered out: taking it
    as "no instances" would empty the cluster (503s) on an ACL mistake."""
    with ConsulDouble(acl_tokens={"right": "write", "blind": "none"}) as consul:
        api(consul, "api-1", 8001, token="right")

        async def main():
            p = make(consul, DiscoverySource(service="api"), token="blind")
            async with Running(p) as run:
                await until(lambda: p.health.errors >= 2, what="errors")
                assert run.sets.empty() and p.health.state == "stale"
                assert "filtered by ACLs" in p.health.last_error
        asyncio.run(main())


def test_kv_prefix_is_watched_decoded_and_reported(consul):
    consul.api("PUT", "/v1/kv/dispa/config/weights/a", b"3")
    consul.api("PUT", "/v1/kv/elsewhere", b"x")

    async def main():
        p = make(consul, kv_prefix="dispa/config/")
        seen: list[dict] = []
        p.on_kv = seen.append
        async with Running(p):
            await until(lambda: p.kv == {"weights/a": "3"}, what="first kv")
            await until(lambda: blocking(consul, "/v1/kv/dispa/config/"), what="blocking")
            consul.api("PUT", "/v1/kv/dispa/config/mode", "fäst".encode())
            await until(lambda: p.kv.get("mode") == "fäst", timeout=10, what="put")
            # status shows keys, sizes and digests, never a value (it may be a secret)
            consul.api("PUT", "/v1/kv/dispa/config/password", b"hunter2")
            await until(lambda: "password" in p.kv, timeout=10, what="put password")
            shown = p.status()["kv"]["keys"]
            assert shown["mode"] == {"bytes": 5, "sha256": hashlib.sha256(
                "fäst".encode()).hexdigest()[:16]}
            assert set(shown) == {"weights/a", "mode", "password"}
            assert "hunter2" not in json.dumps(p.status())
            consul.api("DELETE", "/v1/kv/dispa/config/?recurse")
            await until(lambda: p.kv == {}, timeout=10, what="delete")
            st = p.status()["kv"]
            assert st["prefix"] == "dispa/config/" and st["keys"] == {} and st["loaded"]
            assert p.health.state == "ok"
        return seen
    seen = asyncio.run(main())
    assert seen[0] == {"weights/a": "3"} and seen[-1] == {}
    assert {"weights/a": "3", "mode": "fäst"} in seen


def test_self_registration_ttl_is_kept_alive_and_deregistered(consul):
    inst = Instance(service="dispa", id="dispa-test-1", host="127.0.0.1", port=8080,
                    tags=("edge",), meta={"v": "1"}, ttl_seconds=0.6)

    async def main():
        p = make(consul, deregister_critical_after=60.0)
        await p.register(inst)
        status, _, body = consul.api("GET", "/v1/health/service/dispa?passing")
        assert [(e["Service"]["ID"], e["Service"]["Port"], e["Service"]["Tags"])
                for e in body] == [("dispa-test-1", 8080, ["edge"])]
        req = [q for m, path, q, _ in consul.requests if path == "/v1/agent/service/register"]
        assert req  # sent with replace-existing-checks
        # three TTLs later it is still passing: the keep-alive passes every TTL/3
        t_end = time.monotonic() + 3 * inst.ttl_seconds
        while time.monotonic() < t_end:
            assert consul.check_status("dispa-test-1") == "passing"
            await asyncio.sleep(0.05)
        assert p.check_passes >= 4
        assert p.status()["registration"]["id"] == "dispa-test-1"
        await p.deregister()
        assert consul.service_ids("dispa") == []
        passes = [path for _, path, _, _ in consul.requests
                  if path == "/v1/agent/check/pass/service:dispa-test-1"]
        deregs = [path for m, path, _, _ in consul.requests
                  if path == "/v1/agent/service/deregister/dispa-test-1" and m == "PUT"]
        await p.close()
        return len(passes), len(deregs)
    passes, deregs = asyncio.run(main())
    assert passes >= 4 and deregs == 1


def test_without_the_keep_alive_the_ttl_lapses_and_consul_reaps_it(consul):
    """The control for the test above: the same registration with the keep-alive stopped
    goes critical and is reaped after DeregisterCriticalServiceAfter."""
    inst = Instance(service="dispa", id="dispa-test-2", host="127.0.0.1", port=8080,
                    ttl_seconds=0.4)

    async def main():
        p = make(consul, deregister_critical_after=0.5)
        await p.register(inst)
        assert consul.check_status("dispa-test-2") == "passing"
        await p.close()  # stops the keep-alive, no deregistration
    asyncio.run(main())
    from tests.support.dispa_proc import wait_for
    wait_for(lambda: consul.check_status("dispa-test-2") in ("critical", None), timeout=10)
    wait_for(lambda: consul.service_ids("dispa") == [], timeout=5, what="reaped")


def test_keep_alive_registers_again_when_the_agent_lost_the_service(consul):
    inst = Instance(service="dispa", id="dispa-test-3", host="127.0.0.1", port=8080,
                    ttl_seconds=0.3)

    async def main():
        p = make(consul)
        await p.register(inst)
        consul.api("PUT", "/v1/agent/service/deregister/dispa-test-3")  # agent lost it
        assert consul.service_ids("dispa") == []
        await until(lambda: consul.service_ids("dispa") == ["dispa-test-3"], timeout=10,
                    what="registered again")
        await p.deregister()
        await p.close()
    asyncio.run(main())


def test_register_failure_raises_for_the_watcher_to_retry(consul):
    inst = Instance(service="dispa", id="x", host="127.0.0.1", port=1, ttl_seconds=5)

    async def main():
        p = make(consul)
        consul.stop()
        with pytest.raises(Exception):
            await p.register(inst)
        await p.close()
    asyncio.run(main())


def test_sources_are_deduped_by_service_and_status_shows_each_query(consul):
    p = make(consul, DiscoverySource(service="api", tags=["a"]),
             DiscoverySource(service="api", tags=["a"]), DiscoverySource(service="db"))
    st = p.status()
    assert set(st["services"]) == {"api", "db"} and st["kind"] == "consul"
    assert st["services"]["api"]["query"] == "/v1/health/service/api"
    secret = make(consul, DiscoverySource(service="api"), token="s3cret-token")
    assert "s3cret-token" not in repr(msgspec.to_builtins(secret.status()))


def test_a_malformed_answer_is_a_registry_error(origin):
    """An HTTP server that is not Consul (text, not JSON): an error, never an empty set."""
    settings = ServiceDiscoveryConfig(consul_address=f"http://127.0.0.1:{origin.port}")
    p = ConsulProvider("consul", settings, [DiscoverySource(service="api")])
    p.backoff_initial, p.backoff_max = 0.05, 0.2

    async def main():
        async with Running(p) as run:
            await until(lambda: p.health.errors >= 2, what="errors")
            assert run.sets.empty() and p.health.state == "stale"
    asyncio.run(main())
    assert origin.requests and origin.requests[0][1].startswith(b"/v1/health/service/api")
