"""The ``command`` filter against real programs (tests/support/plugins), on both loops.

No mocks: every test starts real processes. Waiting for a process to disappear polls
``/proc`` for a condition with a deadline; no test uses a sleep to order events.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from pathlib import Path

import msgspec
import pytest
import uvloop

from dispa.plugins.api import BuildContext, Headers, Request, Response, ResponseHead
from dispa.plugins.command import (
    CommandConfig, CommandError, CommandFilter, CommandOutputError, CommandTimeout,
)

SCRIPTS = Path(__file__).resolve().parents[2] / "support" / "plugins"
NDJSON = str(SCRIPTS / "ndjson_filter.py")
ONESHOT = str(SCRIPTS / "oneshot_original.py")
STUBBORN = str(SCRIPTS / "stubborn.sh")

LOOPS = {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}


@pytest.fixture(params=sorted(LOOPS))
def run(request):
    """``run(coro_fn)``: run ``coro_fn()`` to completion on a fresh loop of each kind."""
    def go(coro_fn):
        with asyncio.Runner(loop_factory=LOOPS[request.param]) as runner:
            return runner.run(coro_fn())
    return go


class Metrics:
    """Records what the filter reports (the shape of observability.metrics)."""

    def __init__(self):
        self.counters: dict[tuple, float] = {}
        self.observed: list[tuple[str, tuple, float]] = []

    def inc(self, name, labels=(), value=1):
        self.counters[(name, labels)] = self.counters.get((name, labels), 0) + value

    def observe_ms(self, name, labels, ms):
        self.observed.append((name, labels, ms))


def make(script: str = NDJSON, *, metrics=None, name: str = "cmd", **kw) -> CommandFilter:
    kw.setdefault("exec_allowlist", (script,))
    kw.setdefault("timeout_ms", 5000)
    kw.setdefault("start_timeout_ms", 10000)
    cfg = msgspec.convert({"exec": script, **kw}, CommandConfig)
    return CommandFilter.build(cfg, BuildContext(instance_name=name, metrics=metrics))


def request(target: str = "/", host: str = "example.test", method: str = "GET") -> Request:
    return Request(method, target, Headers([(b"Host", host.encode())]), host=host,
                   client_ip="192.0.2.7")


async def pid_of(f: CommandFilter, target: str = "/") -> int:
    req = request(target)
    assert await f.on_request(req) is None
    return int(req.headers["X-Cmd-Pid"])


def proc_state(pid: int) -> str | None:
    """The state letter of ``pid`` if it exists as a child of this process, else None."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            rest = fh.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return rest[0] if int(rest[1]) == os.getpid() else None


def alive(pid: int) -> bool:
    """``pid`` exists and is not a zombie (whoever its parent is now)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def children_running(script: str) -> list[int]:
    """Children of this process (any state, zombies included) running ``script``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
            if ppid != os.getpid():
                continue
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                cmd = fh.read()
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        if script.encode() in cmd or not cmd:  # a zombie has an empty cmdline
            found.append(int(entry))
    return found


def wait_until(pred, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.01)
    return pred()


async def async_wait_until(pred, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        await asyncio.sleep(0.01)
    return pred()


# ------------------------------------------------------------------------------ protocol

def test_request_stage_set_headers_adds_headers_and_the_program_sees_the_request(run):
    f = make()

    async def go():
        req = request("/api/items?page=2&q=x", host="shop.test", method="POST")
        assert await f.on_request(req) is None
        f.close()
        await f.wait_closed()
        return req

    req = run(go)
    assert req.headers["Host"] == "shop.test"  # untouched
    assert req.headers["X-Seen-Path"] == "/api/items"
    assert req.headers["X-Seen-Query"] == "page=2&q=x"
    assert req.headers["X-Seen-Host"] == "shop.test"
    assert req.headers["X-Seen-Client"] == "192.0.2.7"
    assert req.headers["X-Seen-Method"] == "POST"
    assert f.calls == 1 and f.errors == 0


def test_request_stage_short_circuit_answers_403_with_body_and_headers(run):
    f = make()

    async def go():
        resp = await f.on_request(request("/block"))
        f.close()
        await f.wait_closed()
        return resp

    resp = run(go)
    assert isinstance(resp, Response)
    assert resp.status == 403
    assert resp.body == b"blocked"
    assert resp.headers["X-Blocked-By"] == "cmd"
    assert resp.headers["content-type"].startswith("text/plain")


def test_response_stage_sets_response_headers_or_replaces_the_response(run):
    f = make()

    async def go():
        head = ResponseHead(200, Headers([(b"Server", b"origin/1.0")]))
        assert await f.on_response(request("/r", method="PUT"), head) is None
        bad = ResponseHead(500, Headers())
        replaced = await f.on_response(request("/r"), bad)
        f.close()
        await f.wait_closed()
        return head, replaced

    head, replaced = run(go)
    assert head.headers["Server"] == "origin/1.0"
    assert head.headers["X-Upstream-Status"] == "200"
    assert head.headers["X-Seen-Method"] == "PUT"
    assert head.headers["X-Seen-Path"] == "/r"
    assert head.headers["X-Seen-Server"] == "origin/1.0"
    assert isinstance(replaced, Response)
    assert (replaced.status, replaced.body) == (503, b"replaced")
    assert replaced.headers["X-Replaced"] == "yes"


def test_an_empty_object_changes_nothing(run):
    f = make()

    async def go():
        req = request("/empty")
        assert await f.on_request(req) is None
        f.close()
        await f.wait_closed()
        return req

    req = run(go)
    assert list(req.headers.items()) == [("Host", "example.test")]
    assert not req.headers.changed


# ------------------------------------------------------------------------------ pool

def test_persistent_mode_reuses_a_few_long_lived_processes(run):
    f = make(max_concurrency=3)

    async def go():
        sequential = {await pid_of(f) for _ in range(30)}
        reqs = [request() for _ in range(60)]
        await asyncio.gather(*(f.on_request(r) for r in reqs))
        concurrent = {int(r.headers["X-Cmd-Pid"]) for r in reqs}
        f.close()
        await f.wait_closed()
        return sequential, concurrent

    sequential, concurrent = run(go)
    assert len(sequential) == 1  # one at a time: the warm process serves every call
    assert 1 <= len(concurrent) <= 3
    assert sequential <= concurrent
    assert f.spawned <= 3 and f.restarts == 0
    assert f.calls == 90 and f.errors == 0


def test_never_more_than_max_concurrency_calls_run_at_once(run, tmp_path):
    state = tmp_path / "state"
    f = make(max_concurrency=3, env={"CMD_STATE": str(state)})

    async def go():
        reqs = [request("/concurrency") for _ in range(24)]
        await asyncio.gather(*(f.on_request(r) for r in reqs))
        f.close()
        await f.wait_closed()
        return reqs

    reqs = run(go)
    current, peak = (int(x) for x in state.read_text().split())
    assert current == 0  # every call counted itself out again
    assert 1 <= peak <= 3
    assert all(1 <= int(r.headers["X-Concurrent"]) <= 3 for r in reqs)
    assert len({r.headers["X-Cmd-Pid"] for r in reqs}) <= 3


def test_max_concurrency_calls_do_run_side_by_side(run, tmp_path):
    # Each call waits in its program until 4 calls are in at once: that happens only if
    # the pool runs 4 processes side by side (the programs poll; the test does not sleep).
    f = make(max_concurrency=4, env={"CMD_STATE": str(tmp_path / "state")})

    async def go():
        reqs = [request("/barrier?4") for _ in range(4)]
        await asyncio.gather(*(f.on_request(r) for r in reqs))
        f.close()
        await f.wait_closed()
        return reqs

    reqs = run(go)
    assert [r.headers["X-Barrier"] for r in reqs] == ["met"] * 4
    assert len({r.headers["X-Cmd-Pid"] for r in reqs}) == 4


def test_calls_beyond_max_queue_fail_at_once_with_kind_queue_full(run):
    metrics = Metrics()
    f = make(max_concurrency=1, max_queue=1, metrics=metrics)

    async def go():
        # gather starts the three in order: the first takes the only process, the second
        # queues, the third finds the queue full before anything has run.
        out = await asyncio.gather(*(f.on_request(request()) for _ in range(3)),
                                   return_exceptions=True)
        f.close()
        await f.wait_closed()
        return out

    first, second, third = run(go)
    assert first is None and second is None
    assert isinstance(third, CommandError) and third.kind == "queue_full"
    assert f.errors == 1
    assert metrics.counters[("dispa_plugin_cmd_errors_total",
                             (("plugin", "cmd"), ("kind", "queue_full")))] == 1


def test_a_call_over_timeout_ms_kills_the_process_and_the_next_call_restarts_it(run):
    metrics = Metrics()
    f = make(timeout_ms=300, metrics=metrics)

    async def go():
        first = await pid_of(f)  # warm: the slow call below gets timeout_ms, not the
        t0 = time.monotonic()    # start-up allowance
        with pytest.raises(CommandTimeout) as ei:
            await f.on_request(request("/slow"))
        took = time.monotonic() - t0
        assert await async_wait_until(lambda: proc_state(first) is None)
        second = await pid_of(f)
        f.close()
        await f.wait_closed()
        return first, second, ei.value, took

    first, second, err, took = run(go)
    assert isinstance(err, TimeoutError) and err.kind == "timeout"
    assert "300 ms" in str(err)
    assert took < 5  # the program sleeps 30 s; the call did not wait for it
    assert first != second
    assert (f.timeouts, f.errors, f.restarts) == (1, 1, 1)
    labels = (("plugin", "cmd"),)
    assert metrics.counters[("dispa_plugin_cmd_timeouts_total", labels)] == 1
    assert metrics.counters[("dispa_plugin_cmd_errors_total",
                             labels + (("kind", "timeout"),))] == 1


def test_a_cancelled_call_kills_its_process_which_is_out_of_step(run):
    f = make()

    async def go():
        first = await pid_of(f)
        with pytest.raises(TimeoutError):  # the chain's own hook timeout
            await asyncio.wait_for(f.on_request(request("/slow")), 0.2)
        assert await async_wait_until(lambda: proc_state(first) is None)
        second = await pid_of(f)
        f.close()
        await f.wait_closed()
        return first, second

    first, second = run(go)
    assert first != second
    assert f.restarts == 1
    assert f.timeouts == 0  # not ours: the caller counts its own timeout


def test_a_program_that_exits_is_an_error_and_is_restarted_on_next_use(run):
    f = make()

    async def go():
        first = await pid_of(f)
        with pytest.raises(CommandError) as ei:
            await f.on_request(request("/crash"))
        second = await pid_of(f)
        f.close()
        await f.wait_closed()
        return first, second, ei.value

    first, second, err = run(go)
    assert err.kind == "exited"
    assert "exit status 3" in str(err)
    assert first != second and f.restarts == 1


@pytest.mark.parametrize("path, fragment", [
    ("/garbage", "not JSON"),
    ("/array", "Expected `object`, got `array`"),
    ("/status99", "status"),
    ("/crlf", "CR/LF"),
    ("/badname", "invalid header name"),
    ("/int", "Expected `str`, got `int`"),
    ("/typo", "set_header"),
    ("/framing", "Content-Length"),
    ("/huge", "max_output_bytes"),
])
def test_garbage_on_stdout_is_a_value_error_describing_it(run, path, fragment):
    metrics = Metrics()
    f = make(metrics=metrics)

    async def go():
        req = request(path)
        with pytest.raises(ValueError) as ei:
            await f.on_request(req)
        after = request()  # the filter keeps working
        assert await f.on_request(after) is None
        f.close()
        await f.wait_closed()
        return ei.value, req

    err, req = run(go)
    assert isinstance(err, CommandOutputError) and err.kind == "bad_output"
    assert fragment in str(err), str(err)
    assert "'cmd'" in str(err)
    assert list(req.headers.items()) == [("Host", "example.test")]  # nothing half-applied
    assert metrics.counters[("dispa_plugin_cmd_errors_total",
                             (("plugin", "cmd"), ("kind", "bad_output")))] == 1


def test_stderr_is_drained_and_logged_at_a_bounded_rate(run, caplog):
    f = make()
    caplog.set_level(logging.WARNING, logger="dispa.plugins.command")

    async def go():
        # each call writes ~340 KB of stderr, far beyond a pipe's buffer
        for _ in range(3):
            assert await f.on_request(request("/noisy")) is None
        f.close()
        await f.wait_closed()

    run(go)
    lines = [r for r in caplog.records if "stderr" in r.getMessage()]
    assert 1 <= len(lines) <= 40  # 15000 lines written
    assert "noise line 0" in lines[0].getMessage()
    assert f.errors == 0


def test_the_child_environment_is_minimal_plus_env(run, monkeypatch):
    monkeypatch.setenv("HOME", "/home/somebody")
    f = make(env={"FOO": "bar"})

    async def go():
        req = request("/env")
        await f.on_request(req)
        f.close()
        await f.wait_closed()
        return req

    req = run(go)
    assert req.headers["X-Env-Foo"] == "bar"
    assert req.headers["X-Env-Home"] == "<unset>"
    assert req.headers["X-Env-Lang"] != "<unset>"


# ------------------------------------------------------------------------------ oneshot

def test_oneshot_mode_runs_an_original_style_script_once_per_call(run):
    f = make(ONESHOT, mode="oneshot")

    async def go():
        reqs = [request() for _ in range(4)]
        for r in reqs:
            assert await f.on_request(r) is None
        head = ResponseHead(200, Headers())
        await f.on_response(request(), head)
        blocked = await f.on_request(request("/block"))
        with pytest.raises(CommandError) as ei:
            await f.on_request(request("/fail"))
        left = children_running(ONESHOT)
        f.close()
        await f.wait_closed()
        return reqs, head, blocked, ei.value, left

    reqs, head, blocked, err, left = run(go)
    pids = {r.headers["X-Oneshot-Pid"] for r in reqs}
    assert len(pids) == 4  # a process per call
    assert reqs[0].headers["X-Seen-Stage"] == "request"
    assert head.headers["X-Seen-Stage"] == "response"
    assert (blocked.status, blocked.body) == (403, b"blocked by oneshot")
    assert err.kind == "exited" and "status 2" in str(err)
    assert left == []  # each was reaped when its call ended
    assert f.restarts == 0


# ------------------------------------------------------------------------------ build

def test_exec_outside_the_allowlist_refuses_to_build(tmp_path):
    other = str(tmp_path / "allowed-elsewhere")
    with pytest.raises(ValueError) as ei:
        make(NDJSON, exec_allowlist=(other,))
    assert NDJSON in str(ei.value) and other in str(ei.value)

    with pytest.raises(ValueError, match="exec_allowlist"):
        make(NDJSON, exec_allowlist=())


def test_exec_is_compared_after_resolving_symlinks(tmp_path):
    link = tmp_path / "filter"
    link.symlink_to(NDJSON)
    f = make(str(link), exec_allowlist=(NDJSON,))  # resolves to an allowed program
    assert f._exec == NDJSON

    decoy = tmp_path / "decoy"
    decoy.symlink_to(ONESHOT)  # listed by a path that resolves elsewhere
    with pytest.raises(ValueError, match="resolves to"):
        make(NDJSON, exec_allowlist=(str(decoy),))


def test_a_program_that_is_not_executable_refuses_to_build(tmp_path):
    plain = tmp_path / "plain.py"
    plain.write_text("print('{}')\n")
    with pytest.raises(ValueError, match="not an executable file"):
        make(str(plain))


def test_config_defaults_and_unknown_keys():
    cfg = msgspec.convert({"exec": "/bin/true"}, CommandConfig)
    assert (cfg.mode, cfg.timeout_ms, cfg.max_concurrency, cfg.max_queue) == \
        ("persistent", 200, 8, 1024)
    assert cfg.args == () and cfg.env == {} and cfg.exec_allowlist == ()
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({"exec": "/bin/true", "stage": "request"}, CommandConfig)
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({"exec": "/bin/true", "max_concurrency": 0}, CommandConfig)


# ------------------------------------------------------------------------------ close

def test_close_terminates_every_process_and_leaves_no_zombies(run):
    f = make(max_concurrency=4)

    async def go():
        reqs = [request() for _ in range(16)]
        await asyncio.gather(*(f.on_request(r) for r in reqs))
        pids = {int(r.headers["X-Cmd-Pid"]) for r in reqs}
        assert all(proc_state(p) not in (None, "Z") for p in pids)
        f.close()
        await f.wait_closed()
        return pids

    pids = run(go)
    assert all(proc_state(p) is None for p in pids)  # gone, not even a zombie
    assert children_running(NDJSON) == []


def test_close_kills_a_program_that_ignores_sigterm_and_its_children(run):
    f = make(STUBBORN, term_grace_ms=200)

    async def go():
        req = request()
        await f.on_request(req)
        pid, grandchild = int(req.headers["X-Cmd-Pid"]), int(req.headers["X-Grandchild"])
        assert alive(pid) and alive(grandchild)
        t0 = time.monotonic()
        f.close()
        await f.wait_closed()
        return pid, grandchild, time.monotonic() - t0

    pid, grandchild, took = run(go)
    assert took >= 0.2  # SIGTERM was ignored: SIGKILL came after the grace period
    assert proc_state(pid) is None
    assert wait_until(lambda: not alive(grandchild))  # killed with its process group
    assert children_running(STUBBORN) == []


def test_close_without_a_running_loop_reaps_the_children_itself(run):
    f = make(max_concurrency=2)

    async def go():
        reqs = [request() for _ in range(4)]
        await asyncio.gather(*(f.on_request(r) for r in reqs))
        return {int(r.headers["X-Cmd-Pid"]) for r in reqs}

    pids = run(go)  # the loop is closed now
    f.close()
    assert all(proc_state(p) is None for p in pids)
    assert children_running(NDJSON) == []


def test_calls_after_close_fail_with_kind_closed(run):
    f = make()

    async def go():
        await pid_of(f)
        f.close()
        with pytest.raises(CommandError) as ei:
            await f.on_request(request())
        await f.wait_closed()
        return ei.value

    assert run(go).kind == "closed"


def test_close_fails_the_calls_waiting_for_a_process(run):
    f = make(max_concurrency=1)

    async def go():
        # the first call holds the only process; the second waits for it
        first = asyncio.ensure_future(f.on_request(request()))
        second = asyncio.ensure_future(f.on_request(request()))
        await asyncio.sleep(0)  # let both start: one runs, one queues
        f.close()
        out = await asyncio.gather(first, second, return_exceptions=True)
        await f.wait_closed()
        return out

    first, second = run(go)
    assert isinstance(second, CommandError) and second.kind == "closed"
    assert first is None or isinstance(first, CommandError)


def test_a_new_event_loop_gets_a_new_pool_and_the_old_processes_die(run):
    f = make()
    first = run(lambda: pid_of(f))

    async def again():
        pid = await pid_of(f)
        f.close()
        await f.wait_closed()
        return pid

    second = run(again)
    assert first != second
    assert proc_state(first) is None


def test_duration_is_observed_for_every_call(run):
    metrics = Metrics()
    f = make(metrics=metrics)

    async def go():
        await f.on_request(request())
        with pytest.raises(ValueError):
            await f.on_request(request("/garbage"))
        f.close()
        await f.wait_closed()

    run(go)
    assert [(n, lb) for n, lb, _ in metrics.observed] == \
        [("dispa_plugin_cmd_exec_duration_ms", (("plugin", "cmd"),))] * 2
    assert all(ms >= 0 for _, _, ms in metrics.observed)
