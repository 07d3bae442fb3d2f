"""Filter chains: compiled once per snapshot, run per request (STYLE C3/C4).

``compile_chain`` keeps, per hook, only the filters whose class overrides it (and whose
``stage`` allows it), records which are coroutine functions, and binds everything a call
needs into one small ``Entry``. The runners below are the only code that calls hooks; they
apply the error strategy and count invocations, short-circuits, errors and (for sync hooks,
one call in 16) durations into ``HookStats`` that outlive snapshots.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time

from dispa.plugins.api import Filter, HTTPError, Response, overridden_hooks

log = logging.getLogger("dispa.plugins")

REQUEST_HOOKS = ("on_request", "on_request_body", "on_upstream_request")
RESPONSE_HOOKS = ("on_response", "on_response_body")
STAGE_OF = {"on_request": "request", "on_request_body": "request",
            "on_upstream_request": "request", "on_response": "response",
            "on_response_body": "response", "on_log": "log"}
SYNC_ONLY = ("on_request_body", "on_response_body", "on_log")

_perf = time.perf_counter


class HookStats:
    """Counters of one (plugin, stage): cumulative for the worker's life."""

    __slots__ = ("calls", "short", "errors", "series")

    def __init__(self, series: list):
        self.calls = 0
        self.short = 0
        self.errors: dict[str, int] = {}
        self.series = series  # WorkerMetrics.ms_series list: [sum, counts...]

    def error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1


class StatsRegistry:
    """HookStats by (plugin, stage), kept across snapshots (metrics must not go back)."""

    def __init__(self, metrics=None):
        self.metrics = metrics
        self._stats: dict[tuple[str, str], HookStats] = {}
        self.live_runners: set = set()  # SyncRunners of the current snapshot
        if metrics is not None and hasattr(metrics, "add_collector"):
            metrics.add_collector(self.collect)

    def get(self, plugin: str, stage: str) -> HookStats:
        k = (plugin, stage)
        st = self._stats.get(k)
        if st is None:
            labels = (("plugin", plugin), ("stage", stage))
            series = (self.metrics.ms_series("dispa_plugin_duration_ms", labels)
                      if self.metrics is not None else [0.0] + [0] * 19)
            st = self._stats[k] = HookStats(series)
        return st

    def fold(self, runner: "SyncRunner") -> None:
        """Move a retired runner's counts into the HookStats (on snapshot swap)."""
        for e, n in zip(runner.entries, runner.counts()):
            e.stats.calls += n
        runner.runs = 0
        runner.stopped = [0] * len(runner.entries)

    def collect(self, counters: dict) -> None:
        """Write the cumulative counters into ``counters`` (WorkerMetrics' dict)."""
        extra: dict[tuple[str, str], int] = {}
        for runner in list(self.live_runners):
            for e, n in zip(runner.entries, runner.counts()):
                k = (e.name, "request")
                extra[k] = extra.get(k, 0) + n
        for (plugin, stage), st in self._stats.items():
            labels = (("plugin", plugin), ("stage", stage))
            counters[("dispa_plugin_invocations_total", labels)] = st.calls + extra.get(
                (plugin, stage), 0)
            if st.short:
                counters[("dispa_plugin_short_circuits_total", labels)] = st.short
            for kind, n in st.errors.items():
                counters[("dispa_plugin_errors_total", labels + (("kind", kind),))] = n


def _observe(series: list, ms: float) -> None:
    from dispa.observability.metrics import MS_BUCKETS
    i = 1
    for bound in MS_BUCKETS:
        if ms <= bound:
            break
        i += 1
    series[i] += 1
    series[0] += ms


class Entry:
    """One hook of one filter instance, ready to call."""

    __slots__ = ("fn", "name", "fail", "is_async", "timeout", "stats", "filter")

    def __init__(self, fn, name: str, fail: bool, is_async: bool, timeout: float,
                 stats: HookStats, flt: Filter):
        self.fn = fn
        self.name = name
        self.fail = fail
        self.is_async = is_async
        self.timeout = timeout
        self.stats = stats
        self.filter = flt


class Chain:
    """Per hook, the tuple of entries to run (response hooks already reversed)."""

    __slots__ = ("on_request", "on_request_body", "on_upstream_request", "on_response",
                 "on_response_body", "on_log", "async_request", "async_response", "empty",
                 "names", "registry", "_runner", "runners")

    def __init__(self, entries: dict[str, list[Entry]], names: tuple[str, ...],
                 registry: "StatsRegistry | None" = None):
        self.registry = registry
        self.runners: list = []
        self.on_request = tuple(entries.get("on_request", ()))
        self.on_request_body = tuple(entries.get("on_request_body", ()))
        self.on_upstream_request = tuple(entries.get("on_upstream_request", ()))
        # response hooks run in reverse declared order (the onion)
        self.on_response = tuple(reversed(entries.get("on_response", ())))
        self.on_response_body = tuple(reversed(entries.get("on_response_body", ())))
        self.on_log = tuple(entries.get("on_log", ()))
        self.async_request = any(e.is_async for e in self.on_request + self.on_upstream_request)
        self.async_response = any(e.is_async for e in self.on_response)
        self.empty = not (self.on_request or self.on_request_body or self.on_upstream_request
                          or self.on_response or self.on_response_body or self.on_log)
        self.names = names
        self._runner = None

    def request_runner(self, start: int = 0):
        """A function ``run(req) -> Response | None`` calling the sync ``on_request`` hooks
        from index ``start`` on (``start`` skips hooks an earlier runner already ran)."""
        if start == 0 and self._runner is not None:
            return self._runner
        runner = SyncRunner(self.on_request[start:])
        if self.registry is not None:
            self.registry.live_runners.add(runner)
        self.runners.append(runner)
        if start == 0:
            self._runner = runner
        return runner

    def retire(self) -> None:
        """The snapshot is gone: fold this chain's runner counts into the stats."""
        for runner in self.runners:
            if self.registry is not None:
                self.registry.fold(runner)
                self.registry.live_runners.discard(runner)
        self.runners = []
        self._runner = None

    def __add__(self, other: "Chain") -> "Chain":
        """``self`` then ``other`` for request hooks; ``other`` first for response hooks
        (a route's filters answer before the global ones, as in the original Dispa)."""
        merged: dict[str, list[Entry]] = {}
        for hook in ("on_request", "on_request_body", "on_upstream_request", "on_log"):
            merged[hook] = list(getattr(self, hook)) + list(getattr(other, hook))
        for hook in ("on_response", "on_response_body"):
            # stored reversed: reverse back to declared order, concatenate, reverse again
            merged[hook] = list(reversed(getattr(self, hook))) + list(
                reversed(getattr(other, hook)))
        return Chain(merged, self.names + other.names, self.registry or other.registry)


EMPTY_CHAIN = Chain({}, ())


def compile_chain(members: list[tuple[Filter, "object"]], stats: StatsRegistry) -> Chain:
    """``members``: (filter instance, PluginSpec) in declared order."""
    entries: dict[str, list[Entry]] = {}
    for flt, spec in members:
        stage = spec.stage
        for hook in overridden_hooks(type(flt)):
            hook_stage = STAGE_OF[hook]
            if hook_stage != "log" and stage != "both" and stage != hook_stage:
                continue
            fn = getattr(flt, hook)
            is_async = inspect.iscoroutinefunction(fn)
            if is_async and hook in SYNC_ONLY:
                raise ValueError(f"plugin {spec.name!r}: {hook} must be a plain (sync) method")
            entries.setdefault(hook, []).append(Entry(
                fn, spec.name, spec.error_strategy == "fail", is_async,
                spec.timeout_seconds, stats.get(spec.name, hook_stage), flt))
    return Chain(entries, tuple(spec.name for _, spec in members), stats)


# -- runners ------------------------------------------------------------------------------

def _failed(e: Entry, exc: BaseException, kind: str) -> Response | None:
    e.stats.error(kind)
    if e.stats.errors[kind] <= 10 or e.stats.errors[kind] % 1000 == 0:
        log.warning("plugin %s failed (%s): %s: %s", e.name, kind, type(exc).__name__, exc)
    if e.fail:
        return Response(500, "plugin error\n", {"content-type": "text/plain; charset=utf-8"})
    return None


def _kind(exc: BaseException) -> str:
    kind = getattr(exc, "kind", None)
    if isinstance(kind, str) and kind.isidentifier():
        return kind
    return "timeout" if isinstance(exc, (asyncio.TimeoutError, TimeoutError)) else "exception"


def _result(e: Entry, r) -> Response | None:
    if r is None:
        return None
    if isinstance(r, Response):
        e.stats.short += 1
        return r
    return _failed(e, TypeError(f"returned {type(r).__name__}, expected None or Response"),
                   "bad_return")


def call_sync(e: Entry, *args) -> Response | None:
    """Call a sync hook that may answer (on_request, on_response, on_upstream_request)."""
    st = e.stats
    st.calls += 1
    timed = not (st.calls & 15)
    if timed:
        t = _perf()
    try:
        r = e.fn(*args)
    except HTTPError as exc:
        st.short += 1
        return exc.to_response()
    except Exception as exc:  # noqa: BLE001 - the error strategy decides
        return _failed(e, exc, _kind(exc))
    if timed:
        _observe(st.series, (_perf() - t) * 1000.0)
    return _result(e, r)


async def call_async(e: Entry, *args) -> Response | None:
    """Call a hook that may be async, bounded by the plugin's timeout."""
    if not e.is_async:
        return call_sync(e, *args)
    st = e.stats
    st.calls += 1
    t = _perf()
    try:
        r = await asyncio.wait_for(e.fn(*args), e.timeout)
    except HTTPError as exc:
        st.short += 1
        return exc.to_response()
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # noqa: BLE001 - the error strategy decides (incl. timeout)
        return _failed(e, exc, _kind(exc))
    _observe(st.series, (_perf() - t) * 1000.0)
    return _result(e, r)


class SyncRunner:
    """Calls a tuple of sync hooks with as little per-hook work as CPython allows.

    Counting: every hook is counted once per run in ``runs``; the few runs that stop early
    (a Response, an error) are recorded per stopping index, and ``flush`` turns that into
    per-hook invocation counts. One run in 16 goes through ``call_sync`` per hook, which
    times each call (the duration histogram is sampled, as documented)."""

    __slots__ = ("entries", "fns", "runs", "stopped", "tick")

    def __init__(self, entries: tuple[Entry, ...]):
        self.entries = entries
        self.fns = tuple(e.fn for e in entries)
        self.runs = 0  # fast runs (the slow ones are counted per call by call_sync)
        self.stopped = [0] * len(entries)
        self.tick = 0

    def __call__(self, req):
        # The compiled Session runs this same loop in C (_native/protocol.pyx
        # _run_sync_hooks), calling _answered/_raised below: change them together.
        t = self.tick = self.tick + 1
        if not t & 15:
            return self._slow(req, (), 0)
        self.runs += 1
        i = 0
        try:
            for fn in self.fns:
                r = fn(req)
                if r is not None:
                    return self._answered(i, r)
                i += 1
        except Exception as exc:  # noqa: BLE001 - the error strategy decides
            return self._raised(req, i, exc)
        return None

    def _answered(self, i: int, r):
        """Hook ``i`` of a fast run returned ``r`` (not None)."""
        self.stopped[i] += 1
        return _result(self.entries[i], r)

    def _raised(self, req, i: int, exc: Exception):
        """Hook ``i`` of a fast run raised: an HTTPError answers, anything else obeys the
        plugin's error strategy (fail: answer 500; continue: run the rest)."""
        if isinstance(exc, HTTPError):
            self.stopped[i] += 1
            self.entries[i].stats.short += 1
            return exc.to_response()
        r = _failed(self.entries[i], exc, _kind(exc))
        if r is not None:
            self.stopped[i] += 1
            return r
        return self._resume(req, (), i + 1)

    def _resume(self, req, args, start: int):
        # after an error with strategy "continue": the rest, counted per call
        self.runs -= 1
        for k in range(start):
            self.entries[k].stats.calls += 1
        return self._slow(req, args, start)

    def _slow(self, req, args, start: int):
        for e in self.entries[start:]:
            r = call_sync(e, req, *args)
            if r is not None:
                return r
        return None

    def counts(self) -> list[int]:
        """Invocations per hook implied by ``runs`` and the early stops."""
        out, reached = [], self.runs
        for i in range(len(self.entries)):
            out.append(reached)
            reached -= self.stopped[i]
        return out


def run_body(entries: tuple[Entry, ...], args_prefix: tuple, chunk: bytes, end: bool) -> bytes:
    """Body hooks, each transforming the chunk; HTTPError propagates to the caller (the
    session answers or aborts); other errors obey the strategy (fail re-raises)."""
    for e in entries:
        st = e.stats
        st.calls += 1
        try:
            out = e.fn(*args_prefix, chunk, end)
        except HTTPError:
            st.short += 1
            raise
        except Exception as exc:  # noqa: BLE001
            if _failed(e, exc, _kind(exc)) is not None:
                raise
            continue
        if isinstance(out, (bytes, bytearray, memoryview)):
            chunk = bytes(out)
        elif out is not None:
            if _failed(e, TypeError(f"body hook returned {type(out).__name__}"),
                       "bad_return") is not None:
                raise TypeError("body hook returned a non-bytes value")
    return chunk


def run_log(entries: tuple[Entry, ...], req, status: int, error: str | None) -> None:
    for e in entries:
        e.stats.calls += 1
        try:
            e.fn(req, status, error)
        except Exception as exc:  # noqa: BLE001 - on_log never propagates
            e.stats.error(_kind(exc))
