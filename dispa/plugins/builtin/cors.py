"""``cors``: Cross-Origin Resource Sharing (Fetch standard, "CORS protocol").

Theory of operation
-------------------
* A **preflight** is ``OPTIONS`` with both ``Origin`` and ``Access-Control-Request-Method``.
  ``on_request`` answers every preflight itself with 204, so no upstream ever sees one. For
  an allowed origin the answer carries ``Access-Control-Allow-Origin`` (ACAO),
  ``-Allow-Credentials``, ``-Allow-Methods``, ``-Allow-Headers`` and ``-Max-Age``; for any
  other origin it carries none of them, and the browser fails the preflight.
* On **every other response** ``on_response`` owns the CORS fields: it removes the
  upstream's ``Access-Control-Allow-Origin``, ``-Allow-Credentials`` and ``-Expose-Headers``,
  adds ``Vary: Origin`` (the answer depends on the Origin, so caches must key on it), and for
  an allowed ``Origin`` sets ACAO, ``-Allow-Credentials`` and ``-Expose-Headers``.

Rule 1: an origin that is not allowed is never echoed, by either hook.

Rule 2 (Fetch §3.3.5, "CORS protocol and credentials"): a credentialed response must not use
``*``. With ``allow_credentials = true``, ``allow_origins = ["*"]`` reflects the request's
exact origin, ``allow_methods = ["*"]`` the requested method, ``allow_headers = ["*"]`` the
requested headers (only the token-shaped ones), and ``expose_headers = ["*"]`` the names of
the response's own fields. Without credentials ``*`` is sent as is.

Rule 3: the opaque origin ``null`` (sandboxed frames, ``file:`` pages) is matched only by an
explicit ``"null"`` entry, never by a wildcard, so it is never reflected by accident.

Origin patterns: ``*``; ``null``; an exact origin ``scheme://host[:port]``; or a wildcard
``[scheme://]*.suffix[:port]`` matching one or more labels in front of ``suffix`` (not
``suffix`` itself), any of ``http``/``https`` when the scheme is left out, and only the
default port when no port is written. Comparison is case-insensitive.
"""

from __future__ import annotations

import re
from typing import Annotated

import msgspec

from dispa.plugins.api import BuildContext, Filter, Request, Response, ResponseHead
from dispa.plugins.builtin._common import add_vary, is_token, list_tokens

__all__ = ["Cors", "CorsConfig"]

# Chromium caps Access-Control-Max-Age at 7200 s, Firefox at 86400 s; above that is noise.
MAX_AGE_LIMIT_SECONDS = 86400

_ORIGIN_RE = re.compile(r"([a-z][a-z0-9+.-]*)://([a-z0-9._~-]+|\[[0-9a-f:.]+\])(?::([0-9]{1,5}))?")
_PATTERN_RE = re.compile(r"(?:([a-z][a-z0-9+.-]*)://)?\*\.([a-z0-9._~-]+)(?::([0-9]{1,5}))?")

# Fetch §3.2.5 "CORS-safelisted response-header name": always readable by the page.
_SAFELISTED = frozenset({"cache-control", "content-language", "content-length", "content-type",
                         "expires", "last-modified", "pragma"})

_CORS_RESPONSE_FIELDS = (b"access-control-allow-origin", b"access-control-allow-credentials",
                         b"access-control-expose-headers")


def parse_origin(origin: str) -> tuple[str, str, str | None] | None:
    """``(scheme, host, port-or-None)`` of a serialised origin, lowercased; ``None`` when
    ``origin`` is not one (``null`` included)."""
    m = _ORIGIN_RE.fullmatch(origin.lower())
    return (m.group(1), m.group(2), m.group(3)) if m else None


class CorsConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """``allow_origins``: ``*``, ``null``, exact origins or ``*.suffix`` patterns;
    ``allow_methods`` / ``allow_headers`` / ``expose_headers``: tokens, or ``*``;
    ``allow_credentials``: send ``Access-Control-Allow-Credentials: true``;
    ``max_age``: seconds a browser may cache a preflight answer (omitted when unset)."""

    allow_origins: tuple[str, ...] = ("*",)
    allow_methods: tuple[str, ...] = ("GET", "HEAD", "PUT", "PATCH", "POST", "DELETE")
    allow_headers: tuple[str, ...] = ()
    expose_headers: tuple[str, ...] = ()
    allow_credentials: bool = False
    max_age: Annotated[int, msgspec.Meta(ge=0, le=MAX_AGE_LIMIT_SECONDS)] | None = None

    def __post_init__(self):
        if not self.allow_origins:
            raise ValueError("allow_origins: must list at least one origin (or '*')")
        for o in self.allow_origins:
            if o in ("*", "null") or parse_origin(o) or _PATTERN_RE.fullmatch(o.lower()):
                continue
            raise ValueError(f"allow_origins: {o!r} is not '*', 'null', scheme://host[:port] "
                             "or a *.suffix pattern (no path, no trailing slash)")
        for field in ("allow_methods", "allow_headers", "expose_headers"):
            for t in getattr(self, field):
                if not is_token(t):
                    raise ValueError(f"{field}: {t!r} is not a token")


class Cors(Filter):
    """Answers CORS preflights and adds the CORS fields to responses."""

    name = "cors"
    Config = CorsConfig

    def __init__(self, config: CorsConfig, ctx: BuildContext):
        super().__init__(config, ctx)
        cred = config.allow_credentials
        self._credentials = cred
        self._any_origin = "*" in config.allow_origins
        self._exact = frozenset(o.lower() for o in config.allow_origins
                                if o != "*" and not _PATTERN_RE.fullmatch(o.lower()))
        patterns = []
        for o in config.allow_origins:
            m = _PATTERN_RE.fullmatch(o.lower())
            if m:
                patterns.append((m.group(1), "." + m.group(2).rstrip("."), m.group(3)))
        self._patterns = tuple(patterns)
        self._any_method = "*" in config.allow_methods
        self._methods = ", ".join(config.allow_methods)
        self._any_header = "*" in config.allow_headers
        self._headers = ", ".join(config.allow_headers)
        self._any_expose = "*" in config.expose_headers
        self._expose = ", ".join(config.expose_headers)
        self._max_age = None if config.max_age is None else str(config.max_age)
        # ACAO is the literal "*" only when any origin is allowed and no credentials (Rule 2)
        self._star = self._any_origin and not cred

    # -- matching --------------------------------------------------------------------------

    def origin_allowed(self, origin: str) -> bool:
        """True when ``origin`` (a request's ``Origin`` value) is allowed (Rules 1, 3)."""
        low = origin.lower()
        if low in self._exact:
            return True
        parsed = parse_origin(low)
        if parsed is None:             # "null" or garbage: only an exact entry matches
            return False
        if self._any_origin:
            return True
        scheme, host, port = parsed
        for p_scheme, suffix, p_port in self._patterns:
            if ((p_scheme == scheme if p_scheme else scheme in ("http", "https"))
                    and host.endswith(suffix) and len(host) > len(suffix)
                    and port == p_port):
                return True
        return False

    def _allow_origin_value(self, origin: str) -> str:
        return "*" if self._star else origin

    # -- hooks -----------------------------------------------------------------------------

    def on_request(self, req: Request) -> Response | None:
        if req.method != "OPTIONS":
            return None
        origin = req.headers.get("origin")
        requested = req.headers.get("access-control-request-method")
        if origin is None or requested is None:
            return None                 # a plain OPTIONS request: not ours
        h: list[tuple[str, str]] = [
            ("vary", "Origin, Access-Control-Request-Method, Access-Control-Request-Headers")]
        if self.origin_allowed(origin):
            h.append(("access-control-allow-origin", self._allow_origin_value(origin)))
            if self._credentials:
                h.append(("access-control-allow-credentials", "true"))
            if self._any_method and self._credentials:
                if is_token(requested.strip()):
                    h.append(("access-control-allow-methods", requested.strip()))
            elif self._methods:
                h.append(("access-control-allow-methods", self._methods))
            if self._any_header and self._credentials:
                asked = [t for t in list_tokens(req.headers, "access-control-request-headers")
                         if is_token(t)]
                if asked:
                    h.append(("access-control-allow-headers", ", ".join(asked)))
            elif self._headers:
                h.append(("access-control-allow-headers", self._headers))
            if self._max_age is not None:
                h.append(("access-control-max-age", self._max_age))
        return Response(204, b"", h)

    def on_response(self, req: Request, resp: ResponseHead) -> None:
        headers = resp.headers
        for name in _CORS_RESPONSE_FIELDS:
            headers.remove(name)
        origin = req.headers.get("origin")
        allowed = origin is not None and self.origin_allowed(origin)
        expose = self._expose
        if allowed and self._any_expose and self._credentials:
            # the response's own field names (as the upstream sent them), less the
            # CORS-safelisted ones a browser exposes anyway (Fetch §3.2.5)
            expose = ", ".join(sorted({k.lower() for k in headers.keys()} - _SAFELISTED))
        add_vary(headers, ("Origin",))
        if not allowed:
            return None
        if expose:
            headers.set(b"access-control-expose-headers", expose)
        headers.set(b"access-control-allow-origin", self._allow_origin_value(origin))
        if self._credentials:
            headers.set(b"access-control-allow-credentials", b"true")
        return None
