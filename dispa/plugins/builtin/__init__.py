"""The built-in filters. Each is written only against :mod:`dispa.plugins.api`, the same API
third-party filters use (STYLE C4); docs/plugins-builtin.md documents every one.

``BUILTIN_FILTERS`` lists the classes; a class's ``name`` is the ``type`` of its
``[[plugins.plugins]]`` entry.
"""

from __future__ import annotations

from dispa.plugins.builtin.blocklist import Blocklist
from dispa.plugins.builtin.compression import Compression
from dispa.plugins.builtin.cors import Cors
from dispa.plugins.builtin.headerinjector import HeaderInjector
from dispa.plugins.builtin.headeroverride import HeaderOverride
from dispa.plugins.builtin.hostrewrite import HostRewrite
from dispa.plugins.builtin.pathrewrite import PathRewrite
from dispa.plugins.builtin.ratelimiter import RateLimiter
from dispa.plugins.builtin.requestid import RequestId
from dispa.plugins.builtin.sizelimit import SizeLimit

__all__ = [
    "BUILTIN_FILTERS", "Blocklist", "Compression", "Cors", "HeaderInjector", "HeaderOverride",
    "HostRewrite", "PathRewrite", "RateLimiter", "RequestId", "SizeLimit",
]

BUILTIN_FILTERS = (
    HeaderInjector, HeaderOverride, Blocklist, PathRewrite, HostRewrite, RateLimiter,
    Cors, SizeLimit, Compression, RequestId,
)
