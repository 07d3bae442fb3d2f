"""The proxy's protocol objects: ``Session``, ``UpstreamConnection``, ``Pool``, compiled or pure.

The compiled twins (``dispa._hotpath``, from ``_native/protocol.pyx``) are used when the
extension is built and ``DISPA_NO_EXTENSIONS`` is unset; otherwise the pure twins from
:mod:`dispa.proxy.session` and :mod:`dispa.proxy.pool`, which are the reference behaviour.
``IMPLEMENTATION`` says which ("compiled" or "pure").

Debugging switch: ``DISPA_PURE_SESSION=1`` selects the pure Session/UpstreamConnection/Pool
while keeping the compiled HTTP/1.1 codec, to compare the two protocol implementations
alone (CPU per request) or to bisect a behaviour difference. Not for production.

The three classes are always taken from the same twin: the Session and the pools it draws
connections from must match (the compiled Session calls the compiled Pool in C).

``RequestIds(prefix)`` is a request id generator with the ids of
``DataPlane.next_request_id`` (prefix + counter in lowercase hex, from 1); a worker that binds
one as its ``next_request_id`` saves the compiled Session a Python call per generated id.
"""

from __future__ import annotations

import os

from dispa import _native

PURE_SESSION = os.environ.get("DISPA_PURE_SESSION", "") not in ("", "0")

# Same import-order-safe pattern as dispa.protocols.http1: do not test ``_native.hotpath``
# (it is still None while ``dispa._hotpath`` is being imported by ``dispa._native``).
try:
    if _native.NO_EXTENSIONS:
        raise ImportError("DISPA_NO_EXTENSIONS is set")
    if PURE_SESSION:
        raise ImportError("DISPA_PURE_SESSION is set")
    from dispa._hotpath import (  # type: ignore[import-not-found]
        Pool, RequestIds, Session, UpstreamConnection,
    )
    IMPLEMENTATION = "compiled"
except ImportError:
    from dispa.proxy.pool import Pool, UpstreamConnection  # noqa: F401
    from dispa.proxy.session import Session  # noqa: F401

    class RequestIds:  # type: ignore[no-redef]
        """Pure twin of ``dispa._hotpath.RequestIds``."""

        __slots__ = ("prefix", "counter")

        def __init__(self, prefix):
            self.prefix = prefix.encode("latin-1") if isinstance(prefix, str) else bytes(prefix)
            self.counter = 0

        def __call__(self) -> bytes:
            self.counter += 1
            return self.prefix + f"{self.counter:x}".encode()

    IMPLEMENTATION = "pure"

__all__ = ["Session", "UpstreamConnection", "Pool", "RequestIds", "IMPLEMENTATION",
           "PURE_SESSION"]
