"""HTTP/1.1 codec: pull parser and serializer (RFC 9112), compiled or pure.

The compiled twin (``dispa._hotpath``) is used when it is built and ``DISPA_NO_EXTENSIONS``
is unset; otherwise the pure twin (``._pure``), which has the same API, rules and errors.
See docs/http1.md for the behaviour, the limits (``.limits``) and the deliberate differences
from h11 and httptools.
"""

from dispa import _native

from .errors import ProtocolError

# Do not test ``_native.hotpath`` here: when ``dispa._native`` is the first importer of
# ``dispa._hotpath``, the compiled module imports ``.errors`` (and so this package) while
# ``_native.hotpath`` is still None, and the pure twin would be picked by accident.
try:
    if _native.NO_EXTENSIONS:
        raise ImportError("DISPA_NO_EXTENSIONS is set")
    from dispa._hotpath import (  # type: ignore[import-not-found]
        DATA, END, HEAD, LAST_CHUNK, NEED_DATA, UPGRADE, RequestHead, RequestParser,
        ResponseHead, ResponseParser, encode_chunk, proxy_request_head, proxy_response_head,
        write_request_head, write_response_head,
    )
    IMPLEMENTATION = "compiled"
except ImportError:
    from ._pure import (  # noqa: F401
        DATA, END, HEAD, LAST_CHUNK, NEED_DATA, UPGRADE, RequestHead, RequestParser,
        ResponseHead, ResponseParser, encode_chunk, proxy_request_head, proxy_response_head,
        write_request_head, write_response_head,
    )
    IMPLEMENTATION = "pure"

__all__ = [
    "NEED_DATA", "HEAD", "DATA", "END", "UPGRADE", "LAST_CHUNK", "ProtocolError",
    "RequestParser", "ResponseParser", "RequestHead", "ResponseHead",
    "write_request_head", "write_response_head", "encode_chunk",
    "proxy_request_head", "proxy_response_head", "IMPLEMENTATION",
]
