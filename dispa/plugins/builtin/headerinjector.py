"""``headerinjector``: add configured header fields when they are absent."""

from __future__ import annotations

from dispa.plugins.api import Headers
from dispa.plugins.builtin._headers import HeadersConfig, _HeaderSetter

__all__ = ["HeaderInjector", "HeadersConfig"]


class HeaderInjector(_HeaderSetter):
    """Adds each configured field unless the message already has one of that name
    (case-insensitive). An existing field is left exactly as it is."""

    name = "headerinjector"

    def _apply(self, headers: Headers, name: bytes, value: bytes) -> None:
        headers.setdefault(name, value)
