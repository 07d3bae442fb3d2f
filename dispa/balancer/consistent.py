"""Consistent hashing: a request key always lands on the same endpoint.

Theory of operation
-------------------
The selector owns one immutable hashing structure, built once from ``(name, weight)`` pairs
where ``name`` is the endpoint's ``host:port`` exactly as nginx's ``server`` directive would
spell it:

* ``mode="nginx"`` (the default): the ketama ring (``dispa._rust.Ring`` or the pure twin
  :class:`dispa.balancer._ring_py.Ring`). With the default ``points_per_weight=160`` the
  placement, and so the key → endpoint mapping, is the same as nginx's
  ``hash $key consistent`` for the same upstream block. More points per weight give a more
  even load (see ``docs/consistent-hashing.md``) but no longer match nginx.
* ``mode="maglev"``: a Maglev lookup table (``dispa._rust.Maglev`` or
  :class:`dispa.balancer._maglev_py.Maglev`) of ``table_size`` slots: balanced to a slot,
  one table load per lookup, slightly more keys move when the endpoint set changes.

The compiled structure is used unless the extension is missing or ``DISPA_NO_EXTENSIONS=1``.

Rules:

1. ``pick(healthy, key)`` returns the key's owner; if the owner is unhealthy (or excluded)
   it walks on (``lookup_n``: clockwise on the ring, forward through the Maglev table) to
   the next usable endpoint, which on the ring is where nginx sends the request too. Only
   keys owned by an unusable endpoint move.
2. ``key=None`` is hashed as ``b""``. (nginx instead falls back to round robin for an empty
   key; choose a key that is always present, see :mod:`dispa.balancer.hash_key`.)
3. ``bounded_factor=c`` turns on bounded loads (Mirrokni et al.; HAProxy's
   ``hash-balance-factor``): the selector counts in-flight requests per endpoint through
   ``acquire``/``release`` and sends a key to the first endpoint of its walk whose load is
   below ``ceil(c * (in_flight + 1) * weight / total_weight)``. When every endpoint is
   healthy this is one compiled call (``lookup_bounded``); otherwise the capacity is worked
   out in Python over the usable endpoints only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from dispa import _native
from dispa.balancer import _maglev_py, _ring_py

__all__ = ["MODES", "ConsistentHash", "maglev_class", "ring_class"]

#: The hashing structures ``ConsistentHash(mode=...)`` accepts.
MODES = ("nginx", "maglev")


def ring_class() -> type:
    """The ring implementation in use: ``dispa._rust.Ring`` or the pure twin."""
    return _native.rust.Ring if _native.rust is not None else _ring_py.Ring


def maglev_class() -> type:
    """The Maglev implementation in use: ``dispa._rust.Maglev`` or the pure twin."""
    rust = _native.rust
    if rust is not None and hasattr(rust, "Maglev"):
        return rust.Maglev
    return _maglev_py.Maglev


class ConsistentHash:
    """Consistent hashing (see :class:`~dispa.balancer.base.Selector`).

    ``nodes`` are ``(name, weight)`` pairs in endpoint order. ``mode`` is ``"nginx"`` (ketama
    ring, ``points_per_weight`` points per unit of weight) or ``"maglev"`` (``table_size``
    slots, a prime). ``bounded_factor`` (``None`` or a float in ``[1, 1e6]``) turns on bounded
    loads. ``ring`` forces an implementation class (tests, benchmarks).

    Raises ``ValueError`` for an empty list, a weight below 1, an unknown ``mode``, a bad
    ``points_per_weight``/``table_size`` or an out-of-range ``bounded_factor``; ``TypeError``
    for malformed nodes.
    """

    __slots__ = ("_ring", "_n", "_factor", "_loads", "_weights", "_mode")

    def __init__(self, nodes: Sequence[tuple[str, int]], *, mode: str = "nginx",
                 points_per_weight: int = _ring_py.DEFAULT_POINTS_PER_WEIGHT,
                 table_size: int = _maglev_py.DEFAULT_TABLE_SIZE,
                 bounded_factor: float | None = None, ring: type | None = None) -> None:
        nodes = list(nodes)
        if mode == "nginx":
            cls = ring if ring is not None else ring_class()
            self._ring = cls(nodes, points_per_weight=points_per_weight)
        elif mode == "maglev":
            cls = ring if ring is not None else maglev_class()
            self._ring = cls(nodes, table_size=table_size)
        else:
            raise ValueError(f"unknown consistent-hash mode {mode!r}; expected one of {MODES}")
        if bounded_factor is not None:
            factor = float(bounded_factor)
            if not (_ring_py.MIN_FACTOR <= factor <= _ring_py.MAX_FACTOR):
                raise ValueError(f"bounded_factor {bounded_factor} is out of range; it must be between 1 and 1000000")
            bounded_factor = factor
        self._mode = mode
        self._n = len(self._ring)
        self._factor = bounded_factor
        self._loads = [0] * self._n
        self._weights = [int(w) for _, w in nodes]

    @property
    def ring(self):
        """The underlying immutable ring or Maglev table."""
        return self._ring

    @property
    def mode(self) -> str:
        """``"nginx"`` or ``"maglev"``."""
        return self._mode

    @property
    def bounded_factor(self) -> float | None:
        """The bounded-load factor, or ``None`` when loads are not bounded."""
        return self._factor

    def loads(self) -> list[int]:
        """A copy of the in-flight request count per endpoint (counted only when bounded)."""
        return list(self._loads)

    def pick(self, healthy: list[bool] | None, key: bytes | None = None) -> int:
        k = b"" if key is None else key
        if self._factor is not None:
            if healthy is None:
                return self._ring.lookup_bounded(k, self._loads, self._factor)
            return self._pick_bounded(healthy, (), k)
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
        if self._factor is not None:
            return self._pick_bounded(healthy, exclude, k)
        for i in self._ring.lookup_n(k, self._n):
            if i not in exclude and (healthy is None or healthy[i]):
                return i
        return -1

    def _pick_bounded(self, healthy: list[bool] | None, exclude, key: bytes) -> int:
        """Bounded loads over the usable endpoints only (the degraded path, in Python)."""
        usable = [i for i in range(self._n)
                  if i not in exclude and (healthy is None or healthy[i])]
        if not usable:
            return -1
        loads = self._loads
        weights = self._weights
        # Same arithmetic, in the same order, as rust/src/bounded.rs.
        scaled = self._factor * float(sum(loads[i] for i in usable) + 1)
        total_weight = float(sum(weights[i] for i in usable))
        ok = set(usable)
        first = -1
        for i in self._ring.lookup_n(key, self._n):
            if i in ok:
                if first < 0:
                    first = i
                if loads[i] < math.ceil(scaled * weights[i] / total_weight):
                    return i
        return first

    def acquire(self, i: int) -> None:
        if self._factor is not None:
            self._loads[i] += 1

    def release(self, i: int) -> None:
        if self._factor is not None and self._loads[i] > 0:
            self._loads[i] -= 1
