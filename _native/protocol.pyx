# cython: boundscheck=False, wraparound=False, cdivision=True
#
# The proxy's protocol objects, compiled twin of dispa/proxy/session.py (Session) and
# dispa/proxy/pool.py (UpstreamConnection, Pool); included into _hotpath after the HTTP/1.1
# parser and writer, whose cdef classes and helpers it calls directly.
#
# Theory of operation
# -------------------
# The rules, states and retries are those of session.py and pool.py (read their docstrings
# first; they are the executable spec). What differs is only how the work is done:
#
# Rule 1: C state. States, flags, counters and deadlines are C fields; internal steps are
# cdef methods; only the asyncio callbacks and what the worker, the sweeper and the tests
# call are def/cpdef. The classes are final, so cpdef calls from here are C calls.
# Rule 2: no Python calls into the codec. The parser is driven through its cdef twins
# (_feed, _next, _body_available/_consume_body); heads are built by _proxy_head from C arrays
# of fields, so the common request (no trusted forwarding headers, no prior Via) allocates no
# list or tuple here: the forwarding fields are composed in a stack buffer.
# Rule 3: one write per direction per message, as in session.py. A Content-Length body that
# arrived with the response head is copied straight from the parser's buffer into the bytes
# object of the head (no DATA event, no intermediate bytes).
# Rule 4: the clock is CLOCK_MONOTONIC via clock_gettime, the clock of time.monotonic(), which
# the worker's sweeper compares ``deadline`` with.
# Rule 5: a Runtime is read through a _RuntimeView (C doubles, bound methods), rebuilt only
# when the worker swaps its runtime; like session.py, a request keeps the view current at its
# head, and keep-alive/header timeouts use the view current when they start.
#
# Anything unusual (trusted peers, prior Via, very long Host values, local answers, errors)
# takes the same Python-level path as session.py, so both twins produce the same bytes.
#
# WARNING: mirrors dispa/proxy/session.py and dispa/proxy/pool.py; change them together.
# tests/unit/proxy/test_protocol_twins.py compares the bytes both twins write.

import asyncio
import logging
import os
import socket

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from cpython.unicode cimport PyUnicode_AsUTF8AndSize
from libc.string cimport memchr, memcpy
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec

from dispa.errors import UpstreamError
from dispa.observability.exchange import make_exchange
from dispa.proxy.forwarding import BadTarget, forwarding_headers, split_absolute_form

cdef extern from "Python.h":
    int PyUnicode_IS_ASCII(object o)

log = logging.getLogger("dispa.proxy")

cdef enum:
    # Session states (session.py IDLE...CLOSED)
    ST_IDLE = 0
    ST_CONNECTING = 1
    ST_PROXYING = 2
    ST_TUNNEL = 3
    ST_CLOSED = 4

cdef enum:
    # response body modes towards the client (session.py R_*)
    R_NONE = 0
    R_LENGTH = 1
    R_CHUNKED = 2
    R_CLOSE = 3

cdef enum:
    MAX_PENDING_BYTES = 256 * 1024
    MAX_HELD_BYTES = 64 * 1024
    WRITE_HIGH_WATER = 256 * 1024
    FWD_SCRATCH = 512   # forwarding values composed on the stack; longer ones: Python path

IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})
cdef frozenset py_DROP_RESPONSE = frozenset({b"x-request-id"})

cdef dict py_REASONS = {
    400: b"Bad Request", 404: b"Not Found", 408: b"Request Timeout", 413: b"Content Too Large",
    414: b"URI Too Long", 421: b"Misdirected Request", 431: b"Request Header Fields Too Large",
    500: b"Internal Server Error", 501: b"Not Implemented", 502: b"Bad Gateway",
    503: b"Service Unavailable", 504: b"Gateway Timeout", 505: b"HTTP Version Not Supported",
    403: b"Forbidden", 200: b"OK", 201: b"Created", 202: b"Accepted", 204: b"No Content",
    301: b"Moved Permanently", 302: b"Found", 303: b"See Other", 304: b"Not Modified",
    307: b"Temporary Redirect", 308: b"Permanent Redirect", 401: b"Unauthorized",
    405: b"Method Not Allowed", 409: b"Conflict", 410: b"Gone", 429: b"Too Many Requests",
}
cdef bytes py_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
cdef frozenset _FRAMING = frozenset({b"content-length", b"transfer-encoding", b"connection",
                                     b"keep-alive", b"x-request-id"})
cdef bytes py_LAST_CHUNK = LAST_CHUNK

# The response drop set as C slices (lowercase), for _proxy_head; requests use the
# per-runtime _RuntimeView.drop (it includes the configured request-id header).
cdef Slice DROP_RESPONSE[1]


cdef void _init_drop_slices():
    # WARNING: the same names as py_DROP_RESPONSE
    DROP_RESPONSE[0].p = <const unsigned char*>b"x-request-id"
    DROP_RESPONSE[0].n = 12


_init_drop_slices()   # the names are interned constants of this module: they outlive it


cdef inline double _now() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <double>ts.tv_sec + <double>ts.tv_nsec * 1e-9


cdef inline Py_ssize_t _fmt_int(long long v, char* out) noexcept:
    """Decimal digits of v >= 0 into out (24 bytes); returns the length."""
    cdef char tmp[24]
    cdef Py_ssize_t n = 0, i
    if v == 0:
        out[0] = 48
        return 1
    while v:
        tmp[n] = <char>(48 + v % 10)
        v //= 10
        n += 1
    for i in range(n):
        out[i] = tmp[n - 1 - i]
    return n


cdef inline void _field(Field* f, const char* name, Py_ssize_t name_n, const char* value,
                        Py_ssize_t value_n) noexcept:
    f.name = name
    f.name_n = name_n
    f.value = value
    f.value_n = value_n


cdef inline bint _ascii(bytes b) noexcept:
    cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(b)
    cdef Py_ssize_t i
    for i in range(PyBytes_GET_SIZE(b)):
        if p[i] >= 0x80:
            return False
    return True


cdef inline bint _has_body(RequestHead head) noexcept:
    return head.chunked or head.content_length > 0


cdef inline str _method_str(bytes method):
    # the interned method objects of the parser map to constant strs (no decode per request)
    if method is py_GET:
        return "GET"
    if method is py_POST:
        return "POST"
    if method is py_HEAD:
        return "HEAD"
    return method.decode("latin-1")


# -- request ids ----------------------------------------------------------------------------

@cython.final
cdef class RequestIds:
    """``RequestIds(prefix)()`` -> ``prefix`` + the next counter value in lowercase hex, as
    bytes (the ids of dispa.server.worker.DataPlane.next_request_id: counter from 1). A
    worker that binds one as its ``next_request_id`` saves the compiled Session a Python call
    per request without a client-supplied id."""

    def __init__(self, prefix):
        self.prefix = prefix.encode("latin-1") if isinstance(prefix, str) else bytes(prefix)
        self.counter = 0

    def __call__(self):
        return self._next()

    cdef bytes _next(self):
        cdef char digits[16]
        cdef Py_ssize_t n = 0, k = PyBytes_GET_SIZE(self.prefix)
        cdef unsigned long long v
        self.counter += 1
        v = self.counter
        while v:
            digits[n] = b"0123456789abcdef"[v & 15]
            v >>= 4
            n += 1
        out = PyBytes_FromStringAndSize(NULL, k + n)
        cdef char* w = PyBytes_AS_STRING(out)
        memcpy(w, PyBytes_AS_STRING(self.prefix), k)
        w += k
        while n:
            n -= 1
            w[0] = digits[n]
            w += 1
        return out


# -- tracing gates (dispa/observability/tracing_gate.py, the executable spec) ---------------

cdef unsigned long long _tg_state = 1
cdef enum:  # tracing_gate.SKIP, PARENT, DRAWN
    _TG_SKIP = 0
    _TG_PARENT = 1
    _TG_DRAWN = 2


cdef inline unsigned long long _tg_draw() noexcept:
    """xorshift64*: tracing_gate.draw, the low 64 bits of a new trace id."""
    global _tg_state
    cdef unsigned long long x = _tg_state
    x ^= x >> 12
    x ^= x << 25
    x ^= x >> 27
    _tg_state = x
    return x * <unsigned long long>0x2545F4914F6CDD1D


def trace_gate_seed(value):
    """Reset the gate's generator (tests; tracing_gate.seed is the pure twin's)."""
    global _tg_state
    cdef unsigned long long x = int(value) & 0xFFFFFFFFFFFFFFFF
    _tg_state = x if x else <unsigned long long>0x9E3779B97F4A7C15


def _tg_reseed():
    trace_gate_seed(int.from_bytes(os.urandom(8), "little"))


_tg_reseed()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_tg_reseed)  # each worker draws its own ids


cdef int _gates_of(_RuntimeView v, object rt) except -1:
    pipeline = rt.pipeline
    gate = getattr(pipeline, "trace_gate", None) if pipeline is not None else None
    v.trace_gate = gate
    v.tg_n = 0
    v.tg_new = False
    v.tg_allow = v.tg_ctx = None
    if gate is not None:
        v.tg_new = gate.new_traces
        v.tg_allow = gate.allow
        v.tg_bound = gate.bound
        from dispa.observability.tracing_context import TraceContext
        v.tg_ctx = TraceContext
        for name in gate.names[:3]:  # TraceGate.names is a tuple of bytes: it outlives v
            v.tg_names[v.tg_n].p = <const unsigned char*>PyBytes_AS_STRING(name)
            v.tg_names[v.tg_n].n = PyBytes_GET_SIZE(name)
            v.tg_n += 1
    v.ro_run = v.ro_request = v.ro_cls = None
    if pipeline is not None and pipeline.request_only:
        from dispa.plugins import api as _api
        from dispa.proxy import pipeline as _pipeline_mod
        v.ro_run = pipeline.global_run
        v.ro_request = pipeline._request
        v.ro_hostnames = pipeline.hostnames
        v.ro_methods = _pipeline_mod._METHODS
        v.ro_cls = _api.Request
        global _NO_PARAMS
        _NO_PARAMS = _api._NO_PARAMS
    v.ts_sink = v.ts_queue = v.ts_wake = v.ts_build = None
    ts = getattr(rt, "trace_sink", None)
    b = getattr(ts, "batcher", None)
    q = getattr(b, "queue", None)
    if q is not None:
        # SpanBatcher.put_deferred's fields (TracingSink.put_started in C, _trace_put)
        v.ts_sink = ts
        v.ts_queue = q
        v.ts_max = b.max_queue_size
        v.ts_batch = b.max_batch
        v.ts_wake = b.kick
        v.ts_build = ts._started_spans
    lg = getattr(rt, "log_gate", None)
    v.log_gate = lg
    if lg is not None:
        v.lg_errors = lg.errors
        v.lg_slow = lg.slow
        v.lg_key = lg.ctx_key
    return 0


cdef int _tg_check(_RuntimeView v, list headers) except -1:
    """TraceGate.check in C: _TG_PARENT for a propagation header, _TG_DRAWN for a draw below
    the ratio bound (left in the gate), else _TG_SKIP."""
    cdef Py_ssize_t i, j, n
    cdef tuple item
    cdef bytes k
    cdef unsigned long long low
    for i in range(len(headers)):
        item = <tuple>headers[i]
        k = <bytes>item[0]
        n = PyBytes_GET_SIZE(k)
        for j in range(v.tg_n):
            if _ieq(<const unsigned char*>PyBytes_AS_STRING(k), n,
                    <const char*>v.tg_names[j].p, v.tg_names[j].n):
                return _TG_PARENT
    low = _tg_draw()
    if low < v.tg_bound:
        v.trace_gate.low = low
        return _TG_DRAWN
    return _TG_SKIP


cdef inline unsigned long long _tg_nonzero() noexcept:
    cdef unsigned long long x = _tg_draw()
    while not x:
        x = _tg_draw()
    return x


cdef char* _HEXDIGITS = b"0123456789abcdef"


cdef inline void _hex16(char* w, unsigned long long x) noexcept:
    cdef int i
    for i in range(15, -1, -1):
        w[i] = _HEXDIGITS[x & 15]
        x >>= 4


cdef object _tg_start(_RuntimeView v, unsigned long long low):
    """TraceGate.start in C: the rate limit, then the ids from the gate's generator; the
    (TraceContext, traceparent value) pair, or None."""
    cdef char tp[55]
    if v.tg_allow is not None and not v.tg_allow():
        return None
    cdef unsigned long long high = _tg_nonzero()
    cdef unsigned long long server = _tg_nonzero()
    cdef unsigned long long client = _tg_nonzero()
    trace_hi = high  # Python ints from here: the trace id has 128 bits
    trace_lo = low
    tc = v.tg_ctx((trace_hi << 64) | trace_lo, 0, server, client, True)
    memcpy(tp, b"00-", 3)
    _hex16(tp + 3, high)
    _hex16(tp + 19, low)
    tp[35] = 45  # '-'
    _hex16(tp + 36, client)
    memcpy(tp + 52, b"-01", 3)
    return tc, PyBytes_FromStringAndSize(tp, 55)


cdef object _run_sync_hooks(object runner, object req):
    """SyncRunner.__call__ (dispa/plugins/chain.py, the spec) in C: the same counting, the
    same 1-in-16 timed run, the same calls back into the runner when a hook answers or
    raises."""
    cdef tuple fns = runner.fns
    cdef Py_ssize_t i
    t = runner.tick + 1
    runner.tick = t
    if not (t & 15):
        return runner._slow(req, (), 0)
    runner.runs += 1
    for i in range(len(fns)):
        try:
            r = fns[i](req)
        except Exception as exc:
            return runner._raised(req, i, exc)
        if r is not None:
            return runner._answered(i, r)
    return None


cdef object _NO_PARAMS = None  # dispa.plugins.api._NO_PARAMS (shared, never mutated)


cdef object _new_request(_RuntimeView v, RequestHead head, bytes host, bytes target,
                         str client_ip, bytes rid):
    """Pipeline._request + Request._of_head (dispa/proxy/pipeline.py, dispa/plugins/api.py:
    the spec, change them together) for a plain-HTTP request: the same fields, without
    their three Python frames (about 1 us per request with filters). A host or method not
    memoised yet takes the Python path, which memoises it."""
    hostname = v.ro_hostnames.get(host)
    method = v.ro_methods.get(head.method)
    if hostname is None or method is None:
        return v.ro_request(head, host, target, client_ip, rid)
    cls = v.ro_cls
    req = cls.__new__(cls)
    req.method = method
    req.host = hostname
    req.client_ip = client_ip
    req.scheme = "http"
    req.route = None
    req.cluster = ""
    req.endpoint = ""
    req.params = _NO_PARAMS
    req._p = None
    req._q = None
    req._head = (head, target, rid)
    req._lz = 0
    return req


cdef bint _req_untouched(object req) except -1:
    """Request.untouched (dispa/plugins/api.py, the spec) without a method call."""
    lz = req._lz
    if lz & 1 and (req._p is not req._path0 or req._q is not req._query0):
        return False
    if lz & 2 and req.headers.changed:
        return False
    return True


cdef bint _log_wanted(Session s, _RuntimeView v, int status) except -1:
    """Session._log_wanted in C: whether a log sink can use this exchange (LogGate)."""
    if v.lg_errors and status >= 500:
        return True
    if v.lg_slow > 0 and _now() - s.t0 >= v.lg_slow:
        return True
    if s.trace is not None:
        return True
    plan = s.plan
    if v.lg_key is not None and plan is not None:
        return plan.req.ctx.get(v.lg_key) is not None
    return False


# -- runtime view ----------------------------------------------------------------------------

cdef _RuntimeView py_view = None


cdef _RuntimeView _view_of(object server):
    """The _RuntimeView of ``server.runtime`` (cached for the last runtime and worker)."""
    global py_view
    cdef _RuntimeView v = py_view
    rt = server.runtime
    if v is not None and v.rt is rt and v.server is server:
        return v
    v = _RuntimeView.__new__(_RuntimeView)
    v.rt = rt
    v.server = server
    p = rt.proxy
    v.request_timeout = p.request_timeout_seconds
    v.keep_alive_timeout = p.keep_alive_timeout_seconds
    v.header_timeout = p.header_timeout_seconds
    v.rid_name = rt.request_id_header
    v.rid_name_ok = _all_tchar(<const unsigned char*>PyBytes_AS_STRING(v.rid_name),
                               PyBytes_GET_SIZE(v.rid_name)) if v.rid_name else True
    v.drop_request = rt.drop_request
    v.ndrop = 0
    for name in (b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"forwarded",
                 b"via", b"expect", v.rid_name, getattr(rt, "client_cert_header", None)):
        if name:  # v.rid_name and v.rt keep their bytes alive as long as the view
            v.drop[v.ndrop].p = <const unsigned char*>PyBytes_AS_STRING(name)
            v.drop[v.ndrop].n = PyBytes_GET_SIZE(name)
            v.ndrop += 1
    v.via = rt.via
    v.via_ok = not _any_bad_value(<const unsigned char*>PyBytes_AS_STRING(v.via),
                                  PyBytes_GET_SIZE(v.via))
    v.pipeline = rt.pipeline
    v.intercept_match = rt.intercept.match
    v.trusted_contains = rt.trusted.contains
    v.default_cluster = rt.default_cluster
    v.reject_status = rt.reject_status
    v.reject_body = rt.reject_body
    v.parser_kwargs = rt.parser_kwargs
    eps = rt.default_cluster.endpoints
    v.ep_timeouts = tuple([float(e.timeout_seconds) for e in eps])
    v.ep_ids = tuple([e.id for e in eps])
    # The worker's methods and metrics object are fixed for its life (DataPlane sets them once).
    v.next_request_id = server.next_request_id
    v.domain_label = server.domain_label
    v.observe_request = server.metrics.observe_request
    v.observe_upstream = server.metrics.observe_upstream
    v.log_exchange = getattr(rt, "log_exchange", None)
    _gates_of(v, rt)
    py_view = v
    return v


@cython.final
cdef class _RuntimeView:
    pass


# -- the downstream session -------------------------------------------------------------------

@cython.final
@cython.freelist(32)
cdef class Session:
    """One client connection (compiled twin of dispa.proxy.session.Session)."""

    def __init__(self, server):
        self.server = server  # dispa.server.worker.DataPlane
        self.transport = None
        self.parser = None
        self.peer_ip = ""
        self.tls = None  # set by tls.handshake before connection_made on a TLS listener
        self.state = ST_IDLE
        self.deadline = 0.0  # monotonic; 0 = none. Checked by the server's sweeper.
        self.read_paused = False
        self.write_paused = False
        self.close_after = False
        self.requests = 0
        self.in_head = False
        self._reset_exchange()

    cdef int _reset_exchange(self) except -1:
        self.head = None
        self.rt = None
        self.cluster = None
        self.ep = -1
        self.ep_held = False
        self.tried = None
        self.upstream = None
        self.up_head = py_EMPTY
        self.pending = None
        self.pending_bytes = 0
        self.up_chunked = False
        self.req_complete = False
        self.body_sent = False
        self.resp_mode = R_NONE
        self.resp_started = False
        self.resp_status = 0
        self.keep_alive = False
        self.t0 = 0.0
        self.domain = ""
        self.rid = py_EMPTY
        self.connect_task = None
        self.continue_sent = False
        self.held_bytes = 0
        self.last_io = 0.0
        self.plan = None
        self.plan_wait = False
        self.resp_filter = False
        self._p_target = None
        self._p_host_hdr = None
        self._p_authority = None
        self.ep_timeouts = None
        self.ep_ids = None
        self._stash_rh = None
        self.set_cookie = None
        self.req_bytes = 0
        self.resp_bytes = 0
        self.attempts = None
        self.trace = None
        return 0

    cdef int _set_cluster(self, object cluster) except -1:
        self.cluster = cluster
        self.ep_timeouts = cluster.ep_timeouts
        self.ep_ids = cluster.ep_ids
        return 0

    # ------------------------------------------------------------------ accept phase
    def connection_made(self, transport):
        self.transport = transport
        server = self.server
        peer = transport.get_extra_info("peername")
        self.peer_ip = peer[0] if peer else ""
        cdef _RuntimeView v = _view_of(server)
        self.parser = RequestParser(**v.parser_kwargs)
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        server.sessions.add(self)
        self.deadline = _now() + v.keep_alive_timeout
        if server.draining:
            self.close_after = True

    def connection_lost(self, exc):
        cdef int prev = self.state
        self.state = ST_CLOSED
        if self.plan is not None and self.plan.task is not None and self.plan_wait:
            self.plan_wait = False
            self.plan.task.cancel()
        self.server.sessions.discard(self)
        if prev == ST_CONNECTING or prev == ST_PROXYING or prev == ST_TUNNEL:
            # Client went away mid-exchange: abort the upstream request, never pool it.
            if self.connect_task is not None:
                self.connect_task.cancel()
            up = self.upstream
            if up is not None:
                up.owner = None
                up.close()
            self._release_ep()
            if prev != ST_TUNNEL:
                self._log_request(499)
        self._reset_exchange()

    def pause_writing(self):
        self.write_paused = True
        if self.upstream is not None:
            self.upstream.pause_reading()

    def resume_writing(self):
        self.write_paused = False
        self.last_io = _now()
        if self.upstream is not None:
            self.upstream.resume_reading()

    cdef int _pause_reading(self) except -1:
        if not self.read_paused and self.state != ST_CLOSED:
            self.read_paused = True
            self.transport.pause_reading()
        return 0

    cdef int _resume_reading(self) except -1:
        if self.read_paused and self.state != ST_CLOSED:
            self.read_paused = False
            self.transport.resume_reading()
        return 0

    # ------------------------------------------------------------------ downstream bytes
    def data_received(self, data):
        cdef int st = self.state
        if st == ST_TUNNEL:
            self.upstream.transport.write(data)
            return
        if self.req_complete and st != ST_IDLE:
            # Rule 1 of session.py: pipelined bytes wait in the parser while the exchange runs.
            self.parser._feed(data)
            self.held_bytes += len(data)
            if self.held_bytes > MAX_HELD_BYTES:
                self._pause_reading()
            return
        if st == ST_IDLE and not self.in_head:
            # First bytes of a new request head: the header timeout starts now.
            self.in_head = True
            self.deadline = _now() + _view_of(self.server).header_timeout
        self.parser._feed(data)
        self._process()

    def eof_received(self):
        if self.state == ST_TUNNEL and self.upstream is not None:
            try:
                self.upstream.transport.write_eof()
            except (OSError, RuntimeError):
                self.upstream.close()
            return True
        if self.state == ST_IDLE:
            return False  # clean close between requests
        if self.req_complete:
            # The client closed while its response was pending: an abort (nginx without
            # proxy_ignore_client_abort).
            return False
        # Half-close mid-request: the parser decides whether the request was complete.
        self.parser.eof = True
        self._process()
        return True

    cdef int _process(self) except -1:
        cdef RequestParser parser = self.parser
        cdef int ev
        while self.state != ST_CLOSED:
            if self.req_complete and self.state != ST_IDLE:
                return 0  # a full request is in flight; the rest waits in the parser
            if self.plan_wait:
                return 0  # async request hooks are running; body bytes wait in the parser
            try:
                ev = parser._next()
            except ProtocolError as exc:
                self._protocol_error(exc)
                return 0
            if ev == EV_NEED_DATA:
                if parser.eof and self.state == ST_IDLE:
                    self._close()
                return 0
            if ev == EV_HEAD:
                self._on_head(<RequestHead>parser.head)
            elif ev == EV_DATA:
                chunk = parser._data
                parser._data = py_EMPTY
                self._on_body(chunk)
            elif ev == EV_END:
                self._on_body_end()
            elif ev == EV_UPGRADE:
                # The request head was handled; further bytes belong to the tunnel.
                self.req_complete = True
                return 0
        return 0

    # ------------------------------------------------------------------ request phases
    cdef int _on_head(self, RequestHead head) except -1:
        cdef object server = self.server
        cdef _RuntimeView rt = _view_of(server)
        cdef bytes target, host, rid
        cdef object host_hdr
        self.rt = rt
        self.head = head
        self.in_head = False
        self.t0 = _now()
        self.requests += 1
        self.req_complete = False
        self.deadline = self.t0 + rt.request_timeout
        if server.slowdown_us:
            server.busy_wait()

        # request id: propagate a sane incoming one, else generate
        if rt.rid_name:
            rid = _get(head.headers, rt.rid_name, False)
            if rid is None or PyBytes_GET_SIZE(rid) > 200 or not _ascii(rid):
                gen = rt.next_request_id
                rid = (<RequestIds>gen)._next() if type(gen) is RequestIds else gen()
            self.rid = rid

        # route: domain interception. Absolute-form targets carry the authority (RFC 9112 §3.2.2).
        target = head.target
        host_hdr = _get(head.headers, b"host", False)
        host = host_hdr or py_EMPTY
        authority = None
        if PyBytes_GET_SIZE(target) == 0 or \
                (<const unsigned char*>PyBytes_AS_STRING(target))[0] != 47:  # not "/..."
            try:
                authority, target = split_absolute_form(target)
            except BadTarget as exc:
                self.domain = "-"
                return self._respond_local(400, f"bad request: {exc}\n".encode(), True)
            if authority is not None:
                host = authority
        # domain_label and intercept.match are memoised functions of (worker, runtime, raw
        # Host): a connection remembers its last Host value and skips both calls
        if self._memo_rt is not rt:
            self._memo_rt = rt
            self._memo_host = None
            self._memo_trusted = rt.trusted_contains(self.peer_ip)
        if self._memo_host is None or not (self._memo_host == host):
            self._memo_domain = rt.domain_label(host)
            self._memo_match = rt.intercept_match(host)
            self._memo_host = host
        self.domain = self._memo_domain
        pipeline = rt.pipeline
        if not self._memo_match and (pipeline is None or not pipeline.before_intercept):
            self._respond_local(rt.reject_status, rt.reject_body, _has_body(head))
            return 0

        self.keep_alive = head.keep_alive and not self.close_after
        self._set_cluster(rt.default_cluster)
        cdef int passed = _TG_SKIP
        cdef list headers
        if rt.trace_gate is not None and self._memo_match:
            passed = _tg_check(rt, head.headers)
            if passed == _TG_DRAWN and rt.tg_new and not self._memo_trusted:
                # a new trace with only traceparent to write: no pipeline (tracing_gate.py)
                started = _tg_start(rt, rt.trace_gate.take())
                if started is None:
                    passed = _TG_SKIP  # the rate limit said no: an untraced request
                else:
                    self.trace = (<tuple>started)[0]
                    headers = list(head.headers)
                    headers.append((b"traceparent", (<tuple>started)[1]))
                    self.up_head = self._upstream_head(head, target, host_hdr, authority,
                                                       headers)
                    return self._choose_and_connect()
        if pipeline is not None and (rt.trace_gate is None or not self._memo_match
                                     or passed != _TG_SKIP):
            # routing rules and filters (phases 3-6): the pipeline decides, maybe later.
            # (Tracing alone: the requests its gate passes, observability/tracing_gate.py,
            # and hosts outside the interception, which the pipeline rejects.)
            if (rt.ro_run is not None and self._memo_match and not self._memo_trusted
                    and self.tls is None):
                # Pipeline.start's request-only branch for the common case (intercepted,
                # plain HTTP, no X-Forwarded-For to resolve), minus its Python frames
                req = _new_request(rt, head, host, target, self.peer_ip, self.rid)
                r = _run_sync_hooks(rt.ro_run, req)
                if r is None and _req_untouched(req):
                    plan = None
                else:
                    plan = pipeline.request_only_plan(self, head, host, target, True,
                                                      self.peer_ip, self.rid, req, r)
            else:
                plan = pipeline.start(self, head, host, target, self._memo_match,
                                      self.peer_ip, self.rid)
            if plan is not None:
                self.plan = plan
                self._p_target = target
                self._p_host_hdr = host_hdr
                self._p_authority = authority
                if plan.task is not None:
                    self.plan_wait = True
                    self.state = ST_CONNECTING
                    self._pause_reading()
                    plan.task.add_done_callback(self._plan_done)
                    return 0
                return self._plan_continue()

        # upstream request head (phase 6): downstream headers minus hop-by-hop, plus ours
        self.up_head = self._upstream_head(head, target, host_hdr, authority, None)
        return self._choose_and_connect()

    def _plan_done(self, task):
        """The async request phase ended (callback of plan.task)."""
        if self.plan is None or self.plan.task is not task or not self.plan_wait:
            return  # the client left, or a timeout answered already
        self.plan_wait = False
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            log.error("request phase failed: %r", exc)
            self.state = ST_IDLE
            self._respond_local(500, b"internal error\n", True)
            return
        self._resume_reading()
        self._plan_continue()
        if self.state != ST_CLOSED:
            self._process()  # body bytes that arrived meanwhile

    cdef int _plan_continue(self) except -1:
        """The request phase is done: answer, or build the upstream head and connect."""
        plan = self.plan
        resp = plan.response
        if resp is not None:
            self.state = ST_IDLE
            return self._respond_response(resp)
        if plan.cluster is not None:
            self._set_cluster(plan.cluster)
        target = plan.target if plan.target is not None else self._p_target
        self.up_head = self._upstream_head(self.head, target, self._p_host_hdr,
                                           self._p_authority, plan.headers)
        self.resp_filter = plan.body_hooks
        mirror = plan.mirror
        if mirror is not None:
            mirror.send_head(self.up_head, self.peer_ip)
            if not _has_body(self.head):
                mirror.end()
        self.state = ST_IDLE
        return self._choose_and_connect()

    cdef bytes _upstream_head(self, RequestHead head, bytes target, object host_hdr,
                              object authority, list override):
        """session.py's forwarding_headers + extra + proxy_request_head, without Python
        objects in the common case."""
        cdef _RuntimeView rt = self.rt
        cdef Field f[10]
        cdef char scratch[FWD_SCRATCH]
        cdef char cl_digits[24]
        cdef Py_ssize_t nf = 0, peer_n = 0, host_n = 0, via_n = 0, i, need
        cdef const char* peer = NULL
        cdef const char* host_p
        cdef char* w
        cdef char* fwd
        cdef bint quotable, bracket
        cdef bytes via = rt.via
        cdef str peer_ip = self.peer_ip
        cdef tuple item
        cdef list headers = override if override is not None else head.headers
        trusted = self._memo_trusted   # rt.trusted.contains(peer_ip), memoised in _on_head
        fast = (authority is None and not trusted and rt.via_ok and rt.rid_name_ok
                and PyUnicode_IS_ASCII(peer_ip) and self.tls is None)
        if fast and via:
            # a Via chain from the client is extended (forwarding.py): Python path
            for i in range(len(headers)):
                item = <tuple>headers[i]
                if PyBytes_GET_SIZE(<bytes>item[0]) == 3 and _ieq(
                        <const unsigned char*>PyBytes_AS_STRING(<bytes>item[0]), 3, b"via", 3):
                    fast = False
                    break
        if fast:
            host_n = PyBytes_GET_SIZE(host_hdr) if host_hdr is not None else 0
            peer = PyUnicode_AsUTF8AndSize(peer_ip, &peer_n)
            via_n = PyBytes_GET_SIZE(via)
            need = 4 + peer_n + 4 + 11 + host_n + 8 + 4 + via_n
            fast = need <= FWD_SCRATCH
        if not fast:
            # the reference path (session.py, line for line)
            tls = self.tls
            extra = forwarding_headers(head, peer_ip, trusted, via,
                                       b"http" if tls is None else b"https", host=authority)
            if tls is not None and tls.headers:
                extra += tls.headers  # the client certificate (tls/mtls.py)
            drop = rt.drop_request
            if authority is not None:
                # absolute form: the target's authority replaces Host (RFC 9112 §3.2.2)
                extra.insert(0, (b"Host", authority))
                drop = drop | {b"host"}
            if rt.rid_name:
                extra.append((rt.rid_name, self.rid))
            if head.chunked:
                extra.append((b"Transfer-Encoding", b"chunked"))
                self.up_chunked = True
            elif head.content_length >= 0:
                extra.append((b"Content-Length", str(head.content_length).encode()))
            if head.upgrade:
                extra.append((b"Connection", b"upgrade"))
            return proxy_request_head(head, target, drop, extra)

        if _bad_target(target):
            raise ValueError(f"invalid request target: {target!r}")
        # forwarding.py for an untrusted peer: fresh X-Forwarded-*, Forwarded, Via
        host_p = PyBytes_AS_STRING(host_hdr) if host_n else NULL
        _field(&f[0], b"X-Forwarded-For", 15, peer, peer_n)
        _field(&f[1], b"X-Forwarded-Proto", 17, b"http", 4)
        nf = 2
        if host_n:
            _field(&f[nf], b"X-Forwarded-Host", 16, host_p, host_n)
            nf += 1
        # RFC 7239 §6: IPv6 addresses are bracketed and the whole node quoted.
        bracket = memchr(peer, 58, peer_n) != NULL
        w = fwd = scratch
        w = _put(w, b"for=", 4)
        if bracket:
            w = _put(w, b'"[', 2)
        w = _put(w, peer, peer_n)
        if bracket:
            w = _put(w, b']"', 2)
        w = _put(w, b";proto=http", 11)
        quotable = host_n and memchr(host_p, 34, host_n) == NULL \
            and memchr(host_p, 92, host_n) == NULL
        if quotable:
            w = _put(w, b';host="', 7)
            w = _put(w, host_p, host_n)
            w = _put(w, b'"', 1)
        _field(&f[nf], b"Forwarded", 9, fwd, w - fwd)
        nf += 1
        if via_n:
            fwd = w
            w = _put(w, b"1.1 " if head.version == 11 else b"1.0 ", 4)
            w = _put(w, PyBytes_AS_STRING(via), via_n)
            _field(&f[nf], b"Via", 3, fwd, w - fwd)
            nf += 1
        if rt.rid_name:
            if _any_bad_value(<const unsigned char*>PyBytes_AS_STRING(self.rid),
                              PyBytes_GET_SIZE(self.rid)):
                raise ValueError(f"invalid header value: {self.rid!r}")
            _field(&f[nf], PyBytes_AS_STRING(rt.rid_name), PyBytes_GET_SIZE(rt.rid_name),
                   PyBytes_AS_STRING(self.rid), PyBytes_GET_SIZE(self.rid))
            nf += 1
        if head.chunked:
            _field(&f[nf], b"Transfer-Encoding", 17, b"chunked", 7)
            nf += 1
            self.up_chunked = True
        elif head.content_length >= 0:
            _field(&f[nf], b"Content-Length", 14, cl_digits,
                   _fmt_int(head.content_length, cl_digits))
            nf += 1
        if head.upgrade:
            _field(&f[nf], b"Connection", 10, b"upgrade", 7)
            nf += 1
        return _proxy_head(True, 0, None, head.method, target, headers, head.upgrade,
                           rt.drop, rt.ndrop, f, nf, NULL, 0)

    cdef int _choose_and_connect(self) except -1:
        cdef object cluster = self.cluster
        cdef Py_ssize_t i
        cdef double ep_timeout, a, b, timeout
        cdef Pool pool
        cdef UpstreamConnection conn
        i = cluster.pick(self.peer_ip, self.tried, self.head)
        if cluster.tracks and cluster.sticky_policy is not None:
            self.set_cookie = cluster.take_cookie()
        if i < 0:
            self._respond_local(503, b"upstream circuit open\n" if i == -2 else
                                b"no upstream endpoint available\n", not self.req_complete)
            return 0
        self.ep = i
        cluster.selector.acquire(i)
        self.ep_held = True
        if self.rt.log_exchange is not None:
            self.t_up = _now()
        # the endpoint's timeout bounds the whole upstream exchange, within the request timeout
        ep_timeout = <double>self.ep_timeouts[i]   # cluster.endpoints[i].timeout_seconds
        a = self.t0 + self.rt.request_timeout
        b = _now() + ep_timeout
        self.deadline = b if b < a else a
        pool = <Pool?>cluster.pools[i]
        conn = pool.take_idle()
        if conn is not None:
            return self._attach(conn)
        self.state = ST_CONNECTING
        timeout = pool.spec.connect_timeout_seconds
        if ep_timeout < timeout:
            timeout = ep_timeout
        self.connect_task = asyncio.ensure_future(self._connect(pool, timeout))
        return 0

    async def _connect(self, Pool pool, double timeout):
        try:
            conn = await pool.connect(timeout)
        except UpstreamError as exc:
            self.connect_task = None
            if self.state != ST_CONNECTING:
                return
            self._upstream_failed(exc, True, False)
            return
        except asyncio.CancelledError:
            return
        self.connect_task = None
        if self.state != ST_CONNECTING:
            conn.close()  # the client left while we were connecting
            return
        self._attach(conn)

    cdef int _attach(self, UpstreamConnection conn) except -1:
        cdef RequestHead head = self.head
        self.state = ST_PROXYING
        self.upstream = conn
        conn.owner = self
        conn.parser._method = head.method   # ResponseParser.expect()
        if head.expect_continue and not self.continue_sent and not self.req_complete:
            # We ask the client for its body ourselves; Expect was stripped upstream.
            self.continue_sent = True
            if head.version == 11:
                self.transport.write(py_CONTINUE)
        out = self.up_head
        if self.pending:
            out = py_EMPTY.join([out, *self.pending])
            self.pending = None
            self.pending_bytes = 0
            self.body_sent = True
            self._resume_reading()
        conn.transport.write(out)
        if conn.paused and not self.write_paused:
            conn.resume_reading()
        return 0

    cdef int _on_body(self, bytes chunk) except -1:
        if self.state == ST_IDLE:
            return 0  # body of a request we already answered locally (and will close)
        self.req_bytes += PyBytes_GET_SIZE(chunk)
        plan = self.plan
        if plan is not None:
            if plan.req_body_hooks:
                try:
                    chunk = plan.request_body(chunk, False)
                except Exception as exc:
                    return self._plan_body_error(exc)
                if not chunk:
                    return 0
            if plan.mirror is not None:
                plan.mirror.body(chunk)
        if self.up_chunked:
            chunk = _encode_chunk(chunk)
        if self.state == ST_PROXYING:
            self.body_sent = True
            self.last_io = _now()
            self.upstream.transport.write(chunk)
        else:
            if self.pending is None:
                self.pending = []
            self.pending.append(chunk)
            self.pending_bytes += PyBytes_GET_SIZE(chunk)
            if self.pending_bytes > MAX_PENDING_BYTES:
                self._pause_reading()
        return 0

    cdef int _on_body_end(self) except -1:
        if self.state == ST_IDLE:
            return 0  # the end of a request we already answered locally
        self.req_complete = True
        plan = self.plan
        if plan is not None:
            if plan.req_body_hooks:
                try:
                    tail = plan.request_body(py_EMPTY, True)
                except Exception as exc:
                    return self._plan_body_error(exc)
                if tail:
                    self._send_raw(_encode_chunk(tail) if self.up_chunked else tail)
            if plan.mirror is not None:
                plan.mirror.end()
        if self.state == ST_PROXYING and self.body_sent:
            # a request body is all sent: the endpoint's timeout for the response head starts
            # now (a long upload is limited by write_timeout progress instead)
            self.deadline = _now() + <double>self.ep_timeouts[self.ep]
        if self.up_chunked:
            trailers = self.parser.trailers
            if trailers:
                last = b"0\r\n" + b"".join([n + b": " + v + b"\r\n" for n, v in trailers]) \
                    + b"\r\n"
            else:
                last = py_LAST_CHUNK
            self._send_raw(last)
        return 0

    cdef int _send_raw(self, bytes data) except -1:
        if self.state == ST_PROXYING:
            self.body_sent = True  # the chunked terminator is body: no retry after it
            self.upstream.transport.write(data)
        else:
            if self.pending is None:
                self.pending = []
            self.pending.append(data)
        return 0

    def _plan_body_error(self, exc):
        """A request body hook refused the body (HTTPError) or failed with strategy fail:
        nothing more goes upstream; answer if no response started, else abort."""
        status = getattr(exc, "status", 500)
        if not isinstance(status, int) or not 400 <= status <= 599:
            status = 500
        up = self.upstream
        if up is not None:
            up.owner = None
            up.close()
            self.upstream = None
        if self.connect_task is not None:
            self.connect_task.cancel()
            self.connect_task = None
        self._release_ep()
        if self.resp_started:
            self._abort("request body refused by a filter")
            return 0
        self.state = ST_IDLE
        msg = getattr(exc, "message", "") or "request body refused"
        return self._respond_local(status, (msg + "\n").encode(), True)

    # ------------------------------------------------------------------ upstream events
    cdef int _emit(self, object piece) except -1:
        # collect the downstream bytes of one upstream read (written once by _flush)
        if self._outl is not None:
            self._outl.append(piece)
        elif self._out1 is not None:
            self._outl = [self._out1, piece]
            self._out1 = None
        else:
            self._out1 = piece
        return 0

    cdef int _flush(self) except -1:
        cdef object out1 = self._out1
        cdef list outl = self._outl
        self._out1 = None
        self._outl = None
        if outl is not None:
            self.transport.write(py_EMPTY.join(outl))
        elif out1 is not None:
            self.transport.write(out1)
        return 0

    def upstream_data(self, UpstreamConnection conn, data):
        self._upstream_data(conn, data)

    cdef int _upstream_data(self, UpstreamConnection conn, object data) except -1:
        cdef ResponseParser parser
        cdef int ev
        cdef bint finished = False
        if self.state == ST_TUNNEL:
            self.transport.write(data)
            return 0
        self.last_io = _now()
        parser = conn.parser
        parser._feed(data)
        self._out1 = None
        self._outl = None
        try:
            while True:
                ev = parser._next()
                if ev == EV_NEED_DATA:
                    break
                if ev == EV_DATA:
                    chunk = parser._data
                    parser._data = py_EMPTY
                    if self.resp_filter and self.resp_mode != R_NONE:
                        chunk = self.plan.response_body(chunk, False)
                        if not chunk:
                            continue
                    if self.resp_mode == R_CHUNKED:
                        self.resp_bytes += PyBytes_GET_SIZE(chunk)
                        self._emit(_encode_chunk(chunk))
                    elif self.resp_mode != R_NONE:
                        self.resp_bytes += PyBytes_GET_SIZE(chunk)
                        self._emit(chunk)
                elif ev == EV_HEAD:
                    r = self._on_response_head(<ResponseHead>parser.head, parser)
                    if r == 1:
                        continue
                    if r == 2:
                        # replaced by a filter, or waiting for async response hooks
                        self._flush()
                        return 0
                elif ev == EV_END:
                    if self.resp_status and self.resp_status < 200:
                        self.resp_status = 0  # interim response done; the final one follows
                        continue
                    if self.resp_filter and self.resp_mode != R_NONE:
                        tail = self.plan.response_body(py_EMPTY, True)
                        if tail:
                            self._emit(_encode_chunk(tail) if self.resp_mode == R_CHUNKED
                                       else tail)
                    if self.resp_mode == R_CHUNKED:
                        self._emit(py_LAST_CHUNK)
                    finished = True
                    break
                elif ev == EV_UPGRADE:
                    if self._outl is not None:
                        out = py_EMPTY.join(self._outl)
                    elif self._out1 is not None:
                        out = py_EMPTY.join([self._out1])
                    else:
                        out = py_EMPTY
                    self._out1 = None
                    self._outl = None
                    self.transport.write(out)
                    self._start_tunnel(parser.take_rest())
                    return 0
        except ProtocolError as exc:
            self._out1 = None
            self._outl = None
            self._upstream_failed(UpstreamError(f"invalid upstream response: {exc}"),
                                  False, True)
            return 0
        except Exception as exc:
            if self.plan is None:
                raise
            # a response filter failed with error strategy "fail"
            log.error("response filter failed: %r", exc)
            self._out1 = None
            self._outl = None
            self._upstream_failed(UpstreamError("response filter failed"), False, True)
            return 0
        self._flush()
        if finished:
            self._finish_exchange(conn, (<ResponseHead>parser.head).keep_alive)
        return 0

    cdef int _on_response_head(self, ResponseHead rh, ResponseParser parser) except -1:
        """Handle a response head: 1 for an interim (1xx) one, 2 when the response was
        replaced by a filter or waits for async response hooks, else 0."""
        cdef int status = rh.status
        cdef RequestHead head = self.head
        self.resp_status = status
        # the body streams as long as it makes progress: read_timeout between upstream reads
        self.deadline = _now() + <double>(<Pool>self.cluster.pools[self.ep]).spec.read_timeout_seconds
        if status < 200 and status != 101:
            # 1xx: forward to HTTP/1.1 clients (103 Early Hints), not to HTTP/1.0 ones.
            if head.version == 11 and status != 100:
                self._emit(_proxy_head(False, status, rh.reason, None, None, rh.headers,
                                       False, DROP_RESPONSE, 1, NULL, 0, NULL, 0))
            return 1
        plan = self.plan
        if plan is not None and plan.resp_hooks and status != 101:
            r = plan.response_head(status, rh.reason, rh.headers)
            if r is None:
                pass
            elif type(r) is tuple:
                return self._emit_response_head(rh, parser, r[0], r[1], r[2])
            elif isinstance(r, asyncio.Future):
                self._stash_rh = rh
                self.upstream.pause_reading()
                r.add_done_callback(self._resp_plan_done)
                return 2
            else:
                return self._replace_response(r)
        return self._emit_response_head(rh, parser, status, rh.reason, rh.headers)

    def _resp_plan_done(self, fut):
        """Async response hooks finished: send the (possibly edited) head, go on."""
        rh = self._stash_rh
        conn = self.upstream
        if rh is None or conn is None or self.state != ST_PROXYING or fut.cancelled():
            return  # the client or the upstream went away meanwhile
        self._stash_rh = None
        exc = fut.exception()
        r = None
        if exc is not None:
            log.error("response phase failed: %r", exc)
        else:
            r = fut.result()
        self._out1 = None
        self._outl = None
        if r is not None and type(r) is not tuple:
            self._replace_response(r)
            return
        if r is None:
            self._emit_response_head(<ResponseHead>rh, conn.parser, rh.status, rh.reason,
                                     rh.headers)
        else:
            self._emit_response_head(<ResponseHead>rh, conn.parser, r[0], r[1], r[2])
        self._flush()
        if not self.write_paused:
            conn.resume_reading()
        self._upstream_data(conn, py_EMPTY)  # what the parser already holds

    cdef int _replace_response(self, object resp) except -1:
        """A filter replaced the upstream's response: drop the upstream connection (its body
        is unread) and answer with ``resp``."""
        self._flush()
        up = self.upstream
        if up is not None:
            up.owner = None
            up.close()
            self.upstream = None
        self._release_ep()
        self.state = ST_IDLE
        self._respond_response(resp)
        return 2

    cdef int _emit_response_head(self, ResponseHead rh, ResponseParser parser, int status,
                                 bytes reason, list headers) except -1:
        cdef RequestHead head = self.head
        cdef Field f[4]
        cdef bytes cookie = self.set_cookie
        cdef Py_ssize_t nf = 0, tail_n = 0
        cdef char cl_digits[24]
        cdef const char* tail = NULL
        self.resp_status = status
        if status == 101:
            self.resp_mode = R_NONE
            _field(&f[nf], b"Connection", 10, b"upgrade", 7)
            nf += 1
        elif head.method == py_HEAD or status == 204 or status == 304:
            self.resp_mode = R_NONE
            if rh.content_length >= 0 and status != 204:
                _field(&f[nf], b"Content-Length", 14, cl_digits,
                       _fmt_int(rh.content_length, cl_digits))
                nf += 1
        elif rh.content_length >= 0 and not rh.chunked and not self.resp_filter:
            self.resp_mode = R_LENGTH
            _field(&f[nf], b"Content-Length", 14, cl_digits,
                   _fmt_int(rh.content_length, cl_digits))
            nf += 1
        elif head.version == 11:
            self.resp_mode = R_CHUNKED
            _field(&f[nf], b"Transfer-Encoding", 17, b"chunked", 7)
            nf += 1
        else:
            self.resp_mode = R_CLOSE
            self.keep_alive = False
        if status != 101:
            if not self.req_complete:
                # The upstream answered before the whole request arrived; we cannot
                # find the next request boundary reliably without reading it all.
                self.keep_alive = False
            if self.keep_alive and self.server.draining:
                self.keep_alive = False
            if not self.keep_alive:
                _field(&f[nf], b"Connection", 10, b"close", 5)
                nf += 1
            elif head.version == 10:
                _field(&f[nf], b"Connection", 10, b"keep-alive", 10)
                nf += 1
        if PyBytes_GET_SIZE(self.rid):
            _field(&f[nf], b"X-Request-Id", 12, PyBytes_AS_STRING(self.rid),
                   PyBytes_GET_SIZE(self.rid))
            nf += 1
        if cookie is not None and status != 101:
            _field(&f[nf], b"Set-Cookie", 10, PyBytes_AS_STRING(cookie),
                   PyBytes_GET_SIZE(cookie))
            nf += 1
        if self.resp_mode == R_LENGTH:
            # Rule 3: the body bytes already buffered go out in the same bytes object
            tail_n = parser._body_available()
            if tail_n:
                tail = <const char*>parser._buf + parser._start
        piece = _proxy_head(False, status, reason, None, None, headers, status == 101,
                            DROP_RESPONSE, 1, f, nf, tail, tail_n)
        if tail_n:
            parser._consume_body(tail_n)
            self.resp_bytes += tail_n
        self._emit(piece)
        self.resp_started = True
        return 0

    def upstream_lost(self, UpstreamConnection conn, exc):
        """The upstream connection closed while serving us."""
        self._upstream_lost(conn)

    cdef int _upstream_lost(self, UpstreamConnection conn) except -1:
        cdef ResponseParser parser
        cdef int ev
        cdef Pool pool
        cdef double timeout, ep_timeout
        if self.state == ST_TUNNEL:
            return self._close()
        if self.state != ST_PROXYING or conn is not self.upstream:
            return 0
        parser = conn.parser
        if self.resp_started:
            # Close-delimited body ends here; anything else was cut short.
            parser.eof = True
            try:
                ev = parser._next()
                while ev == EV_DATA:
                    chunk = parser._data
                    parser._data = py_EMPTY
                    self.transport.write(_encode_chunk(chunk) if self.resp_mode == R_CHUNKED
                                         else chunk)
                    ev = parser._next()
            except ProtocolError:
                ev = EV_NEED_DATA
            if ev == EV_END:
                if self.resp_mode == R_CHUNKED:
                    self.transport.write(py_LAST_CHUNK)
                return self._finish_exchange(conn, False)
            self._abort("upstream closed mid-response")
            return 0
        if (conn.reused and not self.body_sent and self.req_complete
                and self.head.method in IDEMPOTENT and self.resp_status == 0):
            # A pooled connection the server had already closed: retry on a fresh one.
            self.upstream = None
            self.state = ST_CONNECTING
            pool = <Pool?>self.cluster.pools[self.ep]
            ep_timeout = self.cluster.endpoints[self.ep].timeout_seconds
            timeout = pool.spec.connect_timeout_seconds
            if ep_timeout < timeout:
                timeout = ep_timeout
            self.connect_task = asyncio.ensure_future(self._connect(pool, timeout))
            return 0
        return self._upstream_failed(UpstreamError("upstream closed the connection"), False,
                                     False)

    def upstream_pause_writing(self):
        self._pause_reading()

    def upstream_resume_writing(self):
        if not (self.req_complete and self.state == ST_PROXYING):
            self._resume_reading()

    # ------------------------------------------------------------------ failures
    cdef int _upstream_failed(self, object exc, bint connect, bint bad_response) except -1:
        cluster = self.cluster
        cdef Py_ssize_t i = self.ep
        if i >= 0:
            self._release_ep()
            if connect:
                cluster.mark_failed(i)
                self.server.report_passive(cluster.name, cluster.endpoints[i].id,
                                           "connect_failed")
            if cluster.tracks:
                cluster.report(i, 0, _now() - self.t0)
            outcome = ("timeout" if exc.status_hint == 504 else
                       ("bad_response" if bad_response else
                        ("connect_error" if connect else "reset")))
            self.server.metrics.observe_upstream(cluster.endpoints[i].id, outcome,
                                                 _now() - self.t0)
            if self.rt is not None and self.rt.log_exchange is not None:
                if self.attempts is None:
                    self.attempts = []
                self.attempts.append((cluster.endpoints[i].id, self.t_up, _now(), outcome))
        up = self.upstream
        if up is not None:
            up.owner = None
            up.close()
            self.upstream = None
        if self.resp_started:
            self._abort(str(exc))
            return 0
        # Retry on another endpoint when nothing was sent (connect failure) and retries remain.
        if connect and exc.retryable and not self.body_sent:
            tried = self.tried or set()
            tried.add(i)
            self.tried = tried
            if len(tried) <= cluster.spec.max_retries and len(tried) < len(cluster.endpoints) \
                    and cluster.retry_allowed():
                self.server.metrics.inc("dispa_retries_total")
                self.ep = -1
                return self._choose_and_connect()
        return self._respond_local(exc.status_hint, (str(exc) + "\n").encode(),
                                   not self.req_complete)

    def on_deadline(self, now):
        """Called by the server's sweeper when ``deadline`` has passed."""
        cdef int st = self.state
        if st == ST_IDLE:
            if self.in_head:
                # A request head that is taking too long (slowloris): 408, then close.
                self.head = None
                self._respond_local(408, b"request head timeout\n", True)
            else:
                self._close()  # keep-alive idle timeout
            return
        cdef double limit = 0.0
        if st == ST_PROXYING:
            # Progress-based limits: a response body may take as long as it needs while bytes
            # keep moving (read_timeout between upstream reads, or while the client drains),
            # and so may a request body while the upstream keeps accepting it (write_timeout).
            spec = (<Pool>self.cluster.pools[self.ep]).spec
            what = None
            if self.resp_started:
                limit, what = spec.read_timeout_seconds, "upstream read timeout"
            elif not self.req_complete:
                limit, what = spec.write_timeout_seconds, "upstream write timeout"
            if limit:
                if now - self.last_io < limit:
                    self.deadline = self.last_io + limit
                    return
                self._upstream_failed(UpstreamError(what, status_hint=504), False, False)
                return
        if st == ST_CONNECTING and self.plan_wait:
            self.plan_wait = False
            self.plan.task.cancel()
            self.state = ST_IDLE
            self._respond_local(504, b"request phase timed out\n", True)
            return
        if st == ST_CONNECTING or st == ST_PROXYING:
            if self.connect_task is not None:
                self.connect_task.cancel()
                self.connect_task = None
            self._upstream_failed(UpstreamError("upstream timed out", status_hint=504),
                                  False, False)

    cdef int _protocol_error(self, object exc) except -1:
        status = exc.status_hint
        self.server.metrics.inc("dispa_protocol_errors_total", (("status", str(status)),))
        log.info("rejected malformed request from %s: %s (%d)", self.peer_ip, exc, status,
                 extra={"fields": {"peer": self.peer_ip, "status": status, "error": str(exc)}})
        if self.state == ST_CONNECTING or self.state == ST_PROXYING:
            # The bad bytes came mid-body: the upstream must not see the rest. Abort it.
            if self.upstream is not None:
                self.upstream.owner = None
                self.upstream.close()
                self.upstream = None
            if self.connect_task is not None:
                self.connect_task.cancel()
            self._release_ep()
            if self.resp_started:
                self._abort("malformed request body")
                return 0
        self.state = ST_IDLE
        if self.head is None:
            self.t0 = _now()
            self.domain = "-"
        body = f"bad request: {exc}\n".encode() if status < 500 else f"{exc}\n".encode()
        return self._respond_local(status, body, True)

    # ------------------------------------------------------------------ responses & finish
    cdef int _respond_local(self, int status, bytes body, bint close) except -1:
        """Answer the current request ourselves (interception miss, 5xx, 4xx)."""
        return self._respond_with(status, py_REASONS.get(status, b"Error"),
                                  [(b"Content-Type", b"text/plain; charset=utf-8")], body, close)

    cdef int _respond_response(self, object resp) except -1:
        """Answer with a Response made by a route or a filter (phase 4 or 8)."""
        headers = [(k, v) for k, v in resp.headers.raw
                   if k.lower() not in _FRAMING]
        if resp.body and not any([k.lower() == b"content-type" for k, _ in headers]):
            headers.append((b"Content-Type", b"text/plain; charset=utf-8"))
        return self._respond_with(resp.status, py_REASONS.get(resp.status, b"OK"), headers,
                                  resp.body, not (self.req_complete or not _has_body(self.head)))

    cdef int _respond_with(self, int status, bytes reason, list app_headers, bytes body,
                           bint close) except -1:
        cdef RequestHead head = self.head
        if close or head is None or not head.keep_alive or self.close_after:
            close = True
        if status == 204 or status == 304:
            headers = app_headers
            body = py_EMPTY
        else:
            headers = app_headers + [(b"Content-Length", str(len(body)).encode())]
        if self.rid:
            headers.append((b"X-Request-Id", self.rid))
        if close:
            headers.append((b"Connection", b"close"))
        elif head is not None and head.version == 10:
            headers.append((b"Connection", b"keep-alive"))
        data = write_response_head(status, reason, headers)
        if head is None or head.method != py_HEAD:
            data += body
            self.resp_bytes += PyBytes_GET_SIZE(body)
        self.transport.write(data)
        self.resp_status = status
        self._log_request(status)
        self.state = ST_IDLE
        if close:
            return self._close()
        # keep-alive after a local answer: only if the request body (if any) is consumed
        req_complete = self.req_complete or not _has_body(head)
        self._reset_exchange()
        self.req_complete = False
        self.deadline = _now() + _view_of(self.server).keep_alive_timeout
        if not req_complete:
            return self._close()
        return self._resume_reading()

    cdef int _finish_exchange(self, UpstreamConnection conn, bint reusable) except -1:
        cluster = self.cluster
        cdef Py_ssize_t ep = self.ep
        cdef int status = self.resp_status
        cdef bint keep
        self._release_ep()
        self.rt.observe_upstream(self.ep_ids[ep], "ok", _now() - self.t0)
        if cluster.tracks:
            cluster.report(ep, status, _now() - self.t0)
        conn.owner = None
        self.upstream = None
        conn.parser.head = None  # back to the freelist now, not at the next response
        # Bytes after the end of the response (a body sent with HEAD, more than its
        # Content-Length) would be read as the next request's response: never pool that.
        leftover = conn.parser.take_rest()
        conn.parser._release_if_empty()  # an idle pooled connection keeps no read buffer
        if reusable and self.req_complete and not conn.parser.eof and not leftover:
            (<Pool?>cluster.pools[ep]).release(conn)
        else:
            conn.close()
        self._log_request(status)
        keep = self.keep_alive and self.req_complete
        self.state = ST_IDLE
        self._reset_exchange()
        if not keep or self.close_after:
            return self._close()
        self.deadline = _now() + _view_of(self.server).keep_alive_timeout
        self._resume_reading()
        self._process()  # pipelined requests already buffered
        # an idle keep-alive connection keeps no read buffer (parser Rule 4) and no head
        if self.state == ST_IDLE and not self.in_head:
            self.parser.head = None
        self.parser._release_if_empty()
        return 0

    cdef int _start_tunnel(self, bytes up_rest) except -1:
        # After the upstream's 101: raw bytes both ways, or, for a WebSocket upgrade, hand
        # both connections to proxy/websocket.py (up_rest: upstream bytes after the 101).
        cdef bint held
        self.deadline = 0.0
        self._log_request(101)
        rest = self.parser.take_rest()
        ws = getattr(self.server, "websocket", None)
        if ws is not None and ws.wants(self.head):
            # The tunnel takes over both transports (set_protocol) and the endpoint's
            # in-flight count; this session ends here without closing anything.
            up = self.upstream
            up.owner = None
            self.upstream = None
            held = self.ep_held
            self.ep_held = False
            self.state = ST_CLOSED
            self.server.sessions.discard(self)
            ws.take_over(self.server, self.transport, up, self.cluster,
                         self.ep if held else -1, rest, up_rest, self.peer_ip)
            return 0
        self.state = ST_TUNNEL
        if up_rest:
            self.transport.write(up_rest)
        if rest:
            self.upstream.transport.write(rest)
        return self._resume_reading()

    cdef int _release_ep(self) except -1:
        """End the selector's in-flight count for the current endpoint (exactly once)."""
        if self.ep_held:
            self.ep_held = False
            self.cluster.selector.release(self.ep)
        return 0

    cpdef _abort(self, str why):
        log.info("aborting client connection from %s: %s", self.peer_ip, why)
        self._release_ep()
        self._log_request(self.resp_status or 502)
        up = self.upstream
        if up is not None:
            up.owner = None
            up.close()
            self.upstream = None
        self.state = ST_CLOSED
        if self.transport is not None:
            self.transport.abort()

    cdef int _close(self) except -1:
        self._release_ep()
        if self.state == ST_TUNNEL and self.upstream is not None:
            self.upstream.owner = None
            self.upstream.close()
            self.upstream = None
        self.state = ST_CLOSED
        if self.transport is not None:
            self.transport.close()
        return 0

    def drain(self):
        """Graceful shutdown: close now if idle, else after the current response."""
        self.close_after = True
        if self.state == ST_IDLE and not self.req_complete:
            self._close()

    # ------------------------------------------------------------------ log phase
    cdef int _log_request(self, int status) except -1:
        cdef RequestHead head = self.head
        cdef _RuntimeView v
        method = _method_str(head.method) if head is not None else "-"
        v = self.rt if self.rt is not None else _view_of(self.server)
        v.observe_request(self.domain or "-", method, status, _now() - self.t0,
                          self.req_bytes, self.resp_bytes)
        plan = self.plan
        if plan is not None and plan.log_hooks:
            plan.log(status, None if status < 500 and status != 499 else str(status))
        sink = v.log_exchange
        if sink is not None and (v.log_gate is None or _log_wanted(self, v, status)):
            if self.trace is not None and v.ts_sink is not None:
                _trace_put(v, _exchange_args(self, status))
            else:
                sink(make_exchange(*_exchange_args(self, status)))
        return 0


cdef int _trace_put(_RuntimeView v, tuple args) except -1:
    """TracingSink.put_started (observability/tracing.py, the spec) in C: its
    SpanBatcher.put_deferred and its count, without a Python frame."""
    cdef list attempts = <list>args[11]
    cdef Py_ssize_t n = 1 + (len(attempts) if attempts is not None else 0)
    q = v.ts_queue
    if len(q) >= v.ts_max:
        b = v.ts_sink.batcher
        b.dropped += n
    else:
        q.append((v.ts_build, args, n))
        if len(q) >= v.ts_batch:
            v.ts_wake()
    ts = v.ts_sink
    ts.started += 1
    return 0


cdef tuple _exchange_args(Session s, int status):
    """make_exchange's arguments (observability/exchange.py) for the session's exchange."""
    cdef double now = _now()
    attempts = s.attempts if s.attempts is not None else []
    ep_id = None
    if s.ep >= 0 and s.cluster is not None:
        ep_id = s.cluster.endpoints[s.ep].id
        # (no negative index: this module is compiled with wraparound=False)
        last = attempts[len(attempts) - 1] if attempts else None
        if not (last is not None and last[0] == ep_id and last[1] == s.t_up):
            attempts.append((ep_id, s.t_up, now, "ok"))
    return (s.t0, now, s.peer_ip, s.head, s.domain, status, s.req_bytes, s.resp_bytes, s.rid,
            s.cluster, ep_id, attempts, s.plan,
            None if status < 500 and status != 499 else str(status), "http", None, s.trace)


# -- upstream connections and pools -----------------------------------------------------------

@cython.final
cdef class UpstreamConnection:
    """One TCP connection to an upstream endpoint (compiled twin of pool.py's)."""

    def __init__(self, Pool pool):
        self.pool = pool
        self.transport = None
        self.parser = ResponseParser()
        self.owner = None
        self.closed = False
        self.idle_since = 0.0
        self.reused = False
        self.paused = False

    # asyncio callbacks ---------------------------------------------------------------
    def connection_made(self, transport):
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:  # pragma: no cover - not a TCP socket
                pass
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)

    def data_received(self, data):
        cdef Session owner = self.owner
        if owner is None:
            # Bytes on an idle connection: the server is talking out of turn. Drop it.
            self.close()
            return
        owner._upstream_data(self, data)

    def eof_received(self):
        return False  # let asyncio close the transport; connection_lost follows

    def connection_lost(self, exc):
        cdef bint was_closed = self.closed
        cdef Session owner = self.owner
        self.closed = True
        if not was_closed:
            self.pool._forget(self)
        if owner is not None:
            self.owner = None
            owner._upstream_lost(self)

    def pause_writing(self):
        cdef Session owner = self.owner
        if owner is not None:
            owner._pause_reading()

    def resume_writing(self):
        cdef Session owner = self.owner
        if owner is not None:
            owner.last_io = _now()
            if not (owner.req_complete and owner.state == ST_PROXYING):
                owner._resume_reading()

    # control -------------------------------------------------------------------------
    cpdef pause_reading(self):
        if not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()

    cpdef resume_reading(self):
        if self.paused and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()

    cpdef close(self):
        """Close now (an abort: nothing queued is worth sending)."""
        if not self.closed:
            self.closed = True
            self.pool._forget(self)
            if self.transport is not None:
                self.transport.abort()


@cython.final
cdef class Pool:
    """Keep-alive connections to one endpoint (compiled twin of pool.py's)."""

    def __init__(self, loop, host, port, spec):
        self.loop = loop
        self.host = host
        self.port = port
        self.spec = spec
        self.idle = []
        self.total = 0
        self.connects = 0  # lifetime count, for metrics and tests
        self.reuses = 0
        self.retired = False  # no longer in any snapshot: busy connections close on release
        self.tls = None  # tls.upstream.UpstreamTls for an https:// endpoint
        self.max_idle = spec.max_idle
        self.max_total = spec.max_total
        self.idle_timeout = spec.idle_timeout_seconds

    cpdef UpstreamConnection take_idle(self):
        """An idle connection that is still open, or None."""
        cdef list idle = self.idle
        cdef UpstreamConnection conn
        while idle:
            conn = <UpstreamConnection>idle.pop()
            if not conn.closed and not conn.transport.is_closing():
                conn.reused = True
                self.reuses += 1
                return conn
        return None

    async def connect(self, timeout_seconds):
        """Open a new connection; raise UpstreamError (retryable: nothing was sent)."""
        if self.total >= self.max_total:
            raise UpstreamError("upstream connection limit reached", status_hint=503,
                                retryable=True)
        self.total += 1
        self.connects += 1
        conn = UpstreamConnection(self)
        tls = self.tls
        try:
            if tls is None:
                connecting = self.loop.create_connection(lambda: conn, self.host, self.port)
            else:
                connecting = self.loop.create_connection(
                    lambda: conn, self.host, self.port, ssl=tls.context,
                    server_hostname=tls.server_name, ssl_handshake_timeout=timeout_seconds)
            await asyncio.wait_for(connecting, timeout_seconds)
        except asyncio.TimeoutError:
            self._forget_count(conn)
            raise UpstreamError("upstream connect timeout", status_hint=504,
                                retryable=True) from None
        except ConnectionRefusedError:
            self._forget_count(conn)
            raise UpstreamError("upstream connection refused", retryable=True) from None
        except OSError as exc:
            self._forget_count(conn)
            raise UpstreamError(f"upstream connect error: {exc.strerror or exc}",
                                retryable=True) from None
        return conn

    cdef int _forget_count(self, UpstreamConnection conn) except -1:
        if not conn.closed:
            conn.closed = True
            self.total -= 1
        return 0

    cpdef release(self, UpstreamConnection conn):
        """Give back a connection whose exchange completed cleanly and allows keep-alive."""
        conn.owner = None
        if (conn.closed or self.retired or conn.transport.is_closing()
                or len(self.idle) >= self.max_idle):
            conn.close()
            return
        conn.resume_reading()  # reading must stay on to notice the server closing it
        conn.idle_since = _now()
        self.idle.append(conn)

    cdef int _forget(self, UpstreamConnection conn) except -1:
        self.total -= 1
        try:
            self.idle.remove(conn)
        except ValueError:
            pass
        return 0

    def sweep(self, now):
        """Close idle connections older than ``idle_timeout_seconds``."""
        cdef double limit = self.idle_timeout
        for conn in [c for c in self.idle if now - (<UpstreamConnection>c).idle_since > limit]:
            conn.close()

    def close(self):
        self.retired = True
        for conn in list(self.idle):
            conn.close()
