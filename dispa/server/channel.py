"""Length-prefixed msgpack frames over a socketpair between the master and one worker.

Frame: 4-byte big-endian payload length, then a msgpack-encoded tagged Struct (see
``messages.py``). Frames larger than MAX_FRAME_BYTES are refused: a snapshot of a very large
configuration fits well below it, and a corrupt length must not make us allocate gigabytes.

The reader is an asyncio.Protocol so it works on uvloop and asyncio alike; it never blocks
the loop and delivers each decoded message to a callback.
"""

from __future__ import annotations

import asyncio
import struct
from typing import Any, Callable

import msgspec

MAX_FRAME_BYTES = 64 * 1024 * 1024
_LEN = struct.Struct(">I")


class ChannelProtocol(asyncio.Protocol):
    """One end of the channel; ``on_message(msg)`` per frame, ``on_close(exc)`` once."""

    def __init__(self, decode_type: Any, on_message: Callable[[Any], None],
                 on_close: Callable[[Exception | None], None]):
        self._decoder = msgspec.msgpack.Decoder(decode_type)
        self._encoder = msgspec.msgpack.Encoder()
        self._on_message = on_message
        self._on_close = on_close
        self._buf = bytearray()
        self.transport: asyncio.Transport | None = None
        self.closed = False

    def connection_made(self, transport):  # type: ignore[override]
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        while len(buf) >= 4:
            (n,) = _LEN.unpack_from(buf, 0)
            if n > MAX_FRAME_BYTES:
                self.transport.close()
                return
            if len(buf) < 4 + n:
                return
            payload = bytes(buf[4:4 + n])
            del buf[:4 + n]
            self._on_message(self._decoder.decode(payload))

    def connection_lost(self, exc):  # type: ignore[override]
        self.closed = True
        self._on_close(exc)

    def send(self, msg: Any) -> None:
        """Queue one message; silently dropped when the peer is gone (its death is handled
        by ``on_close``)."""
        if self.closed or self.transport is None or self.transport.is_closing():
            return
        payload = self._encoder.encode(msg)
        self.transport.write(_LEN.pack(len(payload)) + payload)


async def open_channel(sock, decode_type: Any, on_message, on_close) -> ChannelProtocol:
    """Wrap a connected socket (one end of a socketpair) in a ChannelProtocol."""
    loop = asyncio.get_running_loop()
    _, proto = await loop.connect_accepted_socket(
        lambda: ChannelProtocol(decode_type, on_message, on_close), sock=sock)
    return proto
