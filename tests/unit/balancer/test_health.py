"""The active health-check state machine (sans-I/O) and the HTTP probe."""

import asyncio

from hypothesis import given, strategies as st

from dispa.balancer.health import HealthState, probe, status_ok
from dispa.config.snapshot import EndpointSpec, HealthCheckSpec


def test_thresholds_flip_state_only_after_consecutive_results():
    s = HealthState(healthy_threshold=2, unhealthy_threshold=3)
    assert s.healthy
    assert [s.observe(False) for _ in range(3)] == [False, False, True]
    assert not s.healthy
    assert s.observe(True) is False and s.observe(False) is False  # streak broken
    assert [s.observe(True) for _ in range(2)] == [False, True]
    assert s.healthy


@given(st.lists(st.booleans(), max_size=60), st.integers(1, 4), st.integers(1, 4))
def test_state_equals_the_last_run_that_reached_its_threshold(results, up, down):
    s = HealthState(up, down)
    healthy = True
    run_value, run_len = None, 0
    for ok in results:
        run_len = run_len + 1 if ok == run_value else 1
        run_value = ok
        flipped = s.observe(ok)
        if ok and not healthy and run_len >= up:
            healthy = True
            assert flipped
        elif not ok and healthy and run_len >= down:
            healthy = False
            assert flipped
        else:
            assert not flipped
        assert s.healthy == healthy


def test_expected_status():
    assert status_ok(200, HealthCheckSpec()) and status_ok(301, HealthCheckSpec())
    assert not status_ok(500, HealthCheckSpec())
    assert status_ok(500, HealthCheckSpec(expected_status=(500,)))
    assert not status_ok(200, HealthCheckSpec(expected_status=(204,)))


def test_probe_against_a_real_server_and_a_closed_port(origin):
    ep = EndpointSpec(id=f"127.0.0.1:{origin.port}", name="a", host="127.0.0.1", port=origin.port)
    ok, detail = asyncio.run(probe(ep, HealthCheckSpec(path="/status/200", timeout_seconds=2)))
    assert ok and detail == "status 200"
    ok, detail = asyncio.run(probe(ep, HealthCheckSpec(path="/status/503", timeout_seconds=2)))
    assert not ok and "503" in detail
    import socket
    s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()
    dead = EndpointSpec(id=f"127.0.0.1:{port}", name="d", host="127.0.0.1", port=port)
    ok, detail = asyncio.run(probe(dead, HealthCheckSpec(timeout_seconds=2)))
    assert not ok
