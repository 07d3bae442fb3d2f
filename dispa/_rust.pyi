"""Compiled data structures (Rust, pyo3): ``dispa._rust``.

The pure twin of every object here lives next to its user (``dispa.balancer._ring_py`` for
``Ring``, ``dispa.balancer._maglev_py`` for ``Maglev``) and gives identical results, errors
included; ``dispa._native.rust`` is this module or ``None``.

Bounded loads (``lookup_bounded`` on both classes) follow Mirrokni et al. as HAProxy's
``hash-balance-factor`` does: the key goes to the first node along its failover walk whose
in-flight load is below ``ceil(factor * (sum(loads) + 1) * weight / sum(weights))``.
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
    ``"127.0.0.1:8081"``; a trailing ``:<digits>`` is the port (``unix:`` names and names
    without one have no port); point ``j`` is ``crc32(host + b"\0" + port + le32(point[j-1]))``
    with ``point[-1] = 0``, ``points_per_weight * weight`` points per node (nginx: 160 per
    weight). A key's owner is the first point at or after ``crc32(key)``, wrapping around.
    ``points_per_weight=1000`` spreads load with a CV near 3% instead of nginx's ~7%, but no
    longer matches nginx.

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
        """``[lookup(k) for k in keys]`` in one call. ``TypeError`` if an item is not ``bytes``
        or ``keys`` is not a ``list``."""
    def lookup_bounded(self, key: bytes, loads: Sequence[int], factor: float) -> int:
        """Bounded-load lookup: the first node clockwise from ``key``'s point whose
        ``loads[node]`` is below ``ceil(factor * (sum(loads) + 1) * weight / sum(weights))``.

        Equals ``lookup(key)`` while the owner has room. ``ValueError`` if
        ``len(loads) != len(self)`` or ``factor`` is NaN or outside ``[1, 1e6]``;
        ``OverflowError`` for a negative load (or one of 2**64 or more); ``TypeError`` for a
        non-int load or a ``str``.
        """

@final
class Maglev:
    """An immutable Maglev lookup table (Eisenbud et al., NSDI 2016).

    ``table_size`` slots (a prime; 65537 suits up to ~650 nodes) are filled from ``nodes``:
    node ``i`` prefers slots ``(offset + j * skip) % table_size`` with offset and skip from
    two 64-bit hashes of its name (FNV-1a 64 + MurmurHash3 ``fmix64``); nodes take turns
    claiming their next free preferred slot; weights (divided by their gcd) are turns: a round
    is ``max(w)`` passes and pass ``t`` gives a turn to every node of weight above ``t``. A key's node is ``table[crc32(key) % table_size]``.

    Every node owns ``table_size * weight / sum(weights)`` slots to within one round, so load
    is balanced by construction; removing one of N nodes moves its 1/N of the keys plus a
    few percent more (more as N approaches ``table_size / 100``).

    Raises ``ValueError`` for an empty ``nodes``, a weight below 1 or above 2**32 - 1, a
    ``table_size`` that is not a prime, is smaller than ``len(nodes)`` or exceeds 2**24;
    ``TypeError`` if ``nodes`` is not a sequence of ``(str, int)`` pairs.
    """

    def __new__(cls, nodes: Sequence[tuple[str, int]], *, table_size: int = 65537) -> Maglev: ...
    def __len__(self) -> int:
        """Number of nodes."""
    @property
    def table_size(self) -> int:
        """Number of slots."""
    def slot_counts(self) -> list[int]:
        """Slots owned by each node, in node order (sums to ``table_size``)."""
    def lookup(self, key: bytes) -> int:
        """Index of the node owning ``key``'s slot. ``TypeError`` if ``key`` is not ``bytes``."""
    def lookup_n(self, key: bytes, n: int) -> list[int]:
        """The failover walk: up to ``n`` distinct node indexes, forward through the table from
        ``key``'s slot. ``result[0] == lookup(key)``; ``min(n, len(self))`` entries.
        ``OverflowError`` if ``n`` is negative."""
    def lookup_many(self, keys: list[bytes]) -> list[int]:
        """``[lookup(k) for k in keys]`` in one call. ``TypeError`` if an item is not ``bytes``
        or ``keys`` is not a ``list``."""
    def lookup_bounded(self, key: bytes, loads: Sequence[int], factor: float) -> int:
        """Bounded-load lookup along the table walk; same rule and errors as
        ``Ring.lookup_bounded``."""

@final
class HpackEncoder:
    """HPACK encoder (RFC 7541) with the ``hpack.Encoder`` API as ``h2`` uses it
    (dispa/protocols/http2/hpack_codec.py installs it on an ``H2Connection``)."""
    def __new__(cls) -> HpackEncoder: ...
    header_table_size: int
    """The dynamic table's maximum size (capped at 4096); setting it owes the peer a size
    update at the start of the next block."""
    def encode(self, headers: object, huffman: bool = True) -> bytes:
        """A header block for ``headers``: (name, value) tuples (``hpack``'s
        ``NeverIndexedHeaderTuple`` stays never-indexed), or a dict (pseudo-headers first)."""
    def dynamic_table(self) -> list[tuple[bytes, bytes]]:
        """The dynamic table, newest entry first (tests)."""

@final
class HpackDecoder:
    """HPACK decoder with the ``hpack.Decoder`` API as ``h2`` uses it; errors are the
    ``hpack`` library's exception types."""
    def __new__(cls, max_header_list_size: int = ...) -> HpackDecoder: ...
    header_table_size: int
    max_allowed_table_size: int
    max_header_list_size: int
    def decode(self, data: bytes, raw: bool = False) -> list[tuple[str, str]] | list[tuple[bytes, bytes]]:
        """The header list of one block: decoded strings, or bytes with ``raw``."""
    def dynamic_table(self) -> list[tuple[bytes, bytes]]:
        """The dynamic table, newest entry first (tests)."""

def h2_check_headers(headers: Sequence[tuple[bytes, bytes]], kind: int) -> str | None:
    """Why a received header list is malformed (RFC 9113 §8.2/§8.3, the decisions of
    ``h2``'s inbound validation), or None. ``kind``: 0 request, 1 response, 2 trailers."""
