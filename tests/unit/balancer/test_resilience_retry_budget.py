"""Retry budgets (dispa/balancer/retry_budget.py): Envoy's concurrent budget and Finagle's
windowed token bucket. The property tests check that retries never exceed the budgeted share
over any sequence of requests, retries and time steps."""

from __future__ import annotations

import pathlib
import re

import msgspec
import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from dispa.balancer.retry_budget import (
    ConcurrentRetryBudget,
    ConcurrentRetryBudgetConfig,
    RetryBudget,
    RetryBudgetConfig,
    WindowRetryBudget,
    WindowRetryBudgetConfig,
    build_retry_budget,
)

DOC = pathlib.Path(__file__).resolve().parents[3] / "docs" / "resilience.md"


def doc_section(struct_name: str) -> str:
    text = DOC.read_text(encoding="utf-8")
    m = re.search(rf"^#+ .*`{struct_name}`.*$", text, re.M)
    assert m, f"docs/resilience.md has no heading naming `{struct_name}`"
    rest = text[m.end():]
    nxt = re.search(r"^#+ ", rest, re.M)
    return rest[:nxt.start()] if nxt else rest


# ------------------------------------------------------------------ config

def test_config_is_a_tagged_union_on_type():
    c = msgspec.toml.decode(b'type = "concurrent"\nbudget_percent = 25\nper_try_timeout = 2\n',
                            type=RetryBudgetConfig)
    assert isinstance(c, ConcurrentRetryBudgetConfig) and c.budget_percent == 25
    w = msgspec.toml.decode(b'type = "window"\nmin_retries_per_second = 1\n', type=RetryBudgetConfig)
    assert isinstance(w, WindowRetryBudgetConfig) and w.window_seconds == 10
    with pytest.raises(msgspec.ValidationError, match="unknown field"):
        msgspec.toml.decode(b'type = "window"\nmin_retry_concurrency = 3\n', type=RetryBudgetConfig)
    with pytest.raises(msgspec.ValidationError):
        msgspec.toml.decode(b'type = "bucket"\n', type=RetryBudgetConfig)
    with pytest.raises(msgspec.ValidationError, match=re.escape("<= 100")):
        msgspec.toml.decode(b'type = "concurrent"\nbudget_percent = 120\n', type=RetryBudgetConfig)


def test_defaults_are_envoys_and_finagles():
    c = ConcurrentRetryBudgetConfig()
    assert (c.budget_percent, c.min_retry_concurrency, c.per_try_timeout) == (20.0, 3, None)
    w = WindowRetryBudgetConfig()
    assert (w.budget_percent, w.min_retries_per_second, w.window_seconds) == (20.0, 10.0, 10.0)


@pytest.mark.parametrize("struct", [ConcurrentRetryBudgetConfig, WindowRetryBudgetConfig])
def test_docs_have_a_row_for_every_config_key(struct):
    section = doc_section(struct.__name__)
    for f in msgspec.structs.fields(struct):
        assert re.search(rf"^\| `{f.encode_name}` \|", section, re.M), f"{struct.__name__}.{f.name}"


def test_build_picks_the_class_and_carries_per_try_timeout():
    b = build_retry_budget(ConcurrentRetryBudgetConfig(per_try_timeout=1.5))
    assert isinstance(b, ConcurrentRetryBudget) and b.per_try_timeout == 1.5
    assert isinstance(build_retry_budget(WindowRetryBudgetConfig()), WindowRetryBudget)
    with pytest.raises(TypeError):
        build_retry_budget(object())  # type: ignore[arg-type]


def test_both_budgets_satisfy_the_protocol_shape():
    for b in (ConcurrentRetryBudget(), WindowRetryBudget()):
        for name in ("deposit", "try_withdraw", "retry_done", "request_done", "snapshot"):
            assert callable(getattr(b, name))
        assert hasattr(b, "per_try_timeout")
    assert RetryBudget  # the Protocol is importable for annotations


# ------------------------------------------------------------------ concurrent (Envoy)

def test_concurrent_min_retry_concurrency_applies_with_little_traffic():
    b = ConcurrentRetryBudget()
    b.deposit()
    assert [b.try_withdraw() for _ in range(4)] == [True, True, True, False]
    b.retry_done()
    assert b.try_withdraw()
    assert b.retries_rejected == 1 and b.retries_allowed == 4


def test_concurrent_budget_is_a_share_of_requests_in_flight():
    b = ConcurrentRetryBudget(ConcurrentRetryBudgetConfig(budget_percent=20, min_retry_concurrency=0))
    for _ in range(100):
        b.deposit()
    assert b.limit() == 20
    assert sum(b.try_withdraw() for _ in range(30)) == 20
    for _ in range(50):
        b.request_done()
    assert b.limit() == 10 and not b.try_withdraw()  # retries already running are not undone
    snap = b.snapshot()
    assert snap["active_retries"] == 20 and snap["limit"] == 10


def test_concurrent_floors_the_share():
    b = ConcurrentRetryBudget(ConcurrentRetryBudgetConfig(budget_percent=20, min_retry_concurrency=0))
    for _ in range(9):
        b.deposit()
    assert b.limit() == 1  # 1.8 -> 1


def test_concurrent_counts_never_go_below_zero():
    b = ConcurrentRetryBudget()
    b.request_done()
    b.retry_done()
    assert (b.active_requests, b.active_retries) == (0, 0)


class ConcurrentMachine(RuleBasedStateMachine):
    @initialize(pct=st.sampled_from([0.0, 5.0, 20.0, 33.333, 100.0]), minimum=st.integers(0, 4))
    def setup(self, pct, minimum):
        self.pct, self.minimum = pct, minimum
        self.b = ConcurrentRetryBudget(ConcurrentRetryBudgetConfig(budget_percent=pct,
                                                                   min_retry_concurrency=minimum))
        self.requests = 0
        self.retries = 0

    @rule()
    def request(self):
        self.b.deposit()
        self.requests += 1

    @precondition(lambda self: self.requests > 0)
    @rule()
    def request_done(self):
        self.b.request_done()
        self.requests -= 1

    @rule()
    def retry(self):
        if self.b.try_withdraw():
            self.retries += 1
            # The budgeted share, computed independently with exact rationals.
            assert self.retries <= max(self.minimum, (self.requests * round(self.pct * 1000)) // 100_000)
            assert self.retries <= max(self.minimum, self.requests * self.pct / 100 + 1e-9)

    @precondition(lambda self: self.retries > 0)
    @rule()
    def retry_done(self):
        self.b.retry_done()
        self.retries -= 1

    @invariant()
    def counts_match(self):
        assert (self.b.active_requests, self.b.active_retries) == (self.requests, self.retries)


TestConcurrentMachine = ConcurrentMachine.TestCase
TestConcurrentMachine.settings = settings(max_examples=200, stateful_step_count=80, deadline=None)


# ------------------------------------------------------------------ window (Finagle)

def test_window_reserve_allows_min_retries_per_second_times_the_window():
    b = WindowRetryBudget(WindowRetryBudgetConfig(min_retries_per_second=0.5, window_seconds=10))
    assert sum(b.try_withdraw(0) for _ in range(10)) == 5


def test_window_deposits_earn_budget_percent_of_a_retry_each():
    b = WindowRetryBudget(WindowRetryBudgetConfig(budget_percent=20, min_retries_per_second=0))
    for _ in range(14):
        b.deposit(0)
    assert sum(b.try_withdraw(0) for _ in range(5)) == 2  # 14 * 20% = 2.8
    b.deposit(0)  # 15 * 20% = 3.0
    assert b.try_withdraw(0) and not b.try_withdraw(0)
    assert b.snapshot(0)["available_retries"] == 0


def test_window_deposits_and_withdrawals_expire():
    c = WindowRetryBudgetConfig(budget_percent=50, min_retries_per_second=0, window_seconds=10,
                                window_buckets=10)
    b = WindowRetryBudget(c)
    for _ in range(4):
        b.deposit(0.5)
    assert b.try_withdraw(9.9) and b.try_withdraw(9.9) and not b.try_withdraw(9.9)
    assert not b.try_withdraw(10.0)  # the deposits of [0, 1) left the window at t = 10
    b.deposit(10.5)
    b.deposit(10.5)
    assert not b.try_withdraw(10.5)  # the withdrawals at 9.9 are still in the window
    assert b.try_withdraw(19.0)  # now they are gone, and the deposits of [10, 11) remain
    assert not b.try_withdraw(20.0)  # and at 20 those deposits are gone too


def test_window_time_going_backwards_counts_as_the_latest_time_seen():
    b = WindowRetryBudget(WindowRetryBudgetConfig(budget_percent=100, min_retries_per_second=0))
    b.deposit(100)
    assert b.try_withdraw(5)
    assert not b.try_withdraw(5)


def window_model(events, now, buckets, width):
    """Brute force: events whose bucket is among the last ``buckets`` at ``now``."""
    head = int(now // width)
    live = [(kind) for t, kind in events if int(t // width) > head - buckets]
    return live.count("d"), live.count("w")


@settings(max_examples=300, deadline=None)
@given(pct=st.sampled_from([0.0, 1.0, 12.5, 20.0, 33.333, 100.0]),
       min_rps=st.sampled_from([0.0, 0.1, 1.0]),
       window=st.sampled_from([1.0, 3.0, 10.0]), buckets=st.integers(1, 10),
       steps=st.lists(st.tuples(st.sampled_from([0.0, 0.0, 0.05, 0.3, 1.0, 4.0]),
                                st.sampled_from(["d", "d", "w"])), max_size=200))
def test_window_retries_never_exceed_the_budgeted_share(pct, min_rps, window, buckets, steps):
    c = WindowRetryBudgetConfig(budget_percent=pct, min_retries_per_second=min_rps,
                                window_seconds=window, window_buckets=buckets)
    b = WindowRetryBudget(c)
    width = window / buckets
    now = 0.0
    events: list[tuple[float, str]] = []
    reserve_units = int(min_rps * window * 100_000)
    for dt, kind in steps:
        now += dt
        if kind == "d":
            b.deposit(now)
            events.append((now, "d"))
            continue
        deposits, withdrawals = window_model(events, now, buckets, width)
        # Exactly the brute-force decision: allowed iff the window still holds one retry.
        expected = deposits * round(pct * 1000) + reserve_units - (withdrawals + 1) * 100_000 >= 0
        assert b.try_withdraw(now) == expected
        if expected:
            events.append((now, "w"))
            deposits, withdrawals = window_model(events, now, buckets, width)
            # The budget: retries in the window <= pct% of requests in it + the reserve.
            assert withdrawals <= deposits * pct / 100 + min_rps * window + 1e-9


@settings(max_examples=200, deadline=None)
@given(pct=st.floats(0, 100), n=st.integers(0, 500), tries=st.integers(0, 600))
def test_window_within_one_instant_retries_are_at_most_the_share(pct, n, tries):
    b = WindowRetryBudget(WindowRetryBudgetConfig(budget_percent=pct, min_retries_per_second=0))
    for _ in range(n):
        b.deposit(1.0)
    got = sum(b.try_withdraw(1.0) for _ in range(tries))
    assert got <= n * round(pct * 1000) / 100_000
    assert got == min(tries, n * round(pct * 1000) // 100_000)
