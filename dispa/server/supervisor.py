"""Worker supervision: spawn, respawn with backoff, crash-loop guard, rolling restart.

Each worker is a fresh interpreter (``python -m dispa.server.worker``) holding one end of a
socketpair; the channel closing is how the master learns a worker died (no polling). A
worker that dies unexpectedly is replaced after a backoff that doubles per recent crash; if
one slot crashes ``CRASH_LOOP_LIMIT`` times within ``CRASH_LOOP_WINDOW_SECONDS`` the
supervisor gives up and the master exits non-zero (granian's crash-loop guard): a worker
that cannot stay up will not start to on the sixth try, and a restart loop hides the error.

Rolling restart (a listener or worker-count change): start the whole new generation, wait
until every new worker is Ready (listening), then drain the old generation. Both share the
SO_REUSEPORT group meanwhile, so no connection is refused.

Workers are forked from the master (``spawn_mode = "fork"``, the default on Linux): the
interpreter and every module the master preloaded stay shared copy-on-write, which is most
of a Python process's memory (a bare ``import asyncio`` is ~20 MB PSS on its own). The
child closes every inherited descriptor but its channel, resets signal dispositions, and
never returns into the master's stack (it ends with ``os._exit``). Objects of the master that
the child inherits are frozen out of the cyclic GC before the fork, so no finaliser can close
a descriptor number the child has reused. The master runs plain asyncio (no libuv state to
inherit); each worker starts its own uvloop. ``DISPA_SPAWN=exec`` starts workers as fresh
interpreters instead (``python -m dispa.server.worker``).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Callable

from dispa.server import messages as m
from dispa.server.channel import open_channel

log = logging.getLogger("dispa.supervisor")

CRASH_LOOP_LIMIT = 5
CRASH_LOOP_WINDOW_SECONDS = 30.0
READY_TIMEOUT_SECONDS = 20.0
KILL_GRACE_SECONDS = 5.0


SPAWN_MODE = os.environ.get("DISPA_SPAWN", "fork" if hasattr(os, "fork") else "exec")
if SPAWN_MODE == "fork":
    # Preload the data plane in the master so forked workers share its pages.
    import dispa.server.worker  # noqa: F401


class ForkedProcess:
    """The Popen-like view of a worker forked from the master."""

    def __init__(self, pid: int):
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                self.returncode = -1
                return self.returncode
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode


def fork_worker(child: socket.socket) -> ForkedProcess:
    """Fork a worker that serves the channel ``child``; returns in the master only."""
    gc.freeze()  # inherited objects: out of reach of the child's cyclic GC
    try:
        pid = os.fork()
    except OSError:
        gc.unfreeze()
        raise
    if pid:
        gc.unfreeze()
        return ForkedProcess(pid)
    # the child: it never returns
    code = 1
    try:
        fd = child.fileno()
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGUSR1,
                    signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        os.closerange(3, fd)
        os.closerange(fd + 1, max(os.sysconf("SC_OPEN_MAX"), fd + 2))
        asyncio.events._set_running_loop(None)
        from dispa.server import worker
        code = worker.main(["--fd", str(fd)])
    except BaseException:  # noqa: BLE001 - whatever happens, never unwind into the master
        import traceback
        traceback.print_exc()
    finally:
        os._exit(code if isinstance(code, int) else 1)


class WorkerHandle:
    """The master's view of one worker process."""

    def __init__(self, slot: int, generation: int):
        self.slot = slot
        self.generation = generation
        self.proc: subprocess.Popen | None = None
        self.channel = None
        self.pid = 0
        self.state = "starting"  # starting | ready | draining | exited
        self.version = ""  # last acknowledged snapshot version
        self.started_at = time.time()
        self.ready: asyncio.Future | None = None
        self.exited: asyncio.Future | None = None
        self.fatal: str | None = None
        self.stats_waiters: dict[int, asyncio.Future] = {}
        self.ack_waiters: dict[str, asyncio.Future] = {}
        self.nack_error: str | None = None

    @property
    def key(self) -> str:
        return f"{self.slot}:{self.pid}"

    def as_dict(self) -> dict:
        return {"id": self.slot, "pid": self.pid, "generation": self.generation,
                "state": self.state, "snapshot_version": self.version,
                "started_at": self.started_at}


async def _wait_exit(proc, timeout: float):
    """The exit code of ``proc``, or None if it is still running after ``timeout`` seconds.

    Polls without threads: the channel already told us the worker is going, so it is
    normally gone within milliseconds.
    """
    deadline = time.monotonic() + timeout
    delay = 0.001
    while True:
        code = proc.poll()
        if code is not None or time.monotonic() > deadline:
            return code
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.05)


class Supervisor:
    """Owns the worker processes of a master."""

    def __init__(self, make_init: Callable[[int, int], m.Init],
                 on_passive: Callable[[list], None],
                 on_worker_exit: Callable[[WorkerHandle], None],
                 on_give_up: Callable[[str], None],
                 on_ready: Callable[[WorkerHandle], None] = lambda h: None):
        self.make_init = make_init
        self.on_passive = on_passive
        self.on_worker_exit = on_worker_exit
        self.on_give_up = on_give_up
        self.on_ready = on_ready
        self.workers: dict[int, WorkerHandle] = {}  # slot -> current handle
        self.old: list[WorkerHandle] = []  # draining handles from earlier generations
        self.generation = 0
        self.restarts: dict[int, int] = {}
        self._crashes: dict[int, list[float]] = {}
        self.stopping = False
        self._seq = 0

    # ------------------------------------------------------------------ spawning
    async def spawn(self, slot: int, generation: int) -> WorkerHandle:
        loop = asyncio.get_running_loop()
        h = WorkerHandle(slot, generation)
        h.ready = loop.create_future()
        h.exited = loop.create_future()
        parent, child = socket.socketpair()
        try:
            if SPAWN_MODE == "fork":
                h.proc = fork_worker(child)
            else:
                h.proc = subprocess.Popen(
                    [sys.executable, "-m", "dispa.server.worker", "--fd", str(child.fileno())],
                    pass_fds=(child.fileno(),), close_fds=True)
        finally:
            child.close()
        h.pid = h.proc.pid
        h.channel = await open_channel(parent, m.ToMaster,
                                       lambda msg: self._on_message(h, msg),
                                       lambda exc: self._on_channel_closed(h))
        h.channel.send(self.make_init(slot, generation))
        return h

    async def start_generation(self, count: int) -> list[WorkerHandle]:
        """Start ``count`` workers as a new generation; return once all are Ready.

        Raises RuntimeError (after stopping the half-started generation) if any worker
        fails to become ready.
        """
        self.generation += 1
        gen = self.generation
        handles = [await self.spawn(slot, gen) for slot in range(count)]
        try:
            await asyncio.wait_for(asyncio.gather(*(h.ready for h in handles)),
                                   READY_TIMEOUT_SECONDS)
        except (asyncio.TimeoutError, RuntimeError) as exc:
            for h in handles:
                self._kill(h)
            reason = next((h.fatal for h in handles if h.fatal), None) or str(exc) or \
                "workers did not become ready in time"
            raise RuntimeError(reason) from None
        previous = list(self.workers.values())
        self.workers = {h.slot: h for h in handles}
        return previous

    # ------------------------------------------------------------------ channel events
    def _on_message(self, h: WorkerHandle, msg) -> None:
        if isinstance(msg, m.Ready):
            h.state = "ready"
            h.version = msg.version
            if not h.ready.done():
                h.ready.set_result(h)
            # A reload or a health change while it was starting did not reach it: catch up.
            self.on_ready(h)
        elif isinstance(msg, m.Ack):
            h.version = msg.version
            fut = h.ack_waiters.pop(msg.version, None)
            if fut is not None and not fut.done():
                fut.set_result(True)
        elif isinstance(msg, m.Nack):
            h.nack_error = msg.error
            fut = h.ack_waiters.pop(msg.version, None)
            if fut is not None and not fut.done():
                fut.set_result(False)
        elif isinstance(msg, m.Stats):
            fut = h.stats_waiters.pop(msg.seq, None)
            if fut is not None and not fut.done():
                fut.set_result(msg.export)
        elif isinstance(msg, m.Passive):
            self.on_passive(msg.events)
        elif isinstance(msg, m.Fatal):
            h.fatal = msg.error
            if not h.ready.done():
                h.ready.set_exception(RuntimeError(msg.error))

    def _on_channel_closed(self, h: WorkerHandle) -> None:
        asyncio.ensure_future(self._reap(h))

    async def _reap(self, h: WorkerHandle) -> None:
        code = await _wait_exit(h.proc, KILL_GRACE_SECONDS)
        if code is None:
            self._kill(h)
            code = await _wait_exit(h.proc, KILL_GRACE_SECONDS)
        expected = h.state == "draining" or self.stopping
        h.state = "exited"
        if not h.ready.done():
            h.ready.set_exception(RuntimeError(h.fatal or f"worker exited with code {code}"))
        for fut in [*h.stats_waiters.values(), *h.ack_waiters.values()]:
            if not fut.done():
                fut.set_result(None)
        if not h.exited.done():
            h.exited.set_result(code)
        self.on_worker_exit(h)
        if h in self.old:
            self.old.remove(h)
        if expected or self.workers.get(h.slot) is not h:
            return
        log.error("worker %d (pid %d) died with code %s", h.slot, h.pid, code,
                  extra={"fields": {"worker": h.slot, "pid": h.pid, "code": code}})
        if h.fatal:
            self.on_give_up(f"worker {h.slot} cannot run: {h.fatal}")
            return
        now = time.monotonic()
        crashes = [t for t in self._crashes.get(h.slot, []) if now - t < CRASH_LOOP_WINDOW_SECONDS]
        crashes.append(now)
        self._crashes[h.slot] = crashes
        if len(crashes) >= CRASH_LOOP_LIMIT:
            self.on_give_up(f"worker {h.slot} crashed {len(crashes)} times in "
                            f"{CRASH_LOOP_WINDOW_SECONDS:.0f}s; giving up (crash loop)")
            return
        await asyncio.sleep(min(0.1 * 2 ** (len(crashes) - 1), 5.0))
        if self.stopping or self.workers.get(h.slot) is not h:
            return
        self.restarts[h.slot] = self.restarts.get(h.slot, 0) + 1
        new = await self.spawn(h.slot, h.generation)
        self.workers[h.slot] = new
        try:
            await asyncio.wait_for(asyncio.shield(new.ready), READY_TIMEOUT_SECONDS)
            log.info("worker %d respawned as pid %d", h.slot, new.pid)
        except (asyncio.TimeoutError, RuntimeError) as exc:
            log.error("respawned worker %d failed to start: %s", h.slot, exc)
            self._kill(new)  # its exit goes through _reap, which respawns with backoff

    # ------------------------------------------------------------------ commands
    def live(self) -> list[WorkerHandle]:
        return [h for h in self.workers.values() if h.state == "ready"]

    def broadcast(self, msg) -> None:
        for h in self.live():
            h.channel.send(msg)

    async def apply(self, snapshot, timeout: float = 10.0) -> list[str]:
        """Send a snapshot to every live worker; return the errors of workers that NACKed."""
        loop = asyncio.get_running_loop()
        waits = []
        for h in self.live():
            fut = loop.create_future()
            h.ack_waiters[snapshot.version] = fut
            h.channel.send(m.ApplySnapshot(snapshot=snapshot))
            waits.append((h, fut))
        errors = []
        for h, fut in waits:
            try:
                ok = await asyncio.wait_for(fut, timeout)
            except asyncio.TimeoutError:
                ok = None
                h.ack_waiters.pop(snapshot.version, None)
            if ok is False:
                errors.append(f"worker {h.slot}: {h.nack_error}")
            elif ok is None and h.state == "ready":
                errors.append(f"worker {h.slot}: no acknowledgement within {timeout:.0f}s")
        return errors

    async def collect_stats(self, timeout: float = 2.0) -> dict[str, dict]:
        loop = asyncio.get_running_loop()
        self._seq += 1
        seq = self._seq
        waits = []
        for h in self.live() + [o for o in self.old if o.state != "exited"]:
            fut = loop.create_future()
            h.stats_waiters[seq] = fut
            h.channel.send(m.StatsRequest(seq=seq))
            waits.append((h, fut))
        out = {}
        for h, fut in waits:
            try:
                export = await asyncio.wait_for(fut, timeout)
            except asyncio.TimeoutError:
                h.stats_waiters.pop(seq, None)
                continue
            if export is not None:
                out[h.key] = export
        return out

    def drain(self, handles, deadline_seconds: float) -> None:
        for h in handles:
            if h.state in ("ready", "starting"):
                h.state = "draining"
                h.channel.send(m.Drain(deadline_seconds=deadline_seconds))
                if h not in self.old:
                    self.old.append(h)

    async def stop(self, deadline_seconds: float) -> None:
        """Graceful: drain every worker, wait up to the deadline (+ grace), then kill."""
        self.stopping = True
        handles = list(self.workers.values()) + list(self.old)
        self.drain(handles, deadline_seconds)
        pending = [h.exited for h in handles if not h.exited.done()]
        if pending:
            done, not_done = await asyncio.wait(pending, timeout=deadline_seconds + KILL_GRACE_SECONDS)
            if not_done:
                for h in handles:
                    if not h.exited.done():
                        log.warning("worker %d (pid %d) did not exit in time; killing", h.slot, h.pid)
                        self._kill(h)
                await asyncio.wait(not_done, timeout=KILL_GRACE_SECONDS)

    def kill_all(self) -> None:
        self.stopping = True
        for h in list(self.workers.values()) + list(self.old):
            self._kill(h)

    @staticmethod
    def _kill(h: WorkerHandle) -> None:
        if h.proc is not None and h.proc.poll() is None:
            try:
                os.kill(h.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
