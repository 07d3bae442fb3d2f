"""The selector contract: how the core picks an endpoint of a cluster.

Theory of operation
-------------------
A selector is built once per snapshot for one cluster, from the endpoints' weights, and
answers with an **index** into that cluster's endpoint tuple. It never sees addresses,
pools or health state of its own: the worker passes a health mask on each call.

Rules:

1. ``healthy is None`` means every endpoint is usable. This is the common case and the fast
   path: no allocation, no scan beyond what the algorithm itself needs.
2. Otherwise ``healthy[i]`` is False for an endpoint that must not be picked. Skipping
   endpoints must not disturb the others' relative shares.
3. ``-1`` means nothing is available (every endpoint unhealthy or excluded). The caller
   turns that into a 502/503; selectors never raise on the request path.
4. ``pick_excluding`` is for retries: it never returns an index in ``exclude``.
5. ``acquire(i)``/``release(i)`` bracket every request sent to endpoint ``i``; only
   least-connections uses them, the others accept and ignore them.
6. Every ``pick`` is O(n) at most in the number of endpoints. Selectors are per worker and
   single-threaded (one event loop), so they keep plain mutable state without locks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

__all__ = ["Selector", "check_weights"]


@runtime_checkable
class Selector(Protocol):
    """What the proxy core calls to choose an upstream endpoint."""

    def pick(self, healthy: list[bool] | None, key: bytes | None = None) -> int:
        """Index of the endpoint to use, skipping ``healthy[i] is False``; ``-1`` if none.

        ``key`` is the request's hash key; only key-aware selectors (consistent hashing) use it.
        """
        ...

    def pick_excluding(self, healthy: list[bool] | None, exclude: set[int], key: bytes | None = None) -> int:
        """Like :meth:`pick`, but never an index in ``exclude`` (retries); ``-1`` if none."""
        ...

    def acquire(self, i: int) -> None:
        """A request started on endpoint ``i``."""
        ...

    def release(self, i: int) -> None:
        """A request on endpoint ``i`` ended (successfully or not)."""
        ...


def check_weights(weights: Sequence[int]) -> list[int]:
    """Validate endpoint weights and return them as a list.

    Raises ``ValueError`` for an empty sequence or a weight below 1, ``TypeError`` for a
    weight that is not an ``int``. (Config already enforces ``weight >= 1``; this guards
    selectors built by hand or by plugins.)
    """
    out = list(weights)
    if not out:
        raise ValueError("a selector needs at least one endpoint")
    for i, w in enumerate(out):
        if not isinstance(w, int) or isinstance(w, bool):
            raise TypeError(f"weight {i} must be an int, not {type(w).__name__}")
        if w < 1:
            raise ValueError(f"weight {i} is {w}; weights must be >= 1")
    return out
