"""Retry budgets: retries may only add a bounded share to the load on a cluster (sans-I/O).

Theory of operation
-------------------
Retrying a failed request is good for one client and bad for an upstream that is failing
because it is overloaded: every client retrying at once multiplies its load (a retry storm).
A retry budget caps retries as a share of ordinary traffic, so retries recover from
scattered failures but cannot amplify a general one. Two classic designs, picked with
``type``:

* ``type = "concurrent"`` (Envoy ``RetryBudget``: ``budget_percent``,
  ``min_retry_concurrency``): a retry may start while the retries in flight stay at most
  ``max(min_retry_concurrency, floor(budget_percent% * requests in flight))``. Requests in
  flight are downstream requests (first tries), counted by ``deposit``/``request_done``.
* ``type = "window"`` (Finagle ``RetryBudget``: ``ttl``, ``minRetriesPerSec``,
  ``percentCanRetry``; a leaky token bucket): every request deposits ``budget_percent / 100``
  of a token; a retry withdraws one whole token; deposits and withdrawals expire after
  ``window_seconds``; ``min_retries_per_second * window_seconds`` tokens are always in
  reserve. So within the window, ``retries <= budget_percent% * requests + reserve``.

Both have the same four calls, so the proxy does not care which it holds:
``deposit(now)`` when a request starts, ``try_withdraw(now) -> bool`` before each retry,
``retry_done()`` when a retry attempt ends, ``request_done()`` when the request ends (the
window budget ignores the ``*_done`` calls).

Rules:

1. Arithmetic is exact: percentages are kept in thousandths of a percent and tokens in
   integer units, so the bound holds for every sequence, not just on average (the property
   tests check it against a brute-force model).
2. The window is a ring of ``window_buckets`` buckets (O(1) per event). An event belongs to
   the bucket ``floor(now / (window_seconds / window_buckets))``; the window at ``now`` is the
   last ``window_buckets`` buckets, so its span is between ``window_seconds - bucket width``
   and ``window_seconds``.
3. Time is an argument (monotonic seconds); a ``now`` earlier than one already seen counts
   as the latest one seen.
4. ``per_try_timeout`` is carried for the proxy (the timeout of each attempt); the budget does
   not use it.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Optional, Protocol, Union

import msgspec
from msgspec import Meta

__all__ = [
    "ConcurrentRetryBudget",
    "ConcurrentRetryBudgetConfig",
    "RetryBudget",
    "RetryBudgetConfig",
    "WindowRetryBudget",
    "WindowRetryBudgetConfig",
    "build_retry_budget",
]

MAX_SECONDS = 7 * 24 * 3600
Seconds = Annotated[float, Meta(gt=0, le=MAX_SECONDS)]
Percent = Annotated[float, Meta(ge=0, le=100)]

# Units: a percentage is stored as an int in thousandths of a percent (20.0% -> 20_000), and a
# whole token (one retry) is 100% -> 100_000 units; a deposit is worth budget_percent units.
_WHOLE = 100_000


def _milli_percent(pct: float) -> int:
    return int(round(pct * 1000))


class _BudgetBase(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True,
                  tag_field="type"):
    budget_percent: Percent = 20.0
    per_try_timeout: Optional[Seconds] = None


class ConcurrentRetryBudgetConfig(_BudgetBase, tag="concurrent"):
    """Envoy's retry budget: retries in flight against requests in flight."""

    min_retry_concurrency: Annotated[int, Meta(ge=0)] = 3


class WindowRetryBudgetConfig(_BudgetBase, tag="window"):
    """Finagle's retry budget: retries against requests over a sliding window."""

    min_retries_per_second: Annotated[float, Meta(ge=0, le=1_000_000)] = 10.0
    window_seconds: Seconds = 10.0
    window_buckets: Annotated[int, Meta(ge=1, le=1000)] = 10


#: ``[... retry_budget]`` with ``type = "concurrent" | "window"``.
RetryBudgetConfig = Union[ConcurrentRetryBudgetConfig, WindowRetryBudgetConfig]


class RetryBudget(Protocol):
    """What the proxy calls; see the module docstring."""

    per_try_timeout: float | None

    def deposit(self, now: float) -> None: ...
    def try_withdraw(self, now: float) -> bool: ...
    def retry_done(self) -> None: ...
    def request_done(self) -> None: ...
    def snapshot(self, now: float | None = None) -> dict[str, Any]: ...


class ConcurrentRetryBudget:
    """Envoy-style budget over requests and retries in flight (see the module docstring)."""

    __slots__ = ("config", "per_try_timeout", "_pct", "_min", "active_requests",
                 "active_retries", "retries_allowed", "retries_rejected")

    def __init__(self, config: ConcurrentRetryBudgetConfig | None = None) -> None:
        c = self.config = config if config is not None else ConcurrentRetryBudgetConfig()
        self.per_try_timeout = c.per_try_timeout
        self._pct = _milli_percent(c.budget_percent)
        self._min = c.min_retry_concurrency
        self.active_requests = 0
        self.active_retries = 0
        self.retries_allowed = 0
        self.retries_rejected = 0

    def limit(self) -> int:
        """The most retries that may be in flight right now."""
        return max(self._min, self.active_requests * self._pct // _WHOLE)

    def deposit(self, now: float = 0.0) -> None:
        """A downstream request started."""
        self.active_requests += 1

    def request_done(self) -> None:
        """A downstream request ended (never below zero)."""
        if self.active_requests > 0:
            self.active_requests -= 1

    def try_withdraw(self, now: float = 0.0) -> bool:
        """May one more retry start? ``True`` counts it in flight until ``retry_done``."""
        if self.active_retries < self.limit():
            self.active_retries += 1
            self.retries_allowed += 1
            return True
        self.retries_rejected += 1
        return False

    def retry_done(self) -> None:
        """A retry attempt ended (never below zero)."""
        if self.active_retries > 0:
            self.active_retries -= 1

    def snapshot(self, now: float | None = None) -> dict[str, Any]:
        return {"type": "concurrent", "active_requests": self.active_requests,
                "active_retries": self.active_retries, "limit": self.limit(),
                "retries_allowed": self.retries_allowed, "retries_rejected": self.retries_rejected}


class WindowRetryBudget:
    """Finagle-style token bucket over a sliding window (see the module docstring)."""

    __slots__ = ("config", "per_try_timeout", "_deposit", "_reserve", "_width", "_n", "_dep",
                 "_wd", "_head", "_now", "deposits", "withdrawals", "retries_allowed",
                 "retries_rejected")

    def __init__(self, config: WindowRetryBudgetConfig | None = None) -> None:
        c = self.config = config if config is not None else WindowRetryBudgetConfig()
        self.per_try_timeout = c.per_try_timeout
        self._deposit = _milli_percent(c.budget_percent)
        # Finagle: reserve = minRetriesPerSec * ttl tokens; floor to whole units.
        self._reserve = int(math.floor(c.min_retries_per_second * c.window_seconds * _WHOLE))
        self._width = c.window_seconds / c.window_buckets
        self._n = c.window_buckets
        self._dep = [0] * self._n  # deposits per bucket
        self._wd = [0] * self._n  # withdrawals per bucket
        self._head = -(1 << 62)
        self._now = -math.inf
        self.deposits = 0  # in the window
        self.withdrawals = 0  # in the window
        self.retries_allowed = 0
        self.retries_rejected = 0

    def _advance(self, now: float) -> int:
        if now < self._now:
            now = self._now
        self._now = now
        e = int(now // self._width)
        head = self._head
        if e > head:
            n = self._n
            if e - head >= n:
                self._dep = [0] * n
                self._wd = [0] * n
                self.deposits = self.withdrawals = 0
            else:
                for k in range(head + 1, e + 1):
                    j = k % n
                    self.deposits -= self._dep[j]
                    self.withdrawals -= self._wd[j]
                    self._dep[j] = self._wd[j] = 0
            self._head = e
        return self._head % self._n

    def balance_units(self, now: float | None = None) -> int:
        """Tokens available (in units of 1/100_000 retry), reserve included."""
        if now is not None:
            self._advance(now)
        return self.deposits * self._deposit + self._reserve - self.withdrawals * _WHOLE

    def deposit(self, now: float) -> None:
        """A downstream request started: ``budget_percent``% of a retry is earned."""
        j = self._advance(now)
        self._dep[j] += 1
        self.deposits += 1

    def try_withdraw(self, now: float) -> bool:
        """May a retry start now? ``True`` spends one retry's worth of tokens."""
        j = self._advance(now)
        if self.balance_units() >= _WHOLE:
            self._wd[j] += 1
            self.withdrawals += 1
            self.retries_allowed += 1
            return True
        self.retries_rejected += 1
        return False

    def retry_done(self) -> None:
        """No-op: the window budget does not track attempts in flight."""

    def request_done(self) -> None:
        """No-op: the window budget does not track requests in flight."""

    def snapshot(self, now: float | None = None) -> dict[str, Any]:
        bal = self.balance_units(now)
        return {"type": "window", "deposits": self.deposits, "withdrawals": self.withdrawals,
                "available_retries": bal // _WHOLE if bal > 0 else 0,
                "retries_allowed": self.retries_allowed, "retries_rejected": self.retries_rejected}


def build_retry_budget(config: RetryBudgetConfig) -> ConcurrentRetryBudget | WindowRetryBudget:
    """The budget for ``config`` (one per worker and cluster). Raises ``TypeError`` for
    anything else."""
    if isinstance(config, ConcurrentRetryBudgetConfig):
        return ConcurrentRetryBudget(config)
    if isinstance(config, WindowRetryBudgetConfig):
        return WindowRetryBudget(config)
    raise TypeError(f"not a retry budget config: {type(config).__name__}")

