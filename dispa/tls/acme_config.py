"""``[tls.acme]``: automatic certificates (RFC 8555). The original keys are ``enabled``,
``directory_url``, ``email`` and ``challenge_type``; see docs/tls-acme.md."""

from __future__ import annotations

from typing import Literal

import msgspec


class _Table(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Base of these tables: frozen, unknown keys rejected (as config.model._Table)."""


class AcmeConfig(_Table):
    """``[tls.acme]``."""

    enabled: bool = False
    directory_url: str = "https://acme-v02.api.letsencrypt.org/directory"
    email: str = ""
    challenge_type: Literal["http-01", "tls-alpn-01", "dns-01"] = "http-01"
