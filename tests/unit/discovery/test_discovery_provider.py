"""The provider interface's helpers: Backoff (exponential, full jitter, capped, reset) and
ProviderHealth (starting -> ok | stale, staleness), plus the provider registry."""

from __future__ import annotations

import random

import pytest

from dispa.discovery import provider as prov
from dispa.discovery.provider import Backoff, DiscoveredEndpoint, ProviderHealth
from dispa.discovery.registry import PROVIDERS, provider_class, self_instance


def test_backoff_grows_exponentially_with_jitter_and_a_cap():
    random.seed(7)
    b = Backoff(initial=0.5, maximum=4.0, factor=2.0)
    ceilings = [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    for ceiling in ceilings:
        d = b.next_delay()
        assert 0.25 <= d <= ceiling
    # over many draws the delays reach near their ceiling (full jitter, not fixed)
    b = Backoff(initial=0.5, maximum=4.0)
    for _ in range(4):
        b.next_delay()
    assert max(b.next_delay() for _ in range(200)) > 3.5


def test_backoff_reset_starts_over():
    b = Backoff(initial=0.5, maximum=30.0)
    for _ in range(10):
        b.next_delay()
    b.reset()
    assert all(b.next_delay() <= 0.5 for _ in range(1))


def test_health_states_and_staleness(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(prov.time, "time", lambda: now[0])
    h = ProviderHealth()
    assert h.state == "starting" and h.staleness_seconds() == float("inf")
    h.failed("refused")  # never answered: stale at once (an outage must show), no success
    assert h.state == "stale" and h.errors == 1 and h.last_success is None
    assert h.as_dict()["staleness_seconds"] is None
    h.ok()
    assert h.state == "ok" and h.staleness_seconds() == 0.0 and h.last_error is None
    now[0] += 12.5
    h.failed("timeout")
    assert h.state == "stale" and h.staleness_seconds() == 12.5
    assert h.as_dict() == {"state": "stale", "last_success": 1000.0, "last_error": "timeout",
                           "errors": 2, "reconnects": 0, "staleness_seconds": 12.5}
    h.ok()
    assert h.state == "ok"


def test_endpoint_ids_match_static_ids():
    assert DiscoveredEndpoint(host="10.0.0.1", port=80).id == "10.0.0.1:80"
    assert DiscoveredEndpoint(host="fd00::1", port=80).id == "[fd00::1]:80"


def test_the_registry_names_every_kind_and_loads_dns():
    assert set(PROVIDERS) == {"consul", "etcd", "kubernetes", "dns"}
    assert provider_class("dns").__name__ == "DnsProvider"
    with pytest.raises(KeyError):
        provider_class("zookeeper")


def test_self_instance_defaults_from_the_listener():
    import socket
    from dispa.config.snapshot import ListenerSpec, StaticSpec
    from dispa.discovery.config import RegisterConfig
    static = StaticSpec(listeners=(ListenerSpec(host="0.0.0.0", port=8080),))
    inst = self_instance(RegisterConfig(tags=["edge"], ttl=9), static)
    host = socket.gethostname()
    assert (inst.service, inst.host, inst.port, inst.id, inst.tags, inst.ttl_seconds) == (
        "dispa", host, 8080, f"dispa-{host}-8080", ("edge",), 9.0)
    inst = self_instance(RegisterConfig(address="10.1.1.1", port=81, id="me"), static)
    assert (inst.host, inst.port, inst.id) == ("10.1.1.1", 81, "me")
