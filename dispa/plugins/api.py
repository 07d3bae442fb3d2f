"""The filter API: the one public extension point of the request path (STYLE C3, C4).

A filter is a small object with optional phase hooks. Built-in plugins, the external
command plugin, WASM plugins, the response cache and third-party packages all implement
this same class; third-party filters register under the ``dispa.filters`` entry-point group
(see docs/plugins.md).

Lifecycle
---------
``Filter.build(config, ctx)`` runs once per configuration snapshot, inside each worker. All
parsing, regex compilation and table building happens there; the instance is then shared,
read-only, by every request of that worker. Per-request state lives in ``req.ctx`` (a dict
the filter may use under its own name), never on ``self``.

Hooks (all optional; the base class gives each a no-op default, and the chain compiler
keeps only the hooks a class overrides, so an unused hook costs nothing):

========================  ==========================================  =====================
hook                      when / may change                           return
========================  ==========================================  =====================
``on_request``            after routing, before an endpoint is        ``None``: continue;
                          chosen; may change ``req`` (method, path,   a :class:`Response`:
                          query, headers, ``ctx``)                    answer now (no upstream)
``on_request_body``       each request body chunk (only if            the bytes to forward
                          ``wants_request_body``); sync only
``on_upstream_request``   after the endpoint is chosen, before the    ``None``
                          head is sent; may change headers/path
``on_response``           the upstream's final response head, in      ``None``: continue;
                          reverse chain order; may change ``resp``    a :class:`Response`:
                                                                      replace it
``on_response_body``      each response body chunk (only if           the bytes to send
                          ``wants_response_body``); sync only;        (``b""`` holds back)
                          ``end`` is True once, for the last call
``on_log``                once per exchange, after the last byte      ignored; must not
                          (or the failure); read-only                 block or raise
========================  ==========================================  =====================

``on_request``, ``on_upstream_request`` and ``on_response`` may be ``async def``; the chain
compiler records that at build time, so a chain of sync hooks never creates a coroutine.

Errors: raising :class:`HTTPError` is a deliberate answer (e.g. 413, 429). Any other
exception obeys the filter's ``error_strategy``: ``continue`` (log, count, go on) or
``fail`` (answer 500). Async hooks are bounded by the filter's ``timeout`` (seconds); a
hook that overruns counts as an error of kind ``timeout``.
"""

from __future__ import annotations

from typing import Any, ClassVar, Iterable, Iterator

import msgspec

__all__ = [
    "BuildContext", "EmptyConfig", "Filter", "HTTPError", "Headers", "Request",
    "Response", "ResponseHead", "HOOKS",
]

# The hook names, in the order a request meets them.
HOOKS = ("on_request", "on_request_body", "on_upstream_request", "on_response",
         "on_response_body", "on_log")


class EmptyConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Config of a filter that takes none."""


def _b(v: str | bytes) -> bytes:
    if isinstance(v, bytes):
        return v
    return str(v).encode("latin-1")


def _check_name(name: bytes) -> bytes:
    # token chars only (RFC 9110 §5.6.2): a filter must not be able to inject framing
    if not name or any(c <= 32 or c >= 127 or c in b'"(),/:;<=>?@[\\]{}' for c in name):
        raise ValueError(f"invalid header name {name!r}")
    return name


def _check_value(value: bytes) -> bytes:
    if any((c < 32 and c != 9) or c == 127 for c in value):
        raise ValueError(f"invalid header value {value!r} (control characters)")
    return value.strip(b" \t")


class Headers:
    """An ordered, case-insensitive multi-map of header fields, over raw ``bytes`` pairs.

    Lookups take ``str`` or ``bytes`` names and return ``str`` values (latin-1, the HTTP
    field encoding); ``raw`` gives the ``list[tuple[bytes, bytes]]`` as the wire has it.
    Setting a value validates it, so a filter cannot inject CR/LF into the head.
    """

    __slots__ = ("raw", "changed")

    def __init__(self, raw: Iterable[tuple[bytes, bytes]] | None = None):
        self.raw: list[tuple[bytes, bytes]] = list(raw) if raw is not None else []
        self.changed = False

    @classmethod
    def _shared(cls, raw: list) -> "Headers":
        """A view over ``raw`` without a copy (the proxy's per-request constructor): every
        mutator below builds a new list before changing anything, so ``raw`` - the
        parser's list - is never modified."""
        self = object.__new__(cls)
        self.raw = raw
        self.changed = False
        return self

    def get(self, name: str | bytes, default: str | None = None) -> str | None:
        """The first value of ``name``, or ``default``."""
        n = _b(name).lower()
        for k, v in self.raw:
            if k.lower() == n:
                return v.decode("latin-1")
        return default

    def get_all(self, name: str | bytes) -> list[str]:
        n = _b(name).lower()
        return [v.decode("latin-1") for k, v in self.raw if k.lower() == n]

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, (str, bytes)):
            return False
        n = _b(name).lower()
        return any(k.lower() == n for k, _ in self.raw)

    def __getitem__(self, name: str | bytes) -> str:
        v = self.get(name)
        if v is None:
            raise KeyError(name)
        return v

    def set(self, name: str | bytes, value: str | bytes) -> None:
        """Replace every ``name`` field with one ``name: value`` (appended if absent)."""
        n = _check_name(_b(name))
        v = _check_value(_b(value))
        low = n.lower()
        out, placed = [], False
        for k, old in self.raw:
            if k.lower() == low:
                if not placed:
                    out.append((n, v))
                    placed = True
            else:
                out.append((k, old))
        if not placed:
            out.append((n, v))
        self.raw = out
        self.changed = True

    __setitem__ = set

    def add(self, name: str | bytes, value: str | bytes) -> None:
        """Append a field, keeping existing ones with the same name."""
        self.raw = self.raw + [(_check_name(_b(name)), _check_value(_b(value)))]
        self.changed = True

    def setdefault(self, name: str | bytes, value: str | bytes) -> None:
        """Add ``name: value`` only if ``name`` is absent."""
        if name not in self:
            self.add(name, value)

    def remove(self, name: str | bytes) -> int:
        """Remove every ``name`` field; returns how many were removed."""
        low = _b(name).lower()
        before = len(self.raw)
        self.raw = [(k, v) for k, v in self.raw if k.lower() != low]
        removed = before - len(self.raw)
        if removed:
            self.changed = True
        return removed

    __delitem__ = remove

    def items(self) -> Iterator[tuple[str, str]]:
        for k, v in self.raw:
            yield k.decode("latin-1"), v.decode("latin-1")

    def keys(self) -> list[str]:
        return [k.decode("latin-1") for k, _ in self.raw]

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self.raw)

    def __repr__(self) -> str:
        return f"Headers({list(self.items())!r})"


_NO_PARAMS: dict = {}  # shared, never mutated: a route with captures sets its own dict


class Request:
    """The request as filters see it: a mutable view of the client's request head.

    Changes go to the upstream copy; the client's original head stays available to logs
    through ``original_target``. ``path`` and ``query`` are the target split at the first
    ``?`` (percent-encoding kept, as on the wire).
    """

    __slots__ = ("method", "_p", "_q", "headers", "host", "client_ip", "scheme",
                 "version", "route", "cluster", "endpoint", "params", "ctx", "request_id",
                 "original_target", "content_length", "chunked", "_path0", "_query0",
                 "_head", "_lz")

    def __init__(self, method: str, target: bytes | str, headers: Headers, *, host: str = "",
                 client_ip: str = "", scheme: str = "http", version: str = "1.1",
                 route: str | None = None, params: dict | None = None, request_id: str = "",
                 content_length: int = -1, chunked: bool = False):
        t = target.decode("latin-1") if isinstance(target, bytes) else target
        path, sep, query = t.partition("?")
        self.method = method
        self._p = path
        self._q = query if sep else ""
        self.headers = headers
        self.host = host              # normalised Host (lowercase, no port)
        self.client_ip = client_ip    # the peer, or the trusted X-Forwarded-For client
        self.scheme = scheme
        self.version = version
        self.route = route            # the matched routing rule's name, or None
        self.cluster = ""             # the target group chosen (set before on_upstream_request)
        self.endpoint = ""            # the endpoint id chosen (set before on_upstream_request)
        self.params = params or {}    # path parameters captured by the route
        self.ctx: dict[str, Any] = {}  # per-request state; a filter keys it by its name
        self.request_id = request_id
        self.original_target = t
        self._path0 = self._p
        self._query0 = self._q
        self.content_length = content_length  # -1: none or chunked
        self.chunked = chunked
        self._head = None
        self._lz = 3

    @classmethod
    def _of_head(cls, method: str, head, target: bytes, host: str, client_ip: str,
                 rid: bytes) -> "Request":
        """The proxy's constructor, one per request: fields a filter never reads are never
        made. The rest (path, query, headers, ctx, ...) are filled by ``__getattr__`` on
        first use, from the parser's head and target."""
        self = object.__new__(cls)
        self.method = method
        self.host = host
        self.client_ip = client_ip
        # constants are stored at once: a slot store costs less than the lazy path's
        # AttributeError on first read
        self.scheme = "http"
        self.route = None
        self.cluster = ""
        self.endpoint = ""
        self.params = _NO_PARAMS
        self._p = self._q = None  # split from the target on first use (``path``)
        self._head = (head, target, rid)
        self._lz = 0  # bit 1: path/query made; bit 2: headers made
        return self

    def __getattr__(self, name: str):
        # only reached for a slot not set yet (see _of_head)
        lazy = _LAZY.get(name)
        if lazy is None or self._head is None:
            raise AttributeError(name)
        lazy(self)
        return object.__getattribute__(self, name)

    # path and query: properties, so that a hook assigning one before reading it is seen
    # (the target is split first, keeping the original for ``untouched``) and a request
    # whose hooks never touch them is never split

    @property
    def path(self) -> str:
        p = self._p
        if p is None:
            self._split()
            p = self._p
        return p

    @path.setter
    def path(self, value: str) -> None:
        if not self._lz & 1:
            self._split()
        self._p = value

    @property
    def query(self) -> str:
        q = self._q
        if q is None:
            self._split()
            q = self._q
        return q

    @query.setter
    def query(self, value: str) -> None:
        if not self._lz & 1:
            self._split()
        self._q = value

    def _split(self) -> None:
        if self._lz & 1 or self._head is None:
            return
        t = self._head[1].decode("latin-1")
        path, _, query = t.partition("?")
        self.original_target = t
        self._path0 = path
        self._query0 = query
        if self._p is None:
            self._p = path
        if self._q is None:
            self._q = query
        self._lz |= 1

    def _fill_head(self) -> None:
        head = self._head[0]
        self.version = "1.1" if head.version == 11 else "1.0"
        self.content_length = head.content_length
        self.chunked = head.chunked

    def _defaults(self) -> None:
        for k, v in (("scheme", "http"), ("route", None), ("cluster", ""), ("endpoint", ""),
                     ("params", _NO_PARAMS)):
            try:
                object.__getattribute__(self, k)
            except AttributeError:
                object.__setattr__(self, k, v)

    def _ctx(self) -> None:
        self.ctx = {}

    def _headers(self) -> None:
        self.headers = Headers._shared(self._head[0].headers)
        self._lz |= 2

    def _rid(self) -> None:
        rid = self._head[2]
        self.request_id = rid.decode("latin-1") if rid else ""

    def untouched(self) -> bool:
        """Neither the target nor the headers were changed (cheap when never read)."""
        lz = self._lz
        if lz & 1 and (self._p is not self._path0 or self._q is not self._query0):
            return False
        return not (lz & 2 and self.headers.changed)

    @property
    def target(self) -> str:
        """``path`` plus ``?query`` when there is one."""
        return f"{self.path}?{self.query}" if self.query else self.path

    def target_changed(self) -> bool:
        return self.path != self._path0 or self.query != self._query0

    def __repr__(self) -> str:
        return f"<Request {self.method} {self.target} host={self.host!r} route={self.route!r}>"


_LAZY = {
    "_path0": Request._split, "_query0": Request._split, "original_target": Request._split,
    "version": Request._fill_head, "content_length": Request._fill_head,
    "chunked": Request._fill_head, "scheme": Request._defaults, "route": Request._defaults,
    "cluster": Request._defaults, "endpoint": Request._defaults, "params": Request._defaults,
    "ctx": Request._ctx, "headers": Request._headers, "request_id": Request._rid,
}


class ResponseHead:
    """The upstream's final response head as ``on_response`` sees it (mutable)."""

    __slots__ = ("status", "reason", "headers")

    def __init__(self, status: int, headers: Headers, reason: str = ""):
        self.status = status
        self.reason = reason
        self.headers = headers

    def __repr__(self) -> str:
        return f"<ResponseHead {self.status}>"


class Response:
    """A response made by the proxy: a short-circuit in ``on_request``, a replacement in
    ``on_response``, a redirect or a direct response of a route."""

    __slots__ = ("status", "headers", "body")

    def __init__(self, status: int = 200, body: bytes | str = b"",
                 headers: Iterable[tuple[str | bytes, str | bytes]] | dict | None = None):
        if not 200 <= int(status) <= 599:
            raise ValueError(f"a local response needs a final status (200-599), got {status}")
        self.status = int(status)
        self.body = body.encode("utf-8") if isinstance(body, str) else bytes(body)
        h = Headers()
        if headers:
            for k, v in (headers.items() if isinstance(headers, dict) else headers):
                h.add(k, v)
        self.headers = h

    def __repr__(self) -> str:
        return f"<Response {self.status} {len(self.body)} bytes>"


class HTTPError(Exception):
    """Raise from a hook to answer with ``status`` deliberately (not counted as an error)."""

    def __init__(self, status: int, message: str = "", headers: dict | None = None):
        super().__init__(message or f"HTTP {status}")
        self.status = status
        self.message = message
        self.headers = headers or {}

    def to_response(self) -> Response:
        body = (self.message or _REASONS.get(self.status, "error")) + "\n"
        return Response(self.status, body, {"content-type": "text/plain; charset=utf-8",
                                            **self.headers})


_REASONS = {400: "bad request", 401: "unauthorized", 403: "forbidden", 404: "not found",
            405: "method not allowed", 413: "request body too large",
            429: "too many requests", 500: "internal error", 502: "bad gateway",
            503: "service unavailable", 504: "gateway timeout"}


class BuildContext:
    """What ``Filter.build`` may use: the worker's loop, a logger, metrics, and names.

    ``instance_name`` is the configured name of the filter instance (``[[plugins.plugins]]
    name``); ``clusters`` the target group names of the snapshot.
    """

    __slots__ = ("loop", "logger", "metrics", "instance_name", "clusters", "worker_id")

    def __init__(self, *, loop=None, logger=None, metrics=None, instance_name: str = "",
                 clusters: tuple[str, ...] = (), worker_id: int = 0):
        self.loop = loop
        self.logger = logger
        self.metrics = metrics
        self.instance_name = instance_name
        self.clusters = clusters
        self.worker_id = worker_id


class Filter:
    """Base class of every filter. Subclasses set ``name`` and, when they take settings,
    ``Config`` (a frozen msgspec Struct with ``forbid_unknown_fields=True``).

    ``name`` is the registry key: the ``type`` of a ``[[plugins.plugins]]`` entry.
    """

    name: ClassVar[str] = ""
    Config: ClassVar[type[msgspec.Struct]] = EmptyConfig
    # Body hooks run only for filters that declare them (decided at build time).
    wants_request_body: ClassVar[bool] = False
    wants_response_body: ClassVar[bool] = False

    def __init__(self, config: msgspec.Struct, ctx: BuildContext):
        self.config = config
        self.instance_name = ctx.instance_name or self.name

    @classmethod
    def build(cls, config: msgspec.Struct, ctx: BuildContext) -> "Filter":
        """Make the instance for one snapshot. Raise ``ValueError`` for a config that
        parses but cannot work (the snapshot is then refused with this filter named)."""
        return cls(config, ctx)

    def close(self) -> None:
        """Release resources (processes, files) when the snapshot is replaced."""

    # -- hooks (no-op defaults) ------------------------------------------------------------

    def on_request(self, req: Request) -> Response | None:
        return None

    def on_request_body(self, req: Request, chunk: bytes, end: bool) -> bytes:
        return chunk

    def on_upstream_request(self, req: Request) -> None:
        return None

    def on_response(self, req: Request, resp: ResponseHead) -> Response | None:
        return None

    def on_response_body(self, req: Request, resp: ResponseHead, chunk: bytes,
                         end: bool) -> bytes:
        return chunk

    def on_log(self, req: Request, status: int, error: str | None) -> None:
        return None


def overridden_hooks(cls: type[Filter]) -> tuple[str, ...]:
    """The hook names ``cls`` overrides (the chain compiler keeps only these)."""
    return tuple(h for h in HOOKS if getattr(cls, h) is not getattr(Filter, h))
