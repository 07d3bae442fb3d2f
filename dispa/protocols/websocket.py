"""A sans-I/O inspector for RFC 6455 frames passing through the proxy.

Theory of operation
-------------------
After a ``101 Switching Protocols`` the proxy copies bytes between the client and the
upstream. One :class:`FrameInspector` per direction reads the frame headers of those bytes as
they pass, without re-framing anything: data frame payloads stream through untouched (a
1 GiB message costs no more memory than one read), and what leaves is byte for byte what
arrived, cut only at frame boundaries.

``feed(data)`` returns a list of *pieces* in stream order:

* ``bytes`` (or a memoryview slice): forward as they are;
* :class:`Control`: one whole control frame (ping, pong, close), held until complete (at
  most 2 + 8 + 4 + 125 bytes) so that the tunnel can decide to forward it, answer it or
  drop it (a pong to the proxy's own ping);

and sets :attr:`FrameInspector.error` to a :class:`Violation` when the stream breaks the
protocol. Nothing of the offending frame is in the pieces: the tunnel sends close frames
instead (1002 protocol error, 1009 message too big) and the peer never sees the bad frame.

Rules:

1. A partial frame *header* is never forwarded: it is held until complete, so a frame is
   judged before its first byte leaves (and an injected frame never lands inside a header).
2. ``at_boundary`` is true when everything forwarded so far ends on a frame boundary: only
   then may the tunnel inject its own frame (ping, close) into that direction. Control
   frames may sit between the fragments of a message (RFC 6455 §5.4), so "between frames"
   is enough; it need not be between messages.
3. Checks (RFC 6455 §5.1-§5.5, §7.4): frames from a client are masked and frames from a
   server are not; opcodes are known; control frames are final and at most 125 bytes; a
   continuation continues something and a new data frame does not interrupt a fragmented
   message; a 64-bit length has its top bit clear; a close payload is empty or a valid code
   plus UTF-8 reason; a message (the sum of its fragments) is at most ``max_message_size``.
   RSV bits are not checked: they belong to extensions (permessage-deflate) negotiated
   between the two ends, which the proxy does not take part in. Text payloads are not
   UTF-8-checked, by decision (docs/websocket.md, "UTF-8"): permessage-deflate payloads
   cannot be checked in the middle, and the endpoints must check anyway.
4. After a close frame the sender may send nothing more (§5.5.1): later bytes are dropped.

Not yet measured: the cost per frame of the header parse in pure Python (one slice and a few
integer operations per frame, nothing per payload byte).
"""

from __future__ import annotations

import os

__all__ = [
    "CLOSE", "PING", "PONG", "TEXT", "BINARY", "CONTINUATION",
    "Control", "FrameInspector", "Violation", "close_frame", "encode_frame", "parse_close",
    "valid_close_code",
]

CONTINUATION = 0x0
TEXT = 0x1
BINARY = 0x2
CLOSE = 0x8
PING = 0x9
PONG = 0xA

_DATA_OPCODES = frozenset((CONTINUATION, TEXT, BINARY))
_CONTROL_OPCODES = frozenset((CLOSE, PING, PONG))

#: Close codes (RFC 6455 §7.4.1) the proxy sends itself.
GOING_AWAY = 1001
PROTOCOL_ERROR = 1002
INVALID_PAYLOAD = 1007
MESSAGE_TOO_BIG = 1009

# The largest payload a control frame may carry (RFC 6455 §5.5).
MAX_CONTROL_PAYLOAD = 125


class Violation:
    """Why a stream was cut: the close code to send and a short reason."""

    __slots__ = ("code", "reason")

    def __init__(self, code: int, reason: str):
        self.code = code
        self.reason = reason

    def __repr__(self) -> str:
        return f"Violation({self.code}, {self.reason!r})"


class Control:
    """A whole control frame: ``opcode``, unmasked ``payload`` and the ``raw`` bytes as they
    arrived (forward ``raw`` to pass it through intact)."""

    __slots__ = ("opcode", "payload", "raw")

    def __init__(self, opcode: int, payload: bytes, raw: bytes):
        self.opcode = opcode
        self.payload = payload
        self.raw = raw

    def __repr__(self) -> str:
        return f"Control({self.opcode:#x}, {self.payload!r})"


def _unmask(payload: bytes, key: bytes) -> bytes:
    if not payload:
        return payload
    n = len(payload)
    k = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(k, "big")).to_bytes(n, "big")


def valid_close_code(code: int) -> bool:
    """A code that may appear in a close frame on the wire (RFC 6455 §7.4.1-§7.4.2; 1005,
    1006 and 1015 are reserved for reporting and must not be sent)."""
    if 1000 <= code <= 1014:
        return code not in (1004, 1005, 1006)
    return 3000 <= code <= 4999


def parse_close(payload: bytes) -> tuple[int | None, str] | Violation:
    """``(code, reason)`` of a close frame payload (``(None, "")`` when empty), or the
    :class:`Violation` it commits."""
    if not payload:
        return None, ""
    if len(payload) == 1:
        return Violation(PROTOCOL_ERROR, "close frame with a 1-byte payload")
    code = int.from_bytes(payload[:2], "big")
    if not valid_close_code(code):
        return Violation(PROTOCOL_ERROR, f"invalid close code {code}")
    try:
        reason = payload[2:].decode("utf-8")
    except UnicodeDecodeError:
        return Violation(INVALID_PAYLOAD, "close reason is not UTF-8")
    return code, reason


def encode_frame(opcode: int, payload: bytes = b"", *, mask: bool) -> bytes:
    """One final frame. ``mask``: frames the proxy sends towards an upstream are masked
    (it speaks as the client there), frames towards the client are not."""
    n = len(payload)
    head = bytearray((0x80 | opcode,))
    mbit = 0x80 if mask else 0
    if n < 126:
        head.append(mbit | n)
    elif n < 65536:
        head.append(mbit | 126)
        head += n.to_bytes(2, "big")
    else:
        head.append(mbit | 127)
        head += n.to_bytes(8, "big")
    if mask:
        key = os.urandom(4)
        return bytes(head) + key + _unmask(payload, key)
    return bytes(head) + payload


def close_frame(code: int, reason: str = "", *, mask: bool) -> bytes:
    """A close frame with ``code`` and a reason cut to fit a control frame."""
    raw = reason.encode("utf-8")[:MAX_CONTROL_PAYLOAD - 2]
    while True:  # never cut a UTF-8 sequence in half
        try:
            raw.decode("utf-8")
            break
        except UnicodeDecodeError:
            raw = raw[:-1]
    return encode_frame(CLOSE, code.to_bytes(2, "big") + raw, mask=mask)


class FrameInspector:
    """Reads the frames of one direction (see the module docstring).

    Args:
        from_client: the bytes come from the client (frames must be masked), else from the
            upstream server (frames must not be masked).
        max_message_size: the most payload bytes one message may carry (0: no limit).

    Counters (cumulative): ``frames``, ``messages``, ``payload_bytes``.
    """

    __slots__ = ("from_client", "max_message_size", "frames", "messages", "payload_bytes",
                 "error", "closed", "close_code", "close_reason", "_remaining", "_fin",
                 "_in_message", "_message_size", "_held")

    def __init__(self, *, from_client: bool, max_message_size: int = 0):
        self.from_client = from_client
        self.max_message_size = max_message_size
        self.frames = 0
        self.messages = 0
        self.payload_bytes = 0
        self.error: Violation | None = None
        self.closed = False  # a close frame went by
        self.close_code: int | None = None
        self.close_reason = ""
        self._remaining = 0  # payload bytes of the current data frame still to pass
        self._fin = False  # the current data frame ends its message
        self._in_message = False  # a fragmented message is open (continuations expected)
        self._message_size = 0
        self._held = b""  # an incomplete frame header (or control frame), not yet forwarded

    @property
    def at_boundary(self) -> bool:
        """Everything forwarded so far ends on a frame boundary (Rule 2)."""
        return self._remaining == 0

    def feed(self, data: bytes) -> list:
        """Inspect ``data``; return the pieces to forward, in order (module docstring).

        After a violation (``error`` set) or a close frame, later input yields nothing.
        """
        if self.error is not None or self.closed:
            return []
        buf = self._held + data if self._held else data
        self._held = b""
        n = len(buf)
        pos = 0
        start = 0  # first byte of the run of bytes not yet emitted
        from_client = self.from_client
        limit = self.max_message_size
        out: list = []
        while pos < n:
            rem = self._remaining
            if rem:
                take = n - pos
                if take >= rem:
                    take = rem
                    if self._fin:
                        self.messages += 1
                pos += take
                self._remaining = rem - take
                continue
            # a frame header starts at pos
            if n - pos < 2:
                self._held = buf[pos:]
                break
            b0 = buf[pos]
            b1 = buf[pos + 1]
            length = b1 & 0x7F
            hl = 2
            if length == 126:
                hl = 4
            elif length == 127:
                hl = 10
            masked = b1 & 0x80
            if masked:
                hl += 4
            if n - pos < hl:
                self._held = buf[pos:]
                break
            if length == 126:
                length = int.from_bytes(buf[pos + 2:pos + 4], "big")
            elif length == 127:
                length = int.from_bytes(buf[pos + 2:pos + 10], "big")
            fin = b0 & 0x80
            opcode = b0 & 0x0F
            # fast path: a whole text/binary message in one frame, masked as it must be
            if not (fin and (opcode == TEXT or opcode == BINARY) and
                    (masked != 0) is from_client and not self._in_message and
                    (not limit or length <= limit)):
                why = self._check(fin, opcode, masked, length)
                if why is not None:
                    if pos > start:
                        out.append(buf[start:pos])
                    self.error = why
                    return out
            if opcode >= 8:
                end = pos + hl + length
                if end > n:
                    self._held = buf[pos:]  # checked again, and counted, once complete
                    break
                self.frames += 1
                raw = buf[pos:end]
                payload = buf[pos + hl:end]
                if masked:
                    payload = _unmask(bytes(payload), bytes(buf[end - length - 4:end - length]))
                if pos > start:
                    out.append(buf[start:pos])
                pos = start = end
                if opcode == CLOSE:
                    parsed = parse_close(bytes(payload))
                    if isinstance(parsed, Violation):
                        self.frames -= 1
                        self.error = parsed
                        return out
                    self.closed = True
                    self.close_code, self.close_reason = parsed
                    out.append(Control(opcode, bytes(payload), bytes(raw)))
                    return out  # Rule 4: nothing after a close frame
                out.append(Control(opcode, bytes(payload), bytes(raw)))
                continue
            # a data frame: its payload streams
            self.frames += 1
            self.payload_bytes += length
            pos += hl
            if length:
                self._remaining = length
                self._fin = bool(fin)
            elif fin:
                self.messages += 1
        if start == 0 and pos == n and not self._held:
            if n:
                out.append(buf)
        elif pos > start:
            out.append(buf[start:pos])
        return out

    def _check(self, fin: int, opcode: int, masked: int, length: int) -> Violation | None:
        """The violation a frame header commits, or None; updates the message state."""
        if bool(masked) != self.from_client:
            return Violation(PROTOCOL_ERROR, "unmasked frame from the client" if self.from_client
                             else "masked frame from the server")
        if opcode >= 8:
            if opcode not in _CONTROL_OPCODES:
                return Violation(PROTOCOL_ERROR, f"reserved opcode {opcode:#x}")
            if not fin:
                return Violation(PROTOCOL_ERROR, "fragmented control frame")
            if length > MAX_CONTROL_PAYLOAD:
                return Violation(PROTOCOL_ERROR, "control frame payload over 125 bytes")
            return None
        if opcode not in _DATA_OPCODES:
            return Violation(PROTOCOL_ERROR, f"reserved opcode {opcode:#x}")
        if length >> 63:
            return Violation(PROTOCOL_ERROR, "frame length with the top bit set")
        if opcode == CONTINUATION:
            if not self._in_message:
                return Violation(PROTOCOL_ERROR, "continuation frame without a message")
            size = self._message_size + length
        else:
            if self._in_message:
                return Violation(PROTOCOL_ERROR, "new message inside a fragmented message")
            size = length
        limit = self.max_message_size
        if limit and size > limit:
            return Violation(MESSAGE_TOO_BIG, f"message over {limit} bytes")
        self._message_size = 0 if fin else size
        self._in_message = not fin
        return None
