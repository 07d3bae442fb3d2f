"""WASM plugins (dispa/plugins/wasm.py) against real wasmtime, with modules written here
in WebAssembly text. Each test module implements the Dispa ABI with a bump allocator and
constant results in data segments; they do not parse the input JSON."""

from __future__ import annotations

import multiprocessing
import threading
import time
from pathlib import Path

import msgspec
import pytest

wasmtime = pytest.importorskip("wasmtime")

from dispa.plugins.api import (BuildContext, Filter, Headers, Request,  # noqa: E402
                               Response, ResponseHead, overridden_hooks)
from dispa.plugins import wasm  # noqa: E402
from dispa.plugins.wasm import (WasmABIError, WasmBadOutput, WasmError,  # noqa: E402
                                WasmFilter, WasmFuelExhausted, WasmMemoryExceeded,
                                WasmTimeout, WasmTrap, request_document,
                                response_document)

SUPPORT = Path(__file__).resolve().parents[2] / "support" / "wasm"

# ----------------------------------------------------------------------------- WAT kit

REQ_AT, RESP_AT, SCRATCH_AT, HEAP_AT = 1024, 4096, 6144, 8192

ALLOC = f"""
  (global $heap (mut i32) (i32.const {HEAP_AT}))
  (global $rlen (mut i32) (i32.const 0))
  (func $alloc (export "alloc") (param $n i32) (result i32)
    (local $p i32) (local $end i32) (local $have i32)
    (local.set $p (global.get $heap))
    (local.set $end (i32.add (local.get $p) (local.get $n)))
    (local.set $have (i32.mul (memory.size) (i32.const 65536)))
    (if (i32.gt_u (local.get $end) (local.get $have))
      (then
        (if (i32.eq (memory.grow (i32.add (i32.shr_u (i32.sub (local.get $end)
                                                              (local.get $have))
                                                     (i32.const 16))
                                          (i32.const 1)))
                    (i32.const -1))
          (then (return (i32.const 0))))))
    (global.set $heap (local.get $end))
    (local.get $p))
"""
DEALLOC = f"""
  (func (export "dealloc") (param i32 i32) (global.set $heap (i32.const {HEAP_AT})))
"""
RESULT_LEN = """
  (func (export "dispa_get_result_len") (result i32) (global.get $rlen))
"""


def wat_bytes(b: bytes) -> str:
    """``b`` as a WAT string literal body."""
    return "".join(chr(c) if 32 <= c < 127 and c not in (34, 92) else f"\\{c:02x}" for c in b)


def const_result(at: int, text: bytes) -> tuple[str, str]:
    """(data segment, hook body) returning the constant ``text``."""
    return (f'  (data (i32.const {at}) "{wat_bytes(text)}")\n',
            f"(global.set $rlen (i32.const {len(text)})) (i32.const {at})")


def module(*, request: bytes | str | None = b"{}", response: bytes | str | None = None,
           extra: str = "", memory: str = "1", alloc: str = ALLOC, omit: tuple = ()) -> str:
    """A module text. ``request``/``response``: a constant result (bytes) or a hook body
    (str, WAT instructions with params $ptr $len, leaving an i32); None omits the hook."""
    parts, data = [f'(module\n  (memory (export "memory") {memory})\n', alloc], []
    if "dealloc" not in omit:
        parts.append(DEALLOC)
    if "dispa_get_result_len" not in omit:
        parts.append(RESULT_LEN)
    for name, spec, at in (("dispa_on_request", request, REQ_AT),
                           ("dispa_on_response", response, RESP_AT)):
        if spec is None:
            continue
        if isinstance(spec, bytes):
            seg, spec = const_result(at, spec)
            data.append(seg)
        parts.append(f'  (func (export "{name}") (param $ptr i32) (param $len i32) '
                     f'(result i32)\n    {spec})\n')
    parts += data
    parts.append(extra)
    parts.append(")\n")
    return "".join(parts)


@pytest.fixture(params=[True, False], ids=["fast-calls", "public-api"])
def build(request, tmp_path, monkeypatch):
    """Builds a filter from module text. Every test runs twice: through the ctypes fast
    path and through wasmtime's public API (the fallback)."""
    monkeypatch.setattr(wasm, "FAST_CALLS", request.param)
    made = []

    def _build(wat: str, **cfg) -> WasmFilter:
        p = tmp_path / f"m{len(made)}.wat"
        p.write_text(wat)
        f = WasmFilter.build(msgspec.convert({"module_path": str(p), **cfg}, WasmFilter.Config),
                             BuildContext(instance_name="wasm-test"))
        made.append(f)
        return f

    yield _build
    for f in made:
        f.close()


def http_request(headers=(), target="/a/b?x=1") -> Request:
    return Request("GET", target, Headers([(k.encode(), v.encode()) for k, v in headers]),
                   host="example.com", client_ip="192.0.2.7", request_id="rid-1")


def response(status=200, headers=()) -> ResponseHead:
    return ResponseHead(status, Headers([(k.encode(), v.encode()) for k, v in headers]))


LOOP_FOREVER = "(loop $l (br $l)) (i32.const 0)"

# ----------------------------------------------------------------------------- results


def test_set_header_on_request(build):
    f = build(module(request=b'{"set_headers":{"x-wasm":"yes","x-two":"2"}}'))
    req = http_request([("X-Wasm", "old"), ("accept", "*/*")])
    assert f.on_request(req) is None
    assert req.headers.get("x-wasm") == "yes"
    assert req.headers.get_all("x-wasm") == ["yes"]  # replaced, not added
    assert req.headers.get("x-two") == "2"
    assert req.headers.get("accept") == "*/*"


def test_short_circuit_403_with_body_and_headers(build):
    f = build(module(request=b'{"short_circuit":{"status":403,"body":"denied by wasm\\n",'
                             b'"headers":{"content-type":"text/plain"}}}'))
    resp = f.on_request(http_request())
    assert isinstance(resp, Response)
    assert resp.status == 403
    assert resp.body == b"denied by wasm\n"
    assert resp.headers.get("content-type") == "text/plain"


def test_empty_result_and_null_pointer_mean_no_change(build):
    for spec in (b"{}", "(global.set $rlen (i32.const 10)) (i32.const 0)",
                 "(global.set $rlen (i32.const 0)) (i32.const 1024)"):
        f = build(module(request=spec))
        req = http_request([("a", "1")])
        assert f.on_request(req) is None
        assert list(req.headers.items()) == [("a", "1")]
        assert not req.headers.changed


def test_response_hook_sets_header_and_can_replace(build):
    f = build(module(request=b"{}", response=b'{"set_headers":{"x-resp":"from-wasm"}}'))
    resp = response(200, [("content-type", "text/html")])
    assert f.on_response(http_request(), resp) is None
    assert resp.headers.get("x-resp") == "from-wasm"

    f = build(module(request=b"{}", response=b'{"short_circuit":{"status":502,"body":"no"}}'))
    out = f.on_response(http_request(), response(200))
    assert isinstance(out, Response) and out.status == 502 and out.body == b"no"
    # a body without content-type gets text/plain (as with the command plugin)
    assert out.headers.get("content-type") == "text/plain; charset=utf-8"


def test_module_without_on_response_has_no_response_hook(build):
    f = build(module(request=b"{}", response=None))
    assert isinstance(f, WasmFilter) and type(f).name == "wasm"
    assert "on_response" not in overridden_hooks(type(f))
    assert "on_request" in overridden_hooks(type(f))
    assert f.on_response(http_request(), response()) is None
    g = build(module(request=b"{}", response=b"{}"))
    assert "on_response" in overridden_hooks(type(g))
    assert type(g) is WasmFilter


def test_support_example_module(build):
    f = build((SUPPORT / "add_header.wat").read_text())
    req = http_request()
    f.on_request(req)
    assert req.headers.get("x-wasm-plugin") == "add_header"
    resp = response()
    f.on_response(req, resp)
    assert resp.headers.get("x-served-by") == "dispa-wasm"


def test_binary_wasm_file(tmp_path):
    p = tmp_path / "add_header.wasm"
    p.write_bytes(wasmtime.wat2wasm((SUPPORT / "add_header.wat").read_text()))
    f = WasmFilter.build(WasmFilter.Config(module_path=str(p)), BuildContext())
    req = http_request()
    f.on_request(req)
    assert req.headers.get("x-wasm-plugin") == "add_header"
    f.close()


# ----------------------------------------------------------------------------- input

ITOA = """
  (func $itoa (param $v i32) (param $at i32) (result i32)
    (local $n i32) (local $t i32) (local $end i32)
    (local.set $n (i32.const 1)) (local.set $t (local.get $v))
    (block $done (loop $count
      (br_if $done (i32.lt_u (local.get $t) (i32.const 10)))
      (local.set $t (i32.div_u (local.get $t) (i32.const 10)))
      (local.set $n (i32.add (local.get $n) (i32.const 1)))
      (br $count)))
    (local.set $end (i32.add (local.get $at) (local.get $n)))
    (local.set $t (local.get $end))
    (loop $write
      (local.set $t (i32.sub (local.get $t) (i32.const 1)))
      (i32.store8 (local.get $t) (i32.add (i32.const 48) (i32.rem_u (local.get $v) (i32.const 10))))
      (local.set $v (i32.div_u (local.get $v) (i32.const 10)))
      (br_if $write (i32.gt_u (local.get $t) (local.get $at))))
    (local.get $end))
"""
LEN_PREFIX = b'{"set_headers":{"x-input-len":"'
ECHO_LEN = f"""
    (local.set $len (call $itoa (local.get $len) (i32.const {SCRATCH_AT + len(LEN_PREFIX)})))
    (i32.store8 (local.get $len) (i32.const 34))
    (i32.store8 (i32.add (local.get $len) (i32.const 1)) (i32.const 125))
    (i32.store8 (i32.add (local.get $len) (i32.const 2)) (i32.const 125))
    (global.set $rlen (i32.sub (i32.add (local.get $len) (i32.const 3)) (i32.const {SCRATCH_AT})))
    (i32.const {SCRATCH_AT})"""
ECHO_LEN_DATA = f'  (data (i32.const {SCRATCH_AT}) "{wat_bytes(LEN_PREFIX)}")\n'

# copies the input into a fresh buffer and returns it
ECHO_COPY = """
    (local.set $len (local.get $len))
    (global.set $rlen (local.get $len))
    (memory.copy (call $alloc (local.get $len)) (local.get $ptr) (local.get $len))
    (i32.sub (global.get $heap) (local.get $len))"""


def test_input_document_reaches_the_module(build):
    f = build(module(request=ECHO_LEN, response=ECHO_LEN, extra=ITOA + ECHO_LEN_DATA))
    req = http_request([("user-agent", "t"), ("x-long", "v" * 5000)])
    sent = request_document(req)
    f.on_request(req)
    assert int(req.headers["x-input-len"]) == len(sent) > 5000
    resp = response(404, [("server", "o")])
    sent = response_document(req, resp)
    f.on_response(req, resp)
    assert int(resp.headers["x-input-len"]) == len(sent)


def test_input_document_bytes_exactly(build):
    f = build(module(request=ECHO_COPY, response=ECHO_COPY))
    req = http_request([("Accept", "a"), ("accept", "b"), ("Cookie", "a=1"), ("cookie", "b=2")],
                       target="/p?q=1&r")
    doc = request_document(req)
    assert f._exchange("on_request", doc) == doc
    parsed = msgspec.json.decode(doc)
    assert parsed == {"stage": "request", "method": "GET", "path": "/p", "query": "q=1&r",
                      "headers": {"accept": "a, b", "cookie": "a=1; b=2"},
                      "client_ip": "192.0.2.7",
                      "host": "example.com", "scheme": "http", "route": None,
                      "request_id": "rid-1"}
    rdoc = response_document(req, response(201, [("Set-Cookie", "a=1")]))
    assert f._exchange("on_response", rdoc) == rdoc
    r = msgspec.json.decode(rdoc)
    assert r["stage"] == "response" and r["status"] == 201
    assert r["headers"] == {"set-cookie": "a=1"}


# ----------------------------------------------------------------------------- limits


def kind_of(fn) -> WasmError:
    with pytest.raises(WasmError) as ei:
        fn()
    return ei.value


def test_infinite_loop_stopped_by_fuel(build):
    f = build(module(request=LOOP_FOREVER), fuel=1_000_000, timeout_ms=5000)
    t0 = time.monotonic()
    e = kind_of(lambda: f.on_request(http_request()))
    assert isinstance(e, WasmFuelExhausted) and e.kind == "fuel"
    assert time.monotonic() - t0 < 2.0
    assert "wasm-test" in str(e) and "dispa_on_request" in str(e)


def test_infinite_loop_stopped_by_timeout_when_fuel_is_huge(build):
    f = build(module(request=LOOP_FOREVER), fuel=(1 << 62), timeout_ms=50)
    for _ in range(3):  # the ticker sleeps between exchanges and wakes for each
        t0 = time.monotonic()
        e = kind_of(lambda: f.on_request(http_request()))
        took = time.monotonic() - t0
        assert isinstance(e, WasmTimeout) and e.kind == "timeout"
        assert 0.03 <= took < 0.5, took


def test_timeout_bounds_the_call_inside_a_running_event_loop(build):
    import asyncio
    f = build(module(request=LOOP_FOREVER), fuel=(1 << 62), timeout_ms=30)

    async def main():
        t0 = time.monotonic()
        try:
            f.on_request(http_request())
        except WasmTimeout:
            return time.monotonic() - t0
        return None

    took = asyncio.run(main())
    assert took is not None and took < 0.3


def test_trap_is_reported(build):
    f = build(module(request="unreachable"))
    e = kind_of(lambda: f.on_request(http_request()))
    assert isinstance(e, WasmTrap) and e.kind == "trap" and "unreachable" in str(e)
    g = build(module(request="(i32.load (i32.const -16))"))
    e = kind_of(lambda: g.on_request(http_request()))
    assert e.kind == "trap" and "out of bounds" in str(e)


def test_stack_overflow_is_a_trap(build):
    f = build(module(request="(call $rec (i32.const 0))",
                     extra='(func $rec (param i32) (result i32) '
                           '(call $rec (i32.add (local.get 0) (i32.const 1))))'),
              fuel=1 << 40)
    assert kind_of(lambda: f.on_request(http_request())).kind == "trap"


def test_memory_growth_beyond_cap(build):
    hog = """(block $full (loop $more
               (br_if $full (i32.eq (memory.grow (i32.const 1)) (i32.const -1)))
               (br $more)))
             unreachable"""
    f = build(module(request=hog), max_memory_bytes=256 * 1024)
    e = kind_of(lambda: f.on_request(http_request()))
    assert isinstance(e, WasmMemoryExceeded) and e.kind == "memory"


def test_alloc_failure_is_memory(build):
    # the input needs more than the cap allows: alloc cannot grow and returns 0
    f = build(module(request=b"{}"), max_memory_bytes=128 * 1024)
    req = http_request([("x-big", "v" * 200_000)])
    assert kind_of(lambda: f.on_request(req)).kind == "memory"
    # an allocator that traps when it cannot grow (what Rust's does)
    trapping_alloc = ALLOC.replace("(then (return (i32.const 0)))", "(then unreachable)")
    g = build(module(request=b"{}", alloc=trapping_alloc), max_memory_bytes=128 * 1024)
    assert kind_of(lambda: g.on_request(req)).kind == "memory"
    assert g.on_request(http_request()) is None  # a small request still fits


def test_initial_memory_over_cap_refused_at_build(build):
    with pytest.raises(ValueError, match="instantiate"):
        build(module(request=b"{}", memory="8"), max_memory_bytes=4 * 65536)


def test_bad_alloc_pointer_is_abi(build):
    bad = ALLOC.replace("(local.get $p))", "(drop (local.get $p)) (i32.const 0x7fff0000))")
    f = build(module(request=b"{}", alloc=bad))
    e = kind_of(lambda: f.on_request(http_request()))
    assert isinstance(e, WasmABIError) and e.kind == "abi"


# ----------------------------------------------------------------------------- bad output

@pytest.mark.parametrize("result", [
    b"not json {",
    b"[1, 2]",
    b"null",
    b'{"set_headers": {"x": 1}}',
    b'{"set_headers": {"x": "a\\r\\nb: c"}}',
    b'{"set_headers": {"bad name": "v"}}',
    b'{"short_circuit": {"status": 99}}',
    b'{"short_circuit": {"body": "no status"}}',
    b'{"short_circuit": {"status": 403}, "set_headers": {"x": "1"}}',
    b'\xff\xfe',
])
def test_bad_result_json(build, result):
    f = build(module(request=result))
    req = http_request([("a", "1")])
    e = kind_of(lambda: f.on_request(req))
    assert isinstance(e, WasmBadOutput) and e.kind == "bad_output"
    assert list(req.headers.items()) == [("a", "1")]  # nothing half-applied


def test_partially_bad_set_headers_changes_nothing(build):
    f = build(module(request=b'{"set_headers": {"x-ok": "1", "x-bad": "a\\nb"}}'))
    req = http_request()
    assert kind_of(lambda: f.on_request(req)).kind == "bad_output"
    assert "x-ok" not in req.headers


def test_result_too_long_or_out_of_bounds(build):
    f = build(module(request=b'{"set_headers":{"x-a":"' + b"a" * 100 + b'"}}'),
              max_result_bytes=64)
    e = kind_of(lambda: f.on_request(http_request()))
    assert e.kind == "bad_output" and "max_result_bytes" in str(e)
    g = build(module(request="(global.set $rlen (i32.const 100)) (i32.const 65500)"))
    assert kind_of(lambda: g.on_request(http_request())).kind == "bad_output"
    h = build(module(request="(global.set $rlen (i32.const -1)) (i32.const 1024)"))
    assert kind_of(lambda: h.on_request(http_request())).kind == "bad_output"


def test_unknown_result_keys_are_ignored(build):
    f = build(module(request=b'{"set_headers":{"x-a":"1"},"future_key":[1,2]}'))
    req = http_request()
    assert f.on_request(req) is None and req.headers["x-a"] == "1"


# ----------------------------------------------------------------------------- pool


OK_RESULT = b'{"set_headers":{"x-ok":"1"}}'
POISON = f"""
    (if (global.get $poisoned) (then
        (global.set $rlen (i32.const 7)) (return (i32.const {SCRATCH_AT}))))
    (if (i32.gt_u (local.get $len) (i32.const 400)) (then
        (global.set $poisoned (i32.const 1)) unreachable))
    (global.set $rlen (i32.const {len(OK_RESULT)}))
    (i32.const {SCRATCH_AT + 16})"""
POISON_DATA = (f'(global $poisoned (mut i32) (i32.const 0))\n'
               f'(data (i32.const {SCRATCH_AT}) "garbage")\n'
               f'(data (i32.const {SCRATCH_AT + 16}) "{wat_bytes(OK_RESULT)}")\n')


def test_instance_replaced_after_trap(build):
    f = build(module(request=POISON, extra=POISON_DATA))
    assert f.instantiations == 1
    req = http_request()
    assert f.on_request(req) is None and req.headers["x-ok"] == "1"
    # a big input poisons the instance's state, then traps
    assert kind_of(lambda: f.on_request(http_request([("x-big", "v" * 1000)]))).kind == "trap"
    # the poisoned instance would answer "garbage": this one is fresh
    req = http_request()
    assert f.on_request(req) is None and req.headers["x-ok"] == "1"
    assert f.instantiations == 2
    assert f._live == 1 and len(f._idle) == 1


def test_instance_replaced_after_fuel_and_timeout(build):
    body = f"(if (i32.gt_u (local.get $len) (i32.const 400)) (then {LOOP_FOREVER} return)) " \
           "(i32.const 0)"
    f = build(module(request=body), fuel=1_000_000)
    assert kind_of(lambda: f.on_request(http_request([("x-big", "v" * 1000)]))).kind == "fuel"
    assert f.on_request(http_request()) is None
    g = build(module(request=body), fuel=1 << 62, timeout_ms=20)
    assert kind_of(lambda: g.on_request(http_request([("x-big", "v" * 1000)]))).kind == "timeout"
    assert g.on_request(http_request()) is None
    assert f.instantiations == g.instantiations == 2


def test_pool_serves_threads_up_to_max_concurrency(build):
    f = build(module(request=b'{"set_headers":{"x-a":"1"}}'), max_concurrency=2)
    errors, peak = [], [0]

    def work():
        try:
            for _ in range(100):
                req = http_request()
                f.on_request(req)
                assert req.headers["x-a"] == "1"
                peak[0] = max(peak[0], f._live)
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert 1 <= peak[0] <= 2 and f._live <= 2


def test_close_drops_instances_but_stragglers_still_work(build):
    f = build(module(request=b'{"set_headers":{"x-a":"1"}}'))
    f.close()
    assert f._live == 0 and not f._idle
    # a request of the replaced snapshot may still reach its response hook
    req = http_request()
    assert f.on_request(req) is None and req.headers["x-a"] == "1"
    assert f._live == 0 and not f._idle


def _child(path: str, loop_path: str, q) -> None:
    try:
        ctx = BuildContext()
        f = WasmFilter.build(WasmFilter.Config(module_path=path), ctx)
        req = http_request()
        f.on_request(req)
        g = WasmFilter.build(WasmFilter.Config(module_path=loop_path, fuel=1 << 62,
                                               timeout_ms=30), ctx)
        try:
            g.on_request(http_request())
            q.put(("no error", None))
        except WasmError as exc:
            q.put((exc.kind, req.headers.get("x-wasm-plugin")))
    except BaseException as exc:  # noqa: BLE001
        q.put((repr(exc), None))


def test_works_in_a_forked_worker(build, tmp_path):
    # the master compiles (config check), then forks workers that compile and run again
    parent = build(module(request=LOOP_FOREVER), fuel=1 << 62, timeout_ms=10)
    assert kind_of(lambda: parent.on_request(http_request())).kind == "timeout"
    loop_path = tmp_path / "loop2.wat"
    loop_path.write_text(module(request=LOOP_FOREVER) + ";; another one\n")
    ctx = multiprocessing.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_child, args=(str(SUPPORT / "add_header.wat"), str(loop_path), q))
    p.start()
    try:
        got = q.get(timeout=60)
    finally:
        p.join(10)
        if p.is_alive():
            p.kill()
    assert got == ("timeout", "add_header")


# ----------------------------------------------------------------------------- build checks


def test_missing_export_refused_at_build(build):
    with pytest.raises(ValueError, match="missing export 'dispa_get_result_len'"):
        build(module(omit=("dispa_get_result_len",)))
    with pytest.raises(ValueError, match="missing export 'dealloc'"):
        build(module(omit=("dealloc",)))
    with pytest.raises(ValueError, match="missing export 'dispa_on_request'"):
        build(module(request=None, response=b"{}"))
    with pytest.raises(ValueError, match="missing export 'memory'"):
        build(module().replace('(memory (export "memory") 1)', "(memory 1)"))


def test_bad_signature_refused_at_build(build):
    with pytest.raises(ValueError, match=r"'alloc' has signature \(i64\) -> i32, "
                                         r"expected \(i32\) -> i32"):
        build(module(alloc=ALLOC.replace("(param $n i32)", "(param $n i64)")
                     .replace("(local.get $n)", "(i32.wrap_i64 (local.get $n))")))
    with pytest.raises(ValueError, match="'dispa_on_response' has signature"):
        build(module(extra='(func (export "dispa_on_response") (param i32) (result i32) '
                           '(i32.const 0))', response=None))


def test_imports_refused_at_build(build):
    wat = module().replace("(module\n", '(module\n  (import "env" "log" (func (param i32)))\n')
    with pytest.raises(ValueError, match="imports env.log"):
        build(wat)


def test_missing_or_invalid_file_refused_at_build(tmp_path):
    missing = tmp_path / "nope.wasm"
    with pytest.raises(ValueError, match=str(missing)):
        WasmFilter.build(WasmFilter.Config(module_path=str(missing)), BuildContext())
    junk = tmp_path / "junk.wasm"
    junk.write_bytes(b"\x00asm\x01\x00\x00\x00garbage")
    with pytest.raises(ValueError, match="not a valid WebAssembly module"):
        WasmFilter.build(WasmFilter.Config(module_path=str(junk)), BuildContext())


def test_trap_in_start_function_refused_at_build(build):
    with pytest.raises(ValueError, match="cannot instantiate"):
        build(module(extra="(func $start unreachable) (start $start)"))


def test_config_defaults_and_strictness():
    cfg = msgspec.convert({"module_path": "m.wasm"}, WasmFilter.Config)
    assert (cfg.timeout_ms, cfg.max_concurrency, cfg.fuel, cfg.max_memory_bytes,
            cfg.max_result_bytes) == (200, 16, 10_000_000, 16 * 1024 * 1024, 64 * 1024)
    for bad in ({}, {"module_path": "m", "timeout": 1}, {"module_path": "m", "timeout_ms": 0},
                {"module_path": "m", "max_memory_bytes": 1000}):
        with pytest.raises(msgspec.ValidationError):
            msgspec.convert(bad, WasmFilter.Config)


def test_error_kinds_are_distinct():
    kinds = [c.kind for c in (WasmTrap, WasmFuelExhausted, WasmMemoryExceeded, WasmTimeout,
                              WasmABIError, WasmBadOutput)]
    assert kinds == ["trap", "fuel", "memory", "timeout", "abi", "bad_output"]
    assert issubclass(WasmFilter, Filter) and WasmFilter.name == "wasm"


def test_compiled_module_is_cached(build):
    wat = module(request=b"{}")
    a, b = build(wat), build(wat)
    assert a._module is b._module


def test_exchange_cost(build):
    """Not a benchmark gate: a sanity bound on one exchange (µs, printed with -s)."""
    f = build(module(request=b'{"set_headers":{"x-a":"1"}}'))
    n = 500
    t0 = time.perf_counter()
    for _ in range(n):
        f.on_request(http_request([("host", "example.com"), ("user-agent", "curl/8")]))
    per = (time.perf_counter() - t0) / n
    print(f"wasm on_request exchange: {per * 1e6:.1f} us")
    assert per < 0.005
