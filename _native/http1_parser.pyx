# cython: boundscheck=False, wraparound=False, cdivision=True
#
# HTTP/1.1 parser, compiled twin of dispa/protocols/http1/_pure.py (included into _hotpath).
#
# Theory of operation
# -------------------
# The parser owns a malloc'd byte buffer [_start, _end) that feed() appends to; positions
# below are offsets from _start. next_event() pulls one event at a time (h11 style); no
# Python callback is ever made from C.
#
# Rule 1: a head is read in two phases. _scan_head()/_scan_lines() find line ends with
# memchr and enforce the size limits only, resuming where the last call stopped (so byte-by-
# byte feeding stays linear). _parse_head() runs once, when the blank line is buffered: one
# pass over the lines checks syntax, recognises the framing headers (host, content-length,
# transfer-encoding, connection, upgrade, expect) by length + case-insensitive compare, and
# builds the headers list and the head object. Errors therefore do not depend on how the
# input was split.
# Rule 2: limit windows: a line starting at head offset s must end (LF) within
# min(max_line_bytes, max_head_bytes - s) bytes; if that many bytes are buffered without an
# LF, the smaller window's limit is reported (the line limit on a tie).
# Rule 3: _err() stores the error and moves to S_ERROR before raising; later calls re-raise.
# Decoded chunk bytes that precede an error in the same call are returned first (DATA).
# Rule 4: zero-copy feeding. When the buffer is empty, feed(bytes) does not copy: _buf points
# into the caller's (immutable) bytes object, held in _borrowed, and _cap is 0. The first
# append while bytes are left copies them into an owned buffer. An empty buffer keeps no
# memory once _release_if_empty() runs (or at the next feed), so an idle keep-alive
# connection holds no 4 KiB buffer. A DATA event that covers a whole borrowed object returns
# that object itself.
#
# WARNING: every rule, message and status here mirrors _pure.py; tests and the fuzzer compare
# the two twins. Change both together.

cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_SIMPLE
from cpython.mem cimport PyMem_Free, PyMem_Malloc, PyMem_Realloc
from cpython.tuple cimport PyTuple_GET_ITEM, PyTuple_GET_SIZE
from libc.stdint cimport uint64_t
from libc.string cimport memchr, memcmp, memcpy, memmove

# ProtocolError is imported at the end of _hotpath.pyx: dispa.protocols.http1/__init__ imports
# this module, so every public name must exist before that import runs (circular import).

NEED_DATA = EV_NEED_DATA
HEAD = EV_HEAD
DATA = EV_DATA
END = EV_END
UPGRADE = EV_UPGRADE

# -- character tables (RFC 9110 §5.6.2 tchar, §5.5 field values) -------------------------

cdef unsigned char TCHAR[256]
cdef unsigned char BAD_VALUE[256]   # CTL except HTAB, and DEL
cdef unsigned char HEXVAL[256]      # 0-15, 255 for a non-hex byte
cdef unsigned char LOWER[256]


cdef void _init_tables():
    cdef int c
    for c in range(256):
        TCHAR[c] = 0
        BAD_VALUE[c] = 1 if (c < 0x20 and c != 0x09) or c == 0x7F else 0
        HEXVAL[c] = 255
        LOWER[c] = c + 32 if 0x41 <= c <= 0x5A else c
    for c in b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ":
        TCHAR[c] = 1
    for c in range(10):
        HEXVAL[0x30 + c] = c
    for c in range(6):
        HEXVAL[0x41 + c] = 10 + c
        HEXVAL[0x61 + c] = 10 + c


_init_tables()

# -- interned objects ---------------------------------------------------------------------

cdef bytes py_GET = b"GET"
cdef bytes py_PUT = b"PUT"
cdef bytes py_HEAD = b"HEAD"
cdef bytes py_POST = b"POST"
cdef bytes py_PATCH = b"PATCH"
cdef bytes py_TRACE = b"TRACE"
cdef bytes py_DELETE = b"DELETE"
cdef bytes py_OPTIONS = b"OPTIONS"
cdef bytes py_CONNECT = b"CONNECT"
cdef bytes py_EMPTY = b""

# Header names reused as shared objects when the wire spelling matches exactly (raw casing is
# kept: "Host" and "host" are different entries). Chrome, Firefox, curl and common servers.
cdef tuple _COMMON_NAMES = (
    b"Host", b"Connection", b"Cache-Control", b"User-Agent", b"Accept", b"Accept-Encoding",
    b"Accept-Language", b"Cookie", b"Referer", b"Upgrade-Insecure-Requests", b"Origin",
    b"Content-Type", b"Content-Length", b"Transfer-Encoding", b"Authorization", b"Pragma",
    b"If-None-Match", b"If-Modified-Since", b"Sec-Fetch-Site", b"Sec-Fetch-Mode",
    b"Sec-Fetch-User", b"Sec-Fetch-Dest", b"sec-ch-ua", b"sec-ch-ua-mobile",
    b"sec-ch-ua-platform", b"Sec-CH-UA", b"Sec-CH-UA-Mobile", b"Sec-CH-UA-Platform",
    b"DNT", b"Upgrade", b"Expect", b"X-Forwarded-For", b"X-Forwarded-Proto",
    b"X-Forwarded-Host", b"X-Real-IP", b"X-Request-ID", b"Via", b"Forwarded", b"Range",
    b"Keep-Alive", b"TE", b"Trailer", b"Date", b"Server", b"Content-Encoding", b"ETag",
    b"Last-Modified", b"Expires", b"Vary", b"Location", b"Set-Cookie", b"Age",
    b"Access-Control-Allow-Origin", b"Strict-Transport-Security", b"X-Content-Type-Options",
    b"Accept-Ranges", b"Content-Range", b"Sec-WebSocket-Key", b"Sec-WebSocket-Version",
    b"Sec-WebSocket-Extensions", b"Sec-WebSocket-Accept", b"Sec-WebSocket-Protocol",
    b"Priority",
)
cdef list _names_by_len = [[] for _ in range(64)]
for _n in _COMMON_NAMES:
    _names_by_len[len(_n)].append(_n)
for _n in list(_COMMON_NAMES):
    if _n.lower() not in _names_by_len[len(_n)]:
        _names_by_len[len(_n)].append(_n.lower())
cdef tuple py_names_by_len = tuple([tuple(b) for b in _names_by_len])


cdef inline object _known_name(const unsigned char* p, Py_ssize_t n):
    """The shared bytes object for header name p[:n] when it is a common one, else None."""
    cdef tuple bucket
    cdef Py_ssize_t i
    cdef object cand
    if n < 64:
        bucket = <tuple>py_names_by_len[n]
        for i in range(PyTuple_GET_SIZE(bucket)):
            cand = <object>PyTuple_GET_ITEM(bucket, i)
            if memcmp(PyBytes_AS_STRING(cand), p, n) == 0:
                return cand
    return None


cdef inline object _method_obj(const unsigned char* p, Py_ssize_t n):
    if n == 3:
        if memcmp(p, b"GET", 3) == 0:
            return py_GET
        if memcmp(p, b"PUT", 3) == 0:
            return py_PUT
    elif n == 4:
        if memcmp(p, b"POST", 4) == 0:
            return py_POST
        if memcmp(p, b"HEAD", 4) == 0:
            return py_HEAD
    elif n == 5:
        if memcmp(p, b"PATCH", 5) == 0:
            return py_PATCH
        if memcmp(p, b"TRACE", 5) == 0:
            return py_TRACE
    elif n == 6:
        if memcmp(p, b"DELETE", 6) == 0:
            return py_DELETE
    elif n == 7:
        if memcmp(p, b"OPTIONS", 7) == 0:
            return py_OPTIONS
        if memcmp(p, b"CONNECT", 7) == 0:
            return py_CONNECT
    return PyBytes_FromStringAndSize(<const char*>p, n)


cdef inline bint _ieq(const unsigned char* p, Py_ssize_t n, const char* lower, Py_ssize_t ln):
    """p[:n] equals the lowercase literal ``lower`` ignoring ASCII case."""
    cdef Py_ssize_t i
    if n != ln:
        return False
    for i in range(n):
        if LOWER[p[i]] != <unsigned char>lower[i]:
            return False
    return True


cdef inline bint _all_tchar(const unsigned char* p, Py_ssize_t n):
    cdef Py_ssize_t i
    if n == 0:
        return False
    for i in range(n):
        if not TCHAR[p[i]]:
            return False
    return True


cdef inline bint _any_bad_value(const unsigned char* p, Py_ssize_t n):
    """Any CTL but HTAB (or DEL) in p[:n]? Eight bytes at a time (SWAR "hasless(x, 0x20)"
    and "haszero(x ^ 0x7F)" tests); a flagged word is rechecked byte by byte (HTAB)."""
    cdef Py_ssize_t i = 0, k
    cdef uint64_t x, t
    while i + 8 <= n:
        memcpy(&x, p + i, 8)
        t = ((x - 0x2020202020202020ULL) & ~x) | (((x ^ 0x7F7F7F7F7F7F7F7FULL)
                                                  - 0x0101010101010101ULL) & ~(x ^ 0x7F7F7F7F7F7F7F7FULL))
        if t & 0x8080808080808080ULL:
            for k in range(i, i + 8):
                if BAD_VALUE[p[k]]:
                    return True
        i += 8
    while i < n:
        if BAD_VALUE[p[i]]:
            return True
        i += 1
    return False


cdef inline bint _is_ows(unsigned char c):
    return c == 0x20 or c == 0x09


# -- heads ---------------------------------------------------------------------------------

@cython.freelist(64)
cdef class RequestHead:
    """One request head, read-only: method, target, version (10/11), headers (raw casing, in
    order), content_length (-1 if absent), chunked, keep_alive, upgrade, expect_continue."""

    def get(self, bytes name):
        """First value of header ``name`` (given in lowercase), or None."""
        return _get(self.headers, name, False)

    def get_all(self, bytes name):
        """Every value of header ``name`` (given in lowercase), in order."""
        return _get(self.headers, name, True)

    def __repr__(self):
        return f"<RequestHead {self.method!r} {self.target!r} HTTP/{self.version // 10}.{self.version % 10}>"


@cython.freelist(64)
cdef class ResponseHead:
    """One response head, read-only: status, reason, version, headers, content_length,
    chunked, keep_alive, upgrade (101, or 2xx to CONNECT)."""

    def get(self, bytes name):
        """First value of header ``name`` (given in lowercase), or None."""
        return _get(self.headers, name, False)

    def get_all(self, bytes name):
        """Every value of header ``name`` (given in lowercase), in order."""
        return _get(self.headers, name, True)

    def __repr__(self):
        return f"<ResponseHead {self.status} {self.reason!r}>"


cdef object _get(list headers, bytes name, bint all_):
    cdef Py_ssize_t i, j, n = PyBytes_GET_SIZE(name)
    cdef const unsigned char* want = <const unsigned char*>PyBytes_AS_STRING(name)
    cdef const unsigned char* p
    cdef tuple item
    cdef object hname
    cdef list out = [] if all_ else None
    for i in range(len(headers)):
        item = <tuple>headers[i]
        hname = item[0]
        if PyBytes_GET_SIZE(hname) != n:
            continue
        p = <const unsigned char*>PyBytes_AS_STRING(hname)
        for j in range(n):
            if LOWER[p[j]] != want[j]:
                break
        else:
            if all_:
                out.append(item[1])
            else:
                return item[1]
    return out


# -- parsers --------------------------------------------------------------------------------

cdef class _Parser:
    """Common machinery of RequestParser and ResponseParser (see _pure.py for the docs)."""

    def __cinit__(self):
        self._buf = NULL
        self._start = self._end = self._cap = 0

    def __dealloc__(self):
        if self._buf != NULL and self._cap:
            PyMem_Free(self._buf)
        self._buf = NULL

    def __init__(self, *, max_head_bytes=DEFAULT_MAX_HEAD_BYTES,
                 max_header_count=DEFAULT_MAX_HEADER_COUNT,
                 max_line_bytes=DEFAULT_MAX_LINE_BYTES,
                 max_chunk_ext_bytes=DEFAULT_MAX_CHUNK_EXT_BYTES,
                 allow_bare_lf=False):
        self._max_head = max_head_bytes
        self._max_count = max_header_count
        self._max_line = max_line_bytes
        self._max_ext = max_chunk_ext_bytes
        self._bare_lf = bool(allow_bare_lf)
        self.reset()

    def reset(self):
        """Forget everything buffered and start over (limits are kept)."""
        self._start = self._end = 0
        self._release_buffer()
        self.eof = False
        self.head = None
        self.trailers = None
        self._state = S_HEAD
        self._data = py_EMPTY
        self._error = None
        self._remaining = 0
        self._new_message()

    cdef void _new_message(self):
        self._lead = 0
        self._in_lead = True
        self._sc_line = 0
        self._sc_pos = 0
        self._sc_count = 0
        self._sc_first = True

    cdef int _append(self, const unsigned char* data, Py_ssize_t n) except -1:
        cdef Py_ssize_t used, new_cap
        cdef unsigned char* nb
        if n == 0:
            return 0
        if self._borrowed is not None:
            # leave the caller's bytes (Rule 4): what is left of them moves to an owned buffer
            used = self._end - self._start
            new_cap = 4096
            while new_cap < used + n:
                new_cap *= 2
            nb = <unsigned char*>PyMem_Malloc(new_cap)
            if nb == NULL:
                raise MemoryError()
            memcpy(nb, self._buf + self._start, used)
            self._buf = nb
            self._cap = new_cap
            self._start = 0
            self._end = used
            self._borrowed = None
        if self._start == self._end:
            self._start = self._end = 0
        if self._end + n > self._cap:
            used = self._end - self._start
            if self._start > 0:
                memmove(self._buf, self._buf + self._start, used)
                self._start = 0
                self._end = used
            if used + n > self._cap:
                new_cap = self._cap * 2 if self._cap else 4096
                while new_cap < used + n:
                    new_cap *= 2
                nb = <unsigned char*>PyMem_Realloc(self._buf, new_cap)
                if nb == NULL:
                    raise MemoryError()
                self._buf = nb
                self._cap = new_cap
        memcpy(self._buf + self._end, data, n)
        self._end += n
        return 0

    def feed(self, data):
        """Append ``data`` (bytes, bytearray, memoryview: any buffer) to the buffer.
        Raises RuntimeError after feed_eof()."""
        self._feed(data)

    cdef int _feed(self, object data) except -1:
        # cdef twin of feed() for the compiled Session (no Python call per read)
        cdef Py_buffer view
        if self.eof:
            raise RuntimeError("feed() after feed_eof()")
        if type(data) is bytes:
            if self._start == self._end and PyBytes_GET_SIZE(data):
                # Rule 4: parse straight from the caller's bytes
                self._release_buffer()
                self._buf = <unsigned char*>PyBytes_AS_STRING(data)
                self._borrowed = data
                self._end = PyBytes_GET_SIZE(data)
                return 0
            return self._append(<const unsigned char*>PyBytes_AS_STRING(data),
                                PyBytes_GET_SIZE(data))
        PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
        try:
            self._append(<const unsigned char*>view.buf, view.len)
        finally:
            PyBuffer_Release(&view)
        return 0

    cdef void _release_buffer(self):
        """Drop the buffer (owned or borrowed); only when it holds no unconsumed byte."""
        if self._cap:
            PyMem_Free(self._buf)
            self._cap = 0
        self._buf = NULL
        self._borrowed = None
        self._start = self._end = 0

    cdef void _release_if_empty(self):
        """Keep no buffer memory while nothing is buffered (idle keep-alive connections)."""
        if self._start == self._end and self._buf != NULL:
            self._release_buffer()

    cdef Py_ssize_t _body_available(self):
        """Body bytes of a Content-Length body that are buffered now (0 in other states)."""
        cdef Py_ssize_t avail
        if self._state != S_BODY_CL:
            return 0
        avail = self._end - self._start
        return <Py_ssize_t>self._remaining if self._remaining < avail else avail

    cdef void _consume_body(self, Py_ssize_t n):
        """Mark n <= _body_available() body bytes as taken by the caller, who copied them
        from _buf + _start already (the S_BODY_CL step of next_event without a DATA
        event and without a bytes object)."""
        self._start += n
        self._remaining -= n
        if self._remaining == 0:
            self._state = S_UPGRADE if self._upgrade else S_END

    def feed_eof(self):
        """The peer closed its side."""
        self.eof = True

    def take_data(self):
        """The body bytes announced by the last DATA event (b"" if none)."""
        d = self._data
        self._data = py_EMPTY
        return d

    def take_rest(self):
        """All unconsumed buffered bytes; empties the buffer."""
        rest = PyBytes_FromStringAndSize(<const char*>self._buf + self._start,
                                         self._end - self._start)
        self._release_buffer()
        return rest

    cdef int _err(self, str message, int status) except -1:
        exc = ProtocolError(message, 502 if self._is_response else status)
        self._state = S_ERROR
        self._error = exc
        raise exc

    cdef int _incomplete(self) except -1:
        return self._err("incomplete response" if self._is_response else "incomplete request",
                         400)

    def next_event(self):
        """Return NEED_DATA, HEAD, DATA, END or UPGRADE; raise ProtocolError on bad input."""
        return self._next()

    cdef int _next(self) except -1:
        # cdef twin of next_event() for the compiled Session
        cdef int state = self._state
        cdef Py_ssize_t n, avail
        if state == S_HEAD:
            return self._next_head()
        if state == S_BODY_CL:
            avail = self._end - self._start
            if avail == 0:
                if self.eof:
                    self._incomplete()
                return EV_NEED_DATA
            n = <Py_ssize_t>self._remaining if self._remaining < avail else avail
            if n == self._end and self._start == 0 and self._borrowed is not None \
                    and n == PyBytes_GET_SIZE(self._borrowed):
                self._data = self._borrowed   # Rule 4: the caller's bytes, no copy
            else:
                self._data = PyBytes_FromStringAndSize(<const char*>self._buf + self._start, n)
            self._start += n
            self._remaining -= n
            if self._remaining == 0:
                self._state = S_UPGRADE if self._upgrade else S_END
            return EV_DATA
        if S_CHUNK_SIZE <= state <= S_TRAILERS:
            return self._next_chunked()
        if state == S_END:
            self._state = S_HEAD
            self._new_message()
            return EV_END
        if state == S_BODY_EOF:
            avail = self._end - self._start
            if avail:
                if self._start == 0 and self._borrowed is not None \
                        and avail == PyBytes_GET_SIZE(self._borrowed):
                    self._data = self._borrowed   # Rule 4: the caller's bytes, no copy
                else:
                    self._data = PyBytes_FromStringAndSize(
                        <const char*>self._buf + self._start, avail)
                self._start = self._end = 0
                return EV_DATA
            if self.eof:
                self._state = S_CLOSED
                return EV_END
            return EV_NEED_DATA
        if state == S_UPGRADE:
            return EV_UPGRADE
        if state == S_CLOSED:
            return EV_NEED_DATA
        raise ProtocolError(self._error.message, self._error.status_hint)

    cdef int _next_head(self) except -1:
        cdef Py_ssize_t end = self._scan_head()
        if end < 0:
            if self.eof and self._end > self._start:
                self._incomplete()
            return EV_NEED_DATA
        self._parse_head(end)
        self._start += end
        return EV_HEAD

    # -- scan phase (limits only) ----------------------------------------------------------

    cdef Py_ssize_t _scan_head(self) except -2:
        cdef unsigned char* p
        cdef Py_ssize_t avail
        if self._in_lead:
            while True:
                p = self._buf + self._start
                avail = self._end - self._start
                if avail >= 2 and p[0] == 13 and p[1] == 10:
                    self._start += 2
                elif avail >= 1 and p[0] == 10:
                    if not self._bare_lf:
                        self._err("bare LF line ending", 400)
                    self._start += 1
                elif avail == 0 or (avail == 1 and p[0] == 13):
                    return -1
                else:
                    break
                self._lead += 1
                if self._lead > MAX_LEADING_EMPTY_LINES:
                    self._err("too many empty lines before the start line", 400)
            self._in_lead = False
        return self._scan_lines(False)

    cdef Py_ssize_t _scan_lines(self, bint trailers) except -2:
        cdef const unsigned char* base = self._buf + self._start
        cdef Py_ssize_t n = self._end - self._start
        cdef Py_ssize_t s, head_room, limit, lim_end, stop, i
        cdef const unsigned char* hit
        while True:
            s = self._sc_line
            head_room = self._max_head - s
            limit = self._max_line if self._max_line <= head_room else head_room
            lim_end = s + limit
            stop = lim_end if lim_end < n else n
            hit = NULL
            if stop > self._sc_pos:
                hit = <const unsigned char*>memchr(base + self._sc_pos, 10, stop - self._sc_pos)
            if hit == NULL:
                if n >= lim_end:
                    self._limit_error(trailers, self._max_line <= head_room)
                self._sc_pos = n
                return -1
            i = hit - base
            if (i == s or (i == s + 1 and base[s] == 13)) and not self._sc_first:
                return i + 1
            if self._sc_first and not trailers:
                self._sc_first = False
            else:
                self._sc_first = False
                self._sc_count += 1
                if self._sc_count > self._max_count:
                    if trailers:
                        self._err("too many trailer fields", 431)
                    self._err("too many headers", 431)
            self._sc_line = self._sc_pos = i + 1

    cdef int _limit_error(self, bint trailers, bint line) except -1:
        if trailers:
            return self._err("trailer line too long" if line else "trailer section too large",
                             431)
        if line and self._sc_first:
            return self._err("status line too long" if self._is_response
                             else "request line too long", 414)
        if line:
            return self._err("header line too long", 431)
        return self._err("response head too large" if self._is_response
                         else "request head too large", 431)

    # -- parse phase (syntax) --------------------------------------------------------------

    cdef Py_ssize_t _line(self, Py_ssize_t pos, Py_ssize_t* content_len) except -1:
        """The line at buffer offset pos: set its content length, return the next offset."""
        cdef const unsigned char* p = self._buf + self._start + pos
        cdef const unsigned char* hit = <const unsigned char*>memchr(
            p, 10, self._end - self._start - pos)
        cdef Py_ssize_t i = hit - p
        if i > 0 and p[i - 1] == 13:
            content_len[0] = i - 1
        else:
            if not self._bare_lf:
                return self._err("bare LF line ending", 400)
            content_len[0] = i
        return pos + i + 1

    cdef list _parse_fields(self, Py_ssize_t pos, bint head_fields, FieldInfo* info):
        cdef list headers = []
        cdef Py_ssize_t L, nxt, colon, vs, ve, k, e
        cdef const unsigned char* p
        cdef const unsigned char* hit
        cdef unsigned char c
        cdef bint is_resp = self._is_response
        cdef unsigned long long cl
        cdef object name
        info.host = 0
        info.content_length = -1
        info.te = info.chunked = False
        info.conn_close = info.conn_keep = info.conn_upgrade = False
        info.has_upgrade = info.expect = False
        while True:
            nxt = self._line(pos, &L)
            if L == 0:
                break
            p = self._buf + self._start + pos
            pos = nxt
            if _is_ows(p[0]):
                self._err("obs-fold is not allowed", 400)
            hit = <const unsigned char*>memchr(p, 58, L)   # ':'
            if hit == NULL:
                self._err("header line without colon", 400)
            colon = hit - p
            if colon == 0:
                self._err("empty header name", 400)
            if _is_ows(p[colon - 1]):
                self._err("whitespace before colon", 400)
            name = _known_name(p, colon)   # a common name is a valid token already
            if name is None:
                if not _all_tchar(p, colon):
                    self._err("invalid header name", 400)
                name = PyBytes_FromStringAndSize(<const char*>p, colon)
            vs = colon + 1
            ve = L
            while vs < ve and _is_ows(p[vs]):
                vs += 1
            while ve > vs and _is_ows(p[ve - 1]):
                ve -= 1
            if _any_bad_value(p + vs, ve - vs):
                self._err("invalid header value", 400)
            headers.append((name,
                            PyBytes_FromStringAndSize(<const char*>p + vs, ve - vs)))
            if not head_fields:
                continue
            # known headers: length first, then a case-insensitive compare
            if colon == 4:
                if not is_resp and _ieq(p, 4, b"host", 4):
                    info.host += 1
                    if info.host > 1:
                        self._err("duplicate Host header", 400)
            elif colon == 14:
                if _ieq(p, 14, b"content-length", 14):
                    if info.content_length >= 0:
                        self._err("duplicate Content-Length header", 400)
                    if ve == vs or ve - vs > MAX_CONTENT_LENGTH_DIGITS:
                        self._err("invalid Content-Length", 400)
                    cl = 0
                    for k in range(vs, ve):
                        c = p[k]
                        if c < 0x30 or c > 0x39:
                            self._err("invalid Content-Length", 400)
                        cl = cl * 10 + (c - 0x30)
                    info.content_length = <long long>cl
            elif colon == 17:
                if _ieq(p, 17, b"transfer-encoding", 17):
                    info.te = True
                    k = vs
                    while True:
                        e = k
                        while e < ve and p[e] != 44:   # ','
                            e += 1
                        self._te_element(p + k, e - k, info)
                        if e >= ve:
                            break
                        k = e + 1
            elif colon == 10:
                if _ieq(p, 10, b"connection", 10):
                    k = vs
                    while True:
                        e = k
                        while e < ve and p[e] != 44:
                            e += 1
                        _conn_token(p + k, e - k, info)
                        if e >= ve:
                            break
                        k = e + 1
            elif colon == 7:
                if _ieq(p, 7, b"upgrade", 7):
                    info.has_upgrade = True
            elif colon == 6:
                if _ieq(p, 6, b"expect", 6) and _ieq(p + vs, ve - vs, b"100-continue", 12):
                    info.expect = True
        return headers

    cdef int _te_element(self, const unsigned char* p, Py_ssize_t n, FieldInfo* info) except -1:
        while n and _is_ows(p[0]):
            p += 1
            n -= 1
        while n and _is_ows(p[n - 1]):
            n -= 1
        if not _all_tchar(p, n):
            return self._err("malformed Transfer-Encoding", 400)
        if info.chunked:
            return self._err("chunked must be the final transfer coding", 400)
        if _ieq(p, n, b"chunked", 7):
            info.chunked = True
        else:
            # A proxy that re-frames bodies as chunked would silently drop any other coding
            # (gzip, deflate, ...) and corrupt the message, so it refuses them (RFC 9112 §6.1).
            return self._err("unsupported transfer coding", 501)
        return 0

    cdef int _framing_checks(self, int version, FieldInfo* info) except -1:
        if info.te and info.content_length >= 0:
            return self._err("both Content-Length and Transfer-Encoding", 400)
        if info.te and version == 10:
            return self._err("Transfer-Encoding in an HTTP/1.0 message", 400)
        if info.te and not info.chunked and not self._is_response:
            return self._err("final transfer coding is not chunked", 400)
        return 0

    cdef int _parse_head(self, Py_ssize_t end) except -1:
        raise NotImplementedError

    # -- chunked body ----------------------------------------------------------------------

    cdef int _next_chunked(self) except -1:
        cdef list pieces = []
        try:
            self._decode_chunks(pieces)
        except ProtocolError:
            if not pieces:
                raise
            # state is S_ERROR with the error stored: deliver the decoded bytes first
            self._data = pieces[0] if len(pieces) == 1 else py_EMPTY.join(pieces)
            return EV_DATA
        if pieces:
            self._data = pieces[0] if len(pieces) == 1 else py_EMPTY.join(pieces)
            return EV_DATA
        if self._state == S_END:
            self._state = S_HEAD
            self._new_message()
            return EV_END
        if self._state == S_UPGRADE:
            return EV_UPGRADE
        if self.eof:
            self._incomplete()
        return EV_NEED_DATA

    cdef int _decode_chunks(self, list pieces) except -1:
        cdef int state
        cdef Py_ssize_t avail, n, window, end
        cdef const unsigned char* p
        cdef const unsigned char* hit
        cdef long long size
        cdef FieldInfo info
        while True:
            state = self._state
            p = self._buf + self._start
            avail = self._end - self._start
            if state == S_CHUNK_DATA:
                if avail == 0:
                    return 0
                n = <Py_ssize_t>self._remaining if self._remaining < avail else avail
                pieces.append(PyBytes_FromStringAndSize(<const char*>p, n))
                self._start += n
                self._remaining -= n
                if self._remaining:
                    return 0
                self._state = S_CHUNK_CRLF
            elif state == S_CHUNK_SIZE:
                window = MAX_CHUNK_SIZE_DIGITS + self._max_ext + 2
                hit = <const unsigned char*>memchr(p, 10, window if window < avail else avail)
                if hit == NULL:
                    if avail >= window:
                        self._err("chunk header too long", 400)
                    return 0
                n = hit - p + 1
                size = self._parse_chunk_size(p, n)
                self._start += n
                if size == 0:
                    self._state = S_TRAILERS
                    self._sc_line = self._sc_pos = self._sc_count = 0
                    self._sc_first = False
                else:
                    self._remaining = size
                    self._state = S_CHUNK_DATA
            elif state == S_CHUNK_CRLF:
                if avail == 0:
                    return 0
                if p[0] == 13:
                    if avail < 2:
                        return 0
                    if p[1] != 10:
                        self._err("missing CRLF after chunk data", 400)
                    self._start += 2
                elif p[0] == 10 and self._bare_lf:
                    self._start += 1
                else:
                    self._err("missing CRLF after chunk data", 400)
                self._state = S_CHUNK_SIZE
            else:  # S_TRAILERS
                end = self._scan_lines(True)
                if end < 0:
                    return 0
                self.trailers = self._parse_fields(0, False, &info)
                self._start += end
                self._state = S_UPGRADE if self._upgrade else S_END
                return 0

    cdef long long _parse_chunk_size(self, const unsigned char* p, Py_ssize_t n) except -2:
        """RFC 9112 §7.1: chunk-size [ chunk-ext ] CRLF; p[:n] ends with LF."""
        cdef Py_ssize_t i = 0, j
        cdef unsigned long long size = 0
        cdef unsigned char v
        if n >= 2 and p[n - 2] == 13:
            n -= 2
        else:
            if not self._bare_lf:
                self._err("bare LF line ending", 400)
            n -= 1
        while i < n:
            v = HEXVAL[p[i]]
            if v == 255:
                break
            if i < MAX_CHUNK_SIZE_DIGITS:
                size = (size << 4) | v
            i += 1
        if i == 0:
            self._err("invalid chunk size", 400)
        if i > MAX_CHUNK_SIZE_DIGITS:
            self._err("chunk size too large", 400)
        if size > 0x7FFFFFFFFFFFFFFFULL:
            self._err("chunk size too large", 400)
        if n - i > self._max_ext:
            self._err("chunk extension too long", 400)
        # RFC 9112 §7.1.1: *( BWS ";" BWS ext-name [ BWS "=" BWS ext-val ] )
        while i < n:
            while i < n and _is_ows(p[i]):
                i += 1
            if i >= n or p[i] != 59:   # ';'
                self._err("invalid chunk extension", 400)
            i += 1
            while i < n and _is_ows(p[i]):
                i += 1
            j = i
            while i < n and TCHAR[p[i]]:
                i += 1
            if i == j:
                self._err("invalid chunk extension", 400)
            j = i
            while i < n and _is_ows(p[i]):
                i += 1
            if i < n and p[i] == 61:   # '='
                i += 1
                while i < n and _is_ows(p[i]):
                    i += 1
                if i < n and p[i] == 34:   # quoted-string
                    i += 1
                    while True:
                        if i >= n:
                            self._err("invalid chunk extension", 400)
                        v = p[i]
                        if v == 34:
                            i += 1
                            break
                        if v == 92:   # quoted-pair
                            if i + 1 >= n or (BAD_VALUE[p[i + 1]]):
                                self._err("invalid chunk extension", 400)
                            i += 2
                        elif BAD_VALUE[v]:
                            self._err("invalid chunk extension", 400)
                        else:
                            i += 1
                else:
                    j = i
                    while i < n and TCHAR[p[i]]:
                        i += 1
                    if i == j:
                        self._err("invalid chunk extension", 400)
            else:
                i = j
        return <long long>size


cdef int _conn_token(const unsigned char* p, Py_ssize_t n, FieldInfo* info) except -1:
    while n and _is_ows(p[0]):
        p += 1
        n -= 1
    while n and _is_ows(p[n - 1]):
        n -= 1
    if _ieq(p, n, b"close", 5):
        info.conn_close = True
    elif _ieq(p, n, b"keep-alive", 10):
        info.conn_keep = True
    elif _ieq(p, n, b"upgrade", 7):
        info.conn_upgrade = True
    return 0


cdef int _parse_version(_Parser parser, const unsigned char* p, Py_ssize_t n) except -1:
    """HTTP/1.1 -> 11. RFC 9112 §2.3: exactly "HTTP/" DIGIT "." DIGIT."""
    cdef int major, minor
    if (n != 8 or memcmp(p, b"HTTP/", 5) != 0 or p[6] != 0x2E
            or p[5] < 0x30 or p[5] > 0x39 or p[7] < 0x30 or p[7] > 0x39):
        return parser._err("invalid HTTP version", 400)
    major = p[5] - 0x30
    minor = p[7] - 0x30
    if major == 1 and minor <= 1:
        return 10 + minor
    if major == 0:
        return parser._err("HTTP/0.x is not supported", 400)
    return parser._err("HTTP version not supported", 505)


cdef class RequestParser(_Parser):
    """Parse requests from a downstream byte stream (RFC 9112)."""

    def __cinit__(self):
        self._is_response = False

    cdef int _parse_head(self, Py_ssize_t end) except -1:
        cdef Py_ssize_t L, sp, sp2, pos, i
        cdef const unsigned char* p = self._buf + self._start
        cdef const unsigned char* hit
        cdef int version
        cdef FieldInfo info
        cdef RequestHead head
        cdef bint upgrade
        pos = self._line(0, &L)
        hit = <const unsigned char*>memchr(p, 32, L)
        if hit == NULL:
            return self._err("invalid request line", 400)
        sp = hit - p
        if not _all_tchar(p, sp):
            return self._err("invalid method", 400)
        sp2 = L - 1
        while p[sp2] != 32:
            sp2 -= 1
        if sp2 == sp:
            return self._err("invalid request line", 400)
        version = _parse_version(self, p + sp2 + 1, L - sp2 - 1)
        if sp2 - sp - 1 == 0:
            return self._err("invalid request target", 400)
        for i in range(sp + 1, sp2):
            if p[i] < 0x21 or p[i] > 0x7E:
                return self._err("invalid request target", 400)
        headers = self._parse_fields(pos, True, &info)
        self._framing_checks(version, &info)
        if version == 11 and not info.host:
            return self._err("missing Host header", 400)
        head = RequestHead.__new__(RequestHead)
        head.method = _method_obj(p, sp)
        head.target = PyBytes_FromStringAndSize(<const char*>p + sp + 1, sp2 - sp - 1)
        head.version = version
        head.headers = headers
        head.content_length = info.content_length
        head.chunked = info.chunked
        if version == 11:
            head.keep_alive = not info.conn_close
        else:
            head.keep_alive = info.conn_keep and not info.conn_close
        upgrade = (sp == 7 and memcmp(p, b"CONNECT", 7) == 0) or (
            version == 11 and info.has_upgrade and info.conn_upgrade)
        head.upgrade = upgrade
        self._upgrade = upgrade
        head.expect_continue = info.expect
        self.head = head
        self.trailers = None
        if info.chunked:
            self._state = S_CHUNK_SIZE
            self.trailers = []
        elif info.content_length > 0:
            self._state = S_BODY_CL
            self._remaining = info.content_length
        else:
            self._state = S_UPGRADE if upgrade else S_END
        return 0


cdef class ResponseParser(_Parser):
    """Parse responses from an upstream byte stream (RFC 9112). Call ``expect(method)``
    before each response. Every error has ``status_hint`` 502."""

    def __cinit__(self):
        self._is_response = True
        self._method = py_GET

    def expect(self, method):
        """The method of the request this response answers (HEAD: no body; CONNECT + 2xx:
        tunnel). Stays in force until the next call."""
        self._method = bytes(method)

    cdef int _parse_head(self, Py_ssize_t end) except -1:
        cdef Py_ssize_t L, sp, pos
        cdef const unsigned char* p = self._buf + self._start
        cdef const unsigned char* hit
        cdef int version, status, state
        cdef FieldInfo info
        cdef ResponseHead head
        cdef bint upgrade, keep_alive
        pos = self._line(0, &L)
        hit = <const unsigned char*>memchr(p, 32, L)
        if hit == NULL:
            return self._err("invalid status line", 502)
        sp = hit - p
        version = _parse_version(self, p, sp)
        if (L < sp + 4 or p[sp + 1] < 0x31 or p[sp + 1] > 0x39
                or p[sp + 2] < 0x30 or p[sp + 2] > 0x39
                or p[sp + 3] < 0x30 or p[sp + 3] > 0x39
                or (L > sp + 4 and p[sp + 4] != 32)):
            return self._err("invalid status code", 502)
        status = (p[sp + 1] - 0x30) * 100 + (p[sp + 2] - 0x30) * 10 + (p[sp + 3] - 0x30)
        if L > sp + 5 and _any_bad_value(p + sp + 5, L - sp - 5):
            return self._err("invalid reason phrase", 502)
        headers = self._parse_fields(pos, True, &info)
        self._framing_checks(version, &info)
        if version == 11:
            keep_alive = not info.conn_close
        else:
            keep_alive = info.conn_keep and not info.conn_close
        method = self._method
        upgrade = status == 101 or (method == py_CONNECT and 200 <= status < 300)
        if upgrade:
            state = S_UPGRADE
        elif status < 200 or status == 204 or status == 304 or method == py_HEAD:
            state = S_END
        elif info.chunked:
            state = S_CHUNK_SIZE
        elif info.te:
            # RFC 9112 §6.3 rule 4: a final coding other than chunked: read until close.
            state = S_BODY_EOF
            keep_alive = False
        elif info.content_length >= 0:
            state = S_BODY_CL if info.content_length > 0 else S_END
        else:
            state = S_BODY_EOF
            keep_alive = False
        head = ResponseHead.__new__(ResponseHead)
        head.status = status
        head.reason = PyBytes_FromStringAndSize(<const char*>p + sp + 5, L - sp - 5) \
            if L > sp + 5 else py_EMPTY
        head.version = version
        head.headers = headers
        head.content_length = info.content_length
        head.chunked = info.chunked
        head.keep_alive = keep_alive
        head.upgrade = upgrade
        self._upgrade = upgrade
        self.head = head
        self.trailers = [] if state == S_CHUNK_SIZE else None
        self._state = state
        self._remaining = info.content_length
        return 0
