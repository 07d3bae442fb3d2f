"""``sizelimit``: refuse request bodies larger than ``max_body_bytes`` with 413.

Theory of operation: a declared ``Content-Length`` over the limit is refused in
``on_request`` (phase 4), before any body byte is read or anything reaches the upstream; with
``Expect: 100-continue`` the client then never sends the body. A body without a length
(chunked) is counted in ``on_request_body``; the chunk that crosses the limit raises
``HTTPError(413)``. The count lives in ``req.ctx`` under this instance's key. Declared
lengths are counted too, as a second guard.

If the upstream request was already committed when the limit is crossed (the core streams
bodies), the core cannot answer 413 any more and aborts the exchange instead; how it does so
is the core's business (STYLE C3 row 4b: "may answer until the upstream request is
committed").

Precedent for the default: nginx ``client_max_body_size`` is 1 MiB.
"""

from __future__ import annotations

from typing import Annotated

import msgspec

from dispa.plugins.api import BuildContext, Filter, HTTPError, Request
from dispa.plugins.builtin._common import ctx_key

__all__ = ["SizeLimit", "SizeLimitConfig", "DEFAULT_MAX_BODY_BYTES"]

DEFAULT_MAX_BODY_BYTES = 1024 * 1024     # nginx client_max_body_size default (1m)


class SizeLimitConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """``max_body_bytes``: the largest request body accepted (``0``: no body at all)."""

    max_body_bytes: Annotated[int, msgspec.Meta(ge=0)] = DEFAULT_MAX_BODY_BYTES


class SizeLimit(Filter):
    """413 for a request body over ``max_body_bytes``, declared or counted."""

    name = "sizelimit"
    Config = SizeLimitConfig
    wants_request_body = True

    def __init__(self, config: SizeLimitConfig, ctx: BuildContext):
        super().__init__(config, ctx)
        self._max = config.max_body_bytes
        self._key = ctx_key(self)

    def _too_large(self) -> HTTPError:
        return HTTPError(413, f"request body larger than {self._max} bytes")

    def on_request(self, req: Request) -> None:
        if req.content_length > self._max:
            raise self._too_large()
        return None

    def on_request_body(self, req: Request, chunk: bytes, end: bool) -> bytes:
        seen = req.ctx.get(self._key, 0) + len(chunk)
        if seen > self._max:
            raise self._too_large()
        req.ctx[self._key] = seen
        return chunk
