"""Least connections: the endpoint with the fewest requests in flight (``type = "leastconnections"``).

Theory of operation: ``acquire(i)``/``release(i)`` keep a per-worker in-flight count per
endpoint. A pick takes the usable endpoint with the lowest count; among equal counts the
higher weight wins, and among equal weights the first one found scanning from a rotating
start, so idle endpoints share load in turn instead of endpoint 0 taking every request
when nothing is in flight.

Counts are per worker (nothing is shared between workers on the hot path); with N workers
the global picture is approximately N times finer. Counts never go below zero, so a
``release`` without an ``acquire`` (for instance across a snapshot swap) is harmless.
"""

from __future__ import annotations

from collections.abc import Sequence

from dispa.balancer.base import check_weights

__all__ = ["LeastConnections"]


class LeastConnections:
    """Fewest in flight, ties by weight then rotation (see :class:`~dispa.balancer.base.Selector`)."""

    __slots__ = ("_weights", "_inflight", "_n", "_next")

    def __init__(self, weights: Sequence[int]) -> None:
        self._weights = check_weights(weights)
        self._n = len(self._weights)
        self._inflight = [0] * self._n
        self._next = 0

    def _scan(self, healthy: list[bool] | None, exclude: set[int] | None) -> int:
        n = self._n
        weights = self._weights
        inflight = self._inflight
        i = self._next
        best = -1
        best_c = 0
        best_w = 0
        for _ in range(n):
            j = i
            i = i + 1 if i + 1 < n else 0
            if healthy is not None and not healthy[j]:
                continue
            if exclude is not None and j in exclude:
                continue
            c = inflight[j]
            if best < 0 or c < best_c or (c == best_c and weights[j] > best_w):
                best = j
                best_c = c
                best_w = weights[j]
        if best >= 0:
            self._next = best + 1 if best + 1 < n else 0
        return best

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
