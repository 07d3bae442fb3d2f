"""``compression``: compress responses with zstd, brotli or gzip, as the client accepts.

Theory of operation
-------------------
``on_response`` (phase 8) decides once per response:

1. *Eligible?* Not for 1xx, 204, 206 or 304, not when the response already has a
   ``Content-Encoding`` or a ``Content-Range``, not with ``Cache-Control: no-transform``
   (RFC 9110 §7.7), not when the media type matches none of ``content_types``, not when a
   known ``Content-Length`` is below ``min_length`` (or zero). An eligible response gets
   ``Vary: Accept-Encoding`` whether or not this client is served compressed, because a
   cache must not hand the identity copy to a client that would have got another one
   (RFC 9110 §12.5.5).
2. *Compressed?* Not for ``HEAD`` or ``CONNECT``. Otherwise :func:`negotiate` picks a coding
   from ``Accept-Encoding`` (RFC 9110 §12.5.3): the highest q-value wins, ties go to the
   earlier entry of ``algorithms``; ``*`` covers codings not named; ``q=0`` refuses;
   ``x-gzip`` means ``gzip`` (RFC 9110 §8.4.1.3); no header means no compression.
3. *Then* the head gets ``Content-Encoding``, loses ``Content-Length`` (the core re-frames)
   and ``Accept-Ranges`` (byte ranges of the identity body no longer apply; nginx's gzip
   module does the same), a strong ``ETag`` becomes weak (``W/``; RFC 9110 §8.8.1: the
   compressed bytes differ), and a streaming compressor goes into ``req.ctx``.

``on_response_body`` passes chunks through untouched unless step 3 stored a compressor.
With one, every non-empty chunk is compressed **and flushed** (gzip ``Z_SYNC_FLUSH``,
brotli ``flush()``, zstd ``FLUSH_BLOCK``): the core calls this hook once per upstream read and
there is no timer, so holding bytes back could stall a streaming response (server-sent
events, long polls) indefinitely. The cost is a few bytes per upstream read. ``end=True``
finishes the stream (gzip trailer, zstd frame end, brotli last block).

Levels: gzip 6 is zlib's default, zstd 3 is zstd's default, brotli 4 is the usual on-the-fly
choice (11 is meant for static assets). zstd is capped at 19: levels 20-22 ("ultra") need
tens of MB per stream, one stream per in-flight response. Not yet measured: memory per stream
at the defaults, and the CPU cost per MiB of each algorithm under load.

The ``brotli`` and ``zstandard`` packages are optional imports: an algorithm whose library
is missing is dropped from ``algorithms`` at build time (logged when the build context has a
logger); when none is left the build fails.
"""

from __future__ import annotations

import zlib
from typing import Annotated, Literal

import msgspec

from dispa.plugins.api import BuildContext, Filter, Request, ResponseHead
from dispa.plugins.builtin._common import add_vary, ctx_key, list_tokens

try:
    import brotli
except ImportError:          # optional dependency
    brotli = None
try:
    import zstandard
except ImportError:          # optional dependency
    zstandard = None

__all__ = ["Compression", "CompressionConfig", "Levels", "negotiate", "AVAILABLE",
           "DEFAULT_MIN_LENGTH"]

ALGORITHMS = ("zstd", "br", "gzip")
AVAILABLE = frozenset({"gzip"} | ({"br"} if brotli else set())
                      | ({"zstd"} if zstandard else set()))

# Caddy's `encode` minimum_length default (512 bytes): below that, the coding's own framing
# (gzip: 18 bytes) and the CPU rarely pay for themselves.
DEFAULT_MIN_LENGTH = 512

DEFAULT_CONTENT_TYPES = ("text/*", "application/json", "application/javascript",
                         "application/xml", "image/svg+xml")

_NO_COMPRESS_STATUS = frozenset({204, 206, 304})


class Levels(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Compression level per algorithm."""

    gzip: Annotated[int, msgspec.Meta(ge=1, le=9)] = 6
    br: Annotated[int, msgspec.Meta(ge=0, le=11)] = 4
    zstd: Annotated[int, msgspec.Meta(ge=1, le=19)] = 3


class CompressionConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """``algorithms``: codings offered, in preference order; ``min_length``: skip responses
    whose known ``Content-Length`` is smaller; ``content_types``: media-type prefixes to
    compress (``text/*`` and ``text/`` both mean every ``text`` type); ``level``: per
    algorithm."""

    algorithms: tuple[Literal["zstd", "br", "gzip"], ...] = ALGORITHMS
    min_length: Annotated[int, msgspec.Meta(ge=0)] = DEFAULT_MIN_LENGTH
    content_types: tuple[str, ...] = DEFAULT_CONTENT_TYPES
    level: Levels = Levels()

    def __post_init__(self):
        if not self.algorithms:
            raise ValueError("algorithms: must name at least one of zstd, br, gzip")
        if len(set(self.algorithms)) != len(self.algorithms):
            raise ValueError(f"algorithms: {list(self.algorithms)} lists one twice")
        if not self.content_types:
            raise ValueError("content_types: must list at least one media-type prefix")
        for ct in self.content_types:
            body = ct[:-1] if ct.endswith("*") else ct
            if not body or "*" in body or any(c in body for c in " \t;,"):
                raise ValueError(f"content_types: {ct!r} is not a media-type prefix")


def _parse_q(params: list[str]) -> float | None:
    """The ``q`` parameter (RFC 9110 §12.4.2): 1.0 when absent, ``None`` when malformed."""
    for p in params:
        name, _, value = p.partition("=")
        if name.strip().lower() == "q":
            try:
                q = float(value.strip())
            except ValueError:
                return None
            return q if 0.0 <= q <= 1.0 else None
    return 1.0


def negotiate(accept_encoding: list[str], algorithms: tuple[str, ...]) -> str | None:
    """The coding of ``algorithms`` to use for an ``Accept-Encoding`` given as its list
    members (RFC 9110 §12.5.3), or ``None`` for identity. Never raises; malformed members
    are ignored."""
    qs: dict[str, float] = {}
    for member in accept_encoding:
        coding, *params = member.split(";")
        coding = coding.strip().lower()
        if coding == "x-gzip":
            coding = "gzip"
        q = _parse_q(params)
        if q is None or not coding or coding in qs:
            continue
        qs[coding] = q
    star = qs.get("*", 0.0)
    best, best_q = None, 0.0
    for alg in algorithms:           # preference order: strictly greater q wins
        q = qs.get(alg, star)
        if q > best_q:
            best, best_q = alg, q
    return best


class _Gzip:
    __slots__ = ("_c",)

    def __init__(self, level: int):
        self._c = zlib.compressobj(level, zlib.DEFLATED, 16 + zlib.MAX_WBITS)  # gzip wrapper

    def chunk(self, data: bytes) -> bytes:
        return self._c.compress(data) + self._c.flush(zlib.Z_SYNC_FLUSH)

    def finish(self, data: bytes) -> bytes:
        return self._c.compress(data) + self._c.flush(zlib.Z_FINISH)


class _Brotli:
    __slots__ = ("_c",)

    def __init__(self, level: int):
        self._c = brotli.Compressor(quality=level)

    def chunk(self, data: bytes) -> bytes:
        return self._c.process(data) + self._c.flush()

    def finish(self, data: bytes) -> bytes:
        return self._c.process(data) + self._c.finish()


class _Zstd:
    __slots__ = ("_c",)

    def __init__(self, level: int):
        # one ZstdCompressor per stream: a compressor's context is not shareable between
        # concurrent streams
        self._c = zstandard.ZstdCompressor(level=level).compressobj()

    def chunk(self, data: bytes) -> bytes:
        return self._c.compress(data) + self._c.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)

    def finish(self, data: bytes) -> bytes:
        return self._c.compress(data) + self._c.flush(zstandard.COMPRESSOBJ_FLUSH_FINISH)


_COMPRESSORS = {"gzip": _Gzip, "br": _Brotli, "zstd": _Zstd}


class Compression(Filter):
    """Negotiated response compression; see the module docstring for every rule."""

    name = "compression"
    Config = CompressionConfig
    wants_response_body = True

    def __init__(self, config: CompressionConfig, ctx: BuildContext):
        super().__init__(config, ctx)
        algorithms = tuple(a for a in config.algorithms if a in AVAILABLE)
        missing = [a for a in config.algorithms if a not in AVAILABLE]
        if missing and ctx.logger is not None:
            ctx.logger.warning("compression %s: %s unavailable (library not installed)",
                               self.instance_name, ", ".join(missing))
        if not algorithms:
            raise ValueError(f"algorithms: none of {list(config.algorithms)} is available "
                             "(install brotli / zstandard)")
        self.algorithms = algorithms
        self._levels = {"gzip": config.level.gzip, "br": config.level.br,
                        "zstd": config.level.zstd}
        self._types = tuple(ct[:-1].lower() if ct.endswith("*") else ct.lower()
                            for ct in config.content_types)
        self._min_length = config.min_length
        self._key = ctx_key(self)

    # -- the decision ----------------------------------------------------------------------

    def eligible(self, resp: ResponseHead) -> bool:
        """True when this response could be compressed for some client (step 1)."""
        status = resp.status
        if status < 200 or status in _NO_COMPRESS_STATUS:
            return False
        h = resp.headers
        if "content-encoding" in h or "content-range" in h:
            return False
        ct = h.get("content-type")
        if ct is None or not ct.split(";", 1)[0].strip().lower().startswith(self._types):
            return False
        if any(t.lower() == "no-transform" for t in list_tokens(h, "cache-control")):
            return False
        cl = h.get("content-length")
        if cl is not None:
            try:
                n = int(cl)
            except ValueError:
                return False        # the core refuses a bad length; do not touch it
            if n == 0 or n < self._min_length:
                return False
        return True

    def on_response(self, req: Request, resp: ResponseHead) -> None:
        if not self.eligible(resp):
            return None
        h = resp.headers
        add_vary(h, ("Accept-Encoding",))
        if req.method in ("HEAD", "CONNECT"):
            return None
        coding = negotiate(list_tokens(req.headers, "accept-encoding"), self.algorithms)
        if coding is None:
            return None
        h.set(b"content-encoding", coding)
        h.remove(b"content-length")
        h.remove(b"accept-ranges")
        etag = h.get("etag")
        if etag is not None and not etag.startswith("W/"):
            h.set(b"etag", "W/" + etag)
        req.ctx[self._key] = _COMPRESSORS[coding](self._levels[coding])
        return None

    def on_response_body(self, req: Request, resp: ResponseHead, chunk: bytes,
                         end: bool) -> bytes:
        c = req.ctx.get(self._key)
        if c is None:
            return chunk
        if end:
            del req.ctx[self._key]
            return c.finish(chunk)
        if not chunk:
            return b""
        return c.chunk(chunk)
