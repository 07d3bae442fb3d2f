"""A faithful double of the part of Consul's HTTP API that Dispa uses.

No Consul server can be installed in this project's test environment, so the Consul
provider is tested against this aiohttp.web server on 127.0.0.1. It follows the documented
API (https://developer.hashicorp.com/consul/api-docs), not Dispa's expectations:

* **Raft-like index.** One global index, incremented by every write. Each object records the
  index that created and last modified it. A query answers with ``X-Consul-Index``: the
  highest index of what it read (per service, per KV prefix including tombstones), or, for
  something that does not exist, the index of its table. Never below 1.
* **Blocking queries** (``/features/blocking``): with ``?index=N`` (N > 0) the request waits
  until the query's index is greater than N or ``wait`` elapses (default 5m, at most 10m, Go
  duration syntax), then answers with the current data, changed or not. Consul adds up to
  ``wait/16`` of random jitter; ``jitter=True`` does too (off by default so that tests can
  bound the time).
* **Health** ``GET /v1/health/service/<svc>``: ``[{"Node", "Service", "Checks"}]`` with
  ``passing`` (only entries whose checks, node checks included, are all passing), ``tag``
  (repeatable: every tag must be present), ``dc``. **Catalog** ``GET
  /v1/catalog/service/<svc>``: the flat ``ServiceAddress``/``ServicePort``/... shape, same
  filters but not ``passing``. An unknown ``dc`` is a 500 "No path to datacenter".
* **Agent** ``PUT /v1/agent/service/register`` (``Check: {TTL, DeregisterCriticalServiceAfter,
  Status}``; the check is ``service:<ID>`` and starts critical unless ``Status`` says
  otherwise), ``PUT /v1/agent/check/pass|warn|fail/<check>``, ``PUT
  /v1/agent/service/deregister/<id>``. A TTL check that sees no update within its TTL turns
  critical ("TTL expired"); a service whose check stays critical longer than
  DeregisterCriticalServiceAfter is deregistered by the reaper. Consul's reaper runs every
  30 s and refuses a timeout under 1 minute; both are parameters here (``reap_interval``,
  ``min_deregister_after``) so that tests run in seconds.
* **Catalog writes** ``PUT /v1/catalog/register`` / ``PUT /v1/catalog/deregister`` (other
  nodes, other datacenters, ``Service.Address`` empty so that ``Node.Address`` applies).
* **KV** ``GET /v1/kv/<key>`` (``recurse``, ``raw``; 404 when nothing matches, with the
  index header, so that a blocking query on an empty prefix still blocks), ``PUT`` (body =
  value, ``flags``; answers ``true``), ``DELETE`` (``recurse``). Values are base64 in JSON.
  Deleting leaves a tombstone so that the prefix index does not go backwards;
  :meth:`ConsulDouble.reap_tombstones` removes them, which *does* make it go backwards,
  exactly the case the blocking-query docs warn about.
* **ACL** (``acl_tokens`` given): ``X-Consul-Token`` (or ``Authorization: Bearer``, or the
  legacy ``?token=``) must name a known token, else 403 "ACL not found"; a request without a
  token is the anonymous token, denied here ("Permission denied": Consul would filter
  reads to nothing, the double refuses them, which is the louder of the two); a ``read``
  token may not write. A ``"none"`` token is valid but has no ``service:read``/``node:read``:
  as Consul does for such a token, health and catalog queries answer 200 with the entries it
  may not see filtered out (here: all of them) and ``X-Consul-Results-Filtered-By-ACLs:
  true`` (Consul 1.12+).

Not modelled: the ``filter`` expression language, ``near``, ``node-meta``, namespaces,
sessions, KV ``cas``/locks, streaming. A request using them gets a 400 so that a client
that starts depending on one is noticed.

Runs its own event loop in a thread so that blocking tests and asyncio tests can both use
it. ``stop()`` closes the listener and every connection but keeps the state; ``start()``
again comes back on the same port (an agent restart). ``requests`` records
``(method, path, query, token)`` of every request.
"""

from __future__ import annotations

import asyncio
import base64
import http.client
import json
import random
import re
import threading
import time
from typing import Any, Optional

from aiohttp import web

__all__ = ["ConsulDouble", "parse_duration"]

_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNIT = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
MAX_WAIT = 600.0  # Consul caps wait at 10 minutes
DEFAULT_WAIT = 300.0  # and defaults it to 5


def parse_duration(text: str) -> float:
    """A Go ``time.Duration`` string ("10s", "1m30s", "250ms") in seconds; a bare number is
    seconds (Consul accepts ``wait=10`` too). ValueError if malformed."""
    text = text.strip()
    if re.fullmatch(r"\d+(\.\d*)?", text):
        return float(text)
    pos, total = 0, 0.0
    for m in _DURATION.finditer(text):
        if m.start() != pos:
            raise ValueError(f"time: invalid duration {text!r}")
        total += float(m.group(1)) * _UNIT[m.group(2)]
        pos = m.end()
    if pos != len(text) or not text:
        raise ValueError(f"time: invalid duration {text!r}")
    return total


class _Error(Exception):
    def __init__(self, status: int, text: str):
        super().__init__(text)
        self.status = status
        self.text = text


class ConsulDouble:
    """See the module docstring. ``address`` is ``http://127.0.0.1:<port>`` once started."""

    def __init__(self, *, datacenter: str = "dc1", datacenters: tuple[str, ...] = (),
                 node: str = "consul-node", node_address: str = "127.0.0.1",
                 acl_tokens: Optional[dict[str, str]] = None, jitter: bool = False,
                 reap_interval: float = 30.0, min_deregister_after: float = 60.0,
                 start_index: int = 10, port: int = 0):
        self.datacenter = datacenter
        self.datacenters = {datacenter, *datacenters}
        self.node = node
        self.node_address = node_address
        # token -> "none" | "read" | "write"; None = ACLs disabled
        self.acl_tokens = acl_tokens
        self.jitter = jitter
        self.reap_interval = reap_interval
        self.min_deregister_after = min_deregister_after
        self.port = port
        self.requests: list[tuple[str, str, dict, str]] = []
        # A test switch: answer X-Consul-Index 0 (a Consul bug the docs tell clients to
        # survive: treat it as 1, never as "don't block").
        self.force_index_zero = False
        self._index = start_index
        self._table_index: dict[str, int] = {"nodes": start_index, "services": start_index,
                                             "checks": start_index, "kvs": start_index}
        # dc -> node -> node dict;  dc -> (node, service id) -> service dict;
        # dc -> (node, check id) -> check dict (+ private TTL fields)
        self._nodes: dict[str, dict[str, dict]] = {dc: {} for dc in self.datacenters}
        self._services: dict[str, dict[tuple[str, str], dict]] = {
            dc: {} for dc in self.datacenters}
        self._checks: dict[str, dict[tuple[str, str], dict]] = {
            dc: {} for dc in self.datacenters}
        self._service_index: dict[tuple[str, str], int] = {}  # (dc, name) -> index
        self._kv: dict[str, dict] = {}
        self._tombstones: dict[str, int] = {}
        self._lock = threading.RLock()
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._thread: Optional[threading.Thread] = None
        self._runner: Optional[web.AppRunner] = None
        # set and replaced by every write: a blocking query waits on the one current when
        # it read the state (no lock needed: one event loop, no await in between)
        self._changed: Optional[asyncio.Event] = None
        self._reaper: Optional[asyncio.Task] = None
        for dc in self.datacenters:
            self._ensure_node(dc, node if dc == datacenter else f"{node}-{dc}", node_address)

    # ------------------------------------------------------------------ lifecycle
    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def index(self) -> int:
        return self._index

    def start(self) -> "ConsulDouble":
        """Serve (again, on the same port after a ``stop()``)."""
        if self._loop is None:
            self._loop = asyncio.new_event_loop()
            self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                            name="consul-double")
            self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    async def _start(self) -> None:
        self._changed = asyncio.Event()
        app = web.Application()
        app.router.add_route("*", "/{path:.*}", self._dispatch)
        self._runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self._reaper = asyncio.ensure_future(self._reap_loop())

    def stop(self) -> None:
        """Close the listener and every connection (blocking queries included); keep state."""
        if self._loop is None or self._runner is None:
            return
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(10)

    async def _stop(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    @staticmethod
    async def _cancel_all() -> None:
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def close(self) -> None:
        """Stop and end the thread."""
        self.stop()
        if self._loop is not None:
            asyncio.run_coroutine_threadsafe(self._cancel_all(), self._loop).result(10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            if self._thread is not None:
                self._thread.join(5)
            self._loop.close()
            self._loop = None

    def __enter__(self) -> "ConsulDouble":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ a blocking client
    def api(self, method: str, path: str, body: Any = None, token: str = "",
            timeout: float = 10.0) -> tuple[int, dict, Any]:
        """One HTTP request to the double (``body``: bytes/str sent as is, else JSON):
        (status, lower-cased headers, JSON body or text)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            data = body
            if body is not None and not isinstance(body, (bytes, str)):
                data = json.dumps(body)
            headers = {"X-Consul-Token": token} if token else {}
            conn.request(method, path, body=data, headers=headers)
            r = conn.getresponse()
            raw = r.read()
            hdrs = {k.lower(): v for k, v in r.getheaders()}
            try:
                out: Any = json.loads(raw)
            except ValueError:
                out = raw.decode(errors="replace")
            return r.status, hdrs, out
        finally:
            conn.close()

    # ------------------------------------------------------------------ test helpers
    def reap_tombstones(self) -> None:
        """Drop KV tombstones (Consul's tombstone GC): a prefix's index may go backwards."""
        self._call(self._tombstones.clear)

    def rewind(self, to_index: int) -> None:
        """A snapshot restore with older data: every index above ``to_index`` drops to it."""
        def rewind() -> None:
            self._index = to_index
            for k, v in self._table_index.items():
                self._table_index[k] = min(v, to_index)
            for k, v in self._service_index.items():
                self._service_index[k] = min(v, to_index)
            for e in self._kv.values():
                e["ModifyIndex"] = min(e["ModifyIndex"], to_index)
                e["CreateIndex"] = min(e["CreateIndex"], to_index)
        self._call(rewind)

    def remove_service(self, service_id: str, dc: str = "") -> None:
        """Deregister an agent service directly (works while stopped: an agent that comes
        back with a different catalog)."""
        self._call(lambda: self._delete_service(dc or self.datacenter, self.node, service_id))

    def check_status(self, service_id: str, dc: str = "") -> Optional[str]:
        """The status of the agent check ``service:<id>`` (None if it does not exist)."""
        with self._lock:
            c = self._checks[dc or self.datacenter].get((self.node, f"service:{service_id}"))
            return None if c is None else c["Status"]

    def service_ids(self, service: str, dc: str = "") -> list[str]:
        """IDs of the registered instances of ``service`` (any health)."""
        with self._lock:
            return sorted(s["ID"] for s in self._services[dc or self.datacenter].values()
                          if s["Service"] == service)

    def _call(self, fn) -> None:
        """Run a state change in the double's loop and wake the blocking queries."""
        async def run() -> None:
            with self._lock:
                fn()
            await self._notify()
        if self._loop is not None and self._runner is not None:
            asyncio.run_coroutine_threadsafe(run(), self._loop).result(10)
        else:
            with self._lock:
                fn()

    # ------------------------------------------------------------------ state
    def _bump(self, *tables: str) -> int:
        self._index += 1
        for t in tables:
            self._table_index[t] = self._index
        return self._index

    def _ensure_node(self, dc: str, name: str, address: str, meta: Optional[dict] = None
                     ) -> dict:
        nodes = self._nodes[dc]
        n = nodes.get(name)
        if n is None or n["Address"] != address or (meta is not None and n["Meta"] != meta):
            idx = self._bump("nodes", "checks")
            n = {"ID": f"{abs(hash((dc, name))):032x}"[:32], "Node": name, "Address": address,
                 "Datacenter": dc, "TaggedAddresses": {"lan": address, "wan": address},
                 "Meta": dict(meta or {}), "CreateIndex": n["CreateIndex"] if n else idx,
                 "ModifyIndex": idx}
            nodes[name] = n
            # every agent node has a passing serfHealth check
            self._checks[dc][(name, "serfHealth")] = {
                "Node": name, "CheckID": "serfHealth", "Name": "Serf Health Status",
                "Status": "passing", "Notes": "", "Output": "Agent alive and reachable",
                "ServiceID": "", "ServiceName": "", "ServiceTags": [], "Type": "",
                "CreateIndex": idx, "ModifyIndex": idx}
            for s in self._services[dc].values():
                if s["_node"] == name:
                    self._service_index[(dc, s["Service"])] = idx
        return n

    def _put_service(self, dc: str, node: str, svc: dict) -> None:
        idx = self._bump("services")
        key = (node, svc["ID"])
        old = self._services[dc].get(key)
        svc["CreateIndex"] = old["CreateIndex"] if old else idx
        svc["ModifyIndex"] = idx
        svc["_node"] = node
        self._services[dc][key] = svc
        self._service_index[(dc, svc["Service"])] = idx
        if old and old["Service"] != svc["Service"]:
            self._service_index[(dc, old["Service"])] = idx

    def _delete_service(self, dc: str, node: str, service_id: str) -> bool:
        svc = self._services[dc].pop((node, service_id), None)
        if svc is None:
            return False
        idx = self._bump("services", "checks")
        self._service_index[(dc, svc["Service"])] = idx
        for key in [k for k, c in self._checks[dc].items()
                    if k[0] == node and c["ServiceID"] == service_id]:
            del self._checks[dc][key]
        return True

    def _put_check(self, dc: str, node: str, check: dict) -> None:
        idx = self._bump("checks")
        key = (node, check["CheckID"])
        old = self._checks[dc].get(key)
        check["CreateIndex"] = old["CreateIndex"] if old else idx
        check["ModifyIndex"] = idx
        self._checks[dc][key] = check
        if check.get("ServiceName"):
            self._service_index[(dc, check["ServiceName"])] = idx

    def _set_check_status(self, dc: str, key: tuple[str, str], status: str, output: str
                          ) -> None:
        c = self._checks[dc][key]
        if c.get("_ttl"):
            c["_deadline"] = time.monotonic() + c["_ttl"]
        if c["Status"] == status and c["Output"] == output:
            return  # Consul does not write (no index bump) when nothing changed
        if status == "critical" and c["Status"] != "critical":
            c["_critical_since"] = time.monotonic()
        elif status != "critical":
            c["_critical_since"] = None
        c["Status"] = status
        c["Output"] = output
        idx = self._bump("checks")
        c["ModifyIndex"] = idx
        if c.get("ServiceName"):
            self._service_index[(dc, c["ServiceName"])] = idx

    async def _notify(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = asyncio.Event()

    async def _reap_loop(self) -> None:
        """TTL expiry (checked often: Consul times each TTL precisely) and the reaper of
        services critical longer than DeregisterCriticalServiceAfter (every reap_interval)."""
        last_reap = time.monotonic()
        while True:
            await asyncio.sleep(min(0.05, self.reap_interval))
            now = time.monotonic()
            changed = False
            with self._lock:
                for dc, checks in self._checks.items():
                    for key, c in list(checks.items()):
                        if c.get("_ttl") and c["Status"] != "critical" and now > c["_deadline"]:
                            self._set_check_status(dc, key, "critical", "TTL expired")
                            changed = True
                if now - last_reap >= self.reap_interval:
                    last_reap = now
                    for dc, checks in self._checks.items():
                        for key, c in list(checks.items()):
                            after = c.get("_deregister_after")
                            since = c.get("_critical_since")
                            if (after is not None and since is not None
                                    and c["Status"] == "critical" and now - since > after):
                                changed |= self._delete_service(dc, key[0], c["ServiceID"])
            if changed:
                await self._notify()

    # ------------------------------------------------------------------ HTTP plumbing
    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        token = (request.headers.get("X-Consul-Token")
                 or _bearer(request.headers.get("Authorization", ""))
                 or request.query.get("token", ""))
        self.requests.append((request.method, request.path, dict(request.query), token))
        try:
            for unsupported in ("filter", "near", "node-meta", "ns", "cas", "acquire",
                                "release", "peer"):
                if unsupported in request.query:
                    raise _Error(400, f"the Consul double does not model {unsupported!r}")
            path = request.path
            write = request.method in ("PUT", "POST", "DELETE")
            self._acl(token, write)
            if (self.acl_tokens is not None and self.acl_tokens.get(token) == "none"
                    and path.startswith(("/v1/health/service/", "/v1/catalog/service/"))):
                response = self._respond(self._table_index["services"], [])
                response.headers["X-Consul-Results-Filtered-By-ACLs"] = "true"
                return response
            if path.startswith("/v1/health/service/"):
                return await self._health_service(request, path[len("/v1/health/service/"):])
            if path.startswith("/v1/catalog/service/"):
                return await self._catalog_service(request, path[len("/v1/catalog/service/"):])
            if path == "/v1/catalog/register" and request.method == "PUT":
                return await self._catalog_register(request)
            if path == "/v1/catalog/deregister" and request.method == "PUT":
                return await self._catalog_deregister(request)
            if path == "/v1/agent/service/register" and request.method == "PUT":
                return await self._agent_register(request)
            if path.startswith("/v1/agent/service/deregister/") and request.method == "PUT":
                return await self._agent_deregister(path.rsplit("/", 1)[1])
            m = re.fullmatch(r"/v1/agent/check/(pass|warn|fail)/(.+)", path)
            if m and request.method == "PUT":
                return await self._agent_check_update(request, m.group(1), m.group(2))
            if path == "/v1/agent/self" and request.method == "GET":
                return web.json_response({"Config": {"Datacenter": self.datacenter,
                                                     "NodeName": self.node}})
            if path.startswith("/v1/kv/"):
                return await self._kv_request(request, path[len("/v1/kv/"):])
            if path == "/v1/status/leader":
                return web.json_response(f"{self.node_address}:8300")
            raise _Error(404, "")
        except _Error as e:
            return web.Response(status=e.status, text=e.text)

    def _acl(self, token: str, write: bool) -> None:
        if self.acl_tokens is None:
            return
        if not token:
            raise _Error(403, "Permission denied")
        policy = self.acl_tokens.get(token)
        if policy is None:
            raise _Error(403, "ACL not found")
        if write and policy != "write":
            raise _Error(403, "Permission denied")

    def _dc(self, request: web.Request) -> str:
        dc = request.query.get("dc", "") or self.datacenter
        if dc not in self.datacenters:
            raise _Error(500, "No path to datacenter")
        return dc

    async def _blocking(self, request: web.Request, query) -> tuple[int, Any]:
        """Run ``query() -> (index, body)``; with ``?index=N`` wait until index > N or
        ``wait`` (+ jitter) elapses. Consul semantics: no change is not an error."""
        try:
            min_index = int(request.query.get("index", "0") or 0)
            wait = min(MAX_WAIT, parse_duration(request.query.get("wait", "") or "5m"))
        except ValueError as e:
            raise _Error(400, f"Invalid wait or index: {e}")
        if min_index <= 0:
            with self._lock:
                return query()
        if self.jitter:
            wait += random.uniform(0, wait / 16)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while True:
            changed = self._changed
            assert changed is not None
            with self._lock:
                index, body = query()
            remaining = deadline - loop.time()
            if index > min_index or remaining <= 0:
                return index, body
            try:
                await asyncio.wait_for(changed.wait(), remaining)
            except asyncio.TimeoutError:
                pass

    def _respond(self, index: int, body: Any, status: int = 200) -> web.Response:
        index = 0 if self.force_index_zero else max(1, index)
        return web.json_response(body, status=status, headers={
            "X-Consul-Index": str(index), "X-Consul-KnownLeader": "true",
            "X-Consul-LastContact": "0", "X-Consul-Effective-Consistency": "leader"})

    # ------------------------------------------------------------------ health / catalog
    def _matching(self, dc: str, name: str, tags: list[str]) -> list[dict]:
        out = [s for s in self._services[dc].values() if s["Service"] == name
               and all(t in s["Tags"] for t in tags)]
        return sorted(out, key=lambda s: (s["_node"], s["ID"]))

    def _service_idx(self, dc: str, name: str) -> int:
        return self._service_index.get((dc, name)) or self._table_index["services"]

    async def _health_service(self, request: web.Request, name: str) -> web.Response:
        dc = self._dc(request)
        tags = request.query.getall("tag", [])
        passing = "passing" in request.query and request.query["passing"] not in ("false", "0")

        def query() -> tuple[int, list]:
            entries = []
            for s in self._matching(dc, name, tags):
                node = self._nodes[dc][s["_node"]]
                checks = [_public(c) for (n, _), c in sorted(self._checks[dc].items())
                          if n == s["_node"] and c["ServiceID"] in ("", s["ID"])]
                if passing and any(c["Status"] != "passing" for c in checks):
                    continue
                entries.append({"Node": _public(node), "Service": _service_view(s),
                                "Checks": checks})
            return self._service_idx(dc, name), entries

        index, body = await self._blocking(request, query)
        return self._respond(index, body)

    async def _catalog_service(self, request: web.Request, name: str) -> web.Response:
        dc = self._dc(request)
        tags = request.query.getall("tag", [])

        def query() -> tuple[int, list]:
            out = []
            for s in self._matching(dc, name, tags):
                node = self._nodes[dc][s["_node"]]
                out.append({
                    "ID": node["ID"], "Node": node["Node"], "Address": node["Address"],
                    "Datacenter": dc, "TaggedAddresses": node["TaggedAddresses"],
                    "NodeMeta": node["Meta"], "ServiceKind": "", "ServiceID": s["ID"],
                    "ServiceName": s["Service"], "ServiceTags": list(s["Tags"]),
                    "ServiceAddress": s["Address"], "ServicePort": s["Port"],
                    "ServiceMeta": dict(s["Meta"]), "ServiceWeights": dict(s["Weights"]),
                    "ServiceEnableTagOverride": False, "CreateIndex": s["CreateIndex"],
                    "ModifyIndex": s["ModifyIndex"]})
            return self._service_idx(dc, name), out

        index, body = await self._blocking(request, query)
        return self._respond(index, body)

    # ------------------------------------------------------------------ registration
    @staticmethod
    async def _json_body(request: web.Request) -> dict:
        try:
            body = json.loads(await request.read() or b"{}")
        except ValueError as e:
            raise _Error(400, f"Request decode failed: {e}")
        if not isinstance(body, dict):
            raise _Error(400, "Request decode failed: expected an object")
        return body

    @staticmethod
    def _service_from(body: dict) -> dict:
        name = body.get("Name") or body.get("Service")
        if not name:
            raise _Error(400, "Missing service name")
        weights = body.get("Weights") or {"Passing": 1, "Warning": 1}
        if int(weights.get("Passing", 0)) < 1 or int(weights.get("Warning", -1)) < 0:
            raise _Error(400, "Passing must be greater than 0, Warning must be >= 0")
        port = body.get("Port", 0)
        if not isinstance(port, int) or not 0 <= port <= 65535:
            raise _Error(400, "Invalid port")
        return {"ID": body.get("ID") or name, "Service": name,
                "Tags": list(body.get("Tags") or []), "Address": body.get("Address") or "",
                "Meta": dict(body.get("Meta") or {}), "Port": port,
                "Weights": {"Passing": int(weights["Passing"]),
                            "Warning": int(weights["Warning"])},
                "EnableTagOverride": bool(body.get("EnableTagOverride", False))}

    def _check_from(self, spec: dict, node: str, svc: Optional[dict], default_id: str
                    ) -> dict:
        check: dict[str, Any] = {
            "Node": node, "CheckID": spec.get("CheckID") or spec.get("ID") or default_id,
            "Name": spec.get("Name") or (f"Service '{svc['Service']}' check" if svc
                                        else default_id),
            "Status": spec.get("Status") or "critical", "Notes": spec.get("Notes", ""),
            "Output": "", "ServiceID": svc["ID"] if svc else "",
            "ServiceName": svc["Service"] if svc else "",
            "ServiceTags": list(svc["Tags"]) if svc else [], "Type": "",
            "_ttl": None, "_deadline": 0.0, "_deregister_after": None,
            "_critical_since": None}
        if check["Status"] not in ("passing", "warning", "critical"):
            raise _Error(400, f"Invalid check status: {check['Status']!r}")
        try:
            if spec.get("TTL"):
                check["_ttl"] = parse_duration(spec["TTL"])
                check["_deadline"] = time.monotonic() + check["_ttl"]
                check["Type"] = "ttl"
            if spec.get("DeregisterCriticalServiceAfter"):
                check["_deregister_after"] = max(
                    self.min_deregister_after,
                    parse_duration(spec["DeregisterCriticalServiceAfter"]))
        except ValueError as e:
            raise _Error(400, str(e))
        if check["Status"] == "critical":
            check["_critical_since"] = time.monotonic()
        return check

    async def _agent_register(self, request: web.Request) -> web.Response:
        body = await self._json_body(request)
        svc = self._service_from(body)
        dc = self.datacenter
        specs = list(body.get("Checks") or [])
        if body.get("Check"):
            specs.insert(0, body["Check"])
        with self._lock:
            checks = [self._check_from(spec, self.node, svc,
                                       f"service:{svc['ID']}" if len(specs) == 1
                                       else f"service:{svc['ID']}:{i + 1}")
                      for i, spec in enumerate(specs)]
            self._put_service(dc, self.node, svc)
            replace = request.query.get("replace-existing-checks") not in (None, "false", "0")
            if replace:
                keep = {c["CheckID"] for c in checks}
                for key in [k for k, c in self._checks[dc].items()
                            if k[0] == self.node and c["ServiceID"] == svc["ID"]
                            and k[1] not in keep]:
                    del self._checks[dc][key]
            for c in checks:
                self._put_check(dc, self.node, c)
        await self._notify()
        return web.Response(status=200)

    async def _agent_deregister(self, service_id: str) -> web.Response:
        with self._lock:
            if not self._delete_service(self.datacenter, self.node, service_id):
                raise _Error(404, f'Unknown service ID "{service_id}". Ensure that the '
                                  'service ID is passed, not the service name.')
        await self._notify()
        return web.Response(status=200)

    async def _agent_check_update(self, request: web.Request, verb: str, check_id: str
                                  ) -> web.Response:
        status = {"pass": "passing", "warn": "warning", "fail": "critical"}[verb]
        key = (self.node, check_id)
        with self._lock:
            c = self._checks[self.datacenter].get(key)
            if c is None:
                raise _Error(404, f'Unknown check ID "{check_id}". Ensure that the check '
                                  'ID is passed, not the check name.')
            if not c.get("_ttl"):
                raise _Error(500, f'CheckID "{check_id}" does not have associated TTL')
            self._set_check_status(self.datacenter, key, status,
                                   request.query.get("note", ""))
        await self._notify()
        return web.Response(status=200)

    async def _catalog_register(self, request: web.Request) -> web.Response:
        body = await self._json_body(request)
        dc = body.get("Datacenter") or self.datacenter
        if dc not in self.datacenters:
            raise _Error(500, "No path to datacenter")
        node, address = body.get("Node"), body.get("Address")
        if not node or not address:
            raise _Error(400, "Must provide node and address")
        with self._lock:
            self._ensure_node(dc, node, address, body.get("NodeMeta"))
            svc = self._service_from(body["Service"]) if body.get("Service") else None
            if svc is not None:
                self._put_service(dc, node, svc)
            specs = list(body.get("Checks") or [])
            if body.get("Check"):
                specs.insert(0, body["Check"])
            for i, spec in enumerate(specs):
                owner = svc
                if spec.get("ServiceID"):
                    owner = self._services[dc].get((node, spec["ServiceID"]))
                check = self._check_from(spec, node, owner,
                                         f"service:{owner['ID']}" if owner else f"check{i}")
                check["Status"] = spec.get("Status") or "passing"  # catalog: no agent TTL
                check["_critical_since"] = None
                self._put_check(dc, node, check)
        await self._notify()
        return web.json_response(True)

    async def _catalog_deregister(self, request: web.Request) -> web.Response:
        body = await self._json_body(request)
        dc = body.get("Datacenter") or self.datacenter
        if dc not in self.datacenters:
            raise _Error(500, "No path to datacenter")
        node = body.get("Node")
        with self._lock:
            if body.get("ServiceID"):
                self._delete_service(dc, node, body["ServiceID"])
            elif body.get("CheckID"):
                if self._checks[dc].pop((node, body["CheckID"]), None) is not None:
                    self._bump("checks")
            elif node in self._nodes[dc]:
                for key in [k for k in self._services[dc] if k[0] == node]:
                    self._delete_service(dc, node, key[1])
                del self._nodes[dc][node]
                self._bump("nodes")
        await self._notify()
        return web.json_response(True)

    # ------------------------------------------------------------------ KV
    def _kv_index(self, key: str, recurse: bool) -> int:
        if recurse:
            idx = [e["ModifyIndex"] for k, e in self._kv.items() if k.startswith(key)]
            idx += [i for k, i in self._tombstones.items() if k.startswith(key)]
        else:
            e = self._kv.get(key)
            idx = [e["ModifyIndex"]] if e else []
            if key in self._tombstones:
                idx.append(self._tombstones[key])
        return max(idx) if idx else self._table_index["kvs"]

    async def _kv_request(self, request: web.Request, key: str) -> web.Response:
        recurse = "recurse" in request.query
        if request.method == "GET":
            self._dc(request)  # an unknown dc is refused; one KV store for the known ones

            def query() -> tuple[int, list]:
                if recurse:
                    found = [self._kv[k] for k in sorted(self._kv) if k.startswith(key)]
                else:
                    found = [self._kv[key]] if key in self._kv else []
                return self._kv_index(key, recurse), [dict(e) for e in found]

            index, entries = await self._blocking(request, query)
            if not entries:
                return self._respond(index, None, status=404)
            if "raw" in request.query and not recurse:
                return web.Response(body=base64.b64decode(entries[0]["Value"] or ""),
                                    headers={"X-Consul-Index": str(max(1, index))})
            return self._respond(index, entries)
        if request.method == "PUT":
            value = await request.read()
            try:
                flags = int(request.query.get("flags", "0"))
            except ValueError:
                raise _Error(400, "Invalid flags")
            with self._lock:
                idx = self._bump("kvs")
                old = self._kv.get(key)
                self._kv[key] = {"LockIndex": 0, "Key": key, "Flags": flags,
                                 "Value": base64.b64encode(value).decode() if value else None,
                                 "CreateIndex": old["CreateIndex"] if old else idx,
                                 "ModifyIndex": idx}
                self._tombstones.pop(key, None)
            await self._notify()
            return web.json_response(True)
        if request.method == "DELETE":
            with self._lock:
                gone = [k for k in self._kv if (k.startswith(key) if recurse else k == key)]
                idx = self._bump("kvs")
                for k in gone:
                    del self._kv[k]
                    self._tombstones[k] = idx
            await self._notify()
            return web.json_response(True)
        raise _Error(405, "method not allowed")


def _public(d: dict) -> dict:
    """The documented fields only (the double keeps private ones with a leading _)."""
    return {k: v for k, v in d.items() if not k.startswith("_")}


def _service_view(s: dict) -> dict:
    out = _public(s)
    out["Tags"] = list(s["Tags"])
    out["Meta"] = dict(s["Meta"])
    out["Weights"] = dict(s["Weights"])
    return out


def _bearer(value: str) -> str:
    return value[7:].strip() if value.lower().startswith("bearer ") else ""
