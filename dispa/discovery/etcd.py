"""The etcd v3 discovery provider: prefix watches and lease-based self-registration.

Talks to etcd through its documented gRPC-gateway JSON API (``/v3/kv/range``,
``/v3/watch``, ``/v3/lease/*``, ``/v3/auth/authenticate``; keys and values base64, int64s
as strings) with aiohttp, so it needs no gRPC stack. Imported only by the master
(``dispa.discovery.registry`` loads it lazily); workers never import aiohttp.

Data model (docs/discovery-etcd.md)
-----------------------------------
A source's ``service`` is a key prefix, normalised to end in ``/``. Every key under it is
one instance; its value is JSON ``{"host": "10.0.0.5", "port": 8080, "weight": 2,
"meta": {...}}`` (``weight`` and ``meta`` optional) or plain ``host:port`` /
``[v6]:port``. Values that parse as neither are skipped (and listed in the status).

Watch algorithm, per prefix
---------------------------
1. *List*: ``range`` over ``[prefix, prefix_end)``; the answer's ``header.revision`` R is
   the state the set reflects. Emit.
2. *Watch* from ``R + 1``. After each response with events, the last event's
   ``mod_revision`` is the last revision seen (clientv3's rule); a progress notification
   advances it to ``header.revision``.
3. *Disconnect* (connection cut, etcd restarted, stream error): record the error in
   ``health`` (the watcher keeps the last good set), back off, then watch again from
   ``last seen + 1``: etcd replays every event since, so nothing is missed and nothing is
   re-listed.
4. *Compaction*: if ``last seen + 1`` was compacted away, etcd cancels the watch with
   ``compact_revision``; the provider re-lists (step 1) and watches from the new revision.
5. A watch silent for ``refresh_interval`` seconds is re-created from ``last seen + 1``
   (cheap, and it detects half-open connections that would otherwise hang forever).

Auth: with ``username``, a token from ``/v3/auth/authenticate`` goes in the
``Authorization`` header; an "invalid auth token" answer (HTTP 401, gRPC code 16, or a
watch canceled as Unauthenticated; simple tokens die when etcd restarts) drops the token
and the next request authenticates again. TLS: ``https://`` endpoints, ``ca_file``, and a
client certificate (``cert_file``/``key_file``) for etcd's ``--client-cert-auth``.
"""

from __future__ import annotations

import asyncio
import base64
import inspect
import json
import logging
import math
import ssl
from typing import Optional

from dispa.discovery.provider import (
    Backoff, DiscoveredEndpoint, Emit, EndpointSet, Instance, Provider,
)

log = logging.getLogger("dispa.discovery.etcd")

__all__ = ["EtcdError", "EtcdProvider", "normalise_prefix", "parse_instance", "prefix_range_end"]

#: etcd refuses leases shorter than its minimum TTL (1.5 x the election timeout, 2 s with
#: the defaults); ask for at least this much.
MIN_LEASE_TTL = 2
#: A watch response line longer than this is a broken stream (etcd's own request limit is
#: 1.5 MiB; a response batches events, so allow more), not a message to buffer forever.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024


class EtcdError(Exception):
    """An error answer from etcd (``code`` is the gRPC status code, 0 when unknown)."""

    def __init__(self, message: str, code: int = 0, http_status: int = 0):
        super().__init__(message)
        self.code = code
        self.http_status = http_status

    @property
    def auth_invalid(self) -> bool:
        """The token is missing, expired or unknown: authenticate again."""
        return (self.http_status == 401 or self.code == 16
                or _is_auth_reason(str(self)))


def _is_auth_reason(text: str) -> bool:
    t = text.lower()
    return ("invalid auth token" in t or "unauthenticated" in t or "user name is empty" in t
            or "revision of auth store is old" in t)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def normalise_prefix(service: str) -> str:
    """The key prefix a source ``service`` stands for: it always ends in ``/`` so that
    ``/services/api`` never matches ``/services/api2/...``."""
    return service if service.endswith("/") else service + "/"


def prefix_range_end(prefix: bytes) -> bytes:
    """etcd's range end for "every key starting with ``prefix``": the prefix with its last
    byte incremented (trailing 0xff bytes dropped first); ``\\0`` means "to the end"."""
    p = bytearray(prefix)
    while p and p[-1] == 0xFF:
        p.pop()
    if not p:
        return b"\0"
    p[-1] += 1
    return bytes(p)


def parse_instance(raw: bytes) -> DiscoveredEndpoint:
    """One key's value -> an endpoint. JSON ``{"host", "port", "weight"?, "meta"?}`` or plain
    ``host:port`` / ``[v6]:port``. Raises ``ValueError`` for anything else."""
    text = raw.decode("utf-8").strip()
    if text.startswith("{"):
        doc = json.loads(text)
        host = doc.get("host")
        port = doc.get("port")
        weight = doc.get("weight", 1)
        meta = doc.get("meta", {})
        if not isinstance(host, str) or not host.strip():
            raise ValueError("\"host\" must be a non-empty string")
        if not isinstance(meta, dict):
            raise ValueError("\"meta\" must be an object")
        host = host.strip()
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
    else:
        if text.startswith("["):
            host, sep, rest = text[1:].partition("]")
            if not sep or not rest.startswith(":"):
                raise ValueError(f"expected \"[v6]:port\", got {text!r}")
            port_text = rest[1:]
        else:
            host, sep, port_text = text.rpartition(":")
            if not sep or not host or ":" in host:
                raise ValueError(f"expected JSON or \"host:port\", got {text[:60]!r}")
        if not port_text.isdigit():
            raise ValueError(f"bad port {port_text!r}")
        port, weight, meta = int(port_text), 1, {}
    for field, value, low in (("port", port, 1), ("weight", weight, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"\"{field}\" must be an integer >= {low}, got {value!r}")
    if port > 65535:
        raise ValueError(f"\"port\" out of range: {port}")
    if not host or any(c.isspace() for c in host) or "/" in host:
        raise ValueError(f"bad host {host!r}")
    return DiscoveredEndpoint(host=host, port=port, weight=weight, meta=meta)


class _Watch:
    """What one prefix's watch knows."""

    __slots__ = ("service", "prefix", "range_end", "entries", "invalid", "revision",
                 "relists", "resumes", "emitted", "failing", "last_error")

    def __init__(self, service: str):
        self.service = service
        self.prefix = normalise_prefix(service).encode()
        self.range_end = prefix_range_end(self.prefix)
        self.entries: dict[bytes, DiscoveredEndpoint] = {}  # valid keys only
        self.invalid: dict[str, str] = {}  # key -> why its value was skipped
        self.revision = 0  # last revision seen; 0 = list first
        self.relists = 0
        self.resumes = 0  # watches re-created from revision + 1 (no re-list)
        self.emitted: Optional[tuple[DiscoveredEndpoint, ...]] = None
        self.failing = False
        self.last_error: Optional[str] = None

    def endpoints(self) -> tuple[DiscoveredEndpoint, ...]:
        out: dict[str, DiscoveredEndpoint] = {}
        for key in sorted(self.entries):  # two keys, one host:port: the first key wins
            ep = self.entries[key]
            out.setdefault(ep.id, ep)
        return tuple(sorted(out.values(), key=lambda e: (e.host, e.port)))

    def apply(self, key: bytes, value: Optional[bytes], revision: int) -> None:
        """A put (``value``) or a delete (None) of ``key``."""
        name = key.decode("utf-8", "replace")
        self.entries.pop(key, None)
        self.invalid.pop(name, None)
        if value is None:
            return
        try:
            self.entries[key] = parse_instance(value)
        except (ValueError, UnicodeDecodeError) as exc:
            self.invalid[name] = str(exc)
            log.warning("etcd key %s (revision %d) skipped: %s", name, revision, exc)


class _Registration:
    __slots__ = ("key", "value", "ttl", "lease", "state", "last_error", "task", "attempted")

    def __init__(self, key: str, value: str, ttl: int):
        self.key = key
        self.value = value
        self.ttl = ttl
        self.lease = 0
        self.state = "starting"
        self.last_error: Optional[str] = None
        self.task: Optional[asyncio.Task] = None
        self.attempted = asyncio.Event()  # the first grant + put was tried

    def as_dict(self) -> dict:
        return {"key": self.key, "lease": str(self.lease), "ttl": self.ttl,
                "state": self.state, "last_error": self.last_error}


class EtcdProvider(Provider):
    """Watches one key prefix per source and registers this node under a lease."""

    kind = "etcd"
    #: reconnect backoff (seconds); instance attributes may override them
    backoff_initial = 0.5
    backoff_max = 30.0

    def __init__(self, name: str, settings, sources):
        super().__init__(name)
        opts = settings.etcd
        self.endpoints = [u.rstrip("/") for u in opts.endpoints] or ["http://127.0.0.1:2379"]
        self._current = 0
        self.username = opts.username
        self.password = opts.password
        self.ca_file = opts.ca_file
        self.cert_file = opts.cert_file
        self.key_file = opts.key_file
        self.dial_timeout = float(opts.dial_timeout)
        # a silent watch is re-created after this long (see the module docstring, step 5)
        self.idle_timeout = max(1.0, float(getattr(settings, "refresh_interval", 30.0)))
        self._watches: dict[str, _Watch] = {}
        for source in sources:
            self._watches.setdefault(source.service, _Watch(source.service))
        self._session = None  # aiohttp.ClientSession, made in the running loop
        self._token: Optional[str] = None
        self._auth_lock: Optional[asyncio.Lock] = None
        self._registration: Optional[_Registration] = None
        self.authentications = 0  # tokens obtained (status; tests prove re-authentication)

    # ------------------------------------------------------------------ plumbing
    def _ssl_context(self) -> Optional[ssl.SSLContext]:
        if not (self.ca_file or self.cert_file):
            return None  # http://, or https:// with the system CAs
        ctx = ssl.create_default_context(cafile=self.ca_file or None)
        if self.cert_file:
            ctx.load_cert_chain(self.cert_file, self.key_file or None)
        return ctx

    async def _get_session(self):
        import aiohttp

        if self._session is None or self._session.closed:
            ctx = self._ssl_context()
            connector = aiohttp.TCPConnector(ssl=ctx if ctx is not None else True, limit=0)
            self._session = aiohttp.ClientSession(connector=connector)
        return self._session

    def _endpoint(self) -> str:
        return self.endpoints[self._current % len(self.endpoints)]

    def _next_endpoint(self) -> None:
        """After a transport error: try the next cluster member next time."""
        self._current = (self._current + 1) % len(self.endpoints)

    def _unary_timeout(self):
        import aiohttp

        return aiohttp.ClientTimeout(total=self.dial_timeout + 10.0,
                                     sock_connect=self.dial_timeout)

    async def _auth_header(self) -> dict:
        if not self.username:
            return {}
        if self._auth_lock is None:
            self._auth_lock = asyncio.Lock()
        async with self._auth_lock:
            if self._token is None:
                try:
                    answer = await self._post("/v3/auth/authenticate",
                                              {"name": self.username, "password": self.password},
                                              auth=False)
                    self._token = answer["token"]
                    self.authentications += 1
                except EtcdError as exc:
                    if "authentication is not enabled" not in str(exc):
                        raise
                    self._token = ""  # a cluster without auth: send no token
        return {"Authorization": self._token} if self._token else {}

    async def _post(self, path: str, body: dict, *, auth: bool = True) -> dict:
        """One unary gateway call; re-authenticates once on an invalid token."""
        import aiohttp

        session = await self._get_session()
        for attempt in range(2):
            headers = await self._auth_header() if auth else {}
            url = self._endpoint() + path
            try:
                async with session.post(url, json=body, headers=headers,
                                        timeout=self._unary_timeout()) as resp:
                    status, raw = resp.status, await resp.read()
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
                self._next_endpoint()
                raise ConnectionError(f"{url}: {type(exc).__name__}: {exc}") from exc
            answer = _json(raw, url)
            if status == 200 and "error" not in answer:
                return answer
            err = _answer_error(answer, status, url)
            if auth and attempt == 0 and self.username and err.auth_invalid:
                self._token = None
                continue
            raise err
        raise AssertionError("unreachable")

    async def _emit(self, watch: _Watch, emit: Emit, force: bool = False) -> None:
        endpoints = watch.endpoints()
        if not force and endpoints == watch.emitted:
            return
        watch.emitted = endpoints
        result = emit(EndpointSet(provider=self.name, service=watch.service,
                                  endpoints=endpoints, revision=str(watch.revision)))
        if inspect.isawaitable(result):
            await result

    def _succeeded(self, watch: _Watch, backoff: Backoff) -> None:
        watch.last_error = None
        if watch.failing:
            watch.failing = False
            self.health.reconnects += 1
            log.info("etcd: %s resynced at revision %d", watch.service, watch.revision)
        backoff.reset()
        # one provider state for every prefix: ok only when none of them is failing
        if not any(w.failing for w in self._watches.values()):
            self.health.ok()

    # ------------------------------------------------------------------ discovery
    async def run(self, emit: Emit) -> None:
        """Watch every source prefix until cancelled (see the module docstring)."""
        tasks = [asyncio.create_task(self._watch_loop(w, emit), name=f"etcd-watch {w.service}")
                 for w in self._watches.values()]
        try:
            if tasks:
                await asyncio.gather(*tasks)
            else:
                await asyncio.get_running_loop().create_future()  # registration only
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _watch_loop(self, watch: _Watch, emit: Emit) -> None:
        backoff = Backoff(self.backoff_initial, self.backoff_max)
        while True:
            try:
                if watch.revision == 0:
                    await self._relist(watch, emit)
                    self._succeeded(watch, backoff)
                await self._watch_stream(watch, emit, backoff)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - a registry error never ends discovery
                expected = isinstance(exc, (EtcdError, ConnectionError, ValueError, KeyError))
                message = f"{watch.service}: {exc}" if str(exc) else \
                    f"{watch.service}: {type(exc).__name__}"
                if not watch.failing:
                    log.warning("etcd: %s; keeping the last known endpoints", message,
                                exc_info=not expected)
                watch.failing = True
                watch.last_error = message
                self.health.failed(message)
                await backoff.sleep()

    async def _relist(self, watch: _Watch, emit: Emit) -> None:
        answer = await self._post("/v3/kv/range", {"key": _b64(watch.prefix),
                                                   "range_end": _b64(watch.range_end)})
        revision = int(answer["header"]["revision"])
        watch.entries.clear()
        watch.invalid.clear()
        for kv in answer.get("kvs") or ():
            watch.apply(base64.b64decode(kv["key"]), base64.b64decode(kv.get("value", "")),
                        int(kv.get("mod_revision", 0)))
        watch.revision = revision
        watch.relists += 1
        await self._emit(watch, emit, force=True)

    async def _watch_stream(self, watch: _Watch, emit: Emit, backoff: Backoff) -> None:
        """One watch request; returns to re-list (compaction) or to resume (idle)."""
        import aiohttp

        session = await self._get_session()
        start = watch.revision + 1
        body = {"create_request": {"key": _b64(watch.prefix), "range_end": _b64(watch.range_end),
                                   "start_revision": start, "progress_notify": True}}
        headers = await self._auth_header()
        url = self._endpoint() + "/v3/watch"
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.dial_timeout,
                                        sock_read=self.idle_timeout)
        try:
            async with session.post(url, json=body, headers=headers, timeout=timeout) as resp:
                if resp.status != 200:
                    err = _answer_error(_json(await resp.read(), url), resp.status, url)
                    if err.auth_invalid:
                        self._token = None
                    raise err
                buffer = b""
                try:
                    async for chunk in resp.content.iter_any():
                        buffer += chunk
                        if len(buffer) > MAX_MESSAGE_BYTES and b"\n" not in buffer:
                            raise ValueError(f"watch {url}: a message over "
                                             f"{MAX_MESSAGE_BYTES} bytes")
                        while True:
                            line, sep, rest = buffer.partition(b"\n")
                            if not sep:
                                break
                            buffer = rest
                            if line.strip() and await self._on_message(
                                    watch, _json(line, url), emit, backoff):
                                return  # compacted: re-list
                except aiohttp.ServerTimeoutError:
                    watch.resumes += 1
                    log.debug("etcd: %s watch idle for %.0fs; resuming from %d",
                              watch.service, self.idle_timeout, watch.revision + 1)
                    return
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            self._next_endpoint()
            raise ConnectionError(f"watch {url}: {type(exc).__name__}: {exc}") from exc
        raise ConnectionError(f"watch {url}: stream ended")

    async def _on_message(self, watch: _Watch, msg: dict, emit: Emit, backoff: Backoff) -> bool:
        """Handle one watch response; True means "re-list now"."""
        if "error" in msg:
            err = msg["error"]
            raise _answer_error(err if isinstance(err, dict) else {"message": str(err)}, 0, "watch")
        result = msg.get("result", msg)
        compact = int(result.get("compact_revision", 0) or 0)
        if compact:
            log.info("etcd: %s revision %d was compacted (oldest kept: %d); re-listing",
                     watch.service, watch.revision + 1, compact)
            watch.revision = 0
            return True
        if result.get("canceled"):
            reason = result.get("cancel_reason", "") or "watch canceled by the server"
            if _is_auth_reason(reason):
                self._token = None
            raise EtcdError(reason, code=16 if _is_auth_reason(reason) else 0)
        if result.get("created"):
            if watch.failing:
                watch.resumes += 1
            self._succeeded(watch, backoff)
            return False
        events = result.get("events") or ()
        if events:
            for event in events:
                kv = event["kv"]
                key = base64.b64decode(kv["key"])
                revision = int(kv.get("mod_revision", 0))
                if event.get("type", "PUT") == "DELETE":
                    watch.apply(key, None, revision)
                else:
                    watch.apply(key, base64.b64decode(kv.get("value", "")), revision)
            watch.revision = max(watch.revision, int(events[-1]["kv"].get("mod_revision", 0)))
            await self._emit(watch, emit)
        else:  # progress notification: every event up to header.revision was delivered
            revision = int(result.get("header", {}).get("revision", 0) or 0)
            watch.revision = max(watch.revision, revision)
        self._succeeded(watch, backoff)
        return False

    # ------------------------------------------------------------------ registration
    async def register(self, instance: Instance) -> None:
        """Put ``<prefix>/<id>`` under a lease of ``ttl_seconds`` and keep the lease alive
        (every ttl/3). Returns after the first attempt (or ``dial_timeout``); never raises
        for a registry error: a background task keeps retrying, and re-registers with a new
        lease if the old one expired. The state is in ``status()["registration"]``."""
        if self._registration is not None:
            await self.deregister()
        meta = dict(instance.meta)
        if instance.tags:
            meta["tags"] = list(instance.tags)
        value = json.dumps({"host": instance.host, "port": instance.port, "weight": 1,
                            "meta": meta}, separators=(",", ":"), sort_keys=True)
        reg = _Registration(normalise_prefix(instance.service) + instance.id, value,
                            max(MIN_LEASE_TTL, math.ceil(instance.ttl_seconds)))
        self._registration = reg
        # the task owns the registration, so that a caller's timeout cannot cut a grant
        # from its put
        reg.task = asyncio.create_task(self._keepalive_loop(reg), name="etcd-keepalive")
        try:
            await asyncio.wait_for(asyncio.shield(reg.attempted.wait()), self.dial_timeout)
        except asyncio.TimeoutError:
            pass

    async def _grant_and_put(self, reg: _Registration) -> None:
        answer = await self._post("/v3/lease/grant", {"TTL": reg.ttl})
        lease = int(answer["ID"])
        await self._post("/v3/kv/put", {"key": _b64(reg.key.encode()),
                                        "value": _b64(reg.value.encode()), "lease": lease})
        reg.lease = lease
        if reg.state != "registered":
            log.info("etcd: registered %s (lease %x, ttl %ds)", reg.key, lease, reg.ttl)
        reg.state = "registered"
        reg.last_error = None

    def _registration_failed(self, reg: _Registration, exc: BaseException) -> None:
        if reg.state != "retrying":
            log.warning("etcd: registration of %s: %s; retrying", reg.key, exc)
        reg.state = "retrying"
        reg.last_error = str(exc) or type(exc).__name__

    async def _keepalive_loop(self, reg: _Registration) -> None:
        interval = reg.ttl / 3.0
        first = True
        while True:
            if not first:
                await asyncio.sleep(interval)
            try:
                if not reg.lease:
                    await self._grant_and_put(reg)
                else:
                    answer = await self._post("/v3/lease/keepalive", {"ID": reg.lease})
                    ttl = int(answer.get("result", answer).get("TTL", 0) or 0)
                    if ttl <= 0:  # the lease expired (we were cut off too long): start over
                        log.warning("etcd: lease %x of %s expired; registering again",
                                    reg.lease, reg.key)
                        reg.lease = 0
                        await self._grant_and_put(reg)
                    elif reg.state != "registered":
                        reg.state, reg.last_error = "registered", None
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001
                self._registration_failed(reg, exc)
            if first:
                first = False
                reg.attempted.set()

    async def deregister(self) -> None:
        """Stop the keep-alive and revoke the lease (etcd deletes the key with it)."""
        reg, self._registration = self._registration, None
        if reg is None:
            return
        if reg.task is not None:
            reg.task.cancel()
            await asyncio.gather(reg.task, return_exceptions=True)
        try:
            if reg.lease:
                await self._post("/v3/lease/revoke", {"ID": reg.lease})
            else:
                await self._post("/v3/kv/deleterange", {"key": _b64(reg.key.encode())})
            log.info("etcd: deregistered %s", reg.key)
        except Exception as exc:  # noqa: BLE001 - the lease still expires on its own
            log.warning("etcd: deregistering %s: %s (the lease expires in %ds)",
                        reg.key, exc, reg.ttl)
        reg.state = "deregistered"

    # ------------------------------------------------------------------ lifecycle
    async def close(self) -> None:
        """Stop the keep-alive (without revoking) and close the HTTP session. Idempotent."""
        reg = self._registration
        if reg is not None and reg.task is not None:
            reg.task.cancel()
            await asyncio.gather(reg.task, return_exceptions=True)
        if self._session is not None and not self._session.closed:
            await self._session.close()
        self._session = None

    def status(self) -> dict:
        out = super().status()
        out["endpoint"] = self._endpoint()
        out["authentications"] = self.authentications
        out["services"] = {
            w.service: {"prefix": w.prefix.decode("utf-8", "replace"), "revision": w.revision,
                        "endpoints": len(w.emitted or ()), "relists": w.relists,
                        "resumes": w.resumes, "invalid_keys": dict(w.invalid),
                        "state": "stale" if w.failing else ("ok" if w.relists else "starting"),
                        "last_error": w.last_error}
            for w in self._watches.values()}
        if self._registration is not None:
            out["registration"] = self._registration.as_dict()
        return out


def _json(raw: bytes, where: str) -> dict:
    try:
        doc = json.loads(raw)
    except ValueError as exc:
        raise ValueError(f"{where}: not JSON: {raw[:120]!r}") from exc
    if not isinstance(doc, dict):
        raise ValueError(f"{where}: expected a JSON object, got {raw[:120]!r}")
    return doc


def _answer_error(answer: dict, status: int, where: str) -> EtcdError:
    message = answer.get("message") or answer.get("error") or f"HTTP {status}"
    code = answer.get("code", answer.get("grpc_code", 0))
    try:
        code = int(code)
    except (TypeError, ValueError):
        code = 0
    return EtcdError(f"{where}: {message}", code=code,
                     http_status=status or int(answer.get("http_code", 0) or 0))
