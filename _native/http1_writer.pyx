# cython: boundscheck=False, wraparound=False, cdivision=True
#
# HTTP/1.1 serializer, compiled twin of the writer half of dispa/protocols/http1/_pure.py.
#
# Theory of operation: every function validates its inputs (header injection is the risk:
# CR, LF, NUL or any CTL in a value, a non-token name), computes the exact output size, then
# fills ONE bytes object made with PyBytes_FromStringAndSize(NULL, n). Fields of a parsed head
# are trusted (the parser validated them); fields from callers (``extra``, targets) are not.
# proxy_request_head is the hottest function of the proxy: one pass decides which fields are
# kept (hop-by-hop, Connection-named, Content-Length, ``drop``), one pass copies.
#
# WARNING: the rules (hop-by-hop set, Upgrade kept for upgrades, messages) mirror _pure.py.

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from libc.string cimport memcpy

LAST_CHUNK = b"0\r\n\r\n"

cdef struct Field:
    # one extra field for _proxy_head: validated by whoever fills it in
    const char* name
    Py_ssize_t name_n
    const char* value
    Py_ssize_t value_n


cdef inline bytes _as_bytes(object obj):
    if type(obj) is bytes:
        return <bytes>obj
    return bytes(obj)


cdef inline bint _bad_target(bytes target):
    cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(target)
    cdef Py_ssize_t i, n = PyBytes_GET_SIZE(target)
    if n == 0:
        return True
    for i in range(n):
        if p[i] < 0x21 or p[i] > 0x7E:
            return True
    return False


cdef inline char* _put(char* out, const void* p, Py_ssize_t n):
    memcpy(out, p, n)
    return out + n


cdef list _checked_fields(object headers):
    """headers as a list of (bytes, bytes) tuples, every name a token and no CTL in a value;
    raises ValueError otherwise."""
    cdef list out = []
    cdef bytes name, value
    for item in headers:
        n, v = item
        name = _as_bytes(n)
        value = _as_bytes(v)
        if not _all_tchar(<const unsigned char*>PyBytes_AS_STRING(name), PyBytes_GET_SIZE(name)):
            raise ValueError(f"invalid header name: {name!r}")
        if _any_bad_value(<const unsigned char*>PyBytes_AS_STRING(value), PyBytes_GET_SIZE(value)):
            raise ValueError(f"invalid header value: {value!r}")
        out.append((name, value))
    return out


cdef Py_ssize_t _fields_size(list fields):
    cdef Py_ssize_t size = 0
    cdef tuple item
    for item in fields:
        size += PyBytes_GET_SIZE(<bytes>item[0]) + PyBytes_GET_SIZE(<bytes>item[1]) + 4
    return size


cdef char* _put_fields(char* out, list fields):
    cdef tuple item
    cdef bytes name, value
    for item in fields:
        name = <bytes>item[0]
        value = <bytes>item[1]
        out = _put(out, PyBytes_AS_STRING(name), PyBytes_GET_SIZE(name))
        out = _put(out, b": ", 2)
        out = _put(out, PyBytes_AS_STRING(value), PyBytes_GET_SIZE(value))
        out = _put(out, b"\r\n", 2)
    return out


def write_request_head(method, target, headers):
    """``METHOD target HTTP/1.1`` CRLF, ``Name: value`` CRLF per header, CRLF.
    Raises ValueError on an invalid method token, a target with SP/CTL, an invalid header
    name, or CR/LF/NUL/CTL in a value."""
    cdef bytes m = _as_bytes(method)
    cdef bytes t = _as_bytes(target)
    if not _all_tchar(<const unsigned char*>PyBytes_AS_STRING(m), PyBytes_GET_SIZE(m)):
        raise ValueError(f"invalid method: {m!r}")
    if _bad_target(t):
        raise ValueError(f"invalid request target: {t!r}")
    cdef list fields = _checked_fields(headers)
    cdef Py_ssize_t size = PyBytes_GET_SIZE(m) + 1 + PyBytes_GET_SIZE(t) + 11 + _fields_size(fields) + 2
    out = PyBytes_FromStringAndSize(NULL, size)
    cdef char* w = PyBytes_AS_STRING(out)
    w = _put(w, PyBytes_AS_STRING(m), PyBytes_GET_SIZE(m))
    w = _put(w, b" ", 1)
    w = _put(w, PyBytes_AS_STRING(t), PyBytes_GET_SIZE(t))
    w = _put(w, b" HTTP/1.1\r\n", 11)
    w = _put_fields(w, fields)
    _put(w, b"\r\n", 2)
    return out


cdef bytes _checked_reason(object status, object reason):
    if type(status) is not int or not 100 <= status <= 999:
        raise ValueError(f"invalid status: {status!r}")
    cdef bytes r = _as_bytes(reason)
    if _any_bad_value(<const unsigned char*>PyBytes_AS_STRING(r), PyBytes_GET_SIZE(r)):
        raise ValueError(f"invalid reason phrase: {r!r}")
    return r


cdef char* _put_status_line(char* w, int status, bytes reason):
    w = _put(w, b"HTTP/1.1 ", 9)
    w[0] = <char>(0x30 + status // 100)
    w[1] = <char>(0x30 + (status // 10) % 10)
    w[2] = <char>(0x30 + status % 10)
    w[3] = 32
    w += 4
    w = _put(w, PyBytes_AS_STRING(reason), PyBytes_GET_SIZE(reason))
    return _put(w, b"\r\n", 2)


def write_response_head(status, reason, headers):
    """``HTTP/1.1 status reason`` CRLF, fields, CRLF. Raises ValueError like
    write_request_head and for a status outside 100-999."""
    cdef bytes r = _checked_reason(status, reason)
    cdef list fields = _checked_fields(headers)
    cdef Py_ssize_t size = 15 + PyBytes_GET_SIZE(r) + _fields_size(fields) + 2
    out = PyBytes_FromStringAndSize(NULL, size)
    cdef char* w = _put_status_line(PyBytes_AS_STRING(out), status, r)
    w = _put_fields(w, fields)
    _put(w, b"\r\n", 2)
    return out


def encode_chunk(data):
    """One chunk: hex size CRLF data CRLF. Raises ValueError for empty data (use
    LAST_CHUNK)."""
    return _encode_chunk(_as_bytes(data))


cdef bytes _encode_chunk(bytes d):
    cdef Py_ssize_t n = PyBytes_GET_SIZE(d), digits = 0, t
    if n == 0:
        raise ValueError("empty chunk: use LAST_CHUNK")
    t = n
    while t:
        digits += 1
        t >>= 4
    out = PyBytes_FromStringAndSize(NULL, digits + 2 + n + 2)
    cdef char* w = PyBytes_AS_STRING(out)
    cdef Py_ssize_t i
    t = n
    for i in range(digits - 1, -1, -1):
        w[i] = b"0123456789abcdef"[t & 15]
        t >>= 4
    w += digits
    w = _put(w, b"\r\n", 2)
    w = _put(w, PyBytes_AS_STRING(d), n)
    _put(w, b"\r\n", 2)
    return out


cdef inline bint _is_hop(const unsigned char* p, Py_ssize_t n):
    """RFC 9110 §7.6.1 hop-by-hop fields, plus Content-Length (the caller frames)."""
    if n == 10:
        return _ieq(p, n, b"connection", 10) or _ieq(p, n, b"keep-alive", 10)
    if n == 7:
        return _ieq(p, n, b"trailer", 7)   # upgrade is decided by the caller
    if n == 2:
        return _ieq(p, n, b"te", 2)
    if n == 14:
        return _ieq(p, n, b"content-length", 14)
    if n == 16:
        return _ieq(p, n, b"proxy-connection", 16)
    if n == 17:
        return _ieq(p, n, b"transfer-encoding", 17)
    return False


cdef inline bint _in_slices(const unsigned char* p, Py_ssize_t n, const Slice* s, Py_ssize_t count,
                            bint exact_lower):
    """p[:n] is one of the slices, ignoring case (exact_lower: the slices are lowercase)."""
    cdef Py_ssize_t i, k
    cdef const unsigned char* q
    for i in range(count):
        if s[i].n != n:
            continue
        q = s[i].p
        if exact_lower:
            for k in range(n):
                if LOWER[p[k]] != q[k]:
                    break
            else:
                return True
        else:
            for k in range(n):
                if LOWER[p[k]] != LOWER[q[k]]:
                    break
            else:
                return True
    return False


cdef bytes _proxy_head(bint is_request, int status, bytes reason, bytes method,
                       bytes target, list headers, bint keep_upgrade,
                       const Slice* drops, Py_ssize_t ndrop,
                       const Field* extra, Py_ssize_t nextra,
                       const char* tail, Py_ssize_t tail_n):
    """Build a proxied head: a request line (method/target) or a status line (status/reason),
    the kept fields of ``headers`` (minus hop-by-hop, Connection-named and ``drops``, which
    are lowercase), the ``extra`` fields (already validated), the blank line, then ``tail``
    (body bytes the caller wants in the same bytes object: one write per message)."""
    cdef Py_ssize_t nh = len(headers), i, k, e, ntok = 0, size, vn, nn
    cdef char keep_stack[STACK_HEADERS]
    cdef Slice tok_stack[STACK_TOKENS]
    cdef char* keep = keep_stack
    cdef Slice* toks = tok_stack
    cdef Py_ssize_t tok_cap = STACK_TOKENS
    cdef const unsigned char* p
    cdef const unsigned char* v
    cdef tuple item
    cdef bytes name, value
    cdef char* w
    cdef bytes out
    try:
        if nh > STACK_HEADERS:
            keep = <char*>PyMem_Malloc(nh)
            if keep == NULL:
                raise MemoryError()
        # 1. tokens of every Connection field (RFC 9110 §7.6.1: those fields are hop-by-hop)
        for i in range(nh):
            item = <tuple>headers[i]
            name = <bytes>item[0]
            if PyBytes_GET_SIZE(name) != 10 or not _ieq(
                    <const unsigned char*>PyBytes_AS_STRING(name), 10, b"connection", 10):
                continue
            value = <bytes>item[1]
            v = <const unsigned char*>PyBytes_AS_STRING(value)
            vn = PyBytes_GET_SIZE(value)
            k = 0
            while k <= vn:
                e = k
                while e < vn and v[e] != 44:
                    e += 1
                p = v + k
                nn = e - k
                while nn and _is_ows(p[0]):
                    p += 1
                    nn -= 1
                while nn and _is_ows(p[nn - 1]):
                    nn -= 1
                if nn:
                    if ntok == tok_cap:
                        toks = _grow_slices(toks, tok_stack, tok_cap)
                        tok_cap *= 2
                    toks[ntok].p = p
                    toks[ntok].n = nn
                    ntok += 1
                k = e + 1
        # 2. decide and size
        if is_request:
            size = PyBytes_GET_SIZE(method) + 1 + PyBytes_GET_SIZE(target) + 11
        else:
            size = 15 + PyBytes_GET_SIZE(reason)
        for i in range(nh):
            item = <tuple>headers[i]
            name = <bytes>item[0]
            p = <const unsigned char*>PyBytes_AS_STRING(name)
            nn = PyBytes_GET_SIZE(name)
            if nn == 7 and _ieq(p, 7, b"upgrade", 7):
                keep[i] = keep_upgrade   # hop-by-hop unless this is an upgrade
            else:
                keep[i] = not (_is_hop(p, nn) or _in_slices(p, nn, toks, ntok, False)
                               or _in_slices(p, nn, drops, ndrop, True))
            if keep[i]:
                size += nn + PyBytes_GET_SIZE(<bytes>item[1]) + 4
        for i in range(nextra):
            size += extra[i].name_n + extra[i].value_n + 4
        size += 2 + tail_n
        # 3. fill one bytes object
        out = PyBytes_FromStringAndSize(NULL, size)
        w = PyBytes_AS_STRING(out)
        if is_request:
            w = _put(w, PyBytes_AS_STRING(method), PyBytes_GET_SIZE(method))
            w = _put(w, b" ", 1)
            w = _put(w, PyBytes_AS_STRING(target), PyBytes_GET_SIZE(target))
            w = _put(w, b" HTTP/1.1\r\n", 11)
        else:
            w = _put_status_line(w, status, reason)
        for i in range(nh):
            if keep[i]:
                item = <tuple>headers[i]
                name = <bytes>item[0]
                value = <bytes>item[1]
                w = _put(w, PyBytes_AS_STRING(name), PyBytes_GET_SIZE(name))
                w = _put(w, b": ", 2)
                w = _put(w, PyBytes_AS_STRING(value), PyBytes_GET_SIZE(value))
                w = _put(w, b"\r\n", 2)
        for i in range(nextra):
            w = _put(w, extra[i].name, extra[i].name_n)
            w = _put(w, b": ", 2)
            w = _put(w, extra[i].value, extra[i].value_n)
            w = _put(w, b"\r\n", 2)
        w = _put(w, b"\r\n", 2)
        if tail_n:
            _put(w, tail, tail_n)
        return out
    finally:
        if keep != keep_stack:
            PyMem_Free(keep)
        if toks != tok_stack:
            PyMem_Free(toks)


cdef bytes _proxy_head_py(bint is_request, int status, bytes reason, bytes method,
                          bytes target, list headers, bint keep_upgrade, object drop,
                          object extra):
    """_proxy_head for Python callers: ``drop`` any iterable of lowercase bytes names,
    ``extra`` an iterable of (name, value) pairs, validated here."""
    cdef Slice drop_stack[STACK_TOKENS]
    cdef Field extra_stack[STACK_TOKENS]
    cdef Slice* drops = drop_stack
    cdef Field* fields = extra_stack
    cdef Py_ssize_t ndrop = 0, nextra, i
    cdef list extra_fields = _checked_fields(extra) if extra else []
    cdef tuple item
    cdef bytes name, value
    nextra = len(extra_fields)
    try:
        if drop:
            if len(drop) > STACK_TOKENS:
                drops = <Slice*>PyMem_Malloc(len(drop) * sizeof(Slice))
                if drops == NULL:
                    raise MemoryError()
            for d in drop:
                if type(d) is bytes:
                    drops[ndrop].p = <const unsigned char*>PyBytes_AS_STRING(d)
                    drops[ndrop].n = PyBytes_GET_SIZE(d)
                    ndrop += 1
        if nextra > STACK_TOKENS:
            fields = <Field*>PyMem_Malloc(nextra * sizeof(Field))
            if fields == NULL:
                raise MemoryError()
        for i in range(nextra):
            item = <tuple>extra_fields[i]
            name = <bytes>item[0]
            value = <bytes>item[1]
            fields[i].name = PyBytes_AS_STRING(name)
            fields[i].name_n = PyBytes_GET_SIZE(name)
            fields[i].value = PyBytes_AS_STRING(value)
            fields[i].value_n = PyBytes_GET_SIZE(value)
        return _proxy_head(is_request, status, reason, method, target, headers,
                           keep_upgrade, drops, ndrop, fields, nextra, NULL, 0)
    finally:
        if drops != drop_stack:
            PyMem_Free(drops)
        if fields != extra_stack:
            PyMem_Free(fields)


cdef Slice* _grow_slices(Slice* cur, Slice* stack, Py_ssize_t cap) except NULL:
    cdef Slice* nb = <Slice*>PyMem_Malloc(cap * 2 * sizeof(Slice))
    if nb == NULL:
        raise MemoryError()
    memcpy(nb, cur, cap * sizeof(Slice))
    if cur != stack:
        PyMem_Free(cur)
    return nb


def proxy_request_head(RequestHead head, target, drop, extra):
    """The upstream request head for ``head``: ``METHOD target HTTP/1.1``, then head.headers
    minus hop-by-hop fields, fields named by Connection, Content-Length and names in ``drop``
    (lowercase); Upgrade is kept when ``head.upgrade``; then ``extra`` (validated). Raises
    ValueError for an invalid target or extra field."""
    cdef bytes t = _as_bytes(target)
    if _bad_target(t):
        raise ValueError(f"invalid request target: {t!r}")
    return _proxy_head_py(True, 0, None, head.method, t, head.headers, head.upgrade, drop,
                          extra)


def proxy_response_head(ResponseHead head, drop, extra):
    """The downstream response head for ``head``: ``HTTP/1.1 status reason``, fields as in
    proxy_request_head; Upgrade is kept for 101."""
    cdef bytes r = _checked_reason(head.status, head.reason)
    return _proxy_head_py(False, head.status, r, None, None, head.headers,
                          head.status == 101, drop, extra)
