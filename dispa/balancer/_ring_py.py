"""Pure-Python ketama ring: the reference twin of ``dispa._rust.Ring``.

Theory of operation
-------------------
The ring is built once from ``(name, weight)`` nodes and never changes; a new endpoint set
means a new ``Ring``. Results are indexes into the node sequence it was built from.

Point placement is nginx's ``hash $key consistent`` (``ngx_http_upstream_init_chash`` in
``ngx_http_upstream_hash_module.c``):

1. The node name (``"127.0.0.1:8081"``, the ``server`` directive's text) is split at its
   last ``:`` into host and port; ``unix:`` names and names without ``:`` have no port.
2. Point ``j`` of a node is ``crc32(host + b"\\0" + port + le32(point[j-1]))``, with
   ``point[-1] = 0``, for ``points_per_weight * weight`` points (nginx: 160 per weight).
3. Points are sorted by hash; of equal hashes only the first (lowest node index) is kept.

``lookup(key)`` takes ``crc32(key)`` and returns the owner of the first point whose hash is
``>=`` it, wrapping to the first point. ``lookup_n`` walks on clockwise collecting distinct
nodes: the failover order, as nginx does with ``hp->hash++``.

WARNING: keep in sync with ``rust/src/ring.rs``. ``tests/unit/balancer/test_ring.py`` runs
every test against both and compares them on random inputs.
"""

from __future__ import annotations

import zlib
from bisect import bisect_left
from collections.abc import Sequence

__all__ = ["DEFAULT_POINTS_PER_WEIGHT", "MAX_POINTS", "Ring"]

#: nginx's number of virtual nodes per unit of weight.
DEFAULT_POINTS_PER_WEIGHT = 160
#: Same bound as the Rust ring: a mistyped weight cannot exhaust memory.
MAX_POINTS = 1 << 25


def _split_host_port(name: bytes) -> tuple[bytes, bytes]:
    if name[:5].lower() == b"unix:":
        return name[5:], b""
    i = name.rfind(b":")
    if i < 0:
        return name, b""
    return name[:i], name[i + 1 :]


class Ring:
    """An immutable ketama ring over ``len(self)`` nodes (same API as ``dispa._rust.Ring``).

    ``Ring(nodes, *, points_per_weight=160)`` where ``nodes`` is a sequence of
    ``(name: str, weight: int)``. Raises ``ValueError`` for no nodes, a weight below 1,
    ``points_per_weight`` below 1, or more than ``MAX_POINTS`` points; ``TypeError`` for
    malformed nodes.
    """

    __slots__ = ("_hashes", "_owners", "_n", "_npoints")

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
