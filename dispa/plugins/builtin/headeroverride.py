"""``headeroverride``: set configured header fields, replacing any existing ones."""

from __future__ import annotations

from dispa.plugins.api import Headers
from dispa.plugins.builtin._headers import HeadersConfig, _HeaderSetter

__all__ = ["HeaderOverride", "HeadersConfig"]


class HeaderOverride(_HeaderSetter):
    """Sets each configured field: every existing field of that name is replaced by exactly
    one field with the configured value (the first one's position is kept)."""

    name = "headeroverride"

    def _apply(self, headers: Headers, name: bytes, value: bytes) -> None:
        headers.set(name, value)
