"""HTTP/2 streams forwarded to HTTP/2 upstreams, with gRPC semantics (docs/grpc.md).

Theory of operation
-------------------
:func:`route_stream` is asked by :class:`~dispa.proxy.h2_session.H2Session` for every new
request stream. When the route the request matches sends it to a target group with
``protocol = "h2c" | "h2"`` it returns an :class:`UpstreamH2Stream`; otherwise None, and the
stream goes through the HTTP/1.1 Session bridge. The route is peeked with the compiled
``RouteTable.match`` (no filter runs); the request phase proper (interception, global and
route filters, header edits, the route's target choice) then runs once, in
:class:`UpstreamH2Stream`, through the same ``Pipeline.start`` as HTTP/1.1.

The stream is then forwarded as an HTTP/2 stream on a multiplexed upstream connection
(:mod:`dispa.proxy.h2_pool`), frames both ways with flow control end to end, trailers kept.

gRPC (``content-type: application/grpc*``):

- ``grpc-timeout`` (``10S``, ``250m`` ...) sets the stream's deadline (bounded by the
  endpoint timeout); when it passes, the upstream stream is cancelled and the client gets
  DEADLINE_EXCEEDED;
- a proxy failure is answered as a *trailers-only* response (HTTP 200, ``grpc-status``,
  ``grpc-message``) rather than an HTTP error body: no endpoint or connect failure ->
  UNAVAILABLE (14), timeout -> DEADLINE_EXCEEDED (4), upstream connections full ->
  RESOURCE_EXHAUSTED (8), upstream reset mid-stream -> UNAVAILABLE (or CANCELLED),
  filter/interception answers map their HTTP status per the gRPC HTTP mapping;
- per-method metrics: ``dispa_grpc_requests_total{method, code}`` (method names bounded per
  worker) and the HTTP request metrics as for any request.

Health checks of gRPC upstreams (``grpc.health.v1.Health/Check``):
:func:`dispa.protocols.http2.grpc_health.grpc_probe` (asyncio, for the active checker) and
:func:`health_check` (blocking).
"""

from __future__ import annotations

import asyncio
import logging
import time

from h2.errors import ErrorCodes

from dispa.errors import UpstreamError
from dispa.protocols.http2.grpc_health import grpc_probe
from dispa.proxy.forwarding import forwarding_headers
from dispa.proxy.h2_pool import pool_for
from dispa.proxy.h2_session import StreamBase, _response_headers
from dispa.routing.vhost import normalize_host

log = logging.getLogger("dispa.grpc")

# gRPC status codes (grpc/doc/statuscodes.md)
OK, CANCELLED, UNKNOWN, DEADLINE_EXCEEDED = 0, 1, 2, 4
PERMISSION_DENIED, RESOURCE_EXHAUSTED, UNIMPLEMENTED, INTERNAL = 7, 8, 12, 13
UNAVAILABLE, UNAUTHENTICATED = 14, 16

# HTTP status -> gRPC status (grpc/doc/http-grpc-status-mapping.md)
_HTTP_TO_GRPC = {400: INTERNAL, 401: UNAUTHENTICATED, 403: PERMISSION_DENIED,
                 404: UNIMPLEMENTED, 429: UNAVAILABLE, 502: UNAVAILABLE, 503: UNAVAILABLE,
                 504: UNAVAILABLE}
_TIMEOUT_UNITS = {b"H": 3600.0, b"M": 60.0, b"S": 1.0, b"m": 1e-3, b"u": 1e-6, b"n": 1e-9}
_HOP_REQUEST = frozenset({b"connection", b"keep-alive", b"proxy-connection",
                          b"transfer-encoding", b"upgrade", b"host", b"http2-settings"})
_METHOD_LABEL_LIMIT = 1000
GRPC_METRIC = "dispa_grpc_requests_total"


def grpc_status_for_http(status: int) -> int:
    return _HTTP_TO_GRPC.get(status, UNKNOWN)


def parse_grpc_timeout(value: bytes | None) -> float | None:
    """Seconds from a ``grpc-timeout`` value (1-8 digits and a unit), None if absent/bad."""
    if not value or len(value) < 2 or len(value) > 9:
        return None
    digits, unit = value[:-1], value[-1:]
    if not digits.isdigit() or unit not in _TIMEOUT_UNITS:
        return None
    return int(digits) * _TIMEOUT_UNITS[unit]


_h2_cluster_cache: dict[int, tuple] = {}


def _h2_clusters(rt) -> frozenset:
    hit = _h2_cluster_cache.get(id(rt))
    if hit is not None and hit[0] is rt:
        return hit[1]
    names = frozenset(n for n, c in rt.clusters.items()
                      if getattr(c.spec, "protocol", "http1") != "http1")
    if len(_h2_cluster_cache) > 8:
        _h2_cluster_cache.clear()
    _h2_cluster_cache[id(rt)] = (rt, names)
    return names


def route_stream(h2s, sid: int, pseudo: dict, fields: list, ended: bool):
    """An UpstreamH2Stream when the request goes to an HTTP/2 target group, else None."""
    rt = h2s.server.runtime
    h2c = _h2_clusters(rt)
    if not h2c:
        return None
    method = pseudo.get(b":method", b"GET")
    path = pseudo.get(b":path", b"/")
    authority = pseudo.get(b":authority") or _get(fields, b"host") or b""
    pipeline = rt.pipeline
    name = rt.default_cluster.name
    if pipeline is not None and pipeline.routes is not None:
        p, _, q = path.decode("latin-1").partition("?")
        m = pipeline.routes.match(method, normalize_host(authority) or "", p, q, fields,
                                  h2s.peer_ip)
        if m is None:
            name = pipeline.default_target or name
        else:
            route = m.route
            if route.direct:
                return None
            targets = [t for t, _ in route.split] or [route.target]
            if not all(t in h2c for t in targets):
                return None
            name = targets[0]
    if name not in h2c:
        return None
    return UpstreamH2Stream(h2s, sid, method, path, authority, pseudo, fields, ended, rt)


def _get(fields, name: bytes):
    for n, v in fields:
        if n == name:
            return v
    return None


class StreamHead:
    """A request head with the parser's RequestHead API, for the request pipeline."""

    __slots__ = ("method", "target", "headers", "version", "content_length", "chunked",
                 "keep_alive", "upgrade", "expect_continue")

    def __init__(self, method: bytes, target: bytes, headers: list, ended: bool):
        self.method = method
        self.target = target
        self.headers = headers
        self.version = 11
        cl = _get(headers, b"content-length")
        self.content_length = int(cl) if cl is not None and cl.isdigit() else (
            0 if ended else -1)
        self.chunked = False
        self.keep_alive = True
        self.upgrade = False
        self.expect_continue = False

    def get(self, name: bytes, default=None):
        name = name.lower()
        for n, v in self.headers:
            if n.lower() == name:
                return v
        return default

    def get_all(self, name: bytes) -> list:
        name = name.lower()
        return [v for n, v in self.headers if n.lower() == name]


class UpstreamH2Stream(StreamBase):
    """One client stream proxied to an HTTP/2 upstream (see the module docstring)."""

    __slots__ = ("rt", "head", "is_grpc", "method", "path", "authority", "rid", "t0",
                 "domain", "plan", "cluster", "ep", "conn", "up_sid", "req_ended",
                 "req_trailers", "pending", "status", "grpc_code", "timer", "tried",
                 "req_bytes", "resp_bytes", "finished", "body_sent", "t_up", "up_unacked",
                 "deadline_s", "scheme", "ep_held", "hard_deadline")

    def __init__(self, h2s, sid, method, path, authority, pseudo, fields, ended, rt):
        super().__init__(h2s, sid)
        server = h2s.server
        self.rt = rt
        self.method = method
        self.path = path
        self.authority = authority
        self.scheme = b"https" if h2s.tls is not None else b"http"
        self.head = StreamHead(method, path, [(b"host", authority)] + [
            (n, v) for n, v in fields if n != b"host"], ended)
        ctype = _get(fields, b"content-type") or b""
        self.is_grpc = ctype.startswith(b"application/grpc")
        self.t0 = time.monotonic()
        self.domain = server.domain_label(authority)
        self.plan = None
        self.cluster = None
        self.ep = -1
        self.conn = None
        self.up_sid = 0
        self.req_ended = ended
        self.req_trailers = None
        self.pending: list = []  # request DATA before the upstream stream exists
        self.status = 0
        self.grpc_code = None
        self.timer = None
        self.tried: set | None = None
        self.req_bytes = 0
        self.resp_bytes = 0
        self.finished = False
        self.body_sent = False
        self.t_up = 0.0
        self.up_unacked = 0
        self.ep_held = False
        rid_name = rt.request_id_header
        rid = b""
        if rid_name:
            rid = self.head.get(rid_name)
            if rid is None or len(rid) > 200 or not rid.isascii():
                rid = server.next_request_id()
        self.rid = rid
        # deadline: grpc-timeout, within the request timeout
        limit = rt.proxy.request_timeout_seconds
        gt = parse_grpc_timeout(_get(fields, b"grpc-timeout")) if self.is_grpc else None
        self.deadline_s = min(limit, gt) if gt is not None else limit
        # grpc-timeout bounds the whole call; otherwise the request timeout bounds the wait
        # for the response head, and a stream then lasts as long as it needs (long-lived
        # gRPC streams, downloads)
        self.hard_deadline = gt is not None
        self.timer = asyncio.get_running_loop().call_later(self.deadline_s, self._timed_out,
                                                           gt is not None and gt <= limit)
        self._request_phase()

    # ------------------------------------------------------------------ request phase
    def _request_phase(self) -> None:
        rt = self.rt
        host = self.authority
        intercepted = rt.intercept.match(host)
        pipeline = rt.pipeline
        if not intercepted and (pipeline is None or not pipeline.before_intercept):
            self._local(rt.reject_status, rt.reject_body)
            return
        self.cluster = rt.default_cluster
        if pipeline is not None:
            plan = pipeline.start(self, self.head, host, self.path, intercepted,
                                  self.h2s.peer_ip, self.rid)
            if plan is not None:
                self.plan = plan
                if plan.task is not None:
                    self.pause_in()
                    plan.task.add_done_callback(self._plan_done)
                    return
        self._plan_continue()

    def _plan_done(self, task) -> None:
        if self.done or task.cancelled():
            return
        if task.exception() is not None:
            log.error("request phase failed: %r", task.exception())
            self._local(500, b"internal error\n")
            return
        self.resume_in()
        self._plan_continue()

    def _plan_continue(self) -> None:
        plan = self.plan
        if plan is not None:
            if plan.response is not None:
                r = plan.response
                self._local(r.status, r.body, [(k.lower(), v) for k, v in r.headers.raw])
                return
            if plan.cluster is not None:
                self.cluster = plan.cluster
            if plan.headers is not None:
                self.head.headers = list(plan.headers)
            if plan.target is not None:
                self.path = plan.target
        if getattr(self.cluster.spec, "protocol", "http1") == "http1":
            self._fail(UpstreamError("route mixes HTTP/1.1 and HTTP/2 target groups"), False)
            return
        self._choose()

    def _choose(self) -> None:
        cluster = self.cluster
        i = cluster.pick(self.h2s.peer_ip, self.tried, self.head)
        if i < 0:
            self._fail(UpstreamError("no upstream endpoint available", status_hint=503),
                       False)
            return
        self.ep = i
        cluster.selector.acquire(i)
        self.ep_held = True
        self.t_up = time.monotonic()
        pool = pool_for(self.h2s.server.state, cluster, i)
        conn = pool.take()
        if conn is not None:
            self._attach(conn)
            return
        timeout = min(cluster.pools[i].spec.connect_timeout_seconds, cluster.ep_timeouts[i])
        asyncio.ensure_future(self._connect(pool, timeout))

    async def _connect(self, pool, timeout) -> None:
        try:
            conn = await pool.get(timeout)
        except UpstreamError as exc:
            if not self.done:
                self._upstream_failed(exc, connect=True)
            return
        except asyncio.CancelledError:
            return
        if self.done:
            return
        self._attach(conn)

    def _attach(self, conn) -> None:
        self.conn = conn
        head = self.head
        headers = [(b":method", self.method), (b":scheme", self.scheme),
                   (b":authority", self.authority), (b":path", self.path)]
        for n, v in head.headers:
            n = n.lower()
            if n in _HOP_REQUEST or n in self.rt.drop_request:
                continue
            if n == b"te" and v.lower() != b"trailers":
                continue
            headers.append((n, v))
        trusted = self.rt.trusted.contains(self.h2s.peer_ip)
        for n, v in forwarding_headers(head, self.h2s.peer_ip, trusted, self.rt.via,
                                       self.scheme, host=self.authority):
            headers.append((n.lower(), v))
        rid_name = self.rt.request_id_header
        if rid_name:
            headers.append((rid_name, self.rid))
        tls = self.h2s.tls
        if tls is not None and tls.headers:
            headers += [(n.lower(), v) for n, v in tls.headers]
        end = self.req_ended and not self.pending and self.req_trailers is None
        try:
            self.up_sid = conn.open_stream(self, headers, end)
        except Exception as exc:  # noqa: BLE001 - h2 refused (connection closing)
            self._upstream_failed(UpstreamError(f"upstream stream refused: {exc}",
                                                retryable=True), connect=True)
            return
        for chunk in self.pending:
            conn.send_data(self.up_sid, chunk)
            self.body_sent = True
        self.pending = []
        if self.req_ended and not end:
            conn.end_stream(self.up_sid, self.req_trailers)

    # ------------------------------------------------------------------ client -> upstream
    def on_data(self, data: bytes) -> None:
        if self.done:
            return
        self.req_bytes += len(data)
        if self.plan is not None and self.plan.req_body_hooks:
            try:
                data = self.plan.request_body(data, False)
            except Exception as exc:  # noqa: BLE001 - a filter refused the body
                self._local(getattr(exc, "status", 500) if isinstance(
                    getattr(exc, "status", None), int) else 500, b"request body refused\n")
                return
        if not data:
            return
        if self.conn is None or not self.up_sid:
            self.pending.append(data)
            self.pause_in()  # no WINDOW_UPDATE until the upstream stream exists
            return
        self.body_sent = True
        self.conn.send_data(self.up_sid, data)
        if self.conn.queued(self.up_sid) > self.h2s.limits.stream_buffer_bytes:
            self.pause_in()

    def on_end(self, trailers) -> None:
        self.req_ended = True
        self.req_trailers = trailers
        if self.done:
            return
        if self.conn is not None and self.up_sid:
            self.conn.end_stream(self.up_sid, trailers)

    def on_reset(self) -> None:
        """The client reset the stream: cancel the upstream one."""
        self.done = True
        if self.conn is not None and self.up_sid:
            self.conn.reset(self.up_sid, ErrorCodes.CANCEL)
        if not self.finished:
            self._finish(499)

    def up_writable(self) -> None:
        if self.in_paused and self.conn is not None and \
                self.conn.queued(self.up_sid) <= self.h2s.limits.stream_buffer_bytes // 2:
            self.resume_in()

    # ------------------------------------------------------------------ upstream -> client
    def up_informational(self, headers) -> None:
        if not self.done:
            self.h2s.send_headers(self, [(n, v) for n, v in headers
                                         if n == b":status" or n not in _HOP_REQUEST],
                                  end=False)

    def up_response(self, headers, ended: bool = False) -> None:
        if self.done:
            return
        status = 0
        out = []
        for n, v in headers:
            if n == b":status":
                status = int(v)
            else:
                out.append((n, v))
        self.status = status
        if not self.hard_deadline and self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.rid:
            out = [(n, v) for n, v in out if n != b"x-request-id"]
            out.append((b"x-request-id", self.rid))
        if self.grpc_code is None:
            gs = _get(out, b"grpc-status")
            if gs is not None and gs.isdigit():
                self.grpc_code = int(gs)  # trailers-only response from the upstream
        if ended:  # HEADERS with END_STREAM (gRPC trailers-only): keep it one frame
            self.headers_sent = True
            self.h2s.send_headers(self, _response_headers(status, out), end=True)
            self._finish(status)
            return
        self.h2s.response_head(self, status, out)

    def up_data(self, data: bytes, n: int) -> None:
        if self.done:
            if n:
                self.conn.ack(self.up_sid, n)
            return
        self.resp_bytes += len(data)
        self.up_unacked += n
        if data:
            self.h2s.queue_data(self, data)
        if not self.producer_paused:
            self._ack_up()

    def _ack_up(self) -> None:
        n, self.up_unacked = self.up_unacked, 0
        if n and self.conn is not None:
            self.conn.ack(self.up_sid, n)

    def pause_producer(self) -> None:
        self.producer_paused = True  # upstream DATA is no longer acknowledged

    def resume_producer(self) -> None:
        self.producer_paused = False
        self._ack_up()

    def up_trailers(self, headers) -> None:
        gs = _get(headers, b"grpc-status")
        if gs is not None and gs.isdigit():
            self.grpc_code = int(gs)
        if not self.done:
            self.h2s.queue_end(self, list(headers))
        self._finish(self.status)

    def up_end(self) -> None:
        if not self.done and not self.finished:
            self.h2s.queue_end(self, None)
        self._finish(self.status)

    def up_reset(self, code) -> None:
        if self.finished or self.done:
            return
        retry = code == ErrorCodes.REFUSED_STREAM and not self.body_sent and not self.status
        self.conn = None
        self.up_sid = 0
        exc = UpstreamError(f"upstream reset the stream ({_code_name(code)})",
                            retryable=retry)
        if self.status:
            self._abort_midstream(exc, code)
            return
        self._upstream_failed(exc, connect=retry)

    def up_lost(self, exc) -> None:
        if self.finished or self.done:
            return
        self.conn = None
        err = UpstreamError("upstream closed the connection",
                            retryable=not self.body_sent and not self.status)
        if self.status:
            self._abort_midstream(err, ErrorCodes.INTERNAL_ERROR)
            return
        self._upstream_failed(err, connect=not self.body_sent)

    # ------------------------------------------------------------------ failures & finish
    def _upstream_failed(self, exc: UpstreamError, *, connect: bool) -> None:
        cluster = self.cluster
        i = self.ep
        server = self.h2s.server
        if i >= 0:
            self._release()
            if connect and exc.status_hint != 503:
                cluster.mark_failed(i)
                server.report_passive(cluster.name, cluster.endpoints[i].id, "connect_failed")
            server.metrics.observe_upstream(cluster.endpoints[i].id,
                                            "timeout" if exc.status_hint == 504 else
                                            ("connect_error" if connect else "reset"),
                                            time.monotonic() - self.t0)
            if connect and exc.retryable and not self.body_sent:
                tried = self.tried or set()
                tried.add(i)
                self.tried = tried
                if len(tried) <= cluster.spec.max_retries and \
                        len(tried) < len(cluster.endpoints) and cluster.retry_allowed():
                    server.metrics.inc("dispa_retries_total")
                    self.ep = -1
                    self._choose()
                    return
            self.ep = -1  # counted above as a failure, not as "ok" in _finish
        self._fail(exc, connect)

    def _fail(self, exc: UpstreamError, connect: bool) -> None:
        """Answer a proxy failure: gRPC trailers-only, or an HTTP error."""
        if self.is_grpc:
            hint = exc.status_hint
            if getattr(exc, "exhausted", False):
                code = RESOURCE_EXHAUSTED
            elif hint == 504:
                code = DEADLINE_EXCEEDED
            else:
                code = UNAVAILABLE
            self._grpc_trailers_only(code, str(exc), 200)
            self._finish(hint if hint != 502 or not connect else 502)
            return
        self._local(exc.status_hint, (str(exc) + "\n").encode())

    def _abort_midstream(self, exc, code) -> None:
        if self.is_grpc and not self.reset_sent:
            self.grpc_code = CANCELLED if code == ErrorCodes.CANCEL else UNAVAILABLE
            self.h2s.queue_end(self, [(b"grpc-status", str(self.grpc_code).encode()),
                                      (b"grpc-message", str(exc).encode())])
        else:
            self.h2s.reset_stream(self, ErrorCodes.INTERNAL_ERROR)
        self._release()
        self._finish(self.status or 502)

    def _timed_out(self, grpc_deadline: bool) -> None:
        self.timer = None
        if self.finished or self.done:
            return
        if self.conn is not None and self.up_sid:
            self.conn.reset(self.up_sid, ErrorCodes.CANCEL)
            self.conn = None
        self._release()
        if self.ep >= 0:
            self.h2s.server.metrics.observe_upstream(self.cluster.endpoints[self.ep].id,
                                                     "timeout", time.monotonic() - self.t0)
            self.ep = -1
        exc = UpstreamError("deadline exceeded" if grpc_deadline else "upstream timed out",
                            status_hint=504)
        if self.headers_sent:
            if self.is_grpc:
                self.grpc_code = DEADLINE_EXCEEDED
                self.h2s.queue_end(self, [(b"grpc-status", b"4"),
                                          (b"grpc-message", b"deadline exceeded")])
            else:
                self.h2s.reset_stream(self, ErrorCodes.CANCEL)
            self._finish(self.status)
            return
        self._fail(exc, False)

    def _grpc_trailers_only(self, code: int, message: str, status: int = 200) -> None:
        self.grpc_code = code
        self.status = status
        headers = [(b":status", str(status).encode()), (b"content-type", b"application/grpc"),
                   (b"grpc-status", str(code).encode()),
                   (b"grpc-message", message.encode("utf-8", "replace")[:256])]
        if self.rid:
            headers.append((b"x-request-id", self.rid))
        self.h2s.send_headers(self, headers, end=True)

    def _local(self, status: int, body: bytes, headers: list | None = None) -> None:
        """Answer ourselves (interception miss, filter answer, error)."""
        if self.is_grpc:
            self._grpc_trailers_only(grpc_status_for_http(status),
                                     body.decode("utf-8", "replace").strip() or str(status))
            self.status = status
            self._finish(status)
            return
        self.status = status
        h = _response_headers(status, headers or [])
        if not any(n == b"content-type" for n, _ in h) and body:
            h.append((b"content-type", b"text/plain; charset=utf-8"))
        h.append((b"content-length", str(len(body)).encode()))
        if self.rid:
            h.append((b"x-request-id", self.rid))
        self.headers_sent = True
        if body and self.method != b"HEAD":
            self.h2s.send_headers(self, h, end=False)
            self.h2s.queue_data(self, body)
            self.h2s.queue_end(self, None)
        else:
            self.h2s.send_headers(self, h, end=True)
        self.resp_bytes += len(body)
        self._finish(status)

    def _release(self) -> None:
        """End the selector's in-flight count for the endpoint (exactly once)."""
        if self.ep_held:
            self.ep_held = False
            self.cluster.selector.release(self.ep)

    def _finish(self, status: int) -> None:
        if self.finished:
            return
        self.finished = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        server = self.h2s.server
        cluster = self.cluster
        now = time.monotonic()
        ep_id = None
        if cluster is not None and self.ep >= 0:
            ep_id = cluster.endpoints[self.ep].id
            self._release()
            if status and status != 499:
                server.metrics.observe_upstream(ep_id, "ok", now - self.t0)
                if cluster.tracks:
                    cluster.report(self.ep, status, now - self.t0)
        method = self.method.decode("latin-1")
        server.metrics.observe_request(self.domain or "-", method, status or 502,
                                       now - self.t0, self.req_bytes, self.resp_bytes)
        if self.is_grpc:
            code = self.grpc_code if self.grpc_code is not None else (
                CANCELLED if status == 499 else UNKNOWN)
            server.metrics.inc(GRPC_METRIC, (("method", _method_label(server, self.path)),
                                             ("code", str(code))))
        plan = self.plan
        if plan is not None and plan.log_hooks:
            plan.log(status, None if status < 500 and status != 499 else str(status))
        sink = self.rt.log_exchange
        if sink is not None:
            from dispa.observability.exchange import make_exchange
            attempts = [(ep_id, self.t_up, now, "ok")] if ep_id else []
            sink(make_exchange(self.t0, now, self.h2s.peer_ip, self.head, self.domain,
                               status, self.req_bytes, self.resp_bytes, self.rid, cluster,
                               ep_id, attempts, plan,
                               None if status < 500 and status != 499 else str(status)))


def _method_label(server, path: bytes) -> str:
    labels = server.__dict__.setdefault("_grpc_methods", {})
    label = labels.get(path)
    if label is None:
        if len(labels) >= _METHOD_LABEL_LIMIT:
            return "other"  # bounded: clients cannot grow the label set
        label = path.split(b"?", 1)[0].decode("latin-1")
        labels[path] = label
    return label


def _code_name(code) -> str:
    try:
        return ErrorCodes(code).name
    except ValueError:
        return str(code)


# ---------------------------------------------------------------------- health checks

def health_check(host: str, port: int, service: str = "", timeout: float = 2.0) -> bool:
    """Blocking ``grpc.health.v1.Health/Check`` over h2c: True when SERVING (tools, tests).
    The asyncio probe for active checks is
    :func:`dispa.protocols.http2.grpc_health.grpc_probe`."""
    from types import SimpleNamespace

    spec = SimpleNamespace(timeout_seconds=timeout, host="")
    endpoint = SimpleNamespace(host=host, port=port)
    ok, _ = asyncio.run(grpc_probe(endpoint, spec, service=service))
    return ok
