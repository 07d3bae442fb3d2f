"""``hostrewrite``: send a fixed ``Host`` to the upstream.

Theory of operation: the value is validated at build time as ``host[:port]`` (RFC 9110
§7.2: reg-name, IPv4 or bracketed IPv6 literal, optional port). ``on_upstream_request``
(phase 6) replaces the ``Host`` field of the outgoing copy, after routing and endpoint
choice, so the route match and ``req.host`` (the access log's host) still use the client's
Host. For an HTTP/2 upstream the core derives ``:authority`` from this field.
"""

from __future__ import annotations

import re

import msgspec

from dispa.plugins.api import BuildContext, Filter, Request

__all__ = ["HostRewrite", "HostRewriteConfig"]

# reg-name restricted to what DNS names and the usual internal names use (letters, digits,
# '-', '_', '.'), an IPv6 literal in brackets, then an optional port of 1-5 digits.
_HOST_RE = re.compile(
    r"(?:[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,251}[A-Za-z0-9_.])?|\[[0-9A-Fa-f:.]+\])"
    r"(?::[0-9]{1,5})?")


def valid_host(value: str) -> bool:
    """True when ``value`` is a ``host[:port]`` this filter accepts (port ≤ 65535)."""
    if not _HOST_RE.fullmatch(value):
        return False
    if not value.endswith("]") and ":" in value:
        return 0 < int(value.rsplit(":", 1)[1]) <= 65535
    return True


class HostRewriteConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """``host``: the Host sent upstream, ``name`` or ``name:port`` (required)."""

    host: str

    def __post_init__(self):
        if not valid_host(self.host):
            raise ValueError(f"host: {self.host!r} is not a host[:port]")


class HostRewrite(Filter):
    """Sets ``Host: <host>`` on the request sent upstream."""

    name = "hostrewrite"
    Config = HostRewriteConfig

    def __init__(self, config: HostRewriteConfig, ctx: BuildContext):
        super().__init__(config, ctx)
        self._host = config.host.encode("ascii")

    def on_upstream_request(self, req: Request) -> None:
        req.headers.set(b"Host", self._host)
        return None
