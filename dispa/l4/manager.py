"""A worker's L4 listeners: binding, reload, drain, and per-listener metrics.

Theory of operation
-------------------
``Snapshot.l4`` lists the ``[[l4.listeners]]`` as plain data (config/stream_model.py). The
worker's :class:`L4Manager` binds each one with SO_REUSEPORT (TCP: ``tcp.TcpSession`` per
connection; UDP: ``udp.UdpListenerProtocol``) and, on a new snapshot, keeps listeners whose
name, protocol and address are unchanged (new connections take the new settings), binds new
ones and closes removed ones. Open connections keep the settings they started with.

Metrics (counted on the listener objects, exported by one collector):
``dispa_l4_connections_total{listener}`` (accepted TCP connections / UDP sessions),
``dispa_l4_active_connections{listener}`` (gauge),
``dispa_l4_rejected_total{listener,reason}`` (``limit``, ``untrusted``, ``proxy_protocol``,
``no_endpoint``), ``dispa_l4_bytes_total{listener,direction}`` (``in`` from clients,
``out`` to them), ``dispa_l4_datagrams_total{listener,direction}`` (UDP),
``dispa_l4_upstream_connect_failures_total{listener}``,
``dispa_l4_idle_closed_total{listener}``, ``dispa_l4_dropped_total{listener}`` (UDP
datagrams dropped while a session's socket opened).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket

from dispa.errors import StartupError
from dispa.l4.tcp import TcpSession
from dispa.l4.udp import UdpListenerProtocol

log = logging.getLogger("dispa.l4")

__all__ = ["L4Listener", "L4Manager"]

_HELP = {
    "dispa_l4_connections_total": ("counter", "L4 connections accepted (TCP) or sessions "
                                              "opened (UDP), by listener."),
    "dispa_l4_active_connections": ("gauge", "Open L4 connections / UDP sessions."),
    "dispa_l4_rejected_total": ("counter", "L4 connections or sessions refused, by reason."),
    "dispa_l4_bytes_total": ("counter", "L4 payload bytes, by direction (in: from clients)."),
    "dispa_l4_datagrams_total": ("counter", "UDP datagrams, by direction."),
    "dispa_l4_upstream_connect_failures_total": ("counter", "L4 upstream connect failures."),
    "dispa_l4_idle_closed_total": ("counter", "L4 connections or sessions ended by the idle "
                                              "timeout."),
    "dispa_l4_dropped_total": ("counter", "UDP datagrams dropped (session not ready)."),
}


class L4Listener:
    """One bound L4 listener in one worker, with its counters."""

    def __init__(self, server, spec: dict):
        self.server = server
        self.spec = spec
        self.name = spec["name"]
        self.key = (spec["protocol"], spec["host"], spec["port"])
        self._trusted = [ipaddress.ip_network(c) for c in spec["trusted_proxies"]]
        self.active: set = set()  # TCP sessions
        self.udp_sessions: dict = {}  # client address -> UdpSession
        self.handle = None  # asyncio Server (TCP) or DatagramTransport (UDP)
        self.opened = 0
        self.rejected: dict[str, int] = {}
        self.bytes_in = self.bytes_out = 0
        self.datagrams_in = self.datagrams_out = 0
        self.connect_failures = 0
        self.idle_closed = 0
        self.dropped = 0

    def update(self, spec: dict) -> None:
        """New settings for new connections (same name, protocol and address)."""
        self.spec = spec
        self._trusted = [ipaddress.ip_network(c) for c in spec["trusted_proxies"]]

    def trusted(self, ip: str) -> bool:
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return False
        if addr.version == 6 and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        return any(addr in net for net in self._trusted)

    # ---------------------------------------------------------------- used by sessions
    def reject(self, reason: str) -> None:
        self.rejected[reason] = self.rejected.get(reason, 0) + 1

    def open(self, session) -> None:
        self.active.add(session)
        self.opened += 1
        self.gauge()

    def close(self, session) -> None:
        self.active.discard(session)
        self.gauge()

    def forget(self, udp_session) -> None:
        if self.udp_sessions.get(udp_session.client) is udp_session:
            del self.udp_sessions[udp_session.client]
        self.gauge()

    def sendto(self, data: bytes, addr) -> None:
        if self.handle is not None and not self.handle.is_closing():
            self.handle.sendto(data, addr)

    def gauge(self) -> None:
        m = self.server.metrics
        if m is not None:
            m.set_gauge("dispa_l4_active_connections", (("listener", self.name),),
                        len(self.active) + len(self.udp_sessions))

    # ---------------------------------------------------------------- lifecycle
    async def bind(self, loop) -> None:
        spec = self.spec
        if spec["protocol"] == "tcp":
            sock = _bind(spec["host"], spec["port"], socket.SOCK_STREAM)
            sock.listen(spec["backlog"])
            self.handle = await loop.create_server(lambda: TcpSession(self), sock=sock,
                                                   backlog=spec["backlog"])
        else:
            sock = _bind(spec["host"], spec["port"], socket.SOCK_DGRAM)
            self.handle, _ = await loop.create_datagram_endpoint(
                lambda: UdpListenerProtocol(self), sock=sock)

    def stop_listening(self) -> None:
        """Stop accepting (TCP) / receiving (UDP). Open TCP connections go on."""
        h = self.handle
        if h is None:
            return
        self.handle = None
        h.close()
        for s in list(self.udp_sessions.values()):
            s._end()

    def export(self, counters: dict) -> None:
        lab = (("listener", self.name),)
        counters[("dispa_l4_connections_total", lab)] = self.opened
        for reason, n in self.rejected.items():
            counters[("dispa_l4_rejected_total", lab + (("reason", reason),))] = n
        counters[("dispa_l4_bytes_total", lab + (("direction", "in"),))] = self.bytes_in
        counters[("dispa_l4_bytes_total", lab + (("direction", "out"),))] = self.bytes_out
        if self.spec["protocol"] == "udp":
            counters[("dispa_l4_datagrams_total", lab + (("direction", "in"),))] = \
                self.datagrams_in
            counters[("dispa_l4_datagrams_total", lab + (("direction", "out"),))] = \
                self.datagrams_out
            counters[("dispa_l4_dropped_total", lab)] = self.dropped
        counters[("dispa_l4_upstream_connect_failures_total", lab)] = self.connect_failures
        counters[("dispa_l4_idle_closed_total", lab)] = self.idle_closed


def _bind(host: str, port: int, kind: int) -> socket.socket:
    """A non-blocking socket bound with SO_REUSEPORT (every worker binds its own, as
    server/listeners.py does for HTTP); raises StartupError naming the address."""
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(fam, kind)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if fam == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        if kind == socket.SOCK_STREAM:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((host, port))
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        addr = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        proto = "TCP" if kind == socket.SOCK_STREAM else "UDP"
        raise StartupError(f"cannot listen on {addr} ({proto}): {exc.strerror or exc}") \
            from None
    return sock


class L4Manager:
    """The worker's L4 listeners (module docstring)."""

    def __init__(self, server):
        self.server = server
        self.listeners: dict[str, L4Listener] = {}
        # listeners of every snapshot so far: their counters stay exported after a removal
        self._all: list[L4Listener] = []
        m = server.metrics
        if m is not None:
            for name, (kind, text) in _HELP.items():
                m.set_help(name, kind, text)
            m.add_collector(self._collect)

    async def start(self, plain) -> None:
        """Bind every listener of ``Snapshot.l4`` (raises StartupError naming the address)."""
        await self._apply(plain)

    def update(self, plain) -> asyncio.Future:
        """Apply a new snapshot's ``l4`` (binding happens in a task; failures are logged)."""
        task = asyncio.ensure_future(self._apply(plain))
        task.add_done_callback(_log_failure)
        return task

    async def _apply(self, plain) -> None:
        loop = asyncio.get_running_loop()
        wanted = {s["name"]: s for s in ((plain or {}).get("listeners") or [])}
        for name in [n for n, lst in self.listeners.items()
                     if n not in wanted or lst.key != (wanted[n]["protocol"], wanted[n]["host"],
                                                       wanted[n]["port"])]:
            self.listeners.pop(name).stop_listening()
        for name, spec in wanted.items():
            lst = self.listeners.get(name)
            if lst is not None:
                lst.update(spec)
                continue
            lst = L4Listener(self.server, spec)
            await lst.bind(loop)
            self.listeners[name] = lst
            self._all.append(lst)
            lst.gauge()

    def drain(self) -> None:
        """Graceful shutdown: stop accepting; TCP connections run on until the deadline."""
        for lst in self.listeners.values():
            lst.stop_listening()

    def _collect(self, counters: dict) -> None:
        for lst in self._all:
            lst.export(counters)


def _log_failure(task: asyncio.Future) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("l4 listeners not updated: %s", task.exception())
