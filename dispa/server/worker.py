"""The data-plane worker process: uvloop, its own SO_REUSEPORT listeners, the proxy.

Started by the master as ``python -m dispa.server.worker --fd N`` with one end of a
socketpair. Lifecycle:

1. read ``Init`` (static spec, first snapshot, health, log settings);
2. build the runtime, bind the listeners, start serving, send ``Ready``;
3. serve; ``ApplySnapshot`` builds a new runtime off to the side and swaps it in (ACK/NACK);
   ``HealthUpdate`` flips endpoint health; ``StatsRequest`` answers with cumulative counters;
4. ``Drain`` (or SIGTERM, or the master vanishing): close the listeners, let in-flight
   requests finish up to the deadline, exit 0.

The worker ignores SIGINT: a Ctrl-C in a terminal reaches the whole process group, and the
master turns it into an orderly Drain.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import sys
import time

from dispa.observability import logs
from dispa.observability.metrics import WorkerMetrics
from dispa.proxy.runtime import WorkerState, build_runtime
from dispa.proxy.protocol import RequestIds, Session
from dispa.proxy.websocket import WebSocketProxy
from dispa.l4.manager import L4Manager
from dispa.routing.vhost import normalize_host
from dispa.server import messages as m
from dispa.server.channel import open_channel
from dispa.server.listeners import bind_listener
from dispa.server.detect import Detect
from dispa.proxy.h2_session import H2Session
from dispa.protocols.http2 import limits_from as h2_limits_from
from dispa.errors import StartupError
from dispa.tls.context import TlsServer
from dispa.tls.handshake import HANDSHAKE_ERRORS, HANDSHAKES, TlsAccept

log = logging.getLogger("dispa.worker")

SWEEP_INTERVAL_SECONDS = 0.1
_DOMAIN_LABEL_LIMIT = 1000  # distinct domain label values per worker before "other"


class DataPlane:
    """One worker's serving state (what a Session sees as ``server``)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, init: m.Init, channel):
        self.loop = loop
        self.worker_id = init.worker_id
        self.channel = channel
        self.static = init.static
        self.metrics = WorkerMetrics()
        self.state = WorkerState(loop, self.metrics, init.worker_id)
        self.state.health.update(init.health)
        self.runtime = build_runtime(init.snapshot, self.state)
        # TLS listeners: contexts per server name, rebuilt when Snapshot.tls changes
        self.tls = TlsServer(self.metrics)
        self.session_factory = lambda: Session(self)
        # [http2]: limits of downstream HTTP/2 connections; None = HTTP/2 off (docs/http2.md)
        self.h2_limits = h2_limits_from(getattr(init.snapshot, "http2", None))
        self.h2_session_factory = lambda: H2Session(self, self.h2_limits)
        if any(spec.tls for spec in init.static.listeners):
            self.metrics.set_help(HANDSHAKES, "counter", "TLS handshakes completed, by version")
            self.metrics.set_help(HANDSHAKE_ERRORS, "counter",
                                  "TLS handshakes that failed, by reason")
            try:
                self.tls.update(init.snapshot.tls, init.snapshot.acme_challenges)
            except Exception as exc:  # noqa: BLE001 - serve plain HTTP; TLS says why
                log.error("TLS contexts not built: %s", exc)
        self.sessions: set[Session] = set()
        # WebSocket upgrades: sessions hand their connections to it after the 101
        self.websocket = WebSocketProxy(self.metrics)
        self.websocket.configure(init.snapshot.websocket)
        self.l4 = L4Manager(self)  # [[l4.listeners]]: TCP/UDP proxying (dispa/l4)
        self.draining = False
        self.slowdown_us = init.slowdown_us
        self.servers: list[asyncio.AbstractServer] = []
        # request ids: a per-worker random prefix plus a counter (generated in C when compiled)
        self.next_request_id = RequestIds(os.urandom(6).hex() + "-")
        self._domains: dict[bytes, str] = {}
        self._passive: list[tuple[str, str, str]] = []
        self.exit_code = 0
        self.done = loop.create_future()

    # ---------------------------------------------------------------- used by sessions
    def domain_label(self, raw_host: bytes) -> str:
        label = self._domains.get(raw_host)
        if label is None:
            if len(self._domains) >= _DOMAIN_LABEL_LIMIT:
                return "other"  # bounded: a client cannot grow this with random Host values
            label = normalize_host(raw_host) or "-"
            self._domains[raw_host] = label
        return label

    def report_passive(self, cluster: str, endpoint_id: str, event: str) -> None:
        self._passive.append((cluster, endpoint_id, event))

    def busy_wait(self) -> None:
        # Perf-gate self-test only (DISPA_PERF_SLOWDOWN_US): burn CPU like a slow hot path.
        end = time.perf_counter() + self.slowdown_us / 1e6
        while time.perf_counter() < end:
            pass

    # ---------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        sockets = [bind_listener(spec) for spec in self.static.listeners]
        for sock, spec in zip(sockets, self.static.listeners):
            factory = (lambda: TlsAccept(self)) if spec.tls else self._plain_protocol
            srv = await self.loop.create_server(factory, sock=sock,
                                                backlog=spec.backlog)
            self.servers.append(srv)
        await self.l4.start(self.runtime.snapshot.l4)
        self.loop.create_task(self._sweeper())

    def _plain_protocol(self):
        # with HTTP/2 on, the first bytes decide: h2c preface, Upgrade: h2c, TLS or HTTP/1
        return Detect(self) if self.h2_limits is not None else Session(self)

    async def _sweeper(self) -> None:
        last_pool_sweep = time.monotonic()
        while True:
            await asyncio.sleep(SWEEP_INTERVAL_SECONDS)
            now = time.monotonic()
            for s in [s for s in self.sessions if s.deadline and s.deadline < now]:
                try:
                    s.on_deadline(now)
                except Exception:  # noqa: BLE001 - one broken session must not stop the sweeper
                    log.exception("deadline handler failed")
                    s._abort("internal error")
            if now - last_pool_sweep > 1.0:
                last_pool_sweep = now
                for pool in self.state.pools.values():
                    pool.sweep(now)
            if self._passive:
                events, self._passive = self._passive, []
                self.channel.send(m.Passive(events=events))
            if self.draining and not self.sessions and not self.done.done():
                self.done.set_result(None)

    def on_message(self, msg) -> None:
        if isinstance(msg, m.ApplySnapshot):
            self.apply(msg.snapshot)
        elif isinstance(msg, m.HealthUpdate):
            self.state.health.update(msg.states)
            for key, healthy in msg.states.items():
                self.runtime.set_health(key, healthy)
        elif isinstance(msg, m.StatsRequest):
            self.metrics.set_gauge("dispa_active_connections", (), len(self.sessions))
            self._pool_gauges()
            resilience = self._resilience()
            export = self.metrics.export()
            export["log_level"] = logs.get_level()  # shown per worker in /admin/status
            if resilience:
                export["resilience"] = resilience
            self.channel.send(m.Stats(seq=msg.seq, export=export))
        elif isinstance(msg, m.Drain):
            self.drain(msg.deadline_seconds)
        elif isinstance(msg, m.SetLogLevel):
            try:
                logs.set_level(msg.level)
            except ValueError:
                log.warning("ignoring unknown log level %r", msg.level)
        elif isinstance(msg, m.ReopenLogs):
            for sink in self.state.observers.sinks:  # access log, traffic log files
                reopen = getattr(sink, "reopen", None)
                if reopen is not None:
                    try:
                        reopen()
                    except Exception:  # noqa: BLE001 - one sink must not stop the others
                        log.exception("reopening log files failed")
        elif isinstance(msg, m.PurgeCache):
            pipeline = self.runtime.pipeline
            if pipeline is not None:
                n = pipeline.purge_cache(msg.prefix, msg.key, msg.plugin)
                log.info("cache purge", extra={"fields": {"prefix": msg.prefix, "key": msg.key,
                                                          "removed": n}})

    def _pool_gauges(self) -> None:
        """Upstream pool usage per endpoint: idle and in-use connections (summed over
        workers by the master)."""
        per_ep: dict[str, list] = {}
        for (endpoint_id, _spec), pool in self.state.pools.items():
            acc = per_ep.setdefault(endpoint_id, [0, 0])
            idle = len(pool.idle)
            acc[0] += idle
            acc[1] += max(0, pool.total - idle)
        self.metrics.clear_gauges("dispa_upstream_pool_connections")
        for endpoint_id, (idle, busy) in per_ep.items():
            self.metrics.set_gauge("dispa_upstream_pool_connections",
                                   (("endpoint", endpoint_id), ("state", "idle")), idle)
            self.metrics.set_gauge("dispa_upstream_pool_connections",
                                   (("endpoint", endpoint_id), ("state", "in_use")), busy)

    def _resilience(self) -> dict:
        """Breaker, ejection and retry-budget state of the clusters that track outcomes,
        also set as gauges (summed over workers by the master: how many have it open)."""
        out = {}
        for name, cluster in self.runtime.clusters.items():
            if not cluster.tracks:
                continue
            snap = cluster.snapshot()
            out[name] = snap
            breakers = snap.get("breakers", {}).get("endpoints", [])
            ejected = set(snap.get("outlier", {}).get("ejected", []))
            for i, e in enumerate(cluster.endpoints):
                labels = (("cluster", name), ("endpoint", e.id))
                if i < len(breakers):
                    state = breakers[i].get("state", "closed")
                    self.metrics.set_gauge("dispa_circuit_breaker_open", labels,
                                           1.0 if state == "open" else 0.0)
                    self.metrics.set_gauge("dispa_circuit_breaker_half_open", labels,
                                           1.0 if state == "half_open" else 0.0)
                if "outlier" in snap:
                    self.metrics.set_gauge("dispa_outlier_ejected", labels,
                                           1.0 if i in ejected else 0.0)
        return out

    def apply(self, snapshot) -> None:
        if snapshot.version == self.runtime.version:
            self.channel.send(m.Ack(version=snapshot.version))
            return
        try:
            runtime = build_runtime(snapshot, self.state)
            if any(spec.tls for spec in self.static.listeners):
                self.tls.update(snapshot.tls, snapshot.acme_challenges)
        except Exception as exc:  # noqa: BLE001 - any failure is a NACK, never a crash
            log.error("snapshot %s refused: %s", snapshot.version, exc)
            self.channel.send(m.Nack(version=snapshot.version, error=str(exc)))
            return
        old, self.runtime = self.runtime, runtime  # the swap: one reference, between requests
        self.h2_limits = h2_limits_from(getattr(snapshot, "http2", None))
        self.websocket.configure(snapshot.websocket)
        self.l4.update(snapshot.l4)
        if old.pipeline is not None:
            # requests in flight may still use the old filters: close them later
            self.loop.call_later(old.proxy.request_timeout_seconds + 1.0, old.pipeline.close)
        log.info("snapshot applied", extra={"fields": {"version": snapshot.version}})
        self.channel.send(m.Ack(version=snapshot.version))

    def drain(self, deadline_seconds: float) -> None:
        if self.draining:
            return
        self.draining = True
        log.info("draining", extra={"fields": {"sessions": len(self.sessions),
                                               "deadline_seconds": deadline_seconds}})
        for srv in self.servers:
            srv.close()
        self.l4.drain(deadline_seconds)
        for s in list(self.sessions):
            s.drain()
        if not self.sessions and not self.done.done():
            self.done.set_result(None)
        self.loop.call_later(deadline_seconds, self._deadline_passed)

    def _deadline_passed(self) -> None:
        if not self.done.done():
            log.warning("drain deadline passed; closing %d connections", len(self.sessions))
            for s in list(self.sessions):
                s._abort("shutdown deadline")
            self.done.set_result(None)

    def on_channel_closed(self, exc) -> None:
        # The master is gone: finish what is in flight and leave.
        if not self.draining:
            self.drain(self.static.shutdown_timeout_seconds)


async def _amain(fd: int) -> int:
    loop = asyncio.get_running_loop()
    sock = socket.socket(fileno=fd)
    first: asyncio.Future = loop.create_future()
    plane: DataPlane | None = None

    def on_message(msg):
        if plane is None:
            if not first.done():
                first.set_result(msg)
            return
        plane.on_message(msg)

    def on_close(exc):
        if plane is None:
            if not first.done():
                first.set_exception(ConnectionError("master closed the channel"))
            return
        plane.on_channel_closed(exc)

    channel = await open_channel(sock, m.ToWorker, on_message, on_close)
    init = await first
    if not isinstance(init, m.Init):
        raise RuntimeError(f"expected Init, got {type(init).__name__}")
    logs.configure(init.log_format, init.log_level, process=f"worker-{init.worker_id}")
    plane = DataPlane(loop, init, channel)
    try:
        await plane.start()
    except StartupError as exc:
        channel.send(m.Fatal(error=str(exc)))
        await asyncio.sleep(0.05)
        return 3
    loop.add_signal_handler(signal.SIGTERM, plane.drain, init.static.shutdown_timeout_seconds)
    channel.send(m.Ready(worker_id=init.worker_id, pid=os.getpid(), version=plane.runtime.version))
    log.info("worker ready", extra={"fields": {"version": plane.runtime.version}})
    await plane.done
    # log sinks (access log, traffic records, spans) write what they hold: no record is
    # lost on a graceful shutdown
    await plane.state.observers.flush()
    # give the last writes a moment to flush through the closing transports
    await asyncio.sleep(0)
    return plane.exit_code


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="dispa-worker")
    parser.add_argument("--fd", type=int, required=True)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        import uvloop
        runner = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is a dependency
        runner = asyncio.run
    try:
        return runner(_amain(args.fd))
    except (ConnectionError, KeyboardInterrupt):
        return 1


if __name__ == "__main__":
    sys.exit(main())
