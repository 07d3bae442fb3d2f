# C constants of the compiled core (STYLE C6: UPPER, in consts.pxi).
# WARNING: the parser states and limits mirror dispa/protocols/http1/_pure.py and limits.py.

cdef enum:
    # events (the module-level ints NEED_DATA... are built from these)
    EV_NEED_DATA = 0
    EV_HEAD = 1
    EV_DATA = 2
    EV_END = 3
    EV_UPGRADE = 4

cdef enum:
    # parser states
    S_HEAD = 0
    S_BODY_CL = 1
    S_CHUNK_SIZE = 2
    S_CHUNK_DATA = 3
    S_CHUNK_CRLF = 4
    S_TRAILERS = 5
    S_BODY_EOF = 6
    S_END = 7
    S_UPGRADE = 8
    S_CLOSED = 9
    S_ERROR = 10

cdef enum:
    # WARNING: the same values as dispa/protocols/http1/limits.py (a unit test checks).
    DEFAULT_MAX_HEAD_BYTES = 65536
    DEFAULT_MAX_HEADER_COUNT = 100
    DEFAULT_MAX_LINE_BYTES = 8192
    DEFAULT_MAX_CHUNK_EXT_BYTES = 1024
    MAX_CHUNK_SIZE_DIGITS = 16
    MAX_CONTENT_LENGTH_DIGITS = 18
    MAX_LEADING_EMPTY_LINES = 4
    # stack slots before proxy_*_head falls back to the heap
    STACK_HEADERS = 128
    STACK_TOKENS = 32
