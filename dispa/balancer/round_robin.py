"""Round robin: each usable endpoint in turn, weights ignored (``type = "roundrobin"``).

A single cursor walks the endpoint indexes. An unhealthy endpoint is skipped and the cursor
moves past it, so the healthy ones keep an even rotation among themselves.
"""

from __future__ import annotations

from collections.abc import Sequence

from dispa.balancer.base import check_weights

__all__ = ["RoundRobin"]


class RoundRobin:
    """Plain rotation over ``len(weights)`` endpoints (see :class:`~dispa.balancer.base.Selector`)."""

    __slots__ = ("_n", "_next")

    def __init__(self, weights: Sequence[int]) -> None:
        self._n = len(check_weights(weights))
        self._next = 0

    def pick(self, healthy: list[bool] | None, key: bytes | None = None) -> int:
        n = self._n
        i = self._next
        if healthy is None:
            self._next = i + 1 if i + 1 < n else 0
            return i
        for _ in range(n):
            j = i
            i = i + 1 if i + 1 < n else 0
            if healthy[j]:
                self._next = i
                return j
        return -1

    def pick_excluding(self, healthy: list[bool] | None, exclude: set[int], key: bytes | None = None) -> int:
        if not exclude:
            return self.pick(healthy, key)
        n = self._n
        i = self._next
        for _ in range(n):
            j = i
            i = i + 1 if i + 1 < n else 0
            if j not in exclude and (healthy is None or healthy[j]):
                self._next = i
                return j
        return -1

    def acquire(self, i: int) -> None:
        pass

    def release(self, i: int) -> None:
        pass
