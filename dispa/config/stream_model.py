"""The ``[websocket]`` and ``[l4]`` tables: long-lived byte streams, and their checks.

``[websocket]`` tunes the WebSocket tunnel (dispa/proxy/websocket.py, docs/websocket.md);
``[[l4.listeners]]`` are TCP and UDP listeners proxied to a target group (dispa/l4,
docs/l4.md). ``config.load`` builds these Structs and calls :func:`check_l4` on a table that
built cleanly; ``config.compile`` turns them into ``Snapshot.websocket`` / ``Snapshot.l4``
with :func:`compile_websocket` and :func:`compile_l4`.

WARNING: a new key here needs a row in docs/configuration.md.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from typing import Annotated, Literal

import msgspec
from msgspec import Meta

# config.model imports this module: restate the base (see config/routing_model.py).


class _Table(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Base of every table: frozen, unknown keys rejected (as ``config.model._Table``)."""


_MAX_SECONDS = 7 * 24 * 3600
Seconds = Annotated[float, Meta(gt=0, le=_MAX_SECONDS, description="seconds (> 0)")]
SecondsOrOff = Annotated[float, Meta(ge=0, le=_MAX_SECONDS, description="seconds; 0: off")]


class WebSocketConfig(_Table):
    """``[websocket]``: limits and timeouts of proxied WebSocket connections."""

    # payload bytes of one message (all its fragments); larger: close 1009. 0: no limit
    max_message_size: Annotated[int, Meta(ge=0, le=1 << 40)] = 16 * 1024 * 1024
    idle_timeout: SecondsOrOff = 3600.0  # no frame either way for this long: close 1001
    ping_interval: SecondsOrOff = 0.0  # ping a silent side after this long; 0: never
    ping_timeout: Seconds = 20.0  # no byte after a ping for this long: close 1001


class L4ListenerConfig(_Table):
    """One ``[[l4.listeners]]`` entry: a TCP or UDP listener proxied to a target group."""

    name: Annotated[str, Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")]
    bind_address: Annotated[str, Meta(min_length=1)]  # "host:port"; IPv6 as "[::1]:9000"
    target_group: Annotated[str, Meta(min_length=1)]  # a [[target_groups]] name or "default"
    protocol: Literal["tcp", "udp"] = "tcp"
    # PROXY protocol header sent to the upstream first (TCP: v1 or v2; UDP: v2, on every
    # datagram)
    proxy_protocol_send: Literal["none", "v1", "v2"] = "none"
    # expect a PROXY protocol v1/v2 header from the downstream (TCP only); only from peers
    # in trusted_proxies, others are refused
    proxy_protocol_accept: bool = False
    trusted_proxies: list[str] = msgspec.field(default_factory=list)
    max_connections: Annotated[int, Meta(ge=1, le=10_000_000)] = 10000  # per worker; UDP: sessions
    idle_timeout: Seconds = 300.0  # no byte either way (TCP) / from either side (UDP)
    connect_timeout: Seconds = 5.0  # TCP connect to the upstream endpoint
    backlog: Annotated[int, Meta(ge=1, le=65535)] = 1024


class L4Config(_Table):
    """``[l4]``: TCP and UDP listeners (docs/l4.md)."""

    listeners: list[L4ListenerConfig] = msgspec.field(default_factory=list)


def check_l4(l4: L4Config, *, groups: set[str], binds: dict[str, str],
             parse_host_port: Callable, issue: Callable) -> None:
    """Cross-field rules of ``[l4]``: unique names and addresses, known target groups,
    PROXY protocol and trusted proxies only where they mean something.

    ``binds``: addresses already used by HTTP listeners (``"host:port"`` -> what).
    """
    names: dict[str, int] = {}
    used = {(k, "tcp"): v for k, v in binds.items()}
    for n, lst in enumerate(l4.listeners):
        where = ("l4", "listeners", n)
        if lst.name in names:
            issue(f"duplicate l4 listener {lst.name!r} (also l4.listeners[{names[lst.name]}])",
                  where + ("name",))
        names.setdefault(lst.name, n)
        parsed = parse_host_port(lst.bind_address)
        if isinstance(parsed, str):
            issue(parsed, where + ("bind_address",))
        else:
            key = (f"{parsed[0]}:{parsed[1]}", lst.protocol)
            if parsed[1] != 0 and key in used:
                issue(f"{lst.bind_address} ({lst.protocol}) is already used by {used[key]}",
                      where + ("bind_address",))
            used[key] = f"l4.listeners[{n}]"
        if lst.target_group not in groups:
            issue(f"unknown target group {lst.target_group!r} (known: "
                  f"{', '.join(sorted(groups))})", where + ("target_group",))
        if lst.protocol == "udp":
            if lst.proxy_protocol_send == "v1":
                issue("PROXY protocol v1 is TCP only (UDP listeners can send v2)",
                      where + ("proxy_protocol_send",))
            if lst.proxy_protocol_accept:
                issue("accepting the PROXY protocol is TCP only",
                      where + ("proxy_protocol_accept",))
        if lst.trusted_proxies and not lst.proxy_protocol_accept:
            issue("trusted_proxies needs proxy_protocol_accept = true",
                  where + ("trusted_proxies",))
        if lst.proxy_protocol_accept and not lst.trusted_proxies:
            issue("proxy_protocol_accept needs trusted_proxies (the peers allowed to send it)",
                  where + ("proxy_protocol_accept",))
        for k, cidr in enumerate(lst.trusted_proxies):
            try:
                ipaddress.ip_network(cidr.strip(), strict=False)
            except ValueError:
                issue(f"not an IP address or network: {cidr!r}", where + ("trusted_proxies", k))


def compile_websocket(ws: WebSocketConfig) -> dict | None:
    """``Snapshot.websocket``: None when every key has its default."""
    if ws == WebSocketConfig():
        return None
    return {"max_message_size": ws.max_message_size,
            "idle_timeout_seconds": float(ws.idle_timeout),
            "ping_interval_seconds": float(ws.ping_interval),
            "ping_timeout_seconds": float(ws.ping_timeout)}


def compile_l4(l4: L4Config, parse_host_port: Callable) -> dict | None:
    """``Snapshot.l4``: ``{"listeners": [...]}`` in the runtime's vocabulary, or None."""
    if not l4.listeners:
        return None
    out = []
    for lst in l4.listeners:
        host, port = parse_host_port(lst.bind_address)
        out.append({
            "name": lst.name, "protocol": lst.protocol, "host": host, "port": port,
            "target_group": lst.target_group,
            "proxy_protocol_send": lst.proxy_protocol_send,
            "proxy_protocol_accept": lst.proxy_protocol_accept,
            "trusted_proxies": [str(ipaddress.ip_network(c.strip(), strict=False))
                                for c in lst.trusted_proxies],
            "max_connections": lst.max_connections,
            "idle_timeout_seconds": float(lst.idle_timeout),
            "connect_timeout_seconds": float(lst.connect_timeout),
            "backlog": lst.backlog,
        })
    return {"listeners": out}
