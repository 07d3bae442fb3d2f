"""Compiled data structures (Rust, pyo3): ``dispa._rust``.

The pure twin of every object here lives next to its user (``dispa.balancer._ring_py``) and
gives identical results; ``dispa._native.rust`` is this module or ``None``.
"""

from collections.abc import Sequence
from typing import final

__version__: str

def build_info() -> dict[str, object]:
    """Describe this build.

    Returns ``{"version": str, "debug": bool}``: the crate version and whether it was compiled
    with debug assertions (``DISPA_DEBUG=1`` / ``build_rust --debug``).
    """

@final
class Ring:
    """An immutable ketama consistent-hash ring, nginx-compatible.

    Points are placed exactly as nginx's ``hash $key consistent``
    (``ngx_http_upstream_hash_module``): node ``name`` is the ``server`` text such as
    ``"127.0.0.1:8081"``, split at its last ``:`` into host and port, and each node gets
    ``points_per_weight * weight`` points (nginx: 160 per weight). A key's owner is the first
    point at or after ``crc32(key)``, wrapping around.

    All results are indexes into ``nodes``. A new endpoint set means a new ``Ring``; build it
    once and share it (it is immutable and safe to use from any thread).

    Raises ``ValueError`` for an empty ``nodes``, a weight below 1, ``points_per_weight`` below
    1, or a ring of more than 2**25 points; ``TypeError`` if ``nodes`` is not a sequence of
    ``(str, int)`` pairs.
    """

    def __new__(cls, nodes: Sequence[tuple[str, int]], *, points_per_weight: int = 160) -> Ring: ...
    def __len__(self) -> int:
        """Number of nodes (not points)."""
    def lookup(self, key: bytes) -> int:
        """Index of the node owning ``key``. Never fails for ``bytes``; ``TypeError`` otherwise."""
    def lookup_n(self, key: bytes, n: int) -> list[int]:
        """The failover walk: up to ``n`` distinct node indexes, clockwise from ``key``'s owner.

        ``result[0] == lookup(key)``; the list has ``min(n, len(self))`` entries (fewer only if
        a node lost every point to CRC collisions). ``OverflowError`` if ``n`` is negative.
        """
    def lookup_many(self, keys: list[bytes]) -> list[int]:
        """``[lookup(k) for k in keys]`` in one call. ``TypeError`` if an item is not ``bytes``."""
