"""Downstream listening sockets, built inside each worker.

Every worker binds its own socket with SO_REUSEPORT, so the kernel spreads new connections
across workers without a shared accept queue (no thundering herd, no lock). The master
binds a probe socket once before starting workers to turn "address in use" or "permission
denied" into one clear startup error instead of N crashing workers.

SO_REUSEPORT caveat (STYLE C7): closing a listener drops connections still waiting in its
accept queue. The supervisor therefore starts replacement workers (which join the group)
before old ones close their listeners.
"""

from __future__ import annotations

import errno
import socket

from dispa.config.snapshot import ListenerSpec
from dispa.errors import StartupError


def _family(host: str) -> int:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def bind_listener(spec: ListenerSpec, *, reuseport: bool = True) -> socket.socket:
    """Create, bind and listen on ``spec``; raise StartupError naming the address."""
    fam = _family(spec.host)
    sock = socket.socket(fam, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuseport:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if fam == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((spec.host, spec.port))
        sock.listen(spec.backlog)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise StartupError(describe_bind_error(spec.host, spec.port, exc)) from None
    return sock


def describe_bind_error(host: str, port: int, exc: OSError) -> str:
    """A one-line, operator-facing explanation of a bind failure."""
    addr = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if exc.errno == errno.EADDRINUSE:
        return f"cannot listen on {addr}: address already in use by another process"
    if exc.errno == errno.EACCES:
        return f"cannot listen on {addr}: permission denied (ports below 1024 need root or CAP_NET_BIND_SERVICE)"
    if exc.errno == errno.EADDRNOTAVAIL:
        return f"cannot listen on {addr}: the address is not assigned to this machine"
    return f"cannot listen on {addr}: {exc.strerror or exc}"


def probe_listeners(specs) -> None:
    """Bind each listener once (with SO_REUSEPORT, like the workers will) and close it.

    Raises StartupError for the first address that cannot be bound. A port held by another
    program without SO_REUSEPORT fails here; our own previous generation of workers does not.
    """
    for spec in specs:
        bind_listener(spec).close()
