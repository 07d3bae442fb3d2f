"""The discovery watcher: dedupe, throttle, merge (keep_static, empty sets), last known good,
provider restarts with backoff, reconfiguration, self-registration, status and metrics.

Providers here are in-memory doubles driven by the test (the watcher only sees ``run`` and
``emit``); the DNS provider against a real server is in tests/e2e/test_discovery_dns.py.
"""

from __future__ import annotations

import asyncio
import time

import msgspec
import pytest

from dispa.config.snapshot import ClusterSpec, EndpointSpec, ProxySpec, InterceptSpec, \
    make_snapshot
from dispa.discovery.config import ConsulOptions, DiscoverySource, DnsOptions, \
    ServiceDiscoveryConfig
from dispa.discovery.provider import DiscoveredEndpoint, EndpointSet, Instance, Provider
from dispa.discovery.watcher import DiscoveryWatcher, endpoint_specs, merge_snapshot


def ep(host, port=80, weight=1, **meta):
    return DiscoveredEndpoint(host=host, port=port, weight=weight, meta=meta)


def eset(service, *endpoints, provider="dns", revision=""):
    return EndpointSet(provider=provider, service=service, endpoints=tuple(endpoints),
                       revision=revision)


def static(*hosts):
    return tuple(EndpointSpec(id=f"{h}:80", name=f"s-{h}", host=h, port=80) for h in hosts)


def snapshot(**clusters):
    specs = tuple(ClusterSpec(name=name, endpoints=eps) for name, eps in clusters.items())
    return make_snapshot(proxy=ProxySpec(), intercept=InterceptSpec(), clusters=specs,
                         default_cluster=specs[0].name)


def src(service="api", keep_static=False, **kw):
    return DiscoverySource(provider="dns", service=service, keep_static=keep_static, **kw)


class FakeProvider(Provider):
    """A provider the test drives: ``push`` emits, ``fail`` records a registry error."""

    kind = "dns"
    built: list["FakeProvider"] = []

    def __init__(self, name, settings, sources, *, crash_first=False):
        super().__init__(name)
        self.settings, self.sources = settings, sources
        self.emit = None
        self.running = asyncio.Event()
        self.crash_first = crash_first
        self.runs = 0
        self.closed = False
        self.registered: list[Instance] = []
        self.deregistered = 0
        self.register_failures = 0
        FakeProvider.built.append(self)

    async def run(self, emit):
        self.runs += 1
        self.emit = emit
        if self.crash_first and self.runs == 1:
            raise ConnectionError("registry said no")
        self.running.set()
        await asyncio.Event().wait()

    def push(self, update: EndpointSet):
        self.health.ok()
        self.emit(update)

    def fail(self, error="timeout"):
        self.health.failed(error)

    async def register(self, instance):
        if self.register_failures:
            self.register_failures -= 1
            raise ConnectionError("agent down")
        self.registered.append(instance)

    async def deregister(self):
        self.deregistered += 1

    async def close(self):
        self.closed = True


def factory(**kw):
    def make(kind, settings, sources):
        return FakeProvider(kind, settings, sources, **kw)
    return make


class Published:
    """The watcher's publish callback: records the merged snapshot each time."""

    def __init__(self, watcher_ref, base):
        self.ref, self.base = watcher_ref, base
        self.snapshots = []
        self.times = []
        self.event = asyncio.Event()

    async def __call__(self):
        self.snapshots.append(self.ref[0].merge(self.base))
        self.times.append(time.monotonic())
        self.event.set()

    async def next(self, timeout=5.0):
        await asyncio.wait_for(self.event.wait(), timeout)
        self.event.clear()
        return self.snapshots[-1]


def make_watcher(base, sources, *, throttle=0.0, **kw):
    ref = []
    pub = Published(ref, base)
    w = DiscoveryWatcher(ServiceDiscoveryConfig(provider="dns", throttle=throttle), sources,
                         pub, factory=factory(**kw))
    ref.append(w)
    return w, pub


def cluster(snap, name):
    return next(c for c in snap.clusters if c.name == name)


def ids(snap, name):
    return [e.id for e in cluster(snap, name).endpoints]


# ---------------------------------------------------------------- merge (pure)

def test_a_discovered_set_replaces_the_static_endpoints():
    base = snapshot(default=static("10.0.0.1"), api=static("10.0.0.9"))
    bindings = {"api": (("dns", "api"), src())}
    merged = merge_snapshot(base, bindings, {("dns", "api"): eset(
        "api", ep("10.0.1.2", 8080, 3, name="b"), ep("10.0.1.1", 8080))})
    assert ids(merged, "api") == ["10.0.1.1:8080", "10.0.1.2:8080"]
    b = cluster(merged, "api").endpoints[1]
    assert (b.name, b.weight, b.timeout_seconds) == ("b", 3, 30.0)
    assert cluster(merged, "api").endpoints[0].name == "10.0.1.1:8080"  # no name: the id
    assert ids(merged, "default") == ["10.0.0.1:80"]  # not bound: untouched
    assert merged.version != base.version


def test_keep_static_merges_and_dedupes_by_id():
    base = snapshot(api=static("10.0.0.9", "10.0.0.8"))
    bindings = {"api": (("dns", "api"), src(keep_static=True))}
    merged = merge_snapshot(base, bindings, {("dns", "api"): eset(
        "api", ep("10.0.0.9"), ep("10.0.1.1"))})
    assert ids(merged, "api") == ["10.0.0.9:80", "10.0.0.8:80", "10.0.1.1:80"]
    assert cluster(merged, "api").endpoints[0].name == "s-10.0.0.9"  # the static entry wins
    empty = merge_snapshot(base, bindings, {("dns", "api"): eset("api")})
    assert ids(empty, "api") == ["10.0.0.9:80", "10.0.0.8:80"]


def test_an_empty_answer_empties_the_cluster_and_no_answer_keeps_static():
    base = snapshot(api=static("10.0.0.9"))
    bindings = {"api": (("dns", "api"), src())}
    assert merge_snapshot(base, bindings, {}) is base  # provider has not answered yet
    empty = merge_snapshot(base, bindings, {("dns", "api"): eset("api")})
    assert cluster(empty, "api").endpoints == ()


def test_two_clusters_on_one_service_share_the_set():
    base = snapshot(a=(), b=static("10.0.0.9"))
    bindings = {"a": (("dns", "api"), src()), "b": (("dns", "api"), src(keep_static=True))}
    merged = merge_snapshot(base, bindings, {("dns", "api"): eset("api", ep("10.0.1.1"))})
    assert ids(merged, "a") == ["10.0.1.1:80"]
    assert ids(merged, "b") == ["10.0.0.9:80", "10.0.1.1:80"]


def test_endpoint_specs_normalise_and_drop_invalid_entries():
    specs = endpoint_specs((ep("API.Example.", 81), ep("::1", 82, weight=0), ep("", 80),
                            ep("10.0.0.1", 0), ep("10.0.0.1", 70000), ep("api.example", 81)),
                           src(timeout=2.5))
    assert [(s.id, s.host, s.weight, s.timeout_seconds) for s in specs] == [
        ("[::1]:82", "::1", 1, 2.5), ("api.example:81", "api.example", 1, 2.5)]


def test_merge_is_deterministic_whatever_the_order():
    base = snapshot(api=())
    bindings = {"api": (("dns", "api"), src())}
    one = merge_snapshot(base, bindings, {("dns", "api"): eset("api", ep("b"), ep("a"))})
    two = merge_snapshot(base, bindings, {("dns", "api"): eset("api", ep("a"), ep("b"))})
    assert one.version == two.version


# ---------------------------------------------------------------- dedupe

def test_offer_drops_duplicates_and_unwanted_services():
    async def main():
        w, _ = make_watcher(snapshot(api=()), {"api": src()})
        assert w.offer(eset("api", ep("a"), ep("b"), revision="1"))
        assert not w.offer(eset("api", ep("b"), ep("a"), revision="2"))  # same set
        assert w.revisions[("dns", "api")] == "2" and w.duplicates == 1
        assert not w.offer(eset("other", ep("a")))  # no cluster consumes it
        assert not w.offer(eset("api", ep("a"), provider="consul"))
        assert w.offer(eset("api", ep("a")))
        assert w.updates == {"dns": 2}
    asyncio.run(main())


# ---------------------------------------------------------------- the running pipeline

def test_updates_are_published_merged_and_throttled():
    async def main():
        base = snapshot(default=static("10.0.0.1"), api=())
        w, pub = make_watcher(base, {"api": src()}, throttle=0.3)
        await w.start()
        p = w.providers["dns"]
        await asyncio.wait_for(p.running.wait(), 5)
        p.push(eset("api", ep("10.0.1.1")))
        first = await pub.next()
        assert ids(first, "api") == ["10.0.1.1:80"]
        # a burst inside one window: one more publish, carrying the last set
        for n in range(2, 30):
            p.push(eset("api", *[ep(f"10.0.1.{i}") for i in range(1, n)]))
        second = await pub.next()
        assert len(cluster(second, "api").endpoints) == 28
        assert pub.times[1] - pub.times[0] >= 0.3 - 0.01
        p.push(eset("api", *[ep(f"10.0.1.{i}") for i in range(1, 30)]))
        p.push(eset("api", ep("10.0.2.1")))  # replaces the queued one: only the last counts
        third = await pub.next()
        assert ids(third, "api") == ["10.0.2.1:80"]
        assert w.publishes == 3 and w.coalesced >= 28
        p.push(eset("api", ep("10.0.2.1"), revision="9"))  # a duplicate
        await until_w(lambda: w.revisions[("dns", "api")] == "9")
        assert w.duplicates == 1 and w.publishes == 3
        await w.stop()
        assert p.closed
    asyncio.run(main())


async def until_w(cond, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


def test_a_fast_provider_never_queues_more_than_one_set_per_service():
    """Emitting faster than the watcher reads (it is busy publishing) must not pile up
    complete sets: a newer set replaces the queued one of its service."""
    async def main():
        w, pub = make_watcher(snapshot(a=(), b=()), {"a": src("x"), "b": src("y")})
        big = [ep(f"10.1.{i // 250}.{i % 250}") for i in range(2000)]
        for n in range(500):  # no await: the consumer cannot run in between
            w.emit(eset("x", *big[:n + 1]))
            w.emit(eset("y", *big[:2], revision=str(n)))
        assert w.queue.qsize() == 2 and w.coalesced == 2 * 499
        await w.start()
        await until_w(lambda: w.revisions.get(("dns", "y")) == "499")
        assert len(w.sets[("dns", "x")].endpoints) == 500
        assert w.queue.qsize() == 0 and not w._inbox
        await w.stop()
    asyncio.run(main())


def test_a_registry_error_keeps_the_last_known_good_set_and_says_stale():
    async def main():
        base = snapshot(api=static("10.0.0.9"))
        w, pub = make_watcher(base, {"api": src()})
        await w.start()
        p = w.providers["dns"]
        await asyncio.wait_for(p.running.wait(), 5)
        p.push(eset("api", ep("10.0.1.1"), revision="7"))
        await pub.next()
        p.health.last_success -= 3  # the last answer is 3 s old, then the registry fails
        p.fail("connection refused")
        assert ids(w.merge(base), "api") == ["10.0.1.1:80"]
        st = w.status(pub.snapshots[-1], base)
        assert st["providers"]["dns"]["state"] == "stale"
        assert st["providers"]["dns"]["last_error"] == "connection refused"
        assert st["clusters"]["api"] == {
            "provider": "dns", "service": "api", "state": "discovered", "revision": "7",
            "endpoints": 1, "discovered": 1, "pending": False, "keep_static": False,
            "updated_at": st["clusters"]["api"]["updated_at"], "provider_state": "stale"}
        gauges = {(g[0], tuple(g[2].items())): g[3] for g in w.gauges(w.merge(base))}
        assert gauges[("dispa_discovery_staleness_seconds", (("provider", "dns"),))] >= 3
        assert gauges[("dispa_discovery_errors_total", (("provider", "dns"),))] == 1
        assert gauges[("dispa_discovery_updates_total", (("provider", "dns"),))] == 1
        assert gauges[("dispa_discovery_endpoints", (("cluster", "api"),))] == 1
        # gauges count the snapshot in force
        assert w.gauges(base)[-1][3] == 1 and w.gauges(snapshot(api=()))[-1][3] == 0
        await w.stop()
    asyncio.run(main())


def test_status_counts_the_published_snapshot_and_says_when_a_set_is_pending():
    """``endpoints`` is what the workers were sent, not the watcher's latest set: a test
    (or an operator) waiting on it must not pass before the throttled publish."""
    async def main():
        base = snapshot(api=static("10.0.0.9"))
        w, pub = make_watcher(base, {"api": src(keep_static=True)}, throttle=30.0)
        await w.start()
        p = w.providers["dns"]
        await asyncio.wait_for(p.running.wait(), 5)
        st = w.status(base, base)["clusters"]["api"]
        assert (st["state"], st["endpoints"], st["discovered"], st["pending"]) == \
            ("waiting", 1, None, False)
        p.push(eset("api", ep("10.0.1.1")))
        first = await pub.next()  # the first change publishes at once
        st = w.status(first, base)["clusters"]["api"]
        assert (st["endpoints"], st["discovered"], st["pending"]) == (2, 1, False)
        # the next change waits for the throttle window: discovered, not yet published
        p.push(eset("api", ep("10.0.1.1"), ep("10.0.1.2")))
        for _ in range(100):
            await asyncio.sleep(0)
            if w.sets[("dns", "api")].endpoints != (ep("10.0.1.1"),):
                break
        st = w.status(first, base)["clusters"]["api"]
        assert (st["endpoints"], st["discovered"], st["pending"]) == (2, 2, True)
        # keep_static: the published cluster is static + discovered, and not pending
        second = w.merge(base)
        st = w.status(second, base)["clusters"]["api"]
        assert (st["endpoints"], st["discovered"], st["pending"]) == (3, 2, False)
        # an endpoint leaving the set is pending too until published (offered directly:
        # the consumer is asleep in its throttle window)
        assert w.offer(eset("api", ep("10.0.1.2")))
        assert w.status(second, base)["clusters"]["api"]["pending"] is True
        await w.stop()
    asyncio.run(main())


def test_a_registry_that_never_answers_is_stale_and_the_static_targets_serve():
    async def main():
        base = snapshot(api=static("10.0.0.9"))
        w, _ = make_watcher(base, {"api": src()})
        w._started_at -= 4  # the master started 4 s ago
        await w.start()
        p = w.providers["dns"]
        await asyncio.wait_for(p.running.wait(), 5)
        p.fail("connection refused")
        st = w.status(base, base)
        assert st["providers"]["dns"]["state"] == "stale"
        assert st["providers"]["dns"]["last_success"] is None
        assert st["providers"]["dns"]["staleness_seconds"] >= 4
        cl = st["clusters"]["api"]
        assert (cl["state"], cl["endpoints"], cl["pending"], cl["provider_state"]) == \
            ("waiting", 1, False, "stale")
        assert w.merge(base) is base
        await w.stop()
    asyncio.run(main())


def test_a_crashing_provider_is_restarted_with_backoff():
    async def main():
        w, pub = make_watcher(snapshot(api=()), {"api": src()}, crash_first=True)
        t0 = time.monotonic()
        await w.start()
        p = w.providers["dns"]
        await asyncio.wait_for(p.running.wait(), 5)
        assert p.runs == 2 and time.monotonic() - t0 >= 0.25  # Backoff: >= initial / 2
        assert p.health.reconnects == 1 and p.health.errors == 1
        assert "registry said no" in p.health.last_error
        p.push(eset("api", ep("10.0.1.1")))
        await pub.next()
        assert p.health.state == "ok"
        await w.stop()
    asyncio.run(main())


def test_wait_initial_returns_when_every_service_answered():
    async def main():
        w, _ = make_watcher(snapshot(a=(), b=()), {"a": src("x"), "b": src("y")})
        await w.start()
        p = w.providers["dns"]
        await asyncio.wait_for(p.running.wait(), 5)
        assert not await w.wait_initial(0.1)
        p.push(eset("x"))
        p.push(eset("y", ep("10.0.0.1")))
        assert await w.wait_initial(5)
        await w.stop()
    asyncio.run(main())


def test_reconfigure_restarts_changed_providers_only_and_forgets_unused_sets():
    async def main():
        FakeProvider.built.clear()
        w, pub = make_watcher(snapshot(a=(), b=()), {"a": src("x"), "b": src("y")})
        await w.start()
        p = w.providers["dns"]
        await asyncio.wait_for(p.running.wait(), 5)
        p.push(eset("x", ep("10.0.0.1")))
        p.push(eset("y", ep("10.0.0.2")))
        await pub.next()
        # same settings and sources: the provider keeps running
        await w.reconfigure(w.settings, {"a": src("x"), "b": src("y")})
        assert w.providers["dns"] is p
        # keys it does not read (throttle, another provider's table) change nothing either
        other = msgspec.structs.replace(w.settings, throttle=5.0, consul=ConsulOptions(
            token="t"))
        await w.reconfigure(other, {"a": src("x"), "b": src("y")})
        assert w.providers["dns"] is p and w.throttle == 5.0
        # its own table does: restarted, the sets stay in force meanwhile
        await w.reconfigure(msgspec.structs.replace(other, dns=DnsOptions(min_ttl=2)),
                            {"a": src("x"), "b": src("y")})
        assert w.providers["dns"] is not p and set(w.sets) == {("dns", "x"), ("dns", "y")}
        p = w.providers["dns"]
        await asyncio.wait_for(p.running.wait(), 5)
        # "y" is no longer consumed: its set goes, "x" stays in force during the restart
        await w.reconfigure(w.settings, {"a": src("x")})
        q = w.providers["dns"]
        assert q is not p and [s.service for s in q.sources] == ["x"]
        assert set(w.sets) == {("dns", "x")}
        await asyncio.wait_for(q.running.wait(), 5)
        await until_w(lambda: p.closed)
        await w.stop()
    asyncio.run(main())


def test_merge_for_a_reload_binds_the_new_sources_and_changes_nothing_in_force():
    """A reload is merged before it is known to succeed: the running providers, sources
    and sets must stay as they are until the master commits it with ``reconfigure``."""
    async def main():
        FakeProvider.built.clear()
        w, pub = make_watcher(snapshot(a=(), b=()), {"a": src("x"), "b": src("y")})
        await w.start()
        p = w.providers["dns"]
        await asyncio.wait_for(p.running.wait(), 5)
        p.push(eset("x", ep("10.0.0.1")))
        p.push(eset("y", ep("10.0.0.2")))
        await pub.next()
        bindings, sets = dict(w.bindings), dict(w.sets)
        # the reload swaps the clusters' services and drops "y" from "b"
        merged = w.merge_for(w.settings, {"a": src("y")}, snapshot(a=(), b=static("10.9.9.9")))
        assert ids(merged, "a") == ["10.0.0.2:80"] and ids(merged, "b") == ["10.9.9.9:80"]
        assert w.providers["dns"] is p and not p.closed and len(FakeProvider.built) == 1
        assert w.bindings == bindings and w.sets == sets
        assert w.merge(snapshot(a=(), b=())) == pub.snapshots[-1]
        await w.stop()
    asyncio.run(main())


def test_a_registration_provider_that_cannot_be_built_is_logged_not_raised(caplog):
    async def main():
        def broken(kind, settings, sources):
            if not sources:
                raise ImportError("No module named 'aiohttp'")
            return FakeProvider(kind, settings, sources)
        w = DiscoveryWatcher(ServiceDiscoveryConfig(provider="dns"), {"api": src()},
                             lambda: asyncio.sleep(0), factory=broken)
        await w.start()
        w.start_registration(Instance(service="dispa", id="d", host="h", port=1), "consul")
        task = w._register_task
        await asyncio.wait_for(task, 5)  # ends, without an exception nobody would retrieve
        assert task.exception() is None and w.status()["registered"] is None
        await w.stop()
    asyncio.run(main())
    assert "cannot start" in caplog.text and "aiohttp" in caplog.text


def test_self_registration_retries_and_deregisters():
    async def main():
        w, _ = make_watcher(snapshot(api=()), {"api": src()})
        await w.start()
        p = w.providers["dns"]
        p.register_failures = 1
        inst = Instance(service="dispa", id="dispa-h-8080", host="10.0.0.5", port=8080)
        w.start_registration(inst, "dns")
        await asyncio.wait_for(w._register_task, 5)
        assert p.registered == [inst]
        assert w.status()["registered"]["id"] == "dispa-h-8080"
        await w.deregister()
        assert p.deregistered == 1 and w.status()["registered"] is None
        await w.deregister()  # idempotent
        assert p.deregistered == 1
        await w.stop()
    asyncio.run(main())


def test_a_reloaded_registration_is_replaced_only_when_it_changed():
    async def main():
        w, _ = make_watcher(snapshot(api=()), {"api": src()})
        await w.start()
        p = w.providers["dns"]
        one = Instance(service="dispa", id="d-1", host="10.0.0.5", port=8080, tags=("a",))
        two = Instance(service="dispa", id="d-1", host="10.0.0.5", port=8080, tags=("a", "b"))
        w.start_registration(one, "dns")
        await asyncio.wait_for(w._register_task, 5)
        await w.set_registration(one, "dns")  # unchanged: the registration carries on
        assert p.registered == [one] and p.deregistered == 0
        await w.set_registration(two, "dns")  # changed: withdrawn, then registered anew
        await asyncio.wait_for(w._register_task, 5)
        assert p.registered == [one, two] and p.deregistered == 1
        assert list(w.status()["registered"]["tags"]) == ["a", "b"]
        await w.set_registration(None)  # the table is gone
        assert p.deregistered == 2 and w.status()["registered"] is None
        await w.stop()
    asyncio.run(main())


def test_registration_with_a_provider_no_cluster_uses():
    async def main():
        FakeProvider.built.clear()
        w, _ = make_watcher(snapshot(api=()), {})
        await w.start()
        assert w.providers == {}
        inst = Instance(service="dispa", id="x", host="10.0.0.5", port=8080)
        w.start_registration(inst, "consul")
        await asyncio.wait_for(w._register_task, 5)
        own = FakeProvider.built[-1]
        assert own.name == "consul" and own.sources == [] and own.registered == [inst]
        await w.deregister()
        await w.stop()
        assert own.deregistered == 1 and own.closed
    asyncio.run(main())


@pytest.mark.parametrize("bad", [None, "not a set", EndpointSet("dns", "api", (None,))])
def test_a_malformed_update_does_not_stop_the_watcher(bad):
    async def main():
        w, pub = make_watcher(snapshot(api=()), {"api": src()})
        await w.start()
        p = w.providers["dns"]
        await asyncio.wait_for(p.running.wait(), 5)
        p.emit(bad)
        p.push(eset("api", ep("10.0.1.1")))
        assert ids(await pub.next(), "api") == ["10.0.1.1:80"]
        await w.stop()
    asyncio.run(main())
