"""Forwarding headers: X-Forwarded-For/-Proto/-Host, Forwarded (RFC 7239) and Via.

Rule: forwarding headers that arrive from a peer we do not trust are discarded and
replaced, because a client could otherwise claim any address (X-Forwarded-For spoofing).
From a trusted proxy (``[server] trusted_proxies``) we append the peer to the chain and keep
the original protocol and host it reported.
"""

from __future__ import annotations

import ipaddress

# Lowercase names the upstream head never gets from the downstream copy: we rebuild them.
FORWARDING_HEADERS = frozenset({b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host",
                                b"forwarded", b"via"})


class TrustedProxies:
    """A set of networks whose forwarding headers we believe; ``contains(ip)`` is memoised."""

    __slots__ = ("_nets", "_cache")

    def __init__(self, cidrs):
        self._nets = tuple(ipaddress.ip_network(c, strict=False) for c in cidrs)
        self._cache: dict[str, bool] = {}

    def contains(self, ip: str) -> bool:
        if not self._nets:
            return False
        hit = self._cache.get(ip)
        if hit is None:
            try:
                addr = ipaddress.ip_address(ip)
                hit = any(addr in n for n in self._nets)
            except ValueError:
                hit = False
            if len(self._cache) > 4096:
                self._cache.clear()
            self._cache[ip] = hit
        return hit


def _forwarded_node(ip: str) -> str:
    # RFC 7239 §6: IPv6 addresses are bracketed and the whole node quoted.
    return f'"[{ip}]"' if ":" in ip else ip


class BadTarget(ValueError):
    """An absolute-form request target we refuse (400)."""


def split_absolute_form(target: bytes) -> tuple[bytes | None, bytes]:
    """RFC 9112 §3.2.2: ``http://host:port/p?q`` -> ``(b"host:port", b"/p?q")``.

    Returns ``(None, target)`` for any other form (origin form, ``*``). The scheme is
    case-insensitive; a query without a path gets ``/``; userinfo (``user@host``) and an empty
    authority raise BadTarget. The authority then *replaces* the Host header upstream (the
    RFC says a proxy must ignore Host for absolute-form requests), so interception and the
    upstream always agree on the virtual host.
    """
    scheme = target[:8].lower()
    if scheme.startswith(b"http://"):
        start = 7
    elif scheme.startswith(b"https://"):
        start = 8
    else:
        return None, target
    end = len(target)
    for sep in (b"/", b"?", b"#"):
        i = target.find(sep, start)
        if 0 <= i < end:
            end = i
    authority = target[start:end]
    if not authority or b"@" in authority:
        raise BadTarget("invalid absolute-form request target")
    rest = target[end:].partition(b"#")[0]
    if not rest.startswith(b"/"):
        rest = b"/" + rest
    return authority, rest


def forwarding_headers(head, peer_ip: str, trusted: bool, via: bytes, proto: bytes = b"http",
                       host: bytes | None = None) -> list[tuple[bytes, bytes]]:
    """The forwarding headers for the upstream copy of ``head`` (a RequestHead).

    ``host`` overrides the Host header (absolute-form requests carry it in the target).
    """
    peer = peer_ip.encode("latin-1")
    if host is None:
        host = head.get(b"host") or b""
    if trusted:
        prior_xff = b", ".join(head.get_all(b"x-forwarded-for"))
        xff = prior_xff + b", " + peer if prior_xff else peer
        xproto = head.get(b"x-forwarded-proto") or proto
        xhost = head.get(b"x-forwarded-host") or host
        prior_fwd = b", ".join(head.get_all(b"forwarded"))
    else:
        xff, xproto, xhost, prior_fwd = peer, proto, host, b""
    node = _forwarded_node(peer_ip).encode("latin-1")
    fwd = b"for=" + node + b";proto=" + proto
    if host and _is_token_or_quotable(host):
        fwd += b';host="' + host + b'"'
    if prior_fwd:
        fwd = prior_fwd + b", " + fwd
    out = [(b"X-Forwarded-For", xff), (b"X-Forwarded-Proto", xproto)]
    if xhost:
        out.append((b"X-Forwarded-Host", xhost))
    out.append((b"Forwarded", fwd))
    if via:
        prior_via = b", ".join(head.get_all(b"via"))
        version = b"1.1 " if head.version == 11 else b"1.0 "
        v = version + via
        out.append((b"Via", prior_via + b", " + v if prior_via else v))
    return out


def _is_token_or_quotable(value: bytes) -> bool:
    return b'"' not in value and b"\\" not in value
