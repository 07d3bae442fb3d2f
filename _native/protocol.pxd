# Proxy protocol objects: C attributes of Session, UpstreamConnection and Pool (protocol.pyx).
#
# Hot path call order, per keep-alive request (GET, Content-Length response):
#   Session.data_received -> RequestParser._feed -> Session._process -> RequestParser._next
#     -> Session._on_head (route, forwarding fields, _proxy_head) -> _choose_and_connect
#     -> Pool.take_idle -> Session._attach (one upstream write)
#   UpstreamConnection.data_received -> Session._upstream_data -> ResponseParser._feed/_next
#     -> Session._on_response_head (_proxy_head with the buffered body as its tail: one
#        downstream write) -> Session._finish_exchange -> Pool.release -> _log_request
#     -> Session._reset_exchange -> Session._process (pipelined requests)
#
# WARNING: every field and rule mirrors dispa/proxy/session.py and dispa/proxy/pool.py, the
# pure-Python twins (the executable spec). Change both together.

cimport cython


@cython.final
cdef class RequestIds:
    cdef bytes prefix
    cdef unsigned long long counter

    cdef bytes _next(self)


@cython.final
cdef class _RuntimeView:
    # what a request needs from one dispa.proxy.runtime.Runtime (and the worker serving it),
    # as C values and bound methods; rebuilt when either changes
    cdef object rt
    cdef object server
    cdef double request_timeout
    cdef double keep_alive_timeout
    cdef double header_timeout
    cdef bytes rid_name
    cdef bint rid_name_ok
    cdef bytes via
    cdef bint via_ok
    # names dropped from the downstream copy: forwarding headers, Expect, and the configured
    # request-id header (ours replaces the client's, never doubles it)
    cdef frozenset drop_request
    cdef Slice drop[8]
    cdef int ndrop
    cdef object pipeline
    cdef object intercept_match
    cdef object trusted_contains
    cdef object default_cluster
    cdef object reject_status
    cdef bytes reject_body
    cdef dict parser_kwargs
    # the default cluster's endpoints (immutable spec data)
    cdef tuple ep_timeouts
    cdef tuple ep_ids
    # the worker's
    cdef object next_request_id
    cdef object domain_label
    cdef object observe_request
    cdef object observe_upstream
    # the runtime's log-phase fan-out (observability/exchange.py); None: no sinks
    cdef object log_exchange
    # the tracing gates (observability/tracing_gate.py), set by _gates_of: the pipeline's
    # TraceGate (None: every request enters the pipeline) as C values, and the runtime's
    # LogGate (None: every exchange is built)
    cdef object trace_gate
    cdef bint tg_new             # trace_gate.new_traces: the Session starts new traces
    cdef object tg_allow         # trace_gate.allow (the rate limit) or None
    cdef object tg_ctx           # tracing_context.TraceContext
    # Runtime.trace_sink's batcher (TracingSink.put_started in C), or ts_sink None
    cdef object ts_sink
    cdef object ts_queue
    cdef Py_ssize_t ts_max
    cdef Py_ssize_t ts_batch
    cdef object ts_wake
    cdef object ts_build
    cdef unsigned long long tg_bound
    cdef Slice tg_names[3]
    cdef int tg_n
    cdef object log_gate
    cdef bint lg_errors
    cdef double lg_slow
    cdef object lg_key
    # a request-only pipeline (Pipeline.request_only: sync on_request hooks, nothing else):
    # its SyncRunner and Pipeline._request, so the Session runs those hooks without
    # Pipeline.start's frames (None: not such a pipeline)
    cdef object ro_run
    cdef object ro_request
    # what _new_request needs to make the Request view itself: the pipeline's memo of
    # normalised hosts, pipeline.py's memo of method strings, the Request class
    cdef dict ro_hostnames
    cdef dict ro_methods
    cdef object ro_cls


@cython.final
cdef class Session:
    cdef readonly object server
    cdef readonly object transport
    cdef readonly RequestParser parser
    cdef readonly str peer_ip
    cdef public object tls   # tls.mtls.TlsInfo on a TLS connection (set before connection_made)
    cdef readonly int state
    cdef public double deadline
    cdef readonly bint read_paused
    cdef readonly bint write_paused
    cdef readonly bint close_after
    cdef readonly long long requests
    cdef readonly bint in_head
    # the exchange (reset in _reset_exchange)
    cdef readonly RequestHead head
    cdef _RuntimeView rt
    cdef readonly object cluster
    cdef readonly Py_ssize_t ep
    cdef bint ep_held   # the selector counts a request in flight on ``ep``
    cdef object tried
    cdef readonly UpstreamConnection upstream
    cdef bytes up_head
    cdef list pending
    cdef Py_ssize_t pending_bytes
    cdef bint up_chunked
    cdef readonly bint req_complete
    cdef bint body_sent
    cdef int resp_mode
    cdef bint resp_started
    cdef readonly int resp_status
    cdef readonly bint keep_alive
    cdef double t0
    cdef readonly object domain
    cdef readonly bytes rid
    cdef object connect_task
    cdef bint continue_sent
    cdef Py_ssize_t held_bytes
    cdef double last_io   # last progress of the exchange (see on_deadline)
    # downstream bytes collected while one upstream read is processed (Rule 2)
    cdef object _out1
    cdef list _outl
    # per-connection memo of pure functions of (runtime, value): trusted peer, and the
    # domain label and interception result of the last Host value
    cdef _RuntimeView _memo_rt
    cdef bint _memo_trusted
    cdef bytes _memo_host
    cdef object _memo_domain
    cdef bint _memo_match
    # routing rules and filters (proxy/pipeline.py); None on the fast path
    cdef readonly object plan
    cdef bint plan_wait        # the request phase is running (async hooks): hold the parser
    cdef bint resp_filter      # the plan has response body hooks
    cdef object _p_target
    cdef object _p_host_hdr
    cdef object _p_authority
    cdef tuple ep_timeouts     # of self.cluster's endpoints
    cdef tuple ep_ids
    cdef object _stash_rh      # a response head waiting for async response hooks
    cdef object set_cookie     # sticky cookie to add to the response (bytes) or None
    cdef long long req_bytes   # request body bytes received (dispa_received_bytes_total)
    cdef long long resp_bytes  # response body bytes sent (dispa_sent_bytes_total)
    # upstream attempts for the log phase, kept only when log sinks are configured
    cdef double t_up           # start of the current upstream attempt
    cdef list attempts         # failed attempts: (endpoint_id, start, end, outcome)
    cdef object trace          # a trace this Session started (tracing_gate.TraceGate.start)

    cdef int _reset_exchange(self) except -1
    cdef int _set_cluster(self, object cluster) except -1
    cdef int _plan_continue(self) except -1
    cdef int _respond_with(self, int status, bytes reason, list app_headers, bytes body,
                           bint close) except -1
    cdef int _respond_response(self, object resp) except -1
    cdef int _emit_response_head(self, ResponseHead rh, ResponseParser parser, int status,
                                 bytes reason, list headers) except -1
    cdef int _replace_response(self, object resp) except -1
    cdef int _pause_reading(self) except -1
    cdef int _resume_reading(self) except -1
    cdef int _process(self) except -1
    cdef int _on_head(self, RequestHead head) except -1
    cdef bytes _upstream_head(self, RequestHead head, bytes target, object host_hdr,
                              object authority, list headers)
    cdef int _choose_and_connect(self) except -1
    cdef int _attach(self, UpstreamConnection conn) except -1
    cdef int _on_body(self, bytes chunk) except -1
    cdef int _on_body_end(self) except -1
    cdef int _send_raw(self, bytes data) except -1
    cdef int _emit(self, object piece) except -1
    cdef int _flush(self) except -1
    cdef int _upstream_data(self, UpstreamConnection conn, object data) except -1
    cdef int _on_response_head(self, ResponseHead rh, ResponseParser parser) except -1
    cdef int _upstream_lost(self, UpstreamConnection conn) except -1
    cdef int _upstream_failed(self, object exc, bint connect, bint bad_response) except -1
    cdef int _protocol_error(self, object exc) except -1
    cdef int _respond_local(self, int status, bytes body, bint close) except -1
    cdef int _finish_exchange(self, UpstreamConnection conn, bint reusable) except -1
    cdef int _start_tunnel(self, bytes up_rest) except -1
    cdef int _release_ep(self) except -1
    cpdef _abort(self, str why)
    cdef int _close(self) except -1
    cdef int _log_request(self, int status) except -1


@cython.final
cdef class UpstreamConnection:
    cdef readonly Pool pool
    cdef readonly object transport
    cdef readonly ResponseParser parser
    cdef public Session owner
    cdef public bint closed
    cdef public double idle_since
    cdef public bint reused
    cdef readonly bint paused

    cpdef pause_reading(self)
    cpdef resume_reading(self)
    cpdef close(self)


@cython.final
cdef class Pool:
    cdef readonly object loop
    cdef readonly object host
    cdef readonly object port
    cdef readonly object spec
    cdef readonly list idle
    cdef public Py_ssize_t total
    cdef public long long connects
    cdef public long long reuses
    cdef public bint retired
    cdef public object tls   # tls.upstream.UpstreamTls, or None: plain TCP
    cdef Py_ssize_t max_idle
    cdef Py_ssize_t max_total
    cdef double idle_timeout

    cpdef UpstreamConnection take_idle(self)
    cdef int _forget_count(self, UpstreamConnection conn) except -1
    cpdef release(self, UpstreamConnection conn)
    cdef int _forget(self, UpstreamConnection conn) except -1
