"""Circuit breakers for endpoints and clusters: a sans-I/O state machine written as a table.

Theory of operation
-------------------
A :class:`Breaker` watches the outcomes of requests sent to one endpoint (or, as a
:class:`GroupBreaker`, to a whole cluster) and stops sending requests there after it has
seen enough failures, so a broken upstream gets time to recover and downstream clients get
a fast answer instead of a slow timeout. The design follows Nygard's *Release It!* (the
CLOSED/OPEN/HALF_OPEN pattern), Hystrix and resilience4j (sliding-window error and
slow-call rates with a minimum volume), and Envoy's slow start for the ramp after recovery
(``slow_start_config``: ``slow_start_window``, ``aggression``, ``min_weight_percent``).

States:

* ``CLOSED``: every request is allowed. Outcomes feed the trip conditions.
* ``OPEN``: no request is allowed until ``next_probe_at``.
* ``HALF_OPEN``: at most ``half_open_requests`` probes in flight at a time;
  ``success_threshold`` probe successes close the breaker, one probe failure re-opens it.

The breaker trips (CLOSED → OPEN) when **any** configured condition holds after an
outcome is recorded:

1. ``consecutive failures >= failure_threshold`` (0 turns it off);
2. the error rate over the last ``window_seconds`` is ``>= error_rate_threshold`` and the
   window holds at least ``min_requests`` outcomes;
3. the share of calls slower than ``slow_call_seconds`` is ``>= slow_call_rate_threshold``,
   with the same minimum volume.

The window is a ring of ``window_buckets`` buckets (Hystrix's rolling counter): each event
costs O(1), and moving time forward clears at most ``window_buckets`` buckets.

OPEN lasts ``recovery_time`` the first time. Each failed probe re-opens it for the previous
duration times ``backoff_factor``, capped at ``max_recovery_time``; closing resets the
duration. After closing, :meth:`Breaker.weight_factor` ramps from ``slow_start_min`` to 1.0
over ``slow_start_seconds`` (``min + (1 - min) * t ** (1 / slow_start_aggression)``, with
``t`` the elapsed share of the ramp), so a recovered endpoint is not flooded at once.

Rules:

1. **All state transitions live in** ``TRANSITIONS``: a ``dict[(State, Event)]`` whose value
   is either the next state or a handler ``(breaker, now) -> State``. Handlers update
   counters; the entry actions in ``ON_ENTER`` run when the state changes. Nothing else
   assigns ``Breaker._state``. The table is total over State × Event (a test checks).
2. **Time is an argument.** ``now`` is a monotonic clock in seconds, supplied by the caller.
   A ``now`` earlier than one already seen is treated as the latest one seen, so a caller
   mixing clocks cannot move a breaker backwards.
3. ``allow(now)`` is asked before every request; each ``True`` must be followed by exactly
   one ``record(now, ok, duration)`` or ``cancel(now)``. In HALF_OPEN an allowed request is
   a probe and holds a probe slot until then.
4. A result the state machine did not ask for (one arriving while OPEN, or in HALF_OPEN with
   no probe in flight: a request admitted before the trip) is counted as ``ignored`` and
   changes nothing. ``allow`` returns a plain ``bool``, so such a late result cannot be told
   apart from a probe's while a probe is in flight; it then counts as that probe's result.
   The error is on the cautious side for failures and bounded by one result for successes.
5. A probe with no result after ``probe_timeout`` counts as a failed probe (a hung probe must
   not keep the breaker half-open for ever).
6. In HALF_OPEN a slow success counts as a failed probe when slow-call tripping is
   configured: an endpoint that is still slow has not recovered.

Levels (:class:`GroupBreaker`). An endpoint breaker that would refuse a request (OPEN, or
HALF_OPEN with every probe slot taken) takes its endpoint out of the cluster's mask
(``mask(now)``), and the selector skips it. The group breaker sits above: it sees every outcome in
the cluster and also trips when ``open_endpoint_percent`` of the endpoints are not CLOSED;
while it is OPEN the cluster answers 503 at once, without picking an endpoint. A request
passes both levels: ``admit`` (group), then the selector over ``mask``, then
``allow_endpoint``; its outcome is recorded at both levels by one ``record`` call.

Cost: one table dispatch per ``allow`` and per ``record`` in CLOSED (the TICK dispatch is
skipped there, see ``_advance``). Only measured roughly, with ``timeit`` on a shared,
loaded 2-core machine (CPython 3.11): 4–6 µs for an ``allow`` + ``record`` pair with rate
tripping on. There is no benchmark in ``perf/`` yet.
"""

from __future__ import annotations

import enum
import math
from collections import deque
from collections.abc import Callable
from typing import Annotated, Any, Optional, Union

import msgspec
from msgspec import Meta

__all__ = [
    "ON_ENTER",
    "TRANSITIONS",
    "Breaker",
    "BreakerConfig",
    "Event",
    "GroupBreaker",
    "GroupBreakerConfig",
    "State",
    "transition_diagram",
    "transition_table_markdown",
]

# Durations are seconds; the upper bound only catches typos such as milliseconds
# (the same bound as dispa.config.model.MAX_SECONDS).
MAX_SECONDS = 7 * 24 * 3600
Seconds = Annotated[float, Meta(gt=0, le=MAX_SECONDS)]
Rate = Annotated[float, Meta(gt=0, le=1)]


class BreakerConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Circuit breaker settings (docs/resilience.md lists every key).

    ``failure_threshold``, ``recovery_time`` and ``half_open_requests`` keep the original
    Dispa names and defaults; rate-based tripping is off until its threshold is set.
    Raises ``msgspec.ValidationError`` on decode (``ValueError`` on direct construction)
    for inconsistent values.
    """

    failure_threshold: Annotated[int, Meta(ge=0)] = 5
    recovery_time: Seconds = 30.0
    half_open_requests: Annotated[int, Meta(ge=1, le=10_000)] = 1
    success_threshold: Annotated[int, Meta(ge=1, le=10_000)] = 1
    window_seconds: Seconds = 10.0
    window_buckets: Annotated[int, Meta(ge=1, le=1000)] = 10
    min_requests: Annotated[int, Meta(ge=1)] = 20
    error_rate_threshold: Optional[Rate] = None
    slow_call_seconds: Optional[Seconds] = None
    slow_call_rate_threshold: Optional[Rate] = None
    backoff_factor: Annotated[float, Meta(ge=1, le=100)] = 2.0
    max_recovery_time: Seconds = 300.0
    probe_timeout: Seconds = 60.0
    slow_start_seconds: Annotated[float, Meta(ge=0, le=MAX_SECONDS)] = 0.0
    slow_start_min: Annotated[float, Meta(gt=0, le=1)] = 0.1
    slow_start_aggression: Annotated[float, Meta(gt=0, le=100)] = 1.0

    def __post_init__(self) -> None:
        if self.max_recovery_time < self.recovery_time:
            raise ValueError("max_recovery_time must be >= recovery_time")
        if self.slow_call_rate_threshold is not None and self.slow_call_seconds is None:
            raise ValueError("slow_call_rate_threshold needs slow_call_seconds")


class State(enum.Enum):
    """Breaker states; the value is what ``snapshot()`` reports."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class Event(enum.Enum):
    """Inputs to the state machine.

    ``SUCCESS``/``SLOW_SUCCESS``/``FAILURE``/``SLOW_FAILURE`` come from ``record``;
    ``TICK`` is time advancing (every public call fires it first); ``PROBE_START`` is
    ``allow``: a request asks to start (a probe when HALF_OPEN); ``PROBE_CANCEL`` is
    ``cancel``; ``TRIP`` and ``RESET`` force OPEN / CLOSED (group level, admin).
    """

    SUCCESS = "success"
    SLOW_SUCCESS = "slow_success"
    FAILURE = "failure"
    SLOW_FAILURE = "slow_failure"
    TICK = "tick"
    PROBE_START = "probe_start"
    PROBE_CANCEL = "probe_cancel"
    TRIP = "trip"
    RESET = "reset"


class _Window:
    """Rolling outcome counts: ``buckets`` buckets of ``window_seconds / buckets`` each.

    ``total``/``failures``/``slow`` are the sums over the buckets whose time slot lies in the
    last ``buckets`` slots, kept up to date incrementally (O(1) per ``add``).
    """

    __slots__ = ("_width", "_n", "_tot", "_fail", "_slow", "_head", "total", "failures", "slow")

    def __init__(self, window_seconds: float, buckets: int) -> None:
        self._width = window_seconds / buckets
        self._n = buckets
        self._tot = [0] * buckets
        self._fail = [0] * buckets
        self._slow = [0] * buckets
        self._head = -(1 << 62)  # slot number of the newest bucket
        self.total = 0
        self.failures = 0
        self.slow = 0

    def advance(self, now: float) -> None:
        """Expire the buckets that fell out of the window at ``now``."""
        e = int(now // self._width)
        head = self._head
        if e <= head:
            return
        n = self._n
        if e - head >= n:
            for j in range(n):
                self._tot[j] = self._fail[j] = self._slow[j] = 0
            self.total = self.failures = self.slow = 0
        else:
            for k in range(head + 1, e + 1):
                j = k % n
                self.total -= self._tot[j]
                self.failures -= self._fail[j]
                self.slow -= self._slow[j]
                self._tot[j] = self._fail[j] = self._slow[j] = 0
        self._head = e

    def add(self, now: float, failed: bool, slow: bool) -> None:
        self.advance(now)
        j = self._head % self._n
        self._tot[j] += 1
        self.total += 1
        if failed:
            self._fail[j] += 1
            self.failures += 1
        if slow:
            self._slow[j] += 1
            self.slow += 1

    def clear(self) -> None:
        n = self._n
        self._tot = [0] * n
        self._fail = [0] * n
        self._slow = [0] * n
        self.total = self.failures = self.slow = 0


# ---------------------------------------------------------------------------- handlers
#
# A handler gets the breaker and the (clamped) time, updates counters, and returns the next
# state. ``targets`` lists every state it may return: the diagram in docs/resilience.md is
# generated from it, and ``Breaker._fire`` checks it.

Handler = Callable[["Breaker", float], State]


def _may_go(*targets: State) -> Callable[[Handler], Handler]:
    def mark(fn: Handler) -> Handler:
        fn.targets = targets  # type: ignore[attr-defined]
        return fn
    return mark


def _closed_result(b: Breaker, now: float, failed: bool, slow: bool) -> State:
    b._window.add(now, failed, slow)
    b._consecutive = b._consecutive + 1 if failed else 0
    reason = b._trip_reason()
    if reason is None:
        return State.CLOSED
    b.last_trip_reason = reason
    return State.OPEN


@_may_go(State.CLOSED, State.OPEN)
def _closed_success(b: Breaker, now: float) -> State:
    return _closed_result(b, now, False, False)


@_may_go(State.CLOSED, State.OPEN)
def _closed_slow_success(b: Breaker, now: float) -> State:
    return _closed_result(b, now, False, True)


@_may_go(State.CLOSED, State.OPEN)
def _closed_failure(b: Breaker, now: float) -> State:
    return _closed_result(b, now, True, False)


@_may_go(State.CLOSED, State.OPEN)
def _closed_slow_failure(b: Breaker, now: float) -> State:
    return _closed_result(b, now, True, True)


@_may_go(State.CLOSED)
def _closed_admit(b: Breaker, now: float) -> State:
    b._admitted = True
    return State.CLOSED


@_may_go(State.OPEN)
def _trip(b: Breaker, now: float) -> State:
    b.last_trip_reason = b._forced_reason
    return State.OPEN


@_may_go(State.OPEN)
def _open_ignore(b: Breaker, now: float) -> State:
    """A result nobody is waiting for (rule 4): requests admitted before the trip."""
    b.counters["ignored"] += 1
    return State.OPEN


@_may_go(State.OPEN)
def _open_reject(b: Breaker, now: float) -> State:
    b._admitted = False
    return State.OPEN


@_may_go(State.OPEN, State.HALF_OPEN)
def _open_tick(b: Breaker, now: float) -> State:
    return State.HALF_OPEN if now >= b.next_probe_at else State.OPEN


@_may_go(State.HALF_OPEN)
def _half_open_admit(b: Breaker, now: float) -> State:
    if len(b._probes) < b.config.half_open_requests:
        b._probes.append(now)
        b.counters["probes_started"] += 1
        b._admitted = True
    else:
        b._admitted = False
    return State.HALF_OPEN


def _probe_failed(b: Breaker, reason: str) -> State:
    c = b.config
    b._open_duration = min(b._open_duration * c.backoff_factor, c.max_recovery_time)
    b.last_trip_reason = reason
    return State.OPEN


@_may_go(State.HALF_OPEN, State.CLOSED)
def _half_open_success(b: Breaker, now: float) -> State:
    if not b._probes:  # rule 4: not a probe's result
        b.counters["ignored"] += 1
        return State.HALF_OPEN
    b._probes.popleft()
    b.counters["probe_successes"] += 1
    b._probe_successes += 1
    if b._probe_successes >= b.config.success_threshold:
        return State.CLOSED
    return State.HALF_OPEN


@_may_go(State.HALF_OPEN, State.OPEN)
def _half_open_failure(b: Breaker, now: float) -> State:
    if not b._probes:  # rule 4: not a probe's result
        b.counters["ignored"] += 1
        return State.HALF_OPEN
    b._probes.popleft()
    b.counters["probe_failures"] += 1
    return _probe_failed(b, "probe_failure")


@_may_go(State.HALF_OPEN, State.CLOSED, State.OPEN)
def _half_open_slow_success(b: Breaker, now: float) -> State:
    # Rule 6: still slow means not recovered, when slowness is something we trip on.
    if b.config.slow_call_rate_threshold is not None:
        return _half_open_failure(b, now)
    return _half_open_success(b, now)


@_may_go(State.HALF_OPEN, State.OPEN)
def _half_open_tick(b: Breaker, now: float) -> State:
    probes = b._probes
    if probes and now - probes[0] >= b.config.probe_timeout:
        probes.popleft()
        b.counters["probes_expired"] += 1
        return _probe_failed(b, "probe_timeout")
    return State.HALF_OPEN


@_may_go(State.HALF_OPEN)
def _half_open_cancel(b: Breaker, now: float) -> State:
    if b._probes:
        b._probes.popleft()
        b.counters["probes_cancelled"] += 1
    return State.HALF_OPEN


#: The whole state machine. Value: the next state, or a handler returning it.
TRANSITIONS: dict[tuple[State, Event], Union[State, Handler]] = {
    (State.CLOSED, Event.SUCCESS): _closed_success,
    (State.CLOSED, Event.SLOW_SUCCESS): _closed_slow_success,
    (State.CLOSED, Event.FAILURE): _closed_failure,
    (State.CLOSED, Event.SLOW_FAILURE): _closed_slow_failure,
    (State.CLOSED, Event.TICK): State.CLOSED,
    (State.CLOSED, Event.PROBE_START): _closed_admit,
    (State.CLOSED, Event.PROBE_CANCEL): State.CLOSED,
    (State.CLOSED, Event.TRIP): _trip,
    (State.CLOSED, Event.RESET): State.CLOSED,

    (State.OPEN, Event.SUCCESS): _open_ignore,
    (State.OPEN, Event.SLOW_SUCCESS): _open_ignore,
    (State.OPEN, Event.FAILURE): _open_ignore,
    (State.OPEN, Event.SLOW_FAILURE): _open_ignore,
    (State.OPEN, Event.TICK): _open_tick,
    (State.OPEN, Event.PROBE_START): _open_reject,
    (State.OPEN, Event.PROBE_CANCEL): State.OPEN,
    (State.OPEN, Event.TRIP): State.OPEN,
    (State.OPEN, Event.RESET): State.CLOSED,

    (State.HALF_OPEN, Event.SUCCESS): _half_open_success,
    (State.HALF_OPEN, Event.SLOW_SUCCESS): _half_open_slow_success,
    (State.HALF_OPEN, Event.FAILURE): _half_open_failure,
    (State.HALF_OPEN, Event.SLOW_FAILURE): _half_open_failure,
    (State.HALF_OPEN, Event.TICK): _half_open_tick,
    (State.HALF_OPEN, Event.PROBE_START): _half_open_admit,
    (State.HALF_OPEN, Event.PROBE_CANCEL): _half_open_cancel,
    (State.HALF_OPEN, Event.TRIP): _trip,
    (State.HALF_OPEN, Event.RESET): State.CLOSED,
}


# ---------------------------------------------------------------------- entry actions

def _enter_closed(b: Breaker, now: float) -> None:
    b._abandon_probes()
    b._window.clear()
    b._consecutive = 0
    b._open_duration = b.config.recovery_time
    b.closed_at = now
    b.opened_at = None
    b.next_probe_at = None


def _enter_open(b: Breaker, now: float) -> None:
    b._abandon_probes()
    b._consecutive = 0
    b.counters["trips"] += 1
    b.opened_at = now
    b.next_probe_at = now + b._open_duration


def _enter_half_open(b: Breaker, now: float) -> None:
    b._probe_successes = 0


#: Runs once each time the machine enters a state (not on self-loops).
ON_ENTER: dict[State, Callable[["Breaker", float], None]] = {
    State.CLOSED: _enter_closed,
    State.OPEN: _enter_open,
    State.HALF_OPEN: _enter_half_open,
}

_COUNTERS = ("allowed", "rejected", "successes", "failures", "slow_calls", "ignored", "trips",
             "probes_started", "probe_successes", "probe_failures", "probes_cancelled",
             "probes_expired", "probes_abandoned", "state_changes")


class Breaker:
    """One circuit breaker (see the module docstring for the rules).

    ``Breaker(config)`` starts CLOSED. Every method taking ``now`` first lets time advance
    (``Event.TICK``), so an OPEN breaker whose recovery time has passed is HALF_OPEN from
    that call on. ``state`` is as of the last call that took a ``now``. Not thread-safe:
    one breaker per worker and endpoint, used from one event loop.
    """

    __slots__ = ("config", "_state", "_now", "_window", "_consecutive", "_probes",
                 "_probe_successes", "_open_duration", "_admitted", "_forced_reason",
                 "counters", "opened_at", "next_probe_at", "closed_at", "last_trip_reason")

    def __init__(self, config: BreakerConfig | None = None) -> None:
        self.config = config if config is not None else BreakerConfig()
        c = self.config
        self._state = State.CLOSED
        self._now = -math.inf
        self._window = _Window(c.window_seconds, c.window_buckets)
        self._consecutive = 0
        self._probes: deque[float] = deque()  # start times of probes in flight, oldest first
        self._probe_successes = 0
        self._open_duration = c.recovery_time
        self._admitted = False
        self._forced_reason = "forced"
        #: Monotonic counters for metrics and /admin/status (``snapshot()``).
        self.counters: dict[str, int] = dict.fromkeys(_COUNTERS, 0)
        self.opened_at: float | None = None
        self.next_probe_at: float | None = None
        self.closed_at: float | None = None  # None until the first recovery: no ramp yet
        self.last_trip_reason: str | None = None

    # -------------------------------------------------------------------- the engine

    def _fire(self, event: Event, now: float) -> None:
        """Apply one event: the only place the state changes (rule 1)."""
        prev = self._state
        entry = TRANSITIONS[(prev, event)]
        if isinstance(entry, State):
            nxt = entry
        else:
            nxt = entry(self, now)
            assert nxt in entry.targets, (prev, event, nxt)  # type: ignore[attr-defined]
        if nxt is not prev:
            self._state = nxt
            self.counters["state_changes"] += 1
            ON_ENTER[nxt](self, now)

    def _clamp(self, now: float) -> float:
        if now < self._now:
            return self._now
        self._now = now
        return now

    def _advance(self, now: float) -> float:
        """Clamp ``now`` (rule 2) and fire TICK. ``(CLOSED, TICK)`` is a plain self-loop in the
        table (a test pins that), so its dispatch is skipped: CLOSED is the hot state."""
        now = self._clamp(now)
        if self._state is not State.CLOSED:
            self._fire(Event.TICK, now)
        return now

    def _abandon_probes(self) -> None:
        if self._probes:
            self.counters["probes_abandoned"] += len(self._probes)
            self._probes.clear()

    def _trip_reason(self) -> str | None:
        c = self.config
        if c.failure_threshold and self._consecutive >= c.failure_threshold:
            return "consecutive_failures"
        w = self._window
        if w.total >= c.min_requests:
            err, slow = c.error_rate_threshold, c.slow_call_rate_threshold
            if err is not None and w.failures >= err * w.total:
                return "error_rate"
            if slow is not None and w.slow >= slow * w.total:
                return "slow_call_rate"
        return None

    # -------------------------------------------------------------------- public API

    @property
    def state(self) -> State:
        """The state as of the last call that took a ``now``."""
        return self._state

    @property
    def probes_in_flight(self) -> int:
        """Probes allowed in HALF_OPEN and not yet recorded or cancelled."""
        return len(self._probes)

    @property
    def open_duration(self) -> float:
        """How long the next (or current) OPEN period lasts, in seconds."""
        return self._open_duration

    def tick(self, now: float) -> State:
        """Let time advance to ``now`` (OPEN → HALF_OPEN, probe expiry). Returns the state."""
        self._advance(now)
        return self._state

    def allow(self, now: float) -> bool:
        """May a request start now? ``True`` commits the caller to ``record`` or ``cancel``.

        CLOSED: always ``True``. OPEN: ``False`` (until ``next_probe_at``, when the breaker
        becomes HALF_OPEN). HALF_OPEN: ``True`` while fewer than ``half_open_requests`` probes
        are in flight, and the request is then a probe. Never raises.
        """
        now = self._advance(now)
        self._admitted = False
        self._fire(Event.PROBE_START, now)
        if self._admitted:
            self.counters["allowed"] += 1
            return True
        self.counters["rejected"] += 1
        return False

    def available(self, now: float) -> bool:
        """Would ``allow(now)`` return ``True``? Takes no probe slot (for building masks).

        WARNING: mirrors the PROBE_START handlers; the state-machine test checks that the
        two always agree.
        """
        st = self.tick(now)
        if st is State.CLOSED:
            return True
        if st is State.HALF_OPEN:
            return len(self._probes) < self.config.half_open_requests
        return False

    def record(self, now: float, ok: bool, duration: float = 0.0) -> State:
        """Record the outcome of an allowed request that took ``duration`` seconds.

        ``ok`` is the caller's verdict (a 5xx, a reset or a timeout is ``False``). A call is
        slow when ``duration > slow_call_seconds``. Returns the state afterwards.
        """
        now = self._advance(now)
        c = self.config
        slow = c.slow_call_seconds is not None and duration > c.slow_call_seconds
        counters = self.counters
        if ok:
            counters["successes"] += 1
        else:
            counters["failures"] += 1
        if slow:
            counters["slow_calls"] += 1
            self._fire(Event.SLOW_SUCCESS if ok else Event.SLOW_FAILURE, now)
        else:
            self._fire(Event.SUCCESS if ok else Event.FAILURE, now)
        return self._state

    def cancel(self, now: float) -> State:
        """An allowed request ended without an outcome (client gone): free its probe slot."""
        now = self._advance(now)
        self._fire(Event.PROBE_CANCEL, now)
        return self._state

    def trip(self, now: float, reason: str = "forced") -> State:
        """Force the breaker OPEN (group level, admin). No effect if already OPEN."""
        now = self._advance(now)
        self._forced_reason = reason
        self._fire(Event.TRIP, now)
        return self._state

    def reset(self, now: float) -> State:
        """Force the breaker CLOSED (admin). Starts the slow-start ramp if it was not CLOSED."""
        now = self._advance(now)
        self._fire(Event.RESET, now)
        return self._state

    def weight_factor(self, now: float) -> float:
        """Share of its normal traffic this endpoint should get, in ``[0, 1]``.

        0.0 while OPEN; ``slow_start_min`` while HALF_OPEN; in CLOSED it ramps from
        ``slow_start_min`` to 1.0 during ``slow_start_seconds`` after the last recovery
        (1.0 when slow start is off or the breaker never opened).
        """
        st = self.tick(now)
        c = self.config
        if st is State.OPEN:
            return 0.0
        if st is State.HALF_OPEN:
            return c.slow_start_min
        if self.closed_at is None or c.slow_start_seconds <= 0:
            return 1.0
        t = (self._now - self.closed_at) / c.slow_start_seconds
        if t >= 1.0:
            return 1.0
        lo = c.slow_start_min
        return lo + (1.0 - lo) * t ** (1.0 / c.slow_start_aggression)

    def window_counts(self, now: float | None = None) -> tuple[int, int, int]:
        """``(requests, failures, slow)`` in the sliding window (CLOSED outcomes only)."""
        w = self._window
        if now is not None:
            w.advance(self._clamp(now))
        return w.total, w.failures, w.slow

    def snapshot(self, now: float | None = None) -> dict[str, Any]:
        """Plain data for ``/admin/status`` and metrics. With ``now``, time advances first."""
        if now is not None:
            self.tick(now)
        total, failures, slow = self.window_counts(now)
        snap: dict[str, Any] = {
            "state": self._state.value,
            "opened_at": self.opened_at,
            "next_probe_at": self.next_probe_at,
            "open_duration": self._open_duration,
            "last_trip_reason": self.last_trip_reason,
            "consecutive_failures": self._consecutive,
            "probes_in_flight": len(self._probes),
            "window": {
                "requests": total,
                "failures": failures,
                "slow": slow,
                "error_rate": failures / total if total else 0.0,
                "slow_call_rate": slow / total if total else 0.0,
            },
            "counters": dict(self.counters),
        }
        if now is not None:
            snap["weight_factor"] = self.weight_factor(now)
        return snap


# ----------------------------------------------------------------------------- groups

class GroupBreakerConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Cluster-level breaker: ``group`` is a :class:`BreakerConfig` fed with every outcome in
    the cluster (consecutive-failure tripping off by default: one bad endpoint must not open
    the whole cluster), and ``open_endpoint_percent`` trips it when that share of endpoints
    is not CLOSED. With the defaults the group breaker never trips.
    """

    open_endpoint_percent: Optional[Annotated[float, Meta(gt=0, le=100)]] = None
    group: BreakerConfig = msgspec.field(default_factory=lambda: BreakerConfig(failure_threshold=0))


class GroupBreaker:
    """Endpoint breakers plus one breaker for the cluster (see "Levels" above).

    ``GroupBreaker(n_endpoints, endpoint_config, group_config)``; indexes are into the
    cluster's endpoint tuple, as for selectors. A request goes::

        if not gb.admit(now): answer 503                     # group OPEN: fail fast
        i = selector.pick(gb.mask(now, health_view))         # open endpoints skipped
        if i < 0 or not gb.allow_endpoint(i, now): gb.cancel(None, now); answer 503
        ... gb.record(i, now, ok, duration)   (or gb.cancel(i, now))
    """

    __slots__ = ("config", "endpoints", "group", "_n")

    def __init__(self, n_endpoints: int, endpoint_config: BreakerConfig | None = None,
                 group_config: GroupBreakerConfig | None = None) -> None:
        if n_endpoints < 1:
            raise ValueError("a group breaker needs at least one endpoint")
        self.config = group_config if group_config is not None else GroupBreakerConfig()
        ec = endpoint_config if endpoint_config is not None else BreakerConfig()
        self._n = n_endpoints
        self.endpoints = [Breaker(ec) for _ in range(n_endpoints)]
        self.group = Breaker(self.config.group)

    def admit(self, now: float) -> bool:
        """Group level ``allow``: ``False`` means answer 503 without picking an endpoint."""
        return self.group.allow(now)

    def mask(self, now: float, healthy: list[bool] | None = None) -> list[bool] | None:
        """``healthy`` with every endpoint whose breaker would refuse a request switched off.

        ``None`` (all usable, the selector fast path) when nothing is off. O(n).
        """
        out = None
        for i, b in enumerate(self.endpoints):
            if (healthy is not None and not healthy[i]) or not b.available(now):
                if out is None:
                    out = list(healthy) if healthy is not None else [True] * self._n
                out[i] = False
        return out

    def allow_endpoint(self, i: int, now: float) -> bool:
        """Endpoint level ``allow`` for the picked endpoint ``i`` (takes a probe slot)."""
        return self.endpoints[i].allow(now)

    def record(self, i: int, now: float, ok: bool, duration: float = 0.0) -> None:
        """Record one outcome of endpoint ``i`` at both levels; may trip the group."""
        b = self.endpoints[i]
        before = b.tick(now)
        after = b.record(now, ok, duration)
        self.group.record(now, ok, duration)
        if after is State.OPEN and before is not State.OPEN:
            self._check_open_share(now)

    def cancel(self, i: int | None, now: float) -> None:
        """The request admitted by ``admit`` ended without an outcome; ``i`` is its endpoint
        if ``allow_endpoint`` had allowed it, else ``None``."""
        if i is not None:
            self.endpoints[i].cancel(now)
        self.group.cancel(now)

    def _check_open_share(self, now: float) -> None:
        # Edge-triggered: evaluated when an endpoint trips, so a group that recovered while
        # endpoints are still recovering is not re-opened until another endpoint trips.
        pct = self.config.open_endpoint_percent
        if pct is None:
            return
        not_closed = sum(1 for b in self.endpoints if b.state is not State.CLOSED)
        if not_closed * 100 >= pct * self._n:
            self.group.trip(now, "open_endpoints")

    def weight_factors(self, now: float) -> list[float]:
        """Each endpoint's :meth:`Breaker.weight_factor`."""
        return [b.weight_factor(now) for b in self.endpoints]

    def snapshot(self, now: float | None = None) -> dict[str, Any]:
        """``{"group": ..., "endpoints": [...]}`` of :meth:`Breaker.snapshot` dicts."""
        return {"group": self.group.snapshot(now),
                "endpoints": [b.snapshot(now) for b in self.endpoints]}


# ------------------------------------------------------------------------ rendering

def _targets_of(entry: Union[State, Handler]) -> tuple[State, ...]:
    return (entry,) if isinstance(entry, State) else entry.targets  # type: ignore[attr-defined]


def transition_diagram() -> str:
    """A mermaid ``stateDiagram-v2`` generated from ``TRANSITIONS`` (self-loops left out)."""
    edges: dict[tuple[State, State], list[str]] = {}
    for (src, ev), entry in TRANSITIONS.items():
        for dst in _targets_of(entry):
            if dst is not src:
                edges.setdefault((src, dst), []).append(ev.name)
    lines = ["stateDiagram-v2", "    [*] --> CLOSED"]
    for (src, dst), evs in edges.items():
        lines.append(f"    {src.name} --> {dst.name}: {' / '.join(evs)}")
    return "\n".join(lines)


def transition_table_markdown() -> str:
    """``TRANSITIONS`` as a markdown table: state × event → handler (possible next states)."""
    states = list(State)
    head = "| event | " + " | ".join(s.name for s in states) + " |"
    rule = "| --- |" + " --- |" * len(states)
    rows = [head, rule]
    for ev in Event:
        cells = []
        for s in states:
            entry = TRANSITIONS[(s, ev)]
            if isinstance(entry, State):
                cells.append(f"→ {entry.name}")
            else:
                targets = "/".join(t.name for t in _targets_of(entry))
                cells.append(f"`{entry.__name__}` → {targets}")
        rows.append(f"| {ev.name} | " + " | ".join(cells) + " |")
    return "\n".join(rows)
