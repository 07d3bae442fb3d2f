"""Sticky sessions: keep a client on one endpoint while that endpoint is usable (sans-I/O).

Theory of operation
-------------------
Three modes (``StickyConfig.mode``):

* ``client_ip`` (the original ``sticky_sessions = true``): rendezvous (highest random weight)
  hashing of the client address over the endpoints, Thaler & Ravishankar 1998, scored
  ``crc32(key + endpoint_id) * weight`` as ``dispa.proxy.runtime`` does today, so enabling
  this policy moves no client. Nothing is stored; every worker computes the same pin.
* ``header``: the same hashing over a request header's value (``header_name``), e.g. a
  session id set by the application.
* ``cookie``: the pin travels in a signed cookie that Dispa sets. The value is
  ``base64url(payload) + "." + base64url(mac)`` (no padding) where ``payload`` is
  ``0x01 || expiry (uint64 big-endian, Unix seconds) || endpoint_id (UTF-8)`` and ``mac`` is
  the first 16 bytes of ``HMAC-SHA256(secret, "dispa-sticky-v1" || 0x00 || cookie_name ||
  0x00 || payload)`` (RFC 2104; truncation to 128 bits as RFC 2104 §5 allows). The first
  of ``secrets`` signs, every one verifies, so a secret is rotated by putting the new one
  first and removing the old one after ``ttl``. The cookie names an endpoint by its stable
  id, not by index, so it survives reloads that reorder or resize the cluster.

What :meth:`StickyPolicy.choose` returns, as ``StickyChoice(index, repinned, set_cookie)``:

* the pinned endpoint is usable: ``(pin, False, None)``, counted in ``hits``; in cookie
  mode the cookie is re-issued (``set_cookie`` not None) once less than half its ``ttl``
  remains, so an active session does not lose its pin;
* the pin is known but its endpoint is unusable (unhealthy, ejected, gone from the
  cluster): a new endpoint, ``repinned=True``, counted in ``repins``. Cookie mode asks the
  ``fallback`` function (normally the cluster's selector) and sets a new cookie; hash modes
  take the next endpoint in rendezvous order among the usable ones, which every worker agrees
  on without storing anything;
* no valid pin (no cookie, no header; a cookie that is malformed, forged, expired or from
  another cookie name): ``fallback(healthy)`` chooses, counted in ``misses``; cookie mode sets
  a cookie for it;
* nothing usable (``fallback`` returned -1, or hashing found no usable endpoint):
  ``(-1, False, None)``, counted in ``unavailable``.

Rules:

1. ``decode`` never raises: any input that is not exactly a value this codec made with one
   of the secrets, unexpired at ``now``, gives ``None``. MACs are compared in constant time
   (``hmac.compare_digest``).
2. Cookie time is **wall-clock** Unix seconds (``time.time()``), not monotonic: the cookie
   outlives worker processes. It is passed in as ``now``; nothing here reads a clock.
3. The ``Set-Cookie`` value is built once per call from validated config; config validation
   rejects names, paths and domains that could inject attributes (RFC 6265 §4.1.1), and
   the combinations browsers refuse (``SameSite=None`` without ``Secure``; ``__Host-`` and
   ``__Secure-`` prefixes without their requirements, RFC 6265bis §4.1.3).
4. Secrets never appear in ``repr(StickyConfig)``, in snapshots or in errors. (Encoding
   the Struct with msgspec still includes them: it is the configuration.)
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import zlib
from collections.abc import Callable, Sequence
from typing import Annotated, Any, Literal, NamedTuple, Optional

import msgspec
from msgspec import Meta

__all__ = [
    "MAX_COOKIE_VALUE_CHARS",
    "StickyChoice",
    "StickyConfig",
    "StickyCookieCodec",
    "StickyPolicy",
    "build_set_cookie",
    "cookie_values",
]

MAX_SECONDS = 7 * 24 * 3600
#: Longest cookie value ``decode`` looks at; RFC 6265 §6.1 asks user agents for at least
#: 4096 bytes per cookie, and ours are under 400 characters (255-byte id).
MAX_COOKIE_VALUE_CHARS = 1024
MAX_ENDPOINT_ID_BYTES = 255
MIN_SECRET_BYTES = 16  # 128 bits: the MAC's own strength
_MAC_BYTES = 16
_VERSION = 1
_HEADER_LEN = 9  # version byte + 8-byte expiry
_CONTEXT = b"dispa-sticky-v1"

# RFC 6265 §4.1.1: cookie-name is an RFC 2616 token; cookie-octet excludes CTLs,
# whitespace, DQUOTE, comma, semicolon and backslash.
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_COOKIE_OCTETS = re.compile(r"[\x21\x23-\x2b\x2d-\x3a\x3c-\x5b\x5d-\x7e]*")
_ATTR_VALUE = re.compile(r"[\x20-\x3a\x3c-\x7e]*")  # no CTLs, no ';'
_B64URL = re.compile(r"[A-Za-z0-9_-]+")


class StickyConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Sticky-session settings (docs/resilience.md lists every key).

    Raises ``msgspec.ValidationError`` on decode (``ValueError`` on direct construction)
    for: cookie mode without a secret, a secret shorter than 16 bytes, header mode without
    ``header_name``, an invalid cookie name, path or domain, ``same_site = "None"`` without
    ``secure``, and a ``__Host-``/``__Secure-`` name without its requirements.
    """

    mode: Literal["client_ip", "cookie", "header"] = "client_ip"
    header_name: str = ""
    cookie_name: str = "dispa_sticky"
    cookie_path: str = "/"
    cookie_domain: Optional[str] = None
    http_only: bool = True
    secure: bool = False
    same_site: Optional[Literal["Strict", "Lax", "None"]] = "Lax"
    ttl: Annotated[float, Meta(ge=1, le=365 * 24 * 3600)] = 3600.0
    secrets: list[str] = msgspec.field(default_factory=list)

    def __repr__(self) -> str:
        # Rule 4: secrets stay out of logs, tracebacks and admin dumps of repr().
        parts = [f"{f}={getattr(self, f)!r}" for f in self.__struct_fields__ if f != "secrets"]
        parts.append(f"secrets=<{len(self.secrets)} redacted>")
        return f"StickyConfig({', '.join(parts)})"

    def __post_init__(self) -> None:
        if self.mode == "cookie":
            if not self.secrets:
                raise ValueError("cookie mode needs at least one secret in secrets")
        for i, s in enumerate(self.secrets):
            if len(s.encode()) < MIN_SECRET_BYTES:
                raise ValueError(f"secrets[{i}] is shorter than {MIN_SECRET_BYTES} bytes")
        if self.mode == "header" and not _TOKEN.fullmatch(self.header_name):
            raise ValueError("header mode needs header_name (a header field name)")
        _check_cookie_attributes(self.cookie_name, self.cookie_path, self.cookie_domain,
                                 self.secure, self.same_site)


def _check_cookie_attributes(name: str, path: str, domain: str | None, secure: bool,
                             same_site: str | None) -> None:
    if not _TOKEN.fullmatch(name):
        raise ValueError(f"cookie_name {name!r} is not a token (RFC 6265 §4.1.1)")
    if not path.startswith("/") or not _ATTR_VALUE.fullmatch(path):
        raise ValueError("cookie_path must start with '/' and contain no ';' or control characters")
    if domain is not None and (not domain or not _TOKEN.fullmatch(domain)):
        raise ValueError("cookie_domain must be a host name")
    if same_site == "None" and not secure:
        raise ValueError('same_site = "None" needs secure = true (browsers reject it otherwise)')
    if name.startswith("__Secure-") and not secure:
        raise ValueError("a __Secure- cookie name needs secure = true")
    if name.startswith("__Host-") and (not secure or path != "/" or domain is not None):
        raise ValueError("a __Host- cookie name needs secure = true, cookie_path = '/' and no cookie_domain")


def build_set_cookie(name: str, value: str, *, max_age: int | None, path: str = "/",
                     domain: str | None = None, http_only: bool = True, secure: bool = False,
                     same_site: str | None = "Lax") -> str:
    """The ``Set-Cookie`` field value, e.g. ``n=v; Path=/; Max-Age=3600; HttpOnly; SameSite=Lax``.

    Attribute order: Path, Domain, Max-Age, HttpOnly, Secure, SameSite. Raises ``ValueError``
    for a name, value, path or domain that could break the header (RFC 6265 §4.1.1) or an
    attribute combination browsers reject.
    """
    if not _COOKIE_OCTETS.fullmatch(value):
        raise ValueError("cookie value has characters outside cookie-octet")
    _check_cookie_attributes(name, path, domain, secure, same_site)
    parts = [f"{name}={value}", f"Path={path}"]
    if domain is not None:
        parts.append(f"Domain={domain}")
    if max_age is not None:
        parts.append(f"Max-Age={int(max_age)}")
    if http_only:
        parts.append("HttpOnly")
    if secure:
        parts.append("Secure")
    if same_site is not None:
        parts.append(f"SameSite={same_site}")
    return "; ".join(parts)


def cookie_values(header: str | None, name: str) -> list[str]:
    """Every value of cookie ``name`` in a ``Cookie`` header, in order (RFC 6265 §5.4).

    Join several ``Cookie`` fields with ``"; "`` first. Surrounding double quotes are
    removed. Never raises for any string.
    """
    if not header:
        return []
    out = []
    for part in header.split(";"):
        k, eq, v = part.strip().partition("=")
        if eq and k.strip() == name:
            v = v.strip()
            if len(v) >= 2 and v[0] == '"' and v[-1] == '"':
                v = v[1:-1]
            out.append(v)
    return out


def _b64e(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64d(text: str) -> bytes | None:
    if not _B64URL.fullmatch(text) or len(text) % 4 == 1:
        return None
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        return None


class StickyCookieCodec:
    """Signs and verifies sticky cookie values (format in the module docstring).

    ``StickyCookieCodec(secrets, ttl_seconds, *, cookie_name="dispa_sticky")``; secrets are
    ``str`` (UTF-8) or ``bytes``, the first signs. Raises ``ValueError`` for no secrets or a
    ``ttl_seconds`` below 1.
    """

    __slots__ = ("_keys", "_ttl", "_context")

    def __init__(self, secrets: Sequence[str | bytes], ttl_seconds: float, *,
                 cookie_name: str = "dispa_sticky") -> None:
        keys = [s.encode() if isinstance(s, str) else bytes(s) for s in secrets]
        if not keys:
            raise ValueError("a sticky cookie codec needs at least one secret")
        if not ttl_seconds >= 1:
            raise ValueError("ttl_seconds must be >= 1")
        self._keys = keys
        self._ttl = float(ttl_seconds)
        self._context = _CONTEXT + b"\0" + cookie_name.encode() + b"\0"

    def _mac(self, key: bytes, payload: bytes) -> bytes:
        return hmac.new(key, self._context + payload, hashlib.sha256).digest()[:_MAC_BYTES]

    def encode(self, endpoint_id: str, now: float) -> str:
        """A cookie value pinning ``endpoint_id`` until ``now + ttl`` (Unix seconds).

        Raises ``ValueError`` for an empty id or one over 255 UTF-8 bytes.
        """
        eid = endpoint_id.encode()
        if not eid or len(eid) > MAX_ENDPOINT_ID_BYTES:
            raise ValueError("endpoint_id must be 1 to 255 UTF-8 bytes")
        expiry = int(now + self._ttl)
        payload = bytes((_VERSION,)) + expiry.to_bytes(8, "big") + eid
        return _b64e(payload) + "." + _b64e(self._mac(self._keys[0], payload))

    def decode_with_expiry(self, value: object, now: float) -> tuple[str, int] | None:
        """``(endpoint_id, expiry)`` for a valid, unexpired value, else ``None``; never raises."""
        if not isinstance(value, str) or len(value) > MAX_COOKIE_VALUE_CHARS:
            return None
        body, dot, tag = value.partition(".")
        if not dot:
            return None
        payload = _b64d(body)
        mac = _b64d(tag)
        if payload is None or mac is None or len(mac) != _MAC_BYTES:
            return None
        if len(payload) <= _HEADER_LEN or payload[0] != _VERSION:
            return None
        if not any(hmac.compare_digest(self._mac(k, payload), mac) for k in self._keys):
            return None
        expiry = int.from_bytes(payload[1:_HEADER_LEN], "big")
        if not now < expiry:
            return None
        try:
            return payload[_HEADER_LEN:].decode("utf-8"), expiry
        except UnicodeDecodeError:  # only a holder of a secret could have signed this
            return None

    def decode(self, value: object, now: float) -> str | None:
        """The endpoint id in a valid, unexpired value, else ``None`` (rule 1); never raises."""
        r = self.decode_with_expiry(value, now)
        return None if r is None else r[0]


class StickyChoice(NamedTuple):
    """What :meth:`StickyPolicy.choose` decided."""

    index: int  # endpoint index, or -1 when nothing is usable
    repinned: bool  # a valid pin existed but its endpoint was unusable
    set_cookie: str | None  # a Set-Cookie field value to add to the response, or None


Fallback = Callable[[Optional[list[bool]]], int]


class StickyPolicy:
    """Applies one cluster's :class:`StickyConfig` (see the module docstring).

    ``StickyPolicy(config, endpoint_ids, weights=None)``: ``endpoint_ids`` are the cluster's
    stable endpoint ids in index order; ``weights`` (default all 1) scale rendezvous scores as
    the runtime does. Raises ``ValueError`` for no endpoints or mismatched lengths.
    """

    __slots__ = ("config", "_ids", "_keys", "_weights", "_index", "_codec", "_n",
                 "hits", "repins", "misses", "unavailable")

    def __init__(self, config: StickyConfig, endpoint_ids: Sequence[str],
                 weights: Sequence[int] | None = None) -> None:
        ids = list(endpoint_ids)
        if not ids:
            raise ValueError("a sticky policy needs at least one endpoint")
        w = list(weights) if weights is not None else [1] * len(ids)
        if len(w) != len(ids):
            raise ValueError("weights and endpoint_ids differ in length")
        self.config = config
        self._ids = ids
        self._keys = [e.encode() for e in ids]
        self._weights = w
        self._n = len(ids)
        self._index = {e: i for i, e in enumerate(ids)}
        self._codec = (StickyCookieCodec(config.secrets, config.ttl, cookie_name=config.cookie_name)
                       if config.mode == "cookie" else None)
        self.hits = 0
        self.repins = 0
        self.misses = 0
        self.unavailable = 0

    @property
    def codec(self) -> StickyCookieCodec | None:
        """The cookie codec (cookie mode only)."""
        return self._codec

    def set_cookie(self, index: int, now: float) -> str:
        """The ``Set-Cookie`` value pinning endpoint ``index`` (cookie mode; e.g. after a
        retry moved the request). Raises ``ValueError`` outside cookie mode."""
        if self._codec is None:
            raise ValueError("set_cookie is only for cookie mode")
        c = self.config
        return build_set_cookie(c.cookie_name, self._codec.encode(self._ids[index], now),
                                max_age=int(c.ttl), path=c.cookie_path, domain=c.cookie_domain,
                                http_only=c.http_only, secure=c.secure, same_site=c.same_site)

    def choose(self, now: float, healthy: list[bool] | None, fallback: Fallback, *,
               client_ip: str | None = None, cookie_header: str | None = None,
               header_value: str | None = None) -> StickyChoice:
        """Pick the endpoint for one request (outcomes in the module docstring).

        ``now`` is wall-clock Unix seconds (cookie mode only). ``healthy`` is the usable
        mask (``None`` = all). ``fallback(healthy)`` picks when there is no pin (and, in cookie
        mode, when the pin is unusable); it returns an index or -1. Request info: the
        client address (``client_ip`` mode), the joined ``Cookie`` header (``cookie`` mode) or
        the ``header_name`` header's value (``header`` mode). Never raises for any request
        input.
        """
        mode = self.config.mode
        if mode == "cookie":
            return self._choose_cookie(now, healthy, fallback, cookie_header)
        key = client_ip if mode == "client_ip" else header_value
        if not key:
            return self._fresh(now, healthy, fallback, cookie=False)
        return self._choose_hashed(key.encode("utf-8", "surrogatepass"), healthy)

    def _fresh(self, now: float, healthy: list[bool] | None, fallback: Fallback, *, cookie: bool,
               repin: bool = False) -> StickyChoice:
        i = fallback(healthy)
        if i < 0:
            self.unavailable += 1
            return StickyChoice(-1, False, None)
        if repin:
            self.repins += 1
        else:
            self.misses += 1
        return StickyChoice(i, repin, self.set_cookie(i, now) if cookie else None)

    def _choose_cookie(self, now: float, healthy: list[bool] | None, fallback: Fallback,
                       cookie_header: str | None) -> StickyChoice:
        codec = self._codec
        assert codec is not None
        pinned = None
        for v in cookie_values(cookie_header, self.config.cookie_name):
            pinned = codec.decode_with_expiry(v, now)
            if pinned is not None:
                break
        if pinned is None:
            return self._fresh(now, healthy, fallback, cookie=True)
        eid, expiry = pinned
        i = self._index.get(eid)
        if i is None or (healthy is not None and not healthy[i]):
            return self._fresh(now, healthy, fallback, cookie=True, repin=True)
        self.hits += 1
        refresh = self.set_cookie(i, now) if expiry - now < self.config.ttl / 2 else None
        return StickyChoice(i, False, refresh)

    def _choose_hashed(self, key: bytes, healthy: list[bool] | None) -> StickyChoice:
        # Rendezvous hashing, scored exactly as dispa.proxy.runtime._sticky_pick (WARNING:
        # keep in sync) so enabling this policy moves no client. Ties go to the lower index.
        crc32 = zlib.crc32
        top, top_score, best, best_score = -1, -1, -1, -1
        for i, ek in enumerate(self._keys):
            score = crc32(key + ek) * self._weights[i]
            if score > top_score:
                top, top_score = i, score
            if (healthy is None or healthy[i]) and score > best_score:
                best, best_score = i, score
        if best < 0:
            self.unavailable += 1
            return StickyChoice(-1, False, None)
        if best == top:
            self.hits += 1
            return StickyChoice(best, False, None)
        self.repins += 1
        return StickyChoice(best, True, None)

    def snapshot(self) -> dict[str, Any]:
        """Counters for ``/admin/status``."""
        return {"mode": self.config.mode, "hits": self.hits, "repins": self.repins,
                "misses": self.misses, "unavailable": self.unavailable}
