"""Upstream HTTP/2: multiplexed connections per endpoint (h2c and h2 over TLS).

Theory of operation
-------------------
An :class:`H2Pool` belongs to one endpoint (per worker, kept in ``WorkerState`` across
snapshots like the HTTP/1.1 pools). It holds a few :class:`H2UpstreamConnection` objects and
opens a stream on the first one with room under the peer's SETTINGS_MAX_CONCURRENT_STREAMS;
a new connection is made only when every open one is full (up to ``max_connections``), so
many client streams share one TCP connection. A connection that received GOAWAY takes no new
streams and closes when its last stream ends; one idle for ``idle_timeout`` is closed.

Streams talk to their owner (``proxy.grpc.UpstreamH2Stream``) through callbacks:
``up_response(headers)``, ``up_data(data, n)``, ``up_trailers(headers)``, ``up_end()``,
``up_reset(code)``, ``up_writable()``, ``up_lost(exc)``. Flow control is end to end:
the owner calls :meth:`H2UpstreamConnection.ack` for response bytes only once the client
side has taken them, and request bytes wait in a per-stream queue until the upstream's window
allows them (the owner sees ``queued(sid)`` and pauses its client stream).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections import deque

from dispa.protocols.http2.grpc_health import h2_client_context  # noqa: F401 - re-export
import h2.config
import h2.events
import h2.exceptions
import h2.settings
from h2.errors import ErrorCodes

from dispa.errors import UpstreamError
from dispa.protocols.http2 import connection as _connection
from dispa.protocols.http2 import hpack_codec

log = logging.getLogger("dispa.h2.upstream")

_WINDOW = 1 << 20  # per-stream receive window we offer upstreams
_CONN_WINDOW = 16 << 20
class H2UpstreamConnection(asyncio.Protocol):
    """One client-side HTTP/2 connection to an upstream."""

    def __init__(self, pool: "H2Pool"):
        self.pool = pool
        cfg = h2.config.H2Configuration(client_side=True, header_encoding=None,
                                        validate_inbound_headers=True,
                                        validate_outbound_headers=False,
                                        normalize_outbound_headers=False)
        self.conn = _connection.Connection(config=cfg)  # h2's (protocols/http2/connection.py)
        hpack_codec.install(self.conn)  # compiled HPACK when built (h2's header checks kept)
        s = h2.settings.SettingCodes
        self.conn.local_settings = h2.settings.Settings(client=True, initial_values={
            s.ENABLE_PUSH: 0, s.INITIAL_WINDOW_SIZE: _WINDOW,
            s.MAX_CONCURRENT_STREAMS: 100, s.MAX_HEADER_LIST_SIZE: 65536})
        self.transport = None
        self.owners: dict[int, object] = {}
        self.out: dict[int, deque] = {}
        self.out_end: dict[int, object] = {}  # sid -> trailers list or True (end after data)
        self.closed = False
        self.goaway = False
        self.ready: asyncio.Future | None = None
        self.idle_since = time.monotonic()
        self._scheduled = False
        self.write_paused = False

    # ---------------------------------------------------------------- protocol
    def connection_made(self, transport) -> None:
        self.transport = transport
        self.conn.initiate_connection()
        self.conn.increment_flow_control_window(_CONN_WINDOW - 65535)
        self._write()

    def connection_lost(self, exc) -> None:
        self.closed = True
        self.pool.forget(self)
        owners, self.owners = self.owners, {}
        for owner in owners.values():
            owner.up_lost(exc)

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        self._flush()

    def data_received(self, data: bytes) -> None:
        try:
            events = self.conn.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            log.info("upstream %s: HTTP/2 protocol error: %s", self.pool.endpoint_id, exc)
            self._write()
            self.close()
            return
        for ev in events:
            t = type(ev)
            owner = self.owners.get(getattr(ev, "stream_id", 0) or 0)
            if t is h2.events.ResponseReceived:
                if owner is not None:
                    owner.up_response(ev.headers, ev.stream_ended is not None)
            elif t is h2.events.InformationalResponseReceived:
                if owner is not None:
                    owner.up_informational(ev.headers)
            elif t is h2.events.DataReceived:
                if owner is not None:
                    owner.up_data(ev.data, ev.flow_controlled_length)
                elif ev.flow_controlled_length:
                    self.conn.acknowledge_received_data(ev.flow_controlled_length,
                                                        ev.stream_id)
            elif t is h2.events.TrailersReceived:
                if owner is not None:
                    owner.up_trailers(ev.headers)
            elif t is h2.events.StreamEnded:
                if owner is not None:
                    self._done(ev.stream_id)
                    owner.up_end()
            elif t is h2.events.StreamReset:
                if owner is not None:
                    self._done(ev.stream_id)
                    owner.up_reset(ev.error_code)
            elif t is h2.events.WindowUpdated:
                self._flush()
            elif t is h2.events.RemoteSettingsChanged:
                self._flush()
            elif t is h2.events.ConnectionTerminated:
                self.goaway = True
                self.pool.forget(self)
                last = ev.last_stream_id if ev.last_stream_id is not None else 0
                for sid in [s for s in self.owners if s > last]:
                    owner = self.owners.pop(sid)
                    owner.up_reset(ErrorCodes.REFUSED_STREAM)  # never processed: retryable
                if not self.owners:
                    self.close()
        self._write()

    # ---------------------------------------------------------------- used by owners
    def has_room(self) -> bool:
        if self.closed or self.goaway:
            return False
        limit = self.conn.remote_settings.max_concurrent_streams or 100
        return len(self.owners) < min(limit, self.pool.max_streams)

    def open_stream(self, owner, headers: list, end: bool) -> int:
        sid = self.conn.get_next_available_stream_id()
        self.conn.send_headers(sid, headers, end_stream=end)
        self.owners[sid] = owner
        self._write()
        return sid

    def send_data(self, sid: int, data: bytes) -> None:
        q = self.out.get(sid)
        if q is None:
            q = self.out[sid] = deque()
        q.append(data)
        self._flush()

    def end_stream(self, sid: int, trailers=None) -> None:
        self.out_end[sid] = trailers or True
        if sid not in self.out:
            self.out[sid] = deque()
        self._flush()

    def queued(self, sid: int) -> int:
        q = self.out.get(sid)
        return sum(len(b) for b in q) if q else 0

    def ack(self, sid: int, n: int) -> None:
        if n and not self.closed:
            try:
                self.conn.acknowledge_received_data(n, sid)
            except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
                return
            self._schedule()

    def reset(self, sid: int, code=ErrorCodes.CANCEL) -> None:
        self._done(sid)
        if not self.closed:
            try:
                self.conn.reset_stream(sid, code)
            except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
                pass
            self._write()

    def _done(self, sid: int) -> None:
        self.owners.pop(sid, None)
        self.out.pop(sid, None)
        self.out_end.pop(sid, None)
        if not self.owners:
            self.idle_since = time.monotonic()
            if self.goaway:
                self.close()
            elif not self.closed:
                asyncio.get_running_loop().call_later(self.pool.idle_timeout + 0.05,
                                                      self._idle_check)

    def _idle_check(self) -> None:
        if not self.owners and not self.closed and \
                time.monotonic() - self.idle_since >= self.pool.idle_timeout:
            self.close()

    def _flush(self) -> None:
        if self.closed or self.write_paused:
            return
        conn = self.conn
        for sid in list(self.out):
            q = self.out[sid]
            while q:
                try:
                    win = conn.local_flow_control_window(sid)
                except h2.exceptions.ProtocolError:
                    q.clear()
                    break
                if win <= 0:
                    break
                chunk = q[0]
                n = min(win, conn.max_outbound_frame_size, len(chunk))
                if n < len(chunk):
                    conn.send_data(sid, chunk[:n])
                    q[0] = chunk[n:]
                else:
                    q.popleft()
                    end = sid in self.out_end and not q and self.out_end[sid] is True
                    conn.send_data(sid, chunk, end_stream=end)
                    if end:
                        self.out_end.pop(sid)
            if not q:
                fin = self.out_end.pop(sid, None)
                try:
                    if fin is True:
                        conn.end_stream(sid)
                    elif fin:
                        conn.send_headers(sid, fin, end_stream=True)
                except h2.exceptions.ProtocolError:
                    pass
                if fin is not None or sid not in self.owners:
                    self.out.pop(sid, None)
                owner = self.owners.get(sid)
                if owner is not None:
                    owner.up_writable()
        self._write()

    def _schedule(self) -> None:
        if not self._scheduled and not self.closed:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._flush_soon)

    def _flush_soon(self) -> None:
        self._scheduled = False
        self._write()

    def _write(self) -> None:
        if self.transport is not None and not self.closed:
            data = self.conn.data_to_send()
            if data:
                self.transport.write(data)

    def close(self) -> None:
        if not self.closed and self.transport is not None:
            try:
                self.conn.close_connection()
                self._write()
            except h2.exceptions.ProtocolError:
                pass
            self.transport.close()
        self.closed = True
        self.pool.forget(self)


class H2Pool:
    """The HTTP/2 connections of one endpoint in one worker."""

    def __init__(self, loop, endpoint_id: str, host: str, port: int, *, tls=None,
                 server_name: str | None = None, max_connections: int = 4,
                 max_streams: int = 1000, idle_timeout: float = 60.0):
        self.loop = loop
        self.endpoint_id = endpoint_id
        self.host = host
        self.port = port
        self.tls = tls  # ssl.SSLContext (h2) or None (h2c)
        self.server_name = server_name
        self.max_connections = max_connections
        self.max_streams = max_streams
        self.idle_timeout = idle_timeout
        self.conns: list[H2UpstreamConnection] = []
        self._connecting: asyncio.Future | None = None

    def take(self) -> H2UpstreamConnection | None:
        """A connection with room for one more stream, without waiting; None if none."""
        for c in self.conns:
            if c.has_room():
                return c
        return None

    def full(self) -> bool:
        return len(self.conns) >= self.max_connections and self.take() is None \
            and self._connecting is None

    async def get(self, timeout: float) -> H2UpstreamConnection:
        """A connection with room, connecting when needed (one connect at a time)."""
        c = self.take()
        if c is not None:
            return c
        if self._connecting is not None:
            await asyncio.wait_for(asyncio.shield(self._connecting), timeout)
            c = self.take()
            if c is not None:
                return c
        if len(self.conns) >= self.max_connections:
            exc = UpstreamError("upstream HTTP/2 connections are full", status_hint=503,
                                retryable=False)
            exc.exhausted = True  # gRPC: RESOURCE_EXHAUSTED (proxy/grpc.py)
            raise exc
        self._connecting = self.loop.create_future()
        try:
            try:
                _, conn = await asyncio.wait_for(self.loop.create_connection(
                    lambda: H2UpstreamConnection(self), self.host, self.port, ssl=self.tls,
                    server_hostname=(self.server_name or self.host) if self.tls else None),
                    timeout)
            except asyncio.TimeoutError:
                raise UpstreamError("upstream connect timed out", status_hint=504,
                                    retryable=True) from None
            except (OSError, ssl.SSLError) as exc:
                raise UpstreamError(f"upstream connect failed: {exc}", retryable=True) from None
            if self.tls is not None:
                proto = conn.transport.get_extra_info("ssl_object")
                if proto is not None and proto.selected_alpn_protocol() != "h2":
                    conn.close()
                    raise UpstreamError("upstream did not negotiate h2 (ALPN)",
                                        retryable=False)
            self.conns.append(conn)
            return conn
        finally:
            fut, self._connecting = self._connecting, None
            if not fut.done():
                fut.set_result(None)

    def forget(self, conn: H2UpstreamConnection) -> None:
        if conn in self.conns:
            self.conns.remove(conn)

    def sweep(self, now: float) -> None:
        for c in list(self.conns):
            if not c.owners and now - c.idle_since > self.idle_timeout:
                c.close()

    def close(self) -> None:
        for c in list(self.conns):
            c.close()


def pool_for(state, cluster, i: int) -> H2Pool:
    """The H2Pool of endpoint ``i`` of ``cluster`` (a ``ClusterRuntime``), kept in the
    worker's state across snapshots (keyed by endpoint, protocol and pool settings)."""
    pools = state.__dict__.setdefault("h2_pools", {})
    ep = cluster.endpoints[i]
    spec = cluster.spec
    key = (ep.id, spec.protocol, spec.pool)
    pool = pools.get(key)
    if pool is None:
        tls = server_name = None
        if spec.protocol == "h2":
            snap_tls = getattr(state, "tls", None) or {}
            up = snap_tls.get("upstream") if isinstance(snap_tls, dict) else None
            tls = h2_client_context(up)
            server_name = (up or {}).get("server_name") or ep.host
        pool = H2Pool(state.loop, ep.id, ep.host, ep.port, tls=tls, server_name=server_name,
                      max_connections=max(1, min(spec.pool.max_total, 16)),
                      idle_timeout=spec.pool.idle_timeout_seconds)
        pools[key] = pool
    return pool
