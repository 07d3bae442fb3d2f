"""WebSocket over HTTP/2 (RFC 8441 extended CONNECT) towards HTTP/1.1 WebSocket upstreams.

Theory of operation
-------------------
With ``[http2] websocket`` on (the default) the :class:`~dispa.proxy.h2_session.H2Session`
advertises ``SETTINGS_ENABLE_CONNECT_PROTOCOL = 1`` and hands every ``:method CONNECT`` +
``:protocol`` stream to :func:`open_websocket_stream`, which validates it (RFC 8441 §4-5:
``:protocol websocket``, ``:scheme``, ``:path``, ``:authority``; otherwise 501 or 400) and
returns a :class:`WebSocketStream`.

The stream is a :class:`~dispa.proxy.h2_session.BridgeStream`: the request is written to a
regular HTTP/1.1 Session as the WebSocket upgrade it stands for (``GET :path``, ``Host:
:authority``, ``Upgrade: websocket``, a generated ``Sec-WebSocket-Key``,
``Sec-WebSocket-Version: 13``, the client's ``Sec-WebSocket-Protocol`` / ``-Extensions``
and other fields), so interception, routing rules, filters, balancing and forwarding
headers are those of an HTTP/1.1 upgrade, and the Session connects the upstream. Its answer:

- ``101`` whose ``Upgrade`` and ``Sec-WebSocket-Accept`` match our key: the client gets
  ``:status 200`` with the upstream's selected subprotocol and extensions, and the Session
  hands both "connections" to :meth:`WebSocketProxy.take_over` as for HTTP/1.1: this
  stream becomes the tunnel's downstream transport (``set_protocol``), so the same
  :class:`~dispa.proxy.websocket.WebSocketTunnel` (frame inspector, limits, timeouts,
  counters) runs between the stream's DATA and the upstream TCP connection;
- ``101`` that does not match: ``:status 502``, and the tunnel is aborted;
- anything else (403, 404, an interception's answer ...): passed to the client as is.

Mapping (RFC 8441 §6 and the tunnel's rules):

- client DATA -> ``Side.data_received``; the stream's WINDOW_UPDATEs stop while the tunnel
  pauses reading (the upstream socket's buffer is over its high-water mark): the client
  can be at most one window ahead of what the upstream drained;
- tunnel writes -> DATA as the client's windows allow; once the window is spent and
  ``TUNNEL_BUFFER_BYTES`` (64 KiB, at most ``stream_buffer_bytes``) wait for it, the tunnel
  stops reading the upstream (``pause_writing``) until half of that has left;
- client END_STREAM -> ``eof_received`` (the tunnel closes the upstream after its queue);
  client RST_STREAM or the h2 connection lost -> ``connection_lost``;
- the tunnel's ``close`` -> END_STREAM after the queued DATA (and RST_STREAM NO_ERROR if
  the client has not ended its side: its close frame has already passed); ``abort`` ->
  RST_STREAM CANCEL.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import os

from h2.errors import ErrorCodes

from dispa.protocols.http1 import DATA, END, HEAD, NEED_DATA, UPGRADE, ProtocolError
from dispa.proxy.h2_session import BridgeStream, _response_headers

log = logging.getLogger("dispa.h2")

__all__ = ["WebSocketStream", "open_websocket_stream", "accept_for"]

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455 §1.3
REFUSED_METRIC = "dispa_h2_websocket_refused_total"
#: Bytes a tunnel stream queues for the client (its window spent) before the upstream is
#: paused (at most ``stream_buffer_bytes``): tunnels are long-lived and many, so each holds
#: little; the client's window, not this queue, sets the throughput.
TUNNEL_BUFFER_BYTES = 64 * 1024
# request fields that belong to the HTTP/1.1 handshake we build, not to the client's stream
_DROP_REQUEST = frozenset({b"host", b"cookie", b"te", b"content-length", b"upgrade",
                           b"connection", b"sec-websocket-key", b"sec-websocket-version",
                           b"sec-websocket-accept", b"transfer-encoding", b"keep-alive"})
# response fields of the HTTP/1.1 handshake that mean nothing on an h2 stream
_DROP_RESPONSE = frozenset({b"sec-websocket-accept", b"content-length"})


def accept_for(key: bytes) -> bytes:
    """The ``Sec-WebSocket-Accept`` value an upstream must answer ``key`` with (§4.2.2)."""
    return base64.b64encode(hashlib.sha1(key + _GUID).digest())


def _refuse(h2s, sid: int, status: int, ended: bool, headers=()) -> None:
    h2s.server.metrics.inc(REFUSED_METRIC, (("status", str(status)),))
    h2s.refuse(sid, status, ended, headers)


def open_websocket_stream(h2s, sid: int, pseudo: dict, fields: list, ended: bool):
    """A :class:`WebSocketStream` for a valid extended CONNECT, else None (answered 400 or
    501 already)."""
    protocol = pseudo.get(b":protocol", b"")
    if protocol.lower() != b"websocket":
        _refuse(h2s, sid, 501, ended)  # a protocol we do not tunnel
        return None
    scheme = pseudo.get(b":scheme", b"")
    path = pseudo.get(b":path", b"")
    authority = pseudo.get(b":authority", b"")
    version = None
    for n, v in fields:
        if n == b"sec-websocket-version":
            version = v
    if ended or scheme not in (b"http", b"https") or path[:1] != b"/" or b" " in path \
            or not authority or b" " in authority or b"@" in authority:
        _refuse(h2s, sid, 400, ended)
        return None
    if version is not None and version.strip() != b"13":
        _refuse(h2s, sid, 400, ended, [(b"sec-websocket-version", b"13")])  # RFC 6455 §4.4
        return None
    key = base64.b64encode(os.urandom(16))
    parts = [b"GET ", path, b" HTTP/1.1\r\nHost: ", authority, b"\r\n"]
    cookies = []
    for n, v in fields:
        if n in _DROP_REQUEST:
            if n == b"cookie":
                cookies.append(v)
            continue
        parts += [n, b": ", v, b"\r\n"]
    if cookies:
        parts += [b"cookie: ", b"; ".join(cookies), b"\r\n"]
    # "close": when the upstream refuses the upgrade, the Session ends after its answer
    parts += [b"Upgrade: websocket\r\nConnection: Upgrade, close\r\nSec-WebSocket-Key: ",
              key, b"\r\nSec-WebSocket-Version: 13\r\n\r\n"]
    return WebSocketStream(h2s, sid, b"".join(parts), key)


class WebSocketStream(BridgeStream):
    """An extended CONNECT stream: first the Session's transport for the upgrade, then the
    tunnel's downstream transport (module docstring)."""

    __slots__ = ("accept", "side", "rejected", "tunnel_via")

    def __init__(self, h2s, sid: int, head_bytes: bytes, key: bytes):
        self.accept = accept_for(key)
        self.side = None  # the tunnel's downstream Side, once the Session handed over
        self.rejected = False  # the upstream's 101 did not match our key
        self.tunnel_via = "h2"  # WebSocketProxy.take_over labels the tunnel with it
        super().__init__(h2s, sid, head_bytes, b"GET", False, True)
        self.req_ended = False  # the client's half of the tunnel is open
        # what waits for the client's window: past this, stop reading the upstream
        self.buffer_high = min(self.buffer_high, TUNNEL_BUFFER_BYTES)

    # ---- the upgrade's response (before the hand-over)
    def _drain_parser(self) -> None:
        parser = self.parser
        try:
            while not self.done:
                ev = parser.next_event()
                if ev == NEED_DATA:
                    return
                if ev == HEAD and parser.head.status == 101 and not self.resp_started:
                    self._upgraded(parser.head.headers)
                elif ev == UPGRADE:
                    return  # after our 101: the Session calls take_over next
                else:
                    self._pass_event(ev)
        except ProtocolError as exc:
            log.info("bad upgrade response bytes on stream %d: %s", self.sid, exc)
            self._reset(ErrorCodes.INTERNAL_ERROR)

    def _pass_event(self, ev) -> None:
        """One parser event of a response that is not our 101 (BridgeStream's handling)."""
        parser = self.parser
        h2s = self.h2s
        if ev == DATA:
            chunk = parser.take_data()
            if chunk and not self.interim:
                h2s.queue_data(self, chunk)
        elif ev == HEAD:
            rh = parser.head
            if rh.status < 200:
                self.interim = True
                if rh.status != 100:
                    h2s.send_headers(self, _response_headers(rh.status, rh.headers),
                                     end=False)
                return
            self.resp_started = True
            h2s.send_headers(self, _response_headers(rh.status, rh.headers), end=False)
            self.headers_sent = True
        elif ev == END:
            if self.interim:
                self.interim = False
                parser.expect(self.method)
                return
            h2s.queue_end(self, None)
            self.done = True
            if not self.req_ended:
                h2s.end_early(self)
        else:  # UPGRADE after a response that was not our 101: no tunnel
            self._reset(ErrorCodes.INTERNAL_ERROR)

    def _upgraded(self, raw_headers) -> None:
        upgrade = accept = None
        headers = []
        for n, v in raw_headers:
            ln = n.lower()
            if ln == b"upgrade":
                upgrade = v
            elif ln == b"sec-websocket-accept":
                accept = v.strip()
            if ln not in _DROP_RESPONSE:
                headers.append((n, v))
        if upgrade is None or upgrade.strip().lower() != b"websocket" or accept != self.accept:
            log.info("stream %d: the upstream's 101 does not accept our WebSocket key",
                     self.sid)
            self.rejected = True
            self.h2s.server.metrics.inc(REFUSED_METRIC, (("status", "502"),))
            self.h2s.send_headers(self, [(b":status", b"502"), (b"content-length", b"0")],
                                  end=True)
            self.done = True
            if not self.req_ended:
                self.h2s.end_early(self)
            return
        self.resp_started = True
        self.headers_sent = True
        self.h2s.send_headers(self, _response_headers(200, headers), end=False)

    # ---- the hand-over (WebSocketProxy.take_over)
    def set_protocol(self, side) -> None:
        self.side = side
        if self.rejected or self.closed:
            # no tunnel after a bad 101 (or a stream already gone): drop the upstream
            asyncio.get_running_loop().call_soon(side.tunnel._abort, "protocol error")

    def get_protocol(self):
        return self.side if self.side is not None else self.sess

    def get_write_buffer_limits(self):
        return self.buffer_high // 2, self.buffer_high

    # ---- client -> tunnel
    def on_data(self, data: bytes) -> None:
        side = self.side
        if side is None:
            super().on_data(data)  # before the 101: the Session buffers it
        elif not self.closed:
            side.data_received(data)

    def on_end(self, trailers) -> None:
        self.req_ended = True
        side = self.side
        if side is not None and not self.closed:
            side.eof_received()

    # ---- tunnel -> client
    def write(self, data) -> None:
        if self.side is None:
            super().write(data)
        elif not self.closed and not self.done:
            self.h2s.queue_data(self, bytes(data))

    def pause_producer(self) -> None:
        self.producer_paused = True
        if self.closed:
            return
        if self.side is not None:
            self.side.pause_writing()
        else:
            self.sess.pause_writing()

    def resume_producer(self) -> None:
        self.producer_paused = False
        if self.closed:
            return
        if self.side is not None:
            self.side.resume_writing()
        else:
            self.sess.resume_writing()

    def close(self) -> None:
        if self.side is None:
            super().close()
            return
        if self.closed:
            return
        self.closed = True
        if not self.done:
            self.h2s.queue_end(self, None)  # END_STREAM after the queued DATA
            if not self.req_ended:
                self.h2s.end_early(self)
        asyncio.get_running_loop().call_soon(self._lost, None)

    def abort(self) -> None:
        if self.side is None:
            super().abort()
            return
        if self.closed:
            return
        self.closed = True
        if not self.done:
            self._reset(ErrorCodes.CANCEL)  # RFC 8441 §6: a TCP reset is RST_STREAM CANCEL
        asyncio.get_running_loop().call_soon(self._lost, None)

    def _lost(self, exc) -> None:
        if self.lost_sent:
            return
        self.lost_sent = True
        if self.side is not None:
            self.side.connection_lost(exc)
        else:
            self.sess.connection_lost(exc)

