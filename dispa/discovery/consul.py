"""The Consul discovery provider: blocking queries on the HTTP API, KV config, TTL
self-registration.

Theory of operation
-------------------
One provider instance serves every Consul source (``[target_groups.discovery]`` with
``provider = "consul"``). For each distinct ``service`` it runs one *blocking-query loop*
(https://developer.hashicorp.com/consul/api-docs/features/blocking):

* with ``[service_discovery] health_check_integration`` (the default), ``GET
  /v1/health/service/<svc>``: with ``?passing`` for ``passing_only`` sources (the default),
  else without it, keeping the instances in ``passing`` or ``warning`` (what Consul's DNS
  interface serves); without it, ``GET /v1/catalog/service/<svc>`` (every registered
  instance, health ignored);
* ``tag=`` once per required tag (the agent filters; the answer is checked again here
  because agents before 1.14 honour only the first ``tag``); ``meta`` is matched here
  against ``Service.Meta`` (no ``filter=`` expression: older agents lack it and an exact
  match needs no language); ``dc=`` from the source or ``[service_discovery.consul]
  datacenter``; ``X-Consul-Token`` from ``token`` (or ``CONSUL_HTTP_TOKEN``);
* the first query is not blocking; each next one sends ``index=<X-Consul-Index>&wait=<
  refresh_interval>``, so an answer arrives as soon as the service changes and at least once
  per ``refresh_interval``.

The loop follows the implementation notes of the blocking-query docs: an index that goes
backwards (snapshot restore, KV tombstone reaping) resets it to 0 (a plain query next); an
index below 1 is treated as 1 (an old Consul bug answered 0, which would make every query
return at once); an answer with an unchanged index waits ``MIN_UNCHANGED_INTERVAL`` before
the next query (rate limit), and every loop waits at least ``MIN_INTERVAL`` between
queries.

A host is ``Service.Address``, or ``Node.Address`` when it is empty (Consul's rule). The
weight is ``Weights.Passing``, or ``Weights.Warning`` when a check is in ``warning``;
instances whose weight is 0 are left out (as Consul's DNS interface does). ``meta`` of an
endpoint carries ``name`` (the instance ID, the endpoint's name in Dispa), ``node``,
``tags`` and the service ``meta``.

Errors (refused connection, timeout, non-200, malformed answer) never escape ``run``: the
loop records them in ``health`` (``stale`` once it had answered before), emits nothing, so
the last set stays in force, resets its index (the next answer is a fresh one, which is
right after an agent restart whose indexes start over) and retries after an exponential
``Backoff``.

Dynamic configuration: with ``[service_discovery.consul] kv_prefix`` set, one more loop
watches ``GET /v1/kv/<prefix>?recurse`` the same way. The latest map (key below the
prefix -> UTF-8 value, decoded from base64) is :attr:`ConsulProvider.kv`; ``on_kv`` (a
callable, optional) is called with a copy after every change, and ``status()`` reports its
keys with the size and a digest of each value (never the values: they may be secrets).
The discovery watcher hooks ``on_kv`` to the master: each key is a configuration fragment
(``config/merge.py``; docs/discovery.md, "Dynamic configuration").

Self-registration: ``register(instance)`` sends ``PUT /v1/agent/service/register`` with a
TTL check (``Check: {CheckID: "service:<id>", TTL, DeregisterCriticalServiceAfter, Status:
"passing"}``) and keeps it alive with ``PUT /v1/agent/check/pass/service:<id>`` every TTL/3;
a 404 there (the agent restarted, or reaped the service) registers it again.
``deregister()`` stops that and sends ``PUT /v1/agent/service/deregister/<id>``.

aiohttp is imported here only: the workers never import this module.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import inspect
import logging
import os
import ssl
import time
import urllib.parse
from typing import Any, Callable, Optional

import aiohttp

from dispa.discovery.provider import (
    Backoff, DiscoveredEndpoint, Emit, EndpointSet, Instance, Provider,
)

__all__ = ["ConsulProvider", "ConsulError", "go_duration", "kv_digest"]

log = logging.getLogger("dispa.discovery.consul")

#: Consul caps ``wait`` at 10 minutes.
MAX_WAIT = 600.0
#: Floor between two queries of one loop, whatever the answer.
MIN_INTERVAL = 0.05
#: Floor between two queries when the index did not change (blocking-query docs: rate limit).
MIN_UNCHANGED_INTERVAL = 1.0
#: Timeout of a non-blocking request (a blocking one gets wait + wait/16 + this).
REQUEST_TIMEOUT = 10.0


class ConsulError(Exception):
    """A non-success answer from the agent."""

    def __init__(self, status: int, text: str):
        super().__init__(f"HTTP {status}: {text.strip()[:200] or '(no body)'}")
        self.status = status


def go_duration(seconds: float) -> str:
    """Seconds as a Go duration string, which Consul parses: ``"15s"``, ``"1500ms"``."""
    ms = max(1, int(round(seconds * 1000)))
    return f"{ms // 1000}s" if ms % 1000 == 0 else f"{ms}ms"


class _Watch:
    """One service being watched: its query and what it last saw."""

    __slots__ = ("service", "path", "params", "mode", "tags", "meta", "datacenter",
                 "index", "endpoints", "error", "answers")

    def __init__(self, service: str, mode: str, tags: tuple[str, ...], meta: dict,
                 datacenter: str):
        quoted = urllib.parse.quote(service, safe="")
        self.service = service
        # "passing": ?passing; "healthy": passing + warning (Consul DNS's default);
        # "catalog": every registered instance, health ignored
        self.mode = mode
        self.path = (f"/v1/catalog/service/{quoted}" if mode == "catalog"
                     else f"/v1/health/service/{quoted}")
        self.params: list[tuple[str, str]] = [("passing", "")] if mode == "passing" else []
        self.params += [("tag", t) for t in tags]
        if datacenter:
            self.params.append(("dc", datacenter))
        self.tags = tags
        self.meta = meta
        self.datacenter = datacenter
        self.index = 0
        self.endpoints: Optional[tuple[DiscoveredEndpoint, ...]] = None
        self.error: Optional[str] = None
        self.answers = 0


class ConsulProvider(Provider):
    """Consul service discovery; see the module docstring."""

    kind = "consul"

    def __init__(self, name: str, settings: Any, sources: list):
        super().__init__(name)
        opts = getattr(settings, "consul", None)
        self.address = str(getattr(settings, "consul_address", "http://127.0.0.1:8500"))
        if "://" not in self.address:
            self.address = "http://" + self.address
        self.address = self.address.rstrip("/")
        self.token = getattr(opts, "token", "") or os.environ.get("CONSUL_HTTP_TOKEN", "")
        self.datacenter = getattr(opts, "datacenter", "") or ""
        self.kv_prefix = getattr(opts, "kv_prefix", "") or ""
        self.ca_file = getattr(opts, "ca_file", "") or ""
        self.deregister_critical_after = float(
            getattr(opts, "deregister_critical_after", 60.0) or 60.0)
        self.wait = min(MAX_WAIT, max(1.0, float(getattr(settings, "refresh_interval", 30.0))))
        integration = bool(getattr(settings, "health_check_integration", True))
        # Rate limits and backoff; tests shorten them.
        self.min_interval = MIN_INTERVAL
        self.min_unchanged_interval = MIN_UNCHANGED_INTERVAL
        self.backoff_initial = 0.25
        self.backoff_max = 15.0
        self.watches: dict[str, _Watch] = {}
        for source in sources:
            if source.service in self.watches:
                continue  # one service, one set of filters (config.check_discovery)
            mode = ("catalog" if not integration
                    else "passing" if getattr(source, "passing_only", True) else "healthy")
            self.watches[source.service] = _Watch(
                source.service, mode,
                tuple(getattr(source, "tags", ()) or ()),
                dict(getattr(source, "meta", {}) or {}),
                getattr(source, "datacenter", "") or self.datacenter)
        #: The latest KV map under ``kv_prefix`` (key below the prefix -> value).
        self.kv: dict[str, str] = {}
        self.kv_index = 0
        self.kv_loaded = False
        #: Called with a copy of ``kv`` after each change (set by whoever consumes it).
        self.on_kv: Optional[Callable[[dict], Any]] = None
        self._kv_error: Optional[str] = None
        self._session: Optional[aiohttp.ClientSession] = None
        self._instance: Optional[Instance] = None
        self._keepalive: Optional[asyncio.Task] = None
        self.check_passes = 0
        self.check_errors = 0
        self.last_pass: Optional[float] = None

    # ------------------------------------------------------------------ HTTP
    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            ssl_ctx: Any = None
            if self.address.startswith("https://"):
                ssl_ctx = ssl.create_default_context(cafile=self.ca_file or None)
            headers = {"X-Consul-Token": self.token} if self.token else {}
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=ssl_ctx if ssl_ctx else True),
                headers=headers)
        return self._session

    async def _request(self, method: str, path: str, params: list[tuple[str, str]],
                       timeout: float, body: Any = None) -> tuple[int, int, Any]:
        """(status, X-Consul-Index or 0, JSON body or None). Raises ConsulError on a status
        other than 200 and 404 (the caller decides what a 404 means) and on an answer that
        ACLs filtered (``X-Consul-Results-Filtered-By-ACLs``), aiohttp/asyncio errors on
        transport trouble, ValueError on a malformed answer."""
        url = self.address + path
        if params:
            # a flag (``passing``, ``recurse``) goes bare, as the Consul docs write it
            url += "?" + "&".join(urllib.parse.quote(k, safe="") if v == ""
                                  else f"{urllib.parse.quote(k, safe='')}="
                                       f"{urllib.parse.quote(v, safe='')}"
                                  for k, v in params)
        client_timeout = aiohttp.ClientTimeout(total=timeout, sock_connect=min(5.0, timeout))
        async with self._client().request(method, url, json=body,
                                          timeout=client_timeout) as r:
            raw = await r.read()
            if r.status not in (200, 404):
                raise ConsulError(r.status, raw.decode("utf-8", "replace"))
            if r.headers.get("X-Consul-Results-Filtered-By-ACLs", "").lower() == "true":
                # the token may not read some of what was asked: the answer is a partial
                # (often empty) set, not the registry's; never let it empty a cluster
                raise ConsulError(403, "results filtered by ACLs: the token lacks read "
                                       "access (service:read, node:read or key:read) to "
                                       "part of the answer")
            index_text = r.headers.get("X-Consul-Index", "")
            index = int(index_text) if index_text.strip().isdigit() else 0
            data = None
            if r.status == 200 and raw.strip():
                data = await r.json(content_type=None)
            return r.status, index, data

    # ------------------------------------------------------------------ watching
    async def run(self, emit: Emit) -> None:
        loops = [self._loop(w.service, w.path, w.params, self._on_service(w, emit), w)
                 for w in self.watches.values()]
        if self.kv_prefix:
            loops.append(self._loop("kv:" + self.kv_prefix,
                                    "/v1/kv/" + urllib.parse.quote(self.kv_prefix, safe="/"),
                                    self._kv_params(), self._on_kv, None))
        if not loops:
            await asyncio.Event().wait()  # nothing to watch: idle until cancelled
        await asyncio.gather(*loops)

    def _kv_params(self) -> list[tuple[str, str]]:
        params = [("recurse", "")]
        if self.datacenter:
            params.append(("dc", self.datacenter))
        return params

    async def _loop(self, key: str, path: str, params: list[tuple[str, str]],
                    handle: Callable[[int, Any], Any], watch: Optional[_Watch]) -> None:
        """One blocking-query loop (module docstring); never raises but CancelledError."""
        loop = asyncio.get_running_loop()
        backoff = Backoff(self.backoff_initial, self.backoff_max)
        index = 0
        failing = False
        while True:
            query = list(params)
            timeout = REQUEST_TIMEOUT
            if index > 0:
                query += [("index", str(index)), ("wait", go_duration(self.wait))]
                timeout += self.wait + self.wait / 16
            started = loop.time()
            try:
                status, new_index, data = await self._request("GET", path, query, timeout)
                new_index = max(1, new_index)  # index 0 (a Consul bug) would never block
                if status == 404 and watch is not None:
                    raise ConsulError(404, "not found")  # health/catalog answer [] instead
                await _maybe_await(handle(new_index, data if status == 200 else None))
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # every registry error: stale, back off, resync
                problem = _describe(exc)
                if not failing:
                    log.warning("consul %s: %s (keeping the last known endpoints)", key,
                                problem)
                failing = True
                self._record_error(key, problem, watch)
                index = 0
                await asyncio.sleep(backoff.next_delay())
                continue
            if failing:
                failing = False
                self.health.reconnects += 1
                log.info("consul %s: answering again", key)
            backoff.reset()
            self._record_ok(key, watch)
            unchanged = new_index == index
            index = 0 if new_index < index else new_index  # backwards: start over
            floor = self.min_unchanged_interval if unchanged else self.min_interval
            rest = floor - (loop.time() - started)
            if rest > 0:
                await asyncio.sleep(rest)

    def _record_error(self, key: str, problem: str, watch: Optional[_Watch]) -> None:
        if watch is not None:
            watch.error = problem
        else:
            self._kv_error = problem
        self.health.failed(f"{key}: {problem}")

    def _record_ok(self, key: str, watch: Optional[_Watch]) -> None:
        if watch is not None:
            watch.error = None
            watch.answers += 1
        else:
            self._kv_error = None
        # healthy only when every loop is: one failing service keeps the provider stale
        if self._kv_error is None and all(w.error is None for w in self.watches.values()):
            self.health.ok()

    def _on_service(self, watch: _Watch, emit: Emit) -> Callable[[int, Any], Any]:
        async def handle(index: int, data: Any) -> None:
            endpoints = (self._from_catalog(watch, data) if watch.mode == "catalog"
                         else self._from_health(watch, data))
            watch.index = index
            if endpoints == watch.endpoints:
                return
            watch.endpoints = endpoints
            await _maybe_await(emit(EndpointSet(provider=self.name, service=watch.service,
                                                endpoints=endpoints, revision=str(index))))
        return handle

    @staticmethod
    def _wanted(watch: _Watch, tags: Any, meta: Any) -> bool:
        tags = tags or []
        meta = meta or {}
        return (all(t in tags for t in watch.tags)
                and all(meta.get(k) == v for k, v in watch.meta.items()))

    def _from_health(self, watch: _Watch, data: Any) -> tuple[DiscoveredEndpoint, ...]:
        if not isinstance(data, list):
            raise ValueError(f"expected a JSON list, got {type(data).__name__}")
        out = []
        for entry in data:
            svc, node = entry["Service"], entry.get("Node") or {}
            if not self._wanted(watch, svc.get("Tags"), svc.get("Meta")):
                continue
            statuses = {c.get("Status") for c in entry.get("Checks") or ()}
            if "critical" in statuses or (watch.mode == "passing" and "warning" in statuses):
                continue  # "healthy" excludes critical; for "passing", ?passing did already
            weights = svc.get("Weights") or {}
            weight = weights.get("Warning" if "warning" in statuses else "Passing", 1)
            out.append(self._endpoint(svc.get("Address") or node.get("Address"),
                                      svc.get("Port"), weight, svc.get("ID"),
                                      node.get("Node"), svc.get("Tags"), svc.get("Meta")))
        return _sorted(out)

    def _from_catalog(self, watch: _Watch, data: Any) -> tuple[DiscoveredEndpoint, ...]:
        if not isinstance(data, list):
            raise ValueError(f"expected a JSON list, got {type(data).__name__}")
        out = []
        for s in data:
            if not self._wanted(watch, s.get("ServiceTags"), s.get("ServiceMeta")):
                continue
            weight = (s.get("ServiceWeights") or {}).get("Passing", 1)
            out.append(self._endpoint(s.get("ServiceAddress") or s.get("Address"),
                                      s.get("ServicePort"), weight, s.get("ServiceID"),
                                      s.get("Node"), s.get("ServiceTags"), s.get("ServiceMeta")))
        return _sorted(out)

    @staticmethod
    def _endpoint(host: Any, port: Any, weight: Any, sid: Any, node: Any, tags: Any,
                  meta: Any) -> Optional[DiscoveredEndpoint]:
        if not isinstance(host, str) or not host or not isinstance(port, int) \
                or not 0 < port <= 65535:
            return None  # no usable address (port 0: registered without one)
        if not isinstance(weight, int) or weight < 1:
            return None  # Warning weight 0: leave it out, as Consul DNS does
        return DiscoveredEndpoint(host=host.strip("[]"), port=port, weight=weight, meta={
            "name": str(sid or ""), "node": str(node or ""), "tags": list(tags or ()),
            "meta": dict(meta or {})})

    async def _on_kv(self, index: int, data: Any) -> None:
        if data is None:
            entries: list = []  # 404: nothing under the prefix
        elif isinstance(data, list):
            entries = data
        else:
            raise ValueError(f"expected a JSON list, got {type(data).__name__}")
        kv: dict[str, str] = {}
        for e in entries:
            key = e["Key"]
            if not key.startswith(self.kv_prefix) or key == self.kv_prefix:
                continue  # the "folder" key itself
            raw = base64.b64decode(e["Value"]) if e.get("Value") else b""
            kv[key[len(self.kv_prefix):]] = raw.decode("utf-8", "replace")
        self.kv_index = index
        first = not self.kv_loaded
        self.kv_loaded = True
        if kv == self.kv and not first:
            return
        self.kv = kv
        log.info("consul kv %s: %d keys at index %d", self.kv_prefix, len(kv), index)
        if self.on_kv is not None:
            try:
                await _maybe_await(self.on_kv(dict(kv)))
            except Exception:  # a consumer's bug is not a registry error
                log.exception("consul kv: on_kv failed")

    # ------------------------------------------------------------------ self-registration
    def _registration_body(self, instance: Instance) -> dict:
        return {"ID": instance.id, "Name": instance.service, "Tags": list(instance.tags),
                "Address": instance.host, "Port": instance.port, "Meta": dict(instance.meta),
                "Check": {"CheckID": f"service:{instance.id}",
                          "Name": f"dispa {instance.id} TTL",
                          "TTL": go_duration(instance.ttl_seconds),
                          "DeregisterCriticalServiceAfter":
                              go_duration(self.deregister_critical_after),
                          "Status": "passing"}}

    async def register(self, instance: Instance) -> None:
        """Register ``instance`` with a TTL check and keep it passing. Raises on failure
        (the watcher retries); once it succeeded, keep-alive failures are retried here."""
        params = [("replace-existing-checks", "true")]
        status, _, _ = await self._request("PUT", "/v1/agent/service/register", params,
                                           REQUEST_TIMEOUT, self._registration_body(instance))
        if status != 200:
            raise ConsulError(status, "service register")
        self._instance = instance
        self.last_pass = time.time()
        if self._keepalive is None or self._keepalive.done():
            self._keepalive = asyncio.ensure_future(self._keep_alive())

    async def _keep_alive(self) -> None:
        backoff = Backoff(self.backoff_initial, self.backoff_max)
        failing = False
        delay: Optional[float] = None
        while self._instance is not None:
            instance = self._instance
            interval = max(0.05, instance.ttl_seconds / 3)
            await asyncio.sleep(interval if delay is None else delay)
            delay = None
            path = "/v1/agent/check/pass/" + urllib.parse.quote(f"service:{instance.id}",
                                                                safe="")
            try:
                status, _, _ = await self._request("PUT", path, [("note", "dispa alive")],
                                                   REQUEST_TIMEOUT)
                if status == 404:  # agent restarted or reaped us: register again
                    log.warning("consul: check service:%s is gone; registering again",
                                instance.id)
                    await self.register(instance)
                self.check_passes += 1
                self.last_pass = time.time()
                backoff.reset()
                failing = False
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.check_errors += 1
                # once per outage: the retries below would repeat it several times a TTL
                (log.debug if failing else log.warning)(
                    "consul: TTL pass for %s failed: %s (retrying)", instance.id,
                    _describe(exc))
                failing = True
                # retry sooner than the next period, so a short outage does not let the TTL lapse
                delay = min(interval, backoff.next_delay())

    async def deregister(self) -> None:
        """Stop the keep-alive and remove the service from the agent."""
        instance, self._instance = self._instance, None
        await self._stop_keepalive()
        if instance is None:
            return
        path = "/v1/agent/service/deregister/" + urllib.parse.quote(instance.id, safe="")
        status, _, _ = await self._request("PUT", path, [], REQUEST_TIMEOUT)
        if status == 404:
            log.info("consul: %s was already deregistered", instance.id)

    async def _stop_keepalive(self) -> None:
        task, self._keepalive = self._keepalive, None
        if task is not None and task is not asyncio.current_task():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def close(self) -> None:
        await self._stop_keepalive()
        session, self._session = self._session, None
        if session is not None and not session.closed:
            await session.close()

    # ------------------------------------------------------------------ status
    def status(self) -> dict:
        out = super().status()
        out["address"] = self.address
        out["datacenter"] = self.datacenter
        out["services"] = {
            w.service: {"query": w.path, "index": w.index, "datacenter": w.datacenter,
                        "tags": list(w.tags), "meta": dict(w.meta),
                        "endpoints": None if w.endpoints is None else len(w.endpoints),
                        "error": w.error}
            for w in self.watches.values()}
        if self.kv_prefix:
            # keys with the size and a digest of each value, never the value: a config
            # prefix may hold credentials, and /admin/status is read by many
            out["kv"] = {"prefix": self.kv_prefix, "index": self.kv_index,
                         "loaded": self.kv_loaded, "error": self._kv_error,
                         "keys": {k: kv_digest(v) for k, v in sorted(self.kv.items())}}
        if self._instance is not None:
            out["registration"] = {"id": self._instance.id, "check": f"service:{self._instance.id}",
                                   "passes": self.check_passes, "errors": self.check_errors,
                                   "last_pass": self.last_pass}
        return out


def kv_digest(value: str) -> dict:
    """What /admin/status shows of a KV value: its size and a SHA-256 prefix (enough to see
    that it changed, or to compare it with ``consul kv get <key> | sha256sum``)."""
    raw = value.encode("utf-8")
    return {"bytes": len(raw), "sha256": hashlib.sha256(raw).hexdigest()[:16]}


def _sorted(endpoints: list) -> tuple[DiscoveredEndpoint, ...]:
    seen: dict[tuple[str, int], DiscoveredEndpoint] = {}
    for e in endpoints:
        if e is not None and (e.host, e.port) not in seen:
            seen[(e.host, e.port)] = e
    return tuple(seen[k] for k in sorted(seen))


def _describe(exc: BaseException) -> str:
    if isinstance(exc, asyncio.TimeoutError):
        return "timed out"
    text = str(exc) or type(exc).__name__
    return text if isinstance(exc, ConsulError) else f"{type(exc).__name__}: {text}"


async def _maybe_await(value: Any) -> None:
    if inspect.isawaitable(value):
        await value
