"""Latency-aware selection: power of two choices over peak-EWMA cost (Finagle, linkerd).

Theory of operation
-------------------
Each pick draws two distinct usable endpoints at random and sends the request to the one
with the lower cost (Mitzenmacher, *The Power of Two Choices in Randomized Load Balancing*,
2001: two random choices bring the maximum load down exponentially compared with one, while
avoiding the herd behaviour of always taking the global minimum from stale data).

The cost is Finagle's ``PeakEwma`` / tower's ``PeakEwma`` (used by linkerd)::

    cost(i) = max(latency_estimate(i), MIN_LATENCY_SECONDS) * (outstanding(i) + 1)
              / (weight(i) * weight_factor(i))

* ``outstanding(i)`` counts requests in flight, by ``acquire``/``release``.
* ``latency_estimate`` is an exponentially weighted moving average of observed latencies,
  decaying with time constant ``decay_seconds``: after ``dt`` seconds the old value keeps a
  weight of ``exp(-dt / decay_seconds)``, and between observations it decays towards zero,
  so an endpoint that has not been used for a while is tried again.
* **Peak-sensitive**: an observation above the current (decayed) estimate replaces it at
  once, so a slow-down is acted on after one response, while a recovery is believed only
  gradually.
* ``weight`` is the endpoint's configured weight (not in Finagle or tower; with equal
  weights it cancels out), and ``weight_factor`` is a live multiplier in ``(0, 1]``, e.g. a
  circuit breaker's slow-start ramp (``Breaker.weight_factor``).

Rules:

1. Reading a cost does not change the estimate. (Finagle and tower store the decayed value on
   every read, which makes the weight of the next observation depend on how often picks
   happened; here it depends only on time.) The formula is otherwise theirs:
   ``estimate = decayed + latency * (1 - exp(-dt / decay_seconds))``, or ``latency`` when it
   is larger than ``decayed``.
2. Endpoints start with ``initial_latency_seconds`` (tower's ``default_rtt``) as estimate.
3. One usable endpoint: it is picked with no draw. Two: both are compared, so the cheaper one
   is always picked (ties go to a random one). The two draws are distinct.
4. Time for decay comes from ``clock`` (default ``time.monotonic``) on ``pick``, since the
   Selector protocol passes no time; ``observe`` takes ``now`` explicitly. Tests inject both
   ``clock`` and ``rng``.

Follows :class:`~dispa.balancer.base.Selector`: ``-1`` when nothing is usable, never raises
on the request path, O(n) at most (O(1) when ``healthy is None`` and nothing is excluded).

Not yet measured: the cost of the two ``exp`` calls per pick against least connections.
"""

from __future__ import annotations

import math
import random as _random
import time
from collections.abc import Callable, Sequence
from typing import Annotated

import msgspec
from msgspec import Meta

from dispa.balancer.base import check_weights

__all__ = ["MIN_LATENCY_SECONDS", "PeakEwma", "PeakEwmaConfig"]

#: Floor for the estimate in the cost, so that in-flight counts still separate endpoints
#: whose estimates have decayed to (nearly) zero; Finagle adds a fixed penalty for the same reason.
MIN_LATENCY_SECONDS = 1e-6


class PeakEwmaConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Settings of the ``peak_ewma`` selector (docs/resilience.md)."""

    decay_seconds: Annotated[float, Meta(gt=0, le=3600)] = 10.0  # Finagle/linkerd: 10 s
    initial_latency_seconds: Annotated[float, Meta(ge=0, le=3600)] = 0.03  # linkerd: 30 ms


class PeakEwma:
    """Power of two choices over peak-EWMA cost (see :class:`~dispa.balancer.base.Selector`).

    ``PeakEwma(weights, *, decay_seconds=10.0, initial_latency_seconds=0.03, rng=None,
    clock=None)``. ``rng`` is anything with ``random() -> float in [0, 1)``; ``clock`` returns
    monotonic seconds. Raises ``ValueError``/``TypeError`` for bad weights (``check_weights``)
    and ``ValueError`` for ``decay_seconds <= 0``.
    """

    __slots__ = ("_weights", "_n", "_est", "_stamp", "_out", "_factor", "_tau", "_random",
                 "_clock")

    def __init__(self, weights: Sequence[int], *, decay_seconds: float = 10.0,
                 initial_latency_seconds: float = 0.03, rng: _random.Random | None = None,
                 clock: Callable[[], float] | None = None) -> None:
        self._weights = check_weights(weights)
        if not decay_seconds > 0:
            raise ValueError("decay_seconds must be > 0")
        n = self._n = len(self._weights)
        self._tau = float(decay_seconds)
        self._random = (rng or _random).random
        self._clock = clock or time.monotonic
        start = self._clock()
        self._est = [float(initial_latency_seconds)] * n
        self._stamp = [start] * n
        self._out = [0] * n
        self._factor = [1.0] * n

    @classmethod
    def from_config(cls, weights: Sequence[int], config: PeakEwmaConfig, *,
                    rng: _random.Random | None = None,
                    clock: Callable[[], float] | None = None) -> PeakEwma:
        return cls(weights, decay_seconds=config.decay_seconds,
                   initial_latency_seconds=config.initial_latency_seconds, rng=rng, clock=clock)

    # ------------------------------------------------------------------ estimates

    def latency(self, i: int, now: float) -> float:
        """Endpoint ``i``'s latency estimate at ``now``, in seconds (decayed, rule 1)."""
        dt = now - self._stamp[i]
        if dt <= 0:
            return self._est[i]
        return self._est[i] * math.exp(-dt / self._tau)

    def cost(self, i: int, now: float) -> float:
        """The P2C cost of endpoint ``i`` at ``now`` (``inf`` with a zero weight factor)."""
        f = self._factor[i]
        if f <= 0:
            return math.inf
        lat = self.latency(i, now)
        if lat < MIN_LATENCY_SECONDS:
            lat = MIN_LATENCY_SECONDS
        return lat * (self._out[i] + 1) / (self._weights[i] * f)

    def observe(self, i: int, latency_seconds: float, now: float) -> None:
        """A response from endpoint ``i`` took ``latency_seconds`` (finished at ``now``)."""
        lat = latency_seconds if latency_seconds > 0 else 0.0
        dt = now - self._stamp[i]
        decay = math.exp(-dt / self._tau) if dt > 0 else 1.0
        cur = self._est[i] * decay
        if lat > cur:
            self._est[i] = lat  # peak: believe a slow-down at once
        else:
            self._est[i] = cur + lat * (1.0 - decay)
        if now > self._stamp[i]:
            self._stamp[i] = now

    def set_weight_factor(self, i: int, factor: float) -> None:
        """Scale endpoint ``i``'s weight by ``factor`` (clamped to ``[0, 1]``; 0 = last resort)."""
        self._factor[i] = 0.0 if factor <= 0 else (1.0 if factor >= 1 else float(factor))

    def outstanding(self, i: int) -> int:
        """Requests in flight on endpoint ``i`` in this worker."""
        return self._out[i]

    # ------------------------------------------------------------------ Selector

    def _draw(self, m: int) -> tuple[int, int]:
        """Two distinct indexes in ``range(m)``, ``m >= 2``, uniformly."""
        r = self._random
        a = int(r() * m)
        if a >= m:
            a = m - 1
        b = int(r() * (m - 1))
        if b >= m - 1:
            b = m - 2
        if b >= a:
            b += 1
        return a, b

    def _choose(self, a: int, b: int) -> int:
        now = self._clock()
        return a if self.cost(a, now) <= self.cost(b, now) else b

    def pick(self, healthy: list[bool] | None, key: bytes | None = None) -> int:
        if healthy is None:
            if self._n == 1:
                return 0
            a, b = self._draw(self._n)
            return self._choose(a, b)
        return self._pick_masked(healthy, None)

    def pick_excluding(self, healthy: list[bool] | None, exclude: set[int], key: bytes | None = None) -> int:
        if not exclude:
            return self.pick(healthy, key)
        return self._pick_masked(healthy, exclude)

    def _pick_masked(self, healthy: list[bool] | None, exclude: set[int] | None) -> int:
        cands = [i for i in range(self._n)
                 if (healthy is None or healthy[i]) and (exclude is None or i not in exclude)]
        m = len(cands)
        if m == 0:
            return -1
        if m == 1:
            return cands[0]
        a, b = self._draw(m)
        return self._choose(cands[a], cands[b])

    def acquire(self, i: int) -> None:
        self._out[i] += 1

    def release(self, i: int) -> None:
        c = self._out[i]
        if c > 0:
            self._out[i] = c - 1
