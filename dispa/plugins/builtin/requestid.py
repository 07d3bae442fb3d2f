"""``requestid``: make sure every request carries an id, and echo it on the response.

Theory of operation: ``on_request`` picks the id — the incoming ``header`` field when
``trust_incoming`` is on and the value is sane (1 to :data:`MAX_ID_CHARS` visible ASCII
characters, RFC 5234 VCHAR), otherwise ``req.request_id`` when the core set one, otherwise a
fresh UUID4 — stores it in ``req.ctx`` and sets the field on the request (one field: any
untrusted or duplicate incoming ones are replaced). ``on_response`` sets the same field on
the response.

When ``req.request_id`` is empty it is set to the chosen id, so logs and the echo agree; a
core-assigned ``req.request_id`` is never overwritten (it may be the core's unique key).

Precedent: Envoy's ``preserve_external_request_id`` defaults to false, so does
``trust_incoming``: at the edge, client-chosen ids are log-injection and correlation-spoofing
material.
"""

from __future__ import annotations

import uuid

import msgspec

from dispa.plugins.api import BuildContext, Filter, Request, ResponseHead
from dispa.plugins.builtin._common import ctx_key, is_token

__all__ = ["RequestId", "RequestIdConfig", "MAX_ID_CHARS"]

# The core's own limit for a propagated id (dispa/proxy/session.py); the same here.
MAX_ID_CHARS = 200


def sane_id(value: str | None) -> bool:
    """True for 1..MAX_ID_CHARS visible ASCII characters (0x21-0x7E, no spaces)."""
    return (value is not None and 0 < len(value) <= MAX_ID_CHARS
            and all(33 <= ord(c) <= 126 for c in value))


class RequestIdConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """``header``: the field carrying the id; ``trust_incoming``: keep a sane id the client
    sent instead of replacing it."""

    header: str = "x-request-id"
    trust_incoming: bool = False

    def __post_init__(self):
        if not is_token(self.header):
            raise ValueError(f"header: {self.header!r} is not a header name")


class RequestId(Filter):
    """Sets ``header`` on the upstream request and on the response."""

    name = "requestid"
    Config = RequestIdConfig

    def __init__(self, config: RequestIdConfig, ctx: BuildContext):
        super().__init__(config, ctx)
        self._header = config.header.lower().encode("latin-1")
        self._trust = config.trust_incoming
        self._key = ctx_key(self)

    def on_request(self, req: Request) -> None:
        rid = None
        if self._trust:
            incoming = req.headers.get(self._header)
            if sane_id(incoming):
                rid = incoming
        if rid is None:
            rid = req.request_id if sane_id(req.request_id) else str(uuid.uuid4())
        if not req.request_id:
            req.request_id = rid
        req.ctx[self._key] = rid
        req.headers.set(self._header, rid)
        return None

    def on_response(self, req: Request, resp: ResponseHead) -> None:
        rid = req.ctx.get(self._key)
        if rid is not None:
            resp.headers.set(self._header, rid)
        return None
