"""Least connections: the endpoint with the fewest requests in flight (``type = "leastconnections"``).

Theory of operation: ``acquire(i)``/``release(i)`` keep a per-worker in-flight count per
endpoint. A pick takes the usable endpoint with the lowest count per unit of weight (nginx
``least_conn``); ties are broken by smooth weighted round robin, so when nothing is in
flight idle endpoints share load in proportion to their weights instead of endpoint 0
taking every request.

Counts are per worker (nothing is shared between workers on the hot path); with N workers
the global picture is approximately N times finer. Counts never go below zero, so a
``release`` without an ``acquire`` (for instance across a snapshot swap) is harmless.
"""

from __future__ import annotations

from collections.abc import Sequence

from dispa.balancer.base import check_weights

__all__ = ["LeastConnections"]


class LeastConnections:
    """Fewest in flight per weight, ties by smooth weighted round robin (see :class:`~dispa.balancer.base.Selector`)."""

    __slots__ = ("_weights", "_inflight", "_n", "_cw")

    def __init__(self, weights: Sequence[int]) -> None:
        self._weights = check_weights(weights)
        self._n = len(self._weights)
        self._inflight = [0] * self._n
        self._cw = [0] * self._n  # smooth-WRR current weights for breaking ties

    def _scan(self, healthy: list[bool] | None, exclude: set[int] | None) -> int:
        # nginx least_conn: the lowest in-flight/weight ratio wins (compared by
        # cross-multiplying, no division); ties go to smooth weighted round robin, so idle
        # endpoints share load in proportion to their weights.
        n = self._n
        weights = self._weights
        inflight = self._inflight
        best = -1
        best_c = 0
        best_w = 1
        tied = 0
        for j in range(n):
            if healthy is not None and not healthy[j]:
                continue
            if exclude is not None and j in exclude:
                continue
            c = inflight[j]
            w = weights[j]
            if best < 0 or c * best_w < best_c * w:
                best, best_c, best_w, tied = j, c, w, 1
            elif c * best_w == best_c * w:
                tied += 1
        if tied <= 1:
            return best
        cw = self._cw
        total = 0
        pick = -1
        for j in range(n):
            if healthy is not None and not healthy[j]:
                continue
            if exclude is not None and j in exclude:
                continue
            if inflight[j] * best_w != best_c * weights[j]:
                continue
            cw[j] += weights[j]
            total += weights[j]
            if pick < 0 or cw[j] > cw[pick]:
                pick = j
        cw[pick] -= total
        return pick

    def pick(self, healthy: list[bool] | None, key: bytes | None = None) -> int:
        return self._scan(healthy, None)

    def pick_excluding(self, healthy: list[bool] | None, exclude: set[int], key: bytes | None = None) -> int:
        return self._scan(healthy, exclude or None)

    def acquire(self, i: int) -> None:
        self._inflight[i] += 1

    def release(self, i: int) -> None:
        c = self._inflight[i]
        if c > 0:
            self._inflight[i] = c - 1

    def inflight(self, i: int) -> int:
        """Requests in flight on endpoint ``i`` in this worker (for metrics and tests)."""
        return self._inflight[i]
