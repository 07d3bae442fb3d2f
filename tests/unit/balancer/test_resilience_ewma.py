"""Peak-EWMA power-of-two-choices selector (dispa/balancer/ewma.py): the estimate, the cost,
the Selector contract, and a load simulation on a fake clock."""

from __future__ import annotations

import heapq
import math
import pathlib
import random
import re
from collections import Counter

import msgspec
import pytest
from hypothesis import given, settings, strategies as st

from dispa.balancer import Selector
from dispa.balancer.ewma import MIN_LATENCY_SECONDS, PeakEwma, PeakEwmaConfig

DOC = pathlib.Path(__file__).resolve().parents[3] / "docs" / "resilience.md"


class FakeClock:
    def __init__(self, t: float = 0.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


class Draws:
    """An rng returning the given floats in turn (then cycling)."""

    def __init__(self, values):
        self.values = list(values)
        self.k = 0

    def random(self) -> float:
        v = self.values[self.k % len(self.values)]
        self.k += 1
        return v


def make(n=3, *, seed=1, clock=None, **kw) -> PeakEwma:
    return PeakEwma([1] * n, rng=random.Random(seed), clock=clock or FakeClock(), **kw)


# ------------------------------------------------------------------ config and contract

def test_satisfies_the_selector_protocol():
    assert isinstance(make(), Selector)


def test_config_defaults_and_from_config():
    c = PeakEwmaConfig()
    assert (c.decay_seconds, c.initial_latency_seconds) == (10.0, 0.03)
    s = PeakEwma.from_config([1, 1], msgspec.toml.decode(b"decay_seconds = 5\n", type=PeakEwmaConfig),
                             clock=FakeClock())
    assert s.latency(0, 0) == 0.03
    with pytest.raises(msgspec.ValidationError, match="unknown field"):
        msgspec.toml.decode(b"decay = 5\n", type=PeakEwmaConfig)


def test_docs_have_a_row_for_every_config_key():
    text = DOC.read_text(encoding="utf-8")
    m = re.search(r"^#+ .*`PeakEwmaConfig`.*$", text, re.M)
    assert m, "docs/resilience.md has no heading naming `PeakEwmaConfig`"
    section = text[m.end():]
    nxt = re.search(r"^#+ ", section, re.M)
    section = section[:nxt.start()] if nxt else section
    for f in msgspec.structs.fields(PeakEwmaConfig):
        assert re.search(rf"^\| `{f.encode_name}` \|", section, re.M), f.name


def test_bad_construction_raises():
    with pytest.raises(ValueError):
        PeakEwma([])
    with pytest.raises(ValueError):
        PeakEwma([1], decay_seconds=0)
    with pytest.raises(ValueError):
        PeakEwma([0, 1])


# ------------------------------------------------------------------ the estimate

def test_a_latency_above_the_estimate_replaces_it_at_once():
    s = make(1, initial_latency_seconds=0.01)
    s.observe(0, 0.5, 0.0)
    assert s.latency(0, 0.0) == 0.5


def test_a_lower_latency_moves_the_estimate_by_the_time_weight():
    s = make(1, initial_latency_seconds=0.5, decay_seconds=10)
    s.observe(0, 0.1, 10.0)  # 10 s later: the old value keeps exp(-1)
    w = math.exp(-1)
    assert s.latency(0, 10.0) == pytest.approx(0.5 * w + 0.1 * (1 - w))


def test_the_estimate_decays_towards_zero_between_observations():
    s = make(1, initial_latency_seconds=1.0, decay_seconds=10)
    assert s.latency(0, 10.0) == pytest.approx(math.exp(-1))
    assert s.latency(0, 1e6) == 0.0
    assert s.cost(0, 1e6) == MIN_LATENCY_SECONDS  # floored: in-flight counts still matter


def test_reads_and_picks_do_not_change_the_estimate():
    clock = FakeClock()
    a, b = make(2, clock=clock), make(2, clock=clock)
    for t in (1.0, 2.0, 3.0):
        clock.t = t
        for _ in range(100):
            a.pick(None)
            a.cost(0, t)
        a.observe(0, 0.02 * t, t)
        b.observe(0, 0.02 * t, t)
    assert a.latency(0, 3.0) == b.latency(0, 3.0)


def test_cost_is_latency_times_outstanding_plus_one_over_weight():
    s = PeakEwma([1, 4], clock=FakeClock(), initial_latency_seconds=0.1)
    s.acquire(0)
    s.acquire(0)
    s.acquire(1)
    assert s.cost(0, 0) == pytest.approx(0.1 * 3)
    assert s.cost(1, 0) == pytest.approx(0.1 * 2 / 4)
    s.set_weight_factor(1, 0.5)
    assert s.cost(1, 0) == pytest.approx(0.1 * 2 / 2)
    s.set_weight_factor(1, 0)
    assert s.cost(1, 0) == math.inf


def test_release_never_goes_below_zero():
    s = make(1)
    s.release(0)
    s.acquire(0)
    s.release(0)
    s.release(0)
    assert s.outstanding(0) == 0


# ------------------------------------------------------------------ picking

def test_one_endpoint_is_picked_without_a_draw_and_minus_one_when_masked():
    rng = Draws([0.5])
    s = PeakEwma([3], rng=rng, clock=FakeClock())
    assert [s.pick(None) for _ in range(5)] == [0] * 5
    assert rng.k == 0
    assert s.pick([False]) == -1
    assert s.pick_excluding(None, {0}) == -1


def test_two_endpoints_always_pick_the_cheaper_one():
    s = make(2)
    s.observe(1, 0.2, 0.0)  # 1 is slower
    assert Counter(s.pick(None) for _ in range(200)) == Counter({0: 200})
    s.acquire(0)
    s.acquire(0)  # 0.03 * 3 = 0.09 < 0.2: still 0
    assert s.pick(None) == 0
    for _ in range(6):
        s.acquire(0)  # 0.03 * 9 > 0.2
    assert s.pick(None) == 1


def test_two_endpoints_with_equal_cost_share_the_picks():
    s = make(2)
    got = Counter(s.pick(None) for _ in range(1000))
    assert 400 < got[0] < 600


def test_masked_or_excluded_endpoints_are_never_picked_and_one_left_is_picked():
    s = make(4)
    assert s.pick([False, False, True, False]) == 2
    assert s.pick_excluding([True, True, True, False], {0, 1}) == 2
    assert s.pick_excluding(None, {0, 1, 2, 3}) == -1


@given(st.lists(st.floats(0, 1, exclude_max=True), min_size=2, max_size=2), st.integers(2, 50))
def test_the_two_draws_are_distinct_and_in_range(values, m):
    s = PeakEwma([1], rng=Draws(values), clock=FakeClock())
    a, b = s._draw(m)
    assert a != b and 0 <= a < m and 0 <= b < m


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 8).flatmap(lambda n: st.tuples(
    st.just(n), st.lists(st.booleans(), min_size=n, max_size=n) | st.none(),
    st.sets(st.integers(0, n - 1)),
    st.lists(st.tuples(st.integers(0, n - 1), st.floats(0, 2)), max_size=10),
    st.integers(0, 2 ** 32))))
def test_never_picks_an_unusable_endpoint(case):
    n, healthy, exclude, observations, seed = case
    s = make(n, seed=seed)
    for i, lat in observations:
        s.observe(i, lat, 1.0)
        s.acquire(i)
    usable = {i for i in range(n) if (healthy is None or healthy[i]) and i not in exclude}
    for _ in range(20):
        i = s.pick_excluding(healthy, exclude)
        assert (i in usable) if usable else i == -1
        j = s.pick(healthy)
        ok = {k for k in range(n) if healthy is None or healthy[k]}
        assert (j in ok) if ok else j == -1


# ------------------------------------------------------------------ simulation

def simulate(selector: PeakEwma, clock: FakeClock, base_latency, *, rps=1000, seconds=20.0,
             slowdown=None) -> Counter:
    """Open-loop arrivals every 1/rps s; each endpoint serves a request in its base latency
    times (1 + 0.1 * requests it already has in flight): a queue that grows with load."""
    done: list[tuple[float, int, float]] = []
    picks: Counter = Counter()
    inflight = [0] * len(base_latency)
    step = 1.0 / rps
    for k in range(int(seconds * rps)):
        t = k * step
        while done and done[0][0] <= t:
            end, i, start = heapq.heappop(done)
            inflight[i] -= 1
            selector.release(i)
            selector.observe(i, end - start, end)
        clock.t = t
        i = selector.pick(None)
        lat = base_latency[i] if slowdown is None else slowdown(t, i, base_latency[i])
        lat *= 1 + 0.1 * inflight[i]
        inflight[i] += 1
        selector.acquire(i)
        heapq.heappush(done, (t + lat, i, t))
        picks[i] += 1
    return picks


def test_under_load_it_prefers_the_fast_endpoints():
    clock = FakeClock()
    s = make(3, clock=clock, decay_seconds=1.0)
    picks = simulate(s, clock, [0.010, 0.010, 0.100])
    total = sum(picks.values())
    assert picks[2] / total < 0.10  # round robin would send it a third
    assert abs(picks[0] - picks[1]) / total < 0.10


def test_a_slowdown_moves_traffic_away_quickly_and_back_after_recovery():
    clock = FakeClock()
    s = make(2, clock=clock, decay_seconds=1.0)

    def slowdown(t, i, base):
        return 0.200 if (i == 0 and 5.0 <= t < 10.0) else base

    window = Counter()
    done: list = []
    inflight = [0, 0]
    for k in range(15_000):
        t = k / 1000
        while done and done[0][0] <= t:
            end, i, start = heapq.heappop(done)
            inflight[i] -= 1
            s.release(i)
            s.observe(i, end - start, end)
        clock.t = t
        i = s.pick(None)
        lat = slowdown(t, i, 0.010) * (1 + 0.1 * inflight[i])
        inflight[i] += 1
        s.acquire(i)
        heapq.heappush(done, (t + lat, i, t))
        window[(int(t // 2.5), i)] += 1
    share = lambda w: window[(w, 0)] / (window[(w, 0)] + window[(w, 1)])  # noqa: E731
    assert 0.35 < share(1) < 0.65  # [2.5, 5): equal
    assert share(3) < 0.10  # [7.5, 10): endpoint 0 is slow
    assert 0.35 < share(5) < 0.65  # [12.5, 15): recovered, back to equal
