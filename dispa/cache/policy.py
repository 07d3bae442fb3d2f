"""HTTP caching rules for a shared cache, sans-I/O (RFC 9111, RFC 9110 §13/§15, RFC 5861).

Theory of operation
-------------------
This module owns every *decision* the response cache makes and none of its *state*: it
never reads a clock, a store or a socket. Callers pass the header fields (as
:class:`~dispa.plugins.api.Headers`), the times they measured and ``now``; the functions
answer. That keeps each rule testable with literal headers and a fake clock, and keeps the
filter (``dispa/cache/filter.py``) a thin driver of these answers.

Rules, in the order a request meets them:

1. *Lookup or bypass* (:func:`maybe_bypass_reason`): only GET and HEAD are looked up; a
   request with ``no-store``, ``Authorization``, ``Range``, ``Upgrade`` or a body bypasses.
2. *Select a stored response* (:func:`vary_names`, :func:`vary_values`): a response with
   ``Vary`` matches only requests whose values of the listed fields normalise to the same
   strings (RFC 9111 §4.1); ``Vary: *`` matches nothing and is therefore never stored.
3. *Reuse or validate* (:func:`assess`): the stored response's age (§4.2.3) against its
   freshness lifetime (§4.2.1, heuristics §4.2.2), the request's ``no-cache``, ``max-age``,
   ``min-fresh``, ``max-stale`` (§5.2.1), the response's ``no-cache``, ``must-revalidate``,
   ``proxy-revalidate`` and ``s-maxage`` (§5.2.2), and ``stale-while-revalidate`` (RFC 5861
   §3).
4. *Answer the client's own conditional* (:func:`client_not_modified`): a weak
   ``If-None-Match`` comparison, else ``If-Modified-Since`` (RFC 9110 §13.1.2, §13.1.3,
   §13.2.2; RFC 9111 §4.3.2).
5. *Validate upstream* (:func:`conditional_headers`) and *update* from a 304
   (:func:`merge_not_modified`, :func:`validators_match`; RFC 9111 §4.3.4, §3.2).
6. *Serve stale on error* (:func:`stale_if_error_ok`; RFC 5861 §4).
7. *Store* (:func:`maybe_unstorable_reason`, :func:`headers_to_store`, :func:`worth_storing`;
   RFC 9111 §3, §3.1, §3.5).

Invariants: nothing here mutates its arguments; times are POSIX seconds (floats); an
unparsable value never raises, it is treated the way the RFC says to treat it (an invalid
``Expires`` is "in the past", an invalid ``max-age`` makes the response stale).

WARNING: ``FRAMING_FIELDS`` must stay in sync with what the proxy core recomputes when it
frames a local :class:`~dispa.plugins.api.Response` (``Content-Length``,
``Transfer-Encoding``); a stored copy of those would contradict the body the core sends.

Not yet measured: every hit parses the stored ``Cache-Control`` again. That is a few
microseconds; cache the parse in the entry only if a benchmark says it matters.
"""

from __future__ import annotations

import email.utils
import functools
import json
from datetime import timezone
from typing import Iterable

from dispa.plugins.api import Headers

__all__ = [
    "Assessment", "FRESH", "STALE_OK", "STALE_WHILE_REVALIDATE", "REVALIDATE",
    "HEURISTICALLY_CACHEABLE", "HEURISTIC_FRACTION", "HEURISTIC_MAX_SECONDS",
    "DELTA_SECONDS_MAX", "STALE_IF_ERROR_STATUSES", "assess", "client_not_modified",
    "conditional_headers", "current_age", "format_http_date", "freshness_lifetime",
    "has_explicit_freshness", "headers_to_store", "maybe_bypass_reason",
    "maybe_unstorable_reason", "merge_not_modified", "not_modified_headers",
    "parse_cache_control", "parse_delta_seconds", "parse_http_date", "request_directives",
    "response_directives", "stale_if_error_ok", "validators_match", "vary_key",
    "vary_names", "vary_values", "weak_match", "worth_storing",
]

# RFC 9110 §15.1: status codes that are heuristically cacheable ("cacheable by default").
HEURISTICALLY_CACHEABLE = frozenset({200, 203, 204, 206, 300, 301, 308, 404, 405, 410, 414, 501})

# Never stored: 206 needs range assembly (RFC 9111 §3.3/§3.4), which this cache does not do;
# 304 is a validation answer, not a representation; 1xx are not final.
NEVER_STORED = frozenset({206, 304})

# RFC 9111 §4.2.2: "if the response has a Last-Modified header field, caches are encouraged
# to use a heuristic expiration value that is no more than some fraction of the interval
# since that time. A typical setting of this fraction might be 10%."
HEURISTIC_FRACTION = 0.1

# Cap on a heuristic lifetime. Precedent: Squid's default refresh_pattern allows at most
# 4320 minutes (3 days); we stay more conservative at one day because a heuristic is a guess.
HEURISTIC_MAX_SECONDS = 86400

# RFC 9111 §1.2.2: a delta-seconds too large to represent "MUST" be taken as 2147483648.
DELTA_SECONDS_MAX = 2147483648

# RFC 5861 §4: "an error is any situation that would result in a 500, 502, 503, or 504".
STALE_IF_ERROR_STATUSES = frozenset({500, 502, 503, 504})

# RFC 9111 §3.1 (fields not stored) + RFC 9110 §7.6.1 (connection-specific fields).
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-connection", "te", "trailer",
                        "transfer-encoding", "upgrade", "proxy-authenticate",
                        "proxy-authorization", "proxy-authentication-info"})
# Framing is the core's job when it sends a stored body (see the module WARNING).
FRAMING_FIELDS = frozenset({"content-length", "transfer-encoding"})

# RFC 9110 §15.4.5: what a 304 should carry (plus Last-Modified, which clients use).
NOT_MODIFIED_FIELDS = frozenset({"cache-control", "content-location", "date", "etag",
                                 "expires", "vary", "last-modified"})

# Verdicts of :func:`assess`.
FRESH = "fresh"                      # reuse as is
STALE_OK = "stale_ok"                # stale, but the client's max-stale accepts it
STALE_WHILE_REVALIDATE = "swr"       # stale within the response's stale-while-revalidate
REVALIDATE = "revalidate"            # must ask upstream (conditionally if possible)


# -- parsing -------------------------------------------------------------------------------

def parse_cache_control(values: Iterable[str]) -> dict[str, str | None]:
    """Parse ``Cache-Control`` field values into ``{directive: argument-or-None}``.

    Directive names are lowercased; quoted arguments are unquoted (``\\`` escapes honoured);
    commas inside quotes do not split. On a duplicate directive the first occurrence wins
    (RFC 9111 §4.2.1 allows "the first occurrence should be used"). Never raises. The
    result is a fresh dict the caller may change.
    """
    return dict(_parse_cache_control(tuple(values)))


# The same few Cache-Control strings and dates come back on every hit of an entry: memoise
# the pure parsers (bounded; measured: about a third of a hit's time without it).
PARSE_CACHE_SIZE = 4096


@functools.lru_cache(maxsize=PARSE_CACHE_SIZE)
def _parse_cache_control(values: tuple[str, ...]) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for value in values:
        for part in _split_list(value):
            name, eq, arg = part.partition("=")
            name = name.strip().lower()
            if not name:
                continue
            a: str | None = None
            if eq:
                a = arg.strip()
                if len(a) >= 2 and a[0] == '"' and a[-1] == '"':
                    a = _unquote(a[1:-1])
            out.setdefault(name, a)
    return out


def _split_list(value: str) -> list[str]:
    """Split a comma-separated field value, ignoring commas inside quoted strings."""
    parts, cur, quoted, esc = [], [], False, False
    for ch in value:
        if esc:
            cur.append(ch)
            esc = False
        elif ch == "\\" and quoted:
            cur.append(ch)
            esc = True
        elif ch == '"':
            cur.append(ch)
            quoted = not quoted
        elif ch == "," and not quoted:
            parts.append("".join(cur).strip())
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur).strip())
    return [p for p in parts if p]


def _unquote(s: str) -> str:
    out, esc = [], False
    for ch in s:
        if esc:
            out.append(ch)
            esc = False
        elif ch == "\\":
            esc = True
        else:
            out.append(ch)
    return "".join(out)


def parse_delta_seconds(value: str | None) -> int | None:
    """RFC 9111 §1.2.2 delta-seconds: digits only; too large → 2147483648; else ``None``."""
    if value is None:
        return None
    v = value.strip()
    if not v or not v.isascii() or not v.isdigit():
        return None
    n = int(v)
    return n if n < DELTA_SECONDS_MAX else DELTA_SECONDS_MAX


def parse_http_date(value: str | None) -> float | None:
    """An HTTP-date (IMF-fixdate, RFC 850 or asctime, RFC 9110 §5.6.7) as POSIX seconds, or
    ``None`` when absent or invalid. A date without a zone is taken as GMT."""
    if not value:
        return None
    return _parse_http_date(value)


@functools.lru_cache(maxsize=PARSE_CACHE_SIZE)
def _parse_http_date(value: str) -> float | None:
    try:
        d = email.utils.parsedate_to_datetime(value.strip())
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if d.tzinfo is None:
        d = d.replace(tzinfo=timezone.utc)
    try:
        return d.timestamp()
    except (OverflowError, ValueError, OSError):
        return None


def format_http_date(ts: float) -> str:
    """POSIX seconds as an IMF-fixdate (``Sun, 06 Nov 1994 08:49:37 GMT``)."""
    return email.utils.formatdate(ts, usegmt=True)


def response_directives(headers: Headers) -> dict[str, str | None]:
    """The response's ``Cache-Control`` directives."""
    return parse_cache_control(headers.get_all("cache-control"))


def request_directives(headers: Headers) -> dict[str, str | None]:
    """The request's ``Cache-Control`` directives; ``Pragma: no-cache`` counts as
    ``no-cache`` only when there is no ``Cache-Control`` (RFC 9111 §5.4)."""
    cc = headers.get_all("cache-control")
    if cc:
        return parse_cache_control(cc)
    for v in headers.get_all("pragma"):
        if any(p.strip().lower() == "no-cache" for p in v.split(",")):
            return {"no-cache": None}
    return {}


# -- bypass and storability ------------------------------------------------------------------

def maybe_bypass_reason(method: str, headers: Headers, req_cc: dict[str, str | None], *,
                        has_body: bool = False) -> str | None:
    """Why a request must not be answered from (or coalesced on) the cache, or ``None``.

    Returns ``"method"`` (not GET/HEAD), ``"no-store"`` (request directive, RFC 9111
    §5.2.1.5), ``"authorization"`` (RFC 9111 §3.5: the response may be user-specific; it may
    still be *stored* if the response allows it, see :func:`maybe_unstorable_reason`),
    ``"range"`` (partial content is not cached), ``"upgrade"`` (a protocol switch, e.g.
    WebSocket) or ``"body"`` (a GET with a body: its meaning may depend on the body).
    """
    if method not in ("GET", "HEAD"):
        return "method"
    if "no-store" in req_cc:
        return "no-store"
    names = {k.lower() for k, _ in headers.raw}  # one pass over the fields, not four
    if b"authorization" in names:
        return "authorization"
    if b"range" in names:
        return "range"
    if b"upgrade" in names:
        return "upgrade"
    if has_body:
        return "body"
    return None


def has_explicit_freshness(headers: Headers, cc: dict[str, str | None]) -> bool:
    """Whether the response states its own expiry (``s-maxage``, ``max-age``, ``Expires``)."""
    return "s-maxage" in cc or "max-age" in cc or "expires" in headers


def maybe_unstorable_reason(method: str, req_headers: Headers, req_cc: dict[str, str | None],
                            status: int, headers: Headers, cc: dict[str, str | None], *,
                            cache_set_cookie: bool = False) -> str | None:
    """Why a shared cache must not store this response (RFC 9111 §3), or ``None``.

    Reasons: ``"method"`` (only GET responses are stored), ``"status"`` (not final, 206,
    304), ``"no-store"`` (request or response), ``"private"`` (unqualified; the qualified
    form only removes the listed fields, see :func:`headers_to_store`), ``"authorization"``
    (request had ``Authorization`` and the response has none of ``public``, ``s-maxage``,
    ``must-revalidate``, §3.5), ``"vary-star"``, ``"set-cookie"`` (unless
    ``cache_set_cookie``), ``"not-cacheable"`` (no explicit freshness, not ``public`` and a
    status that is not heuristically cacheable).
    """
    if method != "GET":
        return "method"
    if status < 200 or status in NEVER_STORED:
        return "status"
    if "no-store" in req_cc or "no-store" in cc:
        return "no-store"
    if "private" in cc and cc["private"] is None:
        return "private"
    if "authorization" in req_headers and not (
            "public" in cc or "s-maxage" in cc or "must-revalidate" in cc):
        return "authorization"
    if "*" in vary_names(headers):
        return "vary-star"
    if "set-cookie" in headers and not cache_set_cookie:
        return "set-cookie"
    if not (has_explicit_freshness(headers, cc) or "public" in cc
            or status in HEURISTICALLY_CACHEABLE):
        return "not-cacheable"
    return None


def worth_storing(lifetime: float, headers: Headers, cc: dict[str, str | None]) -> bool:
    """A storable response is worth keeping when it is fresh for a while, or when it can be
    validated cheaply later (``ETag``/``Last-Modified``) even if it is born stale."""
    return lifetime > 0 or "etag" in headers or "last-modified" in headers


def _field_list(arg: str | None) -> set[str]:
    return {f.strip().lower() for f in (arg or "").split(",") if f.strip()}


def headers_to_store(headers: Headers, cc: dict[str, str | None], *,
                     strip_set_cookie: bool = False, extra: Iterable[str] = ()
                     ) -> tuple[tuple[bytes, bytes], ...]:
    """The response's fields as they should be kept (RFC 9111 §3.1).

    Removed: connection-specific fields and those named by ``Connection``; ``Proxy-*``
    authentication fields; framing (``Content-Length``, ``Transfer-Encoding``: the core
    frames a stored body itself); fields named by a *qualified* ``no-cache="…"`` or
    ``private="…"`` (RFC 9111 §5.2.2.4, §5.2.2.7: the rest of the response may be reused);
    ``Set-Cookie`` when ``strip_set_cookie``; and the names in ``extra`` (e.g. the cache's
    own status header).
    """
    drop = set(HOP_BY_HOP) | FRAMING_FIELDS | {e.lower() for e in extra}
    for v in headers.get_all("connection"):
        drop |= _field_list(v)
    for d in ("no-cache", "private"):
        if cc.get(d):
            drop |= _field_list(cc[d])
    if strip_set_cookie:
        drop.add("set-cookie")
    return tuple((k, v) for k, v in headers.raw if k.decode("latin-1").lower() not in drop)


# -- Vary ------------------------------------------------------------------------------------

def vary_names(headers: Headers) -> tuple[str, ...]:
    """The lowercased, de-duplicated, sorted field names listed by ``Vary`` (``("*",)`` when
    it contains ``*``)."""
    names: set[str] = set()
    for v in headers.get_all("vary"):
        for n in v.split(","):
            n = n.strip().lower()
            if n == "*":
                return ("*",)
            if n:
                names.add(n)
    return tuple(sorted(names))


def vary_values(names: Iterable[str], req_headers: Headers
                ) -> tuple[tuple[str, str | None], ...]:
    """The request's values of the ``Vary``-listed fields, normalised (RFC 9111 §4.1):
    multiple lines are combined, list members are trimmed and joined with ``", "``; an
    absent field is ``None`` (distinct from an empty one)."""
    out = []
    for n in names:
        vals = req_headers.get_all(n)
        if not vals:
            out.append((n, None))
            continue
        members = [m.strip() for v in vals for m in v.split(",")]
        out.append((n, ", ".join(m for m in members if m)))
    return tuple(out)


def vary_key(values: tuple[tuple[str, str | None], ...]) -> str:
    """A stable, injective string for :func:`vary_values` output (the secondary key)."""
    return json.dumps(values, separators=(",", ":"))


# -- freshness and age -----------------------------------------------------------------------

def freshness_lifetime(status: int, headers: Headers, cc: dict[str, str | None],
                       response_time: float, *, heuristic: bool = True,
                       default_ttl: float = 0.0) -> float:
    """Freshness lifetime in seconds (RFC 9111 §4.2.1, shared cache), first rule that applies:

    1. ``s-maxage`` (an invalid value makes the response stale: 0);
    2. ``max-age`` (likewise);
    3. ``Expires`` − ``Date`` (``Date`` missing → ``response_time``; an invalid ``Expires``,
       ``0`` included, is in the past: 0, §5.3);
    4. only for heuristically cacheable statuses or ``public`` responses: with ``heuristic``
       and a ``Last-Modified``, 10% of (``Date`` − ``Last-Modified``) capped at
       :data:`HEURISTIC_MAX_SECONDS` (§4.2.2);
    5. otherwise, for those same responses, ``default_ttl``; else 0.
    """
    if "s-maxage" in cc:
        return float(parse_delta_seconds(cc["s-maxage"]) or 0)
    if "max-age" in cc:
        return float(parse_delta_seconds(cc["max-age"]) or 0)
    if "expires" in headers:
        expires = parse_http_date(headers.get("expires"))
        if expires is None:
            return 0.0
        date = parse_http_date(headers.get("date"))
        return max(0.0, expires - (response_time if date is None else date))
    if status not in HEURISTICALLY_CACHEABLE and "public" not in cc:
        return 0.0
    if heuristic:
        lm = parse_http_date(headers.get("last-modified"))
        if lm is not None:
            date = parse_http_date(headers.get("date"))
            since = (response_time if date is None else date) - lm
            return min(float(HEURISTIC_MAX_SECONDS), max(0.0, since * HEURISTIC_FRACTION))
    return max(0.0, float(default_ttl))


def current_age(headers: Headers, request_time: float, response_time: float,
                now: float) -> float:
    """RFC 9111 §4.2.3 ``current_age``::

        apparent_age = max(0, response_time - date_value)
        corrected_age_value = age_value + (response_time - request_time)
        corrected_initial_age = max(apparent_age, corrected_age_value)
        current_age = corrected_initial_age + (now - response_time)

    ``Date`` missing or invalid → ``response_time``; ``Age`` missing or invalid → 0.
    """
    date = parse_http_date(headers.get("date"))
    date_value = response_time if date is None else date
    age_value = parse_delta_seconds(headers.get("age")) or 0
    apparent_age = max(0.0, response_time - date_value)
    corrected_age_value = age_value + max(0.0, response_time - request_time)
    corrected_initial_age = max(apparent_age, corrected_age_value)
    return corrected_initial_age + max(0.0, now - response_time)


class Assessment:
    """What :func:`assess` decided, with the numbers it used."""

    __slots__ = ("verdict", "age", "lifetime", "client_forced")

    def __init__(self, verdict: str, age: float, lifetime: float, client_forced: bool):
        self.verdict = verdict
        self.age = age
        self.lifetime = lifetime
        # True when the *request* (no-cache, max-age, min-fresh) forced validation of a
        # response the cache would otherwise reuse.
        self.client_forced = client_forced

    @property
    def staleness(self) -> float:
        """Seconds past the freshness lifetime (negative while fresh)."""
        return self.age - self.lifetime

    def __repr__(self) -> str:
        return (f"<Assessment {self.verdict} age={self.age:.1f} lifetime={self.lifetime:.1f}"
                f"{' forced' if self.client_forced else ''}>")


def _revalidation_required(cc: dict[str, str | None]) -> bool:
    # must-revalidate (§5.2.2.2), proxy-revalidate (§5.2.2.8), and s-maxage which "incorporates
    # the semantics of proxy-revalidate" in a shared cache (§5.2.2.10).
    return "must-revalidate" in cc or "proxy-revalidate" in cc or "s-maxage" in cc


def assess(status: int, headers: Headers, request_time: float, response_time: float,
           req_cc: dict[str, str | None], now: float, *, heuristic: bool = True,
           default_ttl: float = 0.0, cc: dict[str, str | None] | None = None) -> Assessment:
    """May a stored response be reused for this request at ``now``? (RFC 9111 §4, RFC 5861)

    Verdicts, first that applies:

    - :data:`REVALIDATE` (``client_forced``): the request has ``no-cache``, or its
      ``max-age`` is below the age, or (fresh but) ``min-fresh`` is not met.
    - :data:`REVALIDATE`: the response has an unqualified ``no-cache``.
    - :data:`FRESH`: age < lifetime.
    - :data:`STALE_OK`: stale, the request has ``max-stale`` (no value: any staleness) that
      covers it, no ``min-fresh``, and the response does not require revalidation
      (``must-revalidate``, ``proxy-revalidate``, ``s-maxage``).
    - :data:`STALE_WHILE_REVALIDATE`: stale by no more than the response's
      ``stale-while-revalidate``. The origin's explicit permission wins over
      ``must-revalidate``/``s-maxage`` (RFC 5861 §3 names no exception).
    - :data:`REVALIDATE`.
    """
    if cc is None:
        cc = response_directives(headers)
    age = current_age(headers, request_time, response_time, now)
    lifetime = freshness_lifetime(status, headers, cc, response_time, heuristic=heuristic,
                                  default_ttl=default_ttl)
    if "no-cache" in req_cc:
        return Assessment(REVALIDATE, age, lifetime, True)
    req_max_age = parse_delta_seconds(req_cc.get("max-age"))
    if req_max_age is not None and age > req_max_age:
        return Assessment(REVALIDATE, age, lifetime, True)
    if "no-cache" in cc and cc["no-cache"] is None:
        return Assessment(REVALIDATE, age, lifetime, False)
    min_fresh = parse_delta_seconds(req_cc.get("min-fresh"))
    if lifetime > age:
        if min_fresh is not None and lifetime - age < min_fresh:
            return Assessment(REVALIDATE, age, lifetime, True)
        return Assessment(FRESH, age, lifetime, False)
    staleness = age - lifetime
    if "max-stale" in req_cc and min_fresh is None and not _revalidation_required(cc):
        arg = req_cc["max-stale"]
        limit = parse_delta_seconds(arg)
        if arg is None or (limit is not None and staleness <= limit):
            return Assessment(STALE_OK, age, lifetime, False)
    swr = parse_delta_seconds(cc.get("stale-while-revalidate"))
    if swr is not None and staleness <= swr and min_fresh is None:
        return Assessment(STALE_WHILE_REVALIDATE, age, lifetime, False)
    return Assessment(REVALIDATE, age, lifetime, min_fresh is not None)


def stale_if_error_ok(cc: dict[str, str | None], req_cc: dict[str, str | None],
                      staleness: float) -> bool:
    """May a stale response stand in for a 500/502/503/504 (RFC 5861 §4)?

    Yes when the response's ``stale-if-error`` covers ``staleness`` (it is the origin's
    explicit permission, "regardless of other freshness information"), or when the
    request's ``stale-if-error`` covers it and the response neither requires revalidation
    (``must-revalidate``, ``proxy-revalidate``, ``s-maxage``) nor has ``no-cache``.
    """
    r = parse_delta_seconds(cc.get("stale-if-error"))
    if r is not None and staleness <= r:
        return True
    q = parse_delta_seconds(req_cc.get("stale-if-error"))
    return (q is not None and staleness <= q and not _revalidation_required(cc)
            and "no-cache" not in cc)


# -- validators and conditional requests -----------------------------------------------------

def _opaque(tag: str) -> str:
    tag = tag.strip()
    return tag[2:] if tag[:2] in ("W/", "w/") else tag


def weak_match(a: str, b: str) -> bool:
    """RFC 9110 §8.8.3.2 weak comparison: equal opaque-tags, either or both may be weak."""
    return _opaque(a) == _opaque(b)


def _etag_list(value: str) -> list[str]:
    return _split_list(value)


def client_not_modified(method: str, req_headers: Headers, status: int, headers: Headers,
                        response_time: float) -> bool:
    """Should the cache answer the client's conditional GET/HEAD with 304 from this stored
    response? (RFC 9110 §13.1.1-3, §13.2.2; RFC 9111 §4.3.2)

    Only a stored 200 is compared. ``If-None-Match`` (weak comparison; ``*`` matches any
    stored representation) takes precedence; if absent, ``If-Modified-Since`` is compared to
    ``Last-Modified``, else ``Date``, else the time the response was received. An invalid
    ``If-Modified-Since`` is ignored.
    """
    if method not in ("GET", "HEAD") or status != 200:
        return False
    inm = req_headers.get_all("if-none-match")
    if inm:
        etag = headers.get("etag")
        for v in inm:
            for t in _etag_list(v):
                if t == "*" or (etag is not None and weak_match(t, etag)):
                    return True
        return False
    ims = parse_http_date(req_headers.get("if-modified-since"))
    if ims is None:
        return False
    lm = parse_http_date(headers.get("last-modified"))
    if lm is None:
        lm = parse_http_date(headers.get("date"))
    if lm is None:
        lm = response_time
    return lm <= ims


def not_modified_headers(headers: Headers) -> tuple[tuple[bytes, bytes], ...]:
    """The stored fields a 304 carries (RFC 9110 §15.4.5)."""
    return tuple((k, v) for k, v in headers.raw
                 if k.decode("latin-1").lower() in NOT_MODIFIED_FIELDS)


def conditional_headers(headers: Headers) -> list[tuple[str, str]]:
    """The fields that make a validation request for this stored response (RFC 9111 §4.3.1):
    ``If-None-Match`` from ``ETag`` and ``If-Modified-Since`` from ``Last-Modified`` (both
    when both exist). Empty when the response has no validator."""
    out = []
    etag = headers.get("etag")
    if etag:
        out.append(("If-None-Match", etag))
    lm = headers.get("last-modified")
    if lm and parse_http_date(lm) is not None:
        out.append(("If-Modified-Since", lm))
    return out


def validators_match(stored: Headers, new: Headers) -> bool:
    """Does a 304 identify this stored response (RFC 9111 §4.3.4)? A new ``ETag`` must
    match the stored one (weakly); a new ``Last-Modified`` must equal the stored one when
    both exist. A 304 without validators selects the (single) stored response."""
    new_etag = new.get("etag")
    if new_etag is not None:
        old = stored.get("etag")
        if old is None or not weak_match(new_etag, old):
            return False
    new_lm = parse_http_date(new.get("last-modified"))
    old_lm = parse_http_date(stored.get("last-modified"))
    if new_lm is not None and old_lm is not None and new_lm != old_lm:
        return False
    return True


def merge_not_modified(stored: tuple[tuple[bytes, bytes], ...] | list[tuple[bytes, bytes]],
                       new: Headers, *, extra: Iterable[str] = ()
                       ) -> tuple[tuple[bytes, bytes], ...]:
    """Update stored fields from a 304 (RFC 9111 §4.3.4, §3.2): every field the 304 carries
    replaces all stored fields of that name, except connection-specific fields, framing
    (``Content-Length`` must not be updated) and the names in ``extra``. The stored ``Age``
    is dropped even when the 304 has none: the 304 is the newest response, and its age
    (absent: 0) is what the age calculation must start from. Stored fields keep their
    order; replacements are appended in the 304's order."""
    skip = set(HOP_BY_HOP) | FRAMING_FIELDS | {e.lower() for e in extra}
    for v in new.get_all("connection"):
        skip |= _field_list(v)
    incoming = [(k, v) for k, v in new.raw if k.decode("latin-1").lower() not in skip]
    replaced = {k.decode("latin-1").lower() for k, _ in incoming} | {"age"}
    kept = [(k, v) for k, v in stored if k.decode("latin-1").lower() not in replaced]
    return tuple(kept + incoming)
