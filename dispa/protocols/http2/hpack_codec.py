"""The HPACK codec of HTTP/2 connections: compiled (``dispa._rust``) or the ``hpack`` library.

``h2`` encodes and decodes header blocks with ``H2Connection.encoder`` / ``.decoder``
(``hpack.Encoder`` / ``hpack.Decoder``, pure Python: a third of the CPU of a small HTTP/2
request, docs/http2.md#measured). :func:`install` replaces both with the Rust codec of
``rust/src/hpack.rs`` (same API, same limits, same exceptions) when the extension is built
and ``DISPA_NO_EXTENSIONS`` is unset; otherwise the connection keeps the ``hpack`` library,
which is the reference the compiled codec is tested against
(tests/unit/protocols/test_hpack_codec.py). ``IMPLEMENTATION`` says which. Either way
the encoder's table is capped at :data:`ENCODER_MAX_TABLE_SIZE`.

With the compiled codec, ``h2``'s inbound header validation (a chain of Python generators
per header) is replaced as well: :func:`check_headers` (``rust/src/hpack_check.rs``) makes the
same RFC 9113 §8.2/§8.3 decisions in one pass, and :class:`~dispa.protocols.http2.H2Core`
runs it on every received header event (a malformed block is a connection error, GOAWAY
PROTOCOL_ERROR, as with ``h2``'s). ``h2``'s inbound normalisation (joining split ``cookie``
fields) goes off with it; :class:`~dispa.proxy.h2_session.H2Session` joins them the same way.
The upstream pool (``dispa/proxy/h2_pool.py``) keeps ``h2``'s checks: it gets the codec only.
"""

from __future__ import annotations

import hpack as _hpack

from dispa import _native

# The largest dynamic table our encoders use, whatever the peer's SETTINGS_HEADER_TABLE_SIZE
# (RFC 7541 §4.2 lets an encoder use less; the size update tells the peer): a client
# advertising 2^32-1 must not make a connection keep every distinct response header it was
# sent. The same value as rust/src/hpack.rs ENCODER_MAX_TABLE_SIZE (and nghttp2's default).
ENCODER_MAX_TABLE_SIZE = 4096


class CappedEncoder(_hpack.Encoder):
    """``hpack.Encoder`` whose table never grows past :data:`ENCODER_MAX_TABLE_SIZE`."""

    header_table_size = property(
        _hpack.Encoder.header_table_size.fget,
        lambda self, value: _hpack.Encoder.header_table_size.fset(
            self, min(int(value), ENCODER_MAX_TABLE_SIZE)),
        doc="The dynamic table's size: the peer's setting, capped.")


_rust = _native.rust
if _rust is not None and hasattr(_rust, "HpackEncoder"):
    Encoder = _rust.HpackEncoder
    Decoder = _rust.HpackDecoder
    # why a received header list is malformed, or None (rust/src/hpack_check.rs)
    check_headers = _rust.h2_check_headers
    IMPLEMENTATION = "compiled"
else:
    from hpack import Decoder  # type: ignore[assignment]  # noqa: F401
    Encoder = CappedEncoder  # type: ignore[assignment,misc]
    check_headers = None  # h2's own inbound validation stays on
    IMPLEMENTATION = "pure"

# check_headers kinds
REQUEST, RESPONSE, TRAILERS = 0, 1, 2

__all__ = ["Encoder", "Decoder", "IMPLEMENTATION", "install", "check_headers", "REQUEST",
           "RESPONSE", "TRAILERS", "CappedEncoder", "ENCODER_MAX_TABLE_SIZE"]


def install(conn) -> None:
    """Give a fresh ``h2.connection.H2Connection`` (nothing sent or received yet) this
    module's codec, keeping the decoder limits ``h2`` set on it."""
    conn.encoder = Encoder()
    if IMPLEMENTATION == "pure":
        return
    old = conn.decoder
    dec = Decoder()
    dec.max_header_list_size = old.max_header_list_size
    dec.max_allowed_table_size = old.max_allowed_table_size
    conn.decoder = dec
