"""Upstream endpoint selection: the algorithms behind ``[targets.load_balancing] type``.

``build_selector(kind, weights)`` returns a :class:`~dispa.balancer.base.Selector` for one
cluster; ``SELECTORS`` maps each config value to its class. Consistent hashing needs the
endpoints' names as well as their weights, so it is built directly:
``ConsistentHash([(name, weight), ...])``.
"""

from __future__ import annotations

from collections.abc import Sequence

from dispa.balancer.base import Selector, check_weights
from dispa.balancer.consistent import ConsistentHash
from dispa.balancer.least_conn import LeastConnections
from dispa.balancer.random_choice import WeightedRandom
from dispa.balancer.round_robin import RoundRobin
from dispa.balancer.weighted import SmoothWeighted

__all__ = [
    "SELECTORS",
    "ConsistentHash",
    "LeastConnections",
    "RoundRobin",
    "Selector",
    "SmoothWeighted",
    "WeightedRandom",
    "build_selector",
    "check_weights",
]

#: ``[targets.load_balancing] type`` → selector class taking ``weights``.
SELECTORS: dict[str, type] = {
    "roundrobin": RoundRobin,
    "weighted": SmoothWeighted,
    "leastconnections": LeastConnections,
    "random": WeightedRandom,
}


def build_selector(kind: str, weights: Sequence[int]) -> Selector:
    """Build the selector named ``kind`` for endpoints with these ``weights``.

    Raises ``ValueError`` for an unknown ``kind``, no endpoints, or a weight below 1.
    """
    try:
        cls = SELECTORS[kind]
    except KeyError:
        raise ValueError(f"unknown load balancing type {kind!r}; expected one of {sorted(SELECTORS)}") from None
    return cls(weights)
