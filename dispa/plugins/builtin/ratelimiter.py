"""``ratelimiter``: a token bucket per key; over the limit, answer 429.

Theory of operation
-------------------
Each key (see ``key``) owns a bucket of at most ``burst`` tokens that refills at
``rate_per_sec`` tokens per second; a request takes one token or is refused with 429. A
bucket is two floats ``[tokens, stamp]``; refilling happens lazily when the key is next seen,
so an idle key costs nothing but its table slot.

Rule 1: the table is bounded. It holds at most ``max_keys`` buckets in least-recently-used
order; a new key beyond that evicts the least recently used bucket. An evicted key comes back
with a full bucket, which is also what it would have after ``burst / rate_per_sec`` seconds
idle, so size ``max_keys`` above the number of keys active in such a window. Keys longer than
:data:`MAX_KEY_CHARS` are stored as a 16-byte BLAKE2b digest so one slot stays small whatever
the client sends.

Rule 2: buckets are **per worker process**. Every worker has its own table, so a client
spread over N workers by SO_REUSEPORT may get up to N × the configured rate. Limits across
workers or boxes need a shared store (ARCHITECTURE §1: Redis), which this filter does not use.

Rule 3: buckets survive a configuration reload (ARCHITECTURE §1: runtime state is keyed by
stable ids, not object identity). The table lives in a per-process registry keyed by the
instance name and the key kind, held weakly: the new snapshot's instance picks up the old
table, and a table no instance uses any more is freed with its last instance.

The clock is ``time.monotonic`` (immune to wall-clock steps); tests pass ``clock=`` to the
constructor.

Answers: ``429`` with ``Retry-After`` (whole seconds until one token is back, RFC 9110
§10.2.3) and the ``ratelimit-limit`` / ``ratelimit-remaining`` / ``ratelimit-reset`` fields of
draft-ietf-httpapi-ratelimit-headers (limit = ``burst``; reset = whole seconds until the
bucket is full again).

Not yet measured: the cost of the OrderedDict at large ``max_keys``.
"""

from __future__ import annotations

import hashlib
import math
import time
import weakref
from collections import OrderedDict
from typing import Annotated, Callable

import msgspec

from dispa.plugins.api import BuildContext, Filter, HTTPError, Request
from dispa.plugins.builtin._common import is_token, request_host

__all__ = ["RateLimiter", "RateLimiterConfig", "KEY_KINDS"]

KEY_KINDS = ("method_host_path", "client_ip", "host", "route")

# Longer keys are hashed. 256 characters cover ordinary method:host:path keys verbatim;
# with the default max_keys (10 000) the table then holds at most ~3 MB of key text.
MAX_KEY_CHARS = 256


class RateLimiterConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """``rate_per_sec``: refill rate (tokens per second, > 0); ``burst``: bucket size, the
    most requests a key may make at once (≥ 1); ``key``: what a bucket is per —
    ``method_host_path`` (``METHOD:host:path``, the original Dispa key), ``client_ip``,
    ``host``, ``route`` or ``header:<name>`` (requests without that header fall back to
    their client IP); ``max_keys``: the most buckets kept per worker."""

    rate_per_sec: Annotated[float, msgspec.Meta(gt=0, le=1e9)] = 10.0
    burst: Annotated[int, msgspec.Meta(ge=1, le=1_000_000_000)] = 20
    key: str = "method_host_path"
    max_keys: Annotated[int, msgspec.Meta(ge=1, le=10_000_000)] = 10_000

    def __post_init__(self):
        if self.key in KEY_KINDS:
            return
        if self.key.startswith("header:") and is_token(self.key[7:]):
            return
        raise ValueError(f"key: {self.key!r} is not one of {', '.join(KEY_KINDS)} "
                         "or header:<name>")


class _Table:
    """The buckets of one limiter instance (and of its successors after a reload)."""

    __slots__ = ("buckets", "__weakref__")

    def __init__(self):
        self.buckets: OrderedDict[str | bytes, list[float]] = OrderedDict()


# (instance name, key kind, clock) -> _Table; per process, i.e. per worker (Rule 2, 3).
_TABLES: "weakref.WeakValueDictionary[tuple, _Table]" = weakref.WeakValueDictionary()


class RateLimiter(Filter):
    """Token-bucket limiter; answers 429 (``HTTPError``) when a key's bucket is empty."""

    name = "ratelimiter"
    Config = RateLimiterConfig

    def __init__(self, config: RateLimiterConfig, ctx: BuildContext, *,
                 clock: Callable[[], float] = time.monotonic):
        super().__init__(config, ctx)
        self._clock = clock
        self._rate = float(config.rate_per_sec)
        self._burst = float(config.burst)
        self._max_keys = config.max_keys
        self._limit_value = str(config.burst)
        self._header = config.key[7:].lower() if config.key.startswith("header:") else None
        self._key_of = {
            "method_host_path": _key_method_host_path,
            "client_ip": _key_client_ip,
            "host": _key_host,
            "route": _key_route,
        }.get(config.key, self._key_header)
        table_id = (self.instance_name, config.key, clock)
        table = _TABLES.get(table_id)
        if table is None:
            table = _TABLES[table_id] = _Table()
        self._table = table

    # -- keys ------------------------------------------------------------------------------

    def _key_header(self, req: Request) -> str:
        v = req.headers.get(self._header)
        return "h:" + v if v is not None else "ip:" + req.client_ip

    def key_of(self, req: Request) -> str | bytes:
        """The bucket key of ``req`` (hashed when longer than :data:`MAX_KEY_CHARS`)."""
        k = self._key_of(req)
        if len(k) > MAX_KEY_CHARS:
            return hashlib.blake2b(k.encode("utf-8", "surrogatepass"), digest_size=16).digest()
        return k

    # -- the bucket ------------------------------------------------------------------------

    def take(self, key: str | bytes) -> tuple[bool, float]:
        """Take one token from ``key``'s bucket.

        Returns ``(allowed, tokens_left)``; ``tokens_left`` is fractional and < 1 when
        refused. Never raises.
        """
        now = self._clock()
        buckets = self._table.buckets
        b = buckets.get(key)
        if b is None:
            if len(buckets) >= self._max_keys:
                buckets.popitem(last=False)      # least recently used (Rule 1)
            b = buckets[key] = [self._burst, now]
        else:
            buckets.move_to_end(key)
            elapsed = now - b[1]
            if elapsed > 0:
                b[0] = min(self._burst, b[0] + elapsed * self._rate)
            b[1] = now
            # a bucket from a previous config may hold more than the new burst
            if b[0] > self._burst:
                b[0] = self._burst
        if b[0] >= 1.0:
            b[0] -= 1.0
            return True, b[0]
        return False, b[0]

    def headers_for(self, tokens: float) -> dict[str, str]:
        """The ``ratelimit-*`` fields for a bucket holding ``tokens``."""
        return {
            "ratelimit-limit": self._limit_value,
            "ratelimit-remaining": str(int(tokens)),
            "ratelimit-reset": str(math.ceil((self._burst - tokens) / self._rate)),
        }

    def on_request(self, req: Request) -> None:
        allowed, tokens = self.take(self.key_of(req))
        if allowed:
            return None
        headers = self.headers_for(tokens)
        headers["retry-after"] = str(max(1, math.ceil((1.0 - tokens) / self._rate)))
        raise HTTPError(429, "too many requests", headers)

    def bucket_count(self) -> int:
        """How many buckets the table holds now (not ``__len__``: a filter must stay
        truthy)."""
        return len(self._table.buckets)


def _key_method_host_path(req: Request) -> str:
    return f"{req.method}:{request_host(req)}:{req.path}"


def _key_client_ip(req: Request) -> str:
    return req.client_ip


def _key_host(req: Request) -> str:
    return request_host(req)


def _key_route(req: Request) -> str:
    return req.route or ""
