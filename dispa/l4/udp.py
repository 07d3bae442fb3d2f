"""UDP proxying: one upstream socket per client address (a *session*).

Theory of operation
-------------------
Each worker binds the listener's address with SO_REUSEPORT; the kernel hashes a datagram's
source address to one socket of the group, so one client's datagrams all reach the same
worker. :class:`UdpListenerProtocol` keeps a table client address -> :class:`UdpSession`:

* the first datagram from an address picks an endpoint (the cluster's pick: health,
  circuit breakers, outlier ejection; hashing selectors hash the client IP) and opens a
  connected UDP socket to it; datagrams that arrive before it is ready wait (at most
  ``_MAX_PENDING`` of them and ``_MAX_PENDING_BYTES`` in all; more are dropped and counted);
* with ``proxy_protocol_send = "v2"`` every datagram to the upstream starts with a PROXY v2
  header (``UDP``/``DGRAM``: UDP has no connection, so each datagram carries its own; the
  destination is the listener's bound address);
* no queue grows without bound: a socket whose user-space send buffer (what asyncio keeps
  when the kernel refuses a datagram) passes ``UDP_SEND_BUFFER_LIMIT`` drops further
  datagrams, counted in ``dispa_l4_dropped_total``; per session the memory is one small
  object, one connected socket and at most the pending datagrams above;
* datagrams from the upstream socket go back to the client from the listener's socket, so
  the client sees replies from the address it sent to;
* a session with no datagram either way for ``idle_timeout`` ends (the worker's sweeper
  calls ``on_deadline``; sessions sit in ``server.sessions``);
* the table is bounded by ``max_connections``: a new address over it is dropped and
  counted (``dispa_l4_rejected_total{reason="limit"}``); existing sessions keep working.

UDP has no connection to drain: on graceful shutdown sessions end at once.
"""

from __future__ import annotations

import asyncio
import logging
import time

from dispa.l4.proxy_protocol import encode_v2
from dispa.l4.tcp import NO_HEAD

log = logging.getLogger("dispa.l4")

# A UDP socket's user-space send buffer (asyncio keeps what the kernel refused): past this,
# datagrams are dropped and counted instead of queued without bound.
UDP_SEND_BUFFER_LIMIT = 256 * 1024

_MAX_PENDING = 64  # datagrams held per session while its upstream socket opens
_MAX_PENDING_BYTES = 64 * 1024  # ... and their bytes, so 10,000 sessions hold at most 640 MiB


class _UpstreamDatagrams(asyncio.DatagramProtocol):
    """The upstream socket of one session."""

    __slots__ = ("session",)

    def __init__(self, session: "UdpSession"):
        self.session = session

    def datagram_received(self, data: bytes, addr) -> None:
        self.session._from_upstream(data)

    def error_received(self, exc) -> None:
        # ICMP port unreachable and the like: the datagram is lost, as UDP allows; the
        # breakers and outlier detection hear of it as a failure of that endpoint
        s = self.session
        s.listener.connect_failures += 1
        if s.cluster is not None and s.cluster.tracks and s.ep >= 0:
            s.cluster.report(s.ep, 0, 0.0)

    def connection_lost(self, exc) -> None:
        self.session._end()


class UdpSession:
    """One client address of a UDP listener (module docstring)."""

    __slots__ = ("listener", "server", "client", "transport", "pending", "pending_bytes",
                 "last_io", "deadline", "closed", "cluster", "ep", "task", "idle_timeout",
                 "header", "replied")

    def __init__(self, listener, client):
        self.listener = listener
        self.server = listener.server
        self.client = client
        self.transport = None
        self.pending: list[bytes] | None = []
        self.pending_bytes = 0
        self.header = b""  # PROXY v2 header put before every datagram to the upstream
        self.replied = False  # the upstream answered once (reported as a success)
        self.last_io = time.monotonic()
        self.idle_timeout = listener.spec["idle_timeout_seconds"]
        self.deadline = self.last_io + self.idle_timeout
        self.closed = False
        self.cluster = None
        self.ep = -1
        self.task = None

    def start(self) -> bool:
        """Pick an endpoint and open the upstream socket; False when none is available."""
        spec = self.listener.spec
        cluster = self.server.runtime.clusters.get(spec["target_group"])
        if cluster is None or not cluster.endpoints:
            return False
        i = cluster.pick(self.client[0], None, NO_HEAD)
        if i < 0:
            return False
        if spec.get("proxy_protocol_send", "none") == "v2":
            self.header = encode_v2(self.client, (spec["host"], spec["port"]), stream=False)
        self.cluster = cluster
        self.ep = i
        cluster.selector.acquire(i)
        self.task = asyncio.ensure_future(self._open(cluster.endpoints[i]))
        return True

    async def _open(self, ep) -> None:
        loop = asyncio.get_running_loop()
        try:
            transport, _ = await loop.create_datagram_endpoint(
                lambda: _UpstreamDatagrams(self), remote_addr=(ep.host, ep.port))
        except OSError as exc:
            log.info("l4 %s: UDP socket to %s failed: %s", self.listener.name, ep.id, exc)
            self.listener.connect_failures += 1
            self._end()
            return
        self.task = None
        if self.closed:
            transport.close()
            return
        self.transport = transport
        pending, self.pending = self.pending, None
        for d in pending or ():
            self._to_upstream(d)

    def _to_upstream(self, data: bytes) -> None:
        t = self.transport
        if t.is_closing() or t.get_write_buffer_size() > UDP_SEND_BUFFER_LIMIT:
            self.listener.dropped += 1
            return
        t.sendto(self.header + data if self.header else data)

    def send(self, data: bytes) -> None:
        """A datagram from the client."""
        self.last_io = time.monotonic()
        lst = self.listener
        lst.bytes_in += len(data)
        lst.datagrams_in += 1
        if self.transport is not None:
            self._to_upstream(data)
        elif self.pending is not None:
            if len(self.pending) < _MAX_PENDING and \
                    self.pending_bytes + len(data) <= _MAX_PENDING_BYTES:
                self.pending.append(data)
                self.pending_bytes += len(data)
            else:
                lst.dropped += 1

    def _from_upstream(self, data: bytes) -> None:
        self.last_io = time.monotonic()
        if not self.replied:
            self.replied = True
            if self.cluster.tracks:  # an answer closes a half-open breaker
                self.cluster.report(self.ep, 200, 0.0)
        lst = self.listener
        lst.bytes_out += len(data)
        lst.datagrams_out += 1
        lst.sendto(data, self.client)

    def on_deadline(self, now: float) -> None:
        if self.closed:
            self.deadline = 0.0
            return
        if now - self.last_io < self.idle_timeout:
            self.deadline = self.last_io + self.idle_timeout
            return
        self.listener.idle_closed += 1
        self._end()

    def drain(self) -> None:
        self._end()

    def _abort(self, why: str) -> None:
        self._end()

    def _end(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.deadline = 0.0
        if self.task is not None:
            self.task.cancel()
            self.task = None
        if self.transport is not None:
            self.transport.close()
        if self.ep >= 0 and self.cluster is not None:
            self.cluster.selector.release(self.ep)
            self.ep = -1
        self.server.sessions.discard(self)
        self.listener.forget(self)


class UdpListenerProtocol(asyncio.DatagramProtocol):
    """The listening socket of a UDP listener: demultiplexes clients into sessions."""

    def __init__(self, listener):
        self.listener = listener
        self.transport = None

    def connection_made(self, transport):  # type: ignore[override]
        self.transport = transport

    def datagram_received(self, data: bytes, addr) -> None:
        lst = self.listener
        s = lst.udp_sessions.get(addr)
        if s is None:
            if len(lst.udp_sessions) >= lst.spec["max_connections"]:
                lst.reject("limit")
                return
            s = UdpSession(lst, addr)
            if not s.start():
                lst.reject("no_endpoint")
                return
            lst.udp_sessions[addr] = s
            lst.server.sessions.add(s)
            lst.opened += 1
            lst.gauge()
        s.send(data)

    def error_received(self, exc) -> None:  # pragma: no cover - depends on the kernel
        pass
