"""Kubernetes discovery: EndpointSlices (Endpoints as fallback) and Services, by list then
watch, plus ConfigMaps and Secrets as configuration and certificate sources.

Theory of operation
-------------------
Each source ``service = "namespace/name"`` (or ``"name"`` in ``[service_discovery.kubernetes]
namespace``) runs two *reflectors* (client-go's name for a list-then-watch loop):

* EndpointSlices ``/apis/discovery.k8s.io/v1/namespaces/<ns>/endpointslices`` with
  ``labelSelector=kubernetes.io/service-name=<name>`` (plus the source's ``label_selector``).
  If the ``discovery.k8s.io`` API is absent (404 on the list) the source falls back to the
  core Endpoints object (``/api/v1/namespaces/<ns>/endpoints``, ``fieldSelector=
  metadata.name=<name>``) for good.
* The Service (``fieldSelector=metadata.name=<name>``), to resolve ``port_name``: a Service
  port name, a Service port number or a target port, mapped to the slice port of that name.

A reflector lists (paginated with ``limit``/``continue``), keeps the objects and the list's
``resourceVersion``, then watches from it (``watch=1&allowWatchBookmarks=true
&timeoutSeconds=<refresh_interval>``): ADDED/MODIFIED/DELETED update the objects, BOOKMARK
only advances the resourceVersion. A watch that ends or breaks is resumed from the last
resourceVersion, so no event is missed; only 410 Gone (HTTP 410, or an ERROR event whose
Status has code 410) triggers a full re-list. Errors are recorded in ``health`` and retried
with :class:`Backoff`; nothing is emitted, so the last known good set stays in force.

The endpoint set: every endpoint address with the chosen port; with
``health_check_integration`` only ready ones (``conditions.ready`` not false; a nil
condition means "unknown", which the API says to treat as ready). Terminating endpoints are
always left out, so a pod being deleted stops receiving new requests before it exits.

Authentication (:func:`resolve_credentials`): a kubeconfig (``current-context``, cluster
``server`` and ``certificate-authority(-data)``, user ``token``/``tokenFile`` or
``client-certificate(-data)`` + ``client-key(-data)``), or in-cluster (the service-account
token and CA under ``/var/run/secrets/kubernetes.io/serviceaccount`` and
``KUBERNETES_SERVICE_HOST``/``PORT``). A token file is re-read when it changes (projected
tokens rotate). aiohttp is imported here only: workers never import this module.

ConfigMaps (``[service_discovery.kubernetes] config_maps``) and Secrets (``[tls]
kubernetes_secrets``) are watched by :meth:`KubernetesProvider.run` when the watcher set
``on_config`` / ``on_secret``: every ``.toml``/``.json`` key of the ConfigMaps is a
configuration fragment (``config/merge.py``), every Secret a certificate pair for the TLS
store.

See docs/discovery-kubernetes.md.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import inspect
import json
import logging
import os
import ssl
import tempfile
from typing import Any, Awaitable, Callable, Mapping, Optional, Union

import aiohttp

from dispa.discovery.provider import (
    Backoff, DiscoveredEndpoint, Emit, EndpointSet, Provider, ProviderHealth,
)

__all__ = ["ApiClient", "ApiError", "Credentials", "KubeConfigError", "KubeConfigMap",
           "KubeSecret", "KubernetesProvider", "Reflector", "endpoints_from_endpoints",
           "endpoints_from_slices", "in_cluster_credentials", "load_kubeconfig",
           "resolve_credentials", "resolve_port_name"]

log = logging.getLogger("dispa.discovery.kubernetes")

SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
#: List page size (the API server's own default page for kubectl is 500).
PAGE_SIZE = 500
#: A watch line longer than this is a broken stream, not an object.
MAX_EVENT_BYTES = 16 * 1024 * 1024
#: Seconds added to the watch's ``timeoutSeconds`` before the client gives up on a silent
#: stream (a half-open connection never sends FIN).
WATCH_READ_SLACK = 30.0
REQUEST_TIMEOUT = aiohttp.ClientTimeout(total=30, connect=5)


class KubeConfigError(Exception):
    """The kubeconfig / in-cluster settings are unusable (missing file, bad YAML, ...)."""


class ApiError(Exception):
    """A non-2xx answer; ``code`` and ``reason`` come from the Status object when present."""

    def __init__(self, code: int, reason: str = "", message: str = ""):
        super().__init__(f"{code} {reason}: {message}".strip(": "))
        self.code = code
        self.reason = reason
        self.message = message


class Gone(ApiError):
    """410: the resourceVersion (or continue token) was compacted away; re-list."""


# ====================================================================== credentials

class Credentials:
    """Where the API server is and how to authenticate to it."""

    def __init__(self, server: str, *, token: str = "", token_file: str = "",
                 ca_file: str = "", ca_data: str = "", cert_file: str = "",
                 key_file: str = "", cert_data: bytes = b"", key_data: bytes = b"",
                 insecure: bool = False, namespace: str = ""):
        self.server = server.rstrip("/")
        self.token = token
        self.token_file = token_file
        self.ca_file = ca_file
        self.ca_data = ca_data
        self.cert_file = cert_file
        self.key_file = key_file
        self.cert_data = cert_data
        self.key_data = key_data
        self.insecure = insecure
        self.namespace = namespace
        self._token_stat: Optional[tuple] = None

    def bearer(self) -> str:
        """The bearer token; a ``token_file`` is re-read whenever it changes (bound service
        account tokens are rotated by the kubelet)."""
        if not self.token_file:
            return self.token
        try:
            st = os.stat(self.token_file)
            key = (st.st_mtime_ns, st.st_size, st.st_ino)
            if key != self._token_stat:
                with open(self.token_file, encoding="utf-8") as f:
                    self.token = f.read().strip()
                self._token_stat = key
        except OSError as exc:
            if not self.token:
                raise ApiError(0, "TokenFile", f"{self.token_file}: {exc.strerror}") from exc
        return self.token

    def ssl_context(self) -> Optional[ssl.SSLContext]:
        """The TLS client context for an ``https://`` server (None for ``http://``)."""
        if not self.server.startswith("https://"):
            return None
        ctx = ssl.create_default_context()
        try:
            if self.ca_file:
                ctx.load_verify_locations(cafile=self.ca_file)
            if self.ca_data:
                ctx.load_verify_locations(cadata=self.ca_data)
            if self.insecure:
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
            if self.cert_file or self.cert_data:
                _load_client_cert(ctx, self)
        except (OSError, ssl.SSLError, ValueError) as exc:
            raise KubeConfigError(f"TLS settings: {exc}") from exc
        return ctx


def _load_client_cert(ctx: ssl.SSLContext, creds: Credentials) -> None:
    # ssl wants files: inline (-data) PEM goes through a private temporary directory that
    # is removed as soon as the chain is loaded.
    with tempfile.TemporaryDirectory(prefix="dispa-k8s-") as tmp:
        cert, key = creds.cert_file, creds.key_file
        if creds.cert_data:
            cert = os.path.join(tmp, "client.crt")
            _write_private(cert, creds.cert_data)
        if creds.key_data:
            key = os.path.join(tmp, "client.key")
            _write_private(key, creds.key_data)
        ctx.load_cert_chain(cert, key or None)


def _write_private(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _b64(value: str, what: str) -> bytes:
    try:
        return base64.b64decode(value, validate=False)
    except (ValueError, TypeError) as exc:
        raise KubeConfigError(f"{what}: not base64") from exc


def _named(entries: Any, name: str, what: str, path: str) -> dict:
    for entry in entries or []:
        if isinstance(entry, dict) and entry.get("name") == name:
            body = entry.get(what)
            if not isinstance(body, dict):
                raise KubeConfigError(f"{path}: {what} {name!r} has no {what} table")
            return body
    raise KubeConfigError(f"{path}: no {what} named {name!r}")


def load_kubeconfig(path: str, context: str = "") -> Credentials:
    """Credentials from a kubeconfig file's ``current-context`` (or ``context``)."""
    import yaml

    path = os.path.expanduser(path)
    try:
        with open(path, encoding="utf-8") as f:
            doc = yaml.safe_load(f)
    except OSError as exc:
        raise KubeConfigError(f"kubeconfig {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise KubeConfigError(f"kubeconfig {path}: invalid YAML: {exc}") from exc
    if not isinstance(doc, dict):
        raise KubeConfigError(f"kubeconfig {path}: not a mapping")
    base = os.path.dirname(os.path.abspath(path))

    def rel(p: str) -> str:  # kubeconfig paths are relative to the file
        return p if not p or os.path.isabs(p) else os.path.join(base, p)

    name = context or doc.get("current-context") or ""
    if not name:
        raise KubeConfigError(f"kubeconfig {path}: no current-context")
    ctx = _named(doc.get("contexts"), name, "context", path)
    cluster = _named(doc.get("clusters"), ctx.get("cluster", ""), "cluster", path)
    user = _named(doc.get("users"), ctx.get("user", ""), "user", path) if ctx.get(
        "user") else {}
    server = cluster.get("server") or ""
    if not server.startswith(("http://", "https://")):
        raise KubeConfigError(f"kubeconfig {path}: cluster server {server!r} is not a URL")
    if "exec" in user or "auth-provider" in user:
        raise KubeConfigError(f"kubeconfig {path}: user {ctx.get('user')!r} uses a credential "
                              "plugin (exec/auth-provider), which Dispa does not run; use a "
                              "token, tokenFile or a client certificate")
    creds = Credentials(
        server,
        token=str(user.get("token") or ""),
        token_file=rel(user.get("tokenFile") or ""),
        ca_file=rel(cluster.get("certificate-authority") or ""),
        ca_data=_b64(cluster["certificate-authority-data"],
                     "certificate-authority-data").decode("ascii", "replace")
        if cluster.get("certificate-authority-data") else "",
        cert_file=rel(user.get("client-certificate") or ""),
        key_file=rel(user.get("client-key") or ""),
        cert_data=_b64(user["client-certificate-data"], "client-certificate-data")
        if user.get("client-certificate-data") else b"",
        key_data=_b64(user["client-key-data"], "client-key-data")
        if user.get("client-key-data") else b"",
        insecure=bool(cluster.get("insecure-skip-tls-verify")),
        namespace=str(ctx.get("namespace") or ""))
    if bool(creds.cert_file or creds.cert_data) != bool(creds.key_file or creds.key_data):
        raise KubeConfigError(f"kubeconfig {path}: client certificate and key go together")
    return creds


def in_cluster_credentials(*, api_server: str = "", token_file: str = "", ca_file: str = "",
                           environ: Mapping[str, str] = os.environ) -> Credentials:
    """The pod's service account: its token and CA, and the API server from the
    ``KUBERNETES_SERVICE_HOST``/``KUBERNETES_SERVICE_PORT`` environment."""
    if not api_server:
        host = environ.get("KUBERNETES_SERVICE_HOST", "")
        port = environ.get("KUBERNETES_SERVICE_PORT", "")
        if not host or not port:
            raise KubeConfigError("in_cluster: KUBERNETES_SERVICE_HOST and "
                                  "KUBERNETES_SERVICE_PORT are not set (not in a pod?)")
        api_server = f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}"
    token_file = token_file or os.path.join(SERVICE_ACCOUNT_DIR, "token")
    ca_file = ca_file or os.path.join(SERVICE_ACCOUNT_DIR, "ca.crt")
    if not os.access(token_file, os.R_OK):
        raise KubeConfigError(f"in_cluster: service account token {token_file} is not readable")
    namespace = ""
    try:
        with open(os.path.join(os.path.dirname(token_file), "namespace"),
                  encoding="utf-8") as f:
            namespace = f.read().strip()
    except OSError:
        pass
    return Credentials(api_server, token_file=token_file,
                       ca_file=ca_file if os.path.exists(ca_file) else "",
                       namespace=namespace)


def resolve_credentials(options: Any, environ: Mapping[str, str] = os.environ) -> Credentials:
    """``[service_discovery.kubernetes]`` -> Credentials. In order: ``kubeconfig``; in-cluster
    (``in_cluster``, or no ``api_server`` inside a pod); ``api_server`` with the optional
    ``token_file``/``ca_file``; ``$KUBECONFIG`` or ``~/.kube/config``."""
    api_server = getattr(options, "api_server", "") or ""
    token_file = getattr(options, "token_file", "") or ""
    ca_file = getattr(options, "ca_file", "") or ""
    kubeconfig = getattr(options, "kubeconfig", "") or ""
    if kubeconfig:
        creds = load_kubeconfig(kubeconfig)
    elif getattr(options, "in_cluster", False) or (
            not api_server and environ.get("KUBERNETES_SERVICE_HOST")):
        return in_cluster_credentials(api_server=api_server, token_file=token_file,
                                      ca_file=ca_file, environ=environ)
    elif api_server:
        creds = Credentials(api_server)
    else:
        fallback = environ.get("KUBECONFIG", "").split(os.pathsep)[0] or os.path.expanduser(
            "~/.kube/config")
        if not os.path.exists(fallback):
            raise KubeConfigError("no API server: set [service_discovery.kubernetes] "
                                  "api_server, kubeconfig or in_cluster")
        creds = load_kubeconfig(fallback)
    if api_server:
        creds.server = api_server.rstrip("/")
    if token_file:
        creds.token_file, creds.token = token_file, ""
    if ca_file:
        creds.ca_file, creds.ca_data = ca_file, ""
    if not creds.server.startswith(("http://", "https://")):
        raise KubeConfigError(f"api_server {creds.server!r}: expected https://host:port")
    return creds


# ====================================================================== HTTP client

class ApiClient:
    """A thin list/get/watch client of the API server's JSON API."""

    def __init__(self, creds: Credentials, *, user_agent: str = "dispa"):
        self.creds = creds
        self._ssl = creds.ssl_context()
        self._user_agent = user_agent
        self._session: Optional[aiohttp.ClientSession] = None

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=self._ssl or True, limit=0),
                headers={"Accept": "application/json", "User-Agent": self._user_agent})
        return self._session

    def _headers(self) -> dict:
        token = self.creds.bearer()
        return {"Authorization": f"Bearer {token}"} if token else {}

    @staticmethod
    async def _raise_for(resp: aiohttp.ClientResponse) -> None:
        if resp.status < 300:
            return
        reason, message = resp.reason or "", ""
        try:
            body = await resp.json(content_type=None)
            if isinstance(body, dict):
                reason = body.get("reason") or reason
                message = body.get("message") or ""
        except (ValueError, aiohttp.ClientError):
            pass
        cls = Gone if resp.status == 410 else ApiError
        raise cls(resp.status, reason, message)

    async def get(self, path: str, params: Optional[dict] = None) -> dict:
        """GET a JSON object; raises :class:`ApiError` for a non-2xx answer."""
        async with self._get_session().get(self.creds.server + path, params=params,
                                           headers=self._headers(),
                                           timeout=REQUEST_TIMEOUT) as resp:
            await self._raise_for(resp)
            body = await resp.json(content_type=None)
        if not isinstance(body, dict):
            raise ApiError(resp.status, "BadBody", "expected a JSON object")
        return body

    async def list(self, path: str, params: dict) -> tuple[list[dict], str]:
        """All items of a collection (following ``continue``) and the list's
        resourceVersion. An expired continue token restarts the list once without paging."""
        items: list[dict] = []
        query = dict(params, limit=str(PAGE_SIZE))
        restarted = False
        while True:
            try:
                page = await self.get(path, query)
            except Gone:
                if restarted or "continue" not in query:
                    raise
                restarted = True
                items, query = [], dict(params)
                continue
            items += [i for i in page.get("items") or [] if isinstance(i, dict)]
            meta = page.get("metadata") or {}
            token = meta.get("continue")
            if not token:
                return items, str(meta.get("resourceVersion") or "")
            query = dict(query, **{"continue": token})

    async def watch(self, path: str, params: dict, read_timeout: float,
                    on_open: Callable[[], None] = lambda: None):
        """Yield the watch events (dicts) of a chunked JSON-lines stream until it ends."""
        timeout = aiohttp.ClientTimeout(total=None, connect=5, sock_read=read_timeout)
        async with self._get_session().get(self.creds.server + path,
                                           params=dict(params, watch="1"),
                                           headers=self._headers(), timeout=timeout) as resp:
            await self._raise_for(resp)
            on_open()
            buf = bytearray()
            async for chunk in resp.content.iter_any():
                start = len(buf)
                buf += chunk
                # chunk boundaries are not event boundaries: split on newlines ourselves
                # (StreamReader.readline caps a line at 128 KiB; a Secret can be larger)
                nl = buf.find(b"\n", start)
                while nl >= 0:
                    line = bytes(buf[:nl]).strip()
                    del buf[:nl + 1]
                    if line:
                        yield _event(line)
                    nl = buf.find(b"\n")
                if len(buf) > MAX_EVENT_BYTES:
                    raise ValueError("watch event too large")
            if bytes(buf).strip():
                yield _event(bytes(buf))

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def _event(line: bytes) -> dict:
    event = json.loads(line)
    if not isinstance(event, dict):
        raise ValueError("watch event is not an object")
    return event


# ====================================================================== reflector

OnChange = Callable[[], Union[None, Awaitable[None]]]


async def _maybe_await(value) -> None:
    if inspect.isawaitable(value):
        await value


class Reflector:
    """List then watch one collection, forever (see the module docstring).

    ``objects`` maps ``namespace/name`` to the object; ``synced`` turns true after the first
    list; ``on_change()`` runs after every list and every ADDED/MODIFIED/DELETED event, and
    after a failure that sets ``refused`` (401/403/404: a consumer waiting for ``synced``
    can give up on an optional resource). A 404 on the list raises :class:`ApiError` out
    of :meth:`run` when ``not_found_raises`` (the caller falls back to another resource).
    """

    def __init__(self, client: ApiClient, path: str, *, label_selector: str = "",
                 field_selector: str = "", on_change: OnChange = lambda: None,
                 health: Optional[ProviderHealth] = None, watch_timeout: float = 30.0,
                 not_found_raises: bool = False, backoff: Optional[Backoff] = None,
                 peers: Optional[list] = None):
        self.client = client
        self.path = path
        self.params = {k: v for k, v in (("labelSelector", label_selector),
                                         ("fieldSelector", field_selector)) if v}
        self.on_change = on_change
        self.health = health if health is not None else ProviderHealth()
        # Reflectors sharing ``health`` (one per service of a provider): the shared state
        # turns ok only when none of them is failing, so that one service that keeps
        # failing (RBAC on its namespace, say) is not hidden by another one's success.
        self.peers = peers if peers is not None else []
        self.peers.append(self)
        self.failing = False
        self.watch_timeout = max(1, int(watch_timeout))
        self.not_found_raises = not_found_raises
        self.backoff = backoff or Backoff()
        self.objects: dict[str, dict] = {}
        self.resource_version = ""
        self.synced = False
        self.failures = 0
        self._failing = 0  # failures since the last success (logs once per outage)
        # the last error was one a retry will not fix soon (403 Forbidden, 404)
        self.refused = False
        self.lists = 0  # full lists done (the first one plus every re-list)
        self.watches = 0  # watch streams opened
        self.events = 0  # ADDED/MODIFIED/DELETED applied

    @staticmethod
    def key(obj: dict) -> str:
        meta = obj.get("metadata") or {}
        return f"{meta.get('namespace', '')}/{meta.get('name', '')}"

    async def run(self) -> None:
        relist = True
        loop = asyncio.get_running_loop()
        while True:
            try:
                if relist:
                    await self._list()
                    relist = False
                started, seen = loop.time(), self.events
                await self._watch()
                # a stream that ends at once, again and again, must not spin
                if loop.time() - started < 1.0 and self.events == seen:
                    await self.backoff.sleep()
            except asyncio.CancelledError:
                raise
            except Gone as exc:
                log.info("%s: %s; re-listing", self.path, exc)
                relist = True
            except ApiError as exc:
                if exc.code == 404 and relist and self.not_found_raises:
                    raise
                await self._failed(exc)
            except Exception as exc:  # noqa: BLE001 - a registry error never ends the loop
                # (network, TLS, malformed JSON or objects: all retried from the last
                # resourceVersion; CancelledError is not an Exception and ends it)
                await self._failed(exc)

    def _healthy(self) -> None:
        self.failing = False
        if not any(p.failing for p in self.peers):
            self.health.ok()

    async def _failed(self, exc: BaseException) -> None:
        self.failing = True
        self.failures += 1
        self.refused = isinstance(exc, ApiError) and exc.code in (401, 403, 404)
        self.health.failed(f"{self.path}: {type(exc).__name__}: {exc}".rstrip(": "))
        self.health.reconnects += 1
        self._failing += 1
        # one warning per outage; the retries while it lasts go to debug
        log.log(logging.WARNING if self._failing == 1 else logging.DEBUG,
                "%s: %s (retrying; will resume from resourceVersion %s)", self.path, exc,
                self.resource_version or "-")
        if self.refused:
            await _maybe_await(self.on_change())
        await self.backoff.sleep()

    async def _list(self) -> None:
        items, rv = await self.client.list(self.path, self.params)
        self.objects = {self.key(o): o for o in items}
        self.resource_version = rv
        self.lists += 1
        self._recovered()
        self.synced = True
        self._healthy()
        self.backoff.reset()
        await _maybe_await(self.on_change())

    def _recovered(self) -> None:
        if self._failing:
            log.info("%s: API server answers again after %d failed attempts", self.path,
                     self._failing)
            self._failing = 0

    def _opened(self) -> None:
        self._recovered()
        self.watches += 1
        self._healthy()
        self.backoff.reset()

    async def _watch(self) -> None:
        params = dict(self.params, resourceVersion=self.resource_version,
                      allowWatchBookmarks="true", timeoutSeconds=str(self.watch_timeout))
        stream = self.client.watch(self.path, params, self.watch_timeout + WATCH_READ_SLACK,
                                   self._opened)
        # aclosing: leaving on an ERROR event or a cancel closes the response at once
        async with contextlib.aclosing(stream) as events:
            async for event in events:
                await self._apply(event)

    async def _apply(self, event: dict) -> None:
        """One watch event: update the objects and the resourceVersion, or raise."""
        etype, obj = event.get("type"), event.get("object")
        if not isinstance(obj, dict):
            raise ValueError(f"watch event {etype!r} without an object")
        if etype == "ERROR":
            code = int(obj.get("code") or 0)
            cls = Gone if code == 410 else ApiError
            raise cls(code, obj.get("reason") or "", obj.get("message") or "")
        rv = (obj.get("metadata") or {}).get("resourceVersion")
        if etype == "BOOKMARK":
            if rv:
                self.resource_version = str(rv)
            return
        if etype in ("ADDED", "MODIFIED"):
            self.objects[self.key(obj)] = obj
        elif etype == "DELETED":
            self.objects.pop(self.key(obj), None)
        else:
            raise ValueError(f"unknown watch event type {etype!r}")
        if rv:
            self.resource_version = str(rv)
        self.events += 1
        await _maybe_await(self.on_change())


# ====================================================================== endpoint sets

def _port_key(name: Any) -> str:
    return str(name or "")


def resolve_port_name(service: Optional[dict], port_name: str) -> Optional[str]:
    """Which EndpointSlice/Endpoints port name to use (``""`` is the unnamed port; None:
    the first port of each slice, when nothing better is known).

    ``port_name`` may be a Service port name, a Service port number or a target port (name
    or number); "" means the Service's first port."""
    ports = [p for p in ((service or {}).get("spec") or {}).get("ports") or []
             if isinstance(p, dict)]
    if not ports:
        return port_name or None
    if not port_name:
        return _port_key(ports[0].get("name"))
    for field in ("name", "port", "targetPort"):
        for p in ports:
            if str(p.get(field, "")) == port_name:
                return _port_key(p.get("name"))
    return port_name


def _pick_port(ports: Any, wanted: Optional[str]) -> Optional[int]:
    for p in ports or []:
        if not isinstance(p, dict) or not isinstance(p.get("port"), int):
            continue  # a nil port means "all ports": nothing to dial
        if wanted is None or _port_key(p.get("name")) == wanted:
            return p["port"]
    return None


def endpoints_from_slices(slices: list[dict], port_name: Optional[str], ready_only: bool,
                          meta: Optional[dict] = None) -> tuple[DiscoveredEndpoint, ...]:
    """The endpoints of a Service's EndpointSlices (sorted, one per address and port)."""
    out: dict[tuple[str, int], DiscoveredEndpoint] = {}
    for sl in slices:
        if sl.get("addressType") not in ("IPv4", "IPv6", "FQDN"):
            continue
        port = _pick_port(sl.get("ports"), port_name)
        if port is None:
            continue
        for ep in sl.get("endpoints") or []:
            if not isinstance(ep, dict):
                continue
            cond = ep.get("conditions") or {}
            if cond.get("terminating") is True:
                continue
            if ready_only and cond.get("ready") is False:
                continue
            extra = dict(meta or {})
            ref = ep.get("targetRef") or {}
            if ref.get("name"):
                extra["name"] = ref["name"]
            for k, src in (("zone", "zone"), ("node", "nodeName")):
                if ep.get(src):
                    extra[k] = ep[src]
            extra["ready"] = cond.get("ready") is not False
            for addr in (ep.get("addresses") or [])[:1]:  # all addresses are one endpoint
                if not isinstance(addr, str) or not addr:
                    continue
                out.setdefault((addr, port), DiscoveredEndpoint(host=addr, port=port,
                                                                meta=extra))
    return tuple(out[k] for k in sorted(out))


def endpoints_from_endpoints(objects: list[dict], port_name: Optional[str], ready_only: bool,
                             meta: Optional[dict] = None) -> tuple[DiscoveredEndpoint, ...]:
    """The endpoints of a core/v1 Endpoints object (the fallback path)."""
    out: dict[tuple[str, int], DiscoveredEndpoint] = {}
    for obj in objects:
        for subset in obj.get("subsets") or []:
            if not isinstance(subset, dict):
                continue
            port = _pick_port(subset.get("ports"), port_name)
            if port is None:
                continue
            groups = [(subset.get("addresses") or [], True)]
            if not ready_only:
                groups.append((subset.get("notReadyAddresses") or [], False))
            for addrs, ready in groups:
                for a in addrs:
                    if not isinstance(a, dict) or not a.get("ip"):
                        continue
                    extra = dict(meta or {}, ready=ready)
                    if (a.get("targetRef") or {}).get("name"):
                        extra["name"] = a["targetRef"]["name"]
                    if a.get("nodeName"):
                        extra["node"] = a["nodeName"]
                    out.setdefault((a["ip"], port), DiscoveredEndpoint(host=a["ip"], port=port,
                                                                       meta=extra))
    return tuple(out[k] for k in sorted(out))


# ====================================================================== ConfigMaps, Secrets

class KubeConfigMap:
    """A ConfigMap as :meth:`KubernetesProvider.watch_configmap` delivers it."""

    __slots__ = ("namespace", "name", "data", "binary_data", "resource_version")

    def __init__(self, obj: dict):
        meta = obj.get("metadata") or {}
        self.namespace = meta.get("namespace", "")
        self.name = meta.get("name", "")
        self.resource_version = str(meta.get("resourceVersion") or "")
        self.data: dict[str, str] = dict(obj.get("data") or {})
        self.binary_data: dict[str, bytes] = {
            k: base64.b64decode(v) for k, v in (obj.get("binaryData") or {}).items()}


class KubeSecret:
    """A Secret (values base64-decoded). For ``type: kubernetes.io/tls`` secrets,
    ``cert_pem`` / ``key_pem`` (and ``ca_pem`` when present) are the PEM bytes."""

    __slots__ = ("namespace", "name", "type", "data", "resource_version")

    def __init__(self, obj: dict):
        meta = obj.get("metadata") or {}
        self.namespace = meta.get("namespace", "")
        self.name = meta.get("name", "")
        self.type = obj.get("type") or "Opaque"
        self.resource_version = str(meta.get("resourceVersion") or "")
        self.data: dict[str, bytes] = {k: base64.b64decode(v)
                                       for k, v in (obj.get("data") or {}).items()}
        for k, v in (obj.get("stringData") or {}).items():
            self.data[k] = v.encode()

    @property
    def is_tls(self) -> bool:
        return self.type == "kubernetes.io/tls"

    @property
    def cert_pem(self) -> Optional[bytes]:
        return self.data.get("tls.crt")

    @property
    def key_pem(self) -> Optional[bytes]:
        return self.data.get("tls.key")

    @property
    def ca_pem(self) -> Optional[bytes]:
        return self.data.get("ca.crt")


# ====================================================================== the provider

class _Source:
    """One watched Service: its reflectors and the set last emitted."""

    def __init__(self, source: Any, default_namespace: str):
        self.service = source.service
        ns, _, name = source.service.rpartition("/")
        self.namespace = ns or default_namespace
        self.name = name
        self.port_name = str(getattr(source, "port_name", "") or "")
        self.label_selector = str(getattr(source, "label_selector", "") or "")
        self.mode = "endpointslices"
        self.endpoints: Optional[Reflector] = None
        self.svc: Optional[Reflector] = None
        self.last: Optional[tuple] = None


class KubernetesProvider(Provider):
    """Service discovery from the Kubernetes API (module docstring)."""

    kind = "kubernetes"
    #: reconnect backoff (seconds): first delay, ceiling (tests make them short)
    backoff_initial = 0.5
    backoff_max = 30.0

    def __init__(self, name: str, settings: Any, sources: list):
        super().__init__(name)
        self.settings = settings
        self.options = getattr(settings, "kubernetes", None)
        self.ready_only = bool(getattr(settings, "health_check_integration", True))
        self.watch_timeout = float(getattr(settings, "refresh_interval", 30.0))
        seen: dict[str, Any] = {}
        for s in sources:
            seen.setdefault(s.service, s)
        self.sources = list(seen.values())
        self.creds: Optional[Credentials] = None
        self.client: Optional[ApiClient] = None
        self._states: dict[str, _Source] = {}
        self._side: dict[str, Reflector] = {}  # configmap/secret watches, for status
        self._peers: list[Reflector] = []  # the reflectors that share self.health
        # Dynamic configuration and certificates (set by the watcher before run()):
        # ConfigMaps whose .toml/.json keys are fragments -> on_config({key: text});
        # kubernetes.io/tls Secrets -> on_secret("ns/name", KubeSecret or None).
        self.config_maps: list[str] = list(getattr(self.options, "config_maps", ()) or ())
        self.secrets: list[str] = []
        self.on_config: Optional[Callable[[dict], Any]] = None
        self.on_secret: Optional[Callable[[str, Optional["KubeSecret"]], Any]] = None
        self._maps: dict[str, Optional[KubeConfigMap]] = {}

    # ------------------------------------------------------------ client
    def _namespace(self) -> str:
        ns = getattr(self.options, "namespace", "default") if self.options else "default"
        return ns or (self.creds.namespace if self.creds else "") or "default"

    def _ensure_client(self) -> ApiClient:
        """The API client (built once; raises :class:`KubeConfigError`)."""
        if self.client is None:
            self.creds = resolve_credentials(self.options)
            self.client = ApiClient(self.creds)
        return self.client

    def _backoff(self) -> Backoff:
        return Backoff(self.backoff_initial, self.backoff_max)

    async def _client(self) -> ApiClient:
        backoff = self._backoff()
        while True:
            try:
                return self._ensure_client()
            except KubeConfigError as exc:
                self.health.failed(str(exc))
                log.error("kubernetes discovery: %s", exc)
                await backoff.sleep()

    # ------------------------------------------------------------ run
    async def run(self, emit: Emit) -> None:
        client = await self._client()
        self._peers.clear()  # a restarted run (after a crash) builds new reflectors
        tasks = [asyncio.ensure_future(self._run_source(client, s, emit)) for s in self.sources]
        tasks += [asyncio.ensure_future(self._run_config_map(ref)) for ref in
                  (self.config_maps if self.on_config is not None else ())]
        tasks += [asyncio.ensure_future(self._run_secret(ref)) for ref in
                  (self.secrets if self.on_secret is not None else ())]
        if not tasks:
            await asyncio.Event().wait()  # nothing to watch: idle until cancelled
        try:
            await asyncio.gather(*tasks)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _run_source(self, client: ApiClient, source: Any, emit: Emit) -> None:
        st = _Source(source, self._namespace())
        self._states[st.service] = st

        async def changed() -> None:
            await self._recompute(st, emit)

        st.svc = Reflector(client, f"/api/v1/namespaces/{st.namespace}/services",
                           field_selector=f"metadata.name={st.name}", on_change=changed,
                           watch_timeout=self.watch_timeout, backoff=self._backoff())
        selector = f"{SERVICE_NAME_LABEL}={st.name}"
        if st.label_selector:
            selector += "," + st.label_selector
        st.endpoints = Reflector(
            client, f"/apis/discovery.k8s.io/v1/namespaces/{st.namespace}/endpointslices",
            label_selector=selector, on_change=changed, health=self.health,
            watch_timeout=self.watch_timeout, not_found_raises=True, backoff=self._backoff(),
            peers=self._peers)
        svc_task = asyncio.ensure_future(st.svc.run())
        try:
            try:
                await st.endpoints.run()
            except ApiError as exc:  # 404: no discovery.k8s.io API on this server
                log.warning("%s: EndpointSlice API absent (%s); using core/v1 Endpoints",
                            st.service, exc)
                self._peers.remove(st.endpoints)
                st.mode = "endpoints"
                st.endpoints = Reflector(
                    client, f"/api/v1/namespaces/{st.namespace}/endpoints",
                    label_selector=st.label_selector,
                    field_selector=f"metadata.name={st.name}", on_change=changed,
                    health=self.health, watch_timeout=self.watch_timeout,
                    backoff=self._backoff(), peers=self._peers)
                await st.endpoints.run()
        finally:
            svc_task.cancel()
            await asyncio.gather(svc_task, return_exceptions=True)

    async def _recompute(self, st: _Source, emit: Emit) -> None:
        ep, svc = st.endpoints, st.svc
        if ep is None or svc is None or not ep.synced:
            return
        if not svc.synced and not svc.refused:
            return  # wait for the Service (it names the port) unless we may not read it
        service = next(iter(svc.objects.values()), None)
        wanted = resolve_port_name(service, st.port_name)
        meta = {"namespace": st.namespace, "service": st.name}
        items = list(ep.objects.values())
        if st.mode == "endpointslices":
            endpoints = endpoints_from_slices(items, wanted, self.ready_only, meta)
        else:
            endpoints = endpoints_from_endpoints(items, wanted, self.ready_only, meta)
        if endpoints == st.last:
            return
        st.last = endpoints
        await _maybe_await(emit(EndpointSet(provider=self.name, service=st.service,
                                            endpoints=endpoints,
                                            revision=ep.resource_version)))

    # ------------------------------------------------------------ ConfigMaps and Secrets
    async def get_configmap(self, namespace: str, name: str) -> Optional[KubeConfigMap]:
        """The ConfigMap, or None if it does not exist. Raises :class:`ApiError`,
        :class:`KubeConfigError` or ``aiohttp.ClientError`` (a one-shot read)."""
        obj = await self._get_object("configmaps", namespace, name)
        return KubeConfigMap(obj) if obj is not None else None

    async def get_secret(self, namespace: str, name: str) -> Optional[KubeSecret]:
        """The Secret (values decoded), or None; raises like :meth:`get_configmap`."""
        obj = await self._get_object("secrets", namespace, name)
        return KubeSecret(obj) if obj is not None else None

    async def _get_object(self, plural: str, namespace: str, name: str) -> Optional[dict]:
        client = self._ensure_client()
        try:
            return await client.get(f"/api/v1/namespaces/{namespace}/{plural}/{name}")
        except ApiError as exc:
            if exc.code == 404:
                return None
            raise

    async def watch_configmap(self, namespace: str, name: str,
                              callback: Callable[[Optional[KubeConfigMap]], Any]) -> None:
        """Call ``callback(configmap)`` now and on every change (``None`` while it does not
        exist), until cancelled. Errors are retried with backoff and shown in
        :meth:`status`; the callback is not called for them (the last value stays)."""
        await self._watch_one("configmaps", namespace, name, KubeConfigMap, callback)

    async def watch_secret(self, namespace: str, name: str,
                           callback: Callable[[Optional[KubeSecret]], Any]) -> None:
        """Like :meth:`watch_configmap` for a Secret; a ``kubernetes.io/tls`` secret gives
        ``cert_pem``/``key_pem`` (certificate rotation by cert-manager arrives as MODIFIED)."""
        await self._watch_one("secrets", namespace, name, KubeSecret, callback)

    async def _watch_one(self, plural: str, namespace: str, name: str, wrap, callback) -> None:
        client = await self._client()
        last: list = [object()]  # the resourceVersion last delivered (object() = none yet)

        async def changed() -> None:
            if not ref.synced:
                return
            obj = next(iter(ref.objects.values()), None)
            rv = (obj or {}).get("metadata", {}).get("resourceVersion") if obj else None
            if rv == last[0]:
                return
            last[0] = rv
            await _maybe_await(callback(wrap(obj) if obj is not None else None))

        ref = Reflector(client, f"/api/v1/namespaces/{namespace}/{plural}",
                        field_selector=f"metadata.name={name}", on_change=changed,
                        watch_timeout=self.watch_timeout, backoff=self._backoff())
        key = f"{plural}/{namespace}/{name}"
        self._side[key] = ref
        try:
            await ref.run()
        finally:
            self._side.pop(key, None)

    def _ref(self, ref: str) -> tuple[str, str]:
        ns, _, name = ref.rpartition("/")
        return ns or self._namespace(), name

    async def _run_config_map(self, ref: str) -> None:
        """Watch one ConfigMap of ``config_maps``; after each change hand every map's
        fragments (``ns/name/key`` -> text, keys ending in .toml/.json) to ``on_config``.
        A ConfigMap that does not exist contributes nothing."""
        ns, name = self._ref(ref)

        async def changed(cm: Optional[KubeConfigMap]) -> None:
            self._maps[f"{ns}/{name}"] = cm
            fragments = {}
            for key, m in sorted(self._maps.items()):
                for k, text in sorted((m.data if m is not None else {}).items()):
                    if k.lower().endswith((".toml", ".json")):
                        fragments[f"{key}/{k}"] = text
            if self.on_config is not None:
                await _maybe_await(self.on_config(fragments))

        await self.watch_configmap(ns, name, changed)

    async def _run_secret(self, ref: str) -> None:
        """Watch one Secret of ``[tls] kubernetes_secrets``: ``on_secret("ns/name", secret
        or None)`` after each change."""
        ns, name = self._ref(ref)

        async def changed(secret: Optional[KubeSecret]) -> None:
            if self.on_secret is not None:
                await _maybe_await(self.on_secret(f"{ns}/{name}", secret))

        await self.watch_secret(ns, name, changed)

    # ------------------------------------------------------------ status, close
    def status(self) -> dict:
        out = super().status()
        services = {}
        for key, st in self._states.items():
            ep = st.endpoints
            services[key] = {
                "mode": st.mode,
                "resource_version": ep.resource_version if ep else "",
                "lists": ep.lists if ep else 0, "watches": ep.watches if ep else 0,
                "endpoints": len(st.last or ()),
                "service_error": st.svc.health.last_error if st.svc else None}
        out["services"] = services
        if self._side:
            out["watches"] = {k: r.health.as_dict() for k, r in self._side.items()}
        if self.creds is not None:
            out["api_server"] = self.creds.server
        return out

    async def close(self) -> None:
        if self.client is not None:
            await self.client.close()
