"""Weighted random choice (``type = "random"``); with equal weights it is uniform.

All healthy: one uniform draw in ``[0, sum(weights))`` and a binary search over the
cumulative weights (O(log n), no allocation). With some endpoints unhealthy or excluded the
draw is over the usable endpoints' weights and a linear walk finds the owner (O(n)), so
the usable endpoints keep their relative shares.

Named ``random_choice`` so that it does not shadow the standard library's ``random``.
"""

from __future__ import annotations

import random as _random
from bisect import bisect_right
from collections.abc import Sequence

from dispa.balancer.base import check_weights

__all__ = ["WeightedRandom"]


class WeightedRandom:
    """Weighted random pick (see :class:`~dispa.balancer.base.Selector`).

    ``rng`` is any object with a ``random()`` method returning a float in ``[0, 1)``
    (default: the module-level generator); pass ``random.Random(seed)`` for reproducible tests.
    """

    __slots__ = ("_weights", "_cumulative", "_total", "_random", "_range", "_n")

    def __init__(self, weights: Sequence[int], *, rng: _random.Random | None = None) -> None:
        self._weights = check_weights(weights)
        cumulative = []
        total = 0
        for w in self._weights:
            total += w
            cumulative.append(total)
        self._cumulative = cumulative
        self._total = total
        self._random = (rng or _random).random
        self._n = len(self._weights)
        self._range = range(self._n)

    def pick(self, healthy: list[bool] | None, key: bytes | None = None) -> int:
        if healthy is None:
            i = bisect_right(self._cumulative, self._random() * self._total)
            return i if i < self._n else self._n - 1  # float rounding at the top edge
        return self._pick_masked(healthy, None)

    def pick_excluding(self, healthy: list[bool] | None, exclude: set[int], key: bytes | None = None) -> int:
        if not exclude:
            return self.pick(healthy, key)
        return self._pick_masked(healthy, exclude)

    def _pick_masked(self, healthy: list[bool] | None, exclude: set[int] | None) -> int:
        weights = self._weights
        total = 0
        last = -1
        for i in self._range:
            if (healthy is None or healthy[i]) and (exclude is None or i not in exclude):
                total += weights[i]
                last = i
        if last < 0:
            return -1
        r = self._random() * total
        for i in self._range:
            if (healthy is None or healthy[i]) and (exclude is None or i not in exclude):
                r -= weights[i]
                if r < 0:
                    return i
        return last  # float rounding at the top edge

    def acquire(self, i: int) -> None:
        pass

    def release(self, i: int) -> None:
        pass
