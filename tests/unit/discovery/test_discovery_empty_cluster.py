"""A cluster that discovery emptied (an authoritative "no instances" answer) builds in the
worker and answers every pick with "none" (the session's 503), whatever its balancer and
resilience settings."""

from __future__ import annotations

import asyncio

import pytest

from dispa.config.snapshot import ClusterSpec, EndpointSpec, InterceptSpec, ProxySpec, \
    make_snapshot
from dispa.proxy.runtime import WorkerState, build_runtime

RESILIENCE = dict(breaker={}, group_breaker={}, outlier={},
                  retry_budget={"type": "concurrent"},
                  sticky={"mode": "cookie", "secret": "s" * 32})


@pytest.mark.parametrize("lb", ["roundrobin", "weighted", "leastconnections", "random",
                                "consistent_hash", "maglev", "peak_ewma"])
@pytest.mark.parametrize("extras", [{}, RESILIENCE, {"sticky_sessions": True}],
                         ids=["plain", "resilience", "sticky"])
def test_an_empty_cluster_builds_and_picks_nothing(lb, extras):
    loop = asyncio.new_event_loop()
    try:
        empty = ClusterSpec(name="api", endpoints=(), lb=lb, **extras)
        default = ClusterSpec(name="default", endpoints=(
            EndpointSpec(id="10.0.0.1:80", name="a", host="10.0.0.1", port=80),))
        snap = make_snapshot(proxy=ProxySpec(), intercept=InterceptSpec(),
                             clusters=(default, empty), default_cluster="default")
        rt = build_runtime(snap, WorkerState(loop))
        cluster = rt.clusters["api"]
        assert cluster.pick("10.1.1.1", set(), None) == -1
        assert cluster.pick("10.1.1.1", {0}, None) == -1
        assert not cluster.usable()
        assert rt.clusters["default"].pick("10.1.1.1", set(), None) == 0
    finally:
        loop.close()
