"""``pathrewrite``: replace a leading path prefix before the request goes upstream.

Theory of operation: ``on_request`` (phase 4) checks ``req.path.startswith(from_prefix)``
and, when it holds, replaces that prefix with ``to_prefix``. The query string is untouched
(``req.query`` is separate). Matching is a plain string prefix, as in the original Dispa:
``from_prefix = "/api"`` also rewrites ``/apiary``; end it with ``/`` to match a segment.

Two rules keep the result a valid origin-form path (RFC 9112 §3.2.1):

1. When ``to_prefix`` ends with ``/`` and the rest starts with ``/``, one slash is dropped
   (``/api`` → ``/`` turns ``/api/users`` into ``/users``, not ``//users``).
2. An empty result, or one not starting with ``/``, gets a leading ``/``
   (``/api`` → ``""`` turns ``/api`` into ``/``).

The client's original target stays in ``req.original_target`` for the access log.
"""

from __future__ import annotations

import msgspec

from dispa.plugins.api import BuildContext, Filter, Request

__all__ = ["PathRewrite", "PathRewriteConfig"]


def _check_prefix(field: str, value: str, *, allow_empty: bool) -> None:
    if not value:
        if allow_empty:
            return
        raise ValueError(f"{field}: must not be empty")
    if not value.startswith("/"):
        raise ValueError(f"{field}: {value!r} must start with '/'")
    # '?' and '#' would move the query/fragment boundary; controls and spaces are not
    # allowed in a request target at all (RFC 9112 §3.2, RFC 3986 §3.3).
    bad = [c for c in value if c in "?# \t" or ord(c) < 33 or ord(c) > 126]
    if bad:
        raise ValueError(f"{field}: {value!r} contains {bad[0]!r}")


class PathRewriteConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """``from_prefix``: the prefix to match (required, starts with ``/``); ``to_prefix``:
    its replacement (``""`` strips the prefix)."""

    from_prefix: str
    to_prefix: str = ""

    def __post_init__(self):
        _check_prefix("from_prefix", self.from_prefix, allow_empty=False)
        _check_prefix("to_prefix", self.to_prefix, allow_empty=True)


class PathRewrite(Filter):
    """Rewrites ``req.path`` when it starts with ``from_prefix``; otherwise leaves it."""

    name = "pathrewrite"
    Config = PathRewriteConfig

    def __init__(self, config: PathRewriteConfig, ctx: BuildContext):
        super().__init__(config, ctx)
        self._from = config.from_prefix
        self._from_len = len(config.from_prefix)
        self._to = config.to_prefix
        self._to_slash = config.to_prefix.endswith("/")

    def rewrite(self, path: str) -> str | None:
        """The rewritten path, or ``None`` when ``path`` does not start with the prefix."""
        if not path.startswith(self._from):
            return None
        rest = path[self._from_len:]
        if self._to_slash and rest.startswith("/"):
            rest = rest[1:]
        out = self._to + rest
        if not out.startswith("/"):
            out = "/" + out
        return out

    def on_request(self, req: Request) -> None:
        new = self.rewrite(req.path)
        if new is not None:
            req.path = new
        return None
