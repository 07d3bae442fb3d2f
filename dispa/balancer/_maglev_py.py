"""Pure-Python Maglev table: the reference twin of ``dispa._rust.Maglev``.

Theory of operation
-------------------
Maglev hashing (Eisenbud et al., NSDI 2016, §3.4). A table of ``table_size`` slots (a prime,
65537 by default) is filled once from ``(name, weight)`` nodes and never changes; a new
endpoint set means a new ``Maglev``. ``lookup(key)`` is ``table[crc32(key) % table_size]``.

Filling:

1. Node ``i`` prefers the slots ``(offset + j * skip) % M`` for ``j = 0, 1, ...`` with
   ``offset = h1 % M`` and ``skip = h2 % (M - 1) + 1``, where
   ``h1 = fmix64(fnv1a64(name))`` and ``h2 = fmix64(fnv1a64(name) ^ 0x9E3779B97F4A7C15)``
   (FNV-1a 64 and the MurmurHash3 64-bit finaliser). ``M`` prime makes each list a
   permutation of all slots.
2. Nodes take turns in input order, each claiming the next still-empty slot of its list.
   Weights are first divided by their gcd; a round is ``max(w)`` passes and pass ``t``
   gives a turn to every node whose weight is above ``t``, so a node of weight ``w`` takes
   ``w`` turns per round and every node gets a slot in the first pass. Filling stops when
   every slot is taken.

``lookup_n`` walks the table forward from the key's slot collecting distinct owners (the
failover order); ``lookup_bounded`` walks the same way and returns the first node below its
bounded-load capacity (:func:`dispa.balancer._ring_py.bounded_capacities`).

WARNING: keep in sync with ``rust/src/maglev.rs``. ``tests/unit/balancer/test_ring_maglev.py``
runs every test against both and ``test_ring_properties.py`` compares them on random inputs.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from math import gcd

from dispa.balancer._ring_py import bounded_capacities

__all__ = ["DEFAULT_TABLE_SIZE", "MAX_TABLE_SIZE", "Maglev", "is_prime"]

#: The paper's and Envoy's default: prime, enough for ~650 nodes at ``M >= 100 * N``.
DEFAULT_TABLE_SIZE = 65537
#: Same bound as the Rust table (64 MiB of u32 slots there); Envoy caps near 5,000,011.
MAX_TABLE_SIZE = 1 << 24

_MASK64 = (1 << 64) - 1
_FNV_OFFSET = 0xCBF29CE484222325
_FNV_PRIME = 0x100000001B3
_GOLDEN = 0x9E3779B97F4A7C15


def _fnv1a64(data: bytes) -> int:
    h = _FNV_OFFSET
    for b in data:
        h = ((h ^ b) * _FNV_PRIME) & _MASK64
    return h


def _fmix64(k: int) -> int:
    k ^= k >> 33
    k = (k * 0xFF51AFD7ED558CCD) & _MASK64
    k ^= k >> 33
    k = (k * 0xC4CEB9FE1A85EC53) & _MASK64
    k ^= k >> 33
    return k


def _offset_skip(name: bytes, m: int) -> tuple[int, int]:
    h = _fnv1a64(name)
    return _fmix64(h) % m, _fmix64(h ^ _GOLDEN) % (m - 1) + 1


def is_prime(n: int) -> bool:
    """Trial-division primality (table sizes are at most 2**24)."""
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    d = 3
    while d * d <= n:
        if n % d == 0:
            return False
        d += 2
    return True


class Maglev:
    """An immutable Maglev table (same API as ``dispa._rust.Maglev``).

    ``Maglev(nodes, *, table_size=65537)`` where ``nodes`` is a sequence of
    ``(name: str, weight: int)``. Raises ``ValueError`` for no nodes, a weight below 1, a
    ``table_size`` that is not a prime, smaller than the number of nodes or above
    ``MAX_TABLE_SIZE``; ``TypeError`` for malformed nodes.
    """

    __slots__ = ("_table", "_m", "_n", "_weights")

    def __init__(self, nodes: Sequence[tuple[str, int]], *, table_size: int = DEFAULT_TABLE_SIZE) -> None:
        if isinstance(nodes, (str, bytes)):
            raise TypeError("nodes must be a sequence of (name, weight) tuples")
        if not isinstance(table_size, int) or isinstance(table_size, bool):
            raise TypeError("table_size must be an int")
        parsed: list[tuple[bytes, int]] = []
        for i, node in enumerate(list(nodes)):
            name, weight = node
            if not isinstance(name, str):
                raise TypeError(f"node {i}: name must be str")
            if not isinstance(weight, int) or isinstance(weight, bool):
                raise TypeError(f"node {i}: weight must be int")
            if weight < 1:
                raise ValueError(f"node {i} has weight {weight}; weights must be >= 1")
            if weight > 0xFFFFFFFF:
                raise ValueError(f"node {i} has weight {weight}; the limit is {0xFFFFFFFF}")
            parsed.append((name.encode(), weight))
        if not parsed:
            raise ValueError("a Maglev table needs at least one node")
        if table_size > MAX_TABLE_SIZE:
            raise ValueError(f"table_size {table_size} exceeds the limit of {MAX_TABLE_SIZE}")
        if not is_prime(table_size):
            raise ValueError(f"table_size {table_size} is not a prime")
        if table_size < len(parsed):
            raise ValueError(f"table_size {table_size} is smaller than the number of nodes ({len(parsed)})")

        m = table_size
        g = 0
        for _, w in parsed:
            g = gcd(g, w)
        turns = [w // g for _, w in parsed]
        # pos[i] is node i's current slot, offset + next[i] * skip (mod m), kept incrementally.
        pos: list[int] = []
        skips: list[int] = []
        for name, _ in parsed:
            offset, skip = _offset_skip(name, m)
            pos.append(offset)
            skips.append(skip)
        table = [-1] * m
        filled = 0
        n = len(parsed)
        while filled < m:
            # One round: pass t gives a turn to every node with more than t turns, in input
            # order, so every node claims a slot in the first pass (m >= n).
            active = list(range(n))
            t = 0
            while active and filled < m:
                for i in active:
                    skip = skips[i]
                    p = pos[i]
                    while table[p] >= 0:
                        p += skip
                        if p >= m:
                            p -= m
                    table[p] = i
                    filled += 1
                    p += skip
                    if p >= m:
                        p -= m
                    pos[i] = p
                    if filled == m:
                        break
                t += 1
                active = [i for i in active if turns[i] > t]
        self._table = table
        self._m = m
        self._n = n
        self._weights = [w for _, w in parsed]

    def __len__(self) -> int:
        return self._n

    def __repr__(self) -> str:
        return f"<Maglev nodes={self._n} table_size={self._m} (pure)>"

    @property
    def table_size(self) -> int:
        """Number of slots (the prime ``table_size``)."""
        return self._m

    def slot_counts(self) -> list[int]:
        """Number of slots each node owns, in input order."""
        counts = [0] * self._n
        for node in self._table:
            counts[node] += 1
        return counts

    def lookup(self, key: bytes) -> int:
        """Index of the node owning ``key``."""
        return self._table[zlib.crc32(key) % self._m]

    def lookup_n(self, key: bytes, n: int) -> list[int]:
        """Up to ``n`` distinct node indexes in table-walk (failover) order from ``key``'s slot."""
        if n < 0:
            raise OverflowError("n must be >= 0")
        want = min(n, self._n)
        out: list[int] = []
        if want == 0:
            return out
        table = self._table
        m = self._m
        slot = zlib.crc32(key) % m
        seen: set[int] = set()
        for step in range(m):
            node = table[(slot + step) % m]
            if node not in seen:
                seen.add(node)
                out.append(node)
                if len(out) == want:
                    break
        return out

    def lookup_many(self, keys: list[bytes]) -> list[int]:
        """``[self.lookup(k) for k in keys]``."""
        table = self._table
        m = self._m
        crc32 = zlib.crc32
        return [table[crc32(k) % m] for k in keys]

    def lookup_bounded(self, key: bytes, loads: Sequence[int], factor: float) -> int:
        """The first node along ``key``'s table walk whose load is below its bounded capacity.

        Errors as :func:`dispa.balancer._ring_py.bounded_capacities`.
        """
        caps = bounded_capacities(loads, self._weights, factor)
        loads = list(loads)
        table = self._table
        m = self._m
        slot = zlib.crc32(key) % m
        for step in range(m):
            node = table[(slot + step) % m]
            if loads[node] < caps[node]:
                return node
        return table[slot]
