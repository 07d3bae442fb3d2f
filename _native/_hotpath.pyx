# cython: language_level=3, boundscheck=False, wraparound=False
#
# dispa._hotpath: the ONE compilation unit of Dispa's Cython core (STYLE C5/C11: split parts,
# one module). Each part is a textual include; their cdef classes are declared in
# _hotpath.pxd (which includes the parts' .pxd files).
#
# Parts:
#   http1_parser.pyx   RequestParser, ResponseParser, RequestHead, ResponseHead
#   http1_writer.pyx   write_request_head, write_response_head, encode_chunk,
#                      proxy_request_head, proxy_response_head
#   protocol.pyx       Session, UpstreamConnection, Pool (the proxy's protocol objects)
#   otlp.pyx           otlp_encode_span (finished spans to OTLP protobuf, tracing export)
#
# The pure-Python twins live in dispa/protocols/http1/_pure.py and dispa/proxy/session.py,
# dispa/proxy/pool.py, dispa/observability/tracing_otlp.py.

cdef extern from *:
    """
    #ifdef DISPA_DEBUG
    #define DISPA_DEBUG_BUILD 1
    #else
    #define DISPA_DEBUG_BUILD 0
    #endif
    #define DISPA_CYTHON_HEX_VERSION CYTHON_HEX_VERSION
    """
    int DISPA_DEBUG_BUILD
    long DISPA_CYTHON_HEX_VERSION

include "http1_parser.pyx"
include "http1_writer.pyx"
include "protocol.pyx"
include "otlp.pyx"

# Last, on purpose: dispa.protocols.http1/__init__ imports names from this module, so they
# must all exist before the package is imported from here (circular import otherwise).
from dispa.protocols.http1.errors import ProtocolError


def build_info():
    """What this build is: {"version": Cython version used to compile it, "debug": built with
    DISPA_DEBUG}. The version comes from the CYTHON_HEX_VERSION macro baked into the C code."""
    cdef long v = DISPA_CYTHON_HEX_VERSION
    return {
        "version": f"{(v >> 24) & 0xFF}.{(v >> 16) & 0xFF}.{(v >> 8) & 0xFF}",
        "debug": bool(DISPA_DEBUG_BUILD),
    }
