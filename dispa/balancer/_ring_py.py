"""Pure-Python ketama ring: the reference twin of ``dispa._rust.Ring``.

Theory of operation
-------------------
The ring is built once from ``(name, weight)`` nodes and never changes; a new endpoint set
means a new ``Ring``. Results are indexes into the node sequence it was built from.

Point placement is nginx's ``hash $key consistent`` (``ngx_http_upstream_init_chash`` in
``ngx_http_upstream_hash_module.c``):

1. The node name (``"127.0.0.1:8081"``, the ``server`` directive's text) is split into host
   and port: a trailing ``:<digits>`` is the port; ``unix:`` names hash the path with no
   port, and names with no trailing ``:<digits>`` (``"backend"``, ``"[::1]"``) have no port.
2. Point ``j`` of a node is ``crc32(host + b"\\0" + port + le32(point[j-1]))``, with
   ``point[-1] = 0``, for ``points_per_weight * weight`` points (nginx: 160 per weight).
3. Points are sorted by hash; of equal hashes only the first (lowest node index) is kept.

``lookup(key)`` takes ``crc32(key)`` and returns the owner of the first point whose hash is
``>=`` it, wrapping to the first point. ``lookup_n`` walks on clockwise collecting distinct
nodes: the failover order, as nginx does with ``hp->hash++``.

``lookup_bounded(key, loads, factor)`` is consistent hashing with bounded loads (Mirrokni et
al.; HAProxy's ``hash-balance-factor``): the first node along the same walk whose in-flight
load is below ``ceil(factor * (sum(loads) + 1) * weight / sum(weights))``
(:func:`bounded_capacities`, shared with the Maglev twin).

WARNING: keep in sync with ``rust/src/ring.rs`` and ``rust/src/bounded.rs``.
``tests/unit/balancer/test_ring.py`` and ``test_ring_properties.py`` run every test against
both and compare them on random inputs.
"""

from __future__ import annotations

import math
import zlib
from bisect import bisect_left
from collections.abc import Sequence

__all__ = ["DEFAULT_POINTS_PER_WEIGHT", "MAX_FACTOR", "MAX_POINTS", "MIN_FACTOR", "Ring", "bounded_capacities"]

#: nginx's number of virtual nodes per unit of weight.
DEFAULT_POINTS_PER_WEIGHT = 160
#: Same bound as the Rust ring: a mistyped weight cannot exhaust memory.
MAX_POINTS = 1 << 25


#: Bounded loads: the balance factor must lie in ``[MIN_FACTOR, MAX_FACTOR]`` (below 1 the
#: capacities could not hold the load; the cap keeps the arithmetic finite). Same as Rust.
MIN_FACTOR = 1.0
MAX_FACTOR = 1.0e6

_U64 = 1 << 64


def _split_host_port(name: bytes) -> tuple[bytes, bytes]:
    """nginx's split: ``unix:`` → (path, no port); a trailing ``:<digits>`` is the port."""
    if name[:5].lower() == b"unix:":
        return name[5:], b""
    end = len(name)
    i = end
    while i > 0 and 48 <= name[i - 1] <= 57:
        i -= 1
    if i > 0 and name[i - 1] == 58:  # b":"
        return name[: i - 1], name[i:]
    return name, b""


def bounded_capacities(loads: Sequence[int], weights: Sequence[int], factor: float) -> list[int]:
    """Per-node capacities ``ceil(factor * (sum(loads) + 1) * weight / sum(weights))``.

    The float operations run in the same order as ``rust/src/bounded.rs``, so both twins get
    identical capacities. Raises ``TypeError`` for a non-sequence or non-int load or a
    non-number factor, ``OverflowError`` for a load outside ``[0, 2**64)`` (as the binding's
    ``u64`` conversion does), ``ValueError`` when ``len(loads) != len(weights)`` or the factor
    is NaN or outside ``[MIN_FACTOR, MAX_FACTOR]``.
    """
    if isinstance(loads, (str, bytes, bytearray)):
        raise TypeError("loads must be a sequence of int")
    loads = list(loads)
    for x in loads:
        if not isinstance(x, int):
            raise TypeError(f"loads must hold int, not {type(x).__name__}")
        if x < 0 or x >= _U64:
            raise OverflowError("a load must be in [0, 2**64)")
    if isinstance(factor, (str, bytes)) or not isinstance(factor, (int, float)):
        raise TypeError("factor must be a float")
    factor = float(factor)
    if len(loads) != len(weights):
        raise ValueError(f"loads has {len(loads)} entries; expected one per node ({len(weights)})")
    if not (MIN_FACTOR <= factor <= MAX_FACTOR):
        raise ValueError(f"balance factor {factor} is out of range; it must be between 1 and 1000000")
    scaled = factor * float(sum(loads) + 1)
    total_weight = float(sum(weights))
    return [math.ceil(scaled * w / total_weight) for w in weights]


class Ring:
    """An immutable ketama ring over ``len(self)`` nodes (same API as ``dispa._rust.Ring``).

    ``Ring(nodes, *, points_per_weight=160)`` where ``nodes`` is a sequence of
    ``(name: str, weight: int)``. Raises ``ValueError`` for no nodes, a weight below 1,
    ``points_per_weight`` below 1, or more than ``MAX_POINTS`` points; ``TypeError`` for
    malformed nodes.
    """

    __slots__ = ("_hashes", "_owners", "_n", "_npoints", "_weights")

    def __init__(self, nodes: Sequence[tuple[str, int]], *, points_per_weight: int = DEFAULT_POINTS_PER_WEIGHT) -> None:
        if isinstance(nodes, (str, bytes)):
            raise TypeError("nodes must be a sequence of (name, weight) tuples")
        nodes = list(nodes)
        if not nodes:
            raise ValueError("a ring needs at least one node")
        if not isinstance(points_per_weight, int) or isinstance(points_per_weight, bool):
            raise TypeError("points_per_weight must be an int")
        if points_per_weight < 1:
            raise ValueError("points_per_weight must be >= 1")
        total = 0
        parsed: list[tuple[bytes, int]] = []
        for i, node in enumerate(nodes):
            name, weight = node
            if not isinstance(name, str):
                raise TypeError(f"node {i}: name must be str")
            if not isinstance(weight, int) or isinstance(weight, bool):
                raise TypeError(f"node {i}: weight must be int")
            if weight < 1:
                raise ValueError(f"node {i} has weight {weight}; weights must be >= 1")
            total += weight * points_per_weight
            parsed.append((name.encode(), weight))
        if total > MAX_POINTS:
            raise ValueError(f"ring would have {total} points, more than the limit of {MAX_POINTS}")

        crc32 = zlib.crc32
        points: list[tuple[int, int]] = []
        append = points.append
        for idx, (name, weight) in enumerate(parsed):
            host, port = _split_host_port(name)
            base = crc32(host + b"\0" + port)
            prev = 0
            for _ in range(weight * points_per_weight):
                prev = crc32(prev.to_bytes(4, "little"), base)
                append((prev, idx))
        points.sort()
        hashes: list[int] = []
        owners: list[int] = []
        last = -1
        for h, idx in points:
            if h != last:
                hashes.append(h)
                owners.append(idx)
                last = h
        self._hashes = hashes
        self._owners = owners
        self._n = len(parsed)
        self._npoints = len(hashes)
        self._weights = [w for _, w in parsed]

    def __len__(self) -> int:
        return self._n

    def __repr__(self) -> str:
        return f"<Ring nodes={self._n} points={self._npoints} (pure)>"

    def lookup(self, key: bytes) -> int:
        """Index of the node owning ``key``."""
        i = bisect_left(self._hashes, zlib.crc32(key))
        return self._owners[i if i < self._npoints else 0]

    def lookup_n(self, key: bytes, n: int) -> list[int]:
        """Up to ``n`` distinct node indexes in ring-walk (failover) order from ``key``'s owner."""
        if n < 0:
            raise OverflowError("n must be >= 0")
        want = min(n, self._n)
        out: list[int] = []
        if want == 0:
            return out
        owners = self._owners
        npoints = self._npoints
        pos = bisect_left(self._hashes, zlib.crc32(key))
        seen: set[int] = set()
        for step in range(npoints):
            node = owners[(pos + step) % npoints]
            if node not in seen:
                seen.add(node)
                out.append(node)
                if len(out) == want:
                    break
        return out

    def lookup_many(self, keys: list[bytes]) -> list[int]:
        """``[self.lookup(k) for k in keys]``."""
        hashes = self._hashes
        owners = self._owners
        npoints = self._npoints
        crc32 = zlib.crc32
        out = []
        for k in keys:
            i = bisect_left(hashes, crc32(k))
            out.append(owners[i if i < npoints else 0])
        return out

    def lookup_bounded(self, key: bytes, loads: Sequence[int], factor: float) -> int:
        """The first node along ``key``'s walk whose load is below its bounded capacity.

        See :func:`bounded_capacities` for the capacity and the errors. If no node has room
        (only possible through float rounding), the plain owner.
        """
        caps = bounded_capacities(loads, self._weights, factor)
        loads = list(loads)
        owners = self._owners
        npoints = self._npoints
        start = bisect_left(self._hashes, zlib.crc32(key))
        if start == npoints:
            start = 0
        for step in range(npoints):
            node = owners[(start + step) % npoints]
            if loads[node] < caps[node]:
                return node
        return owners[start]
