"""The shared body of ``headerinjector`` and ``headeroverride``.

Theory of operation: the configured ``{name = value}`` tables are validated and turned into
tuples of ``(bytes, bytes)`` at build time; the hooks only loop over those tuples. The two
public filters differ in one method: ``headerinjector`` adds a field only when it is absent
(``Headers.setdefault``), ``headeroverride`` replaces every field of that name
(``Headers.set``).

Request fields are applied in ``on_request`` (phase 4), so later filters and the upstream see
them; response fields in ``on_response`` (phase 8).
"""

from __future__ import annotations

import msgspec

from dispa.plugins.api import BuildContext, Filter, Headers, Request, ResponseHead
from dispa.plugins.builtin._common import check_header


class HeadersConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """``request_headers``: fields for the request sent upstream; ``response_headers``:
    fields for the response sent to the client. Names are tokens (RFC 9110 §5.6.2); values
    latin-1 without control characters; framing fields (Content-Length, Transfer-Encoding,
    Connection, ...) are refused."""

    request_headers: dict[str, str] = {}
    response_headers: dict[str, str] = {}

    def __post_init__(self):
        # Validated here so that msgspec.convert (the loader) already refuses a bad field.
        for k, v in self.request_headers.items():
            check_header(k, v, what="request_headers")
        for k, v in self.response_headers.items():
            check_header(k, v, what="response_headers")


class _HeaderSetter(Filter):
    Config = HeadersConfig

    def __init__(self, config: HeadersConfig, ctx: BuildContext):
        super().__init__(config, ctx)
        self._request = tuple(check_header(k, v, what="request_headers")
                              for k, v in config.request_headers.items())
        self._response = tuple(check_header(k, v, what="response_headers")
                               for k, v in config.response_headers.items())

    def _apply(self, headers: Headers, name: bytes, value: bytes) -> None:
        raise NotImplementedError

    def on_request(self, req: Request) -> None:
        apply = self._apply
        for name, value in self._request:
            apply(req.headers, name, value)
        return None

    def on_response(self, req: Request, resp: ResponseHead) -> None:
        apply = self._apply
        for name, value in self._response:
            apply(resp.headers, name, value)
        return None
