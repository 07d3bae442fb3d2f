"""Upstream keep-alive connection pools, one per endpoint per worker.

Theory of operation
-------------------
An :class:`UpstreamConnection` is an asyncio.Protocol around one TCP connection to an
endpoint. While it serves an exchange, its ``owner`` (the downstream session) receives every
event; while it sits idle in the pool it has no owner, and any byte or EOF that arrives then
means the server gave up on it, so it is closed and dropped (detection of connections the
server closed before reuse). A connection whose close raced with our next request shows up
as EOF before any response byte; the session retries such idempotent requests on a fresh
connection.

Invariants:
- ``Pool.total`` counts every open connection (idle + busy) and never exceeds ``max_total``.
- An idle connection is in ``Pool.idle`` exactly once; the newest is reused first (LIFO keeps
  the fewest connections warm, like nginx's keepalive cache).
- Pools are keyed by endpoint id and outlive snapshots, so a reload keeps warm connections.
"""

from __future__ import annotations

import asyncio
import socket
import time

from dispa.config.snapshot import PoolSpec
from dispa.errors import UpstreamError
from dispa.protocols.http1 import ResponseParser


class UpstreamConnection(asyncio.Protocol):
    """One TCP connection to an upstream endpoint."""

    __slots__ = ("pool", "transport", "parser", "owner", "closed", "idle_since", "reused",
                 "paused")

    def __init__(self, pool: "Pool"):
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.parser = ResponseParser()
        self.owner = None
        self.closed = False
        self.idle_since = 0.0
        self.reused = False
        self.paused = False

    # asyncio callbacks ---------------------------------------------------------------
    def connection_made(self, transport):  # type: ignore[override]
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:  # pragma: no cover - not a TCP socket
                pass
        transport.set_write_buffer_limits(high=256 * 1024)

    def data_received(self, data: bytes) -> None:
        owner = self.owner
        if owner is None:
            # Bytes on an idle connection: the server is talking out of turn. Drop it.
            self.close()
            return
        owner.upstream_data(self, data)

    def eof_received(self):
        return False  # let asyncio close the transport; connection_lost follows

    def connection_lost(self, exc) -> None:
        was_closed = self.closed
        self.closed = True
        owner = self.owner
        if not was_closed:
            self.pool._forget(self)
        if owner is not None:
            self.owner = None
            owner.upstream_lost(self, exc)

    def pause_writing(self) -> None:
        owner = self.owner
        if owner is not None:
            owner.upstream_pause_writing()

    def resume_writing(self) -> None:
        owner = self.owner
        if owner is not None:
            owner.upstream_resume_writing()

    # control -------------------------------------------------------------------------
    def pause_reading(self) -> None:
        if not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.paused and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()

    def close(self) -> None:
        """Close now (an abort: nothing queued is worth sending)."""
        if not self.closed:
            self.closed = True
            self.pool._forget(self)
            if self.transport is not None:
                self.transport.abort()


class Pool:
    """Keep-alive connections to one endpoint (``host:port``)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, host: str, port: int, spec: PoolSpec):
        self.loop = loop
        self.host = host
        self.port = port
        self.spec = spec
        self.idle: list[UpstreamConnection] = []
        self.total = 0
        self.connects = 0  # lifetime count, for metrics and tests
        self.reuses = 0
        self.retired = False  # no longer in any snapshot: busy connections close on release
        self.tls = None  # tls.upstream.UpstreamTls for an https:// endpoint

    def take_idle(self) -> UpstreamConnection | None:
        """An idle connection that is still open, or None."""
        idle = self.idle
        while idle:
            conn = idle.pop()
            if not conn.closed and not conn.transport.is_closing():
                conn.reused = True
                self.reuses += 1
                return conn
        return None

    async def connect(self, timeout_seconds: float) -> UpstreamConnection:
        """Open a new connection; raise UpstreamError (retryable: nothing was sent)."""
        if self.total >= self.spec.max_total:
            raise UpstreamError("upstream connection limit reached", status_hint=503,
                                retryable=True)
        self.total += 1
        self.connects += 1
        conn = UpstreamConnection(self)
        tls = self.tls
        try:
            if tls is None:
                connecting = self.loop.create_connection(lambda: conn, self.host, self.port)
            else:
                connecting = self.loop.create_connection(
                    lambda: conn, self.host, self.port, ssl=tls.context,
                    server_hostname=tls.server_name, ssl_handshake_timeout=timeout_seconds)
            await asyncio.wait_for(connecting, timeout_seconds)
        except asyncio.TimeoutError:
            self._forget_count(conn)
            raise UpstreamError("upstream connect timeout", status_hint=504,
                                retryable=True) from None
        except ConnectionRefusedError:
            self._forget_count(conn)
            raise UpstreamError("upstream connection refused", retryable=True) from None
        except OSError as exc:
            self._forget_count(conn)
            raise UpstreamError(f"upstream connect error: {exc.strerror or exc}",
                                retryable=True) from None
        return conn

    def _forget_count(self, conn: UpstreamConnection) -> None:
        if not conn.closed:
            conn.closed = True
            self.total -= 1

    def release(self, conn: UpstreamConnection) -> None:
        """Give back a connection whose exchange completed cleanly and allows keep-alive."""
        conn.owner = None
        if (conn.closed or self.retired or conn.transport.is_closing()
                or len(self.idle) >= self.spec.max_idle):
            conn.close()
            return
        conn.resume_reading()  # reading must stay on to notice the server closing it
        conn.idle_since = time.monotonic()
        self.idle.append(conn)

    def _forget(self, conn: UpstreamConnection) -> None:
        self.total -= 1
        try:
            self.idle.remove(conn)
        except ValueError:
            pass

    def sweep(self, now: float) -> None:
        """Close idle connections older than ``idle_timeout_seconds``."""
        limit = self.spec.idle_timeout_seconds
        for conn in [c for c in self.idle if now - c.idle_since > limit]:
            conn.close()

    def close(self) -> None:
        self.retired = True
        for conn in list(self.idle):
            conn.close()
