"""The downstream side of the proxy: one Session per client connection.

Theory of operation
-------------------
A Session is an asyncio.Protocol. Bytes from the client go into the HTTP/1.1 parser
(compiled, sans-I/O); the parser hands back events (HEAD, DATA, END, UPGRADE) and the
Session walks the request phases of ARCHITECTURE §2 for each message:

  accept -> parse head -> route (interception) -> upstream choice -> forward -> respond -> log

Rule 1: one exchange at a time per connection. Pipelined requests stay in the parser's
buffer until the current response is complete, so responses leave in request order; while
an exchange is waiting for its response, reading from the client is paused so a client
cannot make us buffer without bound.

Rule 2: one write per direction per message where the bytes allow it. The upstream request
head and any body bytes already received leave in one ``write``; the response head and the
body bytes that arrived with it leave in one ``write`` (an extra syscall costs more than all
the Python work on a request).

Rule 3: backpressure both ways. When the upstream socket's write buffer fills, client reading
pauses; when the client's write buffer fills, upstream reading pauses. Nothing is buffered
beyond the transports' high-water marks, so a 1 GiB body streams in constant memory.

Rule 4: nothing of a rejected request reaches an upstream. A ProtocolError closes the
connection after a 4xx/5xx; a request whose framing we cannot trust is never forwarded.

Retries: a request is retried on another endpoint when connecting failed (nothing was sent),
and an idempotent request without a body is retried once on a fresh connection when a
reused keep-alive connection closed before any response byte (the server closed it while it
sat in our pool). Both are decided here, in the core, never in filters.

WARNING: the state fields below are reset in ``_reset_exchange``; a field added to the
exchange must be reset there too.
"""

from __future__ import annotations

import asyncio
import logging
import time

from dispa.errors import UpstreamError
from dispa.observability.exchange import make_exchange
from dispa.observability.tracing_gate import DRAWN, SKIP
from dispa.proxy.forwarding import BadTarget, forwarding_headers, split_absolute_form
from dispa.protocols.http1 import (
    DATA, END, HEAD, LAST_CHUNK, NEED_DATA, UPGRADE, ProtocolError, RequestParser,
    encode_chunk, proxy_request_head, proxy_response_head, write_response_head,
)

log = logging.getLogger("dispa.proxy")

# Session states
IDLE = 0  # waiting for a request head (keep-alive or new connection)
CONNECTING = 1  # waiting for an upstream connection
PROXYING = 2  # upstream attached: request and/or response flowing
TUNNEL = 3  # after 101 Switching Protocols: raw bytes both ways
CLOSED = 4

# Response body modes towards the client
R_NONE = 0  # no body (HEAD, 1xx, 204, 304)
R_LENGTH = 1  # Content-Length passed through
R_CHUNKED = 2  # chunked coding towards the client
R_CLOSE = 3  # delimited by closing the connection (HTTP/1.0 client, unknown length)

IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})

# The writer drops the RFC 9110 §7.6.1 hop-by-hop set and every name listed in Connection;
# Runtime.drop_request adds the headers we rebuild. Responses lose the upstream's request id.
_DROP_RESPONSE = frozenset({b"x-request-id"})

_REASONS = {
    400: b"Bad Request", 404: b"Not Found", 408: b"Request Timeout", 413: b"Content Too Large",
    414: b"URI Too Long", 421: b"Misdirected Request", 431: b"Request Header Fields Too Large",
    500: b"Internal Server Error", 501: b"Not Implemented", 502: b"Bad Gateway",
    503: b"Service Unavailable", 504: b"Gateway Timeout", 505: b"HTTP Version Not Supported",
    403: b"Forbidden", 200: b"OK", 201: b"Created", 202: b"Accepted", 204: b"No Content",
    301: b"Moved Permanently", 302: b"Found", 303: b"See Other", 304: b"Not Modified",
    307: b"Temporary Redirect", 308: b"Permanent Redirect", 401: b"Unauthorized",
    405: b"Method Not Allowed", 409: b"Conflict", 410: b"Gone", 429: b"Too Many Requests",
}
_FRAMING = frozenset({b"content-length", b"transfer-encoding", b"connection", b"keep-alive",
                      b"x-request-id"})


class _Edited:
    """A request or response head with some fields replaced by the pipeline's edits."""

    def __init__(self, head, **changes):
        self._head = head
        self.__dict__.update(changes)

    def __getattr__(self, name):
        return getattr(self._head, name)

_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_MAX_PENDING_BYTES = 256 * 1024  # body bytes held while connecting before pausing the client
_MAX_HELD_BYTES = 64 * 1024  # pipelined bytes held during an exchange before pausing the client


class Session(asyncio.Protocol):
    """One client connection (see the module docstring)."""

    def __init__(self, server):
        self.server = server  # dispa.server.worker.DataPlane
        self.transport = None
        self.parser = None
        self.peer_ip = ""
        self.tls = None  # tls.mtls.TlsInfo, set by tls.handshake before connection_made
        self.state = IDLE
        self.deadline = 0.0  # monotonic; 0 = none. Checked by the server's sweeper.
        self.read_paused = False
        self.write_paused = False
        self.close_after = False  # close once the current response is written
        self.requests = 0
        self.in_head = False  # bytes of a request head have arrived, head not complete yet
        self._reset_exchange()

    def _reset_exchange(self) -> None:
        self.head = None
        self.rt = None
        self.cluster = None
        self.ep = -1
        self.ep_held = False  # the selector counts a request in flight on ``ep``
        self.tried = None
        self.upstream = None
        self.up_head = b""
        self.pending = None
        self.pending_bytes = 0
        self.up_chunked = False
        self.req_complete = False
        self.body_sent = False
        self.resp_head = None
        self.resp_mode = R_NONE
        self.resp_started = False
        self.resp_status = 0
        self.keep_alive = False
        self.t0 = 0.0
        self.domain = ""
        self.rid = b""
        self.connect_task = None
        self.continue_sent = False
        self.held_bytes = 0
        self.last_io = 0.0  # last progress of the exchange (see on_deadline)
        self.plan = None  # routing rules and filters (proxy/pipeline.py); None: fast path
        self.plan_wait = False  # async request hooks are running: hold the parser
        self.resp_filter = False  # the plan has response body hooks
        self._p_args = None  # (target, authority) of the head waiting for the plan
        self._stash_rh = None  # a response head waiting for async response hooks
        self.attempts = None  # failed upstream attempts, kept only when log sinks exist
        self.trace = None  # a trace this Session started (tracing_gate.TraceGate.start)
        self.t_up = 0.0  # start of the current upstream attempt
        self.set_cookie = None  # sticky cookie to add to the response (bytes) or None
        self.req_bytes = 0  # request body bytes received (dispa_received_bytes_total)
        self.resp_bytes = 0  # response body bytes sent (dispa_sent_bytes_total)

    # ------------------------------------------------------------------ accept phase
    def connection_made(self, transport):  # type: ignore[override]
        self.transport = transport
        server = self.server
        peer = transport.get_extra_info("peername")
        self.peer_ip = peer[0] if peer else ""
        self.parser = RequestParser(**server.runtime.parser_kwargs)
        transport.set_write_buffer_limits(high=256 * 1024)
        server.sessions.add(self)
        self.deadline = time.monotonic() + server.runtime.proxy.keep_alive_timeout_seconds
        if server.draining:
            self.close_after = True

    def connection_lost(self, exc) -> None:
        prev = self.state
        self.state = CLOSED
        self.server.sessions.discard(self)
        if self.plan is not None and self.plan.task is not None and self.plan_wait:
            self.plan_wait = False
            self.plan.task.cancel()
        if prev in (CONNECTING, PROXYING, TUNNEL):
            # Client went away mid-exchange: abort the upstream request, never pool it.
            if self.connect_task is not None:
                self.connect_task.cancel()
            up = self.upstream
            if up is not None:
                up.owner = None
                up.close()
            self._release_ep()
            if prev != TUNNEL:
                self._log_request(499)
        self._reset_exchange()

    def pause_writing(self) -> None:
        self.write_paused = True
        if self.upstream is not None:
            self.upstream.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        self.last_io = time.monotonic()
        if self.upstream is not None:
            self.upstream.resume_reading()

    def _pause_reading(self) -> None:
        if not self.read_paused and self.state != CLOSED:
            self.read_paused = True
            self.transport.pause_reading()

    def _resume_reading(self) -> None:
        if self.read_paused and self.state != CLOSED:
            self.read_paused = False
            self.transport.resume_reading()

    # ------------------------------------------------------------------ downstream bytes
    def data_received(self, data: bytes) -> None:
        if self.state == TUNNEL:
            self.upstream.transport.write(data)
            return
        if self.req_complete and self.state != IDLE:
            # Rule 1: pipelined bytes wait in the parser while the exchange runs. Reading stays
            # on (so a client that goes away is noticed) until too much is held.
            self.parser.feed(data)
            self.held_bytes += len(data)
            if self.held_bytes > _MAX_HELD_BYTES:
                self._pause_reading()
            return
        if self.state == IDLE and not self.in_head:
            # First bytes of a new request head: the header timeout starts now.
            self.in_head = True
            self.deadline = time.monotonic() + self.server.runtime.proxy.header_timeout_seconds
        self.parser.feed(data)
        self._process()

    def eof_received(self):
        if self.state == TUNNEL and self.upstream is not None:
            try:
                self.upstream.transport.write_eof()
            except (OSError, RuntimeError):
                self.upstream.close()
            return True
        if self.state == IDLE:
            return False  # clean close between requests
        if self.req_complete:
            # The client closed while its response was pending: like nginx (without
            # proxy_ignore_client_abort), treat it as an abort and free the upstream.
            return False
        # Half-close mid-request: the parser decides whether the request was complete.
        self.parser.feed_eof()
        self._process()
        return True

    def _process(self) -> None:
        parser = self.parser
        while self.state != CLOSED:
            if self.req_complete and self.state != IDLE:
                return  # Rule 1: a full request is in flight; the rest waits in the parser
            if self.plan_wait:
                return  # async request hooks are running; body bytes wait in the parser
            try:
                ev = parser.next_event()
            except ProtocolError as exc:
                self._protocol_error(exc)
                return
            if ev == NEED_DATA:
                if parser.eof and self.state == IDLE:
                    self._close()
                return
            if ev == HEAD:
                self._on_head(parser.head)
            elif ev == DATA:
                self._on_body(parser.take_data())
            elif ev == END:
                self._on_body_end()
            elif ev == UPGRADE:
                # The request head was handled; further bytes belong to the tunnel.
                self.req_complete = True
                return

    # ------------------------------------------------------------------ request phases
    def _on_head(self, head) -> None:
        server = self.server
        rt = server.runtime
        self.rt = rt
        self.head = head
        self.in_head = False
        self.t0 = time.monotonic()
        self.requests += 1
        self.req_complete = False
        self.deadline = self.t0 + rt.proxy.request_timeout_seconds
        if server.slowdown_us:
            server.busy_wait()

        # request id: propagate a sane incoming one, else generate
        rid_name = rt.request_id_header
        if rid_name:
            rid = head.get(rid_name)
            if rid is None or len(rid) > 200 or not rid.isascii():
                rid = server.next_request_id()
            self.rid = rid

        # route: domain interception. Absolute-form targets carry the authority (RFC 9112 §3.2.2).
        target = head.target
        host = head.get(b"host") or b""
        authority = None
        if target[:1] != b"/":
            try:
                authority, target = split_absolute_form(target)
            except BadTarget as exc:
                self.domain = "-"
                self._respond_local(400, f"bad request: {exc}\n".encode(), close=True)
                return
            if authority is not None:
                host = authority
        self.domain = server.domain_label(host)
        intercepted = rt.intercept.match(host)
        pipeline = rt.pipeline
        if not intercepted and (pipeline is None or not pipeline.before_intercept):
            self._respond_local(rt.reject_status, rt.reject_body, close=self._has_body(head))
            return

        self.keep_alive = head.keep_alive and not self.close_after
        self.cluster = rt.default_cluster
        gate = pipeline.trace_gate if pipeline is not None else None
        passed = SKIP
        if gate is not None and intercepted:
            passed = gate.check(head.headers)
            if (passed == DRAWN and gate.new_traces
                    and not rt.trusted.contains(self.peer_ip)):
                # a new trace with only traceparent to write: no pipeline (tracing_gate.py)
                started = gate.start(gate.take())
                if started is None:
                    passed = SKIP  # the rate limit said no: an untraced request
                else:
                    self.trace = started[0]
                    headers = list(head.headers)
                    headers.append((b"traceparent", started[1]))
                    self._build_upstream_head(target, authority, headers)
                    self._choose_and_connect()
                    return
        if pipeline is not None and (gate is None or not intercepted or passed != SKIP):
            # routing rules and filters (phases 3-6): the pipeline decides, maybe later.
            # (Tracing alone: the requests its gate passes, observability/tracing_gate.py,
            # and hosts outside the interception, which the pipeline rejects.)
            plan = pipeline.start(self, head, host, target, intercepted, self.peer_ip, self.rid)
            if plan is not None:
                self.plan = plan
                self._p_args = (target, authority)
                if plan.task is not None:
                    self.plan_wait = True
                    self.state = CONNECTING
                    self._pause_reading()
                    plan.task.add_done_callback(self._plan_done)
                    return
                self._plan_continue()
                return
        self._build_upstream_head(target, authority, None)
        self._choose_and_connect()

    def _plan_done(self, task) -> None:
        """The async request phase ended (callback of plan.task)."""
        if self.plan is None or self.plan.task is not task or not self.plan_wait:
            return  # the client left, or a timeout answered already
        self.plan_wait = False
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            log.error("request phase failed: %r", exc)
            self.state = IDLE
            self._respond_local(500, b"internal error\n", close=True)
            return
        self._resume_reading()
        self._plan_continue()
        if self.state != CLOSED:
            self._process()  # body bytes that arrived meanwhile

    def _plan_continue(self) -> None:
        """The request phase is done: answer, or build the upstream head and connect."""
        plan = self.plan
        if plan.response is not None:
            self.state = IDLE
            self._respond_response(plan.response)
            return
        if plan.cluster is not None:
            self.cluster = plan.cluster
        target, authority = self._p_args
        if plan.target is not None:
            target = plan.target
        self._build_upstream_head(target, authority, plan.headers)
        self.resp_filter = plan.body_hooks
        if plan.mirror is not None:
            plan.mirror.send_head(self.up_head, self.peer_ip)
            if not self._has_body(self.head):
                plan.mirror.end()
        self.state = IDLE
        self._choose_and_connect()

    def _build_upstream_head(self, target: bytes, authority, headers) -> None:
        rt = self.rt
        head = self.head
        rid_name = rt.request_id_header
        if headers is not None:
            head = _Edited(head, headers=headers)
        # upstream request head (phase 6): downstream headers minus hop-by-hop, plus ours
        tls = self.tls
        extra = forwarding_headers(head, self.peer_ip, rt.trusted.contains(self.peer_ip), rt.via,
                                   b"http" if tls is None else b"https", host=authority)
        if tls is not None and tls.headers:
            extra += tls.headers  # the client certificate (tls/mtls.py)
        drop = rt.drop_request
        if authority is not None:
            extra.insert(0, (b"Host", authority))
            drop = drop | {b"host"}
        if rid_name:
            extra.append((rid_name, self.rid))
        if head.chunked:
            extra.append((b"Transfer-Encoding", b"chunked"))
            self.up_chunked = True
        elif head.content_length >= 0:
            extra.append((b"Content-Length", str(head.content_length).encode()))
        if head.upgrade:
            extra.append((b"Connection", b"upgrade"))
        self.up_head = proxy_request_head(head, target, drop, extra)

    @staticmethod
    def _has_body(head) -> bool:
        return head.chunked or head.content_length > 0

    def _choose_and_connect(self) -> None:
        cluster = self.cluster
        i = cluster.pick(self.peer_ip, self.tried, self.head)
        if cluster.tracks and cluster.sticky_policy is not None:
            self.set_cookie = cluster.take_cookie()
        if i < 0:
            self._respond_local(503, b"upstream circuit open\n" if i == -2 else
                                b"no upstream endpoint available\n",
                                close=not self.req_complete)
            return
        self.ep = i
        cluster.selector.acquire(i)
        self.ep_held = True
        if self.rt.log_exchange is not None:
            self.t_up = time.monotonic()
        # the endpoint's timeout bounds the whole upstream exchange, within the request timeout
        self.deadline = min(self.t0 + self.rt.proxy.request_timeout_seconds,
                            time.monotonic() + cluster.ep_timeouts[i])
        pool = cluster.pools[i]
        conn = pool.take_idle()
        if conn is not None:
            self._attach(conn)
            return
        self.state = CONNECTING
        ep = cluster.endpoints[i]
        timeout = min(pool.spec.connect_timeout_seconds, self.cluster.ep_timeouts[self.ep])
        self.connect_task = asyncio.ensure_future(self._connect(pool, timeout))

    async def _connect(self, pool, timeout: float) -> None:
        try:
            conn = await pool.connect(timeout)
        except UpstreamError as exc:
            self.connect_task = None
            if self.state != CONNECTING:
                return
            self._upstream_failed(exc, connect=True)
            return
        except asyncio.CancelledError:
            return
        self.connect_task = None
        if self.state != CONNECTING:
            conn.close()  # the client left while we were connecting
            return
        self._attach(conn)

    def _attach(self, conn) -> None:
        self.state = PROXYING
        self.upstream = conn
        conn.owner = self
        conn.parser.expect(self.head.method)
        head = self.head
        if head.expect_continue and not self.continue_sent and not self.req_complete:
            # We ask the client for its body ourselves; Expect was stripped upstream.
            self.continue_sent = True
            if head.version == 11:
                self.transport.write(_CONTINUE)
        out = self.up_head
        if self.pending:
            out = b"".join([out, *self.pending])
            self.pending = None
            self.pending_bytes = 0
            self.body_sent = True
            self._resume_reading()
        conn.transport.write(out)
        if conn.paused and not self.write_paused:
            conn.resume_reading()

    def _on_body(self, chunk: bytes) -> None:
        if self.state == IDLE:
            return  # body of a request we already answered locally (and will close)
        self.req_bytes += len(chunk)
        plan = self.plan
        if plan is not None:
            if plan.req_body_hooks:
                try:
                    chunk = plan.request_body(chunk, False)
                except Exception as exc:  # noqa: BLE001 - HTTPError or strategy "fail"
                    self._plan_body_error(exc)
                    return
                if not chunk:
                    return
            if plan.mirror is not None:
                plan.mirror.body(chunk)
        if self.up_chunked:
            chunk = encode_chunk(chunk)
        if self.state == PROXYING:
            self.body_sent = True
            self.last_io = time.monotonic()
            self.upstream.transport.write(chunk)
        else:
            if self.pending is None:
                self.pending = []
            self.pending.append(chunk)
            self.pending_bytes += len(chunk)
            if self.pending_bytes > _MAX_PENDING_BYTES:
                self._pause_reading()

    def _on_body_end(self) -> None:
        if self.state == IDLE:
            return  # the end of a request we already answered locally
        self.req_complete = True
        plan = self.plan
        if plan is not None:
            if plan.req_body_hooks:
                try:
                    tail = plan.request_body(b"", True)
                except Exception as exc:  # noqa: BLE001
                    self._plan_body_error(exc)
                    return
                if tail:
                    self._send_raw(encode_chunk(tail) if self.up_chunked else tail)
            if plan.mirror is not None:
                plan.mirror.end()
        if self.state == PROXYING and self.body_sent:
            # a request body is all sent: the endpoint's timeout for the response head starts
            # now (a long upload is limited by write_timeout progress instead)
            self.deadline = time.monotonic() + self.cluster.ep_timeouts[self.ep]
        if self.up_chunked:
            trailers = self.parser.trailers
            if trailers:
                last = b"0\r\n" + b"".join(n + b": " + v + b"\r\n" for n, v in trailers) + b"\r\n"
            else:
                last = LAST_CHUNK
            self._send_raw(last)

    def _send_raw(self, data: bytes) -> None:
        if self.state == PROXYING:
            self.body_sent = True  # the chunked terminator is body: no retry after it
            self.upstream.transport.write(data)
        else:
            if self.pending is None:
                self.pending = []
            self.pending.append(data)

    def _plan_body_error(self, exc) -> None:
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
            return
        self.state = IDLE
        msg = getattr(exc, "message", "") or "request body refused"
        self._respond_local(status, (msg + "\n").encode(), close=True)

    # ------------------------------------------------------------------ upstream events
    def upstream_data(self, conn, data: bytes) -> None:
        if self.state == TUNNEL:
            self.transport.write(data)
            return
        self.last_io = time.monotonic()
        parser = conn.parser
        parser.feed(data)
        out = []
        finished = False
        try:
            while True:
                ev = parser.next_event()
                if ev == NEED_DATA:
                    break
                if ev == DATA:
                    chunk = parser.take_data()
                    if self.resp_filter and self.resp_mode != R_NONE:
                        chunk = self.plan.response_body(chunk, False)
                        if not chunk:
                            continue
                    if self.resp_mode == R_CHUNKED:
                        self.resp_bytes += len(chunk)
                        out.append(encode_chunk(chunk))
                    elif self.resp_mode != R_NONE:
                        self.resp_bytes += len(chunk)
                        out.append(chunk)
                elif ev == HEAD:
                    r = self._on_response_head(parser.head, out)
                    if r == 1:
                        continue
                    if r == 2:
                        # replaced by a filter, or waiting for async response hooks
                        if out and self.state != CLOSED:
                            self.transport.write(b"".join(out))
                        return
                elif ev == END:
                    if self.resp_status and self.resp_status < 200:
                        self.resp_status = 0  # interim response done; the final one follows
                        continue
                    if self.resp_filter and self.resp_mode != R_NONE:
                        tail = self.plan.response_body(b"", True)
                        if tail:
                            out.append(encode_chunk(tail) if self.resp_mode == R_CHUNKED
                                       else tail)
                    if self.resp_mode == R_CHUNKED:
                        out.append(LAST_CHUNK)
                    finished = True
                    break
                elif ev == UPGRADE:
                    self.transport.write(b"".join(out))
                    self._start_tunnel(parser.take_rest())
                    return
        except ProtocolError as exc:
            self._upstream_failed(UpstreamError(f"invalid upstream response: {exc}"),
                                  connect=False, bad_response=True)
            return
        except Exception as exc:
            if self.plan is None:
                raise
            # a response filter failed with error strategy "fail"
            log.error("response filter failed: %r", exc)
            self._upstream_failed(UpstreamError("response filter failed"),
                                  connect=False, bad_response=True)
            return
        if out:
            self.transport.write(b"".join(out) if len(out) > 1 else out[0])
        if finished:
            self._finish_exchange(conn, reusable=parser.head.keep_alive)

    def _on_response_head(self, rh, out: list) -> int:
        """Handle a response head: 1 for an interim (1xx) one, 2 when the response was
        replaced by a filter or waits for async response hooks, else 0."""
        status = rh.status
        self.resp_status = status
        # the body streams as long as it makes progress: read_timeout between upstream reads
        self.deadline = time.monotonic() + self.cluster.pools[self.ep].spec.read_timeout_seconds
        if status < 200 and status != 101:
            # 1xx: forward to HTTP/1.1 clients (103 Early Hints), not to HTTP/1.0 ones.
            if self.head.version == 11 and status != 100:
                out.append(proxy_response_head(rh, _DROP_RESPONSE, ()))
            return 1
        plan = self.plan
        if plan is not None and plan.resp_hooks and status != 101:
            r = plan.response_head(status, rh.reason, rh.headers)
            if r is None:
                pass
            elif type(r) is tuple:
                return self._emit_response_head(
                    _Edited(rh, status=r[0], reason=r[1], headers=r[2]), out)
            elif isinstance(r, asyncio.Future):
                if out:
                    self.transport.write(b"".join(out))
                    out.clear()
                self._stash_rh = rh
                self.upstream.pause_reading()
                r.add_done_callback(self._resp_plan_done)
                return 2
            else:
                if out:
                    self.transport.write(b"".join(out))
                    out.clear()
                return self._replace_response(r)
        return self._emit_response_head(rh, out)

    def _resp_plan_done(self, fut) -> None:
        """Async response hooks finished: send the (possibly edited) head, go on."""
        rh = self._stash_rh
        conn = self.upstream
        if rh is None or conn is None or self.state != PROXYING or fut.cancelled():
            return  # the client or the upstream went away meanwhile
        self._stash_rh = None
        exc = fut.exception()
        r = None
        if exc is not None:
            log.error("response phase failed: %r", exc)
        else:
            r = fut.result()
        if r is not None and type(r) is not tuple:
            self._replace_response(r)
            return
        out: list = []
        if r is not None:
            rh = _Edited(rh, status=r[0], reason=r[1], headers=r[2])
        self._emit_response_head(rh, out)
        self.transport.write(b"".join(out))
        if not self.write_paused:
            conn.resume_reading()
        self.upstream_data(conn, b"")  # what the parser already holds

    def _replace_response(self, resp) -> int:
        """A filter replaced the upstream's response: drop the upstream connection (its body
        is unread) and answer with ``resp``."""
        up = self.upstream
        if up is not None:
            up.owner = None
            up.close()
            self.upstream = None
        self._release_ep()
        self.state = IDLE
        self._respond_response(resp)
        return 2

    def _emit_response_head(self, rh, out: list) -> int:
        status = rh.status
        self.resp_status = status
        head = self.head
        extra = []
        if status == 101:
            self.resp_mode = R_NONE
            extra.append((b"Connection", b"upgrade"))
        elif head.method == b"HEAD" or status == 204 or status == 304:
            self.resp_mode = R_NONE
            if rh.content_length >= 0 and status != 204:
                extra.append((b"Content-Length", str(rh.content_length).encode()))
        elif rh.content_length >= 0 and not rh.chunked and not self.resp_filter:
            self.resp_mode = R_LENGTH
            extra.append((b"Content-Length", str(rh.content_length).encode()))
        elif head.version == 11:
            self.resp_mode = R_CHUNKED
            extra.append((b"Transfer-Encoding", b"chunked"))
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
                extra.append((b"Connection", b"close"))
            elif head.version == 10:
                extra.append((b"Connection", b"keep-alive"))
        if self.rid:
            extra.append((b"X-Request-Id", self.rid))
        if self.set_cookie is not None and status != 101:
            extra.append((b"Set-Cookie", self.set_cookie))
        out.append(proxy_response_head(rh, _DROP_RESPONSE, extra))
        self.resp_started = True
        return 0

    def upstream_lost(self, conn, exc) -> None:
        """The upstream connection closed while serving us."""
        if self.state == TUNNEL:
            self._close()
            return
        if self.state != PROXYING or conn is not self.upstream:
            return
        parser = conn.parser
        if self.resp_started:
            # Close-delimited body ends here; anything else was cut short.
            parser.feed_eof()
            try:
                ev = parser.next_event()
                while ev == DATA:
                    chunk = parser.take_data()
                    self.transport.write(encode_chunk(chunk) if self.resp_mode == R_CHUNKED
                                         else chunk)
                    ev = parser.next_event()
            except ProtocolError:
                ev = NEED_DATA
            if ev == END:
                if self.resp_mode == R_CHUNKED:
                    self.transport.write(LAST_CHUNK)
                self._finish_exchange(conn, reusable=False)
            else:
                self._abort("upstream closed mid-response")
            return
        retry_ok = (conn.reused and not self.body_sent and self.req_complete
                    and self.head.method in IDEMPOTENT and self.resp_status == 0)
        if retry_ok:
            # A pooled connection the server had already closed: retry on a fresh one.
            self.upstream = None
            self.state = CONNECTING
            pool = self.cluster.pools[self.ep]
            ep = self.cluster.endpoints[self.ep]
            timeout = min(pool.spec.connect_timeout_seconds, self.cluster.ep_timeouts[self.ep])
            self.connect_task = asyncio.ensure_future(self._connect(pool, timeout))
            return
        self._upstream_failed(UpstreamError("upstream closed the connection"), connect=False)

    def upstream_pause_writing(self) -> None:
        self._pause_reading()

    def upstream_resume_writing(self) -> None:
        self.last_io = time.monotonic()
        if not (self.req_complete and self.state == PROXYING):
            self._resume_reading()

    # ------------------------------------------------------------------ failures
    def _upstream_failed(self, exc: UpstreamError, *, connect: bool,
                         bad_response: bool = False) -> None:
        cluster = self.cluster
        i = self.ep
        if i >= 0:
            self._release_ep()
            if connect:
                cluster.mark_failed(i)
                self.server.report_passive(cluster.name, cluster.endpoints[i].id, "connect_failed")
            if cluster.tracks:
                cluster.report(i, 0, time.monotonic() - self.t0)
            outcome = ("timeout" if exc.status_hint == 504 else
                       ("bad_response" if bad_response else
                        ("connect_error" if connect else "reset")))
            self.server.metrics.observe_upstream(cluster.endpoints[i].id, outcome,
                                                 time.monotonic() - self.t0)
            if self.rt is not None and self.rt.log_exchange is not None:
                if self.attempts is None:
                    self.attempts = []
                self.attempts.append((cluster.endpoints[i].id, self.t_up, time.monotonic(),
                                      outcome))
        up = self.upstream
        if up is not None:
            up.owner = None
            up.close()
            self.upstream = None
        if self.resp_started:
            self._abort(str(exc))
            return
        # Retry on another endpoint when nothing was sent (connect failure) and retries remain.
        if connect and exc.retryable and not self.body_sent:
            tried = self.tried or set()
            tried.add(i)
            self.tried = tried
            if len(tried) <= cluster.spec.max_retries and len(tried) < len(cluster.endpoints) \
                    and cluster.retry_allowed():
                self.server.metrics.inc("dispa_retries_total")
                self.ep = -1
                self._choose_and_connect()
                return
        self._respond_local(exc.status_hint, (str(exc) + "\n").encode(),
                            close=not self.req_complete)

    def on_deadline(self, now: float) -> None:
        """Called by the server's sweeper when ``deadline`` has passed."""
        st = self.state
        if st == IDLE:
            if self.in_head:
                # A request head that is taking too long (slowloris): 408, then close.
                self.head = None
                self._respond_local(408, b"request head timeout\n", close=True)
            else:
                self._close()  # keep-alive idle timeout
            return
        if st == PROXYING:
            # Progress-based limits: a response body may take as long as it needs while bytes
            # keep moving (read_timeout between upstream reads, or while the client drains),
            # and so may a request body while the upstream keeps accepting it (write_timeout).
            spec = self.cluster.pools[self.ep].spec
            if self.resp_started:
                limit, what = spec.read_timeout_seconds, "upstream read timeout"
            elif not self.req_complete:
                limit, what = spec.write_timeout_seconds, "upstream write timeout"
            else:
                limit, what = 0.0, ""
            if limit:
                if now - self.last_io < limit:
                    self.deadline = self.last_io + limit
                    return
                self._upstream_failed(UpstreamError(what, status_hint=504), connect=False)
                return
        if st == CONNECTING and self.plan_wait:
            self.plan_wait = False
            self.plan.task.cancel()
            self.state = IDLE
            self._respond_local(504, b"request phase timed out\n", close=True)
            return
        if st in (CONNECTING, PROXYING):
            if self.connect_task is not None:
                self.connect_task.cancel()
                self.connect_task = None
            self._upstream_failed(UpstreamError("upstream timed out", status_hint=504),
                                  connect=False)

    def _protocol_error(self, exc: ProtocolError) -> None:
        status = exc.status_hint
        self.server.metrics.inc("dispa_protocol_errors_total", (("status", str(status)),))
        log.info("rejected malformed request from %s: %s (%d)", self.peer_ip, exc, status,
                 extra={"fields": {"peer": self.peer_ip, "status": status, "error": str(exc)}})
        if self.state in (CONNECTING, PROXYING):
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
                return
        self.state = IDLE
        if self.head is None:
            self.t0 = time.monotonic()
            self.domain = "-"
        body = f"bad request: {exc}\n".encode() if status < 500 else f"{exc}\n".encode()
        self._respond_local(status, body, close=True)

    # ------------------------------------------------------------------ responses & finish
    def _respond_local(self, status: int, body: bytes, *, close: bool) -> None:
        """Answer the current request ourselves (interception miss, 5xx, 4xx)."""
        self._respond_with(status, _REASONS.get(status, b"Error"),
                           [(b"Content-Type", b"text/plain; charset=utf-8")], body, close=close)

    def _respond_response(self, resp) -> None:
        """Answer with a Response made by a route or a filter (phase 4 or 8)."""
        headers = [(k, v) for k, v in resp.headers.raw if k.lower() not in _FRAMING]
        if resp.body and not any(k.lower() == b"content-type" for k, _ in headers):
            headers.append((b"Content-Type", b"text/plain; charset=utf-8"))
        self._respond_with(resp.status, _REASONS.get(resp.status, b"OK"), headers, resp.body,
                           close=not (self.req_complete or not self._has_body(self.head)))

    def _respond_with(self, status: int, reason: bytes, app_headers: list, body: bytes, *,
                      close: bool) -> None:
        head = self.head
        if close or head is None or not head.keep_alive or self.close_after:
            close = True
        if status in (204, 304):
            headers = list(app_headers)
            body = b""
        else:
            headers = app_headers + [(b"Content-Length", str(len(body)).encode())]
        if self.rid:
            headers.append((b"X-Request-Id", self.rid))
        if close:
            headers.append((b"Connection", b"close"))
        elif head is not None and head.version == 10:
            headers.append((b"Connection", b"keep-alive"))
        data = write_response_head(status, reason, headers)
        if head is None or head.method != b"HEAD":
            data += body
            self.resp_bytes += len(body)
        self.transport.write(data)
        self.resp_status = status
        self._log_request(status)
        self.state = IDLE
        if close:
            self._close()
            return
        # keep-alive after a local answer: only if the request body (if any) is consumed
        req_complete = self.req_complete or not self._has_body(head)
        self._reset_exchange()
        self.req_complete = False
        self.deadline = time.monotonic() + self.server.runtime.proxy.keep_alive_timeout_seconds
        if not req_complete:
            self._close()
            return
        self._resume_reading()

    def _finish_exchange(self, conn, *, reusable: bool) -> None:
        cluster = self.cluster
        self._release_ep()
        status = self.resp_status
        self.server.metrics.observe_upstream(cluster.endpoints[self.ep].id, "ok",
                                             time.monotonic() - self.t0)
        if cluster.tracks:
            cluster.report(self.ep, status, time.monotonic() - self.t0)
        conn.owner = None
        self.upstream = None
        # Bytes after the end of the response (a body sent with HEAD, more than its
        # Content-Length) would be read as the next request's response: never pool that.
        leftover = conn.parser.take_rest()
        if reusable and self.req_complete and not conn.parser.eof and not leftover:
            cluster.pools[self.ep].release(conn)
        else:
            conn.close()
        self._log_request(status)
        keep = self.keep_alive and self.req_complete
        self.state = IDLE
        self._reset_exchange()
        if not keep or self.close_after:
            self._close()
            return
        self.deadline = time.monotonic() + self.server.runtime.proxy.keep_alive_timeout_seconds
        self._resume_reading()
        self._process()  # pipelined requests already buffered

    def _start_tunnel(self, up_rest: bytes) -> None:
        """After the upstream's 101: raw bytes both ways, or, for a WebSocket upgrade, hand
        both connections to proxy/websocket.py (``up_rest``: upstream bytes after the 101)."""
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
            held, self.ep_held = self.ep_held, False
            self.state = CLOSED
            self.server.sessions.discard(self)
            ws.take_over(self.server, self.transport, up, self.cluster,
                         self.ep if held else -1, rest, up_rest, self.peer_ip)
            return
        self.state = TUNNEL
        if up_rest:
            self.transport.write(up_rest)
        if rest:
            self.upstream.transport.write(rest)
        self._resume_reading()

    def _release_ep(self) -> None:
        """End the selector's in-flight count for the current endpoint (exactly once)."""
        if self.ep_held:
            self.ep_held = False
            self.cluster.selector.release(self.ep)

    def _abort(self, why: str) -> None:
        log.info("aborting client connection from %s: %s", self.peer_ip, why)
        self._release_ep()
        self._log_request(self.resp_status or 502)
        up = self.upstream
        if up is not None:
            up.owner = None
            up.close()
            self.upstream = None
        self.state = CLOSED
        if self.transport is not None:
            self.transport.abort()

    def _close(self) -> None:
        self._release_ep()
        if self.state == TUNNEL and self.upstream is not None:
            self.upstream.owner = None
            self.upstream.close()
            self.upstream = None
        self.state = CLOSED
        if self.transport is not None:
            self.transport.close()

    def drain(self) -> None:
        """Graceful shutdown: close now if idle, else after the current response."""
        self.close_after = True
        if self.state == IDLE and not self.req_complete:
            self._close()

    # ------------------------------------------------------------------ log phase
    def _log_request(self, status: int) -> None:
        head = self.head
        method = head.method.decode("latin-1") if head is not None else "-"
        self.server.metrics.observe_request(self.domain or "-", method, status,
                                            time.monotonic() - self.t0, self.req_bytes,
                                            self.resp_bytes)
        plan = self.plan
        if plan is not None and plan.log_hooks:
            plan.log(status, None if status < 500 and status != 499 else str(status))
        rt = self.rt if self.rt is not None else self.server.runtime
        sink = rt.log_exchange
        if sink is not None:
            gate = getattr(rt, "log_gate", None)
            if gate is None or self._log_wanted(gate, status):
                ts = getattr(rt, "trace_sink", None)
                if self.trace is not None and ts is not None:
                    ts.put_started(self._exchange_args(status))  # tracing_gate.py, 3.
                else:
                    sink(make_exchange(*self._exchange_args(status)))

    def _log_wanted(self, gate, status: int) -> bool:
        """Whether a sink can use this exchange (observability/tracing_gate.py LogGate)."""
        if gate.errors and status >= 500:
            return True
        if gate.slow and time.monotonic() - self.t0 >= gate.slow:
            return True
        if self.trace is not None:
            return True
        plan = self.plan
        return (gate.ctx_key is not None and plan is not None
                and plan.req.ctx.get(gate.ctx_key) is not None)

    def _exchange_args(self, status: int) -> tuple:
        """make_exchange's arguments for this exchange (observability/exchange.py)."""
        now = time.monotonic()
        attempts = self.attempts if self.attempts is not None else []
        ep_id = None
        if self.ep >= 0 and self.cluster is not None:
            ep_id = self.cluster.endpoints[self.ep].id
            if not (attempts and attempts[-1][0] == ep_id and attempts[-1][1] == self.t_up):
                attempts.append((ep_id, self.t_up, now, "ok"))
        return (self.t0, now, self.peer_ip, self.head, self.domain, status, self.req_bytes,
                self.resp_bytes, self.rid, self.cluster, ep_id, attempts, self.plan,
                None if status < 500 and status != 499 else str(status), "http", None,
                self.trace)
