"""TCP proxying: one upstream connection per downstream connection, bytes copied both ways.

Theory of operation
-------------------
A :class:`TcpSession` is the asyncio protocol of one accepted connection. It

1. counts itself against the listener's ``max_connections`` (over it: closed at once and
   counted as ``rejected{reason="limit"}``);
2. with ``proxy_protocol_accept``: refuses peers outside ``trusted_proxies``, then reads a
   PROXY v1/v2 header (``l4/proxy_protocol.py``) and takes its source as the client address;
3. picks an endpoint of the target group with the cluster's own pick (health, passive
   marks, circuit breakers, outlier ejection; hashing selectors hash the client IP; an
   open group breaker refuses the connection, ``rejected{reason="breaker"}``), reports
   each connect's outcome to the breakers and outlier detector, connects with
   ``connect_timeout``, and on failure tries the next endpoint (each once), reporting the
   failure to the master like the HTTP path does;
4. with ``proxy_protocol_send``: writes a v1/v2 header first on the upstream connection;
5. copies bytes both ways. Rule: backpressure as in the HTTP Session (a full write buffer
   on one side pauses reading on the other); half-closes pass through (``write_eof``); the
   connection ends when both directions have ended or either side resets;
6. on graceful shutdown runs on (a byte stream has no boundary to stop at) until just
   before the worker's deadline (``manager.drain_margin``), when both sides are
   half-closed, a FIN after the bytes queued for them, and counted in
   ``dispa_l4_shutdown_closed_total`` (``half_close_at_deadline``).

Bytes that arrive before the upstream is connected are held (reading pauses past
``_MAX_EARLY_BYTES``). The session sits in ``server.sessions`` with a ``deadline``: the
worker's sweeper enforces the idle timeout and the PROXY header timeout.
"""

from __future__ import annotations

import asyncio
import logging
import time

from dispa.l4.proxy_protocol import ProxyProtocolError, encode_v1, encode_v2, parse

log = logging.getLogger("dispa.l4")

_MAX_EARLY_BYTES = 256 * 1024  # held while connecting, before reading pauses
_WRITE_HIGH_WATER = 256 * 1024  # as the HTTP Session's transports
_PROXY_HEADER_TIMEOUT_SECONDS = 10.0  # a trusted peer must send its header promptly
_LINGER_SECONDS = 10.0  # one side gone: how long the other may take to drain its bytes
_CONNECTED = 200  # the status a successful upstream connect reports to breakers/outlier


class _NoHead:
    """What ``ClusterRuntime.pick`` reads of a request head, for a byte stream: no method,
    target or fields, so every hash-key part falls back to the client IP
    (balancer/hash_key.py rule 1) and sticky policies pin by client IP."""

    __slots__ = ()
    method = b""
    target = b""
    headers = ()


NO_HEAD = _NoHead()


class _Upstream(asyncio.Protocol):
    """The upstream half of a :class:`TcpSession`."""

    __slots__ = ("session", "transport")

    def __init__(self, session: "TcpSession"):
        self.session = session
        self.transport = None

    def connection_made(self, transport):  # type: ignore[override]
        self.transport = transport
        transport.set_write_buffer_limits(high=_WRITE_HIGH_WATER)

    def data_received(self, data: bytes) -> None:
        s = self.session
        if s.down_lost or s.half_closed:
            return
        s.last_io = time.monotonic()
        s.listener.bytes_out += len(data)
        s.transport.write(data)

    def eof_received(self):
        return self.session._eof(upstream=True)

    def connection_lost(self, exc) -> None:
        self.session._lost(upstream=True, exc=exc)

    def pause_writing(self) -> None:
        self.session._pause_down()

    def resume_writing(self) -> None:
        self.session._resume_down()


class TcpSession(asyncio.Protocol):
    """One downstream TCP connection of an L4 listener (module docstring)."""

    def __init__(self, listener):
        self.listener = listener  # dispa.l4.manager.L4Listener
        self.server = listener.server
        self.spec = listener.spec  # the listener's settings when this connection arrived
        self.transport = None
        self.upstream: _Upstream | None = None
        self.client: tuple[str, int] | None = None
        self.local: tuple[str, int] | None = None
        self.cluster = None
        self.ep = -1
        self.tried: set[int] = set()
        self.early: list[bytes] | None = []  # bytes before the upstream is connected
        self.early_bytes = 0
        self.header_buf = b""  # PROXY header bytes being read
        self.awaiting_header = False
        self.down_eof = self.up_eof = False
        self.down_lost = self.up_lost = False  # connection_lost seen on that side
        self.down_paused = False  # reading from the client paused
        self.closed = False
        self.half_closed = False  # both sides got a FIN at the shutdown deadline
        self.last_io = time.monotonic()
        self.deadline = 0.0
        self.connect_task = None

    # ---------------------------------------------------------------- accept
    def connection_made(self, transport):  # type: ignore[override]
        self.transport = transport
        lst = self.listener
        peer = transport.get_extra_info("peername")
        sock = transport.get_extra_info("sockname")
        self.client = (peer[0], peer[1]) if peer else ("0.0.0.0", 0)
        self.local = (sock[0], sock[1]) if sock else ("0.0.0.0", 0)
        if len(lst.active) >= self.spec["max_connections"]:
            lst.reject("limit")
            self.closed = True
            transport.abort()  # closed at once: no byte read, no upstream touched
            return
        lst.open(self)
        transport.set_write_buffer_limits(high=_WRITE_HIGH_WATER)
        self.server.sessions.add(self)
        if self.spec["proxy_protocol_accept"]:
            if not lst.trusted(self.client[0]):
                lst.reject("untrusted")
                self._close_now()
                return
            self.awaiting_header = True
            self.deadline = time.monotonic() + min(_PROXY_HEADER_TIMEOUT_SECONDS,
                                                   self.spec["idle_timeout_seconds"])
            return
        self._start()

    def _start(self) -> None:
        self.deadline = self.last_io + self.spec["idle_timeout_seconds"]
        self.cluster = self.server.runtime.clusters.get(self.spec["target_group"])
        self.connect_task = asyncio.ensure_future(self._connect())

    # ---------------------------------------------------------------- upstream choice
    def _pick(self) -> int:
        """The cluster's own pick (health, passive marks, circuit breakers, outlier
        ejection, hashing on the client IP): an endpoint index, -1 for none usable, -2
        when the group's breaker is open."""
        cluster = self.cluster
        if cluster is None or not cluster.endpoints:
            return -1
        return cluster.pick(self.client[0], self.tried, NO_HEAD)

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        lst = self.listener
        while not self.closed:
            i = self._pick()
            if i < 0:
                lst.reject("breaker" if i == -2 else "no_endpoint")
                self._close_now()
                return
            cluster = self.cluster
            ep = cluster.endpoints[i]
            cluster.selector.acquire(i)
            self.ep = i
            up = _Upstream(self)
            t0 = time.monotonic()
            try:
                await asyncio.wait_for(loop.create_connection(lambda: up, ep.host, ep.port),
                                       self.spec["connect_timeout_seconds"])
            except asyncio.CancelledError:
                self._release()
                if up.transport is not None:
                    up.transport.abort()
                raise
            except (OSError, asyncio.TimeoutError) as exc:
                self._release()
                self.tried.add(i)
                lst.connect_failures += 1
                cluster.mark_failed(i)
                if cluster.tracks:  # breakers and outlier ejection see the failure
                    cluster.report(i, 0, time.monotonic() - t0)
                self.server.report_passive(cluster.name, ep.id, "connect_failed")
                log.info("l4 %s: connect to %s failed: %s", lst.name, ep.id,
                         "timeout" if isinstance(exc, asyncio.TimeoutError) else exc)
                continue
            if cluster.tracks:  # a connect that succeeded is the stream's "response"
                cluster.report(i, _CONNECTED, time.monotonic() - t0)
            if self.closed:
                up.transport.abort()
                self._release()
                return
            self._attach(up)
            return

    def _attach(self, up: _Upstream) -> None:
        self.connect_task = None
        self.upstream = up
        mode = self.spec["proxy_protocol_send"]
        out = []
        if mode != "none":
            src = self.client
            dst = self.local
            out.append(encode_v1(src, dst) if mode == "v1" else encode_v2(src, dst))
        if self.early:
            out += self.early
        self.early = None
        if out:
            up.transport.write(b"".join(out))
        if self.down_eof:
            self._write_eof(up.transport)
        if self.down_paused and not self._up_write_full():
            self._resume_reading_down()

    def _up_write_full(self) -> bool:
        t = self.upstream.transport
        return t.get_write_buffer_size() >= _WRITE_HIGH_WATER

    def _release(self) -> None:
        if self.ep >= 0 and self.cluster is not None:
            self.cluster.selector.release(self.ep)
        self.ep = -1

    # ---------------------------------------------------------------- downstream bytes
    def data_received(self, data: bytes) -> None:
        if self.half_closed:
            return  # shutting down: what arrives now goes nowhere
        self.last_io = time.monotonic()
        if self.awaiting_header:
            self._header_bytes(data)
            return
        self.listener.bytes_in += len(data)
        up = self.upstream
        if up is not None:
            if not self.up_lost:
                up.transport.write(data)
            return
        self.early.append(data)
        self.early_bytes += len(data)
        if self.early_bytes > _MAX_EARLY_BYTES:
            self._pause_reading_down()

    def _header_bytes(self, data: bytes) -> None:
        buf = self.header_buf + data
        try:
            hdr = parse(buf)
        except ProxyProtocolError as exc:
            self.listener.reject("proxy_protocol")
            log.info("l4 %s: bad PROXY header from %s: %s", self.listener.name,
                     self.client[0], exc)
            self._close_now()
            return
        if hdr is None:
            if len(buf) > 65536 + 16:  # unreachable while parse caps v1/v2: a guard
                self.listener.reject("proxy_protocol")
                self._close_now()
                return
            self.header_buf = buf
            return
        self.header_buf = b""
        self.awaiting_header = False
        if hdr.source is not None:
            self.client = hdr.source
            self.local = hdr.dest
        rest = buf[hdr.length:]
        self._start()
        if rest:
            self.data_received(rest)

    def eof_received(self):
        return self._eof(upstream=False)

    def _eof(self, *, upstream: bool) -> bool:
        """A half-close from one side: pass it on; both done: close."""
        if upstream:
            self.up_eof = True
            if not self.closed:
                self._write_eof(self.transport)
        else:
            self.down_eof = True
            if self.awaiting_header:  # the header never came whole
                self.listener.reject("proxy_protocol")
                self._close_now()
                return False
            up = self.upstream
            if up is not None:
                self._write_eof(up.transport)
        if self.up_eof and self.down_eof:
            self._close_both()
            return False
        return True  # keep the other direction open

    @staticmethod
    def _write_eof(transport) -> None:
        try:
            if transport.can_write_eof():
                transport.write_eof()
            else:
                transport.close()
        except (OSError, RuntimeError):
            transport.close()

    def connection_lost(self, exc) -> None:
        self._lost(upstream=False, exc=exc)

    def _lost(self, *, upstream: bool, exc) -> None:
        """One side is gone: the other gets what is queued for it, then a close (a reset
        passes on as a reset). The session ends when both are gone; until then the sweeper
        still watches it, so a peer that never drains is aborted at the idle timeout."""
        if upstream:
            self.up_lost = True
            if not self.down_lost and self.transport is not None:
                self._shut(self.transport, exc)
        else:
            self.down_lost = True
            if self.connect_task is not None:
                self.connect_task.cancel()
            up = self.upstream
            if up is not None and not self.up_lost and up.transport is not None:
                self._shut(up.transport, exc)
        if self.down_lost and (self.up_lost or self.upstream is None):
            self._end()
        elif not self.closed and not self.half_closed:  # (half-closed: its margin holds)
            self.deadline = time.monotonic() + min(self.spec["idle_timeout_seconds"],
                                                   _LINGER_SECONDS)

    @staticmethod
    def _shut(transport, exc) -> None:
        if exc is not None:
            transport.abort()
        else:
            transport.close()

    # ---------------------------------------------------------------- flow control
    def pause_writing(self) -> None:  # the client's write buffer is full
        up = self.upstream
        if up is not None and up.transport is not None:
            up.transport.pause_reading()

    def resume_writing(self) -> None:
        up = self.upstream
        if up is not None and up.transport is not None and not self.closed:
            up.transport.resume_reading()

    def _pause_down(self) -> None:  # the upstream's write buffer is full
        self._pause_reading_down()

    def _resume_down(self) -> None:
        self._resume_reading_down()

    def _pause_reading_down(self) -> None:
        if not self.down_paused and not self.closed:
            self.down_paused = True
            self.transport.pause_reading()

    def _resume_reading_down(self) -> None:
        if self.down_paused and not self.closed:
            self.down_paused = False
            self.transport.resume_reading()

    # ---------------------------------------------------------------- ending
    def _end(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.deadline = 0.0
        self._release()
        self.server.sessions.discard(self)
        self.listener.close(self)

    def _close_both(self) -> None:
        self._end()
        up = self.upstream
        if up is not None and up.transport is not None:
            up.transport.close()
        if self.transport is not None:
            self.transport.close()

    def _close_now(self) -> None:
        self._end()
        if self.connect_task is not None:
            self.connect_task.cancel()
        up = self.upstream
        if up is not None and up.transport is not None:
            up.transport.abort()
        if self.transport is not None:
            self.transport.close()

    def on_deadline(self, now: float) -> None:
        """Sweeper: the idle timeout (or the PROXY header timeout) passed?"""
        if self.closed:
            self.deadline = 0.0
            return
        if self.awaiting_header:
            self.listener.reject("proxy_protocol")
            self._close_now()
            return
        if self.half_closed or self.down_lost or self.up_lost:
            self._abort("did not drain")  # one side is gone and the other is stuck
            return
        limit = self.spec["idle_timeout_seconds"]
        if now - self.last_io < limit:
            self.deadline = self.last_io + limit
            return
        self.listener.idle_closed += 1
        self._close_now()

    def drain(self) -> None:
        """Graceful shutdown: nothing now; a byte stream has no boundary to stop at. The
        L4 manager half-closes it just before the deadline (module docstring, step 6)."""

    def _abort(self, why: str) -> None:
        if why == "shutdown deadline" and not self.closed and not self.half_closed \
                and self.transport is not None:
            self.half_close_at_deadline()
            return
        self._end()
        if self.connect_task is not None:
            self.connect_task.cancel()
        up = self.upstream
        if up is not None and up.transport is not None:
            up.transport.abort()
        if self.transport is not None:
            self.transport.abort()

    def half_close_at_deadline(self, margin: float = 1.0) -> None:
        """The shutdown deadline is here with the stream still open: both sides get a FIN
        after what is queued for them (an abort would throw queued bytes away), and the
        connection is counted (``dispa_l4_shutdown_closed_total``). The session stays in
        ``server.sessions`` until both transports have flushed and closed (so the worker
        does not exit under them), for ``margin`` seconds at most; then it is aborted."""
        if self.closed or self.half_closed:
            return
        self.half_closed = True
        self.listener.shutdown_closed += 1
        if self.connect_task is not None:
            self.connect_task.cancel()
        up = self.upstream
        if up is None or up.transport is None:
            self._close_now()  # still connecting: nothing queued upstream
            return
        self.deadline = time.monotonic() + margin
        for t in (self.transport, up.transport):
            if not t.is_closing():
                self._write_eof(t)
                t.close()  # connection_lost follows once its buffer is flushed
