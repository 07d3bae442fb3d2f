"""The original Dispa example file loads unchanged and compiles to the expected snapshot."""

from __future__ import annotations

import msgspec

from dispa.config import check_file, load_config
from dispa.config.snapshot import ListenerSpec, Snapshot, StaticSpec


def test_compat_example_loads_and_compiles(compat_path):
    loaded = load_config(compat_path, env={})
    assert loaded.path == str(compat_path)
    snap = loaded.snapshot
    assert snap.default_cluster == "default"
    (cluster,) = snap.clusters
    assert cluster.name == "default"
    assert cluster.lb == "weighted"
    assert cluster.sticky_sessions is False
    assert [e.weight for e in cluster.endpoints] == [3, 2, 1]
    assert [e.id for e in cluster.endpoints] == [
        "192.168.1.100:3000", "192.168.1.101:3000", "192.168.1.200:8080"]
    assert [e.name for e in cluster.endpoints] == ["backend-1", "backend-2", "backup-server"]
    assert [e.timeout_seconds for e in cluster.endpoints] == [30.0, 30.0, 45.0]
    hc = cluster.health_check
    assert (hc.enabled, hc.interval_seconds, hc.timeout_seconds) == (True, 30.0, 10.0)
    assert (hc.healthy_threshold, hc.unhealthy_threshold) == (2, 3)

    intercept = snap.intercept
    assert intercept.exact == ("example.com", "api.myapp.com")
    assert intercept.wildcard_suffixes == (".test.com", ".dev.local")
    assert intercept.exclude_exact == ("health.example.com", "ping.test.com")
    assert intercept.exclude_wildcard_suffixes == ()
    assert intercept.wildcard_support is True
    assert intercept.intercept_all is False

    assert snap.proxy.keep_alive_timeout_seconds == 60.0
    assert snap.proxy.request_timeout_seconds == 30.0

    static = loaded.static
    assert static.listeners == (ListenerSpec(host="0.0.0.0", port=8080),)
    assert static.workers == 4
    assert [(a.host, a.port) for a in static.admin_listeners] == [
        ("127.0.0.1", 9090), ("127.0.0.1", 8081)]
    assert loaded.log_level == "info" and loaded.log_format == "json"


def test_compat_example_checks_clean(compat_path):
    assert check_file(compat_path) == []


def test_snapshot_round_trips_through_msgpack(compat_path):
    loaded = load_config(compat_path, env={})
    blob = msgspec.msgpack.encode(loaded.snapshot)
    assert msgspec.msgpack.decode(blob, type=Snapshot) == loaded.snapshot
    blob = msgspec.msgpack.encode(loaded.static)
    assert msgspec.msgpack.decode(blob, type=StaticSpec) == loaded.static


def test_same_file_gives_same_version(compat_path):
    assert load_config(compat_path).snapshot.version == load_config(compat_path).snapshot.version


def test_workers_override_wins(compat_path):
    assert load_config(compat_path, workers_override=2).static.workers == 2
    assert load_config(compat_path, workers_override=0).static.workers == 0


def test_as_dict_is_effective_config_with_file_spelling(compat_path):
    data = load_config(compat_path, workers_override=7).as_dict()
    assert data["targets"]["load_balancing"] == {"type": "weighted", "sticky_sessions": False}
    assert [t["name"] for t in data["targets"]["targets"]] == [
        "backend-1", "backend-2", "backup-server"]
    assert data["server"]["workers"] == 7
    assert data["server"]["shutdown_timeout"] == 30.0  # default filled in
    assert data["monitoring"]["bind_host"] == "127.0.0.1"
