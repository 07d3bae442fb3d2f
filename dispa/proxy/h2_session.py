"""One downstream HTTP/2 connection: streams into the same request pipeline as HTTP/1.1.

Theory of operation
-------------------
:class:`H2Session` is the asyncio protocol of a connection that speaks HTTP/2 (h2c with prior
knowledge, ``Upgrade: h2c`` or ALPN ``h2``, see :mod:`dispa.server.detect`). Framing, HPACK
and stream states are the ``h2`` library's (:mod:`dispa.protocols.http2` adds the limits).

Each request stream becomes one of two kinds of stream object:

- :class:`BridgeStream` (every route whose upstream speaks HTTP/1.1): the stream is handed
  to a regular :class:`~dispa.proxy.protocol.Session` (compiled or pure) as if it were an
  HTTP/1.1 connection carrying one request. The stream object *is* that Session's
  transport: request headers and DATA are written to the Session as HTTP/1.1 bytes (chunked
  when the length is unknown), and what the Session writes back is parsed with the
  HTTP/1.1 response parser and sent as HEADERS/DATA/trailers. So routing, interception,
  filters, retries, balancing, forwarding headers, request ids, metrics and the log phase
  are exactly those of HTTP/1.1 (ARCHITECTURE §2), with nothing duplicated.
- ``UpstreamH2Stream`` (:mod:`dispa.proxy.grpc`) for target groups with
  ``protocol = "h2c" | "h2"``: the stream is forwarded as an HTTP/2 stream over a
  multiplexed upstream connection (:mod:`dispa.proxy.h2_pool`), keeping trailers (gRPC).
- ``WebSocketStream`` (:mod:`dispa.proxy.h2_websocket`) for RFC 8441 extended CONNECT
  (``:protocol websocket``, advertised with SETTINGS_ENABLE_CONNECT_PROTOCOL when
  ``[http2] websocket``): a BridgeStream whose Session performs the HTTP/1.1 WebSocket
  upgrade, after which the stream carries the WebSocket tunnel.

Backpressure, end to end:

- client -> upstream: a stream's WINDOW_UPDATEs are sent only while its consumer reads
  (the Session pauses its "transport" when the upstream socket's buffer is full, the h2
  upstream stream when the upstream's window is spent); the connection window is large and
  acknowledged as bytes reach a stream, so one slow stream does not block the others.
- upstream -> client: response DATA is queued per stream and written only as the client's
  flow-control windows allow; once a stream holds more than ``stream_buffer_bytes`` its
  producer is paused (the Session stops reading its upstream connection, the h2 upstream
  stream stops acknowledging DATA).

Writes are scheduled once per loop turn (:meth:`H2Session._schedule`): all streams' frames
leave in one ``transport.write``. DATA is ordered by RFC 9218 urgency (``priority`` header
or PRIORITY_UPDATE), non-incremental streams one after another, incremental ones
interleaved.

Shutdown and reload: :meth:`H2Session.drain` sends GOAWAY (NO_ERROR, last stream id);
streams in flight finish, new ones are refused by h2, and the connection closes when the last
stream ends (``DataPlane.drain`` waits for it like for an HTTP/1.1 Session).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque

import h2.events
import h2.exceptions
from h2.errors import ErrorCodes
from hpack import NeverIndexedHeaderTuple
from hyperframe.frame import GoAwayFrame

from dispa.protocols.http1 import DATA, END, HEAD, NEED_DATA, ProtocolError, ResponseParser
from dispa.protocols.http2 import (
    ABUSE_METRIC, PRIORITY_UPDATE, Abuse, H2Core, H2Limits, parse_priority,
)
from dispa.protocols.http2 import parse_priority_update

log = logging.getLogger("dispa.h2")

STREAMS_METRIC = "dispa_h2_streams_total"
_WRITE_HIGH = 256 * 1024
_LINGER_SECONDS = 1.0  # after our FIN, how long the client's late bytes are read and dropped
_CONN_ACK_FRACTION = 4  # acknowledge the connection window every 1/4 of it
# Response headers that do not exist in HTTP/2 (RFC 9113 §8.2.2)
_HOP = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding",
                  b"upgrade", b"te"})
_STATUS = {n: str(n).encode() for n in range(100, 600)}


class StreamBase:
    """What the session needs of every stream: the outbound queue and inbound hooks."""

    __slots__ = ("h2s", "sid", "out", "out_bytes", "end_pending", "trailers", "urgency",
                 "incremental", "unacked", "in_paused", "producer_paused", "done",
                 "headers_sent", "reset_sent", "early", "fin_sent", "authority", "buffer_high")

    def __init__(self, h2s: "H2Session", sid: int):
        self.h2s = h2s
        self.sid = sid
        self.out: deque = deque()
        self.out_bytes = 0
        self.end_pending = False
        self.trailers = None
        self.urgency = 3
        self.incremental = False
        self.unacked = 0  # request DATA received but not yet acknowledged to the stream
        self.in_paused = False
        self.producer_paused = False
        self.done = False  # nothing more will be sent on this stream
        self.headers_sent = False
        self.reset_sent = False
        self.early = False  # response done before the request: RST_STREAM(NO_ERROR) after
        self.fin_sent = False  # END_STREAM went out with the last DATA frame
        self.authority = b""
        # queued response bytes that pause the producer (resumed at half)
        self.buffer_high = h2s.limits.stream_buffer_bytes

    # inbound (client -> proxy); subclasses override
    def on_data(self, data: bytes) -> None:
        raise NotImplementedError

    def on_end(self, trailers) -> None:
        raise NotImplementedError

    def on_reset(self) -> None:
        raise NotImplementedError

    def on_connection_lost(self) -> None:
        self.on_reset()

    def pause_producer(self) -> None:
        """The client is not reading this stream's response fast enough."""

    def resume_producer(self) -> None:
        """The stream's response queue drained."""

    # inbound flow control
    def pause_in(self) -> None:
        self.in_paused = True

    def resume_in(self) -> None:
        if self.in_paused:
            self.in_paused = False
            if self.unacked:
                self.h2s.ack_stream(self)


class BridgeStream(StreamBase):
    """A request stream served by an HTTP/1.1 Session; this object is its transport."""

    __slots__ = ("sess", "parser", "chunked", "closed", "method", "resp_started",
                 "interim", "req_ended", "lost_sent")

    def __init__(self, h2s: "H2Session", sid: int, head_bytes: bytes, method: bytes,
                 chunked: bool, ended: bool):
        super().__init__(h2s, sid)
        self.method = method
        self.chunked = chunked
        self.closed = False
        self.resp_started = False
        self.interim = False
        self.req_ended = ended
        self.lost_sent = False
        self.parser = ResponseParser()
        self.parser.expect(method)
        sess = h2s.server.session_factory()
        if h2s.tls is not None:
            sess.tls = h2s.tls
        self.sess = sess
        sess.connection_made(self)
        if not self.closed:
            sess.data_received(head_bytes)

    # ---- client -> Session
    def on_data(self, data: bytes) -> None:
        if self.closed:
            return
        if self.chunked:
            data = b"%x\r\n%b\r\n" % (len(data), data) if data else b""
        if data:
            self.sess.data_received(data)

    def on_end(self, trailers) -> None:
        self.req_ended = True
        if self.closed:
            return
        if self.chunked:
            if trailers:
                t = b"".join(n + b": " + v + b"\r\n" for n, v in trailers
                             if n[:1] != b":")
                self.sess.data_received(b"0\r\n" + t + b"\r\n")
            else:
                self.sess.data_received(b"0\r\n\r\n")

    def on_reset(self) -> None:
        """The client reset the stream (or the connection went away)."""
        self.done = True
        if not self.closed:
            self.closed = True
            self._lost(None)

    def pause_producer(self) -> None:
        self.producer_paused = True
        if not self.closed:
            self.sess.pause_writing()

    def resume_producer(self) -> None:
        self.producer_paused = False
        if not self.closed:
            self.sess.resume_writing()

    # ---- the transport API the Session uses
    def get_extra_info(self, name, default=None):
        return self.h2s.extra_info(name, default)

    def set_write_buffer_limits(self, high=None, low=None) -> None:
        pass  # the stream's own limit is stream_buffer_bytes

    def get_write_buffer_size(self) -> int:
        return self.out_bytes

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        self.pause_in()

    def resume_reading(self) -> None:
        self.resume_in()

    def write(self, data) -> None:
        if self.done:
            return
        parser = self.parser
        parser.feed(bytes(data))
        self._drain_parser()

    def _drain_parser(self) -> None:
        parser = self.parser
        h2s = self.h2s
        try:
            while True:
                ev = parser.next_event()
                if ev == NEED_DATA:
                    return
                if ev == DATA:
                    chunk = parser.take_data()
                    if chunk and not self.interim:
                        h2s.queue_data(self, chunk)
                elif ev == HEAD:
                    rh = parser.head
                    status = rh.status
                    if status < 200:
                        self.interim = True
                        if status != 100 and status != 101:
                            h2s.send_headers(self, _response_headers(status, rh.headers),
                                             end=False)
                        continue
                    self.resp_started = True
                    h2s.response_head(self, status, rh.headers)
                elif ev == END:
                    if self.interim:
                        self.interim = False
                        parser.expect(self.method)
                        continue
                    trailers = parser.trailers
                    h2s.queue_end(self, [(n.lower(), v) for n, v in trailers]
                                  if trailers else None)
                    self.done = True
                    return
                else:  # UPGRADE: no tunnels inside an HTTP/2 stream
                    self._reset(ErrorCodes.INTERNAL_ERROR)
                    return
        except ProtocolError as exc:
            log.info("bad response bytes on stream %d: %s", self.sid, exc)
            self._reset(ErrorCodes.INTERNAL_ERROR)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if not self.done:
            self.parser.feed_eof()
            self._drain_parser()
            if not self.done:
                self._reset(ErrorCodes.INTERNAL_ERROR)
        elif not self.req_ended:
            # answered before the request body ended: stop the client (RFC 9113 §8.1)
            self.h2s.end_early(self)
        self.h2s._loop.call_soon(self._lost, None)

    def abort(self) -> None:
        if self.closed:
            return
        self.closed = True
        if not self.done:
            self._reset(ErrorCodes.INTERNAL_ERROR)
        self.h2s._loop.call_soon(self._lost, None)

    def write_eof(self) -> None:
        self.close()

    def can_write_eof(self) -> bool:
        return False

    def _reset(self, code) -> None:
        self.done = True
        self.h2s.reset_stream(self, code)

    def _lost(self, exc) -> None:
        if not self.lost_sent:
            self.lost_sent = True
            sess = self.sess
            # the Session holds this stream as its transport: dropping our reference ends
            # the cycle, so both go with their reference counts, not the cyclic GC
            self.sess = None
            sess.connection_lost(exc)


def _response_headers(status: int, raw) -> list:
    headers = [(b":status", _STATUS.get(status) or str(status).encode())]
    for n, v in raw:
        n = n.lower()
        if n not in _HOP:
            headers.append((n, v))
    return headers


class H2Session(asyncio.Protocol):
    """One downstream HTTP/2 connection (see the module docstring)."""

    def __init__(self, server, limits: H2Limits, *, tls=None):
        self.server = server  # dispa.server.worker.DataPlane
        self.limits = limits
        self.tls = tls  # tls.mtls.TlsInfo on TLS connections
        self.core = H2Core(limits)
        self.transport = None
        self.peer_ip = ""
        self.streams: dict[int, StreamBase] = {}
        self.sending: dict[int, StreamBase] = {}  # streams with queued output
        self.deadline = 0.0
        self.write_paused = False
        self.closing = False  # GOAWAY sent
        self.closed = False
        self.conn_unacked = 0
        self._scheduled = False
        self._loop = None
        self._handoff = None  # how a stream is served: proxy.grpc.route_stream or None
        self._extra: dict = {}  # transport extra info by name (extra_info)

    # ------------------------------------------------------------------ connection
    def connection_made(self, transport, *, upgrade: tuple | None = None) -> None:
        """Start serving. ``upgrade`` = (HTTP2-Settings value, request headers, method)
        when the connection came from ``Upgrade: h2c`` (the request becomes stream 1)."""
        self.transport = transport
        self._loop = asyncio.get_running_loop()
        peer = transport.get_extra_info("peername")
        self.peer_ip = peer[0] if peer else ""
        transport.set_write_buffer_limits(high=_WRITE_HIGH)
        server = self.server
        server.sessions.add(self)
        server.metrics.inc("dispa_h2_connections_total")
        try:
            from dispa.proxy import grpc
            self._handoff = grpc.route_stream
        except ImportError:  # pragma: no cover - grpc.py is part of the package
            self._handoff = None
        if upgrade is None:
            self.core.initiate()
        else:
            try:
                self.core.initiate_upgrade(upgrade[0])
            except Exception:  # noqa: BLE001 - a bad HTTP2-Settings value
                self.core.initiate()
        self._idle_deadline()
        self._write()
        if upgrade is not None:
            self._start_stream(1, upgrade[1], True)
        if server.draining:
            self.drain()

    def connection_lost(self, exc) -> None:
        self.closed = True
        self.server.sessions.discard(self)
        streams, self.streams = self.streams, {}
        self.sending.clear()
        for st in streams.values():
            try:
                st.on_connection_lost()
            except Exception:  # noqa: BLE001 - one stream must not stop the others
                log.exception("stream cleanup failed")

    def extra_info(self, name, default=None):
        """The transport's ``get_extra_info``, asked once per connection and name (each
        stream's Session asks for the peer address)."""
        try:
            value = self._extra[name]
        except KeyError:
            t = self.transport
            value = self._extra[name] = t.get_extra_info(name) if t is not None else None
        return default if value is None else value

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        self._schedule()

    def eof_received(self):
        return False

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        try:
            events = self.core.receive(data)
        except Abuse as exc:
            self._abuse(exc.kind, str(exc))
            return
        except h2.exceptions.ProtocolError as exc:
            log.debug("h2 protocol error from %s: %s", self.peer_ip, exc)
            self.server.metrics.inc("dispa_protocol_errors_total", (("status", "h2"),))
            self._write()
            self._close()
            return
        for ev in events:
            handler = _HANDLERS.get(type(ev))
            if handler is not None:
                try:
                    handler(self, ev)
                except Exception:  # noqa: BLE001 - a bug must not leave a half-dead connection
                    log.exception("HTTP/2 event %s failed", type(ev).__name__)
                    try:
                        self.core.conn.close_connection(ErrorCodes.INTERNAL_ERROR)
                        self._write()
                    except h2.exceptions.ProtocolError:
                        pass
                    self._close()
                    return
            if self.closed:
                return
        self._write()
        if self.transport is not None and not self.closed and \
                self.transport.get_write_buffer_size() > self.limits.max_queued_bytes:
            self._abuse("slow_reader", "client does not read what it asks for")

    # ------------------------------------------------------------------ h2 events
    def _on_request(self, ev) -> None:
        if self.closing:
            self._reset_id(ev.stream_id, ErrorCodes.REFUSED_STREAM)
            return
        self._start_stream(ev.stream_id, ev.headers, ev.stream_ended is not None)
        if ev.priority_updated is not None:
            pass  # RFC 7540 priorities are deprecated (RFC 9113 §5.3.2); ignored

    def _start_stream(self, sid: int, headers, ended: bool) -> None:
        self.deadline = 0.0
        pseudo = {}
        fields = []
        prio = None
        # HTTP/1.1 bytes are built from these fields (BridgeStream): names and values were
        # checked on receipt (RFC 9113 §8.2.1, no CR/LF/NUL, no uppercase/space/colon in
        # names, H2Core.receive: h2's validation or hpack_codec.check_headers), and an
        # h2c upgrade's by the HTTP/1.1 parser
        cookies = None
        for h in headers:
            n, v = h
            if n[:1] == b":":
                pseudo[n] = v
                continue
            if n == b"cookie":
                if cookies is None:
                    cookies = [v]
                else:
                    cookies.append(v)
                continue
            if n == b"priority":
                prio = v
            fields.append(h)
        if cookies is not None:
            # split cookie fields joined back (RFC 9113 §8.2.3), last and never indexed
            # where re-encoded: what h2's inbound normalisation does when it is on
            fields.append(NeverIndexedHeaderTuple(b"cookie", b"; ".join(cookies)))
        method = pseudo.get(b":method", b"")
        path = pseudo.get(b":path", b"")
        if method == b"CONNECT":
            # RFC 8441 extended CONNECT (:protocol websocket) when advertised; a plain
            # CONNECT, or :protocol without our SETTINGS_ENABLE_CONNECT_PROTOCOL (§3), is
            # malformed here
            if b":protocol" not in pseudo or not self.limits.websocket:
                self._reset_id(sid, ErrorCodes.PROTOCOL_ERROR)
                return
            from dispa.proxy.h2_websocket import open_websocket_stream
            self.server.metrics.inc(STREAMS_METRIC)
            st = open_websocket_stream(self, sid, pseudo, fields, ended)
        elif not path or (path[:1] != b"/" and path != b"*") \
                or b" " in path or b" " in method \
                or b" " in pseudo.get(b":authority", b""):
            self._reset_id(sid, ErrorCodes.PROTOCOL_ERROR)
            return
        else:
            self.server.metrics.inc(STREAMS_METRIC)
            st = None
            if self._handoff is not None:
                st = self._handoff(self, sid, pseudo, fields, ended)
            if st is None:
                st = self._bridge(sid, pseudo, fields, ended, method, path)
        if st is None:
            return
        if prio is not None:
            st.urgency, st.incremental = parse_priority(prio)
        st.authority = pseudo.get(b":authority") or b""
        if not st.done or st.out or st.end_pending:
            self.streams[sid] = st

    def _bridge(self, sid, pseudo, fields, ended, method, path):
        authority = pseudo.get(b":authority")
        parts = [method, b" ", path, b" HTTP/1.1\r\n"]
        if authority is not None:
            parts += [b"Host: ", authority, b"\r\n"]
        cookies = []
        has_length = False
        for n, v in fields:
            if n == b"host":
                if authority is not None:
                    continue
            elif n == b"cookie":
                cookies.append(v)
                continue
            elif n == b"content-length":
                has_length = True
            elif n == b"te":
                continue
            parts += [n, b": ", v, b"\r\n"]
        if cookies:
            parts += [b"cookie: ", b"; ".join(cookies), b"\r\n"]
        chunked = not ended and not has_length
        if chunked:
            parts.append(b"Transfer-Encoding: chunked\r\n")
        parts.append(b"Connection: close\r\n\r\n")
        return BridgeStream(self, sid, b"".join(parts), method, chunked, ended)

    def _on_data(self, ev) -> None:
        n = ev.flow_controlled_length
        sid = ev.stream_id
        st = self.streams.get(sid)
        if n:
            self.conn_unacked += n
            if self.conn_unacked >= self.limits.connection_window_size // _CONN_ACK_FRACTION:
                self.core.conn.increment_flow_control_window(self.conn_unacked)
                self.conn_unacked = 0
        if st is None:
            return
        if n:
            st.unacked += n
            if not st.in_paused:
                self.ack_stream(st)
        st.on_data(ev.data)  # END_STREAM comes as its own StreamEnded event

    def _on_end_stream(self, ev) -> None:
        st = self.streams.get(ev.stream_id)
        if st is not None:
            st.on_end(None)

    def _on_trailers(self, ev) -> None:
        st = self.streams.get(ev.stream_id)
        if st is not None:
            st.on_end(ev.headers)

    def _on_reset(self, ev) -> None:
        st = self.streams.pop(ev.stream_id, None)
        self.sending.pop(ev.stream_id, None)
        if st is not None:
            st.done = True
            st.on_reset()
        self._idle_deadline()

    def _on_window(self, ev) -> None:
        self._schedule()

    def _on_terminated(self, ev) -> None:
        # the client sent GOAWAY: finish what we have, then close
        self.closing = True
        if not self.streams:
            self._close()

    def _on_unknown(self, ev) -> None:
        frame = ev.frame
        if getattr(frame, "type", None) == PRIORITY_UPDATE and frame.stream_id == 0:
            parsed = parse_priority_update(frame.body)
            if parsed is not None:
                st = self.streams.get(parsed[0])
                if st is not None:
                    st.urgency, st.incremental = parse_priority(parsed[1])

    # ------------------------------------------------------------------ used by streams
    def ack_stream(self, st: StreamBase) -> None:
        n, st.unacked = st.unacked, 0
        if n and not self.closed:
            try:
                self.core.conn.increment_flow_control_window(n, stream_id=st.sid)
            except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
                return
            self._schedule()

    def send_headers(self, st: StreamBase, headers: list, *, end: bool) -> None:
        if self.closed or st.reset_sent:
            return
        try:
            self.core.conn.send_headers(st.sid, headers, end_stream=end)
        except h2.exceptions.ProtocolError as exc:
            log.debug("cannot send headers on stream %d: %s", st.sid, exc)
            return
        if end:
            self._stream_finished(st)
        self._schedule()

    def response_head(self, st: StreamBase, status: int, raw_headers) -> None:
        """Send a final response head; push ``Link: rel=preload`` targets when enabled."""
        headers = _response_headers(status, raw_headers)
        st.headers_sent = True
        if self.limits.server_push and 200 <= status < 300:
            self._push(st, headers)
        self.send_headers(st, headers, end=False)

    def queue_data(self, st: StreamBase, data: bytes) -> None:
        if self.closed or st.reset_sent:
            return
        st.out.append(data)
        st.out_bytes += len(data)
        self.sending[st.sid] = st
        if st.out_bytes > st.buffer_high and not st.producer_paused:
            st.pause_producer()
        self._schedule()

    def queue_end(self, st: StreamBase, trailers) -> None:
        if self.closed or st.reset_sent:
            return
        st.end_pending = True
        st.trailers = trailers
        self.sending[st.sid] = st
        self._schedule()

    def reset_stream(self, st: StreamBase, code) -> None:
        if st.reset_sent:
            return
        st.reset_sent = True
        st.done = True
        self.streams.pop(st.sid, None)
        self.sending.pop(st.sid, None)
        self._reset_id(st.sid, code)
        self._idle_deadline()

    def end_early(self, st: StreamBase) -> None:
        """The response is complete before the request: RST_STREAM NO_ERROR once sent."""
        if st.sid in self.sending:
            st.early = True
        elif not st.reset_sent:
            self._reset_id(st.sid, ErrorCodes.NO_ERROR)

    def refuse(self, sid: int, status: int, ended: bool, headers=()) -> None:
        """Answer a stream with a bodiless ``status`` (no stream object needed); a client
        still sending is stopped with RST_STREAM NO_ERROR (RFC 9113 §8.1)."""
        if self.closed:
            return
        try:
            self.core.conn.send_headers(
                sid, [(b":status", _STATUS[status]), (b"content-length", b"0"), *headers],
                end_stream=True)
        except h2.exceptions.ProtocolError:
            return
        if not ended:
            self._reset_id(sid, ErrorCodes.NO_ERROR)
        self._schedule()

    def _reset_id(self, sid: int, code) -> None:
        if self.closed:
            return
        try:
            self.core.conn.reset_stream(sid, code)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            pass
        self._schedule()

    def _push(self, st: StreamBase, headers: list) -> None:
        conn = self.core.conn
        if not conn.remote_settings.enable_push:
            return
        links = [v for n, v in headers if n == b"link"]
        authority = st.authority
        for value in links:
            for item in value.split(b","):
                if b"rel=preload" not in item.lower() or b"nopush" in item.lower():
                    continue
                start, end = item.find(b"<"), item.find(b">")
                if start < 0 or end <= start or item[start + 1:start + 2] != b"/":
                    continue
                path = item[start + 1:end]
                try:
                    pid = conn.get_next_available_stream_id()
                    req = [(b":method", b"GET"), (b":path", path), (b":scheme", b"https" if self.tls is not None else b"http"),
                           (b":authority", authority or b"localhost")]
                    conn.push_stream(st.sid, pid, req)
                except h2.exceptions.ProtocolError:
                    return
                self.server.metrics.inc("dispa_h2_pushes_total")
                pushed = self._bridge(pid, dict(req), [], True, b"GET", path)
                pushed.authority = authority
                if not pushed.done or pushed.out or pushed.end_pending:
                    self.streams[pid] = pushed

    # ------------------------------------------------------------------ writing
    def _schedule(self) -> None:
        if not self._scheduled and not self.closed:
            self._scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._scheduled = False
        if self.closed:
            return
        more = self.sending and not self.write_paused and self._send_data()
        self._write()
        if more and not self.write_paused:
            self._schedule()  # the byte budget of one turn ran out, not the windows

    def _send_data(self) -> bool:
        """Send queued DATA as the windows allow, most urgent first; True when it stopped
        at the per-turn byte budget with data still sendable."""
        conn = self.core.conn
        order = sorted(self.sending.values(), key=_prio_key)
        max_frame = conn.max_outbound_frame_size
        progress = True
        sent = 0
        while progress and order and sent < _WRITE_HIGH:
            progress = False
            for st in order:
                sid = st.sid
                if st.reset_sent:
                    self.sending.pop(sid, None)
                    continue
                out = st.out
                while out:
                    try:
                        win = conn.local_flow_control_window(sid)
                    except h2.exceptions.ProtocolError:
                        out.clear()
                        st.out_bytes = 0
                        break
                    if win <= 0:
                        break
                    chunk = out[0]
                    n = min(win, max_frame, len(chunk))
                    if n < len(chunk):
                        conn.send_data(sid, chunk[:n])
                        out[0] = chunk[n:]
                    else:
                        out.popleft()
                        fin = not out and st.end_pending and not st.trailers and not st.early
                        conn.send_data(sid, chunk, end_stream=fin)
                        st.fin_sent = fin
                    st.out_bytes -= n
                    sent += n
                    progress = True
                    if st.incremental:
                        break  # one frame, then the next stream of this urgency
                if st.producer_paused and st.out_bytes <= st.buffer_high >> 1:
                    st.resume_producer()
                if not out:
                    if st.end_pending:
                        self._finish_stream(st)
                    self.sending.pop(sid, None)
            order = [st for st in order if st.sid in self.sending]
        return sent >= _WRITE_HIGH and bool(self.sending)

    def _finish_stream(self, st: StreamBase) -> None:
        conn = self.core.conn
        sid = st.sid
        st.end_pending = False
        try:
            if st.trailers:
                conn.send_headers(sid, st.trailers, end_stream=True)
            elif not st.fin_sent:
                conn.end_stream(sid)
        except h2.exceptions.ProtocolError:
            pass
        if st.early:
            try:
                conn.reset_stream(sid, ErrorCodes.NO_ERROR)
            except h2.exceptions.ProtocolError:
                pass
        self._stream_finished(st)

    def _stream_finished(self, st: StreamBase) -> None:
        st.done = True
        self.sending.pop(st.sid, None)
        self.streams.pop(st.sid, None)
        self._idle_deadline()

    def _write(self) -> None:
        if self.transport is None or self.closed:
            return
        data = self.core.data_to_send()
        if data:
            self.transport.write(data)

    # ------------------------------------------------------------------ lifecycle
    def _idle_deadline(self) -> None:
        if not self.streams:
            t = self.limits.idle_timeout_seconds or \
                self.server.runtime.proxy.keep_alive_timeout_seconds
            self.deadline = time.monotonic() + t
            if self.closing and not self.closed:
                self._loop.call_soon(self._close_when_flushed)  # GOAWAY sent: done now

    def on_deadline(self, now: float) -> None:
        """Called by the worker's sweeper: the connection was idle too long."""
        if self.streams:
            self.deadline = 0.0
            return
        self.drain()
        self._close_when_flushed()

    def drain(self) -> None:
        """Graceful shutdown: GOAWAY now, close once the streams in flight are done."""
        if self.closed:
            return
        if not self.closing:
            self.closing = True
            # h2's close_connection() would also stop the streams in flight; the GOAWAY
            # frame is serialised with hyperframe instead, and new streams are refused here
            frame = GoAwayFrame(0)
            frame.last_stream_id = self.core.conn.highest_inbound_stream_id
            frame.error_code = ErrorCodes.NO_ERROR
            self._write()
            if self.transport is not None:
                self.transport.write(frame.serialize())
        if not self.streams:
            self._close_when_flushed()

    def _close_when_flushed(self) -> None:
        if not self.closed:
            self._write()
            self._close()

    def _abuse(self, kind: str, detail: str) -> None:
        self.server.metrics.inc(ABUSE_METRIC, (("kind", kind),))
        log.warning("HTTP/2 abuse from %s: %s", self.peer_ip, detail,
                    extra={"fields": {"peer": self.peer_ip, "kind": kind}})
        if kind != "slow_reader":
            self.core.calm_down(kind)
            self._write()
        self._close(abort=kind == "slow_reader")

    def _abort(self, why: str) -> None:
        """Shutdown deadline or a fatal error: drop the connection now."""
        log.info("aborting HTTP/2 connection from %s: %s", self.peer_ip, why)
        self._close(abort=True)

    def _close(self, abort: bool = False) -> None:
        if self.closed:
            return
        self.closed = True
        t = self.transport
        if t is None:
            return
        if abort:
            t.abort()
        elif t.can_write_eof():
            # Half-close and drain what the client still sends before closing: closing a
            # socket with unread input makes the kernel send RST, and the client may then
            # lose the GOAWAY (and the last responses) still in flight.
            t.write_eof()
            self._loop.call_later(_LINGER_SECONDS, t.close)
        else:
            t.close()


def _prio_key(st: StreamBase):
    return (st.urgency, st.incremental, st.sid)


_HANDLERS = {
    h2.events.RequestReceived: H2Session._on_request,
    h2.events.DataReceived: H2Session._on_data,
    h2.events.StreamEnded: H2Session._on_end_stream,
    h2.events.TrailersReceived: H2Session._on_trailers,
    h2.events.StreamReset: H2Session._on_reset,
    h2.events.WindowUpdated: H2Session._on_window,
    h2.events.ConnectionTerminated: H2Session._on_terminated,
    h2.events.UnknownFrameReceived: H2Session._on_unknown,
}
