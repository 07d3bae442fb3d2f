"""The response cache as a filter (``type = "cache"``): lookup, coalescing, revalidation, store.

Theory of operation
-------------------
The filter drives the sans-I/O rules of ``policy.py`` over a store from ``store.py``.
Everything per request lives in one :class:`_Exchange` under ``req.ctx[instance name]``;
what is shared by the requests of a worker lives on the instance: the store, the in-flight
fills (one :class:`asyncio.Future` per primary key) and the stale-while-revalidate flags.
Those are caches of the data plane, not configuration, which is why they are the one
exception to "per-request state never on ``self``" (STYLE C4): they are *meant* to be shared.

A request meets the hooks in this order (ARCHITECTURE §2, phases 4, 8, 9):

``on_request`` (async)
    1. Bypass (X-Cache ``BYPASS``): not GET/HEAD, ``no-store``, ``Authorization``, ``Range``,
       ``Upgrade`` or a request body. An unsafe method remembers to invalidate its URI.
    2. Look up the primary key; a *Vary marker* there sends the lookup to the secondary key
       built from the request's values of the ``Vary``-listed fields.
    3. Fresh → ``HIT`` (a 304 when the client's conditional matches). Stale but accepted by
       the client's ``max-stale`` → ``STALE``. Stale within ``stale-while-revalidate`` →
       ``STALE``, and the *next* request for that variant revalidates (see below).
    4. ``only-if-cached`` and nothing usable → 504.
    5. Otherwise the request goes upstream. If a fill for the same primary key is in flight
       (and the client did not force validation), it first waits for that fill (at most
       ``coalesce_timeout``) and looks up again: served → ``HIT`` (counted ``coalesced``).
       The first request to go upstream for a key registers itself as the *filler*.
       A stale entry with validators turns the request conditional: the client's own
       ``If-None-Match``/``If-Modified-Since`` are set aside and the stored ``ETag`` and
       ``Last-Modified`` sent instead, so the cache can answer the client itself afterwards.

``on_response``
    a 304 to our validation → the updated stored response (``REVALIDATED``); a 500/502/503/504
    while a stale entry allows ``stale-if-error`` → that entry (``STALE``); otherwise the
    response passes (``MISS``, or ``EXPIRED`` when it replaces a stale entry) and, if
    storable, its body is collected.

``on_response_body`` (sync)
    collects chunks (passing each through unchanged) up to ``max_entry_bytes``; at ``end``
    stores the entry and wakes the waiters of the fill.

``on_log``
    always releases the fill (waiters of a failed fill go upstream, never hang) and the
    stale-while-revalidate claim.

Stale-while-revalidate without an HTTP client: a filter cannot issue its own upstream
request, so "background revalidation" is a flag per stored variant. The first request that
finds the entry stale within the window is served ``STALE`` and raises the flag; the next
one claims it and goes upstream conditionally while every concurrent request keeps getting
``STALE``: *one request pays the revalidation, others are served stale*. A claim older than
``coalesce_timeout`` may be taken over, so a lost revalidation never pins the entry stale.

Rules:

1. Every :class:`Response` built here has a final status and no framing headers; the core
   frames the body (and drops it for HEAD, so HEAD is answered with the GET body present).
2. ``on_log`` is the backstop: whatever happened, after it no future of this request is
   pending and no waiter can wait longer than ``coalesce_timeout``.
3. Each request is counted exactly once in ``dispa_cache_requests_total{result}`` with one of
   ``hit``, ``miss``, ``expired``, ``bypass``, ``stale``, ``revalidated``, ``coalesced``.

WARNING: the async ``on_request`` waits up to ``coalesce_timeout``; the filter's own hook
``timeout`` (plugin settings) must be longer, or waiters are cut off as hook errors.
"""

from __future__ import annotations

import asyncio
import time
import weakref
from typing import Annotated, Any, Callable, ClassVar

import msgspec

from dispa.cache import policy
from dispa.cache.store import DiskStore, Entry, MemoryStore, TieredStore
from dispa.plugins.api import BuildContext, Filter, Headers, Request, Response, ResponseHead

__all__ = ["CacheConfig", "CacheFilter", "KEY_FIELDS"]

MiB = 1024 * 1024

DEFAULT_KEY = ("method", "scheme", "host", "path", "query")
KEY_FIELDS = frozenset({"method", "scheme", "host", "path", "query"})

# Methods that do not invalidate (RFC 9110 §9.2.1 safe methods).
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})

# Bound on remembered stale-while-revalidate flags; past it they are forgotten at once (the
# cost is at most one extra STALE answer or one extra revalidation per forgotten key).
SWR_FLAGS_MAX = 4096

_PENDING, _CLAIMED = 1, 2

# modes of an exchange
_LOOKUP, _BYPASS, _SERVED = 0, 1, 2

RESULTS = ("hit", "miss", "expired", "bypass", "stale", "revalidated", "coalesced")
_ATTR = {"hit": "hits", "miss": "misses", "expired": "expired", "bypass": "bypass",
         "stale": "stale", "revalidated": "revalidated", "coalesced": "coalesced"}

# Stores outlive a configuration reload: a new snapshot's filter with the same name and
# the same storage settings picks up the old one's store (weakly held, so a removed filter
# frees its memory).
_SHARED_STORES: "weakref.WeakValueDictionary[tuple, Any]" = weakref.WeakValueDictionary()


class CacheConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Settings of ``[[plugins.plugins]] type = "cache"`` (see docs/cache.md)."""

    # memory tier budget: body + header bytes + key of every entry
    max_bytes: Annotated[int, msgspec.Meta(ge=0)] = 64 * MiB
    # a response larger than this (body + headers + key) is passed through, not stored
    max_entry_bytes: Annotated[int, msgspec.Meta(ge=0)] = 8 * MiB
    # optional disk tier (a directory; "{worker_id}" is replaced by the worker's id)
    disk_path: str | None = None
    disk_max_bytes: Annotated[int, msgspec.Meta(ge=0)] = 1024 * MiB
    # cache key template: method, scheme, host, path, query, header:<name>, cookie:<name>
    key: tuple[str, ...] = DEFAULT_KEY
    # lifetime for storable responses without explicit freshness when no heuristic applies
    default_ttl: Annotated[float, msgspec.Meta(ge=0)] = 0.0
    # use the RFC 9111 §4.2.2 Last-Modified heuristic (10%, capped at one day)
    cache_heuristic: bool = True
    # response header naming the cache result; "" disables it
    status_header: str = "x-cache"
    # store responses that carry Set-Cookie (the stored copy never keeps Set-Cookie)
    cache_set_cookie: bool = False
    # how long a request waits for an in-flight fill of the same key (0: never waits)
    coalesce_timeout: Annotated[float, msgspec.Meta(ge=0)] = 10.0


class _Exchange:
    """Per-request state (``req.ctx[<instance name>]``)."""

    __slots__ = ("mode", "key", "skey", "request_time", "response_time", "req_cc", "req_raw",
                 "entry", "revalidating", "client_cond", "fut", "swr_claim", "swr_key",
                 "may_store", "invalidate", "pending", "counted", "collect", "chunks",
                 "nbytes", "expect_len", "store_status", "store_headers", "vary_names")

    def __init__(self, now: float):
        self.mode = _LOOKUP
        self.key = ""
        self.skey = ""
        self.request_time = now
        self.response_time = now
        self.req_cc: dict[str, str | None] = {}
        self.req_raw: list[tuple[bytes, bytes]] = []
        self.entry: Entry | None = None       # the stale entry being validated
        self.revalidating = False              # we sent the entry's validators upstream
        self.client_cond: list[tuple[bytes, bytes]] = []  # the client's own conditionals
        self.fut: asyncio.Future | None = None  # our fill, when this request is the filler
        self.swr_claim: tuple[int, float] | None = None
        self.swr_key = ""
        self.may_store = False
        self.invalidate = False
        self.pending = "miss"                  # result to count once the response is known
        self.counted = False
        self.collect = False
        self.chunks: list[bytes] | None = None
        self.nbytes = 0
        self.expect_len: int | None = None
        self.store_status = 0
        self.store_headers: tuple[tuple[bytes, bytes], ...] = ()
        self.vary_names: tuple[str, ...] = ()


def _compile_key(template: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    if not template:
        raise ValueError("key: the template must name at least one field")
    out = []
    for item in template:
        kind, sep, arg = item.partition(":")
        kind = kind.strip().lower()
        if not sep and kind in KEY_FIELDS:
            out.append((kind, ""))
        elif sep and kind in ("header", "cookie") and arg.strip():
            out.append((kind, arg.strip().lower() if kind == "header" else arg.strip()))
        else:
            raise ValueError(f"key: unknown field {item!r} (expected one of method, scheme, "
                             "host, path, query, header:<name>, cookie:<name>)")
    return tuple(out)


def _esc_uri(s: str) -> str:
    # "|" separates key parts; in a URI it is not allowed raw (RFC 3986), so %7C is the same
    # resource. Percent-encoding already present is kept as on the wire.
    return s.replace("|", "%7C") if "|" in s else s


def _esc_value(s: str) -> str:
    # header and cookie values are arbitrary: escape "%" too so the mapping stays injective
    return s.replace("%", "%25").replace("|", "%7C")


def _cookie(headers: Headers, name: str) -> str:
    for v in headers.get_all("cookie"):
        for pair in v.split(";"):
            k, eq, val = pair.strip().partition("=")
            if eq and k.strip() == name:
                return val.strip()
    return ""


def _marker_names(entry: Entry) -> tuple[str, ...]:
    for k, v in entry.headers:
        if k.lower() == b"vary":
            return tuple(n for n in v.decode("latin-1").split(",") if n)
    return ()


class CacheFilter(Filter):
    """An RFC 9111 shared cache with request coalescing (see the module doc and
    docs/cache.md). Counters: ``hits``, ``misses``, ``expired``, ``bypass``, ``stale``,
    ``revalidated``, ``coalesced``, ``stored``, ``evictions``."""

    name: ClassVar[str] = "cache"
    Config: ClassVar[type[msgspec.Struct]] = CacheConfig
    wants_response_body: ClassVar[bool] = True

    def __init__(self, config: CacheConfig, ctx: BuildContext):
        super().__init__(config, ctx)
        self._slot = self.instance_name
        self._metrics = ctx.metrics
        self._key_parts = _compile_key(tuple(config.key))
        if config.status_header:
            Headers().set(config.status_header, "HIT")  # raises ValueError if not a token
        self._status_name = config.status_header.encode("latin-1") if config.status_header \
            else b""
        self._status_extra = (config.status_header,) if config.status_header else ()
        self._heuristic = config.cache_heuristic
        self._default_ttl = float(config.default_ttl)
        self._coalesce_timeout = float(config.coalesce_timeout)
        self._max_entry = config.max_entry_bytes
        self._store = self._open_store(config, ctx)
        self._evictions_seen = self._store.evictions
        # in-flight fills: primary key -> future (True: something was stored, look again)
        self._inflight: dict[str, asyncio.Future] = {}
        # stale-while-revalidate flags: storage key -> (_PENDING | _CLAIMED, since)
        self._swr: dict[str, tuple[int, float]] = {}
        self.clock: Callable[[], float] = time.time
        self.hits = self.misses = self.expired = self.bypass = self.stale = 0
        self.revalidated = self.coalesced = self.stored = self.evictions = 0

    @classmethod
    def build(cls, config: CacheConfig, ctx: BuildContext) -> "CacheFilter":
        """Make the instance. ``ValueError`` for a bad key template or status header name,
        a ``max_entry_bytes`` no tier can hold, or a ``disk_path`` that cannot be used."""
        return cls(config, ctx)

    @staticmethod
    def _open_store(config: CacheConfig, ctx: BuildContext):
        budget = max(config.max_bytes, config.disk_max_bytes if config.disk_path else 0)
        if config.max_entry_bytes > budget:
            raise ValueError(f"max_entry_bytes ({config.max_entry_bytes}) exceeds every "
                             f"store budget ({budget})")
        disk_path = None
        if config.disk_path:
            disk_path = config.disk_path.replace("{worker_id}", str(ctx.worker_id))
        share = None
        if ctx.instance_name:
            share = (ctx.instance_name, ctx.worker_id, config.max_bytes, config.max_entry_bytes,
                     disk_path, config.disk_max_bytes if disk_path else 0, tuple(config.key))
            found = _SHARED_STORES.get(share)
            if found is not None:
                return found
        memory = MemoryStore(config.max_bytes, config.max_entry_bytes)
        store: Any = memory
        if disk_path:
            try:
                store = TieredStore(memory, DiskStore(disk_path, config.disk_max_bytes))
            except OSError as exc:
                raise ValueError(f"disk_path {disk_path!r} cannot be used: {exc}") from exc
        if share is not None:
            _SHARED_STORES[share] = store
        return store

    # -- public helpers ------------------------------------------------------------------------

    @property
    def store(self):
        """The store (memory, or memory in front of disk)."""
        return self._store

    def key_for(self, req: Request, method: str | None = None) -> str:
        """The primary cache key of ``req`` under the configured template: the fields joined
        by ``|`` (HEAD maps to GET; ``|`` in the path or query is written ``%7C``; in header
        and cookie values ``%`` is ``%25`` and ``|`` is ``%7C``)."""
        parts = []
        for kind, arg in self._key_parts:
            if kind == "method":
                m = method or req.method
                parts.append("GET" if m == "HEAD" else m)
            elif kind == "scheme":
                parts.append(req.scheme)
            elif kind == "host":
                parts.append(_esc_uri(req.host))
            elif kind == "path":
                parts.append(_esc_uri(req.path))
            elif kind == "query":
                parts.append(_esc_uri(req.query))
            elif kind == "header":
                parts.append(_esc_value(", ".join(req.headers.get_all(arg))))
            else:
                parts.append(_esc_value(_cookie(req.headers, arg)))
        return "|".join(parts)

    def purge(self, key_prefix: str) -> int:
        """Remove every stored entry whose key starts with ``key_prefix`` (Vary variants
        included, as their keys extend the primary key). Returns how many were removed.
        ``""`` empties the cache."""
        n = self._store.purge_prefix(key_prefix)
        for k in [k for k in self._swr if k.startswith(key_prefix)]:
            del self._swr[k]
        return n

    def purge_key(self, key: str) -> int:
        """Remove the entry stored under the primary ``key`` exactly (see :meth:`key_for`),
        with all its Vary variants. Returns how many entries were removed."""
        store = self._store
        e = store.get(key)
        if e is None:
            return 0
        n = 1 if store.delete(key) else 0
        self._swr.pop(key, None)
        if e.status == 0:
            n += self.purge(key + "\x00")
        return n

    # -- hooks -----------------------------------------------------------------------------

    async def on_request(self, req: Request) -> Response | None:
        now = self.clock()
        st = _Exchange(now)
        req.ctx[self._slot] = st
        method = req.method
        req_cc = st.req_cc = policy.request_directives(req.headers)
        reason = policy.maybe_bypass_reason(method, req.headers, req_cc,
                                            has_body=req.content_length > 0 or req.chunked)
        if reason is not None:
            st.mode = _BYPASS
            if reason == "method" and method not in SAFE_METHODS:
                st.invalidate = True
            elif reason == "authorization" and method == "GET":
                # RFC 9111 §3.5: not served from the cache, but storable if the response
                # says so (public, s-maxage, must-revalidate)
                st.may_store = True
                st.key = self.key_for(req)
                st.req_raw = list(req.headers.raw)
            self._count_once(st, "bypass")
            return None

        key = st.key = self.key_for(req)
        only_if_cached = "only-if-cached" in req_cc
        entry: Entry | None = None
        skey = key
        # a client demanding validation (no-cache) never rides on a fill that began before it
        no_cache = "no-cache" in req_cc
        for attempt in (0, 1):
            entry, skey = self._lookup(key, req.headers)
            forced = no_cache
            if entry is not None:
                a = policy.assess(entry.status, Headers(entry.headers), entry.request_time,
                                  entry.response_time, req_cc, now, heuristic=self._heuristic,
                                  default_ttl=self._default_ttl)
                v = a.verdict
                if v == policy.FRESH:
                    return self._serve(req, st, entry, a.age, "HIT",
                                       "coalesced" if attempt else "hit")
                if v == policy.STALE_OK or (v == policy.STALE_WHILE_REVALIDATE
                                            and only_if_cached):
                    return self._serve(req, st, entry, a.age, "STALE", "stale")
                if v == policy.STALE_WHILE_REVALIDATE:
                    if not self._swr_claim(st, skey, now):
                        return self._serve(req, st, entry, a.age, "STALE", "stale")
                    break  # this request pays the revalidation
                forced = forced or a.client_forced
            if only_if_cached:
                # RFC 9111 §5.2.1.7
                self._count_once(st, "miss")
                st.mode = _SERVED
                return self._local(504, b"not in cache (only-if-cached)\n", "MISS")
            if attempt == 0 and not forced and self._coalesce_timeout > 0:
                fut = self._inflight.get(key)
                if fut is not None:
                    await self._wait(key, fut)
                    now = self.clock()
                    continue
            break

        # -- going upstream ----------------------------------------------------------------
        st.request_time = now
        st.req_raw = list(req.headers.raw)
        client_conditional = "if-none-match" in req.headers or "if-modified-since" in req.headers
        if entry is not None:
            st.entry, st.skey, st.pending = entry, skey, "expired"
            conds = policy.conditional_headers(Headers(entry.headers))
            if conds:
                st.client_cond = [(k, v) for k, v in req.headers.raw
                                  if k.lower() in (b"if-none-match", b"if-modified-since")]
                req.headers.remove("if-none-match")
                req.headers.remove("if-modified-since")
                for n, val in conds:
                    req.headers.set(n, val)
                st.revalidating = True
        st.may_store = method == "GET"
        if (st.may_store and (st.revalidating or not client_conditional)
                and key not in self._inflight):
            st.fut = self._inflight[key] = asyncio.get_running_loop().create_future()
        return None

    def on_response(self, req: Request, resp: ResponseHead) -> Response | None:
        st = req.ctx.get(self._slot)
        if st is None or st.mode == _SERVED:
            return None
        now = self.clock()
        st.response_time = now
        status = resp.status
        if st.mode == _BYPASS:
            if st.invalidate and 200 <= status < 400:
                # RFC 9111 §4.4: a successful unsafe request invalidates the target URI
                self.purge_key(self.key_for(req, "GET"))
            if st.may_store:
                self._maybe_collect(req, st, resp, now)
            self._label(resp, "BYPASS")
            return None
        entry = st.entry
        if entry is not None and status == 304 and st.revalidating:
            return self._revalidated(req, st, resp, now)
        if entry is not None and status in policy.STALE_IF_ERROR_STATUSES:
            h = Headers(entry.headers)
            cc = policy.response_directives(h)
            age = policy.current_age(h, entry.request_time, entry.response_time, now)
            life = policy.freshness_lifetime(entry.status, h, cc, entry.response_time,
                                             heuristic=self._heuristic,
                                             default_ttl=self._default_ttl)
            if policy.stale_if_error_ok(cc, st.req_cc, age - life):
                self._release(st, False)
                self._count_once(st, "stale")
                st.mode = _SERVED
                return self._response(entry.status, entry.headers, entry.body, age, "STALE")
        result = st.pending
        self._count_once(st, result)
        if not (st.may_store and self._maybe_collect(req, st, resp, now)):
            self._release(st, False)
            if entry is not None and req.method == "GET" and (
                    200 <= status < 300 or status in (404, 410)):
                # a full answer that cannot be stored supersedes the stale one
                self._store.delete(st.skey)
        self._label(resp, "EXPIRED" if result == "expired" else "MISS")
        return None

    def on_response_body(self, req: Request, resp: ResponseHead, chunk: bytes,
                         end: bool) -> bytes:
        st = req.ctx.get(self._slot)
        if st is None or not st.collect:
            return chunk
        if chunk:
            st.nbytes += len(chunk)
            if st.nbytes > self._max_entry:
                # too large to store: give up, keep streaming
                st.collect = False
                st.chunks = None
                self._release(st, False)
                return chunk
            st.chunks.append(chunk if type(chunk) is bytes else bytes(chunk))
        if end:
            st.collect = False
            body = b"".join(st.chunks)
            st.chunks = None
            if st.expect_len is not None and len(body) != st.expect_len:
                self._release(st, False)
                return chunk
            self._commit(st, body)
        return chunk

    def on_log(self, req: Request, status: int, error: str | None) -> None:
        st = req.ctx.get(self._slot)
        if st is None:
            return
        # Rule 2: whatever happened, nobody waits on this request any more
        self._release(st, False)
        st.collect = False
        st.chunks = None
        if st.swr_claim is not None:
            if self._swr.get(st.swr_key) == st.swr_claim:
                del self._swr[st.swr_key]
            st.swr_claim = None
        if not st.counted:
            self._count_once(st, "bypass" if st.mode == _BYPASS else st.pending)

    # -- lookup ----------------------------------------------------------------------------

    def _lookup(self, key: str, headers: Headers) -> tuple[Entry | None, str]:
        """The stored response selected for a request (RFC 9111 §4.1), and its storage key."""
        e = self._store.get(key)
        if e is None or e.status != 0:
            return e, key
        values = policy.vary_values(_marker_names(e), headers)
        skey = key + "\x00" + policy.vary_key(values)
        v = self._store.get(skey)
        if v is None or v.status == 0 or v.vary != values:
            return None, skey
        return v, skey

    async def _wait(self, key: str, fut: asyncio.Future) -> None:
        try:
            await asyncio.wait_for(asyncio.shield(fut), self._coalesce_timeout)
        except asyncio.TimeoutError:
            # The fill overran: stop routing new misses to it (the next becomes a filler).
            if self._inflight.get(key) is fut:
                del self._inflight[key]

    def _swr_claim(self, st: _Exchange, skey: str, now: float) -> bool:
        """True when this request should revalidate; False: serve STALE."""
        flags = self._swr
        f = flags.get(skey)
        if f is None:
            if len(flags) >= SWR_FLAGS_MAX:
                flags.clear()
            flags[skey] = (_PENDING, now)
            return False
        state, since = f
        if state == _PENDING or now - since > self._coalesce_timeout:
            st.swr_claim = flags[skey] = (_CLAIMED, now)
            st.swr_key = skey
            return True
        return False

    # -- answers ---------------------------------------------------------------------------

    def _serve(self, req: Request, st: _Exchange, entry: Entry, age: float, label: str,
               result: str) -> Response:
        st.mode = _SERVED
        self._count_once(st, result)
        h = Headers(entry.headers)
        if policy.client_not_modified(req.method, req.headers, entry.status, h,
                                      entry.response_time):
            return self._response(304, policy.not_modified_headers(h), b"", age, label)
        return self._response(entry.status, entry.headers, entry.body, age, label)

    def _response(self, status: int, headers, body: bytes, age: float, label: str) -> Response:
        raw = [(k, v) for k, v in headers if k.lower() != b"age"]
        raw.append((b"Age", str(int(age)).encode()))
        if self._status_name:
            raw.append((self._status_name, label.encode()))
        r = Response(status, body)
        r.headers = Headers(raw)  # stored fields were validated when they arrived
        return r

    def _local(self, status: int, body: bytes, label: str) -> Response:
        r = Response(status, body, {"content-type": "text/plain; charset=utf-8"})
        self._label(r, label)
        return r

    def _label(self, resp: ResponseHead | Response, label: str) -> None:
        if self._status_name:
            resp.headers.set(self._status_name, label)

    def _revalidated(self, req: Request, st: _Exchange, resp: ResponseHead,
                     now: float) -> Response:
        """A 304 answered our validation: update the stored entry, answer from it."""
        entry = st.entry
        incoming = Headers(list(resp.headers.raw))
        if "date" not in incoming:
            # RFC 9110 §6.6.1: a recipient with a clock adds Date to what it caches
            incoming.set("Date", policy.format_http_date(now))
        stored = Headers(entry.headers)
        if policy.validators_match(stored, incoming):
            merged = policy.merge_not_modified(entry.headers, incoming,
                                               extra=self._status_extra)
            ok = self._store.put(st.skey, Entry(entry.status, merged, entry.body, now,
                                                st.request_time, now, entry.vary))
            self._sync_evictions()
        else:
            # RFC 9111 §4.3.4: the 304 names another representation; do not update. The
            # upstream did accept our validators, so this answer may still use the body.
            merged = entry.headers
            self._store.delete(st.skey)
            ok = False
        self._swr.pop(st.skey, None)
        self._release(st, ok)
        self._count_once(st, "revalidated")
        st.mode = _SERVED
        mh = Headers(merged)
        age = policy.current_age(mh, st.request_time, now, now)
        if st.client_cond and policy.client_not_modified(
                req.method, Headers(st.client_cond), entry.status, mh, now):
            return self._response(304, policy.not_modified_headers(mh), b"", age,
                                  "REVALIDATED")
        return self._response(entry.status, merged, entry.body, age, "REVALIDATED")

    # -- storing ---------------------------------------------------------------------------

    def _maybe_collect(self, req: Request, st: _Exchange, resp: ResponseHead,
                       now: float) -> bool:
        """Decide storability; if storable, arm body collection. True when armed."""
        h = resp.headers
        req_h = Headers(st.req_raw)
        cc = policy.response_directives(h)
        if policy.maybe_unstorable_reason(req.method, req_h, st.req_cc, resp.status, h, cc,
                                          cache_set_cookie=self.config.cache_set_cookie):
            return False
        life = policy.freshness_lifetime(resp.status, h, cc, now, heuristic=self._heuristic,
                                         default_ttl=self._default_ttl)
        if not policy.worth_storing(life, h, cc):
            return False
        cl = h.get("content-length")
        st.expect_len = None
        if cl is not None:
            cl = cl.strip()
            if cl.isdigit():
                if int(cl) > self._max_entry:
                    return False
                st.expect_len = int(cl)
        stored = policy.headers_to_store(h, cc, strip_set_cookie=True,
                                         extra=self._status_extra)
        if "date" not in h:
            stored += ((b"Date", policy.format_http_date(now).encode()),)
        st.store_status = resp.status
        st.store_headers = stored
        st.vary_names = policy.vary_names(h)
        st.nbytes = len(st.key) + sum(len(k) + len(v) for k, v in stored)
        if st.nbytes > self._max_entry:
            return False
        st.chunks = []
        st.collect = True
        return True

    def _commit(self, st: _Exchange, body: bytes) -> None:
        store = self._store
        key = st.key
        names = st.vary_names
        now = st.response_time
        vary: tuple = ()
        if names:
            old = store.get(key)
            if old is None or old.status != 0 or _marker_names(old) != names:
                store.put(key, Entry(0, ((b"vary", ",".join(names).encode("latin-1")),), b"",
                                     now, now, now))
            vary = policy.vary_values(names, Headers(st.req_raw))
            skey = key + "\x00" + policy.vary_key(vary)
        else:
            old = store.get(key)
            if old is not None and old.status == 0:
                store.purge_prefix(key + "\x00")  # variants of a Vary that is gone
            skey = key
        entry = Entry(st.store_status, st.store_headers, body, now, st.request_time,
                      st.response_time, vary)
        ok = store.put(skey, entry)
        if ok:
            self.stored += 1
            if self._metrics is not None:
                self._metrics.inc("dispa_cache_stored_total")
        self._swr.pop(skey, None)
        self._sync_evictions()
        self._release(st, ok)

    def _release(self, st: _Exchange, stored: bool) -> None:
        fut = st.fut
        if fut is None:
            return
        st.fut = None
        if not fut.done():
            fut.set_result(stored)
        if self._inflight.get(st.key) is fut:
            del self._inflight[st.key]

    # -- counters --------------------------------------------------------------------------

    def _count_once(self, st: _Exchange, result: str) -> None:
        if st.counted:
            return
        st.counted = True
        attr = _ATTR[result]
        setattr(self, attr, getattr(self, attr) + 1)
        if self._metrics is not None:
            self._metrics.inc("dispa_cache_requests_total", (("result", result),))

    def _sync_evictions(self) -> None:
        n = self._store.evictions - self._evictions_seen
        if n > 0:
            self._evictions_seen += n
            self.evictions += n
            if self._metrics is not None:
                self._metrics.inc("dispa_cache_evictions_total", (), n)

    def stats(self) -> dict[str, int]:
        """The counters plus ``entries`` and ``size_bytes`` of the store (admin, tests)."""
        out = {_ATTR[r]: getattr(self, _ATTR[r]) for r in RESULTS}
        out.update(stored=self.stored, evictions=self.evictions, entries=len(self._store),
                   size_bytes=self._store.size_bytes)
        return out
