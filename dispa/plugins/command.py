"""``command``: ask an external program about each request (or response), over JSON.

The program gets one JSON object describing the request (``"stage": "request"``) or the
upstream's response head (``"stage": "response"``) and answers with one JSON object:
``{"set_headers": {...}}`` (set or override headers), ``{"short_circuit": {"status": 403,
"body": "...", "headers": {...}}}`` (answer now; in the response stage, replace the
response) or ``{}`` (no change). See docs/plugins-command.md for the full protocol.

Theory of operation
-------------------
``build`` checks the configuration (the program must resolve, through ``realpath``, to an
entry of ``exec_allowlist``, and be an executable file) and starts nothing: processes are
started lazily, on the worker's loop, by the first call that needs one.

``mode = "persistent"`` (the default) keeps a pool of ``max_concurrency`` slots; each slot
owns at most one long-lived process that speaks newline-delimited JSON: one object per line
in, one line out, in order. A call takes a free slot (the most recently used first, so a
lightly loaded worker keeps few processes), starts its process if it has none (or if the
old one died: counted in ``restarts``), writes one line and reads one line. When every slot
is busy the call waits in a FIFO queue of at most ``max_queue`` calls; beyond that it fails
at once (kind ``queue_full``). ``mode = "oneshot"`` keeps the original behaviour: one
process per call, the JSON on stdin, stdin closed, stdout read to EOF; ``max_concurrency``
bounds how many run at once, with the same queue.

A call is bounded by ``timeout_ms`` (the first call a new persistent process answers gets
``max(timeout_ms, start_timeout_ms)``, to cover interpreter start-up). A process that
overruns, or whose call is cancelled (the chain's own hook timeout, a client gone), is
killed: it may still answer later and would then be out of step with its pipe. Each process
is started in its own session, so the kill (``killpg``) reaches whatever it spawned too.

Errors carry ``kind`` (the chain reads it for ``dispa_plugin_errors_total``):
``timeout`` (also a :class:`TimeoutError`), ``bad_output`` (also a :class:`ValueError`:
not JSON, not an object, unknown keys, wrong types, status out of range, bad header names
or values), ``exited`` (the program closed stdout or exited before answering, or exited
non-zero in oneshot mode), ``spawn`` (it could not be started), ``queue_full`` and
``closed``. stderr is read continually, so a chatty program never blocks on a full pipe,
and logged at most ``_LOG_RATE`` lines a second (with a count of what was dropped).

``close()`` sends SIGTERM to every process group, then SIGKILL after ``term_grace_ms``;
children are reaped by the loop's child watcher (``await wait_closed()`` to wait for that),
or, when the loop is gone, by ``close()`` itself with ``waitpid``. A persistent program
should also exit when its stdin reaches EOF.

Per-request state: none. ``self`` holds the pool, which is the worker's (the instance is
bound to the first event loop that calls it; a call from another loop abandons and kills
the old loop's processes and starts afresh).
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import time
from collections import deque
from typing import Annotated, Any, Literal

import msgspec

from dispa.plugins.api import BuildContext, Filter, Headers, Request, Response, ResponseHead

__all__ = [
    "CommandConfig", "CommandError", "CommandFilter", "CommandOutputError",
    "CommandTimeout",
]

_log = logging.getLogger(__name__)

M_DURATION = "dispa_plugin_cmd_exec_duration_ms"
M_ERRORS = "dispa_plugin_cmd_errors_total"
M_TIMEOUTS = "dispa_plugin_cmd_timeouts_total"

_LOG_RATE = 10.0      # stderr lines logged per second (token bucket refill) ...
_LOG_BURST = 20.0     # ... and the bucket size
_LOG_LINE_MAX = 2048  # a longer stderr line is cut (the rest of it is skipped)

# Headers a program may not set: they decide the message framing, which the core owns.
_FRAMING = frozenset(("content-length", "transfer-encoding"))
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
_CTL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


class CommandConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """``[[plugins.plugins]] type = "command"`` settings (docs/plugins-command.md)."""

    exec: Annotated[str, msgspec.Meta(min_length=1)]
    exec_allowlist: tuple[str, ...] = ()
    args: tuple[str, ...] = ()
    mode: Literal["persistent", "oneshot"] = "persistent"
    timeout_ms: Annotated[int, msgspec.Meta(ge=1, le=600_000)] = 200
    start_timeout_ms: Annotated[int, msgspec.Meta(ge=1, le=600_000)] = 2000
    max_concurrency: Annotated[int, msgspec.Meta(ge=1, le=1024)] = 8
    max_queue: Annotated[int, msgspec.Meta(ge=0)] = 1024
    max_output_bytes: Annotated[int, msgspec.Meta(ge=64, le=64 * 1024 * 1024)] = 65536
    term_grace_ms: Annotated[int, msgspec.Meta(ge=0, le=60_000)] = 500
    env: dict[str, str] = {}


# ------------------------------------------------------------------------------ errors

class CommandError(RuntimeError):
    """A failed call of the external program; ``kind`` names the failure for metrics."""

    kind = "exception"

    def __init__(self, message: str, kind: str | None = None):
        super().__init__(message)
        if kind is not None:
            self.kind = kind


class CommandTimeout(CommandError, TimeoutError):
    """The program did not answer within ``timeout_ms`` (it has been killed)."""

    kind = "timeout"


class CommandOutputError(CommandError, ValueError):
    """The program's answer is not a valid protocol object."""

    kind = "bad_output"


# ------------------------------------------------------------------------------ output

class _ShortCircuit(msgspec.Struct, forbid_unknown_fields=True):
    status: Annotated[int, msgspec.Meta(ge=200, le=599)]
    body: str = ""
    headers: dict[str, str] | None = None


class _Output(msgspec.Struct, forbid_unknown_fields=True):
    set_headers: dict[str, str] | None = None
    short_circuit: _ShortCircuit | None = None


_decoder = msgspec.json.Decoder(_Output)
_encoder = msgspec.json.Encoder()


def _value_bytes(v: str) -> bytes:
    try:
        return v.encode("latin-1")
    except UnicodeEncodeError:
        return v.encode("utf-8")


def _checked_headers(d: dict[str, str], where: str) -> list[tuple[str, bytes]]:
    out = []
    for k, v in d.items():
        if not _TOKEN.match(k):
            raise CommandOutputError(f"{where}: invalid header name {k!r}")
        if k.lower() in _FRAMING:
            raise CommandOutputError(f"{where}: header {k!r} may not be set (framing is "
                                     f"the proxy's)")
        if _CTL.search(v):
            raise CommandOutputError(f"{where}[{k!r}]: header value contains CR/LF or "
                                     f"control characters: {v!r}")
        out.append((k, _value_bytes(v)))
    return out


def parse_output(raw: bytes) -> tuple[list[tuple[str, bytes]] | None, Response | None]:
    """One answer of the program → (headers to set, or a response). Raises
    :class:`CommandOutputError` (a ``ValueError``) describing what is wrong."""
    try:
        out = _decoder.decode(raw)
    except msgspec.ValidationError as e:
        raise CommandOutputError(f"invalid answer: {e}: {_clip(raw)}") from None
    except msgspec.DecodeError as e:
        raise CommandOutputError(f"answer is not JSON ({e}): {_clip(raw)}") from None
    sc = out.short_circuit
    if sc is not None:
        if out.set_headers:
            raise CommandOutputError("answer has both set_headers and short_circuit; "
                                     "give one")
        hdrs = _checked_headers(sc.headers or {}, "$.short_circuit.headers")
        if sc.body and not any(k.lower() == "content-type" for k, _ in hdrs):
            hdrs.append(("content-type", b"text/plain; charset=utf-8"))
        return None, Response(sc.status, sc.body, hdrs)
    if out.set_headers:
        return _checked_headers(out.set_headers, "$.set_headers"), None
    return None, None


def _clip(raw: bytes, n: int = 200) -> str:
    s = repr(raw[:n])
    return s + (f" ... ({len(raw)} bytes)" if len(raw) > n else "")


def _headers_dict(h: Headers) -> dict[str, str]:
    """The head as the program sees it: lowercase names, repeated fields joined."""
    d: dict[str, str] = {}
    for k, v in h.raw:
        name = k.decode("latin-1").lower()
        val = v.decode("latin-1")
        old = d.get(name)
        d[name] = val if old is None else old + ("; " if name == "cookie" else ", ") + val
    return d


# ------------------------------------------------------------------------------ the pool

class _Slot:
    """One place in the pool; in persistent mode it owns at most one process."""

    __slots__ = ("proc", "fresh", "used")

    def __init__(self) -> None:
        self.proc: asyncio.subprocess.Process | None = None
        self.fresh = True    # the current process has not answered yet
        self.used = False    # a process was started here before (a new one is a restart)


class _RateLimit:
    __slots__ = ("tokens", "last", "dropped")

    def __init__(self) -> None:
        self.tokens = _LOG_BURST
        self.last = time.monotonic()
        self.dropped = 0

    def allow(self) -> bool:
        now = time.monotonic()
        self.tokens = min(_LOG_BURST, self.tokens + (now - self.last) * _LOG_RATE)
        self.last = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        self.dropped += 1
        return False


def _signal_group(proc: asyncio.subprocess.Process, sig: int) -> None:
    """Signal ``proc``'s process group (it leads its own session), while it is unreaped."""
    if proc.returncode is not None:
        return  # reaped: its pid may already belong to someone else
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass
    except PermissionError:
        try:
            os.kill(proc.pid, sig)
        except ProcessLookupError:
            pass


def _reap_now(procs: list[asyncio.subprocess.Process], grace: float) -> None:
    """Synchronous SIGTERM → grace → SIGKILL → waitpid, for when no loop can reap."""
    pending = {}
    for p in procs:
        if p.returncode is None:
            pending[p.pid] = p
            _signal_group(p, signal.SIGTERM if grace > 0 else signal.SIGKILL)
    deadline = time.monotonic() + grace
    while pending:
        for pid in list(pending):
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:  # reaped by someone else (a watcher thread)
                done = pid
            if done:
                del pending[pid]
        if not pending:
            break
        if time.monotonic() >= deadline:
            for pid in pending:
                try:
                    os.killpg(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            for pid in pending:
                try:
                    os.waitpid(pid, 0)
                except ChildProcessError:
                    pass
            break
        time.sleep(0.005)
    for p in procs:
        # Their loop cannot close the pipes any more (it is closed or not running): close
        # the transport now, so that its finaliser does not try to on a dead loop.
        transport = getattr(p, "_transport", None)
        if transport is not None:
            try:
                transport.close()
            except Exception:  # noqa: BLE001 - RuntimeError('Event loop is closed')
                pass


class CommandFilter(Filter):
    """Runs an external program per request and/or response (docs/plugins-command.md)."""

    name = "command"
    Config = CommandConfig

    def __init__(self, config: CommandConfig, ctx: BuildContext, exec_path: str,
                 env: dict[str, str]):
        super().__init__(config, ctx)
        self._exec = exec_path
        self._args = tuple(config.args)
        self._env = env
        self._persistent = config.mode == "persistent"
        self._timeout = config.timeout_ms / 1000.0
        self._first_timeout = max(config.timeout_ms, config.start_timeout_ms) / 1000.0
        self._grace = config.term_grace_ms / 1000.0
        self._limit = config.max_output_bytes
        self._logger = ctx.logger or _log
        self._metrics = ctx.metrics
        self._observe = getattr(ctx.metrics, "observe_ms", None) if ctx.metrics else None
        self._labels = (("plugin", self.instance_name),)
        # the pool (bound to a loop on first use)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._free: list[_Slot] = []
        self._waiters: deque[asyncio.Future] = deque()
        self._procs: set[asyncio.subprocess.Process] = set()
        self._tasks: set[asyncio.Task] = set()
        self._reaper: asyncio.Future | None = None
        self._closed = False
        self._stderr_limit = _RateLimit()
        # counters tests and the admin API may read
        self.calls = 0
        self.timeouts = 0
        self.errors = 0
        self.restarts = 0
        self.spawned = 0

    @classmethod
    def build(cls, config: CommandConfig, ctx: BuildContext) -> "CommandFilter":
        name = ctx.instance_name or cls.name
        real = os.path.realpath(config.exec)
        allowed = {os.path.realpath(p) for p in config.exec_allowlist}
        if real not in allowed:
            raise ValueError(
                f"command plugin {name!r}: exec {config.exec!r} (resolves to {real!r}) is "
                f"not in exec_allowlist {list(config.exec_allowlist)!r}"
                + ("" if config.exec_allowlist else " (empty: list the program's path)"))
        if not os.path.isfile(real) or not os.access(real, os.X_OK):
            raise ValueError(f"command plugin {name!r}: exec {config.exec!r} (resolves to "
                             f"{real!r}) is not an executable file")
        env = {"PATH": os.environ.get("PATH", os.defpath),
               "LANG": os.environ.get("LANG", "C.UTF-8")}
        for k, v in config.env.items():
            if not k or "=" in k or "\0" in k or "\0" in v:
                raise ValueError(f"command plugin {name!r}: invalid env entry {k!r}")
            env[k] = v
        return cls(config, ctx, real, env)

    # -- hooks ---------------------------------------------------------------------------

    async def on_request(self, req: Request) -> Response | None:
        set_headers, resp = await self.call({
            "stage": "request", "method": req.method, "path": req.path,
            "query": req.query, "headers": _headers_dict(req.headers),
            "client_ip": req.client_ip})
        if set_headers:
            for k, v in set_headers:
                req.headers.set(k, v)
        return resp

    async def on_response(self, req: Request, resp: ResponseHead) -> Response | None:
        set_headers, replacement = await self.call({
            "stage": "response", "status": resp.status,
            "headers": _headers_dict(resp.headers), "method": req.method,
            "path": req.path})
        if set_headers:
            for k, v in set_headers:
                resp.headers.set(k, v)
        return replacement

    # -- calls ---------------------------------------------------------------------------

    async def call(self, message: dict[str, Any]
                   ) -> tuple[list[tuple[str, bytes]] | None, Response | None]:
        """Send ``message`` to the program; its parsed answer (see :func:`parse_output`)."""
        self.calls += 1
        try:
            if self._closed:
                raise CommandError(f"command plugin {self.instance_name!r} is closed",
                                   "closed")
            self._bind_loop()
            payload = _encoder.encode(message) + b"\n"
            slot = await self._acquire()
            t0 = time.monotonic()
            try:
                if self._persistent:
                    raw = await self._exchange(slot, payload)
                else:
                    raw = await self._oneshot(payload)
            finally:
                self._release(slot)
                if self._observe is not None:
                    self._observe(M_DURATION, self._labels, (time.monotonic() - t0) * 1e3)
            try:
                return parse_output(raw)
            except CommandOutputError as e:
                raise CommandOutputError(f"command plugin {self.instance_name!r}: {e}") \
                    from None
        except CommandError as e:
            self._count_error(e.kind)
            raise

    def _count_error(self, kind: str) -> None:
        self.errors += 1
        m = self._metrics
        if kind == "timeout":
            self.timeouts += 1
            if m is not None:
                m.inc(M_TIMEOUTS, self._labels)
        if m is not None:
            m.inc(M_ERRORS, self._labels + (("kind", kind),))

    def _bind_loop(self) -> None:
        loop = asyncio.get_running_loop()
        if loop is self._loop:
            return
        if self._loop is not None:
            # A new loop (tests, or a restarted worker loop): the old loop's transports
            # are unusable, so its processes are killed and reaped here.
            old = [p for p in self._procs if p.returncode is None]
            _reap_now(old, 0.0)
            self._procs.clear()
            self._tasks = set()
            for w in self._waiters:
                if not w.done():
                    w.cancel()
        self._loop = loop
        self._free = [_Slot() for _ in range(self.config.max_concurrency)]
        self._waiters = deque()

    async def _acquire(self) -> _Slot:
        if self._free:
            return self._free.pop()  # LIFO: keep the warm processes busy
        if len(self._waiters) >= self.config.max_queue:
            raise CommandError(f"command plugin {self.instance_name!r}: all "
                               f"{self.config.max_concurrency} processes busy and "
                               f"{len(self._waiters)} calls queued (max_queue)", "queue_full")
        fut = self._loop.create_future()
        self._waiters.append(fut)
        try:
            return await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self._release(fut.result())  # handed a slot, then cancelled: pass it on
            else:
                try:
                    self._waiters.remove(fut)
                except ValueError:
                    pass
            raise

    def _release(self, slot: _Slot) -> None:
        if self._closed:
            return
        while self._waiters:
            w = self._waiters.popleft()
            if not w.done():
                w.set_result(slot)
                return
        self._free.append(slot)

    async def _spawn(self) -> asyncio.subprocess.Process:
        if self._procs:
            self._procs = {p for p in self._procs if p.returncode is None}
        try:
            proc = await asyncio.create_subprocess_exec(
                self._exec, *self._args, stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                env=self._env, start_new_session=True, limit=self._limit + 1)
        except OSError as e:
            raise CommandError(f"command plugin {self.instance_name!r}: cannot start "
                               f"{self._exec!r}: {e}", "spawn") from None
        self.spawned += 1
        self._track(self._drain_stderr(proc))
        if self._closed:  # closed while we were starting it
            self._kill(proc)
            raise CommandError(f"command plugin {self.instance_name!r} is closed", "closed")
        self._procs.add(proc)
        return proc

    def _kill(self, proc: asyncio.subprocess.Process) -> None:
        """Kill a process that can no longer be trusted. The loop's child watcher reaps
        it; a task awaits its end so that its transport closes its pipes on this loop."""
        _signal_group(proc, signal.SIGKILL)
        self._track(proc.wait())

    def _track(self, coro) -> None:
        t = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    async def _exchange(self, slot: _Slot, payload: bytes) -> bytes:
        """One line out, one line back, on the slot's persistent process."""
        proc = slot.proc
        if proc is None or proc.returncode is not None:
            if slot.used:
                self.restarts += 1
                if proc is not None:  # it died between calls
                    self._track(proc.wait())
                    self._logger.warning("command plugin %s: process %d exited (status "
                                         "%s); restarting", self.instance_name, proc.pid,
                                         proc.returncode)
            slot.proc = None
            slot.used = True
            slot.fresh = True
            proc = slot.proc = await self._spawn()
        timeout = self._first_timeout if slot.fresh else self._timeout
        try:
            async with asyncio.timeout(timeout):
                proc.stdin.write(payload)
                await proc.stdin.drain()
                line = await proc.stdout.readline()
        except TimeoutError:
            self._drop(slot)
            raise CommandTimeout(f"command plugin {self.instance_name!r}: no answer from "
                                 f"pid {proc.pid} within {timeout * 1e3:.0f} ms; "
                                 f"killed") from None
        except ValueError:  # StreamReader limit: a line longer than max_output_bytes
            self._drop(slot)
            raise CommandOutputError(f"command plugin {self.instance_name!r}: answer "
                                     f"longer than max_output_bytes={self._limit}; pid "
                                     f"{proc.pid} killed") from None
        except (ConnectionError, OSError) as e:
            self._drop(slot)
            raise CommandError(f"command plugin {self.instance_name!r}: pid {proc.pid} "
                               f"gone ({type(e).__name__}: {e})", "exited") from None
        except BaseException:  # cancelled mid-call: the pipe is out of step now
            self._drop(slot)
            raise
        if not line.endswith(b"\n"):
            self._drop(slot)
            try:  # for the message only: the exit status, when it comes at once
                await asyncio.wait_for(proc.wait(), 0.05)
            except (TimeoutError, asyncio.TimeoutError):
                pass
            raise CommandError(f"command plugin {self.instance_name!r}: pid {proc.pid} "
                               f"closed stdout before answering"
                               + (f" (exit status {proc.returncode})"
                                  if proc.returncode is not None else ""), "exited")
        slot.fresh = False
        return line

    def _drop(self, slot: _Slot) -> None:
        if slot.proc is not None:
            self._kill(slot.proc)
            slot.proc = None

    async def _oneshot(self, payload: bytes) -> bytes:
        """The original protocol: one process, JSON on stdin, stdin closed, stdout to EOF."""
        proc = await self._spawn()
        try:
            async with asyncio.timeout(self._timeout):
                try:
                    proc.stdin.write(payload)
                    await proc.stdin.drain()
                    proc.stdin.close()
                except (ConnectionError, OSError):
                    pass  # it did not read its input; its output decides
                chunks, size = [], 0
                while True:
                    chunk = await proc.stdout.read(65536)
                    if not chunk:
                        break
                    size += len(chunk)
                    if size > self._limit:
                        raise CommandOutputError(
                            f"command plugin {self.instance_name!r}: answer longer than "
                            f"max_output_bytes={self._limit}")
                    chunks.append(chunk)
                status = await proc.wait()
        except TimeoutError:
            raise CommandTimeout(f"command plugin {self.instance_name!r}: pid {proc.pid} "
                                 f"did not finish within {self._timeout * 1e3:.0f} ms; "
                                 f"killed") from None
        finally:
            if proc.returncode is None:
                self._kill(proc)
        if status != 0:
            raise CommandError(f"command plugin {self.instance_name!r}: pid {proc.pid} "
                               f"exited with status {status}", "exited")
        return b"".join(chunks)

    async def _drain_stderr(self, proc: asyncio.subprocess.Process) -> None:
        """Read stderr until EOF (so the pipe never fills); log lines at a bounded rate."""
        stream, pid = proc.stderr, proc.pid
        buf, skipping = b"", False
        try:
            while True:
                chunk = await stream.read(65536)
                if not chunk:
                    break
                buf += chunk
                *lines, buf = buf.split(b"\n")
                for line in lines:
                    if skipping:
                        skipping = False
                        continue
                    self._log_stderr(pid, line)
                if len(buf) > _LOG_LINE_MAX:
                    if not skipping:
                        self._log_stderr(pid, buf[:_LOG_LINE_MAX] + b"...")
                    buf, skipping = b"", True
            if buf and not skipping:
                self._log_stderr(pid, buf)
        except (asyncio.CancelledError, Exception):  # noqa: BLE001 - never let a log task fail
            pass

    def _log_stderr(self, pid: int, line: bytes) -> None:
        lim = self._stderr_limit
        if not lim.allow():
            return
        text = line.decode("utf-8", "replace").rstrip()
        if lim.dropped:
            text += f" ({lim.dropped} stderr lines dropped before this one)"
            lim.dropped = 0
        self._logger.warning("command plugin %s [pid %d] stderr: %s", self.instance_name,
                             pid, text)

    # -- shutdown ------------------------------------------------------------------------

    def close(self) -> None:
        """Terminate every process: SIGTERM to its group, SIGKILL after ``term_grace_ms``.

        On the loop's thread, while the loop runs, this returns at once and the reaping
        goes on in a task (``await wait_closed()``); without a running loop it blocks for
        at most the grace period and reaps the children itself."""
        if self._closed:
            return
        self._closed = True
        self._free = []
        for w in self._waiters:
            if not w.done():
                w.set_exception(CommandError(f"command plugin {self.instance_name!r} "
                                             f"closed while this call waited", "closed"))
        self._waiters.clear()
        procs = [p for p in self._procs if p.returncode is None]
        self._procs.clear()
        if not procs:
            return
        loop = self._loop
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if loop is not None and running is loop:
            self._reaper = loop.create_task(self._reap(procs))
        elif loop is not None and loop.is_running():  # called from another thread
            fut = asyncio.run_coroutine_threadsafe(self._reap(procs), loop)
            self._reaper = asyncio.wrap_future(fut, loop=loop)
        elif loop is not None and not loop.is_closed() and running is None:
            loop.run_until_complete(self._reap(procs))
        else:
            _reap_now(procs, self._grace)

    async def _reap(self, procs: list[asyncio.subprocess.Process]) -> None:
        for p in procs:
            _signal_group(p, signal.SIGTERM)
        waits = [asyncio.ensure_future(p.wait()) for p in procs]
        try:
            _, pending = await asyncio.wait(waits, timeout=self._grace)
            if pending:
                for p in procs:
                    _signal_group(p, signal.SIGKILL)
                await asyncio.wait(pending, timeout=5.0)
        except asyncio.CancelledError:  # the loop is shutting down: do not leave them
            for p in procs:
                _signal_group(p, signal.SIGKILL)
            raise

    async def wait_closed(self) -> None:
        """After :meth:`close`: return once every process has exited and been reaped."""
        if self._reaper is not None:
            await self._reaper
        # the stderr readers end at EOF, and the waits of killed processes at their exit
        deadline = time.monotonic() + 5.0
        while self._tasks and time.monotonic() < deadline:
            await asyncio.wait(list(self._tasks), timeout=deadline - time.monotonic())

    def __repr__(self) -> str:
        return (f"<CommandFilter {self.instance_name} {self.config.mode} exec="
                f"{self._exec!r} calls={self.calls} errors={self.errors}>")
