"""Routing rules and filter chains, as the Session meets them (phases 3-9 of STYLE C3).

A :class:`Pipeline` is built per snapshot next to the Runtime, only when the snapshot has
routing rules or enabled plugins; without them ``Runtime.pipeline`` is None and the
compiled Session never leaves its fast path. With them, the Session calls
:meth:`Pipeline.start` once per request head and gets back either None (nothing to do for
this request: default cluster, no hooks) or a :class:`Plan`, which it consults at fixed
points: the upstream request, the response head, each response body chunk, the end.

Order of the request phase (the original Dispa order, plus the new hooks):
global ``on_request`` hooks (before domain interception when ``apply_before_domain_match``)
-> route match -> the route's direct response / redirect -> the route's path and header
edits -> the route's own ``on_request`` hooks -> ``on_upstream_request`` hooks (global, then
the route's). Response: the route's ``on_response`` hooks (reverse order), the global ones
(reverse order), then the route's response header edits.
"""

from __future__ import annotations

import asyncio
import logging
import random

import msgspec

from dispa.plugins import registry
from dispa.plugins.api import BuildContext, Headers, Request, Response, ResponseHead
from dispa.plugins.chain import (
    EMPTY_CHAIN, Chain, StatsRegistry, call_async, call_sync, compile_chain, run_body, run_log,
)
from dispa.balancer.geo import client_ip as forwarded_client
from dispa.routing.vhost import normalize_host
from dispa.tls.acme.http01 import FILTER_NAME as ACME_HTTP01_FILTER

log = logging.getLogger("dispa.routing")

_METHODS = {}


def _method(m: bytes) -> str:
    s = _METHODS.get(m)
    if s is None:
        s = _METHODS[m] = m.decode("latin-1")
    return s


class Pipeline:
    """The compiled routing table and filter chains of one snapshot, in one worker."""

    def __init__(self, spec, runtime, state):
        self.runtime = runtime
        self.spec = spec
        stats = state.plugin_stats
        self.filters: dict[str, tuple] = {}
        try:
            for p in spec.plugins:
                cls = registry.get(p.type)
                cfg = registry.parse_config(cls, p.config)
                ctx = BuildContext(loop=state.loop, metrics=state.metrics, instance_name=p.name,
                                   clusters=tuple(runtime.clusters), logger=logging.getLogger(
                                       f"dispa.plugins.{p.name}"))
                self.filters[p.name] = (cls.build(cfg, ctx), p)
        except BaseException:
            self.close()
            raise
        self.global_chain = compile_chain(
            [fp for fp in self.filters.values() if fp[1].is_global], stats)
        global_names = set(self.global_chain.names)
        self.routes = None
        self.route_chains: dict[str, Chain] = {}
        self.route_log = spec.routing_log
        self.default_target = None
        if spec.routing is not None:
            from dispa.config.routing_model import RoutingConfig
            from dispa.routing.rules import RouteTable

            self.routes = RouteTable.build(msgspec.convert(spec.routing, RoutingConfig))
            self.default_target = self.routes.default_target or None
            for route in self.routes.rules:
                members = []
                for name in dict.fromkeys(route.plugins_request + route.plugins_response):
                    if name in global_names or name not in self.filters:
                        continue  # a filter runs at most once per request
                    flt, p = self.filters[name]
                    stage = ("both" if name in route.plugins_request
                             and name in route.plugins_response else
                             "request" if name in route.plugins_request else "response")
                    if p.stage != "both" and stage != "both" and p.stage != stage:
                        continue
                    members.append((flt, msgspec.structs.replace(
                        p, stage=p.stage if stage == "both" else stage)))
                self.route_chains[route.name] = compile_chain(members, stats)
        self.any_async = self.global_chain.async_request or any(
            c.async_request for c in self.route_chains.values())
        # Sync runners (chain.SyncRunner) for the request hooks, built once.
        self.global_run = (self.global_chain.request_runner()
                           if self.global_chain.on_request and not self.any_async else None)
        self.route_runs = {}
        self._merged: dict[str, Chain] = {}
        for name, chain in self.route_chains.items():
            if chain.empty:
                continue
            merged = self.global_chain + chain
            self._merged[name] = merged
            if not self.any_async:
                self.route_runs[name] = merged.request_runner(
                    start=len(self.global_chain.on_request))
        # Global request hooks may run for hosts that interception would reject.
        self.before_intercept = spec.apply_before_domain_match and bool(
            self.global_chain.on_request)
        # A pending ACME HTTP-01 challenge (dispa/tls/acme/http01.py) is answered for any
        # Host: such requests reach start(), which runs only the responder for them unless
        # apply_before_domain_match asks for every global filter there anyway.
        self.acme_http01 = None
        acme = self.filters.get(ACME_HTTP01_FILTER)
        if acme is not None and acme[1].is_global:
            self.before_intercept = True
            if not spec.apply_before_domain_match:
                self.acme_http01 = acme[0]
        self.geo = None
        if spec.geo is not None and self.routes is not None:
            from dispa.balancer.geo import GeoRouter, GeoRouterConfig
            self.geo = GeoRouter(msgspec.convert(spec.geo, GeoRouterConfig))
            self.routes.geo_lookup = self.geo.locate
        self.trivial = self.routes is None and self.global_chain.empty
        self.hostnames: dict[bytes, str] = {}  # raw Host -> normalised, bounded memo
        g = self.global_chain
        self.request_only = (self.routes is None and not self.any_async
                             and self.global_run is not None and not g.on_request_body
                             and not g.on_upstream_request and not g.on_response
                             and not g.on_response_body and not g.on_log)
        # The tracing filter alone: the Session checks its gate (header names, ratio draw)
        # itself and calls start() only for requests it passes (observability/tracing_gate.py).
        self.trace_gate = None
        if self.request_only and len(self.filters) == 1:
            flt, p = next(iter(self.filters.values()))
            if p.is_global and g.names == (p.name,):
                self.trace_gate = getattr(flt, "trace_gate", None)
        self._rnd = random.random
        self.mirrors = state.mirrors
        self.metrics = state.metrics

    def close(self) -> None:
        for chain in [getattr(self, "global_chain", None), *getattr(self, "_merged", {}).values()]:
            if chain is not None:
                chain.retire()
        for flt, _ in self.filters.values():
            try:
                flt.close()
            except Exception as exc:  # noqa: BLE001 - closing must not stop the swap
                log.warning("closing plugin failed: %s", exc)

    def geo_target(self, req) -> str:
        """The first usable target group for the client's location ([geo] regions)."""
        clusters = self.runtime.clusters
        choice = self.geo.choose(req.client_ip, lambda t: t in clusters and clusters[t].usable())
        req.ctx["geo"] = choice.reason
        return choice[0] if choice else ""

    def _request(self, head, host: bytes, target: bytes, client_ip: str, rid: bytes,
                 session=None):
        names = self.hostnames
        hostname = names.get(host)
        if hostname is None:
            hostname = normalize_host(host) if host else ""
            if len(names) >= 4096:
                names.clear()
            names[host] = hostname
        req = Request._of_head(_method(head.method), head, target, hostname, client_ip, rid)
        tls = getattr(session, "tls", None)
        if tls is not None:  # a TLS listener: scheme and client certificate (docs/tls.md)
            req.scheme = "https"
            req.ctx["tls"] = tls.fields
        return req

    def purge_cache(self, prefix: str | None, key: str | None, plugin: str | None) -> int:
        """Purge in every filter that has a cache (``purge``/``purge_key``); the count of
        removed entries."""
        n = 0
        for name, (flt, _) in self.filters.items():
            if plugin is not None and name != plugin:
                continue
            if key is not None and hasattr(flt, "purge_key"):
                n += flt.purge_key(key)
            elif prefix is not None and hasattr(flt, "purge"):
                n += flt.purge(prefix)
        return n

    # -- the request phase --------------------------------------------------------------

    def start(self, session, head, host: bytes, target: bytes, intercepted: bool,
              client_ip: str, rid: bytes) -> "Plan | None":
        """Begin a request. ``host`` is the raw Host (or absolute-form authority),
        ``target`` the origin-form target. Returns None for "nothing to do"."""
        if self.trivial:
            return None
        trusted = self.runtime.trusted
        if trusted._nets and trusted.contains(client_ip):
            # behind a trusted proxy: the client is the right-most untrusted XFF hop
            xff = b", ".join([v for k, v in head.headers if k.lower() == b"x-forwarded-for"])
            if xff:
                client_ip = forwarded_client(client_ip, xff, trusted.contains)
        if not intercepted and self.acme_http01 is not None:
            return self._acme_only(session, head, host, target, client_ip, rid)
        if self.request_only:
            # only sync on_request hooks, no routes: run them here and stay on the fast
            # path unless one answered or changed the request. (The compiled Session does
            # these steps itself for an intercepted plain-HTTP request from an untrusted
            # peer: _native/protocol.pyx, Session._on_head.)
            req = self._request(head, host, target, client_ip, rid, session)
            r = self.global_run(req)
            if r is None and intercepted and req.untouched():
                return None
            return self.request_only_plan(session, head, host, target, intercepted,
                                          client_ip, rid, req, r)
        plan = Plan(self, session, head, host, target, intercepted, client_ip, rid)
        if self.any_async:
            plan.task = asyncio.ensure_future(plan.request_phase_async())
        else:
            plan.request_phase_sync()
        return plan

    def request_only_plan(self, session, head, host: bytes, target: bytes, intercepted: bool,
                          client_ip: str, rid: bytes, req, r) -> "Plan":
        """The plan of a request-only pipeline whose hooks answered (``r``) or changed
        ``req``."""
        plan = Plan(self, session, head, host, target, intercepted, client_ip, rid, req)
        plan.response = r
        if r is None and not intercepted:
            plan._route()
        plan._settle()
        return plan

    def _acme_only(self, session, head, host: bytes, target: bytes, client_ip: str,
                   rid: bytes) -> "Plan":
        """A Host outside the interception while an HTTP-01 challenge is pending: the
        responder's answer, else the usual rejection; no other filter sees the request."""
        plan = Plan(self, session, head, host, target, False, client_ip, rid)
        plan.chain = EMPTY_CHAIN
        plan.response = self.acme_http01.on_request(plan.req)
        if plan.response is None:
            plan._route()  # not intercepted: the rejection
        plan._settle()
        return plan


class Plan:
    """What the pipeline decided for one request, and its hooks for the rest of it."""

    # No __slots__: most fields keep their class default for most requests, so __init__
    # sets only five (this object is made once per request).
    route = None
    cluster = None
    response: Response | None = None
    task = None
    target: bytes | None = None
    headers: list | None = None
    resp_hooks = False
    body_hooks = False
    req_body_hooks = False
    log_hooks = False
    mirror = None
    resp: ResponseHead | None = None
    status_in = 0

    def __init__(self, pipeline: Pipeline, session, head, host: bytes, target: bytes,
                 intercepted: bool, client_ip: str, rid: bytes, req=None):
        self.pipeline = pipeline
        self.session = session
        self.intercepted = intercepted
        self.req = req if req is not None else pipeline._request(head, host, target,
                                                                  client_ip, rid, session)
        self.chain = pipeline.global_chain

    # The phase is written twice (sync and async) so that a pipeline without async hooks
    # never creates a coroutine; both call the same step functions.
    def request_phase_sync(self) -> None:
        p = self.pipeline
        req = self.req
        if p.global_run is not None:
            r = p.global_run(req)
            if r is not None:
                self.response = r
                return self._settle()
        if self._route():
            return self._settle()
        chain = self.chain
        if chain is not p.global_chain:
            r = p.route_runs[self.route.name](req)
            if r is not None:
                self.response = r
                return self._settle()
        for e in chain.on_upstream_request:
            r = call_sync(e, req)
            if r is not None:
                self.response = r
                return self._settle()
        self._settle()

    async def request_phase_async(self) -> None:
        p = self.pipeline
        req = self.req
        for e in p.global_chain.on_request:
            r = await call_async(e, req)
            if r is not None:
                self.response = r
                return self._settle()
        if self._route():
            return self._settle()
        for e in self.chain.on_request[len(p.global_chain.on_request):]:
            r = await call_async(e, req)
            if r is not None:
                self.response = r
                return self._settle()
        for e in self.chain.on_upstream_request:
            r = await call_async(e, req)
            if r is not None:
                self.response = r
                return self._settle()
        self._settle()

    def _route(self) -> bool:
        """Interception, route match and route actions; True when the plan is decided."""
        p = self.pipeline
        req = self.req
        rt = p.runtime
        if not self.intercepted:
            self.response = Response(rt.reject_status, rt.reject_body,
                                     {"content-type": "text/plain; charset=utf-8"})
            return True
        name = None
        if p.routes is not None:
            m = p.routes.match(self.session_head_method(), req.host, req.path, req.query,
                               req.headers.raw, req.client_ip)
            if m is not None:
                route = m.route
                self.route = route
                req.route = route.name
                req.params = m.params
                if p.metrics is not None:
                    p.metrics.inc("dispa_routing_matches_total", (("rule", route.name),))
                if p.route_log:
                    log.info("route %s matched %s %s", route.name, req.method, req.target)
                local = route.local_response(req.host, req.path, req.query, m.params)
                if local is not None:
                    status, headers, body = local
                    resp = Response(status, body)
                    resp.headers = Headers(headers)
                    self.response = resp
                    return True
                name = route.pick_target(p._rnd())
                if route.has_request_edits:
                    new_path = route.rewrite_path(req.path, m.params)
                    if new_path != req.path:
                        req.path = new_path
                    route.edit_request_headers(req.headers)
                merged = p._merged.get(route.name)
                if merged is not None:
                    self.chain = merged
                if route.mirror is not None:
                    target, percent = route.mirror
                    if percent >= 100.0 or p._rnd() * 100.0 < percent:
                        self.mirror = p.mirrors.begin(rt.clusters.get(target), target)
            else:
                name = p.default_target
        if name == "@geo":
            name = p.geo_target(req)
        if name:
            cluster = rt.clusters.get(name)
            if cluster is None:
                self.response = Response(502, f"no target group {name!r}\n")
                return True
            self.cluster = cluster
            req.cluster = name
        return False

    def session_head_method(self) -> bytes:
        return self.req.method.encode("latin-1")

    def _settle(self) -> None:
        """After the request phase: freeze what the session needs."""
        req = self.req
        chain = self.chain
        if self.response is None:
            # (a target no hook read or wrote is unchanged: _lz bit 1 says it was split)
            if req._lz & 1 and (req._p is not req._path0 or req._q is not req._query0):
                if req.target_changed():
                    self.target = req.target.encode("latin-1")
            if req.headers.changed:
                self.headers = req.headers.raw
            if chain.on_request_body:
                self.req_body_hooks = True
        if chain.on_response or (self.route is not None and self.route.has_response_edits):
            self.resp_hooks = True
        if chain.on_response_body:
            self.body_hooks = True
        if chain.on_log:
            self.log_hooks = True

    # -- later phases (called by the session) --------------------------------------------

    def request_body(self, chunk: bytes, end: bool) -> bytes:
        """Request body hooks; may raise HTTPError (the session answers or aborts)."""
        return run_body(self.chain.on_request_body, (self.req,), chunk, end)

    def response_head(self, status: int, reason: bytes, headers: list):
        """Run the response hooks. Returns None (unchanged), a Response (replace), a
        ``(status, reason, headers)`` tuple (edited), or an awaitable of one of these."""
        resp = ResponseHead(status, Headers(headers), reason.decode("latin-1"))
        self.resp = resp
        self.status_in = status
        if self.chain.async_response:
            return asyncio.ensure_future(self._response_async(resp))
        for e in self.chain.on_response:
            r = call_sync(e, self.req, resp)
            if r is not None:
                return r
        return self._response_done(resp)

    async def _response_async(self, resp: ResponseHead):
        for e in self.chain.on_response:
            r = await call_async(e, self.req, resp)
            if r is not None:
                return r
        return self._response_done(resp)

    def _response_done(self, resp: ResponseHead):
        if self.route is not None and self.route.has_response_edits:
            self.route.edit_response_headers(resp.headers)
        if resp.headers.changed or resp.status != self.status_in:
            return (resp.status, resp.reason.encode("latin-1"), resp.headers.raw)
        return None

    def response_body(self, chunk: bytes, end: bool) -> bytes:
        return run_body(self.chain.on_response_body, (self.req, self.resp), chunk, end)

    def log(self, status: int, error: str | None) -> None:
        run_log(self.chain.on_log, self.req, status, error)


def render_local(resp: Response, rid: bytes, close: bool, version: int, head_only: bool
                 ) -> tuple[int, list, bytes]:
    """Headers of a Response the proxy writes itself: its own, plus framing."""
    headers = [(k, v) for k, v in resp.headers.raw
               if k.lower() not in (b"content-length", b"transfer-encoding", b"connection")]
    if not any(k.lower() == b"content-type" for k, _ in headers) and resp.body:
        headers.append((b"Content-Type", b"text/plain; charset=utf-8"))
    headers.append((b"Content-Length", str(len(resp.body)).encode()))
    if rid:
        headers.append((b"X-Request-Id", rid))
    if close:
        headers.append((b"Connection", b"close"))
    elif version == 10:
        headers.append((b"Connection", b"keep-alive"))
    return resp.status, headers, b"" if head_only else resp.body
