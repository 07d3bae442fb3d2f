"""HTTP/2 glue around the ``h2`` library (sans-I/O): settings, limits and abuse accounting.

Theory of operation
-------------------
``h2.connection.H2Connection`` does the framing, HPACK and the RFC 9113 state machines;
Dispa never writes frames by hand. This package adds what a proxy facing the internet needs
on top of it, still without I/O:

- :class:`H2Limits`: the ``[http2]`` table as the worker uses it (SETTINGS values and the
  abuse limits), built once per snapshot;
- :class:`H2Core`: one server-side connection. ``receive(bytes)`` returns h2 events (or raises
  :class:`Abuse` / ``h2.exceptions.ProtocolError``); ``data_to_send()`` drains what h2 wrote.
  It counts what an attacker can make us do for free and refuses past a limit:

  ========================  =====================================================  ======
  kind                      what is counted                                         answer
  ========================  =====================================================  ======
  ``rapid_reset``           RST_STREAM from the client per window (CVE-2023-44487)  GOAWAY
  ``control_flood``         PING/SETTINGS/PRIORITY/empty DATA frames per window      GOAWAY
  ``continuation_flood``    bytes/frames of one header block still being received   GOAWAY
  ``hpack_bomb``            decoded header list above ``max_header_list_size``      GOAWAY
  ``slow_reader``           bytes queued for a client that does not read            close
  ========================  =====================================================  ======

  GOAWAY carries ENHANCE_YOUR_CALM (0xb); the session counts ``dispa_h2_abuse_total{kind}``.

- :func:`parse_priority`: RFC 9218 ``priority`` field values (``u=0..7``, ``i``).
- :mod:`~dispa.protocols.http2.hpack_codec`: the compiled HPACK codec and received-header
  checks H2Core uses instead of the ``hpack`` library and ``h2``'s validation when
  ``dispa._rust`` is built (docs/http2.md, "Compiled HPACK and header checks").

The asyncio side (streams, the request pipeline, backpressure) is
:mod:`dispa.proxy.h2_session`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import h2.config
import h2.events
import h2.exceptions
import h2.settings
from h2.errors import ErrorCodes

from dispa.protocols.http2 import connection as _connection
from dispa.protocols.http2 import hpack_codec

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
PRIORITY_UPDATE = 0x10  # RFC 9218 §7.1 frame type
ABUSE_METRIC = "dispa_h2_abuse_total"

__all__ = ["PREFACE", "H2Limits", "H2Core", "Abuse", "parse_priority", "ErrorCodes",
           "ABUSE_METRIC", "limits_from"]


@dataclass(frozen=True)
class H2Limits:
    """HTTP/2 settings and abuse limits for downstream connections (``[http2]``)."""

    enabled: bool = False
    max_concurrent_streams: int = 128
    initial_window_size: int = 65535
    connection_window_size: int = 16 * 1024 * 1024  # raised once at the start
    max_frame_size: int = 16384
    max_header_list_size: int = 65536
    header_table_size: int = 4096
    # abuse limits (per connection)
    max_resets_per_window: int = 200
    max_control_frames_per_window: int = 500
    abuse_window_seconds: float = 1.0
    max_header_block_frames: int = 16  # HEADERS + CONTINUATION frames of one block
    max_queued_bytes: int = 4 * 1024 * 1024  # written but unread by the client
    # behaviour
    server_push: bool = False  # push Link: rel=preload hints (browsers dropped push)
    # RFC 8441: advertise SETTINGS_ENABLE_CONNECT_PROTOCOL and accept WebSocket streams
    # (extended CONNECT, :protocol websocket; dispa/proxy/h2_websocket.py)
    websocket: bool = True
    idle_timeout_seconds: float = 0.0  # 0: the proxy keep-alive timeout
    stream_buffer_bytes: int = 256 * 1024  # response bytes held per stream before pausing


def limits_from(data) -> H2Limits | None:
    """H2Limits from the snapshot's plain ``http2`` dict; None when HTTP/2 is off."""
    if not data or not data.get("enabled"):
        return None
    fields = {k: v for k, v in data.items() if k in H2Limits.__dataclass_fields__}
    return H2Limits(**fields)


class Abuse(Exception):
    """The client crossed an abuse limit: send GOAWAY ENHANCE_YOUR_CALM and close."""

    def __init__(self, kind: str, detail: str):
        super().__init__(f"{kind}: {detail}")
        self.kind = kind


class _Window:
    """Events per fixed window; ``hit()`` is True once the limit is crossed."""

    __slots__ = ("limit", "seconds", "start", "count")

    def __init__(self, limit: int, seconds: float):
        self.limit = limit
        self.seconds = seconds
        self.start = 0.0
        self.count = 0

    def hit(self, now: float, n: int = 1) -> bool:
        if now - self.start > self.seconds:
            self.start = now
            self.count = 0
        self.count += n
        return self.count > self.limit


class H2Core:
    """One server-side HTTP/2 connection with Dispa's limits (sans-I/O)."""

    def __init__(self, limits: H2Limits, *, client_side: bool = False):
        self.limits = limits
        # inbound header checks: h2's, or the same decisions compiled (hpack_codec.py)
        h2_checks = hpack_codec.check_headers is None
        cfg = h2.config.H2Configuration(client_side=client_side, header_encoding=None,
                                        validate_inbound_headers=h2_checks,
                                        normalize_inbound_headers=h2_checks,
                                        validate_outbound_headers=False,
                                        normalize_outbound_headers=False)
        self.conn = _connection.Connection(config=cfg)  # h2's, see connection.py
        hpack_codec.install(self.conn)  # compiled HPACK when built (hpack_codec.py)
        s = h2.settings.SettingCodes
        initial = {
            s.MAX_CONCURRENT_STREAMS: limits.max_concurrent_streams,
            s.INITIAL_WINDOW_SIZE: limits.initial_window_size,
            s.MAX_FRAME_SIZE: limits.max_frame_size,
            s.MAX_HEADER_LIST_SIZE: limits.max_header_list_size,
            s.HEADER_TABLE_SIZE: limits.header_table_size,
        }
        if limits.websocket and not client_side:
            initial[s.ENABLE_CONNECT_PROTOCOL] = 1  # RFC 8441 §3: WebSocket over h2
        # ENABLE_PUSH keeps h2's default: 0 from a server (RFC 9113 §6.5.2), 1 from a client
        self.conn.local_settings = h2.settings.Settings(client=client_side,
                                                        initial_values=initial)
        # HPACK: the decoder's dynamic table may not grow past what we advertised, and the
        # decoded header list is capped (HPACK bombs: small input, huge output)
        self.conn.decoder.max_allowed_table_size = limits.header_table_size
        self.conn.decoder.max_header_list_size = limits.max_header_list_size
        self.conn.max_inbound_frame_size = limits.max_frame_size
        self._resets = _Window(limits.max_resets_per_window, limits.abuse_window_seconds)
        self._control = _Window(limits.max_control_frames_per_window,
                                limits.abuse_window_seconds)
        self._block_cap = max(limits.max_header_list_size * 2, 16384)
        self.clock = time.monotonic

    def initiate(self) -> None:
        """Queue our preface (SETTINGS) and the connection window increase."""
        self.conn.initiate_connection()
        extra = self.limits.connection_window_size - 65535
        if extra > 0:
            self.conn.increment_flow_control_window(extra)

    def initiate_upgrade(self, settings_header: bytes) -> None:
        """``Upgrade: h2c`` (RFC 7540 §3.2): stream 1 is the upgraded request."""
        self.conn.initiate_upgrade_connection(settings_header)
        extra = self.limits.connection_window_size - 65535
        if extra > 0:
            self.conn.increment_flow_control_window(extra)

    def receive(self, data: bytes) -> list:
        """Feed bytes from the peer; the h2 events they make, after the abuse checks."""
        try:
            events = self.conn.receive_data(data)
        except h2.exceptions.DenialOfServiceError as exc:
            raise Abuse("hpack_bomb", str(exc)) from None
        except h2.exceptions.ProtocolError as exc:
            if "continuation" in str(exc).lower():
                raise Abuse("continuation_flood", str(exc)) from None
            raise
        pending = self.conn.incoming_buffer._headers_buffer  # one header block in progress
        if pending:
            if (len(pending) > self.limits.max_header_block_frames
                    or sum(len(f.data) for f in pending) > self._block_cap):
                raise Abuse("continuation_flood", f"{len(pending)} frames in one header block")
        now = self.clock()
        control = 0
        check = hpack_codec.check_headers
        for ev in events:
            t = type(ev)
            if check is not None and t in _HEADER_EVENTS:
                why = check(ev.headers, _HEADER_EVENTS[t])
                if why is not None:
                    # what h2's own validation does: a connection error
                    self.conn.close_connection(ErrorCodes.PROTOCOL_ERROR)
                    raise h2.exceptions.ProtocolError(why)
            elif t is h2.events.StreamReset and ev.remote_reset:
                if self._resets.hit(now):
                    raise Abuse("rapid_reset", "too many RST_STREAM frames")
            elif t in _CONTROL_EVENTS:
                control += 1
            elif t is h2.events.DataReceived and not ev.data and ev.stream_ended is None:
                control += 1  # empty DATA frames cost us work and the client nothing
        if control and self._control.hit(now, control):
            raise Abuse("control_flood", "too many PING/SETTINGS/PRIORITY frames")
        return events

    def calm_down(self, detail: str = "") -> None:
        """Queue GOAWAY ENHANCE_YOUR_CALM (the caller writes it and closes)."""
        try:
            self.conn.close_connection(ErrorCodes.ENHANCE_YOUR_CALM,
                                       additional_data=detail.encode()[:64] or None)
        except h2.exceptions.ProtocolError:
            pass

    def data_to_send(self) -> bytes:
        return self.conn.data_to_send()


# header events and the kind of block their headers are (hpack_codec.check_headers)
_HEADER_EVENTS = {
    h2.events.RequestReceived: hpack_codec.REQUEST,
    h2.events.PushedStreamReceived: hpack_codec.REQUEST,
    h2.events.ResponseReceived: hpack_codec.RESPONSE,
    h2.events.InformationalResponseReceived: hpack_codec.RESPONSE,
    h2.events.TrailersReceived: hpack_codec.TRAILERS,
}
_CONTROL_EVENTS = frozenset({h2.events.PingReceived, h2.events.RemoteSettingsChanged,
                             h2.events.PriorityUpdated, h2.events.UnknownFrameReceived})


def parse_priority(value: bytes | str | None, urgency: int = 3, incremental: bool = False
                   ) -> tuple[int, bool]:
    """RFC 9218 §4: ``u=N`` (0 most urgent .. 7) and ``i`` (incremental) from a structured
    field dictionary; unknown members and bad values are ignored (§4: MUST ignore)."""
    if not value:
        return urgency, incremental
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    for member in value.split(","):
        member = member.strip()
        key, _, v = member.partition("=")
        key = key.strip()
        v = v.split(";", 1)[0].strip()
        if key == "u":
            if v.isdigit() and 0 <= int(v) <= 7:
                urgency = int(v)
        elif key == "i":
            incremental = v in ("", "?1")
    return urgency, incremental


def parse_priority_update(payload: bytes) -> tuple[int, bytes] | None:
    """The prioritized stream id and field value of a PRIORITY_UPDATE frame payload."""
    if len(payload) < 4:
        return None
    sid = int.from_bytes(payload[:4], "big") & 0x7FFFFFFF
    return sid, bytes(payload[4:])
