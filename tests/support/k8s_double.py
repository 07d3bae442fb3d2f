"""A faithful double of the Kubernetes API server's list/watch API, for tests.

No API server can be installed here, so the tests run this instead. It implements the parts
of the documented API (https://kubernetes.io/docs/reference/using-api/api-concepts/) that a
discovery client depends on, with their real semantics:

* Objects (EndpointSlice, Endpoints, Service, ConfigMap, Secret) are stored with a single,
  global, increasing ``metadata.resourceVersion`` counter (etcd's revision).
* **get**: ``GET /api/v1/namespaces/<ns>/<resource>/<name>`` (404 Status when absent).
* **list**: ``GET .../<resource>`` answers ``{"kind": "<Kind>List", "apiVersion",
  "metadata": {"resourceVersion"}, "items"}``; ``limit`` + ``continue`` paginate one
  consistent snapshot; ``labelSelector`` (``k=v``, ``k==v``, ``k!=v``, ``k``, ``!k``,
  ``k in (a,b)``, ``k notin (a,b)``) and ``fieldSelector`` (``metadata.name``,
  ``metadata.namespace``) filter. A list always answers the current state (a list's
  ``resourceVersion``/``resourceVersionMatch`` are ignored: consistent reads only).
* **watch**: ``?watch=1`` streams chunked JSON lines ``{"type", "object"}``. Without a
  ``resourceVersion`` (or with ``"0"``) it starts with synthetic ADDED events for the current
  state; with one it replays every event after it, then streams live ones. An object that
  starts or stops matching the selector is sent as ADDED / DELETED (not MODIFIED), as the
  API server's watch cache does. ``allowWatchBookmarks=true`` adds BOOKMARK events (object:
  kind + ``metadata.resourceVersion`` only) every ``bookmark_interval`` seconds while idle;
  ``timeoutSeconds`` ends the stream cleanly.
* **410 Gone**: a watch from a resourceVersion older than the compaction point (``compact()``)
  gets an ERROR event whose object is a Status with code 410 (what the API server does for a
  watch), or an HTTP 410 Status answer when ``gone_as_http`` is set; a list continue token
  older than the compaction point gets HTTP 410.
* **auth**: requests need ``Authorization: Bearer <token>`` (401 Status otherwise), or, when
  the server runs TLS with a client CA, a verified client certificate.
* ``discovery_api = False`` makes the whole ``discovery.k8s.io`` group answer 404, for the
  Endpoints fallback path.

It runs its own event loop in a thread so that blocking tests and the ``dispa-server``
subprocess can use it alike; the test API (``create``/``update``/``delete``/``apply``,
``compact``, ``drop_watches``, ``stop``/``start``) is synchronous and thread-safe.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import json
import re
import ssl
import threading
import time
import uuid
from typing import Any, Optional

from aiohttp import web

__all__ = ["K8sDouble", "LabelSelector", "endpoint_slice", "endpoints_object", "service",
           "config_map", "tls_secret", "RESOURCES"]


class _Resource:
    __slots__ = ("plural", "kind", "group_version", "prefix")

    def __init__(self, plural: str, kind: str, group_version: str):
        self.plural = plural
        self.kind = kind
        self.group_version = group_version
        self.prefix = "/api/v1" if group_version == "v1" else f"/apis/{group_version}"


RESOURCES: dict[str, _Resource] = {r.kind: r for r in (
    _Resource("endpointslices", "EndpointSlice", "discovery.k8s.io/v1"),
    _Resource("endpoints", "Endpoints", "v1"),
    _Resource("services", "Service", "v1"),
    _Resource("configmaps", "ConfigMap", "v1"),
    _Resource("secrets", "Secret", "v1"),
)}
_BY_PATH = {(r.group_version, r.plural): r for r in RESOURCES.values()}


def status(code: int, reason: str, message: str) -> dict:
    """A ``meta/v1 Status`` object, as the API server sends with every error."""
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code}


# ------------------------------------------------------------------ selectors

_REQ = re.compile(r"""^\s*(?:
    (?P<not>!)\s*(?P<nkey>[\w./-]+) |
    (?P<key>[\w./-]+)\s*(?:
        (?P<op>==|=|!=)\s*(?P<value>[\w./-]*) |
        \s(?P<setop>in|notin)\s*\((?P<set>[^)]*)\) )? )\s*$""", re.X)


class LabelSelector:
    """A parsed label selector (the API's set-based grammar)."""

    def __init__(self, text: str = ""):
        self.text = text
        self.reqs: list[tuple[str, str, Any]] = []
        for part in _split_selector(text):
            m = _REQ.match(part)
            if not m:
                raise ValueError(f"unable to parse requirement: {part!r}")
            if m.group("not"):
                self.reqs.append(("!", m.group("nkey"), None))
            elif m.group("op"):
                op = "!=" if m.group("op") == "!=" else "="
                self.reqs.append((op, m.group("key"), m.group("value")))
            elif m.group("setop"):
                values = {v.strip() for v in m.group("set").split(",") if v.strip()}
                self.reqs.append((m.group("setop"), m.group("key"), values))
            else:
                self.reqs.append(("exists", m.group("key"), None))

    def matches(self, labels: Optional[dict]) -> bool:
        labels = labels or {}
        for op, key, value in self.reqs:
            have = labels.get(key)
            if op == "=" and have != value:
                return False
            if op == "!=" and have == value:
                return False
            if op == "exists" and key not in labels:
                return False
            if op == "!" and key in labels:
                return False
            if op == "in" and have not in value:
                return False
            if op == "notin" and have in value:
                return False
        return True


def _split_selector(text: str) -> list[str]:
    """Split on commas outside parentheses."""
    parts, depth, cur = [], 0, ""
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    if cur.strip():
        parts.append(cur)
    return [p for p in parts if p.strip()]


class FieldSelector:
    """``metadata.name`` / ``metadata.namespace`` with ``=``, ``==`` or ``!=``."""

    def __init__(self, text: str = ""):
        self.reqs: list[tuple[str, str, str]] = []
        for part in (p for p in text.split(",") if p.strip()):
            m = re.match(r"^\s*(metadata\.name|metadata\.namespace)\s*(==|=|!=)\s*(\S*)\s*$",
                         part)
            if not m:
                raise ValueError(f"field label not supported: {part!r}")
            self.reqs.append((m.group(1).split(".")[1], "!=" if m.group(2) == "!=" else "=",
                              m.group(3)))

    def matches(self, obj: dict) -> bool:
        meta = obj.get("metadata", {})
        for field, op, value in self.reqs:
            if (meta.get(field) == value) != (op == "="):
                return False
        return True


# ------------------------------------------------------------------ object builders

def endpoint_slice(namespace: str, service_name: str, name: str, endpoints: list,
                   ports: list[tuple[Optional[str], int]] = (("http", 80),),
                   address_type: str = "IPv4", labels: Optional[dict] = None) -> dict:
    """An EndpointSlice. ``endpoints``: ``(address, ready, serving, terminating)`` tuples (or
    just addresses, meaning ready), as the EndpointSlice controller writes them."""
    eps = []
    for n, e in enumerate(endpoints):
        addr, ready, serving, terminating = (e, True, True, False) if isinstance(e, str) else e
        eps.append({"addresses": [addr],
                    "conditions": {"ready": ready, "serving": serving,
                                   "terminating": terminating},
                    "nodeName": "node-1", "zone": "zone-a",
                    "targetRef": {"kind": "Pod", "namespace": namespace,
                                  "name": f"{service_name}-pod-{addr}"}})
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": name, "namespace": namespace,
                         "labels": {"kubernetes.io/service-name": service_name,
                                    "endpointslice.kubernetes.io/managed-by":
                                        "endpointslice-controller.k8s.io", **(labels or {})}},
            "addressType": address_type, "endpoints": eps,
            "ports": [{"name": pn, "port": p, "protocol": "TCP"} for pn, p in ports]}


def endpoints_object(namespace: str, name: str, ready: list[str], not_ready: list[str] = (),
                     ports: list[tuple[Optional[str], int]] = (("http", 80),),
                     labels: Optional[dict] = None) -> dict:
    """A core/v1 Endpoints object with one subset."""
    subset: dict = {"ports": [{"name": pn, "port": p, "protocol": "TCP"} for pn, p in ports]}
    if ready:
        subset["addresses"] = [{"ip": a} for a in ready]
    if not_ready:
        subset["notReadyAddresses"] = [{"ip": a} for a in not_ready]
    return {"apiVersion": "v1", "kind": "Endpoints",
            "metadata": {"name": name, "namespace": namespace, "labels": dict(labels or {})},
            "subsets": [subset] if (ready or not_ready) else []}


def service(namespace: str, name: str, ports: list[tuple[Optional[str], int, Any]],
            labels: Optional[dict] = None) -> dict:
    """A Service; ``ports``: ``(name, port, targetPort)``."""
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": namespace, "labels": dict(labels or {})},
            "spec": {"type": "ClusterIP", "clusterIP": "10.96.0.10",
                     "ports": [{"name": pn, "port": p, "targetPort": tp, "protocol": "TCP"}
                               for pn, p, tp in ports]}}


def config_map(namespace: str, name: str, data: dict[str, str]) -> dict:
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": name, "namespace": namespace}, "data": dict(data)}


def tls_secret(namespace: str, name: str, cert_pem: bytes, key_pem: bytes,
               ca_pem: Optional[bytes] = None) -> dict:
    data = {"tls.crt": base64.b64encode(cert_pem).decode(),
            "tls.key": base64.b64encode(key_pem).decode()}
    if ca_pem is not None:
        data["ca.crt"] = base64.b64encode(ca_pem).decode()
    return {"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
            "metadata": {"name": name, "namespace": namespace}, "data": data}


# ------------------------------------------------------------------ the server

class _Watch:
    """One open watch stream: its filter and the queue of events still to send."""

    __slots__ = ("resource", "namespace", "labels", "fields", "queue", "transport")

    def __init__(self, resource, namespace, labels, fields, transport):
        self.resource = resource
        self.namespace = namespace
        self.labels = labels
        self.fields = fields
        self.queue: asyncio.Queue = asyncio.Queue()
        self.transport = transport

    def matches(self, obj: Optional[dict]) -> bool:
        if obj is None:
            return False
        if self.namespace is not None and obj["metadata"].get("namespace") != self.namespace:
            return False
        return self.labels.matches(obj["metadata"].get("labels")) and self.fields.matches(obj)

    def translate(self, etype: str, old: Optional[dict], new: dict) -> Optional[str]:
        """The event type this watcher sees for a change ``old -> new`` (None: not at all)."""
        if etype == "DELETED":
            return "DELETED" if self.matches(old) else None
        was, now = self.matches(old), self.matches(new)
        if now:
            return "MODIFIED" if was else "ADDED"
        return "DELETED" if was else None


class K8sDouble:
    """The double; ``start()`` binds 127.0.0.1 (``port`` 0 = a free one, kept on restart)."""

    def __init__(self, *, token: Optional[str] = "test-token", port: int = 0,
                 ssl_context: Optional[ssl.SSLContext] = None, bookmark_interval: float = 1.0,
                 discovery_api: bool = True, gone_as_http: bool = False):
        self.token = token
        self.port = port
        self.ssl_context = ssl_context
        self.bookmark_interval = bookmark_interval
        self.discovery_api = discovery_api
        self.gone_as_http = gone_as_http
        self.rv = 0  # the global resourceVersion counter
        self.compacted = 0  # events at or below this were compacted away
        # (kind, namespace, name) -> object
        self.objects: dict[tuple[str, str, str], dict] = {}
        # (rv, kind, event type, old, new), in rv order, after the compaction point
        self.events: list[tuple[int, str, str, Optional[dict], dict]] = []
        # (method, path, query) of every request, for assertions
        self.requests: list[tuple[str, str, dict]] = []
        self._continues: dict[str, tuple[int, list]] = {}
        self._watches: set[_Watch] = set()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                        name="k8s-double")
        self._thread.start()
        self._runner: Optional[web.AppRunner] = None

    # ---------------------------------------------------------------- lifecycle
    def _call(self, fn, *args):
        async def run():
            return fn(*args)
        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(10)

    def start(self) -> "K8sDouble":
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    async def _start(self) -> None:
        app = web.Application(middlewares=[self._auth])
        app.router.add_get("/version", self._version)
        app.router.add_get("/apis/{group}/{version}", self._api_resources)
        app.router.add_get("/api/{version}/{plural}", self._collection)
        app.router.add_get("/api/{version}/namespaces/{ns}/{plural}", self._collection)
        app.router.add_get("/api/{version}/namespaces/{ns}/{plural}/{name}", self._get)
        app.router.add_get("/apis/{group}/{version}/{plural}", self._collection)
        app.router.add_get("/apis/{group}/{version}/namespaces/{ns}/{plural}",
                           self._collection)
        app.router.add_get("/apis/{group}/{version}/namespaces/{ns}/{plural}/{name}",
                           self._get)
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None,
                                     shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port, ssl_context=self.ssl_context,
                           reuse_address=True)
        await site.start()
        self.port = self._runner.addresses[0][1]

    def stop(self) -> None:
        """Stop serving (open watches are cut, the port refuses connections); the store is
        kept, so ``start()`` brings the same API server back on the same port."""
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(10)

    async def _stop(self) -> None:
        self._abort_watches()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def close(self) -> None:
        """Stop, cancel what is left on the double's loop, end the thread, close the loop
        (no socket or loop left for the garbage collector to warn about)."""
        if self._thread.is_alive():
            self.stop()
            asyncio.run_coroutine_threadsafe(self._cancel_rest(), self._loop).result(10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        if not self._thread.is_alive() and not self._loop.is_closed():
            self._loop.close()

    @staticmethod
    async def _cancel_rest() -> None:
        me = asyncio.current_task()
        rest = [t for t in asyncio.all_tasks() if t is not me]
        for t in rest:
            t.cancel()
        await asyncio.gather(*rest, return_exceptions=True)

    @property
    def url(self) -> str:
        return f"{'https' if self.ssl_context else 'http'}://127.0.0.1:{self.port}"

    # ---------------------------------------------------------------- test API
    def create(self, obj: dict) -> dict:
        """Store a new object (KeyError if it exists); returns it with its resourceVersion."""
        return self._call(self._write, "ADDED", obj)

    def update(self, obj: dict) -> dict:
        """Replace an existing object (KeyError if absent)."""
        return self._call(self._write, "MODIFIED", obj)

    def apply(self, obj: dict) -> dict:
        """Create or update."""
        return self._call(self._write, None, obj)

    def delete(self, kind: str, namespace: str, name: str) -> None:
        self._call(self._delete, kind, namespace, name)

    def get(self, kind: str, namespace: str, name: str) -> Optional[dict]:
        return self._call(lambda: copy.deepcopy(self.objects.get((kind, namespace, name))))

    def compact(self, rv: Optional[int] = None) -> int:
        """Move the compaction point to ``rv`` (default: now) and forget older events."""
        def run():
            self.compacted = self.rv if rv is None else rv
            self.events = [e for e in self.events if e[0] > self.compacted]
            self._continues.clear()
            return self.compacted
        return self._call(run)

    def drop_watches(self) -> int:
        """Cut every open watch connection (a network blip); returns how many."""
        return self._call(self._abort_watches)

    def open_watches(self) -> int:
        return self._call(lambda: len(self._watches))

    def bookmark_now(self) -> None:
        """Send a BOOKMARK to every watch that asked for them (else the periodic one)."""
        def run():
            for w in self._watches:
                w.queue.put_nowait(("BOOKMARK", None))
        self._call(run)

    def requests_matching(self, path_part: str, **query) -> list[tuple[str, str, dict]]:
        """Recorded requests whose path contains ``path_part`` and query has ``query``."""
        return self._call(lambda: [r for r in self.requests if path_part in r[1] and all(
            r[2].get(k) == v for k, v in query.items())])

    # ---------------------------------------------------------------- store
    def _write(self, mode: Optional[str], obj: dict) -> dict:
        obj = copy.deepcopy(obj)
        kind = obj["kind"]
        if kind not in RESOURCES:
            raise ValueError(f"unknown kind {kind}")
        meta = obj.setdefault("metadata", {})
        key = (kind, meta.get("namespace", "default"), meta["name"])
        meta["namespace"] = key[1]
        old = self.objects.get(key)
        if mode == "ADDED" and old is not None:
            raise KeyError(f"{kind} {key[1]}/{key[2]} already exists")
        if mode == "MODIFIED" and old is None:
            raise KeyError(f"{kind} {key[1]}/{key[2]} not found")
        self.rv += 1
        meta["resourceVersion"] = str(self.rv)
        if old is None:
            meta["uid"] = str(uuid.uuid4())
            meta["creationTimestamp"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        else:
            meta["uid"] = old["metadata"]["uid"]
            meta["creationTimestamp"] = old["metadata"]["creationTimestamp"]
        self.objects[key] = obj
        self._publish("ADDED" if old is None else "MODIFIED", kind, old, obj)
        return copy.deepcopy(obj)

    def _delete(self, kind: str, namespace: str, name: str) -> None:
        old = self.objects.pop((kind, namespace, name))
        self.rv += 1
        gone = copy.deepcopy(old)
        # a DELETED event carries the object as of its deletion
        gone["metadata"]["resourceVersion"] = str(self.rv)
        self._publish("DELETED", kind, old, gone)

    def _publish(self, etype: str, kind: str, old: Optional[dict], new: dict) -> None:
        self.events.append((self.rv, kind, etype, old, new))
        for w in self._watches:
            if w.resource.kind == kind:
                t = w.translate(etype, old, new)
                if t is not None:
                    w.queue.put_nowait((t, new))

    def _abort_watches(self) -> int:
        n = 0
        for w in list(self._watches):
            w.queue.put_nowait(("CLOSE", None))
            if w.transport is not None:
                w.transport.abort()
                n += 1
        self._watches.clear()
        return n

    # ---------------------------------------------------------------- HTTP
    @web.middleware
    async def _auth(self, request: web.Request, handler):
        self.requests.append((request.method, request.path, dict(request.query)))
        if self.token is not None:
            ok = request.headers.get("Authorization") == f"Bearer {self.token}"
            if not ok and self.ssl_context is not None:
                # a client certificate the TLS layer verified against the client CA
                ok = bool(request.transport and request.transport.get_extra_info("peercert"))
            if not ok:
                return web.json_response(status(401, "Unauthorized", "Unauthorized"),
                                         status=401)
        return await handler(request)

    async def _version(self, request):
        return web.json_response({"major": "1", "minor": "30", "gitVersion": "v1.30.0-double"})

    async def _api_resources(self, request):
        gv = f"{request.match_info['group']}/{request.match_info['version']}"
        if gv == "discovery.k8s.io/v1" and not self.discovery_api:
            return self._not_found(request.path)
        res = [r for r in RESOURCES.values() if r.group_version == gv]
        if not res:
            return self._not_found(request.path)
        return web.json_response({
            "kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv,
            "resources": [{"name": r.plural, "namespaced": True, "kind": r.kind,
                           "verbs": ["get", "list", "watch"]} for r in res]})

    def _not_found(self, path: str, what: str = "the server could not find the requested "
                                                "resource") -> web.Response:
        return web.json_response(status(404, "NotFound", what), status=404)

    def _resource(self, request) -> Optional[_Resource]:
        mi = request.match_info
        gv = f"{mi['group']}/{mi['version']}" if "group" in mi else mi["version"]
        if gv == "discovery.k8s.io/v1" and not self.discovery_api:
            return None
        return _BY_PATH.get((gv, mi["plural"]))

    async def _get(self, request):
        res = self._resource(request)
        if res is None:
            return self._not_found(request.path)
        ns, name = request.match_info["ns"], request.match_info["name"]
        obj = self.objects.get((res.kind, ns, name))
        if obj is None:
            return self._not_found(request.path, f'{res.plural} "{name}" not found')
        return web.json_response(obj)

    async def _collection(self, request):
        res = self._resource(request)
        if res is None:
            return self._not_found(request.path)
        ns = request.match_info.get("ns")
        q = request.query
        try:
            labels = LabelSelector(q.get("labelSelector", ""))
            fields = FieldSelector(q.get("fieldSelector", ""))
        except ValueError as exc:
            return web.json_response(status(400, "BadRequest", str(exc)), status=400)
        if q.get("watch") in ("1", "true"):
            return await self._watch(request, res, ns, labels, fields)
        return self._list(res, ns, labels, fields, q)

    def _matching(self, res, ns, labels, fields) -> list[dict]:
        out = []
        for (kind, ons, _), obj in sorted(self.objects.items()):
            if kind == res.kind and (ns is None or ons == ns) and labels.matches(
                    obj["metadata"].get("labels")) and fields.matches(obj):
                out.append(obj)
        return out

    def _list(self, res, ns, labels, fields, q) -> web.Response:
        token = q.get("continue")
        if token:
            entry = self._continues.get(token)
            if entry is None:
                return web.json_response(status(
                    410, "Expired", "The provided continue parameter is too old to display a "
                    "consistent list result. You can start a new list without the continue "
                    "parameter."), status=410)
            rv, items = entry
        else:
            rv, items = self.rv, [copy.deepcopy(o) for o in self._matching(res, ns, labels,
                                                                           fields)]
        meta: dict = {"resourceVersion": str(rv)}
        limit = int(q.get("limit", "0") or 0)
        if limit > 0 and len(items) > limit:
            rest = items[limit:]
            items = items[:limit]
            nxt = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode()
            self._continues[nxt] = (rv, rest)
            meta["continue"] = nxt
            meta["remainingItemCount"] = len(rest)
        return web.json_response({"kind": f"{res.kind}List", "apiVersion": res.group_version,
                                  "metadata": meta, "items": items})

    async def _watch(self, request, res, ns, labels, fields):
        q = request.query
        rv_text = q.get("resourceVersion", "")
        bookmarks = q.get("allowWatchBookmarks") in ("true", "1")
        timeout = float(q.get("timeoutSeconds", "0") or 0)
        try:
            since = int(rv_text) if rv_text not in ("", "0") else None
        except ValueError:
            return web.json_response(status(400, "BadRequest",
                                            f"invalid resource version {rv_text!r}"),
                                     status=400)
        gone = since is not None and since < self.compacted
        if gone and self.gone_as_http:
            return web.json_response(status(
                410, "Expired", f"too old resource version: {since} ({self.compacted})"),
                status=410)
        resp = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        if gone:
            await self._send(resp, "ERROR", status(
                410, "Expired", f"too old resource version: {since} ({self.compacted})"))
            await resp.write_eof()
            return resp
        w = _Watch(res, ns, labels, fields, request.transport)
        # backlog first (all in this loop turn, so no live event can slip in between)
        if since is None:
            for obj in self._matching(res, ns, labels, fields):
                w.queue.put_nowait(("ADDED", obj))
        else:
            for erv, kind, etype, old, new in self.events:
                if erv > since and kind == res.kind:
                    t = w.translate(etype, old, new)
                    if t is not None:
                        w.queue.put_nowait((t, new))
        self._watches.add(w)
        deadline = time.monotonic() + timeout if timeout > 0 else None
        try:
            while True:
                wait = self.bookmark_interval if bookmarks else 3600.0
                if deadline is not None:
                    wait = min(wait, deadline - time.monotonic())
                    if wait <= 0:
                        break
                try:
                    etype, obj = await asyncio.wait_for(w.queue.get(), wait)
                except asyncio.TimeoutError:
                    etype, obj = ("BOOKMARK", None) if bookmarks else ("", None)
                if etype == "CLOSE":
                    return resp
                if etype == "BOOKMARK":
                    if not bookmarks:
                        continue
                    # the queue is drained: every event up to self.rv has been sent
                    if not w.queue.empty():
                        continue
                    obj = {"kind": res.kind, "apiVersion": res.group_version,
                           "metadata": {"resourceVersion": str(self.rv)}}
                elif not etype:
                    continue
                await self._send(resp, etype, obj)
            await resp.write_eof()
        except ConnectionError:
            pass  # the client went away
        finally:
            self._watches.discard(w)
        return resp

    @staticmethod
    async def _send(resp: web.StreamResponse, etype: str, obj: dict) -> None:
        await resp.write(json.dumps({"type": etype, "object": obj}).encode() + b"\n")
