"""Outlier ejection (dispa/balancer/outlier.py): Envoy's consecutive-5xx, gateway-failure and
success-rate detectors, ejection times, the ejection cap, and invariants over random traffic."""

from __future__ import annotations

import pathlib
import re

import msgspec
import pytest
from hypothesis import given, settings, strategies as st

from dispa.balancer.outlier import LOCAL_FAILURE, OutlierConfig, OutlierDetector

DOC = pathlib.Path(__file__).resolve().parents[3] / "docs" / "resilience.md"


def doc_section(struct_name: str) -> str:
    text = DOC.read_text(encoding="utf-8")
    m = re.search(rf"^#+ .*`{struct_name}`.*$", text, re.M)
    assert m, f"docs/resilience.md has no heading naming `{struct_name}`"
    rest = text[m.end():]
    nxt = re.search(r"^#+ ", rest, re.M)
    return rest[:nxt.start()] if nxt else rest


def eject_by_5xx(d: OutlierDetector, i: int, now: float) -> bool:
    out = False
    for _ in range(d.config.consecutive_5xx):
        out = d.record(i, now, 500)
    return out


# ------------------------------------------------------------------ config

def test_config_defaults_are_envoys():
    c = OutlierConfig()
    assert (c.consecutive_5xx, c.interval, c.base_ejection_time, c.max_ejection_time,
            c.max_ejection_percent) == (5, 10.0, 30.0, 300.0, 10.0)
    assert c.consecutive_gateway_failure == 0 and not c.success_rate_enabled
    assert (c.success_rate_minimum_hosts, c.success_rate_request_volume,
            c.success_rate_stdev_factor) == (5, 100, 1.9)


@pytest.mark.parametrize("doc, message", [
    (b"base_ejection_time = 60\nmax_ejection_time = 30\n", "max_ejection_time"),
    (b"max_ejection_percent = 101\n", "<= 100"),
    (b"consecutive5xx = 3\n", "unknown field"),
])
def test_config_rejects_bad_values(doc, message):
    with pytest.raises(msgspec.ValidationError, match=re.escape(message)):
        msgspec.toml.decode(doc, type=OutlierConfig)


def test_docs_have_a_row_for_every_config_key():
    section = doc_section("OutlierConfig")
    for f in msgspec.structs.fields(OutlierConfig):
        assert re.search(rf"^\| `{f.encode_name}` \|", section, re.M), f.name


def test_needs_an_endpoint():
    with pytest.raises(ValueError):
        OutlierDetector(0)


# ------------------------------------------------------------------ consecutive errors

def ten() -> OutlierDetector:
    return OutlierDetector(10, OutlierConfig(consecutive_5xx=3, base_ejection_time=30))


def test_consecutive_5xx_eject_at_the_threshold():
    d = ten()
    assert [d.record(4, 0, 503) for _ in range(3)] == [False, False, True]
    assert d.ejected(0) == {4} and d.is_ejected(4)
    assert d.counters["ejections_consecutive_5xx"] == 1


@pytest.mark.parametrize("breaker", [200, 204, 301, 404, 499])
def test_any_non_5xx_answer_breaks_the_streak(breaker):
    d = ten()
    for s in (500, 500, breaker, 500, 500):
        assert not d.record(0, 0, s)
    assert d.ejected(0) == set()


def test_local_failures_count_as_5xx():
    d = ten()
    for _ in range(3):
        d.record(1, 0, LOCAL_FAILURE)
    assert d.ejected(0) == {1}


def test_record_ok_maps_failure_to_a_local_failure():
    d = ten()
    for _ in range(3):
        d.record_ok(2, 0, False)
    assert d.ejected(0) == {2}


def test_gateway_failure_detection_is_off_by_default_and_counts_502_503_504_and_local():
    c = OutlierConfig(consecutive_5xx=0, consecutive_gateway_failure=3, max_ejection_percent=50)
    d = OutlierDetector(4, c)
    for s in (502, 504, 500, 503, LOCAL_FAILURE):  # the 500 resets the gateway streak
        d.record(0, 0, s)
    assert d.ejected(0) == set()
    d.record(0, 0, 502)
    assert d.ejected(0) == {0} and d.counters["ejections_consecutive_gateway_failure"] == 1
    off = OutlierDetector(4, OutlierConfig(consecutive_5xx=0))
    for _ in range(50):
        off.record(0, 0, 502)
    assert off.ejected(0) == set()


# ------------------------------------------------------------------ ejection time

def test_ejection_lasts_base_times_multiplier_and_tick_brings_it_back():
    d = ten()
    eject_by_5xx(d, 0, 5)
    assert d.tick(34.9) == []
    assert d.tick(35) == [0]
    assert d.ejected(35) == set() and d.counters["unejections_total"] == 1


def test_repeated_ejections_grow_linearly_then_cap():
    c = OutlierConfig(consecutive_5xx=1, base_ejection_time=10, max_ejection_time=25,
                      interval=1000, max_ejection_percent=100)
    d = OutlierDetector(2, c)
    t = 0.0
    durations = []
    for _ in range(4):
        d.record(0, t, 500)
        until = d.snapshot()["endpoints"][0]["ejected_until"]
        durations.append(until - t)
        t = until
        assert d.tick(t) == [0]
    assert durations == [10, 20, 25, 25]


def test_the_multiplier_decays_by_one_per_interval_in_service():
    c = OutlierConfig(consecutive_5xx=1, base_ejection_time=10, interval=10, max_ejection_percent=100)
    d = OutlierDetector(2, c)
    d.record(0, 0, 500)  # first call: sweeps every 10 s from t=10; ejected until 10
    d.record(0, 10, 500)  # back at 10 (and the sweep at 10 decays 1 -> 0), ejected again: x1
    assert d.snapshot()["endpoints"][0]["multiplier"] == 1
    d.tick(20)  # back; the sweep at 20 finds it in service
    assert d.snapshot()["endpoints"][0]["multiplier"] == 0


def test_a_streak_is_cleared_when_the_endpoint_comes_back():
    d = ten()
    eject_by_5xx(d, 0, 0)
    d.record(0, 1, 500)  # in flight before the ejection: counted, ejects nothing
    d.record(0, 1, 500)
    d.tick(30)
    assert d.snapshot()["endpoints"][0]["consecutive_5xx"] == 0
    assert not d.record(0, 31, 500)


def test_long_idle_catch_up_is_bounded_and_forgives_everything():
    c = OutlierConfig(consecutive_5xx=1, interval=0.01, max_ejection_percent=100)
    d = OutlierDetector(3, c)
    for _ in range(5):
        d.record(0, d.snapshot()["endpoints"][0]["ejected_until"] or 0.0, 500)
    d.tick(10 ** 9)  # 10^11 intervals later
    snap = d.snapshot()
    assert snap["ejected"] == [] and snap["endpoints"][0]["multiplier"] == 0
    assert snap["counters"]["sweeps"] < 10 ** 6


# ------------------------------------------------------------------ max_ejection_percent

def test_max_ejection_percent_caps_the_ejected_share():
    d = ten()  # 10% of 10 endpoints: one
    eject_by_5xx(d, 0, 0)
    assert not eject_by_5xx(d, 1, 0)
    assert d.ejected(0) == {0} and d.counters["ejections_overflow"] == 1


def test_default_percent_never_ejects_from_small_clusters():
    d = OutlierDetector(3, OutlierConfig(consecutive_5xx=1))
    assert not d.record(0, 0, 500)


def test_always_eject_one_host_allows_one_but_never_the_last():
    d = OutlierDetector(3, OutlierConfig(consecutive_5xx=1, always_eject_one_host=True))
    assert d.record(0, 0, 500)
    assert not d.record(1, 0, 500)
    single = OutlierDetector(1, OutlierConfig(consecutive_5xx=1, always_eject_one_host=True,
                                              max_ejection_percent=100))
    assert not single.record(0, 0, 500)


def test_at_least_one_endpoint_is_always_left_in():
    d = OutlierDetector(2, OutlierConfig(consecutive_5xx=1, max_ejection_percent=100))
    assert d.record(0, 0, 500)
    assert not d.record(1, 0, 500)


# ------------------------------------------------------------------ success rate

def sr_config(**kw) -> OutlierConfig:
    base = dict(consecutive_5xx=0, success_rate_enabled=True, success_rate_minimum_hosts=5,
                success_rate_request_volume=100, max_ejection_percent=50, interval=10)
    base.update(kw)
    return OutlierConfig(**base)


def feed(d: OutlierDetector, now: float, rates: list[float], volume: int = 100) -> None:
    for i, r in enumerate(rates):
        good = round(volume * r)
        for k in range(volume):
            d.record(i, now, 200 if k < good else 500)


def test_success_rate_ejects_the_endpoint_below_mean_minus_factor_stdev():
    d = OutlierDetector(6, sr_config())
    d.tick(0)
    feed(d, 1, [0.99, 0.98, 0.99, 1.0, 0.99, 0.60])
    assert d.ejected(10) == {5}
    sr = d.last_success_rate
    assert sr is not None and sr["hosts"] == 6 and sr["threshold"] > 0.6
    assert d.counters["ejections_success_rate"] == 1


def test_success_rate_needs_enough_hosts_with_enough_volume():
    d = OutlierDetector(6, sr_config())
    d.tick(0)
    feed(d, 1, [0.99, 0.98, 0.99, 1.0], volume=100)
    feed(d, 1, [1.0] * 4 + [0.1, 0.1], volume=99)  # 4 and 5 below the request volume
    assert d.ejected(10) == set() and d.last_success_rate is None


def test_success_rate_uses_only_the_last_interval():
    d = OutlierDetector(6, sr_config())
    d.tick(0)
    feed(d, 1, [1.0] * 5 + [0.5])
    assert d.ejected(10) == {5}
    feed(d, 11, [1.0] * 6)
    d.tick(20)
    assert d.snapshot()["endpoints"][0]["interval_requests"] == 0


# ------------------------------------------------------------------ mask and snapshot

def test_mask_is_none_when_nothing_is_ejected_and_merges_health():
    d = ten()
    assert d.mask(0) is None
    h = [True] * 10
    h[3] = False
    assert d.mask(0, h) == h and d.mask(0, h) is not h
    eject_by_5xx(d, 7, 0)
    m = d.mask(0, h)
    assert m[3] is False and m[7] is False and sum(m) == 8


def test_snapshot_is_plain_data():
    d = ten()
    eject_by_5xx(d, 2, 0)
    s = d.snapshot(1)
    assert s["ejected"] == [2] and s["endpoints"][2]["times_ejected"] == 1
    assert s["endpoints"][2]["ejected_until"] == 30
    msgspec.json.encode(s)


# ------------------------------------------------------------------ invariants over random traffic

@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 8), pct=st.sampled_from([0.0, 10.0, 34.0, 50.0, 100.0]),
       always_one=st.booleans(), sr=st.booleans(),
       steps=st.lists(st.tuples(st.integers(0, 7), st.sampled_from([0.0, 0.5, 3.0, 40.0]),
                                st.sampled_from([200, 404, 500, 502, 503, LOCAL_FAILURE])),
                      max_size=150))
def test_ejections_respect_the_cap_and_the_time_limits(n, pct, always_one, sr, steps):
    c = OutlierConfig(consecutive_5xx=2, consecutive_gateway_failure=2, interval=5,
                      base_ejection_time=10, max_ejection_time=30, max_ejection_percent=pct,
                      always_eject_one_host=always_one, success_rate_enabled=sr,
                      success_rate_minimum_hosts=1, success_rate_request_volume=2)
    d = OutlierDetector(n, c)
    now = 0.0
    cap = max(int(pct * n // 100), 1 if always_one else 0)
    for i, dt, status in steps:
        now += dt
        d.record(i % n, now, status)
        ej = d.ejected(now)
        assert len(ej) < n, "the last endpoint was ejected"
        assert len(ej) <= cap
        for j in ej:
            until = d.snapshot()["endpoints"][j]["ejected_until"]
            assert now < until <= now + c.max_ejection_time
        m = d.mask(now)
        assert (m is None) == (not ej)
        assert m is None or {j for j in range(n) if not m[j]} == ej
