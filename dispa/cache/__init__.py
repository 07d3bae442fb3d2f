"""The HTTP response cache (RFC 9111), as a filter: ``type = "cache"``.

``policy`` holds the sans-I/O caching rules, ``store`` the memory/disk stores, ``filter``
the :class:`CacheFilter` that drives them from the request path. See docs/cache.md.
"""

from dispa.cache.filter import CacheConfig, CacheFilter

__all__ = ["CacheConfig", "CacheFilter"]
