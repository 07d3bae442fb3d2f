"""Consistent hashing over the ketama ring: a request key always lands on the same endpoint.

Theory of operation: the ring (``dispa._rust.Ring``, or the pure twin
:class:`dispa.balancer._ring_py.Ring` when the extension is not built or
``DISPA_NO_EXTENSIONS=1``) is built once from ``(name, weight)`` pairs, where ``name`` is the
endpoint's ``host:port`` exactly as nginx's ``server`` directive would spell it; then the
placement, and so the key → endpoint mapping, is the same as nginx's
``hash $key consistent`` for the same upstream block.

``pick(healthy, key)`` returns the key's owner; if the owner is unhealthy (or excluded) it
walks on clockwise (``Ring.lookup_n``) to the next usable endpoint, which is where nginx
sends the request too. Only keys owned by an unhealthy endpoint move. ``key=None`` is
hashed as ``b""``, as nginx hashes an empty key (every such request goes to one endpoint;
choose a key that is always present).
"""

from __future__ import annotations

from collections.abc import Sequence

from dispa import _native
from dispa.balancer import _ring_py

__all__ = ["ConsistentHash", "ring_class"]


def ring_class() -> type:
    """The ring implementation in use: ``dispa._rust.Ring`` or the pure twin."""
    return _native.rust.Ring if _native.rust is not None else _ring_py.Ring


class ConsistentHash:
    """Ketama consistent hashing (see :class:`~dispa.balancer.base.Selector`).

    ``nodes`` are ``(name, weight)`` pairs in endpoint order. Raises ``ValueError`` for an
    empty list or a weight below 1. ``ring`` forces an implementation (tests, benchmarks).
    """

    __slots__ = ("_ring", "_n")

    def __init__(self, nodes: Sequence[tuple[str, int]], *, points_per_weight: int = 160,
                 ring: type | None = None) -> None:
        cls = ring if ring is not None else ring_class()
        self._ring = cls(list(nodes), points_per_weight=points_per_weight)
        self._n = len(self._ring)

    @property
    def ring(self):
        """The underlying immutable ring."""
        return self._ring

    def pick(self, healthy: list[bool] | None, key: bytes | None = None) -> int:
        k = b"" if key is None else key
        owner = self._ring.lookup(k)
        if healthy is None or healthy[owner]:
            return owner
        for i in self._ring.lookup_n(k, self._n):
            if healthy[i]:
                return i
        return -1

    def pick_excluding(self, healthy: list[bool] | None, exclude: set[int], key: bytes | None = None) -> int:
        if not exclude:
            return self.pick(healthy, key)
        k = b"" if key is None else key
        for i in self._ring.lookup_n(k, self._n):
            if i not in exclude and (healthy is None or healthy[i]):
                return i
        return -1

    def acquire(self, i: int) -> None:
        pass

    def release(self, i: int) -> None:
        pass
