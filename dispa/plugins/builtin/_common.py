"""Helpers shared by the built-in filters (private; not part of the filter API).

Everything here runs either at build time (validation) or is a few dict/str operations on
the request path. Nothing here keeps state.
"""

from __future__ import annotations

import re
from typing import Iterable

from dispa.plugins.api import Filter, Headers

# Fields that frame the message or manage the connection (RFC 9110 §7.6.1, RFC 9112 §6).
# A config that sets them from a header filter could desynchronise the framing the core
# writes, so the header filters refuse them at build time (THREAT_MODEL: smuggling).
FRAMING_HEADERS = frozenset({
    "content-length", "transfer-encoding", "connection", "keep-alive", "proxy-connection",
    "te", "trailer", "upgrade",
})


def ctx_key(f: Filter) -> str:
    """The ``req.ctx`` key of one filter instance.

    Unique per instance (two ``compression`` instances on one route must not share state),
    readable in a debugger, built once at build time.
    """
    return f"{f.name}:{f.instance_name}:{id(f):x}"


def check_header(name: str, value: str, *, what: str) -> tuple[bytes, bytes]:
    """Validate one configured header field through the API's own checks.

    Returns the ``(name, value)`` pair as bytes, value stripped as ``Headers`` stores it.
    Raises ``ValueError`` for a non-token name, a control character in the value, a value
    that is not latin-1, or a framing header (:data:`FRAMING_HEADERS`).
    """
    if name.lower() in FRAMING_HEADERS:
        raise ValueError(f"{what}: {name!r} frames the message; a filter may not set it")
    h = Headers()
    try:
        h.set(name, value)
    except UnicodeEncodeError as exc:
        raise ValueError(f"{what}: {name!r}: value is not latin-1 ({exc.reason})") from None
    except ValueError as exc:
        raise ValueError(f"{what}: {exc}") from None
    return h.raw[0]


# RFC 9110 §5.6.2: token = 1*tchar
_TOKEN_RE = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


def is_token(s: str) -> bool:
    """RFC 9110 §5.6.2 ``token``."""
    return _TOKEN_RE.fullmatch(s) is not None


def list_tokens(headers: Headers, name: str) -> list[str]:
    """The comma-separated members of every ``name`` field, stripped, empty ones dropped
    (RFC 9110 §5.6.1)."""
    out = []
    for v in headers.get_all(name):
        for part in v.split(","):
            part = part.strip()
            if part:
                out.append(part)
    return out


def add_vary(headers: Headers, tokens: Iterable[str]) -> None:
    """Add each of ``tokens`` to ``Vary`` unless already listed (case-insensitively) or
    ``Vary: *`` is present (RFC 9110 §12.5.5)."""
    present = {t.lower() for t in list_tokens(headers, "vary")}
    if "*" in present:
        return
    missing = [t for t in tokens if t.lower() not in present]
    if not missing:
        return
    if "vary" in headers:
        old = ", ".join(list_tokens(headers, "vary"))
        headers.set("vary", ", ".join([old, *missing]) if old else ", ".join(missing))
    else:
        headers.add("vary", ", ".join(missing))


def request_host(req) -> str:
    """The request's host, lowercase, without port or trailing dot.

    ``req.host`` is normalised by the core; the Host field is the fallback when a request
    object was built without it (tests, other protocols).
    """
    host = req.host
    if not host:
        raw = (req.headers.get("host") or "").strip().lower()
        if raw.startswith("["):
            end = raw.find("]")
            host = raw[: end + 1] if end != -1 else raw
        else:
            host = raw.rsplit(":", 1)[0] if raw.count(":") == 1 else raw
    return host.lower().rstrip(".")
