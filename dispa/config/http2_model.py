"""The ``[http2]`` table: downstream HTTP/2 settings and abuse limits (docs/http2.md).

Its own module (with its own ``_Table`` base, like ``routing_model``) so ``config.model``
imports it without a cycle. ``compile_http2`` turns it into the Snapshot's plain ``http2``
dict, which workers read with :func:`dispa.protocols.http2.limits_from`.
"""

from __future__ import annotations

from typing import Annotated

import msgspec
from msgspec import Meta


class _Table(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Base of the tables here: frozen, unknown keys rejected."""


Window = Annotated[int, Meta(ge=1, le=2**31 - 1)]


class Http2Config(_Table):
    """``[http2]``: HTTP/2 towards clients (h2c prior knowledge, Upgrade: h2c, ALPN h2)."""

    enabled: bool = False
    max_concurrent_streams: Annotated[int, Meta(ge=1, le=10000)] = 128
    initial_window_size: Window = 65535
    connection_window_size: Annotated[int, Meta(ge=65535, le=2**31 - 1)] = 16 * 1024 * 1024
    max_frame_size: Annotated[int, Meta(ge=16384, le=16777215)] = 16384
    max_header_list_size: Annotated[int, Meta(ge=1024, le=16 * 1024 * 1024)] = 65536
    header_table_size: Annotated[int, Meta(ge=0, le=1024 * 1024)] = 4096
    # abuse limits (per connection, per window)
    max_resets_per_window: Annotated[int, Meta(ge=1)] = 200
    max_control_frames_per_window: Annotated[int, Meta(ge=1)] = 500
    abuse_window: Annotated[float, Meta(gt=0, le=3600)] = 1.0
    max_header_block_frames: Annotated[int, Meta(ge=1, le=64)] = 16
    max_queued_bytes: Annotated[int, Meta(ge=65536)] = 4 * 1024 * 1024
    stream_buffer_bytes: Annotated[int, Meta(ge=16384)] = 256 * 1024
    idle_timeout: Annotated[float, Meta(ge=0, le=7 * 24 * 3600)] = 0.0
    server_push: bool = False
    websocket: bool = True  # RFC 8441 extended CONNECT (docs/websocket.md)


def compile_http2(cfg: Http2Config) -> dict | None:
    """The Snapshot's ``http2`` field: None when HTTP/2 is off."""
    if not cfg.enabled:
        return None
    out = msgspec.to_builtins(cfg)
    out["abuse_window_seconds"] = out.pop("abuse_window")
    out["idle_timeout_seconds"] = out.pop("idle_timeout")
    return out
