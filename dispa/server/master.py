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
from dispa.errors import ConfigError, StartupError
from dispa.observability import logs
from dispa.observability.metrics import MetricsAggregator
from dispa.server import messages as m
from dispa.server.listeners import probe_listeners
from dispa.server.supervisor import Supervisor

log = logging.getLogger("dispa.master")

CONFIG_POLL_SECONDS = 1.0

# Exit codes
EXIT_OK = 0
EXIT_ERROR = 1
EXIT_CONFIG = 2
EXIT_CRASH_LOOP = 3


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
        self._config_fingerprint = self._fingerprint()
        probe_listeners(self.loaded.static.listeners)
        self.admin = AdminServer(AdminView(self))
        if self.loaded.static.admin_listeners:
            await self.admin.start([(l.host, l.port) for l in self.loaded.static.admin_listeners])
        self.health.configure(self.loaded.snapshot.clusters)
        for sig, action in SIGNALS.items():
            loop.add_signal_handler(sig, getattr(self, action))
        try:
            await self.supervisor.start_generation(self.worker_count())
        except RuntimeError as exc:
            raise StartupError(str(exc)) from None
        log.info("dispa started", extra={"fields": {
            "workers": self.worker_count(), "version": self.loaded.snapshot.version,
            "listeners": [f"{l.host}:{l.port}" for l in self.loaded.static.listeners]}})
        watcher = asyncio.ensure_future(self._watch_config())
        try:
            graceful = await self._stop
        finally:
            watcher.cancel()
        self.health.close()
        if graceful:
            await self.supervisor.stop(self.loaded.static.shutdown_timeout_seconds)
        else:
            self.supervisor.kill_all()
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
        log.info("SIGUSR1: log files reopened (logs go to stderr; nothing to reopen)")

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

    async def reload(self, reason: str) -> bool:
        """Load, validate and apply the config file; keep the running config on any error."""
        if not self.config_path:
            log.info("reload requested (%s) but no config file is in use", reason)
            return False
        async with self._reload_lock:
            if self.supervisor.stopping:
                log.info("reload (%s) ignored: shutting down", reason)
                return False
            self._config_fingerprint = self._fingerprint()
            try:
                new = load_config(self.config_path)
            except ConfigError as exc:
                self._reload_failed(reason, [e.as_dict() for e in exc.errors])
                for e in exc.errors:
                    log.error("config reload refused: %s", e.format())
                return False
            old = self.loaded
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
            self.loaded = new
            if new.log_level != old.log_level and self.log_level_override is None:
                self.set_log_level(new.log_level)
            self.health.configure(new.snapshot.clusters)
            if static_changed:
                try:
                    previous = await self.supervisor.start_generation(self.worker_count())
                except RuntimeError as exc:
                    self.loaded = old
                    self.health.configure(old.snapshot.clusters)
                    self._reload_failed(reason, [{"message": f"new workers failed: {exc}"}])
                    log.error("config reload refused: new workers failed: %s", exc)
                    return False
                self.supervisor.drain(previous, new.static.shutdown_timeout_seconds)
                errors = []
            else:
                errors = await self.supervisor.apply(new.snapshot)
            if errors:
                log.error("snapshot %s not applied everywhere: %s", new.snapshot.version, errors)
            self.config_errors = [{"message": e} for e in errors]
            self.reloads_ok += 1
            self.last_reload = {"at": time.time(), "reason": reason, "ok": not errors,
                                "version": new.snapshot.version,
                                "rolling_restart": static_changed}
            log.info("config reloaded", extra={"fields": {
                "reason": reason, "version": new.snapshot.version,
                "rolling_restart": static_changed}})
            return True

    def _reload_failed(self, reason: str, errors: list[dict]) -> None:
        self.reloads_failed += 1
        self.config_errors = errors
        self.last_reload = {"at": time.time(), "reason": reason, "ok": False, "errors": errors}

    # ------------------------------------------------------------------ AdminProvider
    async def refresh_status(self) -> None:
        """Before /admin/status: fetch the workers' resilience state when some cluster has
        breakers, ejection, a retry budget or a latency-aware balancer."""
        if any(c.breaker or c.group_breaker or c.outlier or c.retry_budget
               or c.lb == "peak_ewma" for c in self.loaded.snapshot.clusters):
            await self._gather_metrics()

    async def _gather_metrics(self) -> list:
        resilience = {}
        for key, export in (await self.supervisor.collect_stats()).items():
            if isinstance(export, dict) and export.get("resilience"):
                resilience[key] = export["resilience"]
            try:
                self.metrics.update(key, export)
            except ValueError as exc:  # one bad export must not break the scrape
                log.warning("ignoring malformed stats from worker %s: %s", key, exc)
        self.worker_resilience = resilience
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


SIGNALS = {
    signal.SIGHUP: "on_reload_signal",
    signal.SIGTERM: "on_stop_signal",
    signal.SIGINT: "on_stop_signal",
    signal.SIGUSR1: "on_reopen_signal",
}
