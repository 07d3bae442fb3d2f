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
``no_endpoint``, ``breaker``), ``dispa_l4_bytes_total{listener,direction}`` (``in`` from clients,
``out`` to them), ``dispa_l4_datagrams_total{listener,direction}`` (UDP),
``dispa_l4_upstream_connect_failures_total{listener}``,
``dispa_l4_idle_closed_total{listener}``, ``dispa_l4_dropped_total{listener}`` (UDP
datagrams dropped: a session's socket still opening, or a socket's send buffer full),
``dispa_l4_shutdown_closed_total{listener}`` (TCP connections half-closed at the shutdown
deadline). Labels are bounded: ``listener`` names come from the config, ``reason`` and
``direction`` from the fixed sets above. Counters of listeners with the same name add up
(a listener replaced because its address changed, whose old connections still run), so no
counter goes backwards; a replaced listener whose last connection ended is folded into one
retired total per name, so reloads do not grow the list.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket

from dispa.errors import StartupError
from dispa.l4.tcp import TcpSession
from dispa.l4.udp import UDP_SEND_BUFFER_LIMIT, UdpListenerProtocol

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
    "dispa_l4_dropped_total": ("counter", "UDP datagrams dropped (session not ready, or "
                                          "a send buffer full)."),
    "dispa_l4_shutdown_closed_total": ("counter", "L4 TCP connections half-closed at the "
                                                  "shutdown deadline."),
}

_COUNTERS = ("opened", "bytes_in", "bytes_out", "datagrams_in", "datagrams_out",
             "connect_failures", "idle_closed", "dropped", "shutdown_closed")


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
        self.shutdown_closed = 0

    def absorb(self, old: "L4Listener") -> None:
        """Add the counters of ``old`` (same name, retired) to this one's."""
        for name in _COUNTERS:
            setattr(self, name, getattr(self, name) + getattr(old, name))
        for reason, n in old.rejected.items():
            self.rejected[reason] = self.rejected.get(reason, 0) + n

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

    def sendto(self, data: bytes, addr) -> bool:
        """Send a datagram to a client from the listening socket; False (counted as
        dropped) when the socket is gone or its send buffer is full."""
        h = self.handle
        if h is None or h.is_closing() or h.get_write_buffer_size() > UDP_SEND_BUFFER_LIMIT:
            self.dropped += 1
            return False
        h.sendto(data, addr)
        return True

    def gauge(self) -> None:
        m = self.server.metrics
        if m is not None:
            mgr = getattr(self.server, "l4", None)
            same = mgr.named(self.name) if isinstance(mgr, L4Manager) else (self,)
            m.set_gauge("dispa_l4_active_connections", (("listener", self.name),),
                        sum(len(x.active) + len(x.udp_sessions) for x in same))

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
        """Add this listener's counters to ``counters`` (several objects may share a name)."""
        lab = (("listener", self.name),)
        rows = [(("dispa_l4_connections_total", lab), self.opened)]
        for reason, n in self.rejected.items():
            rows.append((("dispa_l4_rejected_total", lab + (("reason", reason),)), n))
        rows += [
            (("dispa_l4_bytes_total", lab + (("direction", "in"),)), self.bytes_in),
            (("dispa_l4_bytes_total", lab + (("direction", "out"),)), self.bytes_out),
            (("dispa_l4_upstream_connect_failures_total", lab), self.connect_failures),
            (("dispa_l4_idle_closed_total", lab), self.idle_closed),
        ]
        if self.spec["protocol"] == "udp":
            rows += [
                (("dispa_l4_datagrams_total", lab + (("direction", "in"),)), self.datagrams_in),
                (("dispa_l4_datagrams_total", lab + (("direction", "out"),)),
                 self.datagrams_out),
                (("dispa_l4_dropped_total", lab), self.dropped),
            ]
        else:
            rows.append((("dispa_l4_shutdown_closed_total", lab), self.shutdown_closed))
        for key, n in rows:
            counters[key] = counters.get(key, 0) + n


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
        # listeners no longer bound whose connections still run: exported with the rest
        self._old: list[L4Listener] = []
        # per name, the counters of retired listeners with no connection left
        self._retired: dict[str, L4Listener] = {}
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
            old = self.listeners.pop(name)
            old.stop_listening()
            self._old.append(old)
        self._prune()
        for name, spec in wanted.items():
            lst = self.listeners.get(name)
            if lst is not None:
                lst.update(spec)
                continue
            lst = L4Listener(self.server, spec)
            await lst.bind(loop)
            self.listeners[name] = lst
            lst.gauge()

    def named(self, name: str) -> list[L4Listener]:
        """The listeners of that name with connections to count: the bound one and any
        replaced one whose connections still run."""
        cur = self.listeners.get(name)
        return ([cur] if cur is not None else []) + [x for x in self._old if x.name == name]

    def drain(self, deadline_seconds: float | None = None) -> None:
        """Graceful shutdown: stop accepting. TCP connections run on (a byte stream has no
        boundary to stop at) until just before the worker's deadline, when both sides of
        each are half-closed: a FIN after what is queued for it, so the peers see an
        orderly end rather than a cut (``drain_margin``)."""
        for lst in self.listeners.values():
            lst.stop_listening()
        if deadline_seconds is not None:
            margin = drain_margin(deadline_seconds)
            asyncio.get_running_loop().call_later(
                max(0.0, deadline_seconds - margin), self.half_close_all, margin)

    def half_close_all(self, margin: float = 1.0) -> int:
        """Half-close every open TCP connection, giving each ``margin`` seconds to flush
        (counted per listener in ``dispa_l4_shutdown_closed_total`` and logged); returns
        how many."""
        n = 0
        for lst in list(self.listeners.values()) + self._old:
            for s in list(lst.active):
                if not s.closed and not s.half_closed:
                    s.half_close_at_deadline(margin)
                    n += 1
        if n:
            log.info("l4: %d connections half-closed at the shutdown deadline", n)
        return n

    def _collect(self, counters: dict) -> None:
        self._prune()
        # summed here, then set: ``counters`` keeps the values of the last collection
        mine: dict = {}
        for group in (self.listeners.values(), self._old, self._retired.values()):
            for lst in group:
                lst.export(mine)
        counters.update(mine)

    def _prune(self) -> None:
        """Fold replaced listeners whose last connection ended into the retired totals."""
        keep = []
        for lst in self._old:
            if lst.active or lst.udp_sessions:
                keep.append(lst)
            elif lst.name in self._retired:
                self._retired[lst.name].absorb(lst)
            else:
                self._retired[lst.name] = lst
        self._old = keep


def drain_margin(deadline_seconds: float) -> float:
    """How long before the worker's shutdown deadline L4 connections are half-closed: time
    for the queued bytes and FINs to leave before the process exits (a tenth of the
    deadline, at most one second)."""
    return min(1.0, deadline_seconds / 10)


def _log_failure(task: asyncio.Future) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("l4 listeners not updated: %s", task.exception())
