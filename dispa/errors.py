"""The Dispa error tree.

Every error carries where it came from (``source``), whether the core may retry the request
on another endpoint (``retryable``), and the HTTP status a downstream client should see
(``status_hint``) — the pingora-error model. Filters raise :class:`HTTPError` for deliberate
answers; everything else is a bug or an upstream failure that the core maps to 5xx.
"""

from __future__ import annotations

import enum


class ErrorSource(enum.Enum):
    """Who caused an error: the client, the upstream, or Dispa itself."""

    DOWNSTREAM = "downstream"
    UPSTREAM = "upstream"
    INTERNAL = "internal"


class DispaError(Exception):
    """Base class of every error Dispa raises on purpose."""

    source: ErrorSource = ErrorSource.INTERNAL
    retryable: bool = False
    status_hint: int = 500


class ConfigError(DispaError):
    """Invalid configuration. ``errors`` lists every problem found (file, line, field path)."""

    def __init__(self, errors: list["ConfigIssue"] | str):
        if isinstance(errors, str):
            errors = [ConfigIssue(message=errors)]
        self.errors = errors
        super().__init__("\n".join(e.format() for e in errors))


class ConfigIssue:
    """One configuration problem, located as precisely as the format allows."""

    __slots__ = ("file", "line", "path", "message")

    def __init__(self, message: str, *, file: str | None = None, line: int | None = None,
                 path: str | None = None):
        self.message = message
        self.file = file
        self.line = line
        self.path = path

    def format(self) -> str:
        where = ""
        if self.file:
            where = self.file + (f":{self.line}" if self.line else "")
        parts = [p for p in (where, self.path) if p]
        prefix = ": ".join(parts)
        return f"{prefix}: {self.message}" if prefix else self.message

    def as_dict(self) -> dict:
        return {"file": self.file, "line": self.line, "path": self.path, "message": self.message}

    def __repr__(self) -> str:  # pragma: no cover - debugging aid
        return f"ConfigIssue({self.format()!r})"


class HTTPError(DispaError):
    """A deliberate error response raised by a filter: the client gets ``status``."""

    source = ErrorSource.DOWNSTREAM

    def __init__(self, status: int, message: str = ""):
        self.status_hint = status
        super().__init__(message or f"HTTP {status}")


class UpstreamError(DispaError):
    """The upstream failed: connect refused, timeout, reset, malformed response."""

    source = ErrorSource.UPSTREAM

    def __init__(self, message: str, *, status_hint: int = 502, retryable: bool = False):
        self.status_hint = status_hint
        self.retryable = retryable
        super().__init__(message)


class StartupError(DispaError):
    """The server cannot start: address in use, permission denied, bad worker count."""
