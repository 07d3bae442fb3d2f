"""``blocklist``: answer requests for listed hosts or path prefixes without going upstream.

Theory of operation: at build time ``hosts`` is split into a frozenset of exact names and a
tuple of ``.suffix`` strings (from ``*.suffix`` entries), all lowercase without trailing dot;
``paths`` becomes a tuple for ``str.startswith``. ``on_request`` does one set lookup, one
``endswith`` with a tuple and one ``startswith`` with a tuple; a match is answered with a
fresh ``Response`` (the core may add fields to it) from the prebuilt status and body.

Path matching is a **plain prefix** on the path as the core hands it over (percent-encoding
kept, query excluded), as the original Dispa did: ``/admin`` also blocks ``/administrator``.
List ``/admin/`` when only that segment is meant (the bare ``/admin`` is then not blocked).
It is not a security boundary against encoded variants (``/%61dmin``) unless the core
normalises paths first.
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Annotated

import msgspec

from dispa.plugins.api import BuildContext, Filter, Request, Response
from dispa.plugins.builtin._common import request_host

__all__ = ["Blocklist", "BlocklistConfig"]


class BlocklistConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """``hosts``: exact host names or ``*.suffix`` wildcards (case-insensitive; the
    wildcard matches one or more labels in front of ``suffix``, not ``suffix`` itself);
    ``paths``: path prefixes (each must start with ``/``); ``status``: the answer's status;
    ``body``: the answer's body (``text/plain``; the status reason when empty)."""

    hosts: tuple[str, ...] = ()
    paths: tuple[str, ...] = ()
    status: Annotated[int, msgspec.Meta(ge=400, le=599)] = 403
    body: str = ""

    def __post_init__(self):
        for h in self.hosts:
            core = h[2:] if h.startswith("*.") else h
            if not core or "*" in core or any(c in core for c in " /\t?#@"):
                raise ValueError(f"hosts: {h!r} is not a host name or *.suffix wildcard")
        for p in self.paths:
            if not p.startswith("/"):
                raise ValueError(f"paths: {p!r} must start with '/'")


class Blocklist(Filter):
    """Answers ``status`` (403) when the request's host or path is listed."""

    name = "blocklist"
    Config = BlocklistConfig

    def __init__(self, config: BlocklistConfig, ctx: BuildContext):
        super().__init__(config, ctx)
        exact, suffixes = set(), []
        for h in config.hosts:
            h = h.lower().rstrip(".")
            if h.startswith("*."):
                suffixes.append(h[1:])          # keep the dot: "*.a.com" -> ".a.com"
            else:
                exact.add(h)
        self._exact = frozenset(exact)
        self._suffixes = tuple(suffixes)
        self._paths = tuple(config.paths)
        self._status = config.status
        self._body = (config.body or _reason(config.status)).encode("utf-8")

    def is_blocked(self, req: Request) -> bool:
        """True when ``req`` matches a listed host or path prefix."""
        if self._exact or self._suffixes:
            host = request_host(req)
            if host in self._exact or (self._suffixes and host.endswith(self._suffixes)):
                return True
        return bool(self._paths) and req.path.startswith(self._paths)

    def on_request(self, req: Request) -> Response | None:
        if self.is_blocked(req):
            # a new Response per answer: the core may add fields to it
            return Response(self._status, self._body,
                            {"content-type": "text/plain; charset=utf-8"})
        return None


def _reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase.lower() + "\n"
    except ValueError:
        return "blocked\n"
