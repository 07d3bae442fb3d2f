"""Circuit breaker (dispa/balancer/breaker.py): the transition table, trip conditions, recovery,
group breakers, and a Hypothesis state machine over state × event. Fake clocks only."""

from __future__ import annotations

import pathlib
import re

import msgspec
import pytest
from hypothesis import event, given, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from dispa.balancer.breaker import (
    ON_ENTER,
    TRANSITIONS,
    Breaker,
    BreakerConfig,
    Event,
    GroupBreaker,
    GroupBreakerConfig,
    State,
    _Window,
    transition_diagram,
    transition_table_markdown,
)

DOC = pathlib.Path(__file__).resolve().parents[3] / "docs" / "resilience.md"


def doc_section(struct_name: str) -> str:
    text = DOC.read_text(encoding="utf-8")
    m = re.search(rf"^#+ .*`{struct_name}`.*$", text, re.M)
    assert m, f"docs/resilience.md has no heading naming `{struct_name}`"
    rest = text[m.end():]
    nxt = re.search(r"^#+ ", rest, re.M)
    return rest[:nxt.start()] if nxt else rest


def trip_by_failures(b: Breaker, now: float) -> None:
    for _ in range(b.config.failure_threshold):
        assert b.allow(now)
        b.record(now, False)
    assert b.state is State.OPEN


# ------------------------------------------------------------------ the table itself

def test_transition_table_is_total_over_state_and_event():
    assert set(TRANSITIONS) == {(s, e) for s in State for e in Event}


def test_tick_in_closed_is_a_plain_self_loop():
    # Breaker._advance skips this dispatch on the hot path; it may only while this holds.
    assert TRANSITIONS[(State.CLOSED, Event.TICK)] is State.CLOSED


def test_every_handler_declares_its_possible_next_states():
    for key, entry in TRANSITIONS.items():
        if isinstance(entry, State):
            continue
        assert callable(entry), key
        assert entry.targets and all(isinstance(t, State) for t in entry.targets), key


def test_every_state_has_an_entry_action():
    assert set(ON_ENTER) == set(State)


def test_docs_embed_the_generated_diagram_and_table():
    text = DOC.read_text(encoding="utf-8")
    assert transition_diagram() in text, "regenerate the diagram in docs/resilience.md"
    assert transition_table_markdown() in text, "regenerate the table in docs/resilience.md"


def test_diagram_has_the_classic_edges():
    d = transition_diagram()
    for edge in ("CLOSED --> OPEN", "OPEN --> HALF_OPEN: TICK", "HALF_OPEN --> CLOSED",
                 "HALF_OPEN --> OPEN"):
        assert edge in d


# ------------------------------------------------------------------ config

def test_config_defaults_keep_the_original_dispa_keys_and_leave_rate_tripping_off():
    c = BreakerConfig()
    assert (c.failure_threshold, c.recovery_time, c.half_open_requests) == (5, 30.0, 1)
    assert c.error_rate_threshold is None and c.slow_call_rate_threshold is None
    assert c.slow_start_seconds == 0.0


def test_config_decodes_original_keys_and_rejects_unknown_ones():
    c = msgspec.toml.decode(b"failure_threshold = 3\nrecovery_time = 10\nhalf_open_requests = 2\n",
                            type=BreakerConfig)
    assert (c.failure_threshold, c.recovery_time, c.half_open_requests) == (3, 10.0, 2)
    with pytest.raises(msgspec.ValidationError, match="unknown field"):
        msgspec.toml.decode(b"failure_treshold = 3\n", type=BreakerConfig)


@pytest.mark.parametrize("doc, message", [
    (b"recovery_time = 60\nmax_recovery_time = 30\n", "max_recovery_time"),
    (b"slow_call_rate_threshold = 0.5\n", "slow_call_seconds"),
    (b"error_rate_threshold = 1.5\n", "<= 1"),
    (b"half_open_requests = 0\n", ">= 1"),
    (b"recovery_time = 0\n", "> 0"),
    (b"backoff_factor = 0.5\n", ">= 1"),
])
def test_config_rejects_inconsistent_values(doc, message):
    with pytest.raises(msgspec.ValidationError, match=re.escape(message)):
        msgspec.toml.decode(doc, type=BreakerConfig)


def test_config_struct_is_frozen():
    with pytest.raises(AttributeError):
        BreakerConfig().failure_threshold = 1  # type: ignore[misc]


@pytest.mark.parametrize("struct", [BreakerConfig, GroupBreakerConfig])
def test_docs_have_a_row_for_every_config_key(struct):
    section = doc_section(struct.__name__)
    for f in msgspec.structs.fields(struct):
        assert re.search(rf"^\| `{f.encode_name}` \|", section, re.M), f"{struct.__name__}.{f.name}"


# ------------------------------------------------------------------ tripping

def test_consecutive_failures_trip_exactly_at_the_threshold():
    b = Breaker(BreakerConfig(failure_threshold=3))
    assert b.record(0, False) is State.CLOSED
    assert b.record(0, False) is State.CLOSED
    assert b.record(0, False) is State.OPEN
    assert b.last_trip_reason == "consecutive_failures"
    assert b.counters["trips"] == 1


def test_a_success_breaks_the_failure_streak():
    b = Breaker(BreakerConfig(failure_threshold=3))
    for ok in (False, False, True, False, False):
        b.record(0, ok)
    assert b.state is State.CLOSED


def test_failure_threshold_zero_turns_consecutive_tripping_off():
    b = Breaker(BreakerConfig(failure_threshold=0))
    for _ in range(1000):
        b.record(0, False)
    assert b.state is State.CLOSED


def test_error_rate_trips_only_with_the_minimum_volume():
    b = Breaker(BreakerConfig(failure_threshold=0, error_rate_threshold=0.5, min_requests=10))
    for _ in range(9):
        b.record(1.0, False)
    assert b.state is State.CLOSED  # 9 of 9 failed, but fewer than min_requests
    b.record(1.0, True)  # 9 of 10: the volume is there and 90% >= 50%
    assert b.state is State.OPEN and b.last_trip_reason == "error_rate"


def test_error_rate_below_the_threshold_keeps_it_closed():
    b = Breaker(BreakerConfig(failure_threshold=0, error_rate_threshold=0.5, min_requests=10))
    for k in range(100):
        b.record(1.0, k % 3 != 0)  # a third fail
    assert b.state is State.CLOSED
    assert b.window_counts() == (100, 34, 0)


def test_old_outcomes_leave_the_sliding_window():
    c = BreakerConfig(failure_threshold=0, error_rate_threshold=0.5, min_requests=10,
                      window_seconds=10, window_buckets=10)
    b = Breaker(c)
    for _ in range(9):
        b.record(0.5, False)  # bucket 0
    assert b.window_counts(9.9) == (9, 9, 0)
    assert b.window_counts(10.0) == (0, 0, 0)  # bucket 0 left the window at t=10
    b.record(10.5, False)  # only one outcome in the window now
    assert b.state is State.CLOSED


def test_slow_call_rate_trips_on_slow_successes():
    c = BreakerConfig(failure_threshold=0, slow_call_seconds=1.0, slow_call_rate_threshold=0.5,
                      min_requests=4)
    b = Breaker(c)
    b.record(0, True, 0.1)
    b.record(0, True, 2.0)
    b.record(0, True, 1.0)  # exactly the limit is not slow
    assert b.state is State.CLOSED
    b.record(0, True, 5.0)  # 2 of 4 slow
    assert b.state is State.OPEN and b.last_trip_reason == "slow_call_rate"
    assert b.counters["slow_calls"] == 2


def test_slow_calls_are_counted_but_do_not_trip_without_a_rate_threshold():
    b = Breaker(BreakerConfig(slow_call_seconds=1.0, min_requests=1))
    for _ in range(50):
        b.record(0, True, 9.0)
    assert b.state is State.CLOSED and b.window_counts() == (50, 0, 50)


# ------------------------------------------------------------------ open, half-open, recovery

def test_open_rejects_until_the_recovery_time_then_admits_one_probe():
    b = Breaker(BreakerConfig(failure_threshold=1, recovery_time=30))
    trip_by_failures(b, 100.0)
    assert (b.opened_at, b.next_probe_at) == (100.0, 130.0)
    assert not b.allow(100.0) and not b.allow(129.999)
    assert b.allow(130.0)
    assert b.state is State.HALF_OPEN and b.probes_in_flight == 1
    assert not b.allow(130.0)  # half_open_requests = 1
    assert b.counters["rejected"] == 3


def test_half_open_admits_at_most_half_open_requests_probes():
    b = Breaker(BreakerConfig(failure_threshold=1, recovery_time=1, half_open_requests=3,
                              success_threshold=3))
    trip_by_failures(b, 0)
    assert [b.allow(1) for _ in range(5)] == [True, True, True, False, False]
    b.record(1.5, True)
    assert b.allow(1.5) and not b.allow(1.5)


def test_success_threshold_probe_successes_close_it():
    b = Breaker(BreakerConfig(failure_threshold=1, recovery_time=1, success_threshold=2))
    trip_by_failures(b, 0)
    assert b.allow(1)
    assert b.record(1, True) is State.HALF_OPEN
    assert b.allow(1)
    assert b.record(1, True) is State.CLOSED
    assert b.closed_at == 1 and b.opened_at is None and b.next_probe_at is None


def test_a_failed_probe_reopens_with_a_growing_capped_open_time():
    c = BreakerConfig(failure_threshold=1, recovery_time=10, backoff_factor=2, max_recovery_time=35)
    b = Breaker(c)
    trip_by_failures(b, 0)
    t = 0.0
    seen = []
    for _ in range(4):
        t = b.next_probe_at
        assert b.allow(t)
        assert b.record(t, False) is State.OPEN
        seen.append(b.next_probe_at - t)
    assert seen == [20, 35, 35, 35]
    assert b.last_trip_reason == "probe_failure"
    t = b.next_probe_at
    assert b.allow(t) and b.record(t, True) is State.CLOSED
    assert b.open_duration == 10  # closing resets the backoff
    trip_by_failures(b, t + 1)
    assert b.next_probe_at == t + 11


def test_a_probe_without_result_expires_as_a_failure():
    b = Breaker(BreakerConfig(failure_threshold=1, recovery_time=10, probe_timeout=5))
    trip_by_failures(b, 0)
    assert b.allow(10)
    assert b.tick(14.9) is State.HALF_OPEN
    assert b.tick(15) is State.OPEN
    assert b.counters["probes_expired"] == 1 and b.last_trip_reason == "probe_timeout"
    assert b.next_probe_at == 15 + 20


def test_cancel_frees_the_probe_slot():
    b = Breaker(BreakerConfig(failure_threshold=1, recovery_time=1))
    trip_by_failures(b, 0)
    assert b.allow(1) and not b.allow(1)
    b.cancel(1)
    assert b.probes_in_flight == 0 and b.allow(1)
    assert b.counters["probes_cancelled"] == 1


def test_late_results_from_before_the_trip_change_nothing():
    b = Breaker(BreakerConfig(failure_threshold=1, recovery_time=10))
    trip_by_failures(b, 0)
    b.record(1, True)  # admitted before the trip, answered while OPEN
    assert b.state is State.OPEN
    b.tick(10)
    b.record(10, True)  # HALF_OPEN, but no probe was taken
    assert b.state is State.HALF_OPEN
    assert b.counters["ignored"] == 2


def test_in_half_open_a_slow_success_is_a_failed_probe_when_slowness_trips():
    c = BreakerConfig(failure_threshold=1, recovery_time=1, slow_call_seconds=1,
                      slow_call_rate_threshold=0.5)
    b = Breaker(c)
    trip_by_failures(b, 0)
    assert b.allow(1) and b.record(1, True, 3.0) is State.OPEN


def test_in_half_open_a_slow_success_is_a_success_when_slowness_is_only_measured():
    b = Breaker(BreakerConfig(failure_threshold=1, recovery_time=1, slow_call_seconds=1))
    trip_by_failures(b, 0)
    assert b.allow(1) and b.record(1, True, 3.0) is State.CLOSED


def test_probes_still_in_flight_when_it_closes_are_counted_as_abandoned():
    b = Breaker(BreakerConfig(failure_threshold=1, recovery_time=1, half_open_requests=2))
    trip_by_failures(b, 0)
    assert b.allow(1) and b.allow(1)
    b.record(1, True)
    assert b.state is State.CLOSED and b.counters["probes_abandoned"] == 1


def test_forced_trip_and_reset():
    b = Breaker()
    assert b.trip(5, "admin") is State.OPEN and b.last_trip_reason == "admin"
    assert b.next_probe_at == 35
    assert b.reset(6) is State.CLOSED and b.allow(6)


def test_time_going_backwards_counts_as_the_latest_time_seen():
    b = Breaker(BreakerConfig(failure_threshold=1, recovery_time=10))
    trip_by_failures(b, 100)
    assert not b.allow(50)  # no "earlier" time sneaks past the recovery time
    assert b.next_probe_at == 110


# ------------------------------------------------------------------ progressive recovery

def test_weight_factor_is_one_without_slow_start_or_before_any_trip():
    assert Breaker().weight_factor(0) == 1.0
    b = Breaker(BreakerConfig(failure_threshold=1, recovery_time=1))
    trip_by_failures(b, 0)
    assert b.weight_factor(0.5) == 0.0
    assert b.weight_factor(1) == 0.1  # HALF_OPEN: slow_start_min
    b.allow(1)
    b.record(1, True)
    assert b.weight_factor(1) == 1.0  # slow start off


def test_weight_factor_ramps_linearly_after_recovery():
    c = BreakerConfig(failure_threshold=1, recovery_time=1, slow_start_seconds=10, slow_start_min=0.1)
    b = Breaker(c)
    trip_by_failures(b, 0)
    b.allow(1)
    b.record(1, True)
    got = [round(b.weight_factor(1 + dt), 6) for dt in (0, 2.5, 5, 10, 20)]
    assert got == [0.1, 0.325, 0.55, 1.0, 1.0]


def test_weight_factor_aggression_bends_the_curve():
    c = BreakerConfig(failure_threshold=1, recovery_time=1, slow_start_seconds=10,
                      slow_start_min=0.0001, slow_start_aggression=2.0)
    b = Breaker(c)
    trip_by_failures(b, 0)
    b.allow(1)
    b.record(1, True)
    assert b.weight_factor(1 + 2.5) == pytest.approx(0.0001 + 0.9999 * 0.5)  # sqrt(0.25)


# ------------------------------------------------------------------ snapshot

def test_snapshot_reports_state_counters_times_and_window_rate():
    b = Breaker(BreakerConfig(failure_threshold=3))
    b.record(1, True)
    b.record(1, False)
    s = b.snapshot(2)
    assert s["state"] == "closed"
    assert s["window"] == {"requests": 2, "failures": 1, "slow": 0, "error_rate": 0.5,
                           "slow_call_rate": 0.0}
    assert s["counters"]["successes"] == 1 and s["counters"]["failures"] == 1
    assert s["opened_at"] is None and s["next_probe_at"] is None
    assert s["weight_factor"] == 1.0
    msgspec.json.encode(s)  # plain data, ready for /admin/status


# ------------------------------------------------------------------ the rolling window

@given(st.lists(st.tuples(st.floats(0, 5, allow_nan=False), st.booleans(), st.booleans()),
                max_size=80),
       st.integers(1, 8), st.floats(0.5, 20, allow_nan=False))
def test_window_counts_equal_a_brute_force_recount(steps, buckets, window_seconds):
    w = _Window(window_seconds, buckets)
    width = window_seconds / buckets
    now = 0.0
    events = []
    for dt, failed, slow in steps:
        now += dt
        w.add(now, failed, slow)
        events.append((int(now // width), failed, slow))
        head = int(now // width)
        live = [e for e in events if e[0] > head - buckets]
        assert (w.total, w.failures, w.slow) == (
            len(live), sum(f for _, f, _ in live), sum(s for _, _, s in live))


# ------------------------------------------------------------------ state machine × events

class BreakerMachine(RuleBasedStateMachine):
    """Drives one breaker the way the proxy does (plus stale results, cancels, forced
    trips and resets) and checks the invariants after every step."""

    @initialize(failure_threshold=st.integers(0, 4), half_open=st.integers(1, 3),
                success_threshold=st.integers(1, 3), rate=st.sampled_from([None, 0.5]),
                slow_rate=st.sampled_from([None, 0.5]), backoff=st.sampled_from([1.0, 2.0]),
                slow_start=st.sampled_from([0.0, 5.0]))
    def setup(self, failure_threshold, half_open, success_threshold, rate, slow_rate, backoff,
              slow_start):
        self.config = BreakerConfig(
            failure_threshold=failure_threshold, recovery_time=5.0, half_open_requests=half_open,
            success_threshold=success_threshold, window_seconds=4.0, window_buckets=4,
            min_requests=3, error_rate_threshold=rate, slow_call_seconds=1.0,
            slow_call_rate_threshold=slow_rate, backoff_factor=backoff, max_recovery_time=20.0,
            probe_timeout=8.0, slow_start_seconds=slow_start)
        self.b = Breaker(self.config)
        self.now = 0.0
        self.outstanding = 0  # allowed and not yet recorded or cancelled
        self.allow_calls = 0
        self.record_calls = 0

    @rule(dt=st.sampled_from([0.0, 0.1, 0.9, 1.0, 2.5, 5.0, 8.0, 30.0]))
    def advance(self, dt):
        self.now += dt
        self.b.tick(self.now)

    @rule()
    def allow(self):
        b = self.b
        before, next_probe = b.state, b.next_probe_at
        predicted = b.available(self.now)
        ok = b.allow(self.now)
        self.allow_calls += 1
        assert ok == predicted, "available() and allow() disagree"
        if before is State.OPEN and self.now < next_probe:
            assert not ok, "OPEN admitted a request before its recovery time"
        if ok:
            self.outstanding += 1

    @precondition(lambda self: self.outstanding > 0)
    @rule(ok=st.booleans(), duration=st.sampled_from([0.01, 0.5, 3.0]))
    def finish(self, ok, duration):
        self.outstanding -= 1
        self.record_calls += 1
        self.b.record(self.now, ok, duration)

    @rule(ok=st.booleans())
    def stale_result(self, ok):
        self.record_calls += 1
        self.b.record(self.now, ok, 0.01)

    @precondition(lambda self: self.outstanding > 0)
    @rule()
    def cancel(self):
        self.outstanding -= 1
        self.b.cancel(self.now)

    @rule()
    def force_trip(self):
        assert self.b.trip(self.now) is State.OPEN

    @rule()
    def force_reset(self):
        assert self.b.reset(self.now) is State.CLOSED

    @invariant()
    def probes_never_exceed_half_open_requests(self):
        event(f"state={self.b.state.name} probes={self.b.probes_in_flight}")
        assert 0 <= self.b.probes_in_flight <= self.config.half_open_requests

    @invariant()
    def probes_exist_only_in_half_open(self):
        if self.b.state is not State.HALF_OPEN:
            assert self.b.probes_in_flight == 0

    @invariant()
    def counters_are_consistent(self):
        c = self.b.counters
        assert c["allowed"] + c["rejected"] == self.allow_calls
        assert c["successes"] + c["failures"] == self.record_calls
        assert c["probes_started"] == (c["probe_successes"] + c["probe_failures"]
                                       + c["probes_cancelled"] + c["probes_expired"]
                                       + c["probes_abandoned"] + self.b.probes_in_flight)
        assert c["trips"] <= c["state_changes"]
        assert all(v >= 0 for v in c.values())

    @invariant()
    def open_times_match_the_state(self):
        b = self.b
        assert self.config.recovery_time <= b.open_duration <= self.config.max_recovery_time
        if b.state is State.CLOSED:
            assert b.opened_at is None and b.next_probe_at is None
        else:
            assert b.opened_at is not None and b.next_probe_at is not None
            assert b.next_probe_at > b.opened_at
        if b.state is State.OPEN:
            assert b.next_probe_at - b.opened_at == pytest.approx(b.open_duration)

    @invariant()
    def weight_factor_is_a_share(self):
        f = self.b.weight_factor(self.now)
        assert 0.0 <= f <= 1.0
        assert (f == 0.0) == (self.b.state is State.OPEN)


TestBreakerMachine = BreakerMachine.TestCase
TestBreakerMachine.settings = settings(max_examples=300, stateful_step_count=60, deadline=None)


# ------------------------------------------------------------------ group breaker

def test_group_defaults_never_trip_the_group():
    g = GroupBreaker(2, BreakerConfig(failure_threshold=1))
    g.record(0, 0, False)
    g.record(1, 0, False)
    assert g.group.state is State.CLOSED and g.admit(0)
    assert g.mask(0) == [False, False]


def test_mask_is_none_when_every_endpoint_is_usable_and_combines_with_health():
    g = GroupBreaker(3, BreakerConfig(failure_threshold=1))
    assert g.mask(0) is None
    assert g.mask(0, [True, False, True]) == [True, False, True]
    g.record(2, 0, False)
    assert g.mask(0) == [True, True, False]
    assert g.mask(0, [False, True, True]) == [False, True, False]


def test_half_open_endpoint_is_in_the_mask_while_a_probe_slot_is_free():
    g = GroupBreaker(2, BreakerConfig(failure_threshold=1, recovery_time=1))
    g.record(0, 0, False)
    assert g.mask(1) is None  # HALF_OPEN with a free slot
    assert g.allow_endpoint(0, 1)
    assert g.mask(1) == [False, True]  # its one slot is taken


def test_group_trips_when_enough_endpoints_are_open_and_fails_fast():
    gc = GroupBreakerConfig(open_endpoint_percent=50, group=BreakerConfig(failure_threshold=0,
                                                                          recovery_time=10))
    g = GroupBreaker(4, BreakerConfig(failure_threshold=1, recovery_time=5), gc)
    g.record(0, 0, False)
    assert g.group.state is State.CLOSED  # 1 of 4
    g.record(1, 0, False)
    assert g.group.state is State.OPEN and g.group.last_trip_reason == "open_endpoints"
    assert not g.admit(1)
    # After the group's recovery time one group probe goes through to a usable endpoint.
    assert g.admit(10) and not g.admit(10)
    i = 2
    assert g.allow_endpoint(i, 10)
    g.record(i, 10.2, True)
    assert g.group.state is State.CLOSED and g.admit(10.3)


def test_group_error_rate_trips_the_group():
    gc = GroupBreakerConfig(group=BreakerConfig(failure_threshold=0, error_rate_threshold=0.5,
                                                min_requests=4))
    g = GroupBreaker(4, BreakerConfig(failure_threshold=0), gc)
    for i in range(4):
        g.record(i, 0, i % 2 == 0)  # half of the cluster's outcomes fail
    assert g.group.state is State.OPEN and g.group.last_trip_reason == "error_rate"
    assert all(b.state is State.CLOSED for b in g.endpoints)  # no endpoint is to blame alone


def test_group_cancel_releases_the_group_probe_when_no_endpoint_takes_it():
    gc = GroupBreakerConfig(open_endpoint_percent=100, group=BreakerConfig(failure_threshold=0,
                                                                           recovery_time=1))
    g = GroupBreaker(1, BreakerConfig(failure_threshold=1, recovery_time=100), gc)
    g.record(0, 0, False)
    assert g.group.state is State.OPEN
    assert g.admit(1)
    assert g.mask(1) == [False]  # the endpoint is still open: nothing to send the probe to
    g.cancel(None, 1)
    assert g.group.probes_in_flight == 0 and g.admit(1)


def test_group_snapshot_and_weight_factors():
    g = GroupBreaker(2)
    s = g.snapshot(0)
    assert s["group"]["state"] == "closed" and len(s["endpoints"]) == 2
    assert g.weight_factors(0) == [1.0, 1.0]
    with pytest.raises(ValueError):
        GroupBreaker(0)
