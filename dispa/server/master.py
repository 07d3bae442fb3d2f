"""The master: Dispa's control plane. It never touches client traffic.

It loads and validates the configuration, compiles it into a Snapshot, starts and supervises
the workers, pushes snapshots and health changes to them, runs the active health checks,
and serves the admin endpoints (/health, /metrics, /metrics/json, /admin/status,
/admin/config) on the monitoring ports.

Signals (one table, see ``SIGNALS``): SIGHUP reloads; SIGTERM and SIGINT start a graceful
shutdown (workers stop accepting and finish in-flight requests up to
``shutdown_timeout``); a second SIGTERM/SIGINT exits at once. A change of the config file's
content also reloads. An invalid config at reload is refused: the running one keeps serving
and the errors show in the log and in /admin/status.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import os
import signal
import time

import dispa
from dispa import _native
from dispa.admin.api import AdminServer
from dispa.balancer.health import HealthChecker
from dispa.config import LoadedConfig, load_config
from dispa.config.merge import DynamicConfig
from dispa.discovery.registry import cluster_sources, self_instance
from dispa.discovery.watcher import DiscoveryWatcher
from dispa.errors import ConfigError, StartupError
from dispa.observability import logs
from dispa.observability.metrics import MetricsAggregator
from dispa.observability.rotation import LogRotator
from dispa.server import messages as m
from dispa.server.listeners import probe_listeners
from dispa.server.supervisor import SPAWN_MODE, Supervisor
from dispa.tls.acme.service import AcmeService
from dispa.tls.store import CertStore, with_tls

log = logging.getLogger("dispa.master")

CONFIG_POLL_SECONDS = 1.0
# At start, how long to wait for the registries' first answers before starting workers
# with the static endpoints (docs/discovery.md).
INITIAL_DISCOVERY_SECONDS = 5.0

# Exit codes
EXIT_OK = 0
EXIT_ERROR = 1
EXIT_CONFIG = 2
EXIT_CRASH_LOOP = 3


def _preload_for_fork(snapshot) -> None:
    """Forked workers share the master's pages: import the heavy optional modules the
    snapshot turns on (tracing's SDK and exporter) here, once, before forking."""
    if SPAWN_MODE == "fork":
        from dispa.observability.tracing import preload
        preload(snapshot)


def usable_cpus() -> int:
    """The CPUs this process may run on (affinity-aware), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


class Master:
    """Control-plane main loop (see the module docstring)."""

    def __init__(self, config_path: str | None, *, workers: int | None = None,
                 log_level: str | None = None, loaded: LoadedConfig | None = None,
                 slowdown_us: int = 0, extra_status: dict | None = None):
        self.config_path = config_path
        self.workers_override = workers
        self.log_level_override = log_level
        self.loaded = loaded
        self.slowdown_us = slowdown_us
        self.extra_status = extra_status or {}
        self.config_errors: list[dict] = []
        self.reloads_ok = 0
        self.reloads_failed = 0
        self.last_reload: dict | None = None
        self.worker_resilience: dict = {}
        self.worker_log_levels: dict = {}  # worker key -> level it reported
        self.log_rotator = LogRotator(self.reopen_logs)  # access/traffic log files
        self.started_at = time.time()
        self.metrics = MetricsAggregator()
        self.health = HealthChecker(self._on_health_change)
        self.supervisor = Supervisor(self._make_init, self._on_passive, self._on_worker_exit,
                                     self._give_up, self._on_worker_ready)
        self.admin: AdminServer | None = None
        self.exit_code = EXIT_OK
        self._stop: asyncio.Future | None = None
        self._signals_seen = 0
        self._config_fingerprint: tuple | None = None
        self._reload_lock = asyncio.Lock()
        self.acme = AcmeService(self)  # [tls.acme]: issuance, renewal, challenges
        self.tls_store = CertStore()  # [tls]: certificates for Snapshot.tls (docs/tls.md)
        self._tls_committed: tuple | None = None
        # Service discovery: the snapshot compiled from the file, and the watcher that
        # merges discovered endpoints into it (self.loaded.snapshot is the merged one).
        self.discovery: DiscoveryWatcher | None = None
        self.file_snapshot = None
        # Dynamic configuration (docs/discovery.md): fragments from Consul KV / ConfigMaps
        # merged into the file's config; base_loaded is the file's own LoadedConfig.
        self.dynamic = DynamicConfig()
        self.base_loaded: LoadedConfig | None = None
        self._base_in_force: LoadedConfig | None = None  # restored by a refused reload
        self._dynamic_pending: dict[str, dict] = {}
        self._dynamic_tasks: set[asyncio.Task] = set()

    # ------------------------------------------------------------------ helpers
    def worker_count(self) -> int:
        n = self.workers_override if self.workers_override is not None else self.loaded.static.workers
        return n if n and n > 0 else usable_cpus()

    def _make_init(self, slot: int, generation: int) -> m.Init:
        lc = self.loaded
        return m.Init(worker_id=slot, generation=generation, static=lc.static,
                      snapshot=lc.snapshot, health=self.health.health_map(),
                      log_format=lc.log_format, log_level=logs.get_level(),
                      slowdown_us=self.slowdown_us)

    def _on_health_change(self, changes: dict[str, bool]) -> None:
        self.supervisor.broadcast(m.HealthUpdate(states=changes))

    def _on_passive(self, events) -> None:
        for cluster, endpoint_id, event in events:
            if event == "connect_failed":
                self.health.passive_failure(f"{cluster}/{endpoint_id}")

    def _on_worker_ready(self, h) -> None:
        snapshot = self.loaded.snapshot
        if h.version != snapshot.version:
            h.channel.send(m.ApplySnapshot(snapshot=snapshot))
        h.channel.send(m.HealthUpdate(states=self.health.health_map()))

    def _on_worker_exit(self, h) -> None:
        self.metrics.retire(h.key)

    def _give_up(self, reason: str) -> None:
        log.error(reason)
        self.exit_code = EXIT_CRASH_LOOP
        self._request_stop(graceful=True)

    def _fingerprint(self) -> tuple | None:
        if not self.config_path:
            return None
        try:
            with open(self.config_path, "rb") as f:
                return (hashlib.sha256(f.read()).hexdigest(),)
        except OSError:
            return None

    # ------------------------------------------------------------------ run
    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        self._stop = loop.create_future()
        if self.loaded is None:
            self.loaded = load_config(self.config_path)
        self.base_loaded = self._base_in_force = self.loaded
        self.loaded = self._with_tls(self.loaded)
        self._config_fingerprint = self._fingerprint()
        probe_listeners(self.loaded.static.listeners)
        self.admin = AdminServer(AdminView(self))
        if self.loaded.static.admin_listeners:
            await self.admin.start([(l.host, l.port) for l in self.loaded.static.admin_listeners])
        self.loaded = await self._discover_into(self.loaded)
        if self.discovery is not None and self.discovery.sources:
            await self.discovery.wait_initial(INITIAL_DISCOVERY_SECONDS)
            self.loaded = dataclasses.replace(
                self.loaded, snapshot=self.discovery.merge(self.file_snapshot))
        await self._wait_secrets(INITIAL_DISCOVERY_SECONDS)
        self.health.configure(self.loaded.snapshot.clusters)
        for sig, action in SIGNALS.items():
            loop.add_signal_handler(sig, getattr(self, action))
        _preload_for_fork(self.loaded.snapshot)
        try:
            await self.supervisor.start_generation(self.worker_count())
        except RuntimeError as exc:
            raise StartupError(str(exc)) from None
        log.info("dispa started", extra={"fields": {
            "workers": self.worker_count(), "version": self.loaded.snapshot.version,
            "listeners": [f"{l.host}:{l.port}" for l in self.loaded.static.listeners]}})
        self._register_self()
        self.acme.reconfigure(self.loaded)
        self.log_rotator.configure(self.loaded.snapshot.observability)
        watcher = asyncio.ensure_future(self._watch_config())
        tls_watcher = asyncio.ensure_future(self._watch_tls())
        try:
            graceful = await self._stop
        finally:
            watcher.cancel()
            tls_watcher.cancel()
        if self.discovery is not None:
            # withdraw from the registry before the workers drain, so that clients stop
            # being sent here while we still serve them
            if graceful:
                await self.discovery.deregister()
            await self.discovery.stop()
        await self.acme.close()
        self.health.close()
        if graceful:
            await self.supervisor.stop(self.loaded.static.shutdown_timeout_seconds)
        else:
            self.supervisor.kill_all()
        await self.log_rotator.close()
        if self.admin is not None:
            await self.admin.close()
        log.info("dispa stopped", extra={"fields": {"exit_code": self.exit_code}})
        return self.exit_code

    # ------------------------------------------------------------------ signals
    def on_reload_signal(self) -> None:
        asyncio.ensure_future(self.reload("SIGHUP"))

    def on_stop_signal(self) -> None:
        self._signals_seen += 1
        if self._signals_seen == 1:
            log.info("graceful shutdown requested")
            self._request_stop(graceful=True)
        else:
            log.warning("second stop signal: exiting now")
            self.supervisor.kill_all()
            os._exit(EXIT_ERROR)

    def on_reopen_signal(self) -> None:
        # logrotate's postrotate: the workers flush and reopen the access/traffic log files
        # (Dispa's own log goes to stderr: nothing to reopen there)
        self.reopen_logs()
        log.info("SIGUSR1: log files reopened")

    def reopen_logs(self) -> None:
        self.supervisor.broadcast(m.ReopenLogs())

    def _request_stop(self, *, graceful: bool) -> None:
        if self._stop is not None and not self._stop.done():
            self._stop.set_result(graceful)

    # ------------------------------------------------------------------ reload
    async def _watch_config(self) -> None:
        while True:
            await asyncio.sleep(CONFIG_POLL_SECONDS)
            fp = self._fingerprint()
            if fp is not None and fp != self._config_fingerprint:
                self._config_fingerprint = fp
                await self.reload("config file changed")

    async def reload(self, reason: str, *, dynamic: str | None = None) -> bool:
        """Load, validate and apply the config file; keep the running config on any error.
        ``dynamic``: a provider whose configuration fragments changed instead; the file is
        not re-read, its last good version is merged with the fragments (config/merge.py)."""
        if not self.config_path and dynamic is None:
            log.info("reload requested (%s) but no config file is in use", reason)
            return False
        async with self._reload_lock:
            if self.supervisor.stopping:
                log.info("reload (%s) ignored: shutting down", reason)
                return False
            old_base = self.base_loaded
            if dynamic is not None:
                texts = self._dynamic_pending.pop(dynamic, None)
                if texts is None or dynamic not in self._dynamic_kinds(self.loaded):
                    return False
                new = self.dynamic.offer(dynamic, texts, self.base_loaded)
                if new is None:  # unchanged, or refused (the errors are in the status)
                    return False
            else:
                self._config_fingerprint = self._fingerprint()
                try:
                    new = load_config(self.config_path)
                except ConfigError as exc:
                    self._reload_failed(reason, [e.as_dict() for e in exc.errors])
                    for e in exc.errors:
                        log.error("config reload refused: %s", e.format())
                    return False
                self.base_loaded, new = new, self._with_dynamic(new)
            try:
                new = self._with_tls(new)
            except StartupError as exc:
                self._reload_failed(reason, [{"message": str(exc)}])
                log.error("config reload refused: %s", exc)
                return False
            old, old_file_snapshot = self.loaded, self.file_snapshot
            # discovery: merged with the current sets; the watcher is reconfigured only
            # once this reload has succeeded (a refused reload keeps the running sources)
            new_file_snapshot, new = new.snapshot, self._with_discovered(new)
            static_changed = (new.static.listeners != old.static.listeners
                              or new.static.workers != old.static.workers)
            if static_changed:
                try:
                    probe_listeners([l for l in new.static.listeners
                                     if l not in old.static.listeners])
                except StartupError as exc:
                    self._reload_failed(reason, [{"message": str(exc)}])
                    log.error("config reload refused: %s", exc)
                    return False
            new = dataclasses.replace(new, snapshot=self.acme.snapshot_for(new.snapshot))
            self.loaded, self.file_snapshot = new, new_file_snapshot
            self._base_in_force = self.base_loaded
            if new.log_level != old.log_level and self.log_level_override is None:
                self.set_log_level(new.log_level)
            self.health.configure(new.snapshot.clusters)
            if static_changed:
                _preload_for_fork(new.snapshot)
                try:
                    previous = await self.supervisor.start_generation(self.worker_count())
                except RuntimeError as exc:
                    self.loaded, self.file_snapshot = old, old_file_snapshot
                    self._base_in_force = old_base
                    self.health.configure(old.snapshot.clusters)
                    self._reload_failed(reason, [{"message": f"new workers failed: {exc}"}])
                    log.error("config reload refused: new workers failed: %s", exc)
                    return False
                self.supervisor.drain(previous, new.static.shutdown_timeout_seconds)
                errors = []
            else:
                errors = await self.supervisor.apply(new.snapshot)
            await self._commit_discovery(new)
            if self.discovery is not None:  # a changed [service_discovery.register]
                await self.discovery.set_registration(*self._registration(new))
            if errors:
                log.error("snapshot %s not applied everywhere: %s", new.snapshot.version, errors)
            self.config_errors = [{"message": e} for e in errors]
            self.acme.reconfigure(new)
            self.log_rotator.configure(new.snapshot.observability)
            self.reloads_ok += 1
            self.last_reload = {"at": time.time(), "reason": reason, "ok": not errors,
                                "version": new.snapshot.version,
                                "rolling_restart": static_changed}
            log.info("config reloaded", extra={"fields": {
                "reason": reason, "version": new.snapshot.version,
                "rolling_restart": static_changed}})
            return True

    # ------------------------------------------------------------------ TLS certificates
    def _with_tls(self, loaded: LoadedConfig) -> LoadedConfig:
        """``loaded`` with its certificates read and validated into ``Snapshot.tls``
        (docs/tls.md); StartupError when TLS is on and no certificate is usable."""
        store = self.tls_store
        previous = (store.config, store.compiled)
        store.configure(loaded.model.tls, loaded.snapshot.tls)
        store.refresh(force=True)
        store.rotate_ticket_keys()
        if store.enabled and not store.certificates() and not loaded.model.tls.acme.enabled \
                and not loaded.model.tls.kubernetes_secrets:
            store.configure(*previous)
            errors = "; ".join(e["error"] for e in store.errors()) or "none configured"
            raise StartupError(f"TLS is enabled but no certificate is usable: {errors}")
        self._tls_committed = (store.config, store.compiled)
        self.health.tls = loaded.snapshot.tls  # https:// endpoints are probed with TLS
        # target groups of [[l4.listeners]] get TCP connect checks (docs/l4.md)
        self.health.tcp_clusters = frozenset(
            lst["target_group"] for lst in ((loaded.snapshot.l4 or {}).get("listeners") or []))
        # upstream HTTP/2 target groups speak gRPC: grpc.health.v1 checks (docs/grpc.md)
        self.health.grpc_clusters = frozenset(
            c.name for c in loaded.snapshot.clusters if c.protocol in ("h2", "h2c"))
        return dataclasses.replace(loaded, snapshot=with_tls(loaded.snapshot, store.payload()))

    async def _watch_tls(self) -> None:
        """Poll certificate files and rotate ticket keys; publish what changed."""
        while True:
            cfg = self.tls_store.config
            await asyncio.sleep(cfg.reload_interval if cfg is not None else 2.0)
            if self.tls_store.enabled:
                await self.reload_certificates()

    async def reload_certificates(self) -> bool:
        """Look at the certificate files now (ACME calls this after writing a pair);
        publish a snapshot when something changed. True when one was published."""
        store = self.tls_store
        changed = store.refresh()
        changed = store.rotate_ticket_keys() or changed
        changed = await store.refresh_ocsp() or changed
        if not changed:
            return False
        return await self.publish_tls()

    async def tls_rollback(self, cert_file: str) -> dict:
        """``POST /admin/tls/rollback``: the previous version of ``cert_file`` serves
        again until its files change; raises LookupError / ValueError (404 / 409)."""
        if not self.tls_store.enabled:
            raise LookupError("TLS is not enabled")
        result = self.tls_store.rollback(cert_file)
        result["applied"] = await self.publish_tls()
        return result

    async def publish_tls(self) -> bool:
        """Send the store's current ``Snapshot.tls`` to every worker."""
        async with self._reload_lock:
            if self.supervisor.stopping:
                return False
            payload = self.tls_store.payload()
            if self.file_snapshot is not None:
                self.file_snapshot = with_tls(self.file_snapshot, payload)
            snapshot = with_tls(self.loaded.snapshot, payload)
            if snapshot.version == self.loaded.snapshot.version:
                return False
            self.loaded = dataclasses.replace(self.loaded, snapshot=snapshot)
            errors = await self.supervisor.apply(snapshot)
        if errors:
            log.error("certificate snapshot %s not applied everywhere: %s",
                      snapshot.version, errors)
        else:
            log.info("certificates applied", extra={"fields": {"version": snapshot.version}})
        return not errors

    # ------------------------------------------------------------------ discovery
    async def _discover_into(self, loaded: LoadedConfig) -> LoadedConfig:
        """Start or reconfigure the discovery watcher for ``loaded``; return it with the
        current discovered endpoints merged into its snapshot."""
        self.file_snapshot = loaded.snapshot
        await self._commit_discovery(loaded)
        if self.discovery is None:
            return loaded
        return dataclasses.replace(loaded, snapshot=self.discovery.merge(loaded.snapshot))

    def _with_discovered(self, loaded: LoadedConfig) -> LoadedConfig:
        """``loaded`` (a reload, not yet in force) with the current discovered sets merged
        in, bound by its own sources; the watcher is left as it is."""
        if self.discovery is None:
            return loaded
        return dataclasses.replace(loaded, snapshot=self.discovery.merge_for(
            loaded.model.service_discovery, cluster_sources(loaded.model), loaded.snapshot))

    async def _commit_discovery(self, loaded: LoadedConfig) -> None:
        """Start or reconfigure the discovery watcher for ``loaded``, now in force."""
        settings = loaded.model.service_discovery
        sources = cluster_sources(loaded.model)
        secrets = self._secret_refs(loaded)
        if self.discovery is None:
            if not sources and (settings is None or settings.register is None) \
                    and not self._dynamic_kinds(loaded) and not secrets:
                return
            self.discovery = DiscoveryWatcher(settings, sources, self._publish_discovered,
                                              on_config=self._on_dynamic_config,
                                              on_secret=self._on_secret, secrets=secrets)
            await self.discovery.start()
        else:
            await self.discovery.reconfigure(settings, sources, secrets)
        for kind in set(self.dynamic.good) - self._dynamic_kinds(loaded):
            self.dynamic.forget(kind)  # its source left the config: the reload dropped it
        # Secrets no longer configured stop serving (once the reload is in force)
        if self.tls_store.drop_pairs({f"kubernetes:{r}" for r in secrets}):
            self._background(self.publish_tls())

    async def _publish_discovered(self) -> None:
        """The watcher's publish step: merge, then apply to the workers and the checker."""
        async with self._reload_lock:
            if self.supervisor.stopping or self.file_snapshot is None:
                return
            snapshot = self.acme.snapshot_for(self.discovery.merge(self.file_snapshot))
            if snapshot.version == self.loaded.snapshot.version:
                return
            self.loaded = dataclasses.replace(self.loaded, snapshot=snapshot)
            self.health.configure(snapshot.clusters)
            errors = await self.supervisor.apply(snapshot)
            if errors:
                log.error("snapshot %s not applied everywhere: %s", snapshot.version, errors)
            log.info("discovered endpoints applied", extra={"fields": {
                "version": snapshot.version}})

    # ------------------------------------------------------------------ dynamic configuration
    @staticmethod
    def _dynamic_kinds(loaded: LoadedConfig) -> set[str]:
        """The providers that contribute configuration fragments under ``loaded``."""
        sd = loaded.model.service_discovery
        if sd is None:
            return set()
        return ({"consul"} if sd.consul.kv_prefix else set()) | (
            {"kubernetes"} if sd.kubernetes.config_maps else set())

    @staticmethod
    def _secret_refs(loaded: LoadedConfig) -> tuple[str, ...]:
        """``[tls] kubernetes_secrets`` as ``namespace/name`` (TLS on only)."""
        tls = loaded.model.tls
        if not tls.enabled or not tls.kubernetes_secrets:
            return ()
        sd = loaded.model.service_discovery
        ns = sd.kubernetes.namespace if sd is not None else "default"
        return tuple(r if "/" in r else f"{ns or 'default'}/{r}" for r in tls.kubernetes_secrets)

    def _with_dynamic(self, base: LoadedConfig) -> LoadedConfig:
        """A reloaded file with the fragments in force merged in. When they no longer fit
        it, each provider's last offered fragments are offered again against the new file:
        those that fit are kept, the others refused (their errors show in the status)."""
        for kind in set(self.dynamic.offered) - self._dynamic_kinds(base):
            self.dynamic.forget(kind)
        try:
            return self.dynamic.merge(base)
        except ConfigError as exc:
            for e in exc.errors:
                log.error("dynamic configuration does not fit the reloaded file: %s",
                          e.format())
        offered = dict(self.dynamic.offered)
        self.dynamic.good.clear()
        self.dynamic.offered.clear()
        result = base
        for kind, texts in sorted(offered.items()):
            result = self.dynamic.offer(kind, texts, base) or result
        return result

    def _on_dynamic_config(self, kind: str, fragments: dict) -> None:
        """A provider's complete fragment set (the watcher's ``on_config``). Applied in a
        task of its own: the reload may restart that very provider."""
        self._dynamic_pending[kind] = dict(fragments)
        self._background(self.reload(f"{kind} configuration changed", dynamic=kind))

    def _on_secret(self, ref: str, secret) -> None:
        """A ``[tls] kubernetes_secrets`` Secret changed (None: it does not exist)."""
        label = f"kubernetes:{ref}"
        if secret is None:
            changed = self.tls_store.drop_pairs(set(self.tls_store.external) - {label})
        elif not getattr(secret, "is_tls", False):
            changed = self.tls_store.set_pair(label, None, None)
            self.tls_store.external[label].error = (
                f"{label}: type {secret.type!r}, expected kubernetes.io/tls")
        else:
            changed = self.tls_store.set_pair(label, secret.cert_pem, secret.key_pem)
        if changed:
            self._background(self.publish_tls())

    def _background(self, coro) -> None:
        """Run ``coro`` in a task of its own, referenced until it ends."""
        task = asyncio.ensure_future(coro)
        self._dynamic_tasks.add(task)
        task.add_done_callback(self._dynamic_tasks.discard)

    async def _wait_secrets(self, timeout: float) -> None:
        """At start: give the Secrets of ``[tls] kubernetes_secrets`` ``timeout`` seconds to
        arrive, so that the workers start with their certificates."""
        wanted = {f"kubernetes:{r}" for r in self._secret_refs(self.loaded)}
        deadline = time.monotonic() + timeout
        while wanted and time.monotonic() < deadline and not all(
                self.tls_store.external.get(w) is not None
                and (self.tls_store.external[w].current or self.tls_store.external[w].error)
                for w in wanted):
            await asyncio.sleep(0.05)
        if wanted:
            self.loaded = dataclasses.replace(self.loaded, snapshot=with_tls(
                self.loaded.snapshot, self.tls_store.payload()))
            if self.file_snapshot is not None:
                self.file_snapshot = with_tls(self.file_snapshot, self.tls_store.payload())

    @staticmethod
    def _registration(loaded: LoadedConfig) -> tuple:
        """``(Instance or None, provider kind)`` that ``[service_discovery.register]`` asks for."""
        sd = loaded.model.service_discovery
        if sd is None or sd.register is None:
            return None, ""
        return self_instance(sd.register, loaded.static), sd.register.provider or sd.provider

    def _register_self(self) -> None:
        instance, kind = self._registration(self.loaded)
        if self.discovery is not None and instance is not None:
            self.discovery.start_registration(instance, kind)

    def _reload_failed(self, reason: str, errors: list[dict]) -> None:
        self.base_loaded = self._base_in_force
        if self._tls_committed is not None:  # the certificate store goes back as well
            self.tls_store.configure(*self._tls_committed)
        self.reloads_failed += 1
        self.config_errors = errors
        self.last_reload = {"at": time.time(), "reason": reason, "ok": False, "errors": errors}

    # ------------------------------------------------------------------ AdminProvider
    async def refresh_status(self) -> None:
        """Before /admin/status: fetch the workers' resilience state when some cluster has
        breakers, ejection, a retry budget or a latency-aware balancer."""
        if any(c.breaker or c.group_breaker or c.outlier or c.retry_budget
               or c.lb == "peak_ewma" for c in self.loaded.snapshot.clusters) or \
                set(self.worker_log_levels) != {h.key for h in self.supervisor.live()}:
            # (also when a worker has not reported its log level yet: new or respawned)
            await self._gather_metrics()

    async def _gather_metrics(self) -> list:
        resilience = {}
        levels = {}
        for key, export in (await self.supervisor.collect_stats()).items():
            if isinstance(export, dict) and export.get("resilience"):
                resilience[key] = export["resilience"]
            if isinstance(export, dict) and export.get("log_level"):
                levels[key] = export["log_level"]
            try:
                self.metrics.update(key, export)
            except ValueError as exc:  # one bad export must not break the scrape
                log.warning("ignoring malformed stats from worker %s: %s", key, exc)
        self.worker_resilience = resilience
        self.worker_log_levels = levels
        gauges = []
        health = self.health.health_map()
        for c in self.loaded.snapshot.clusters:
            for e in c.endpoints:
                up = health.get(f"{c.name}/{e.id}", True)
                gauges.append(("dispa_target_health", "Endpoint health (1 healthy, 0 unhealthy)",
                               {"target": e.name, "cluster": c.name, "endpoint": e.id},
                               1.0 if up else 0.0))
        gauges.append(("dispa_workers", "Worker processes serving traffic", {},
                       float(len(self.supervisor.live()))))
        gauges.append(("dispa_config_reloads_total", "Configuration reloads by result",
                       {"result": "ok"}, float(self.reloads_ok)))
        gauges.append(("dispa_config_reloads_total", "Configuration reloads by result",
                       {"result": "failed"}, float(self.reloads_failed)))
        restarts = sum(self.supervisor.restarts.values())
        gauges.append(("dispa_worker_restarts_total", "Workers replaced after dying", {},
                       float(restarts)))
        if self.discovery is not None:
            gauges += self.discovery.gauges(self.loaded.snapshot)
        gauges += self.acme.gauges()
        gauges += self.tls_store.expiry_gauges()
        return gauges

    async def metrics_text(self) -> str:
        return self.metrics.render_prometheus(await self._gather_metrics())

    async def metrics_json(self) -> dict:
        return self.metrics.render_json(await self._gather_metrics())

    def status(self) -> dict:
        lc = self.loaded
        return {
            "version": dispa.__version__,
            "build": _native.build_info(),
            "config_path": self.config_path,
            "snapshot_version": lc.snapshot.version,
            "uptime_seconds": round(time.time() - self.started_at, 3),
            "master_pid": os.getpid(),
            "workers": [dict(h.as_dict(), restarts=self.supervisor.restarts.get(h.slot, 0))
                        for h in sorted(self.supervisor.workers.values(), key=lambda h: h.slot)],
            "draining_workers": [h.as_dict() for h in self.supervisor.old],
            "config_errors": self.config_errors,
            "reloads": {"ok": self.reloads_ok, "failed": self.reloads_failed,
                        "last": self.last_reload},
            "health": {k: v for k, v in self.health.details.items()},
            # per worker (each keeps its own breakers): {worker: {cluster: state}}
            "resilience": self.worker_resilience,
            # per cluster: endpoints in the snapshot in force, the latest set, pending
            "discovery": (self.discovery.status(lc.snapshot, self.file_snapshot)
                          if self.discovery is not None else None),
            # as each worker last reported it (refreshed right after a change)
            "log_level": {"master": logs.get_level(), "workers": self.worker_log_levels},
            "acme": self.acme.status(),
            "tls": self.tls_store.status() if self.tls_store.compiled else None,
            # fragments in force and refused per provider (docs/discovery.md)
            "dynamic_config": self.dynamic.status(),
            **self.extra_status,
        }

    def config(self) -> dict:
        return self.loaded.as_dict()

    def health_status(self) -> tuple[bool, dict]:
        live = len(self.supervisor.live())
        ok = live > 0 and not self.supervisor.stopping
        return ok, {"status": "healthy" if ok else "unhealthy", "workers": live,
                    "snapshot_version": self.loaded.snapshot.version}

    def set_log_level(self, level: str) -> None:
        logs.set_level(level)
        self.supervisor.broadcast(m.SetLogLevel(level=logs.get_level()))
        # ask the workers back so /admin/status shows the level each one now runs at
        asyncio.ensure_future(self._gather_metrics())

    def purge_cache(self, prefix: str | None, key: str | None, plugin: str | None) -> dict:
        """Ask every worker to purge its response caches (each worker has its own)."""
        caches = [p.name for p in self.loaded.snapshot.pipeline.plugins if p.type == "cache"]
        if plugin is not None and plugin not in caches:
            raise ValueError(f"no cache plugin named {plugin!r}; cache plugins: "
                             f"{', '.join(caches) or 'none'}")
        self.supervisor.broadcast(m.PurgeCache(prefix=prefix, key=key, plugin=plugin))
        return {"purged": {"prefix": prefix, "key": key, "plugin": plugin},
                "caches": caches, "workers": len(self.status()["workers"])}


class AdminView:
    """The master as the admin API sees it (``dispa.admin.api.AdminProvider``)."""

    def __init__(self, master: Master):
        self._m = master
        self.metrics_text = master.metrics_text
        self.metrics_json = master.metrics_json
        self.status = master.status
        self.config = master.config
        self.health = master.health_status
        self.set_log_level = master.set_log_level
        self.purge_cache = master.purge_cache
        self.refresh_status = master.refresh_status
        self.tls_rollback = master.tls_rollback


SIGNALS = {
    signal.SIGHUP: "on_reload_signal",
    signal.SIGTERM: "on_stop_signal",
    signal.SIGINT: "on_stop_signal",
    signal.SIGUSR1: "on_reopen_signal",
}
