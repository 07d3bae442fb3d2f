"""The Kubernetes provider against the API double: list then watch, resume, 410 re-list,
bookmarks, the Endpoints fallback, ready-only sets, auth errors, an API server outage, and
ConfigMaps/Secrets as sources."""

from __future__ import annotations

import asyncio
import time

import pytest

from dispa.discovery.config import DiscoverySource, KubernetesOptions, ServiceDiscoveryConfig
from dispa.discovery.kubernetes import KubernetesProvider
from tests.support.k8s_double import (
    K8sDouble, config_map, endpoint_slice, endpoints_object, service, tls_secret,
)

TOKEN = "test-token"


@pytest.fixture
def api():
    d = K8sDouble(token=TOKEN, bookmark_interval=0.2).start()
    yield d
    d.close()


@pytest.fixture
def token_file(tmp_path):
    p = tmp_path / "token"
    p.write_text(TOKEN + "\n")
    return p


def make(api: K8sDouble, token_file, *sources: DiscoverySource | str,
         ready_only: bool = True, namespace: str = "default") -> KubernetesProvider:
    settings = ServiceDiscoveryConfig(
        provider="kubernetes", refresh_interval=5, health_check_integration=ready_only,
        kubernetes=KubernetesOptions(api_server=api.url, token_file=str(token_file),
                                     namespace=namespace))
    srcs = [s if isinstance(s, DiscoverySource) else DiscoverySource(service=s)
            for s in sources]
    p = KubernetesProvider("kubernetes", settings, srcs)
    p.backoff_initial, p.backoff_max = 0.05, 0.3  # fast reconnects in tests
    return p


class Running:
    """Runs ``provider.run`` in the test's loop and records what it emits."""

    def __init__(self, provider: KubernetesProvider):
        self.provider = provider
        self.sets: list = []

    def emit(self, s) -> None:
        self.sets.append(s)

    def latest(self, service: str = "default/api"):
        found = [s for s in self.sets if s.service == service]
        return found[-1] if found else None

    def ids(self, service: str = "default/api") -> list[str] | None:
        s = self.latest(service)
        return None if s is None else [e.id for e in s.endpoints]

    async def until(self, cond, what: str, timeout: float = 10.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            v = cond()
            if v:
                return v
            await asyncio.sleep(0.02)
        raise AssertionError(f"timed out waiting for {what}; sets={self.sets!r}; "
                             f"status={self.provider.status()!r}")

    async def until_ids(self, ids: list[str], service: str = "default/api"):
        await self.until(lambda: self.ids(service) == ids, f"{service} == {ids}")

    async def __aenter__(self):
        self.task = asyncio.ensure_future(self.provider.run(self.emit))
        return self

    async def __aexit__(self, *exc):
        self.task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await self.task
        await self.provider.close()


def _slice(name, addrs, svc="api", ns="default", ports=(("http", 8080),), **kw):
    return endpoint_slice(ns, svc, name, list(addrs), ports=list(ports), **kw)


NOT_READY = False, False, False
TERMINATING = False, True, True


def test_lists_then_watches_and_emits_the_ready_endpoints_of_its_service(api, token_file):
    api.create(service("default", "api", [("http", 80, 8080)]))
    api.create(_slice("api-1", ["10.0.0.1", ("10.0.0.2", *NOT_READY),
                                ("10.0.0.3", *TERMINATING)]))
    api.create(_slice("web-1", ["10.9.9.9"], svc="web"))

    async def main():
        async with Running(make(api, token_file, "default/api")) as r:
            await r.until_ids(["10.0.0.1:8080"])
            first = r.latest()
            assert first.provider == "kubernetes" and first.service == "default/api"
            assert first.endpoints[0].meta["name"] == "api-pod-10.0.0.1"
            lists = api.requests_matching("endpointslices", limit="500")
            assert lists[0][2]["labelSelector"] == "kubernetes.io/service-name=api"
            watches = api.requests_matching("endpointslices", watch="1")
            assert watches[0][2]["resourceVersion"] == "3"  # from the list, not "0"
            assert watches[0][2]["allowWatchBookmarks"] == "true"
            api.update(_slice("api-1", ["10.0.0.1", "10.0.0.2", ("10.0.0.3", *TERMINATING)]))
            await r.until_ids(["10.0.0.1:8080", "10.0.0.2:8080"])
            api.create(_slice("api-2", ["10.0.0.4"]))
            await r.until_ids(["10.0.0.1:8080", "10.0.0.2:8080", "10.0.0.4:8080"])
            api.delete("EndpointSlice", "default", "api-1")
            await r.until_ids(["10.0.0.4:8080"])
            assert r.latest().revision == str(api.rv)
            assert r.provider.health.state == "ok"
            assert r.provider.status()["services"]["default/api"]["lists"] == 1

    asyncio.run(main())


def test_without_health_check_integration_not_ready_counts_but_terminating_never(
        api, token_file):
    api.create(_slice("api-1", ["10.0.0.1", ("10.0.0.2", *NOT_READY),
                                ("10.0.0.3", *TERMINATING)]))

    async def main():
        async with Running(make(api, token_file, "default/api", ready_only=False)) as r:
            await r.until_ids(["10.0.0.1:8080", "10.0.0.2:8080"])

    asyncio.run(main())


@pytest.mark.parametrize("port_name, port", [
    ("", 8080),  # the Service's first port
    ("http", 8080),
    ("metrics", 9100),  # a Service port name
    ("9090", 9100),  # a Service port number
    ("metrics-port", 9100),  # a named target port
])
def test_port_name_is_resolved_through_the_service(api, token_file, port_name, port):
    api.create(service("default", "api", [("http", 80, 8080),
                                          ("metrics", 9090, "metrics-port")]))
    api.create(_slice("api-1", ["10.0.0.1"], ports=[("metrics", 9100), ("http", 8080)]))
    source = DiscoverySource(service="api", port_name=port_name)

    async def main():
        async with Running(make(api, token_file, source)) as r:
            await r.until_ids([f"10.0.0.1:{port}"], "api")

    asyncio.run(main())


def test_a_changed_service_port_is_followed(api, token_file):
    api.create(service("default", "api", [("http", 80, 8080)]))
    api.create(_slice("api-1", ["10.0.0.1"], ports=[("http", 8080), ("alt", 8081)]))

    async def main():
        async with Running(make(api, token_file, DiscoverySource(
                service="default/api", port_name="80"))) as r:
            await r.until_ids(["10.0.0.1:8080"])
            api.update(service("default", "api", [("alt", 80, 8081)]))
            await r.until_ids(["10.0.0.1:8081"])

    asyncio.run(main())


def test_a_broken_watch_resumes_from_the_last_resource_version_without_missing_events(
        api, token_file):
    api.create(_slice("api-1", ["10.0.0.1"]))

    async def main():
        async with Running(make(api, token_file, "default/api")) as r:
            await r.until_ids(["10.0.0.1:8080"])
            await r.until(lambda: api.open_watches() == 2, "both watches open")
            rv = str(api.rv)
            # the test's loop is busy in these calls, so the provider cannot reconnect
            # until they are all done: the changes happen while it is disconnected
            assert api.drop_watches() == 2
            api.create(_slice("api-2", ["10.0.0.2"]))
            api.update(_slice("api-1", ["10.0.0.1", "10.0.0.3"]))
            api.delete("EndpointSlice", "default", "api-2")
            api.create(_slice("api-3", ["10.0.0.4"]))
            await r.until_ids(["10.0.0.1:8080", "10.0.0.3:8080", "10.0.0.4:8080"])
            resumed = api.requests_matching("endpointslices", watch="1", resourceVersion=rv)
            assert len(resumed) == 2  # the first watch and the resumed one
            assert r.provider.status()["services"]["default/api"]["lists"] == 1  # no re-list
            # every intermediate state was seen, in order (nothing skipped)
            seen = [[e.id for e in s.endpoints] for s in r.sets]
            assert ["10.0.0.1:8080", "10.0.0.2:8080"] in seen
            assert seen.index(["10.0.0.1:8080", "10.0.0.2:8080"]) < seen.index(
                ["10.0.0.1:8080", "10.0.0.3:8080"])

    asyncio.run(main())


@pytest.mark.parametrize("as_http", [False, True], ids=["error-event", "http-410"])
def test_410_gone_triggers_a_full_re_list(api, token_file, as_http):
    api.gone_as_http = as_http
    api.create(_slice("api-1", ["10.0.0.1"]))

    async def main():
        async with Running(make(api, token_file, "default/api")) as r:
            await r.until_ids(["10.0.0.1:8080"])
            await r.until(lambda: api.open_watches() == 2, "both watches open")
            api.drop_watches()
            api.delete("EndpointSlice", "default", "api-1")
            api.create(_slice("api-2", ["10.0.0.2"]))
            api.compact()  # the provider's resourceVersion is now too old
            await r.until_ids(["10.0.0.2:8080"])
            assert r.provider.status()["services"]["default/api"]["lists"] == 2
            assert r.provider.health.state == "ok"
            api.create(_slice("api-3", ["10.0.0.3"]))  # and it watches again after
            await r.until_ids(["10.0.0.2:8080", "10.0.0.3:8080"])

    asyncio.run(main())


def test_bookmarks_move_the_resource_version_so_a_resume_survives_compaction(
        api, token_file):
    api.create(_slice("api-1", ["10.0.0.1"]))

    async def main():
        async with Running(make(api, token_file, "default/api")) as r:
            await r.until_ids(["10.0.0.1:8080"])
            for n in range(5):  # changes the provider's watch does not select
                api.create(_slice(f"web-{n}", ["10.9.9.9"], svc="web"))
            now = str(api.rv)
            st = r.provider._states["default/api"]
            await r.until(lambda: st.endpoints.resource_version == now,
                          "a bookmark with the current resourceVersion")
            assert st.endpoints.events == 0  # no event: only bookmarks moved it
            api.drop_watches()
            api.compact()  # compaction at the bookmark's version: resume is still fine
            api.create(_slice("api-2", ["10.0.0.2"]))
            await r.until_ids(["10.0.0.1:8080", "10.0.0.2:8080"])
            assert r.provider.status()["services"]["default/api"]["lists"] == 1

    asyncio.run(main())


def test_without_the_discovery_api_it_falls_back_to_endpoints(token_file):
    api = K8sDouble(token=TOKEN, discovery_api=False).start()
    try:
        api.create(service("default", "api", [("http", 80, 8080)]))
        api.create(endpoints_object("default", "api", ["10.0.0.1", "10.0.0.2"],
                                    not_ready=["10.0.0.3"], ports=[("http", 8080)]))
        api.create(endpoints_object("default", "web", ["10.9.9.9"], ports=[("http", 8080)]))

        async def main():
            async with Running(make(api, token_file, "default/api")) as r:
                await r.until_ids(["10.0.0.1:8080", "10.0.0.2:8080"])
                assert r.provider.status()["services"]["default/api"]["mode"] == "endpoints"
                assert api.requests_matching("endpointslices")  # it tried slices first
                api.update(endpoints_object("default", "api", ["10.0.0.2", "10.0.0.3"],
                                            ports=[("http", 8080)]))
                await r.until_ids(["10.0.0.2:8080", "10.0.0.3:8080"])
                api.delete("Endpoints", "default", "api")
                await r.until_ids([])

        asyncio.run(main())
    finally:
        api.close()


def test_label_selector_and_namespace_narrow_the_slices(api, token_file):
    api.create(_slice("a", ["10.0.0.1"], ns="prod", labels={"tier": "gold"}))
    api.create(_slice("b", ["10.0.0.2"], ns="prod"))
    api.create(_slice("c", ["10.0.0.3"], ns="default", labels={"tier": "gold"}))
    gold = DiscoverySource(service="prod/api", label_selector="tier=gold")

    async def main():
        async with Running(make(api, token_file, gold, "api")) as r:
            await r.until_ids(["10.0.0.1:8080"], "prod/api")
            await r.until_ids(["10.0.0.3:8080"], "api")  # namespace from the settings
            api.update(_slice("b", ["10.0.0.2"], ns="prod", labels={"tier": "gold"}))
            await r.until_ids(["10.0.0.1:8080", "10.0.0.2:8080"], "prod/api")

    asyncio.run(main())


def test_a_stopped_api_server_keeps_the_last_good_set_and_reports_stale_then_resyncs(
        api, token_file):
    api.create(_slice("api-1", ["10.0.0.1", "10.0.0.2"]))

    async def main():
        async with Running(make(api, token_file, "default/api")) as r:
            await r.until_ids(["10.0.0.1:8080", "10.0.0.2:8080"])
            emitted = len(r.sets)
            api.stop()
            await r.until(lambda: r.provider.health.state == "stale", "stale")
            errors = r.provider.health.errors
            await r.until(lambda: r.provider.health.errors >= errors + 3, "failed reconnects")
            assert len(r.sets) == emitted  # several failed reconnects: nothing emitted
            status = r.provider.status()
            assert status["state"] == "stale" and status["staleness_seconds"] > 0
            assert "Cannot connect" in status["last_error"] or "Connect" in status["last_error"]
            # the registry changes while Dispa cannot see it
            api.update(_slice("api-1", ["10.0.0.2", "10.0.0.5"]))
            api.start()
            await r.until_ids(["10.0.0.2:8080", "10.0.0.5:8080"])
            await r.until(lambda: r.provider.health.state == "ok", "ok again")
            assert r.provider.health.reconnects > 0

    asyncio.run(main())


def test_one_failing_service_keeps_the_provider_stale_while_another_answers(api, token_file):
    """The provider's state is shared by its services: one that keeps failing must not be
    hidden by another's successful (re-)watch."""
    api.create(_slice("api-1", ["10.0.0.1"]))
    broken = DiscoverySource(service="default/broken", label_selector="tier in (")

    async def main():
        async with Running(make(api, token_file, "default/api", broken)) as r:
            p = r.provider
            await r.until_ids(["10.0.0.1:8080"])
            await r.until(lambda: p.health.errors >= 2, "the broken source failing")
            good = p._states["default/api"].endpoints
            watches = good.watches
            assert api.drop_watches() >= 1  # the good source re-opens its watch: a success
            await r.until(lambda: good.watches > watches, "the good source re-watching")
            assert p.health.state == "stale" and "400" in p.health.last_error
            assert r.latest("default/broken") is None

    asyncio.run(main())


def test_a_rejected_token_is_an_error_and_a_rotated_token_file_is_picked_up(api, tmp_path):
    tf = tmp_path / "token"
    tf.write_text("expired-token")
    api.create(_slice("api-1", ["10.0.0.1"]))

    async def main():
        async with Running(make(api, tf, "default/api")) as r:
            await r.until(lambda: r.provider.health.errors >= 2, "401 errors")
            assert "401" in r.provider.health.last_error
            assert "Unauthorized" in r.provider.health.last_error
            assert r.sets == []
            tf.write_text(TOKEN)  # the kubelet rotates the projected token
            await r.until_ids(["10.0.0.1:8080"])

    asyncio.run(main())


def test_bad_settings_never_raise_out_of_run(api, tmp_path):
    settings = ServiceDiscoveryConfig(provider="kubernetes", kubernetes=KubernetesOptions(
        kubeconfig=str(tmp_path / "missing.yaml")))
    p = KubernetesProvider("kubernetes", settings, [DiscoverySource(service="api")])
    p.backoff_initial = 0.05

    async def main():
        async with Running(p) as r:
            await r.until(lambda: p.health.errors >= 2, "errors recorded")
            assert "missing.yaml" in p.health.last_error

    asyncio.run(main())


def test_configmaps_are_watched_as_a_config_source(api, token_file):
    async def main():
        p = make(api, token_file)
        got: list = []
        task = asyncio.ensure_future(p.watch_configmap("default", "dispa", got.append))
        try:
            r = Running(p)
            await r.until(lambda: got == [None], "absent: None")
            api.create(config_map("default", "dispa", {"routes.toml": "a = 1"}))
            await r.until(lambda: len(got) == 2, "created")
            assert got[1].data == {"routes.toml": "a = 1"} and got[1].name == "dispa"
            api.update(config_map("default", "dispa", {"routes.toml": "a = 2"}))
            await r.until(lambda: len(got) == 3, "updated")
            assert got[2].data["routes.toml"] == "a = 2"
            assert int(got[2].resource_version) > int(got[1].resource_version)
            api.create(config_map("default", "other", {"x": "y"}))  # not this one
            api.delete("ConfigMap", "default", "dispa")
            await r.until(lambda: len(got) == 4, "deleted")
            assert got[3] is None
            assert (await p.get_configmap("default", "other")).data == {"x": "y"}
            assert await p.get_configmap("default", "dispa") is None
            assert "configmaps/default/dispa" in p.status()["watches"]
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await p.close()

    asyncio.run(main())


def test_tls_secrets_give_certificate_and_key_pem_and_follow_rotation(api, token_file):
    api.create(tls_secret("default", "site", b"CERT-1", b"KEY-1", ca_pem=b"CA"))

    async def main():
        p = make(api, token_file)
        got: list = []

        async def on_secret(secret):  # an async callback is awaited
            got.append(secret)

        task = asyncio.ensure_future(p.watch_secret("default", "site", on_secret))
        try:
            r = Running(p)
            await r.until(lambda: len(got) == 1, "initial secret")
            s = got[0]
            assert s.is_tls and (s.cert_pem, s.key_pem, s.ca_pem) == (b"CERT-1", b"KEY-1", b"CA")
            api.update(tls_secret("default", "site", b"CERT-2", b"KEY-2"))  # cert-manager
            await r.until(lambda: len(got) == 2, "rotated secret")
            assert (got[1].cert_pem, got[1].key_pem, got[1].ca_pem) == (b"CERT-2", b"KEY-2",
                                                                         None)
            one = await p.get_secret("default", "site")
            assert one.cert_pem == b"CERT-2" and one.type == "kubernetes.io/tls"
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await p.close()

    asyncio.run(main())


def test_lists_are_paginated_and_big_watch_events_are_not_cut(api, token_file, monkeypatch):
    import dispa.discovery.kubernetes as k8s
    monkeypatch.setattr(k8s, "PAGE_SIZE", 2)
    for n in range(5):
        api.create(_slice(f"api-{n}", [f"10.0.0.{n + 1}"]))

    async def main():
        p = make(api, token_file, "default/api")
        got: list = []
        task = asyncio.ensure_future(p.watch_secret("default", "big", got.append))
        async with Running(p) as r:
            await r.until_ids([f"10.0.0.{n}:8080" for n in range(1, 6)])
            pages = api.requests_matching("endpointslices", limit="2")
            assert len(pages) == 3 and "continue" in pages[-1][2]
            await r.until(lambda: got == [None], "no secret yet")
            blob = bytes(range(256)) * 2048  # 512 KiB: one watch line of ~700 KiB
            api.create(tls_secret("default", "big", blob, b"KEY"))
            await r.until(lambda: len(got) == 2, "the big secret")
            assert got[1].cert_pem == blob
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    asyncio.run(main())


def test_endpoint_set_rules_for_odd_objects():
    from dispa.discovery.kubernetes import (
        endpoints_from_endpoints, endpoints_from_slices, resolve_port_name,
    )
    sl = endpoint_slice("default", "api", "s", ["10.0.0.1"], ports=[(None, 8080)],
                        address_type="IPv6")
    sl["endpoints"] += [{"addresses": ["10.0.0.2"]},  # no conditions: unknown = ready
                        {"addresses": ["10.0.0.3"], "conditions": {"ready": None}},
                        {"addresses": ["10.0.0.1"]},  # a duplicate
                        "junk", {"addresses": []}]
    got = endpoints_from_slices([sl], resolve_port_name(None, ""), True)
    assert [e.id for e in got] == ["10.0.0.1:8080", "10.0.0.2:8080", "10.0.0.3:8080"]
    nil_port = endpoint_slice("default", "api", "s", ["10.0.0.9"], ports=[("http", None)])
    assert endpoints_from_slices([nil_port], None, True) == ()  # a nil port: all ports
    mixed = endpoint_slice("default", "api", "s", ["10.0.0.9"], address_type="Unknown")
    assert endpoints_from_slices([mixed], None, True) == ()
    ep = endpoints_object("default", "api", ["10.0.0.1"], not_ready=["10.0.0.2"],
                          ports=[("a", 1), ("b", 2)])
    assert [e.id for e in endpoints_from_endpoints([ep], "b", True)] == ["10.0.0.1:2"]
    assert [e.id for e in endpoints_from_endpoints([ep], "b", False)] == [
        "10.0.0.1:2", "10.0.0.2:2"]
    assert endpoints_from_endpoints([ep], "c", False) == ()
