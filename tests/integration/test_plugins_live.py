"""Built-in, WASM, command and cache plugins on a running dispa-server with a real origin."""

from __future__ import annotations

import concurrent.futures
import gzip
import http.client
import pathlib
import sys

import zstandard

from tests.support.dispa_proc import http_get

ROOT = pathlib.Path(__file__).resolve().parents[2]
WAT = ROOT / "tests" / "support" / "wasm" / "add_header.wat"


def upstream_header(origin, name: bytes):
    _, _, headers, _ = origin.requests[-1]
    for k, v in headers:
        if k.lower() == name:
            return v
    return None


def test_builtin_header_injector_blocklist_and_rewrite(dispa, origin):
    extra = '''
[[plugins.plugins]]
name = "inject"
type = "headerinjector"
config = { request_headers = { "x-injected" = "yes" }, response_headers = { "x-power" = "dispa" } }

[[plugins.plugins]]
name = "block"
type = "blocklist"
config = { paths = ["/admin"] }

[[plugins.plugins]]
name = "rw"
type = "pathrewrite"
config = { from_prefix = "/old", to_prefix = "/headers" }
'''
    d = dispa(targets=[("a", origin.url)], extra=extra)
    status, headers, _ = http_get(d.port, "/old")
    assert status == 200 and headers["x-power"] == "dispa"
    method, target, _, _ = origin.requests[-1]
    assert target == b"/headers" and upstream_header(origin, b"x-injected") == b"yes"
    n = len(origin.requests)
    status, _, _ = http_get(d.port, "/admin/x")
    assert status == 403 and len(origin.requests) == n


def test_builtin_rate_limiter_answers_429(dispa, origin):
    extra = '''
[[plugins.plugins]]
name = "rl"
type = "ratelimiter"
config = { rate_per_sec = 0.001, burst = 3, key = "client_ip" }
'''
    d = dispa(targets=[("a", origin.url)], extra=extra)
    statuses = [http_get(d.port, "/")[0] for _ in range(5)]
    assert statuses == [200, 200, 200, 429, 429]
    _, headers, _ = http_get(d.port, "/")
    assert "retry-after" in headers


def test_builtin_compression_negotiates_and_streams(dispa, origin):
    extra = '''
[[plugins.plugins]]
name = "gz"
type = "compression"
config = { min_length = 10, content_types = ["text/", "application/octet-stream", "application/json"] }
'''
    d = dispa(targets=[("a", origin.url)], extra=extra)
    status, headers, body = http_get(d.port, "/headers", headers={"accept-encoding": "gzip"})
    assert status == 200 and headers["content-encoding"] == "gzip"
    assert gzip.decompress(body).startswith(b"[[")
    status, headers, body = http_get(d.port, "/headers", headers={"accept-encoding": "zstd"})
    assert headers["content-encoding"] == "zstd"
    assert zstandard.ZstdDecompressor().decompressobj().decompress(body).startswith(b"[[")
    status, headers, body = http_get(d.port, "/headers")
    assert "content-encoding" not in headers and body.startswith(b"[[")


def test_wasm_plugin_sets_headers_both_ways(dispa, origin):
    extra = f'''
[[plugins.plugins]]
name = "wasm"
type = "wasm"
config = {{ module_path = "{WAT}" }}
'''
    d = dispa(targets=[("a", origin.url)], extra=extra)
    status, headers, _ = http_get(d.port, "/")
    assert status == 200
    assert upstream_header(origin, b"x-wasm-plugin") == b"add_header"
    assert headers["x-served-by"] == "dispa-wasm"


def test_wasm_plugin_short_circuits(dispa, origin, tmp_path):
    wat = tmp_path / "deny.wat"
    result = '{"short_circuit":{"status":403,"body":"denied by wasm"}}'
    escaped = result.replace('"', '\\"')
    wat.write_text(f'''(module
  (memory (export "memory") 1)
  (data (i32.const 1024) "{escaped}")
  (global $heap (mut i32) (i32.const 8192))
  (func (export "alloc") (param i32) (result i32)
    (local $p i32) (local.set $p (global.get $heap))
    (global.set $heap (i32.add (global.get $heap) (local.get 0))) (local.get $p))
  (func (export "dealloc") (param i32 i32) (global.set $heap (i32.const 8192)))
  (func (export "dispa_get_result_len") (result i32) (i32.const {len(result)}))
  (func (export "dispa_on_request") (param i32 i32) (result i32) (i32.const 1024))
  (func (export "dispa_on_response") (param i32 i32) (result i32) (i32.const 0)))
''')
    extra = f'''
[[plugins.plugins]]
name = "deny"
type = "wasm"
stage = "request"
config = {{ module_path = "{wat}" }}
'''
    d = dispa(targets=[("a", origin.url)], extra=extra)
    status, _, body = http_get(d.port, "/")
    assert status == 403 and body == b"denied by wasm"
    assert origin.requests == []


def test_cache_hits_revalidates_and_coalesces(dispa, origin):
    extra = '''
[[plugins.plugins]]
name = "cache"
type = "cache"
timeout = 15
'''
    d = dispa(targets=[("a", origin.url)], extra=extra)
    status, headers, body = http_get(d.port, "/cacheable?max_age=60")
    assert status == 200 and body == b"version 1" and headers["x-cache"] == "MISS"
    status, headers, body = http_get(d.port, "/cacheable?max_age=60")
    assert body == b"version 1" and headers["x-cache"] == "HIT"
    assert origin.served["/cacheable"] == 1
    # a client conditional request is answered 304 from the cache
    status, headers, body = http_get(d.port, "/cacheable?max_age=60",
                                     headers={"if-none-match": '"v1"'})
    assert status == 304 and body == b""
    # a miss storm on a slow key: one upstream request
    url = "/cacheable?max_age=60&delay=300&k=storm"
    with concurrent.futures.ThreadPoolExecutor(8) as ex:
        results = list(ex.map(lambda _: http_get(d.port, url), range(8)))
    assert all(r[0] == 200 for r in results)
    assert len({r[2] for r in results}) == 1
    storm = [t for _, t, _, _ in origin.requests if b"k=storm" in t]
    assert len(storm) == 1, storm


def test_cache_revalidates_a_stale_entry_with_a_conditional_request(dispa, origin):
    extra = '''
[[plugins.plugins]]
name = "cache"
type = "cache"
'''
    d = dispa(targets=[("a", origin.url)], extra=extra)
    url = "/cacheable?cc=max-age%3D0"
    assert http_get(d.port, url)[2] == b"version 1"
    status, headers, body = http_get(d.port, url)
    assert status == 200 and body == b"version 1" and headers["x-cache"] == "REVALIDATED"
    assert upstream_header(origin, b"if-none-match") == b'"v1"'
    assert origin.served["/cacheable"] == 1


def test_command_plugin_short_circuits_and_sets_headers(dispa, origin):
    script = ROOT / "tests" / "support" / "plugins" / "ndjson_filter.py"
    extra = f'''
[[plugins.plugins]]
name = "cmd"
type = "command"
timeout = 5
config = {{ exec = "{script}", exec_allowlist = ["{script}"], timeout_ms = 3000, max_concurrency = 2 }}
'''
    d = dispa(targets=[("a", origin.url)], extra=extra)
    status, headers, body = http_get(d.port, "/block")
    assert status == 403 and body == b"blocked" and headers["x-blocked-by"] == "cmd"
    assert origin.requests == []
    status, headers, _ = http_get(d.port, "/hello?q=1")
    assert status == 200
    assert upstream_header(origin, b"x-seen-path") == b"/hello"
    assert upstream_header(origin, b"x-seen-query") == b"q=1"
    assert headers["x-upstream-status"] == "200"  # response stage
    pids = {http_get(d.port, "/")[1].get("x-resp-pid") for _ in range(6)}
    assert len(pids) <= 2  # a pool of long-lived processes, not one per request


def test_cache_purge_through_the_admin_api(dispa, origin):
    import json
    import time

    extra = '''
[[plugins.plugins]]
name = "edge"
type = "cache"
'''
    d = dispa(targets=[("a", origin.url)], extra=extra)
    assert http_get(d.port, "/cacheable?max_age=600")[1]["x-cache"] == "MISS"
    assert http_get(d.port, "/cacheable?max_age=600")[1]["x-cache"] == "HIT"

    def post(body):
        c = http.client.HTTPConnection("127.0.0.1", d.admin_port, timeout=10)
        c.request("POST", "/admin/cache/purge", body=json.dumps(body),
                  headers={"Content-Type": "application/json"})
        r = c.getresponse()
        return r.status, json.loads(r.read())

    status, body = post({"prefix": "GET|http|example.com|/cacheable"})
    assert status == 200 and body["caches"] == ["edge"]
    assert post({"prefix": "x", "plugin": "nope"})[0] == 400
    assert post({"bogus": 1})[0] == 400
    deadline = time.monotonic() + 10
    seen = []
    while time.monotonic() < deadline:  # the purge reaches the worker asynchronously
        seen.append(http_get(d.port, "/cacheable?max_age=600")[1]["x-cache"])
        if seen[-1] == "MISS":
            break
    assert seen[-1] == "MISS" and origin.served["/cacheable"] == 2
