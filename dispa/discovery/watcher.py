"""The discovery watcher: providers -> queue -> dedupe -> throttle -> merge -> publish.

Theory of operation
-------------------
The master owns one :class:`DiscoveryWatcher` (STYLE C7, step 2). It builds one provider
per kind in use (``registry.build_provider``) and runs each under a supervisor that restarts
it with exponential backoff if it ever raises or returns. Providers ``emit`` complete
``EndpointSet``s onto an ``asyncio.Queue``; the consumer

0. **coalesces**: a set queued behind a newer one of the same service is replaced by it
   (the queue holds at most one set per service, whatever the providers' rate);
1. **dedupes**: a set whose endpoints equal the last one of the same ``(provider,
   service)`` changes nothing (its revision is still recorded for status);
2. **throttles**: at most one publish per ``[service_discovery] throttle`` window; every
   change that arrives inside the window rides on the next publish;
3. **publishes** by calling the master's ``publish()`` coroutine, which calls
   :meth:`DiscoveryWatcher.merge` on the snapshot compiled from the file and applies the
   result to the workers and the health checker.

:meth:`merge` is pure: for each cluster with a discovery source it replaces the cluster's
endpoints by the discovered set (or appends them to the static ones with ``keep_static``).
A cluster whose provider has not answered yet keeps its static endpoints. An empty set is
an answer ("no instances"): the cluster becomes empty and requests get 503. A registry
*error* never produces a set (the provider records it in its health and does not emit), so
the last known good set stays in force; the provider's health turns ``stale``.

A config reload merges the current sets into the new snapshot with the new config's
bindings (:meth:`merge_for`, which changes nothing) and, only once the reload has succeeded,
calls :meth:`reconfigure` (providers whose settings or sources changed are restarted; the
sets they had stay in force until they answer again). A reload refused at any step leaves
the running providers, sources and sets as they were.

Configuration and certificates: with ``on_config`` set, a Consul provider runs for
``kv_prefix`` and a Kubernetes one for ``config_maps`` even without a cluster source, and
their complete fragment sets go to ``on_config(kind, {key: text})`` (the master merges
them, ``config/merge.py``); with ``on_secret`` and ``secrets``, the Kubernetes provider
watches those Secrets for the TLS store (:meth:`config_kinds`, :meth:`_hook`).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import Awaitable, Callable, Optional

import msgspec

from dispa.config.snapshot import ClusterSpec, EndpointSpec, Snapshot, make_snapshot
from dispa.discovery.config import (
    DiscoverySource, ServiceDiscoveryConfig, source_kind,
)
from dispa.discovery.provider import Backoff, DiscoveredEndpoint, EndpointSet, Instance, Provider
from dispa.discovery.registry import build_provider, sources_by_kind

__all__ = ["DiscoveryWatcher", "bindings_for", "endpoint_specs", "merge_cluster",
           "merge_snapshot", "provider_inputs"]

log = logging.getLogger("dispa.discovery")

Key = tuple[str, str]  # (provider name, service)

#: How long register/deregister (and closing the providers) may take before the master
#: moves on.
REGISTER_TIMEOUT_SECONDS = 5.0


def endpoint_specs(endpoints: tuple[DiscoveredEndpoint, ...], source: DiscoverySource,
                   ) -> tuple[EndpointSpec, ...]:
    """Discovered endpoints as snapshot endpoints: id ``host:port``, the registry's name
    (``meta["name"]``) or the id, weight at least 1; invalid entries and duplicates
    dropped; sorted by id so that the same set always compiles to the same snapshot."""
    out: dict[str, EndpointSpec] = {}
    for e in endpoints:
        host = (e.host or "").strip().strip("[]").lower().rstrip(".")
        if not host or not isinstance(e.port, int) or not 0 < e.port <= 65535:
            continue
        eid = f"[{host}]:{e.port}" if ":" in host else f"{host}:{e.port}"
        if eid in out:
            continue
        name = e.meta.get("name") if isinstance(e.meta, dict) else None
        weight = e.weight if isinstance(e.weight, int) and e.weight >= 1 else 1
        out[eid] = EndpointSpec(id=eid, name=str(name) if name else eid, host=host,
                                port=e.port, weight=min(weight, 1_000_000),
                                timeout_seconds=float(source.timeout))
    return tuple(out[k] for k in sorted(out))


def provider_inputs(settings: ServiceDiscoveryConfig, kind: str) -> tuple:
    """The part of ``[service_discovery]`` a provider of ``kind`` reads: a reload that
    changes only other keys (``throttle``, ``register``, another provider's table) does not
    restart it (a restart costs a re-list and, for Kubernetes, a full resync)."""
    common = (settings.refresh_interval, settings.health_check_integration)
    own = {"consul": (settings.consul_address, settings.consul),
           "etcd": (settings.etcd,),
           "kubernetes": (settings.kubernetes,),
           "dns": (settings.dns,)}
    return common + own.get(kind, (settings,))


def bindings_for(settings: ServiceDiscoveryConfig, sources: dict[str, DiscoverySource],
                 ) -> dict[str, tuple[Key, DiscoverySource]]:
    """``{cluster: ((provider kind, service), source)}`` of a config's sources."""
    return {cluster: ((source_kind(s, settings), s.service), s)
            for cluster, s in sources.items()}


def merge_cluster(cluster: ClusterSpec, bound: Optional[tuple[Key, DiscoverySource]],
                  sets: dict[Key, EndpointSet]) -> ClusterSpec:
    """One cluster of :func:`merge_snapshot`: ``cluster`` itself when nothing changes."""
    found = sets.get(bound[0]) if bound is not None else None
    if found is None:
        return cluster
    source = bound[1]
    discovered = endpoint_specs(found.endpoints, source)
    if source.keep_static:
        static_ids = {e.id for e in cluster.endpoints}
        endpoints = cluster.endpoints + tuple(e for e in discovered if e.id not in static_ids)
    else:
        endpoints = discovered
    if endpoints == cluster.endpoints:
        return cluster
    return msgspec.structs.replace(cluster, endpoints=endpoints)


def merge_snapshot(snapshot: Snapshot, bindings: dict[str, tuple[Key, DiscoverySource]],
                   sets: dict[Key, EndpointSet]) -> Snapshot:
    """``snapshot`` with the discovered endpoints in place (see the module docstring).

    ``bindings`` maps a cluster name to its ``(provider, service)`` key and source;
    ``sets`` holds the last set of each key. Returns ``snapshot`` itself when nothing
    changes."""
    clusters: list[ClusterSpec] = []
    changed = False
    for cluster in snapshot.clusters:
        merged = merge_cluster(cluster, bindings.get(cluster.name), sets)
        changed = changed or merged is not cluster
        clusters.append(merged)
    if not changed:
        return snapshot
    fields = {f: getattr(snapshot, f) for f in snapshot.__struct_fields__ if f != "version"}
    fields["clusters"] = tuple(clusters)
    return make_snapshot(**fields)


class DiscoveryWatcher:
    """Runs the providers and feeds their endpoint sets into snapshots (module docstring).

    ``publish`` is a coroutine function the watcher awaits (one call at a time) when the
    merged snapshot may have changed; ``factory(kind, settings, sources)`` builds a provider
    (``registry.build_provider``; tests pass their own).
    """

    def __init__(self, settings: Optional[ServiceDiscoveryConfig],
                 sources: dict[str, DiscoverySource],
                 publish: Callable[[], Awaitable[None]], *,
                 factory: Callable[..., Provider] = build_provider,
                 clock: Callable[[], float] = time.monotonic,
                 on_config: Optional[Callable[[str, dict], Awaitable[None]]] = None,
                 on_secret: Optional[Callable[[str, object], Awaitable[None]]] = None,
                 secrets: tuple[str, ...] = ()):
        self.publish = publish
        # Dynamic configuration (config/merge.py): ``on_config(kind, {key: text})`` gets a
        # provider's complete fragment set (Consul kv_prefix, Kubernetes config_maps);
        # ``on_secret("ns/name", secret)`` each change of a [tls] kubernetes_secrets Secret.
        self.on_config = on_config
        self.on_secret = on_secret
        self.secrets: tuple[str, ...] = tuple(secrets)
        self.factory = factory
        self.clock = clock
        self.settings = settings or ServiceDiscoveryConfig()
        self.sources: dict[str, DiscoverySource] = {}
        self.bindings: dict[str, tuple[Key, DiscoverySource]] = {}
        self.providers: dict[str, Provider] = {}
        # kind -> (the settings it reads, its sources) as it was built with
        self._inputs: dict[str, tuple] = {}
        self._tasks: dict[str, asyncio.Task] = {}
        self.sets: dict[Key, EndpointSet] = {}
        self.revisions: dict[Key, str] = {}
        self.updated_at: dict[Key, float] = {}  # wall clock of the last change
        self.updates: dict[str, int] = {}  # accepted (changed) sets per provider
        self.duplicates = 0
        self.publishes = 0
        # The queue carries keys; ``_inbox`` the newest set of each queued key. A provider
        # that emits faster than the watcher publishes (a busy Kubernetes namespace while
        # a worker is slow to ACK) replaces its queued set instead of piling up full sets:
        # at most one set per service waits, whatever the rate.
        self.queue: asyncio.Queue[Key] = asyncio.Queue()
        self._inbox: dict[Key, EndpointSet] = {}
        self.coalesced = 0  # sets replaced in the inbox by a newer one before being read
        self._consumer: Optional[asyncio.Task] = None
        self._dirty = False
        self._last_publish = -math.inf
        self._first = asyncio.Event()
        self._started_at = time.time()
        self._register_task: Optional[asyncio.Task] = None
        self._registered: Optional[tuple[Provider, Instance]] = None
        self._registration_wanted: Optional[tuple[Instance, str]] = None  # as configured
        self._own_inputs: tuple = ()  # provider_inputs of _own_register_provider
        self._own_register_provider: Optional[Provider] = None
        self._deferred_close: list[Provider] = []
        # closes of stopped providers in flight: referenced so that they are not collected
        # half-way (the loop keeps only weak references to tasks) and awaited at stop()
        self._closing: set[asyncio.Task] = set()
        self._set_sources(sources)

    # ------------------------------------------------------------------ configuration
    def _set_sources(self, sources: dict[str, DiscoverySource]) -> None:
        self.sources = dict(sources)
        self.bindings = bindings_for(self.settings, self.sources)

    @property
    def wanted(self) -> set[Key]:
        """The ``(provider, service)`` keys some cluster consumes."""
        return {key for key, _ in self.bindings.values()}

    @property
    def throttle(self) -> float:
        return float(self.settings.throttle)

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Build and start the providers and the consumer."""
        self._sync_providers()
        if self._consumer is None:
            self._consumer = asyncio.ensure_future(self._consume())

    async def wait_initial(self, timeout: float) -> bool:
        """Wait until every consumed service has a set, or ``timeout``; True if all have.
        The master calls it before starting workers so that they start with the registry's
        endpoints rather than the static ones."""
        deadline = self.clock() + timeout
        while not self.wanted <= set(self.sets):
            left = deadline - self.clock()
            if left <= 0:
                return False
            self._first.clear()
            try:
                await asyncio.wait_for(self._first.wait(), min(left, 0.5))
            except asyncio.TimeoutError:
                pass
        return True

    async def reconfigure(self, settings: Optional[ServiceDiscoveryConfig],
                          sources: dict[str, DiscoverySource],
                          secrets: Optional[tuple[str, ...]] = None) -> None:
        """Adopt a reloaded configuration: restart only the providers whose settings or
        sources changed; sets of services no longer consumed are forgotten."""
        self.settings = settings or ServiceDiscoveryConfig()
        if secrets is not None:
            self.secrets = tuple(secrets)
        self._set_sources(sources)
        wanted = self.wanted
        for key in [k for k in self.sets if k not in wanted]:
            self.sets.pop(key, None)
            self.revisions.pop(key, None)
            self.updated_at.pop(key, None)
        self._sync_providers()

    def config_kinds(self) -> set[str]:
        """The kinds that run for dynamic configuration or certificates even without a
        cluster source: Consul with ``kv_prefix``, Kubernetes with ``config_maps`` or
        ``[tls] kubernetes_secrets``."""
        kinds = set()
        if self.on_config is not None and self.settings.consul.kv_prefix:
            kinds.add("consul")
        if (self.on_config is not None and self.settings.kubernetes.config_maps) or \
                (self.on_secret is not None and self.secrets):
            kinds.add("kubernetes")
        return kinds

    def _extra_inputs(self, kind: str) -> tuple:
        return (self.secrets,) if kind == "kubernetes" else ()

    def _hook(self, kind: str, provider: Provider) -> None:
        """Connect a provider's configuration and certificate callbacks to ours."""
        on_config, on_secret = self.on_config, self.on_secret
        if on_config is not None and hasattr(provider, "on_kv"):  # Consul KV
            provider.on_kv = lambda kv, kind=kind: on_config(kind, kv)
        if hasattr(provider, "on_secret"):  # Kubernetes
            if on_config is not None:
                provider.on_config = lambda fragments, kind=kind: on_config(kind, fragments)
            if on_secret is not None:
                provider.secrets = list(self.secrets)
                provider.on_secret = on_secret

    def _sync_providers(self) -> None:
        by_kind = sources_by_kind(self.settings, self.sources)
        for kind in self.config_kinds():
            by_kind.setdefault(kind, [])
        for kind in list(self.providers):
            inputs = (provider_inputs(self.settings, kind), tuple(by_kind.get(kind, ())),
                      self._extra_inputs(kind))
            if kind not in by_kind or self._inputs.get(kind) != inputs:
                self._stop_provider(kind)
        for kind, sources in by_kind.items():
            if kind in self.providers:
                continue
            try:
                provider = self.factory(kind, self.settings, list(sources))
            except Exception as exc:  # an import error, a bad option the checks missed
                log.error("discovery provider %s cannot start: %s", kind, exc)
                continue
            self._hook(kind, provider)
            self.providers[kind] = provider
            self._inputs[kind] = (provider_inputs(self.settings, kind), tuple(sources),
                                  self._extra_inputs(kind))
            self.updates.setdefault(kind, 0)
            self._tasks[kind] = asyncio.ensure_future(self._supervise(provider))

    def _stop_provider(self, kind: str) -> None:
        task = self._tasks.pop(kind, None)
        if task is not None:
            task.cancel()
        provider = self.providers.pop(kind, None)
        self._inputs.pop(kind, None)
        if provider is None:
            return
        if self._registered is not None and self._registered[0] is provider:
            # it keeps the registration alive (TTL check, lease): close it at stop()
            self._deferred_close.append(provider)
        else:
            task = asyncio.ensure_future(_quiet_close(provider))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def stop(self) -> None:
        """Stop the consumer and every provider (self-registration: see ``deregister``)."""
        tasks = list(self._tasks.values())
        if self._register_task is not None:
            self._register_task.cancel()
            tasks.append(self._register_task)
            self._register_task = None
        if self._consumer is not None:
            tasks.append(self._consumer)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()
        self._consumer = None
        providers = list(self.providers.values()) + self._deferred_close
        if self._own_register_provider is not None:
            providers.append(self._own_register_provider)
        self._deferred_close = []
        self.providers.clear()
        self._inputs.clear()
        closing = [_quiet_close(p) for p in providers] + list(self._closing)
        try:  # a registry that hangs must not hold up the shutdown
            await asyncio.wait_for(asyncio.gather(*closing, return_exceptions=True),
                                   REGISTER_TIMEOUT_SECONDS)
        except asyncio.TimeoutError:
            log.warning("discovery: providers did not close within %.0fs",
                        REGISTER_TIMEOUT_SECONDS)

    async def _supervise(self, provider: Provider) -> None:
        """Run ``provider`` forever: a crash or an unexpected return is a registry error
        (health ``stale``, last known good kept), retried with exponential backoff."""
        backoff = Backoff()
        while True:
            try:
                await provider.run(self.emit)
                problem = "provider stopped"
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                problem = f"{type(exc).__name__}: {exc}"
            provider.health.failed(problem)
            provider.health.reconnects += 1
            log.warning("discovery provider %s failed (%s); restarting", provider.name,
                        problem)
            await backoff.sleep()
            if provider.health.state == "ok":
                backoff.reset()

    # ------------------------------------------------------------------ the pipeline
    def emit(self, update: EndpointSet) -> None:
        """What providers call: queue one set (never blocks, never raises; a newer set of
        the same service replaces one still queued)."""
        try:
            key = (update.provider, update.service)
        except AttributeError:  # not an EndpointSet: let the consumer log and drop it
            key = ("", repr(update))
        if key in self._inbox:
            self.coalesced += 1
        else:
            self.queue.put_nowait(key)
        self._inbox[key] = update

    def _take(self, key: Key):
        return self._inbox.pop(key, None)

    def offer(self, update: EndpointSet) -> bool:
        """Dedupe step: record ``update``; True when it changes the endpoints in force."""
        key = (update.provider, update.service)
        if key not in self.wanted:
            return False
        self.revisions[key] = update.revision
        previous = self.sets.get(key)
        # order-insensitive: registries list instances in no stable order
        endpoints = tuple(sorted(update.endpoints,
                                 key=lambda e: (e.host, e.port, e.weight, repr(e.meta))))
        if previous is not None and previous.endpoints == endpoints:
            self.duplicates += 1
            return False
        self.sets[key] = msgspec.structs.replace(update, endpoints=endpoints)
        self.updated_at[key] = time.time()
        self.updates[update.provider] = self.updates.get(update.provider, 0) + 1
        self._dirty = True
        self._first.set()
        return True

    def _drain(self) -> None:
        while True:
            try:
                key = self.queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            self._offer_safely(self._take(key))

    def _offer_safely(self, update) -> None:
        try:
            self.offer(update)
        except Exception as exc:  # a malformed update from a provider must not stop us
            log.error("discovery: ignoring a malformed update %r: %s", update, exc)

    async def _consume(self) -> None:
        while True:
            self._offer_safely(self._take(await self.queue.get()))
            self._drain()
            if not self._dirty:
                continue
            wait = self._last_publish + self.throttle - self.clock()
            if wait > 0:
                await asyncio.sleep(wait)
                self._drain()
            await self.flush()

    async def flush(self) -> None:
        """Publish now if something changed since the last publish."""
        if not self._dirty:
            return
        self._dirty = False
        self._last_publish = self.clock()
        self.publishes += 1
        try:
            await self.publish()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("discovery: publishing the discovered endpoints failed")

    def merge(self, snapshot: Snapshot) -> Snapshot:
        """``snapshot`` (compiled from the file) with the current discovered sets."""
        return merge_snapshot(snapshot, self.bindings, self.sets)

    def merge_for(self, settings: Optional[ServiceDiscoveryConfig],
                  sources: dict[str, DiscoverySource], snapshot: Snapshot) -> Snapshot:
        """``snapshot`` of a config *not yet in force* (a reload) with the current sets,
        bound by that config's ``sources``. Changes nothing here: the master calls
        :meth:`reconfigure` only once the reload has succeeded, so that a reload refused
        late (a listener that cannot be bound, new workers that fail) leaves the running
        providers and sets alone."""
        return merge_snapshot(snapshot, bindings_for(settings or ServiceDiscoveryConfig(),
                                                     sources), self.sets)

    # ------------------------------------------------------------------ self-registration
    def start_registration(self, instance: Instance, kind: str) -> None:
        """Register ``instance`` with the ``kind`` provider in the background, retrying
        with backoff until it succeeds."""
        self._registration_wanted = (instance, kind)
        self._register_task = asyncio.ensure_future(self._register(instance, kind))

    async def set_registration(self, instance: Optional[Instance], kind: str = "") -> None:
        """Adopt a reloaded ``[service_discovery.register]`` (``instance`` None: the table
        is gone). Unchanged: nothing happens (the registration and its TTL check or lease
        carry on). Changed: the current registration is withdrawn, then the new one starts
        in the background."""
        wanted = None if instance is None else (instance, kind)
        unchanged = wanted == self._registration_wanted and (
            self._own_register_provider is None
            or self._own_inputs == provider_inputs(self.settings, kind))
        if unchanged:
            return
        await self.deregister()
        self._registration_wanted = None
        # providers kept only for the old registration (built for it, or stopped by a
        # reconfigure while they held it) have nothing left to do
        idle = self._deferred_close + ([self._own_register_provider]
                                       if self._own_register_provider is not None else [])
        self._deferred_close, self._own_register_provider = [], None
        if idle:
            try:
                await asyncio.wait_for(asyncio.gather(*(_quiet_close(p) for p in idle)),
                                       REGISTER_TIMEOUT_SECONDS)
            except asyncio.TimeoutError:
                log.warning("discovery: a registration provider did not close in time")
        if wanted is not None:
            self.start_registration(instance, kind)

    async def _register(self, instance: Instance, kind: str) -> None:
        provider = self.providers.get(kind)
        if provider is None:
            try:
                provider = self._own_register_provider = self.factory(kind, self.settings, [])
                self._own_inputs = provider_inputs(self.settings, kind)
            except Exception as exc:  # nothing awaits this task: say it, do not raise
                log.error("self-registration with %s cannot start: %s: %s", kind,
                          type(exc).__name__, exc)
                return
        backoff = Backoff()
        while True:
            try:
                await asyncio.wait_for(provider.register(instance), REGISTER_TIMEOUT_SECONDS)
            except asyncio.CancelledError:
                raise
            except NotImplementedError as exc:
                log.error("self-registration: %s", exc)
                return
            except Exception as exc:
                log.warning("self-registration with %s failed (%s: %s); retrying", kind,
                            type(exc).__name__, exc)
                await backoff.sleep()
                continue
            self._registered = (provider, instance)
            log.info("registered", extra={"fields": {"provider": kind,
                                                     "service": instance.service,
                                                     "id": instance.id}})
            return

    async def deregister(self) -> None:
        """Withdraw the registration (graceful shutdown, before the workers drain)."""
        if self._register_task is not None:
            self._register_task.cancel()
            await asyncio.gather(self._register_task, return_exceptions=True)
            self._register_task = None
        if self._registered is None:
            return
        provider, instance = self._registered
        self._registered = None
        try:
            await asyncio.wait_for(provider.deregister(), REGISTER_TIMEOUT_SECONDS)
            log.info("deregistered", extra={"fields": {"provider": provider.name,
                                                       "id": instance.id}})
        except Exception as exc:
            log.warning("deregistration from %s failed: %s: %s", provider.name,
                        type(exc).__name__, exc)

    # ------------------------------------------------------------------ observability
    def staleness(self, provider: Provider) -> float:
        """Seconds the provider's data has gone unconfirmed (0 while healthy; since the
        watcher started when it never answered)."""
        s = provider.health.staleness_seconds()
        return max(0.0, time.time() - self._started_at) if math.isinf(s) else s

    def status(self, in_force: Optional[Snapshot] = None,
               file_snapshot: Optional[Snapshot] = None) -> dict:
        """For /admin/status ``discovery``.

        Per cluster, ``endpoints`` counts the endpoints of the snapshot *in force*
        (``in_force``: the one the master published; a worker runs it once its
        ``snapshot_version`` equals the status's ``snapshot_version``), ``discovered`` the
        watcher's latest set, and ``pending`` says that the latest set is not in the
        published snapshot yet (it rides on the next, throttled, publish). Without
        ``in_force`` (tests), ``endpoints`` is None and ``pending`` is judged as unknown
        (True when a set exists)."""
        providers = {}
        for kind, p in self.providers.items():
            try:
                st = dict(p.status())
            except Exception as exc:  # a provider's status must not break the page
                st = {"kind": kind, "status_error": str(exc)}
            st["updates"] = self.updates.get(kind, 0)
            st["staleness_seconds"] = round(self.staleness(p), 3)
            providers[kind] = st
        published = {c.name: c for c in in_force.clusters} if in_force is not None else {}
        from_file = ({c.name: c for c in file_snapshot.clusters}
                     if file_snapshot is not None else {})
        clusters = {}
        for cluster, (key, source) in sorted(self.bindings.items()):
            found = self.sets.get(key)
            current = published.get(cluster)
            base = from_file.get(cluster)
            if found is None:
                pending = False
            elif current is None or base is None:
                pending = True
            else:  # what the next publish would send differs from what was sent
                expected = merge_cluster(base, (key, source), self.sets)
                pending = expected.endpoints != current.endpoints
            clusters[cluster] = {
                "provider": key[0], "service": key[1],
                "state": "waiting" if found is None else "discovered",
                "revision": self.revisions.get(key),
                "endpoints": None if current is None else len(current.endpoints),
                "discovered": None if found is None else len(found.endpoints),
                "pending": pending,
                "keep_static": source.keep_static,
                "updated_at": self.updated_at.get(key),
                "provider_state": (self.providers[key[0]].health.state
                                   if key[0] in self.providers else "absent"),
            }
        registered = None
        if self._registered is not None:
            registered = {"provider": self._registered[0].name,
                          **msgspec.to_builtins(self._registered[1])}
        return {"providers": providers, "clusters": clusters, "publishes": self.publishes,
                "duplicates_dropped": self.duplicates, "coalesced": self.coalesced,
                "registered": registered}

    def gauges(self, snapshot: Snapshot) -> list[tuple]:
        """Metrics in the master's ``(name, help, labels, value)`` form."""
        out: list[tuple] = []
        for kind, p in self.providers.items():
            labels = {"provider": kind}
            out.append(("dispa_discovery_staleness_seconds",
                        "Seconds since the provider's registry last answered (0: healthy)",
                        labels, self.staleness(p)))
            out.append(("dispa_discovery_updates_total",
                        "Endpoint sets that changed a service's endpoints", labels,
                        float(self.updates.get(kind, 0))))
            out.append(("dispa_discovery_errors_total",
                        "Registry errors seen by the provider", labels,
                        float(p.health.errors)))
        sizes = {c.name: len(c.endpoints) for c in snapshot.clusters}
        for cluster in sorted(self.bindings):
            out.append(("dispa_discovery_endpoints",
                        "Endpoints of a discovery-backed cluster in the snapshot in force",
                        {"cluster": cluster}, float(sizes.get(cluster, 0))))
        return out


async def _quiet_close(provider: Provider) -> None:
    try:
        await provider.close()
    except Exception as exc:
        log.debug("closing provider %s: %s", provider.name, exc)
