"""Configuration and certificate sources of the providers: the watcher hooks Consul KV and
Kubernetes ConfigMaps to ``on_config`` and ``[tls] kubernetes_secrets`` Secrets to
``on_secret``; the Kubernetes provider hands over only .toml/.json keys; the TLS store
validates pairs from a Secret like file pairs (bad pair refused, previous kept)."""

from __future__ import annotations

import asyncio
import time

import pytest

from dispa.discovery.config import (
    ConsulOptions, KubernetesOptions, ServiceDiscoveryConfig, object_ref_ok,
)
from dispa.discovery.kubernetes import KubernetesProvider
from dispa.discovery.provider import Provider
from dispa.discovery.watcher import DiscoveryWatcher
from dispa.tls.store import CertStore
from tests.support.k8s_double import K8sDouble, config_map, tls_secret
from tests.support.pki import CA, cert_pem, key_pem

TOKEN = "test-token"


@pytest.fixture
def api():
    d = K8sDouble(token=TOKEN, bookmark_interval=0.2).start()
    yield d
    d.close()


async def _until(cond, what: str, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def test_object_references():
    assert object_ref_ok("shop/site-tls") and object_ref_ok("site.tls")
    assert not object_ref_ok("a/b/c") and not object_ref_ok("Shop/x") and not object_ref_ok("")


class _Fake(Provider):
    kind = "consul"

    def __init__(self, name, settings, sources):
        super().__init__(name)
        self.on_kv = None

    async def run(self, emit):
        await self.on_kv({"a.toml": "x"})
        await asyncio.Event().wait()


def test_the_watcher_runs_a_config_only_provider_and_hooks_its_kv():
    got = []

    async def on_config(kind, fragments):
        got.append((kind, fragments))

    async def publish():
        pass

    async def main():
        settings = ServiceDiscoveryConfig(consul=ConsulOptions(kv_prefix="dispa/"))
        w = DiscoveryWatcher(settings, {}, publish, factory=_Fake, on_config=on_config)
        assert w.config_kinds() == {"consul"}
        await w.start()
        try:
            await _until(lambda: got, "the kv handed over")
            assert got == [("consul", {"a.toml": "x"})]
            # no kv_prefix any more: the provider stops
            await w.reconfigure(ServiceDiscoveryConfig(), {})
            assert w.providers == {}
        finally:
            await w.stop()

    asyncio.run(main())


def test_without_a_consumer_no_config_provider_runs():
    settings = ServiceDiscoveryConfig(consul=ConsulOptions(kv_prefix="dispa/"))
    w = DiscoveryWatcher(settings, {}, lambda: None)
    assert w.config_kinds() == set()


def test_kubernetes_config_maps_and_secrets(api, tmp_path):
    token = tmp_path / "token"
    token.write_text(TOKEN)
    settings = ServiceDiscoveryConfig(provider="kubernetes", refresh_interval=5,
                                      kubernetes=KubernetesOptions(
                                          api_server=api.url, token_file=str(token),
                                          namespace="shop",
                                          config_maps=["cfg", "other/more"]))
    p = KubernetesProvider("kubernetes", settings, [])
    p.backoff_initial, p.backoff_max = 0.05, 0.3
    fragments: list[dict] = []
    secrets: list = []
    p.on_config = fragments.append
    p.on_secret = lambda ref, s: secrets.append((ref, s))
    p.secrets = ["shop/site"]

    async def main():
        task = asyncio.ensure_future(p.run(lambda s: None))
        try:
            await _until(lambda: fragments and secrets, "the first answers")
            assert fragments[-1] == {} and secrets[-1] == ("shop/site", None)
            api.create(config_map("shop", "cfg", {"a.toml": "A", "b.JSON": "B", "notes": "x"}))
            await _until(lambda: fragments[-1] == {"shop/cfg/a.toml": "A",
                                                   "shop/cfg/b.JSON": "B"}, "cfg")
            api.create(config_map("other", "more", {"c.toml": "C"}))
            await _until(lambda: "other/more/c.toml" in fragments[-1], "more")
            assert "shop/cfg/a.toml" in fragments[-1]  # every map's keys, each time
            api.delete("ConfigMap", "shop", "cfg")
            await _until(lambda: fragments[-1] == {"other/more/c.toml": "C"}, "cfg deleted")
            api.create(tls_secret("shop", "site", b"CERT", b"KEY"))
            await _until(lambda: secrets[-1][1] is not None, "the secret")
            assert secrets[-1][1].cert_pem == b"CERT"
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await p.close()

    asyncio.run(main())


def test_store_validates_secret_pairs_like_files():
    ca = CA()
    v1, k1 = ca.issue("v1", dns=["site.test"])
    v2, k2 = ca.issue("v2", dns=["site.test"])
    store = CertStore()
    label = "kubernetes:shop/site"
    assert store.set_pair(label, cert_pem(v1), key_pem(k1)) is True
    assert store.set_pair(label, cert_pem(v1), key_pem(k1)) is False  # unchanged
    [served] = store.certificates()
    assert served["names"] == ["site.test"] and served["source"] == label
    # a certificate with another's key: refused, v1 keeps serving, the status says why
    assert store.set_pair(label, cert_pem(v2), key_pem(k1)) is False
    assert store.certificates()[0]["id"] == served["id"]
    [err] = store.errors()
    assert err["cert_file"] == label and "does not match" in err["error"]
    assert err["serving_previous"] is True
    assert store.set_pair(label, None, b"") is False  # not a TLS secret's data
    # a good rotation clears the error and keeps the previous version
    assert store.set_pair(label, cert_pem(v2), key_pem(k2)) is True
    assert store.errors() == [] and store.external[label].previous["id"] == served["id"]
    assert store.drop_pairs(set()) is True and store.certificates() == []
