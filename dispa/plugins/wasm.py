"""WASM plugins: a filter whose hooks run a WebAssembly module under wasmtime (``type = "wasm"``).

Theory of operation
-------------------
The module speaks the original Dispa ABI (docs/plugins-wasm.md)::

    memory                                   exported linear memory
    alloc(len: i32) -> ptr: i32              a buffer for the host to write into
    dealloc(ptr: i32, len: i32)              give a buffer back
    dispa_on_request(ptr: i32, len: i32) -> result_ptr: i32
    dispa_on_response(ptr: i32, len: i32) -> result_ptr: i32      (optional)
    dispa_get_result_len() -> i32            length of the last result

One hook call is one *exchange*: the host encodes a JSON document (the command plugin's
shape), ``alloc``s a buffer, writes the document, calls the hook, reads
``dispa_get_result_len()`` bytes at the returned pointer, ``dealloc``s both buffers and
applies the result (``{"set_headers": {...}}``, ``{"short_circuit": {...}}`` or ``{}``;
a result pointer or length of 0 means "no change").

Build once, run bounded:

* ``build`` reads and compiles the module once (a process-wide cache keyed by the file's
  SHA-256, so a reload with an unchanged module does not recompile), checks its imports and
  the exports' signatures, and instantiates the first pool slot. Every problem is a
  ``ValueError`` naming the file or the export, so the snapshot is refused at config time.
* Each slot is a ``Store`` + ``Instance``. The store caps linear memory
  (``max_memory_bytes``, ``Store.set_limits``); each exchange gets ``fuel`` instructions
  (``Store.set_fuel``) and an epoch deadline of ``timeout_ms`` ticks of 1 ms
  (``Store.set_epoch_deadline``). The epoch is advanced by one process-wide ticker thread
  (``_Ticker``), which runs only while exchanges are being made (and half a second
  after), so an idle worker pays nothing. Fuel stops runaway loops deterministically; the
  epoch stops a module whose fuel budget is large but whose wall time is not (e.g. a slow
  host), so an exchange never runs much past ``timeout_ms`` (1 ms ticks plus the ticker's
  wake-up latency).
* Calls go straight to wasmtime's C API through ctypes (``_FastSlot``, ~3 µs a call),
  falling back to the public ``Func.__call__`` (``_Slot``, 25-70 µs) if wasmtime-py's
  internals change.
* A failed exchange raises a :class:`WasmError` subclass whose ``kind`` the chain counts:
  ``trap``, ``fuel``, ``memory``, ``timeout``, ``abi``, ``bad_output``. The slot is then
  discarded (a trapped instance may be half-updated: a bump pointer advanced, a lock
  held) and the next exchange instantiates a fresh one from the compiled module.
* The pool keeps at most ``max_concurrency`` live instances. Slots are taken and returned
  under a lock, so a filter instance may be called from several threads; in a worker the
  hooks run in the event-loop thread and a single slot is in use at a time.

Why the hooks are synchronous and run in the event-loop thread: an exchange is short CPU
work (tens of microseconds for a small module) bounded by fuel *and* by ``timeout_ms``.
Handing it to a thread pool would cost a thread hop and a future per request, about as much
as the call itself, and would buy no isolation that fuel and the epoch do not already give.
The price is that a pathological module stalls its worker's loop for at most
``timeout_ms``; keep that small (docs/plugins-wasm.md).

Memory classification: wasmtime's C API does not report a denied ``memory.grow`` (it just
returns -1 to the module, which then usually traps or returns a null pointer). A failure is
therefore classified ``memory`` when the instance's memory cannot grow by one more page
within the cap, or when ``alloc`` itself failed (a trap, a null or out-of-range pointer):
allocation failure is what a module does when it runs out of memory.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import threading
import time
from collections import OrderedDict, deque
from typing import Annotated, Any

import msgspec
from msgspec import Meta

from dispa.errors import DispaError
from dispa.plugins.api import (BuildContext, Filter, Headers, Request, Response,
                               ResponseHead)

__all__ = [
    "WasmFilter", "WasmConfig", "WasmError", "WasmTrap", "WasmFuelExhausted",
    "WasmMemoryExceeded", "WasmTimeout", "WasmABIError", "WasmBadOutput",
    "request_document", "response_document",
]

MiB = 1024 * 1024
WASM_PAGE = 65536
TICK_SECONDS = 0.001  # one epoch tick; timeout_ms is counted in ticks


# ------------------------------------------------------------------------------ config

class WasmConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """``[[plugins.plugins]] type = "wasm"`` settings (the ``config`` table)."""

    # The module: a binary .wasm file, or WebAssembly text (.wat). Relative paths are
    # resolved against the worker's working directory.
    module_path: Annotated[str, Meta(min_length=1)]
    # Wall-clock bound of one exchange (alloc + hook + dealloc), in milliseconds.
    timeout_ms: Annotated[int, Meta(ge=1, le=60_000)] = 200
    # Most instances alive at once (one per concurrent exchange).
    max_concurrency: Annotated[int, Meta(ge=1, le=1024)] = 16
    # Instructions budget of one exchange (wasmtime fuel; ~1 unit per wasm instruction).
    fuel: Annotated[int, Meta(ge=1, le=(1 << 63) - 1)] = 10_000_000
    # Cap on an instance's linear memory, in bytes.
    max_memory_bytes: Annotated[int, Meta(ge=WASM_PAGE, le=4 * 1024 * MiB)] = 16 * MiB
    # Longest result JSON accepted, in bytes.
    max_result_bytes: Annotated[int, Meta(ge=2, le=64 * MiB)] = 64 * 1024


# ------------------------------------------------------------------------------ errors

class WasmError(DispaError):
    """A WASM exchange failed. ``kind`` says how; the chain counts errors by it."""

    kind: str = "wasm"
    status_hint = 500

    def __init__(self, message: str, *, plugin: str = ""):
        self.plugin = plugin
        super().__init__(f"wasm plugin {plugin!r}: {message}" if plugin else message)


class WasmTrap(WasmError):
    """The module trapped (unreachable, out-of-bounds access, stack overflow, ...)."""
    kind = "trap"


class WasmFuelExhausted(WasmError):
    """The exchange used up its ``fuel`` budget (a runaway loop)."""
    kind = "fuel"


class WasmMemoryExceeded(WasmError):
    """The module needed more linear memory than ``max_memory_bytes``."""
    kind = "memory"


class WasmTimeout(WasmError):
    """The exchange ran past ``timeout_ms`` (stopped by the epoch deadline)."""
    kind = "timeout"


class WasmABIError(WasmError):
    """The module broke the ABI: a bad ``alloc`` pointer, a failed instantiation."""
    kind = "abi"


class WasmBadOutput(WasmError):
    """The result was not valid: bad bounds, too long, not JSON, wrong shape."""
    kind = "bad_output"


# ------------------------------------------------------------------------------ runtime

_wt: Any = None


def _wasmtime():
    """The ``wasmtime`` module, imported on first use: Dispa runs without it until a
    snapshot names a wasm plugin."""
    global _wt
    if _wt is None:
        try:
            import wasmtime
        except ImportError:  # pragma: no cover - depends on the install
            raise ValueError("the wasm plugin needs the 'wasmtime' package "
                             "(pip install wasmtime)") from None
        _wt = wasmtime
    return _wt


class _Ticker:
    """Advances the engine's epoch every ``TICK_SECONDS`` while exchanges are running.

    ``enter``/``leave`` bracket each exchange. The thread ticks while an exchange is in
    flight or one ended less than ``LINGER`` seconds ago, and parks on an event after
    that, so an idle worker pays nothing while a busy one does not wake the thread for
    every exchange (a wake-up per exchange costs more GIL hand-offs than the exchange).
    Ticks are scheduled on the monotonic clock and missed ones are caught up, so the epoch
    tracks wall time even when the thread wakes late (e.g. waiting for the GIL, which the
    wasm code itself does not hold).
    """

    LINGER = 0.5

    def __init__(self, engine) -> None:
        self._engine = engine
        self._after_fork()

    def _after_fork(self) -> None:
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._busy = 0
        self._last = 0.0
        self._running = False
        self._thread: threading.Thread | None = None

    def enter(self) -> None:
        with self._lock:
            self._busy += 1
            if not self._running:
                self._running = True
                self._wake.set()
                if self._thread is None:
                    self._thread = threading.Thread(target=self._run, name="dispa-wasm-epoch",
                                                    daemon=True)
                    self._thread.start()

    def leave(self) -> None:
        with self._lock:
            self._busy -= 1
            self._last = time.monotonic()

    def _run(self) -> None:
        engine, monotonic, sleep = self._engine, time.monotonic, time.sleep
        wake, lock = self._wake, self._lock
        while True:
            wake.wait()
            wake.clear()
            due = monotonic() + TICK_SECONDS
            while True:
                delay = due - monotonic()
                if delay > 0:
                    sleep(delay)
                now = monotonic()
                while due <= now:  # catch up ticks missed while descheduled
                    engine.increment_epoch()
                    due += TICK_SECONDS
                if self._busy == 0 and now - self._last > self.LINGER:
                    with lock:
                        if self._busy == 0:
                            self._running = False
                            break


class _Runtime:
    """The process's wasmtime engine (fuel + epochs enabled), ticker and module cache."""

    CACHE_SIZE = 8

    def __init__(self) -> None:
        wt = _wasmtime()
        cfg = wt.Config()
        cfg.consume_fuel = True
        cfg.epoch_interruption = True
        # rayon's compile threads do not survive fork(): a worker compiling after the
        # master compiled in parallel would hang. Plugin modules are small; compile serially.
        cfg.parallel_compilation = False
        self.engine = wt.Engine(cfg)
        self.ticker = _Ticker(self.engine)
        self._modules: OrderedDict[bytes, Any] = OrderedDict()
        self._lock = threading.Lock()

    def compile(self, wasm: bytes):
        """The compiled module for ``wasm`` (binary or text), cached by content hash."""
        key = hashlib.sha256(wasm).digest()
        with self._lock:
            module = self._modules.get(key)
            if module is not None:
                self._modules.move_to_end(key)
                return module
        module = _wasmtime().Module(self.engine, wasm)
        with self._lock:
            self._modules[key] = module
            while len(self._modules) > self.CACHE_SIZE:
                self._modules.popitem(last=False)
        return module


_runtime_lock = threading.Lock()
_runtime_obj: _Runtime | None = None


def _runtime() -> _Runtime:
    global _runtime_obj
    rt = _runtime_obj
    if rt is None:
        with _runtime_lock:
            rt = _runtime_obj
            if rt is None:
                rt = _runtime_obj = _Runtime()
    return rt


def _reset_after_fork() -> None:
    # Workers are forked from a master that may have trial-built filters (config check).
    # Threads do not survive fork, a lock may have been held at that instant, and the
    # engine's executable code memory is not usable in the child (instantiation fails
    # with EACCES, seen here): the child starts with no runtime and makes its own.
    global _runtime_lock, _runtime_obj
    _runtime_lock = threading.Lock()
    _runtime_obj = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)


# ------------------------------------------------------------------------------ ABI

_REQUIRED = {
    "alloc": (("i32",), ("i32",)),
    "dealloc": (("i32", "i32"), ()),
    "dispa_on_request": (("i32", "i32"), ("i32",)),
    "dispa_get_result_len": ((), ("i32",)),
}
_OPTIONAL = {
    "dispa_on_response": (("i32", "i32"), ("i32",)),
}


def _sig(functype) -> tuple[tuple[str, ...], tuple[str, ...]]:
    return (tuple(str(t) for t in functype.params), tuple(str(t) for t in functype.results))


def _fmt_sig(sig) -> str:
    params, results = sig
    res = f" -> {', '.join(results)}" if results else ""
    return f"({', '.join(params)}){res}"


def _check_abi(module, path: str) -> bool:
    """Raise ValueError unless ``module`` has the Dispa ABI; True if it has on_response."""
    wt = _wasmtime()
    imports = [f"{i.module}.{i.name}" for i in module.imports]
    if imports:
        raise ValueError(f"{path}: the module imports {', '.join(imports)}; Dispa WASM "
                         f"plugins get no host functions (build for wasm32-unknown-unknown)")
    exports = {e.name: e.type for e in module.exports}
    mem = exports.get("memory")
    if not isinstance(mem, wt.MemoryType):
        raise ValueError(f"{path}: missing export 'memory' (the module's linear memory)"
                         if mem is None else f"{path}: export 'memory' is not a memory")
    if mem.is_64:
        raise ValueError(f"{path}: export 'memory' is a 64-bit memory; the ABI uses i32")
    for name, want in (*_REQUIRED.items(), *_OPTIONAL.items()):
        ty = exports.get(name)
        if ty is None:
            if name in _REQUIRED:
                raise ValueError(f"{path}: missing export {name!r} {_fmt_sig(want)}")
            continue
        if not isinstance(ty, wt.FuncType):
            raise ValueError(f"{path}: export {name!r} is not a function")
        got = _sig(ty)
        if got != want:
            raise ValueError(f"{path}: export {name!r} has signature {_fmt_sig(got)}, "
                             f"expected {_fmt_sig(want)}")
    return "dispa_on_response" in exports


class _Slot:
    """One pool slot: a store with its limits and one instance, through wasmtime's public
    Python API (the portable path; ``Func.__call__`` costs ~25-70 µs a call)."""

    __slots__ = ("store", "memory", "_alloc", "_dealloc", "_hooks", "_result_len")

    def __init__(self, engine, module, cfg: WasmConfig, ticks: int):
        wt = _wasmtime()
        store = wt.Store(engine)
        store.set_limits(memory_size=cfg.max_memory_bytes)
        # the start function (if any) runs under the same bounds as an exchange
        store.set_fuel(cfg.fuel)
        store.set_epoch_deadline(ticks)
        inst = wt.Instance(store, module, [])
        ex = inst.exports(store)
        self.store = store
        self.memory = ex["memory"]
        self._alloc = ex["alloc"]
        self._dealloc = ex["dealloc"]
        self._hooks = {"on_request": ex["dispa_on_request"],
                       "on_response": ex.get("dispa_on_response")}
        self._result_len = ex["dispa_get_result_len"]

    def budget(self, fuel: int, ticks: int) -> None:
        self.store.set_fuel(fuel)
        self.store.set_epoch_deadline(ticks)

    def alloc(self, n: int) -> int:
        return self._alloc(self.store, n) & 0xFFFFFFFF

    def dealloc(self, ptr: int, n: int) -> None:
        self._dealloc(self.store, ptr, n)

    def hook(self, hook: str, ptr: int, n: int) -> int:
        return self._hooks[hook](self.store, ptr, n) & 0xFFFFFFFF

    def result_len(self) -> int:
        return self._result_len(self.store) & 0xFFFFFFFF

    def mem_len(self) -> int:
        return self.memory.data_len(self.store)

    def write(self, ptr: int, data: bytes) -> None:
        self.memory.write(self.store, data, ptr)

    def read(self, ptr: int, n: int) -> bytes:
        return bytes(self.memory.read(self.store, ptr, ptr + n))


class _FastSlot(_Slot):
    """The same slot, calling the C API through ctypes directly (~3 µs a call).

    The exports' signatures were checked at build, so ``wasmtime_func_call_unchecked``
    with a two-slot ``wasmtime_val_raw_t`` array is safe; a trap comes back as the same
    ``wasmtime.Trap`` the public API raises. This uses wasmtime-py internals
    (``_bindings``, ``Store._context``, ``Func._func``, ``Memory._memory``); if a wasmtime
    release changes them, ``_make_slot`` falls back to :class:`_Slot`.
    """

    __slots__ = ("_ctx", "_vals", "_trap", "_trap_ref", "_refs", "_mem_ref")

    def __init__(self, engine, module, cfg: WasmConfig, ticks: int):
        super().__init__(engine, module, cfg, ticks)
        self._ctx = self.store._context()
        self._vals = (_B.wasmtime_val_raw_t * 2)()
        self._trap = ctypes.POINTER(_B.wasm_trap_t)()
        self._trap_ref = ctypes.byref(self._trap)
        self._mem_ref = ctypes.byref(self.memory._memory)
        self._refs = {"alloc": ctypes.byref(self._alloc._func),
                      "dealloc": ctypes.byref(self._dealloc._func),
                      "result_len": ctypes.byref(self._result_len._func)}
        for name, fn in self._hooks.items():
            if fn is not None:
                self._refs[name] = ctypes.byref(fn._func)

    def _call(self, name: str, nargs: int, a: int = 0, b: int = 0) -> int:
        vals = self._vals
        vals[0].i32 = a
        vals[1].i32 = b
        err = _call_unchecked(self._ctx, self._refs[name], vals, nargs, self._trap_ref)
        if err:
            raise _wasmtime().WasmtimeError._from_ptr(err)
        if self._trap:
            trap = _wasmtime().Trap._from_ptr(self._trap)  # takes ownership
            self._trap = ctypes.POINTER(_B.wasm_trap_t)()
            self._trap_ref = ctypes.byref(self._trap)
            raise trap
        return vals[0].i32 & 0xFFFFFFFF

    def budget(self, fuel: int, ticks: int) -> None:
        err = _set_fuel(self._ctx, fuel)
        if err:
            raise _wasmtime().WasmtimeError._from_ptr(err)
        _set_epoch_deadline(self._ctx, ticks)

    def alloc(self, n: int) -> int:
        return self._call("alloc", 1, n)

    def dealloc(self, ptr: int, n: int) -> None:
        self._call("dealloc", 2, ptr, n)

    def hook(self, hook: str, ptr: int, n: int) -> int:
        return self._call(hook, 2, ptr, n)

    def result_len(self) -> int:
        return self._call("result_len", 1)

    def mem_len(self) -> int:
        return _mem_size(self._ctx, self._mem_ref)

    def _base(self) -> int:
        # fetched on every access: memory.grow may move the memory
        return _mem_data(self._ctx, self._mem_ref) or 0

    def write(self, ptr: int, data: bytes) -> None:
        ctypes.memmove(self._base() + ptr, data, len(data))

    def read(self, ptr: int, n: int) -> bytes:
        return ctypes.string_at(self._base() + ptr, n)


_B: Any = None
_call_unchecked = _set_fuel = _set_epoch_deadline = _mem_data = _mem_size = None
FAST_CALLS = True  # False forces the portable path (tests run both)


def _make_slot(engine, module, cfg: WasmConfig, ticks: int) -> _Slot:
    global _B, _call_unchecked, _set_fuel, _set_epoch_deadline, _mem_data, _mem_size
    if FAST_CALLS:
        if _B is None:
            try:
                from wasmtime import _bindings as b
                _call_unchecked = b._wasmtime_func_call_unchecked
                _set_fuel = b._wasmtime_context_set_fuel
                _set_epoch_deadline = b._wasmtime_context_set_epoch_deadline
                # our own pointer to the symbol, returning the address as an int
                _mem_data = type(b._wasmtime_memory_data)(("wasmtime_memory_data", b.dll))
                _mem_data.argtypes = b._wasmtime_memory_data.argtypes
                _mem_data.restype = ctypes.c_void_p
                _mem_size = b._wasmtime_memory_data_size
                b.wasmtime_val_raw_t, b.wasm_trap_t  # noqa: B018 - presence check
                _B = b
            except (ImportError, AttributeError):
                _B = False
        if _B:
            try:
                return _FastSlot(engine, module, cfg, ticks)
            except AttributeError:  # internals renamed: stay correct, just slower
                _B = False
    return _Slot(engine, module, cfg, ticks)


# ------------------------------------------------------------------------------ documents

def _headers_dict(headers: Headers) -> dict[str, str]:
    """Lower-case names; repeated fields joined with ", " ("; " for cookie), as the
    command plugin does."""
    out: dict[str, str] = {}
    for k, v in headers.raw:
        name = k.decode("latin-1").lower()
        value = v.decode("latin-1")
        prev = out.get(name)
        out[name] = value if prev is None else (
            prev + ("; " if name == "cookie" else ", ") + value)
    return out


def request_document(req: Request) -> bytes:
    """The JSON document ``dispa_on_request`` receives."""
    return _encode({
        "stage": "request",
        "method": req.method,
        "path": req.path,
        "query": req.query,
        "headers": _headers_dict(req.headers),
        "client_ip": req.client_ip,
        "host": req.host,
        "scheme": req.scheme,
        "route": req.route,
        "request_id": req.request_id,
    })


def response_document(req: Request, resp: ResponseHead) -> bytes:
    """The JSON document ``dispa_on_response`` receives."""
    return _encode({
        "stage": "response",
        "status": resp.status,
        "headers": _headers_dict(resp.headers),
        "method": req.method,
        "path": req.path,
        "query": req.query,
        "client_ip": req.client_ip,
        "host": req.host,
        "route": req.route,
        "request_id": req.request_id,
    })


_encode = msgspec.json.Encoder().encode


class _ShortCircuit(msgspec.Struct, frozen=True):
    status: int
    body: str = ""
    headers: dict[str, str] = {}


class _Result(msgspec.Struct, frozen=True):
    # unknown keys are ignored: a module written for a later ABI still works here
    set_headers: dict[str, str] | None = None
    short_circuit: _ShortCircuit | None = None


_decode_result = msgspec.json.Decoder(_Result).decode


# ------------------------------------------------------------------------------ the filter

class WasmFilter(Filter):
    """Runs a WebAssembly module's ``dispa_on_request`` / ``dispa_on_response``."""

    name = "wasm"
    Config = WasmConfig

    def __init__(self, config: WasmConfig, ctx: BuildContext, *, module, path: str):
        super().__init__(config, ctx)
        self.path = path
        self._module = module
        self._runtime = _runtime()
        self._ticker = self._runtime.ticker
        self._fuel = config.fuel
        self._ticks = config.timeout_ms  # one tick = 1 ms
        self._max_result = config.max_result_bytes
        self._max_live = config.max_concurrency
        self._lock = threading.Lock()
        self._idle: list[_Slot] = []
        self._waiters: deque[_Waiter] = deque()
        self._live = 0
        self._closed = False
        self.instantiations = 0  # fresh instances made (1 at build, +1 after each failure)

    @classmethod
    def build(cls, config: WasmConfig, ctx: BuildContext) -> "WasmFilter":
        path = os.path.abspath(config.module_path)
        try:
            with open(path, "rb") as f:
                wasm = f.read()
        except FileNotFoundError:
            raise ValueError(f"wasm module not found: {path}") from None
        except OSError as exc:
            raise ValueError(f"cannot read wasm module {path}: {exc.strerror or exc}") from None
        wt = _wasmtime()
        rt = _runtime()
        try:
            module = rt.compile(wasm)
        except wt.WasmtimeError as exc:
            raise ValueError(f"{path}: not a valid WebAssembly module: "
                             f"{_first_line(exc)}") from None
        has_response = _check_abi(module, path)
        klass = cls if has_response else _request_only(cls)
        self = klass(config, ctx, module=module, path=path)
        try:
            slot = self._new_slot()
        except WasmError as exc:
            raise ValueError(f"{path}: cannot instantiate: {exc}") from None
        self._idle.append(slot)
        self._live = 1
        return self

    def close(self) -> None:
        """Drop the idle instances. Exchanges still in flight (or started later by a
        request of the old snapshot) still work; their instances are dropped after use."""
        with self._lock:
            self._closed = True
            self._live -= len(self._idle)
            self._idle.clear()

    # -- hooks ------------------------------------------------------------------------------

    def on_request(self, req: Request) -> Response | None:
        result = self._exchange("on_request", request_document(req))
        return None if result is None else self._apply(result, req.headers)

    def on_response(self, req: Request, resp: ResponseHead) -> Response | None:
        result = self._exchange("on_response", response_document(req, resp))
        return None if result is None else self._apply(result, resp.headers)

    # -- machinery ------------------------------------------------------------------------

    def _apply(self, raw: bytes, headers: Headers) -> Response | None:
        try:
            result = _decode_result(raw)
        except msgspec.DecodeError as exc:  # ValidationError is a DecodeError
            raise WasmBadOutput(f"result is not a valid result document: {exc}; "
                                f"got {_preview(raw)}", plugin=self.instance_name) from None
        try:
            sc = result.short_circuit
            if sc is not None:
                if result.set_headers:
                    raise ValueError("result has both set_headers and short_circuit; "
                                     "give one")
                resp = Response(sc.status, sc.body, sc.headers)
                if resp.body and "content-type" not in resp.headers:
                    resp.headers.add("content-type", "text/plain; charset=utf-8")
                return resp
            if result.set_headers:
                checked = Headers()
                for k, v in result.set_headers.items():  # validate all before changing any
                    checked.add(k, v)
                for k, v in checked.raw:
                    headers.set(k, v)
        except ValueError as exc:
            raise WasmBadOutput(f"result rejected: {exc}", plugin=self.instance_name) from None
        return None

    def _new_slot(self) -> _Slot:
        wt = _wasmtime()
        self._ticker.enter()
        try:
            slot = _make_slot(self._runtime.engine, self._module, self.config, self._ticks)
        except wt.Trap as exc:
            raise self._classify(exc, None, "start") from None
        except wt.WasmtimeError as exc:
            msg = _first_line(exc)
            if "memory" in msg and "limit" in msg:
                raise WasmMemoryExceeded(f"instantiation failed: {msg} (max_memory_bytes = "
                                         f"{self.config.max_memory_bytes})",
                                         plugin=self.instance_name) from None
            raise WasmABIError(f"instantiation failed: {msg}",
                               plugin=self.instance_name) from None
        finally:
            self._ticker.leave()
        self.instantiations += 1
        return slot

    def _acquire(self) -> _Slot:
        """An idle slot, or a new one while fewer than ``max_concurrency`` are alive.

        When all are busy (only possible when hooks run on several threads) the caller
        queues; a released slot is handed to the oldest waiter directly, so no thread
        starves, and a wait longer than ``timeout_ms`` fails with kind ``timeout``.
        """
        with self._lock:
            if self._idle:
                return self._idle.pop()
            if self._live < self._max_live:
                self._live += 1
                waiter = None
            else:
                waiter = _Waiter()
                self._waiters.append(waiter)
        if waiter is not None:
            waiter.event.wait(self._ticks * TICK_SECONDS)
            with self._lock:
                if not waiter.granted:
                    self._waiters.remove(waiter)
                    raise WasmTimeout(f"all {self._max_live} instances busy for "
                                      f"{self._ticks} ms", plugin=self.instance_name)
            if waiter.slot is not None:
                return waiter.slot
            # granted the place of a discarded slot: make a fresh instance
        try:
            return self._new_slot()
        except BaseException:
            self._release(None)
            raise

    def _release(self, slot: _Slot | None) -> None:
        """Give ``slot`` back; None when it was discarded (its place becomes free)."""
        with self._lock:
            if self._waiters:
                waiter = self._waiters.popleft()  # hand over: the live count is unchanged
                waiter.slot = slot
                waiter.granted = True
                waiter.event.set()
            elif slot is not None and not self._closed:
                self._idle.append(slot)
            else:
                self._live -= 1

    def _exchange(self, hook: str, doc: bytes) -> bytes | None:
        """One call of ``dispa_<hook>``: the result bytes, or None for "no change"."""
        wt = _wasmtime()
        slot = self._acquire()
        ok = False
        step = "alloc"
        self._ticker.enter()
        try:
            slot.budget(self._fuel, self._ticks)
            n = len(doc)
            ptr = slot.alloc(n)
            if ptr == 0 or ptr + n > slot.mem_len():
                raise self._bad_alloc(slot, ptr, n)
            slot.write(ptr, doc)
            step = "dispa_" + hook
            rptr = slot.hook(hook, ptr, n)
            step = "dispa_get_result_len"
            rlen = slot.result_len()
            data = None
            if rptr and rlen:
                if rlen > self._max_result:
                    raise WasmBadOutput(f"result of {rlen} bytes exceeds max_result_bytes "
                                        f"({self._max_result})", plugin=self.instance_name)
                size = slot.mem_len()
                if rptr + rlen > size:
                    raise WasmBadOutput(f"result [{rptr}, {rptr + rlen}) is outside memory "
                                        f"({size} bytes)", plugin=self.instance_name)
                data = slot.read(rptr, rlen)
            step = "dealloc"
            slot.dealloc(ptr, n)
            if data is not None:
                slot.dealloc(rptr, rlen)
            ok = True
            return data
        except wt.Trap as exc:
            raise self._classify(exc, slot, step) from None
        except wt.WasmtimeError as exc:  # e.g. fuel could not be set: a broken store
            raise WasmABIError(f"{step}: {_first_line(exc)}", plugin=self.instance_name) from None
        finally:
            self._ticker.leave()
            # any failure discards the instance: its state may be corrupt
            self._release(slot if ok else None)

    def _at_memory_cap(self, slot: _Slot | None) -> bool:
        if slot is None:
            return False
        try:
            size = slot.mem_len()
            limits = slot.memory.type(slot.store).limits
        except Exception:  # noqa: BLE001 - best effort after a trap
            return False
        if size + WASM_PAGE > self.config.max_memory_bytes:
            return True
        return limits.max is not None and size // WASM_PAGE >= limits.max

    def _bad_alloc(self, slot: _Slot, ptr: int, n: int) -> WasmError:
        size = slot.mem_len()
        if ptr == 0 or self._at_memory_cap(slot):
            return WasmMemoryExceeded(f"alloc({n}) failed (returned {ptr}; memory "
                                      f"{size} of {self.config.max_memory_bytes} bytes)",
                                      plugin=self.instance_name)
        return WasmABIError(f"alloc({n}) returned {ptr}, outside memory ({size} bytes)",
                            plugin=self.instance_name)

    def _classify(self, exc, slot: _Slot | None, step: str) -> WasmError:
        wt = _wasmtime()
        code = exc.trap_code
        where = "instantiation" if step == "start" else step
        if code == wt.TrapCode.OUT_OF_FUEL:
            return WasmFuelExhausted(f"{where}: out of fuel ({self._fuel} instructions)",
                                     plugin=self.instance_name)
        if code == wt.TrapCode.INTERRUPT:
            return WasmTimeout(f"{where}: ran past timeout_ms ({self._ticks} ms)",
                               plugin=self.instance_name)
        if self._at_memory_cap(slot):
            return WasmMemoryExceeded(f"{where} trapped at the memory cap "
                                      f"({self.config.max_memory_bytes} bytes): "
                                      f"{_trap_text(exc)}", plugin=self.instance_name)
        if step == "alloc":  # an allocator that cannot grow memory traps (Rust aborts)
            return WasmMemoryExceeded(f"alloc trapped (allocation failure): "
                                      f"{_trap_text(exc)}", plugin=self.instance_name)
        return WasmTrap(f"{where}: {_trap_text(exc)}", plugin=self.instance_name)


class _Waiter:
    __slots__ = ("event", "granted", "slot")

    def __init__(self) -> None:
        self.event = threading.Event()
        self.granted = False
        self.slot: _Slot | None = None


def _request_only(cls: type[WasmFilter]) -> type[WasmFilter]:
    """``cls`` without ``on_response``, for modules that do not export
    ``dispa_on_response``: the chain compiler then skips the hook entirely."""
    sub = _REQUEST_ONLY.get(cls)
    if sub is None:
        sub = type(cls.__name__, (cls,), {"on_response": Filter.on_response,
                                          "__module__": cls.__module__,
                                          "__qualname__": cls.__qualname__ + "[request only]"})
        _REQUEST_ONLY[cls] = sub
    return sub


_REQUEST_ONLY: dict[type, type] = {}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _trap_text(exc) -> str:
    code = exc.trap_code
    if code is not None:
        return code.name.lower().replace("_", " ")
    return _first_line(exc)


def _preview(raw: bytes, limit: int = 80) -> str:
    text = raw[:limit].decode("utf-8", "replace")
    return repr(text + ("..." if len(raw) > limit else ""))
