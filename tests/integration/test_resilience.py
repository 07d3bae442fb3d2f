"""Load balancing and resilience on a running dispa-server with real origins: circuit
breakers, outlier ejection, the retry budget, consistent hashing across reloads and
endpoint removal, and latency-aware balancing."""

from __future__ import annotations

import signal
import time

from tests.support.dispa_proc import free_port, http_get, wait_for


def breaker_states(d, endpoint_id):
    st = d.status()
    out = []
    for worker in st["resilience"].values():
        for cluster in worker.values():
            eps = cluster.get("breakers", {}).get("endpoints", [])
            out += [e["state"] for e in eps if e.get("id", endpoint_id) == endpoint_id]
    return out


def endpoint_id(origin) -> str:
    return origin.url.removeprefix("http://")


def test_a_failing_endpoint_trips_its_breaker_then_recovers(dispa, origins):
    good, bad = origins("origin-good"), origins("origin-bad")
    bad.force_status = 500
    extra = '''
[targets.circuit_breaker]
failure_threshold = 3
recovery_time = 1.0
half_open_requests = 1
'''
    d = dispa(targets=[("good", good.url), ("bad", bad.url)], extra=extra)
    statuses = [http_get(d.port, "/")[0] for _ in range(12)]
    # round robin sends every other request to "bad" until its breaker opens after 3
    assert statuses.count(500) == 3, statuses
    n_bad = len(bad.requests)
    assert all(http_get(d.port, "/")[0] == 200 for _ in range(10))
    assert len(bad.requests) == n_bad  # open: no request reaches it
    st = d.status()
    snap = next(iter(st["resilience"].values()))["default"]["breakers"]["endpoints"]
    assert [e["state"] for e in snap] == ["closed", "open"], snap
    _, metrics = d.admin_get("/metrics")
    assert f'dispa_circuit_breaker_open{{cluster="default",endpoint="{endpoint_id(bad)}"}} 1' \
        in metrics.decode()
    # the endpoint heals; after recovery_time one probe goes through and closes the breaker
    bad.force_status = None
    time.sleep(1.1)  # recovery_time is the behaviour under test: let it elapse
    wait_for(lambda: http_get(d.port, "/")[0] == 200 and len(bad.requests) > n_bad,
             what="a probe to reach the healed endpoint")
    for _ in range(6):
        assert http_get(d.port, "/")[0] == 200
    assert len(bad.requests) >= n_bad + 3  # back in rotation
    snap = next(iter(d.status()["resilience"].values()))["default"]["breakers"]["endpoints"]
    assert snap[1]["state"] == "closed"


def test_outlier_ejection_grows_with_each_ejection(dispa, origins):
    good, bad = origins("origin-good"), origins("origin-bad")
    bad.force_status = 503
    extra = '''
[targets.outlier_detection]
consecutive_5xx = 2
base_ejection_time = 0.5
max_ejection_time = 10
max_ejection_percent = 50
'''
    d = dispa(targets=[("good", good.url), ("bad", bad.url)], extra=extra)
    statuses = [http_get(d.port, "/")[0] for _ in range(8)]
    assert statuses.count(503) == 2, statuses
    n = len(bad.requests)
    wait_for(lambda: (http_get(d.port, "/"), len(bad.requests) > n)[1], timeout=5,
             what="un-ejection after base_ejection_time")
    # ejected again after two more 503s, now for twice as long
    for _ in range(4):
        http_get(d.port, "/")
    snap = next(iter(d.status()["resilience"].values()))["default"]["outlier"]
    assert snap["endpoints"][1]["times_ejected"] == 2, snap
    assert snap["endpoints"][1]["multiplier"] == 2


def test_retries_stop_when_the_retry_budget_is_spent(dispa, origin):
    dead = f"http://127.0.0.1:{free_port()}"
    with_budget = '''
[targets.retry_budget]
type = "concurrent"
budget_percent = 0.0
min_retry_concurrency = 0
'''
    d = dispa(targets=[("dead", dead), ("a", origin.url)], extra=with_budget)
    first = [http_get(d.port, "/")[0] for _ in range(2)]
    assert 502 in first, first  # the connect failure was not retried: no budget
    d2 = dispa(targets=[("dead", dead), ("a", origin.url)])
    assert [http_get(d2.port, "/")[0] for _ in range(2)] == [200, 200]  # retried


def test_consistent_hash_keeps_keys_across_a_reload_and_moves_few_on_removal(
        dispa, origins):
    o = [origins(f"origin-{i}") for i in range(4)]
    lb = '''
[targets.load_balancing]
type = "consistent_hash"
hash_key = "header:x-user"
'''
    targets = [(f"e{i}", x.url) for i, x in enumerate(o)]
    d = dispa(targets=targets, lb="consistent_hash", extra="")
    text = d.config_path.read_text().replace('type = "consistent_hash"',
                                             'type = "consistent_hash"\nhash_key = "header:x-user"')
    d.config_path.write_text(text)
    d.signal(signal.SIGHUP)
    wait_for(lambda: d.status()["reloads"]["ok"] >= 1, what="reload")
    users = [f"user-{i}" for i in range(200)]

    def owners():
        return {u: http_get(d.port, "/", headers={"x-user": u})[1]["x-origin"] for u in users}

    before = owners()
    assert len(set(before.values())) == 4
    assert owners() == before  # stable
    d.config_path.write_text(d.config_path.read_text() + "\n# touch\n")
    d.signal(signal.SIGHUP)
    wait_for(lambda: d.status()["reloads"]["ok"] >= 2, what="second reload")
    assert owners() == before  # stable across a reload
    # remove origin-3: only its keys move
    text = d.config_path.read_text()
    cut = text.index('[[targets.targets]]\nname = "e3"')
    end = text.index("\n\n", cut)
    d.config_path.write_text(text[:cut] + text[end + 2:])
    d.signal(signal.SIGHUP)
    wait_for(lambda: d.status()["reloads"]["ok"] >= 3, what="third reload")
    after = owners()
    moved = [u for u in users if after[u] != before[u]]
    assert all(before[u] == "origin-3" for u in moved)
    assert {u for u in users if before[u] == "origin-3"} == set(moved)
    assert len(moved) < 0.4 * len(users)


def test_peak_ewma_prefers_the_fast_endpoint(dispa, origins):
    fast, slow = origins("origin-fast"), origins("origin-slow")
    slow.force_delay_ms = 60
    d = dispa(targets=[("fast", fast.url), ("slow", slow.url)], lb="peak_ewma")
    for _ in range(60):
        assert http_get(d.port, "/")[0] == 200
    assert len(slow.requests) < 0.3 * 60, (len(fast.requests), len(slow.requests))


def test_sticky_cookie_pins_a_client_and_repins_when_its_endpoint_dies(dispa, origins):
    a, b = origins("origin-a"), origins("origin-b")
    extra = '''
[targets.sticky]
mode = "cookie"
cookie_name = "dsticky"
secrets = ["0123456789abcdef0123456789abcdef"]
ttl = 600
'''
    d = dispa(targets=[("a", a.url), ("b", b.url)], extra=extra)
    status, headers, _ = http_get(d.port, "/")
    cookie = headers["set-cookie"]
    assert cookie.startswith("dsticky=") and "HttpOnly" in cookie
    pinned = headers["x-origin"]
    value = cookie.split(";", 1)[0]
    for _ in range(6):  # round robin alone would alternate; the cookie keeps the pin
        status, headers, _ = http_get(d.port, "/", headers={"cookie": value})
        assert status == 200 and headers["x-origin"] == pinned
        assert "set-cookie" not in headers
    forged = value[:-2] + ("AA" if not value.endswith("AA") else "BB")
    _, headers, _ = http_get(d.port, "/", headers={"cookie": forged})
    assert "set-cookie" in headers  # a forged cookie is ignored and replaced
    # the pinned endpoint dies: the client is re-pinned with a new cookie
    (a if pinned == "origin-a" else b).stop()
    other = "origin-b" if pinned == "origin-a" else "origin-a"
    seen = []
    for _ in range(3):
        status, headers, _ = http_get(d.port, "/", headers={"cookie": value})
        seen.append((status, headers.get("x-origin"), "set-cookie" in headers))
    assert (200, other, True) in seen, seen


def test_a_recovered_endpoint_ramps_up_slowly(dispa, origins):
    good, bad = origins("origin-good"), origins("origin-bad")
    bad.force_status = 500
    extra = '''
[targets.circuit_breaker]
failure_threshold = 2
recovery_time = 0.5
slow_start_seconds = 3.0
slow_start_min = 0.05
'''
    d = dispa(targets=[("good", good.url), ("bad", bad.url)], extra=extra)
    for _ in range(6):
        http_get(d.port, "/")
    bad.force_status = None
    time.sleep(0.6)  # recovery_time is the behaviour under test: let it elapse
    n0 = len(bad.requests)
    wait_for(lambda: (http_get(d.port, "/"), len(bad.requests) > n0)[1], what="the probe")
    t0 = time.monotonic()
    n1 = len(bad.requests)
    early = 40
    for _ in range(early):
        http_get(d.port, "/")
    early_share = (len(bad.requests) - n1) / early
    assert time.monotonic() - t0 < 1.5  # still early in the 3 s ramp
    time.sleep(max(0.0, 3.2 - (time.monotonic() - t0)))  # past the ramp
    n2 = len(bad.requests)
    for _ in range(40):
        http_get(d.port, "/")
    late_share = (len(bad.requests) - n2) / 40
    assert early_share < 0.3 and late_share >= 0.4, (early_share, late_share)


def test_per_try_timeout_bounds_each_attempt(dispa, origins):
    slow = origins("origin-slow")
    extra = '''
[targets.retry_budget]
type = "concurrent"
per_try_timeout = 0.3
'''
    d = dispa(targets=[("slow", slow.url)], extra=extra)
    t0 = time.monotonic()
    status, _, _ = http_get(d.port, "/delay?ms=2000")
    assert status == 504 and time.monotonic() - t0 < 1.5
