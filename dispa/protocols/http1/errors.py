"""The one error class of the HTTP/1.1 codec.

Both twins (``dispa._hotpath`` and ``dispa.protocols.http1._pure``) raise *this* class
object: the compiled module imports it from here, so ``except ProtocolError`` works the same
whichever implementation is in use.

WARNING: keep the constructor signature in sync with ``_native/http1_parser.pyx``, which
builds instances with ``ProtocolError(message, status_hint)``.
"""

from __future__ import annotations

from dispa.errors import DispaError, ErrorSource


class ProtocolError(DispaError):
    """A message broke HTTP/1.1 framing or syntax (RFC 9112).

    ``message`` says what was wrong (``str(e) == message``); ``status_hint`` is the status a
    downstream client should see: 400, 414, 431, 501 or 505 for requests, 502 for anything
    wrong in an upstream's response. ``source`` is DOWNSTREAM for request errors and UPSTREAM
    for response errors. A protocol error is never retryable: the bytes are already spent.
    """

    source = ErrorSource.DOWNSTREAM
    retryable = False

    def __init__(self, message: str, status_hint: int = 400):
        super().__init__(message)
        self.message = message
        self.status_hint = status_hint
        if status_hint == 502:
            self.source = ErrorSource.UPSTREAM

    def __reduce__(self):
        return (type(self), (self.message, self.status_hint))
