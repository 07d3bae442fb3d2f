"""The WebSocket tunnel: what a connection becomes after the upstream's ``101``.

Theory of operation
-------------------
The Session (``proxy/session.py`` and its compiled twin) proxies the HTTP/1.1 Upgrade like
any request: routing, filters, upstream choice and the 101 response. When the upgrade is
``websocket`` it then hands both connections to :meth:`WebSocketProxy.take_over` and
forgets them: each transport gets a :class:`Side` as its new protocol
(``transport.set_protocol``), so the session's raw tunnel path stays as cheap as it was.

A :class:`WebSocketTunnel` joins the two sides. Each direction runs through a
:class:`dispa.protocols.websocket.FrameInspector`, which passes frames through intact (no
re-framing) while counting frames and messages and catching violations.

Rules:

1. Backpressure: when one side's write buffer passes its high-water mark, reading from the
   other side pauses until it drains (the transports' own flow control, as in the Session).
2. Frames the proxy sends itself (pings, close frames) go into a direction only at a frame
   boundary (``FrameInspector.at_boundary``); towards the upstream they are masked, as a
   client's must be (RFC 6455 §5.3).
3. A close handshake between the two ends passes through untouched. The proxy starts one
   itself only for: a violation (1002, 1007), a message over ``max_message_size`` (1009),
   the idle timeout, a missed pong, and graceful shutdown (all 1001). It then forwards
   nothing more, waits up to ``CLOSE_TIMEOUT_SECONDS`` for each side's close reply, and
   closes both connections.
4. Timeouts run on the worker's sweeper (the tunnel sits in ``server.sessions`` with a
   ``deadline`` and ``on_deadline``, like a Session): no timer per connection.
5. Pings: after ``ping_interval`` seconds without a byte from a side, the proxy pings it;
   any byte from that side within ``ping_timeout`` counts as alive. Pongs answering the
   proxy's own pings (payload prefix ``dispa-ping:``) are dropped, not forwarded.

RFC 8441 (WebSocket over HTTP/2 extended CONNECT): the h2 stream
(:class:`dispa.proxy.h2_websocket.WebSocketStream`) is the bridged Session's transport, so
the Session's ``take_over`` call is the same; the stream's ``tunnel_via = "h2"`` labels
``dispa_websocket_tunnels_total``. :meth:`WebSocketProxy.tunnel`
runs the same tunnel over any two transport-like objects (``write``, ``close``, ``abort``,
``pause_reading``, ``resume_reading``, optional ``is_closing``); the caller feeds the
returned tunnel's ``downstream`` and ``upstream`` sides the asyncio protocol events of its
streams (``data_received``, ``eof_received``, ``connection_lost``, ``pause_writing``,
``resume_writing``).
"""

from __future__ import annotations

import asyncio
import logging
import time

from dispa.protocols.websocket import (
    CLOSE, GOING_AWAY, PING, PONG, Control, FrameInspector, close_frame, encode_frame,
)

log = logging.getLogger("dispa.websocket")

__all__ = ["WebSocketProxy", "WebSocketSettings", "WebSocketTunnel", "Side",
           "CLOSE_TIMEOUT_SECONDS"]

#: How long the proxy waits for the close replies after starting a close itself
#: (websockets' default close_timeout is 10 s; a proxy in the middle should be quicker).
CLOSE_TIMEOUT_SECONDS = 2.0

_PING_PREFIX = b"dispa-ping:"

FRAMES = "dispa_websocket_frames_total"
MESSAGES = "dispa_websocket_messages_total"
CONNECTIONS = "dispa_websocket_connections"
CLOSED = "dispa_websocket_closed_total"
OPENED = "dispa_websocket_tunnels_total"
#: ``via`` label of OPENED: how the client reached us (a fixed set)
VIA = ("http1", "h2")

# direction label: where the frames went
TO_UPSTREAM = "to_upstream"
TO_DOWNSTREAM = "to_downstream"


class WebSocketSettings:
    """``[websocket]`` (docs/websocket.md) as the tunnel uses it; 0 turns a limit off."""

    __slots__ = ("max_message_size", "idle_timeout_seconds", "ping_interval_seconds",
                 "ping_timeout_seconds")

    def __init__(self, max_message_size: int = 16 * 1024 * 1024,
                 idle_timeout_seconds: float = 3600.0, ping_interval_seconds: float = 0.0,
                 ping_timeout_seconds: float = 20.0):
        self.max_message_size = max_message_size
        self.idle_timeout_seconds = idle_timeout_seconds
        self.ping_interval_seconds = ping_interval_seconds
        self.ping_timeout_seconds = ping_timeout_seconds

    @classmethod
    def from_plain(cls, data) -> "WebSocketSettings":
        """From ``Snapshot.websocket`` (a dict of the keys above, or None: defaults)."""
        if not data:
            return cls()
        return cls(**{k: data[k] for k in cls.__slots__ if k in data})


class WebSocketProxy:
    """A worker's WebSocket entry point: settings, counters, and the hand-over."""

    def __init__(self, metrics=None):
        self.settings = WebSocketSettings()
        self.metrics = metrics
        self.live: set[WebSocketTunnel] = set()
        # frames/messages of tunnels that ended: [to_upstream, to_downstream]
        self.retired_frames = [0, 0]
        self.retired_messages = [0, 0]
        self.closed: dict[str, int] = {}  # why -> count
        self.opened = dict.fromkeys(VIA, 0)  # via -> tunnels started
        if metrics is not None:
            metrics.set_help(FRAMES, "counter", "WebSocket frames proxied, by direction.")
            metrics.set_help(MESSAGES, "counter", "WebSocket messages proxied, by direction.")
            metrics.set_help(CONNECTIONS, "gauge", "Open WebSocket tunnels.")
            metrics.set_help(CLOSED, "counter", "WebSocket tunnels ended, by reason.")
            metrics.set_help(OPENED, "counter",
                             "WebSocket tunnels started, by client protocol (http1, h2).")
            metrics.add_collector(self._collect)
            metrics.set_gauge(CONNECTIONS, (), 0)

    def configure(self, plain) -> None:
        """Apply ``Snapshot.websocket`` (new tunnels use it; open ones keep theirs)."""
        self.settings = WebSocketSettings.from_plain(plain)

    @staticmethod
    def wants(head) -> bool:
        """The request asks to upgrade to ``websocket`` (RFC 6455 §4.1)."""
        for name, value in head.headers:
            if len(name) == 7 and name.lower() == b"upgrade":
                return b"websocket" in value.lower()
        return False

    def take_over(self, server, transport, conn, cluster, ep: int, down_rest: bytes,
                  up_rest: bytes, peer_ip: str = "") -> "WebSocketTunnel":
        """Run a tunnel over a Session's two connections after the upgrade's 101.

        ``transport``: the client's; ``conn``: the UpstreamConnection (its pool accounting is
        kept: ``conn.connection_lost`` runs when the upstream closes); ``ep``: the endpoint
        index whose in-flight count the tunnel releases at the end (-1: none);
        ``down_rest``/``up_rest``: bytes that arrived after the upgrade, from the client and
        from the upstream (the first frames).
        """
        # an RFC 8441 stream (proxy/h2_websocket.py) says so; a socket transport does not
        via = getattr(transport, "tunnel_via", "http1")
        tunnel = self.tunnel(server, transport, conn.transport, cluster=cluster, ep=ep,
                             up_conn=conn, peer_ip=peer_ip, via=via)
        transport.set_protocol(tunnel.downstream)
        conn.transport.set_protocol(tunnel.upstream)
        # flow control state the Session saw: the transports tell the new protocol only
        # about changes from now on
        for side in (tunnel.downstream, tunnel.upstream):
            t = side.transport
            try:
                if t.get_write_buffer_size() >= t.get_write_buffer_limits()[1]:
                    side.pause_writing()
            except (AttributeError, NotImplementedError):  # pragma: no cover
                pass
            try:
                t.resume_reading()  # the Session may have paused it
            except (AttributeError, RuntimeError):  # pragma: no cover
                pass
        if up_rest:
            tunnel.upstream.data_received(up_rest)
        if down_rest:
            tunnel.downstream.data_received(down_rest)
        return tunnel

    def tunnel(self, server, down, up, *, cluster=None, ep: int = -1, up_conn=None,
               peer_ip: str = "", via: str = "http1") -> "WebSocketTunnel":
        """The RFC 8441 hook (module docstring): a tunnel over two transport-like objects.
        Registers it with ``server.sessions`` for timeouts and graceful shutdown; ``via``
        (one of :data:`VIA`) labels ``dispa_websocket_tunnels_total``."""
        if via not in self.opened:
            via = "http1"
        self.opened[via] += 1
        t = WebSocketTunnel(self, server, self.settings, down, up, cluster=cluster, ep=ep,
                            up_conn=up_conn, peer_ip=peer_ip)
        self.live.add(t)
        if server is not None:
            server.sessions.add(t)
        if self.metrics is not None:
            self.metrics.set_gauge(CONNECTIONS, (), len(self.live))
        return t

    def _ended(self, t: "WebSocketTunnel", why: str) -> None:
        self.live.discard(t)
        self.retired_frames[0] += t.c2s.frames
        self.retired_frames[1] += t.s2c.frames
        self.retired_messages[0] += t.c2s.messages
        self.retired_messages[1] += t.s2c.messages
        self.closed[why] = self.closed.get(why, 0) + 1
        if self.metrics is not None:
            self.metrics.set_gauge(CONNECTIONS, (), len(self.live))

    def totals(self) -> dict:
        """Cumulative counts: {"frames": [to_upstream, to_downstream], "messages": [...],
        "closed": {why: n}, "connections": open tunnels}."""
        frames = list(self.retired_frames)
        messages = list(self.retired_messages)
        for t in self.live:
            frames[0] += t.c2s.frames
            frames[1] += t.s2c.frames
            messages[0] += t.c2s.messages
            messages[1] += t.s2c.messages
        return {"frames": frames, "messages": messages, "closed": dict(self.closed),
                "connections": len(self.live), "opened": dict(self.opened)}

    def _collect(self, counters: dict) -> None:
        tot = self.totals()
        for i, direction in enumerate((TO_UPSTREAM, TO_DOWNSTREAM)):
            lab = (("direction", direction),)
            counters[(FRAMES, lab)] = tot["frames"][i]
            counters[(MESSAGES, lab)] = tot["messages"][i]
        for why, n in tot["closed"].items():
            counters[(CLOSED, (("reason", why),))] = n
        for via, n in tot["opened"].items():
            counters[(OPENED, (("via", via),))] = n


class Side(asyncio.Protocol):
    """One end of a tunnel: the asyncio protocol of its transport (module docstring)."""

    __slots__ = ("tunnel", "transport", "inspector", "is_upstream", "peer", "conn", "lost",
                 "write_paused", "reading_paused", "last_rx", "ping_sent_at", "sent_close",
                 "got_close")

    def __init__(self, tunnel, transport, inspector: FrameInspector, is_upstream: bool,
                 conn=None):
        self.tunnel = tunnel
        self.transport = transport
        self.inspector = inspector  # frames arriving from this side
        self.is_upstream = is_upstream
        self.peer: Side | None = None
        self.conn = conn  # the pool's UpstreamConnection (upstream side of a Session)
        self.lost = False
        self.write_paused = False
        self.reading_paused = False
        self.last_rx = time.monotonic()
        self.ping_sent_at = 0.0
        self.sent_close = False  # the proxy sent this side a close frame of its own
        self.got_close = False  # this side sent a close frame

    # events from the transport ---------------------------------------------------------
    def data_received(self, data) -> None:
        self.tunnel._on_data(self, data)

    def eof_received(self):
        self.tunnel._on_eof(self)
        return False

    def connection_lost(self, exc) -> None:
        if self.lost:
            return
        self.lost = True
        conn = self.conn
        if conn is not None:
            self.conn = None
            conn.connection_lost(exc)  # the pool forgets the connection
        self.tunnel._on_lost(self)

    def pause_writing(self) -> None:
        self.write_paused = True
        peer = self.peer
        if peer is not None:
            peer.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        peer = self.peer
        if peer is not None:
            peer.resume_reading()

    # actions ---------------------------------------------------------------------------
    def write(self, data) -> None:
        if not self.lost:
            self.transport.write(data)

    def pause_reading(self) -> None:
        if not self.reading_paused and not self.lost:
            self.reading_paused = True
            try:
                self.transport.pause_reading()
            except RuntimeError:  # closing
                pass

    def resume_reading(self) -> None:
        if self.reading_paused and not self.lost:
            self.reading_paused = False
            try:
                self.transport.resume_reading()
            except RuntimeError:  # closing
                pass

    def close(self) -> None:
        """Close after what is queued has been written."""
        if not self.lost:
            self.transport.close()

    def abort(self) -> None:
        if not self.lost:
            self.transport.abort()


class WebSocketTunnel:
    """Two :class:`Side` objects and the state between them (module docstring)."""

    __slots__ = ("proxy", "server", "settings", "c2s", "s2c", "downstream", "upstream",
                 "cluster", "ep", "peer_ip", "closing", "close_why", "ended", "deadline",
                 "last_activity", "_ping_seq")

    def __init__(self, proxy: WebSocketProxy, server, settings: WebSocketSettings, down, up,
                 *, cluster=None, ep: int = -1, up_conn=None, peer_ip: str = ""):
        self.proxy = proxy
        self.server = server
        self.settings = settings
        self.c2s = FrameInspector(from_client=True, max_message_size=settings.max_message_size)
        self.s2c = FrameInspector(from_client=False,
                                  max_message_size=settings.max_message_size)
        self.downstream = Side(self, down, self.c2s, False)
        self.upstream = Side(self, up, self.s2c, True, up_conn)
        self.downstream.peer = self.upstream
        self.upstream.peer = self.downstream
        self.cluster = cluster
        self.ep = ep
        self.peer_ip = peer_ip
        self.closing = False  # the proxy started a close (Rule 3)
        self.close_why = ""
        self.ended = False
        self.last_activity = time.monotonic()
        self._ping_seq = 0
        self.deadline = 0.0
        self._schedule(self.last_activity)

    # ---------------------------------------------------------------- data path
    def _on_data(self, side: Side, data) -> None:
        now = time.monotonic()
        side.last_rx = now
        side.ping_sent_at = 0.0  # any byte shows the side is alive (Rule 5)
        insp = side.inspector
        if self.closing or side.got_close:
            # waiting for close replies (or the side already closed its half): forward
            # nothing; a close frame from the side completes its part of the handshake
            if not insp.closed and insp.error is None:
                insp.feed(data)
            if insp.closed or insp.error is not None:
                side.got_close = True
                if self.closing:
                    side.close()
            return
        pieces = insp.feed(data)
        peer = side.peer
        forwarded = False
        for p in pieces:
            if type(p) is Control:
                if p.opcode == PONG and p.payload.startswith(_PING_PREFIX):
                    continue  # the answer to our own ping (Rule 5)
                peer.write(p.raw)
                forwarded = True
                if p.opcode == CLOSE:
                    side.got_close = True
            else:
                peer.write(p)
                forwarded = True
        if forwarded:
            self.last_activity = now
        err = insp.error
        if err is not None:
            log.info("websocket from %s: %s %s, closing with %d", self.peer_ip,
                     "upstream" if side.is_upstream else "client", err.reason, err.code)
            self._close_both(err.code, err.reason,
                             "message_too_big" if err.code == 1009 else "protocol_error")

    def _on_eof(self, side: Side) -> None:
        # A WebSocket connection ends with a close handshake and then TCP close (RFC 6455
        # §7.1.1); a half-close is the end: close the other side after its queued bytes.
        side.peer.close()

    def _on_lost(self, side: Side) -> None:
        peer = side.peer
        if not self.close_why:
            self.close_why = "normal" if (side.got_close or peer.got_close) else "reset"
        if peer.lost:
            self._end()
            return
        # the other side gets what is queued for it, then TCP close; if it does not drain
        # within the close timeout, the sweeper aborts it
        peer.close()
        if not self.closing:
            self.closing = True
            self.deadline = time.monotonic() + CLOSE_TIMEOUT_SECONDS

    # ---------------------------------------------------------------- closing
    def _close_both(self, code: int, reason: str, why: str, dead: Side | None = None) -> None:
        """Start a close of our own (Rule 3); ``dead`` is aborted at once."""
        if self.closing or self.ended:
            return
        self.closing = True
        self.close_why = why
        for side in (self.downstream, self.upstream):
            if side.lost:
                continue
            if side is dead:
                side.abort()
                continue
            # what flows towards `side` comes from its peer: inject only at a frame
            # boundary, and not after a close frame already went to it
            toward = side.peer.inspector
            side.resume_reading()  # the close reply must be read even under backpressure
            if side.got_close and toward.closed:
                side.close()  # both close frames passed already
            elif toward.at_boundary and not toward.closed:
                side.write(close_frame(code, reason, mask=side.is_upstream))
                side.sent_close = True
            else:
                side.close()  # mid-frame: no close frame can be sent, only TCP close
        self.deadline = time.monotonic() + CLOSE_TIMEOUT_SECONDS

    def drain(self) -> None:
        """Graceful shutdown: close frames (1001 going away) to both sides."""
        self._close_both(GOING_AWAY, "going away", "shutdown")

    def _abort(self, why: str) -> None:
        """Close both connections at once (shutdown deadline, sweeper failure)."""
        if not self.close_why:
            self.close_why = why.replace(" ", "_")
        self.downstream.abort()
        self.upstream.abort()
        if self.server is None:
            self._end()

    def _end(self) -> None:
        if self.ended:
            return
        self.ended = True
        self.deadline = 0.0
        server = self.server
        if server is not None:
            server.sessions.discard(self)
        if self.ep >= 0 and self.cluster is not None:
            self.cluster.selector.release(self.ep)
            self.ep = -1
        self.proxy._ended(self, self.close_why or "normal")

    # ---------------------------------------------------------------- timers (Rules 4, 5)
    def _schedule(self, now: float) -> None:
        s = self.settings
        if self.closing:
            return  # the close deadline stands
        nxt = 0.0
        if s.idle_timeout_seconds:
            nxt = self.last_activity + s.idle_timeout_seconds
        if s.ping_interval_seconds:
            for side in (self.downstream, self.upstream):
                if side.ping_sent_at:
                    t = side.ping_sent_at + s.ping_timeout_seconds
                else:
                    t = side.last_rx + s.ping_interval_seconds
                if not nxt or t < nxt:
                    nxt = t
        self.deadline = max(nxt, now + 0.05) if nxt else 0.0

    def on_deadline(self, now: float) -> None:
        """Called by the worker's sweeper when ``deadline`` has passed."""
        if self.ended:
            self.deadline = 0.0
            return
        if self.closing:
            self.downstream.abort()  # no close reply in time
            self.upstream.abort()
            self.deadline = 0.0
            return
        s = self.settings
        if s.idle_timeout_seconds and now - self.last_activity >= s.idle_timeout_seconds:
            self._close_both(GOING_AWAY, "idle timeout", "idle_timeout")
            return
        if s.ping_interval_seconds:
            for side in (self.downstream, self.upstream):
                if side.lost:
                    continue
                if side.ping_sent_at:
                    if now - side.ping_sent_at >= s.ping_timeout_seconds:
                        log.info("websocket: no pong from the %s in %.1f s, closing",
                                 "upstream" if side.is_upstream else "client",
                                 s.ping_timeout_seconds)
                        self._close_both(GOING_AWAY, "ping timeout", "ping_timeout",
                                         dead=side)
                        return
                elif now - side.last_rx >= s.ping_interval_seconds and \
                        side.peer.inspector.at_boundary and not side.peer.inspector.closed:
                    self._ping_seq += 1
                    payload = _PING_PREFIX + str(self._ping_seq).encode()
                    side.write(encode_frame(PING, payload, mask=side.is_upstream))
                    side.ping_sent_at = now
        self._schedule(now)
