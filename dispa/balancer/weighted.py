"""Smooth weighted round robin, as nginx does it (``type = "weighted"``).

Theory of operation (nginx ``ngx_http_upstream_get_peer`` in ``ngx_http_upstream_round_robin.c``):
on every pick, each usable endpoint's ``current`` grows by its weight; the endpoint with the
largest ``current`` wins (the first one on ties) and its ``current`` drops by the sum of
the weights that took part. Over any window of ``sum(weights)`` picks each endpoint is chosen
exactly ``weight`` times, and the picks are interleaved rather than bunched: weights
``{a: 5, b: 1, c: 1}`` give ``a a b a c a a``.

Unhealthy endpoints take no part in a pick (their ``current`` is left alone, as nginx does
for a peer that is down), so the healthy ones keep their relative shares.

Not modelled: nginx's ``effective_weight`` that drops after failures and climbs back.
Passive failures reach us as a health mask instead.
"""

from __future__ import annotations

from collections.abc import Sequence

from dispa.balancer.base import check_weights

__all__ = ["SmoothWeighted"]


class SmoothWeighted:
    """nginx's smooth weighted round robin (see :class:`~dispa.balancer.base.Selector`)."""

    __slots__ = ("_weights", "_current", "_total", "_range")

    def __init__(self, weights: Sequence[int]) -> None:
        self._weights = check_weights(weights)
        self._current = [0] * len(self._weights)
        self._total = sum(self._weights)
        self._range = range(len(self._weights))

    def pick(self, healthy: list[bool] | None, key: bytes | None = None) -> int:
        weights = self._weights
        current = self._current
        best = -1
        best_cw = 0
        if healthy is None:
            for i in self._range:
                cw = current[i] + weights[i]
                current[i] = cw
                if best < 0 or cw > best_cw:
                    best = i
                    best_cw = cw
            current[best] = best_cw - self._total
            return best
        return self._pick_masked(healthy, None)

    def pick_excluding(self, healthy: list[bool] | None, exclude: set[int], key: bytes | None = None) -> int:
        if not exclude:
            return self.pick(healthy, key)
        return self._pick_masked(healthy, exclude)

    def _pick_masked(self, healthy: list[bool] | None, exclude: set[int] | None) -> int:
        # smooth WRR over the usable endpoints only; skipped ones keep their current weight
        weights = self._weights
        current = self._current
        best = -1
        best_cw = 0
        total = 0
        for i in self._range:
            if (healthy is not None and not healthy[i]) or (exclude is not None and i in exclude):
                continue
            w = weights[i]
            cw = current[i] + w
            current[i] = cw
            total += w
            if best < 0 or cw > best_cw:
                best = i
                best_cw = cw
        if best >= 0:
            current[best] = best_cw - total
        return best

    def acquire(self, i: int) -> None:
        pass

    def release(self, i: int) -> None:
        pass
