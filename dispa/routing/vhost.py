"""Domain interception: which Host names this proxy serves (the original `[domains]`).

Semantics (kept from the original Dispa):
- ``intercept_domains`` holds exact names and ``*.suffix`` wildcards. A wildcard matches any
  name that ends in ``.suffix`` (one or more labels deeper) but not ``suffix`` itself.
- ``exclude_domains`` uses the same syntax and always wins.
- With ``wildcard_support = false`` wildcard entries match nothing.
- An empty intercept list intercepts every host (exclusions still apply).

Matching is on the lowercase host without port and without a trailing dot. Results are
memoised per raw Host value in a bounded dict, so the common case is one dict lookup.
"""

from __future__ import annotations

from dispa.config.snapshot import InterceptSpec

_CACHE_LIMIT = 4096


def normalize_host(raw: bytes) -> str:
    """``b"Example.COM:8080"`` -> ``"example.com"``; IPv6 literals keep their brackets."""
    host = raw.strip().lower()
    if host.startswith(b"["):
        end = host.find(b"]")
        host = host[: end + 1] if end > 0 else host
    else:
        colon = host.rfind(b":")
        if colon >= 0:
            host = host[:colon]
    if host.endswith(b"."):
        host = host[:-1]
    return host.decode("latin-1")


def _suffix_match(host: str, suffixes: tuple[str, ...]) -> bool:
    for suffix in suffixes:
        # ".test.com" matches "a.test.com" but not "test.com" nor "atest.com"
        if host.endswith(suffix) and len(host) > len(suffix):
            return True
    return False


class InterceptTable:
    """Compiled ``[domains]``: ``match(raw_host) -> bool``."""

    __slots__ = ("_exact", "_wild", "_ex_exact", "_ex_wild", "_all", "_cache")

    def __init__(self, spec: InterceptSpec):
        self._exact = frozenset(spec.exact)
        self._wild = spec.wildcard_suffixes if spec.wildcard_support else ()
        self._ex_exact = frozenset(spec.exclude_exact)
        self._ex_wild = spec.exclude_wildcard_suffixes if spec.wildcard_support else ()
        self._all = spec.intercept_all or not (spec.exact or spec.wildcard_suffixes)
        self._cache: dict[bytes, bool] = {}

    def match_name(self, host: str) -> bool:
        """Decide for a normalised host name."""
        if host in self._ex_exact or _suffix_match(host, self._ex_wild):
            return False
        if self._all:
            return True
        return host in self._exact or _suffix_match(host, self._wild)

    def match(self, raw_host: bytes) -> bool:
        """Decide for a raw Host header value (memoised)."""
        try:
            return self._cache[raw_host]
        except KeyError:
            pass
        result = self.match_name(normalize_host(raw_host))
        if len(self._cache) >= _CACHE_LIMIT:
            self._cache.clear()
        self._cache[raw_host] = result
        return result
