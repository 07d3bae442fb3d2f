"""The HTTP/1.1 data path through a real dispa-server to real origins on 127.0.0.1."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time

import pytest

from tests.support.dispa_proc import free_port, http_get, read_one_response


def raw_exchange(port: int, data: bytes, *, timeout: float = 5.0, until_close: bool = True,
                 expect_responses: int | None = None) -> bytes:
    """Send raw bytes, read until the server closes (or ``expect_responses`` heads arrive)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        s.sendall(data)
        out = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = s.recv(65536)
            except socket.timeout:
                break
            if not chunk:
                break
            out += chunk
            if expect_responses is not None and out.count(b"HTTP/1.1 ") >= expect_responses \
                    and _complete(out, expect_responses):
                break
        return out
    finally:
        s.close()


def _complete(out: bytes, n: int) -> bool:
    # good enough for Content-Length responses in these tests
    pos = 0
    for _ in range(n):
        end = out.find(b"\r\n\r\n", pos)
        if end < 0:
            return False
        head = out[pos:end].lower()
        cl = 0
        for line in head.split(b"\r\n"):
            if line.startswith(b"content-length:"):
                cl = int(line.split(b":")[1])
        pos = end + 4 + cl
        if pos > len(out):
            return False
    return True


def _upstream_connections(port: int) -> int:
    import subprocess
    out = subprocess.run(["ss", "-Htn", "state", "established", f"( dport = :{port} )"],
                         capture_output=True, text=True).stdout
    return len(out.splitlines())


@pytest.fixture
def proxy(dispa, origin):
    return dispa(targets=[("a", origin.url)])


def test_a_get_is_proxied_with_forwarding_headers_and_a_request_id(proxy, origin):
    status, headers, body = http_get(proxy.port, "/headers?x=1", host="example.com")
    assert status == 200
    got = {k.lower(): v for k, v in json.loads(body)}
    assert got["host"] == "example.com"
    assert got["x-forwarded-for"] == "127.0.0.1"
    assert got["x-forwarded-proto"] == "http"
    assert got["x-forwarded-host"] == "example.com"
    assert got["forwarded"] == 'for=127.0.0.1;proto=http;host="example.com"'
    assert got["via"] == "1.1 dispa"
    assert got["x-request-id"] and headers["x-request-id"] == got["x-request-id"]
    assert origin.targets() == [b"/headers?x=1"]


def test_an_incoming_request_id_is_propagated_once(proxy):
    _, headers, body = http_get(proxy.port, "/headers", headers={"X-Request-Id": "abc-123"})
    ids = [v for k, v in json.loads(body) if k.lower() == "x-request-id"]
    assert ids == ["abc-123"] and headers["x-request-id"] == "abc-123"


def test_spoofed_forwarding_headers_from_an_untrusted_peer_are_replaced(proxy):
    _, _, body = http_get(proxy.port, "/headers", headers={
        "X-Forwarded-For": "6.6.6.6", "X-Forwarded-Proto": "https", "Forwarded": "for=6.6.6.6"})
    got = {k.lower(): v for k, v in json.loads(body)}
    assert got["x-forwarded-for"] == "127.0.0.1"
    assert got["x-forwarded-proto"] == "http"
    assert "6.6.6.6" not in got["forwarded"]


def test_forwarding_headers_from_a_trusted_proxy_are_extended(dispa, origin):
    d = dispa(targets=[("a", origin.url)], server_extra='trusted_proxies = ["127.0.0.0/8"]')
    _, _, body = http_get(d.port, "/headers", headers={
        "X-Forwarded-For": "203.0.113.9", "X-Forwarded-Proto": "https", "Via": "1.1 edge"})
    got = {k.lower(): v for k, v in json.loads(body)}
    assert got["x-forwarded-for"] == "203.0.113.9, 127.0.0.1"
    assert got["x-forwarded-proto"] == "https"
    assert got["via"] == "1.1 edge, 1.1 dispa"


def test_hop_by_hop_headers_and_those_named_in_connection_are_removed(proxy):
    _, _, body = http_get(proxy.port, "/headers", headers={
        "Connection": "keep-alive, X-Secret", "X-Secret": "1", "Keep-Alive": "timeout=5",
        "TE": "trailers", "Proxy-Connection": "keep-alive", "X-Kept": "yes"})
    names = {k.lower() for k, _ in json.loads(body)}
    assert "x-kept" in names
    assert not names & {"x-secret", "keep-alive", "te", "proxy-connection", "connection"}


@pytest.mark.parametrize("host,expected", [
    ("example.com", 200), ("EXAMPLE.com:8080", 200), ("api.myapp.com", 200),
    ("a.test.com", 200), ("deep.a.test.com", 200), ("test.com", 404),
    ("health.example.com", 404), ("ping.test.com", 404), ("other.org", 404),
    ("x.dev.local", 200),
])
def test_domain_interception_exact_wildcard_and_exclusions(dispa, origin, host, expected):
    d = dispa(targets=[("a", origin.url)], domains={
        "intercept_domains": ["example.com", "*.test.com", "api.myapp.com", "*.dev.local",
                              "health.example.com"],
        "exclude_domains": ["health.example.com", "ping.test.com"],
        "wildcard_support": True})
    status, _, body = http_get(d.port, host=host)
    assert status == expected
    if expected == 404:
        assert origin.requests == []


def test_a_non_intercepted_host_gets_the_configured_answer(dispa, origin):
    d = dispa(targets=[("a", origin.url)], domains={
        "intercept_domains": ["example.com"], "reject_status": 421,
        "reject_body": "not here\n"})
    status, _, body = http_get(d.port, host="nope.org")
    assert (status, body) == (421, b"not here\n")
    assert origin.requests == []


def test_wildcards_are_ignored_when_wildcard_support_is_off(dispa, origin):
    d = dispa(targets=[("a", origin.url)], domains={
        "intercept_domains": ["example.com"], "wildcard_support": False})
    assert http_get(d.port, host="example.com")[0] == 200


def test_upstream_keep_alive_connections_are_reused(proxy, origin):
    c = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=5)
    for i in range(20):
        c.request("GET", f"/n{i}", headers={"Host": "example.com"})
        assert c.getresponse().read() == b"ok from origin-a"
    c.close()
    for i in range(5):
        assert http_get(proxy.port, f"/m{i}")[0] == 200
    assert origin.connections == 1


def test_a_pooled_connection_the_server_closed_is_detected_before_reuse(proxy, origin):
    assert http_get(proxy.port, "/close?n=5")[0] == 200  # origin closes after this one
    assert http_get(proxy.port, "/")[0] == 200
    assert http_get(proxy.port, "/")[0] == 200


def test_post_bodies_with_content_length_and_chunked_are_forwarded(proxy, origin):
    status, _, body = http_get(proxy.port, "/echo", method="POST", body=b"hello world")
    assert (status, body) == (200, b"hello world")
    c = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=5)
    c.request("POST", "/echo", body=iter([b"ab", b"cde", b"f"]),
              headers={"Host": "example.com", "Transfer-Encoding": "chunked"}, encode_chunked=True)
    r = c.getresponse()
    assert r.read() == b"abcdef"
    c.close()
    assert origin.requests[-1][3] == b"abcdef"


def test_chunked_and_close_delimited_responses_reach_the_client(proxy):
    status, headers, body = http_get(proxy.port, "/chunked?n=4&size=1000")
    assert status == 200 and len(body) == 4000 and headers.get("transfer-encoding") == "chunked"
    status, headers, body = http_get(proxy.port, "/close?n=3000")
    assert status == 200 and body == b"c" * 3000
    # an HTTP/1.0 client gets a close-delimited body instead of chunks
    out = raw_exchange(proxy.port, b"GET /chunked?n=2&size=5 HTTP/1.0\r\nHost: example.com\r\n\r\n")
    head, _, body = out.partition(b"\r\n\r\n")
    assert b"chunked" not in head.lower() and body == b"aaaaabbbbb"


def test_head_204_and_304_have_no_body(proxy):
    out = raw_exchange(proxy.port, b"HEAD / HTTP/1.1\r\nHost: example.com\r\nConnection: close\r\n\r\n")
    head, _, body = out.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"content-length: 16" in head.lower() and body == b""
    for code in (204, 304):
        out = raw_exchange(proxy.port, f"GET /status/{code} HTTP/1.1\r\nHost: example.com\r\n"
                                       "Connection: close\r\n\r\n".encode())
        head, _, body = out.partition(b"\r\n\r\n")
        assert head.startswith(f"HTTP/1.1 {code}".encode()) and body == b""


def test_pipelined_requests_are_answered_in_order(proxy):
    req = b"".join(f"GET /delay?ms={ms} HTTP/1.1\r\nHost: example.com\r\n\r\n".encode()
                   for ms in (200, 0, 50))
    req += b"GET /status/201 HTTP/1.1\r\nHost: example.com\r\nConnection: close\r\n\r\n"
    out = raw_exchange(proxy.port, req, timeout=10)
    assert out.count(b"HTTP/1.1 200 ") == 3
    assert out.index(b"HTTP/1.1 201") > out.rindex(b"HTTP/1.1 200 ")


def test_expect_100_continue(proxy):
    s = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
    s.sendall(b"POST /echo HTTP/1.1\r\nHost: example.com\r\nContent-Length: 5\r\n"
              b"Expect: 100-continue\r\n\r\n")
    interim = b""
    while not interim.endswith(b"\r\n\r\n"):
        chunk = s.recv(100)
        assert chunk, "closed before the interim response"
        interim += chunk
    assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
    s.sendall(b"hello")
    data = b""
    while not data.endswith(b"hello"):
        chunk = s.recv(4096)
        if not chunk:
            break
        data += chunk
    s.close()
    assert data.startswith(b"HTTP/1.1 200") and data.endswith(b"hello")


def test_connect_refused_gives_502_with_a_short_body(dispa):
    dead = free_port()
    d = dispa(targets=[("dead", f"http://127.0.0.1:{dead}")])
    status, _, body = http_get(d.port)
    assert status == 502
    assert body == b"upstream connection refused\n"


def test_a_slow_upstream_gives_504(dispa, origin):
    d = dispa(targets=[("a", origin.url)],
              extra="")  # per-target timeout below
    text = d.config_path.read_text().replace('weight = 1', 'weight = 1\ntimeout = 1')
    d.config_path.write_text(text)
    import signal
    d.signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while d.status()["reloads"]["ok"] < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    t0 = time.monotonic()
    status, _, body = http_get(d.port, "/delay?ms=3000", timeout=10)
    assert status == 504 and body == b"upstream timed out\n"
    assert 0.9 < time.monotonic() - t0 < 2.5


def _reload_with(d, old: str, new: str) -> None:
    import signal
    d.config_path.write_text(d.config_path.read_text().replace(old, new))
    before = d.status()["reloads"]["ok"]
    d.signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while d.status()["reloads"]["ok"] <= before and time.monotonic() < deadline:
        time.sleep(0.05)


def test_a_response_body_may_outlast_the_endpoint_timeout_while_it_progresses(dispa, origin):
    d = dispa(targets=[("a", origin.url)], extra="[targets.pool]\nread_timeout = 5\n")
    _reload_with(d, "weight = 1", "weight = 1\ntimeout = 1")
    status, _, body = http_get(d.port, "/stall?ms=1500", timeout=10)
    assert (status, body) == (200, b"1234567890")


def test_an_upstream_that_stalls_mid_body_hits_the_read_timeout(dispa, origin):
    d = dispa(targets=[("a", origin.url)], extra="[targets.pool]\nread_timeout = 1\n")
    s = socket.create_connection(("127.0.0.1", d.port), timeout=10)
    s.sendall(b"GET /stall?ms=4000 HTTP/1.1\r\nHost: example.com\r\n\r\n")
    t0 = time.monotonic()
    data = b""
    while True:
        chunk = s.recv(4096)
        if not chunk:
            break
        data += chunk
    elapsed = time.monotonic() - t0
    s.close()
    assert data.startswith(b"HTTP/1.1 200") and data.endswith(b"12345")  # cut short
    assert 0.9 < elapsed < 3.0


def test_a_slow_upload_that_keeps_progressing_outlasts_the_endpoint_timeout(dispa, origin):
    d = dispa(targets=[("a", origin.url)])
    _reload_with(d, "weight = 1", "weight = 1\ntimeout = 1")

    def body():
        for _ in range(8):
            time.sleep(0.25)
            yield b"x" * 100

    c = http.client.HTTPConnection("127.0.0.1", d.port, timeout=10)
    c.request("POST", "/echo", body=body(), headers={"Host": "example.com", "Content-Length": "800"})
    r = c.getresponse()
    assert r.status == 200 and r.read() == b"x" * 800
    c.close()


def test_a_client_disconnect_aborts_the_upstream_request(proxy, origin):
    s = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
    s.sendall(b"GET /delay?ms=2000 HTTP/1.1\r\nHost: example.com\r\n\r\n")
    deadline = time.monotonic() + 5
    while not origin.targets() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert _upstream_connections(origin.port) == 1
    s.close()
    # the proxy drops its upstream connection long before the origin would have answered
    deadline = time.monotonic() + 1.0
    while _upstream_connections(origin.port) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert _upstream_connections(origin.port) == 0


def test_retry_on_another_endpoint_when_connect_fails(dispa, origin):
    dead = free_port()
    d = dispa(targets=[("dead", f"http://127.0.0.1:{dead}"), ("a", origin.url)])
    for _ in range(6):
        status, _, body = http_get(d.port)
        assert status == 200 and body == b"ok from origin-a"


@pytest.mark.parametrize("lb", ["roundrobin", "weighted", "leastconnections", "random"])
def test_load_balancing_spreads_requests(dispa, origins, lb):
    a, b = origins("a"), origins("b")
    d = dispa(targets=[("a", a.url, 3), ("b", b.url, 1)], lb=lb)
    counts = {b"ok from a": 0, b"ok from b": 0}
    for _ in range(80):
        counts[http_get(d.port)[2]] += 1
    assert counts[b"ok from a"] > 0 and counts[b"ok from b"] > 0
    if lb == "weighted":
        assert counts[b"ok from a"] == 60
    if lb == "roundrobin":
        assert counts[b"ok from a"] == 40


def test_active_health_checks_take_a_dead_endpoint_out_and_bring_it_back(dispa, origins):
    a, b = origins("a"), origins("b")
    d = dispa(targets=[("a", a.url), ("b", b.url)],
              health={"enabled": True, "interval": 0.3, "timeout": 0.25, "healthy_threshold": 1,
                      "unhealthy_threshold": 1, "path": "/status/200"})
    b_port = b.port
    b.stop()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        _, body = d.admin_get("/metrics")
        if b'target="b"' in body and [l for l in body.splitlines()
                                       if l.startswith(b"dispa_target_health") and b'target="b"' in l and l.endswith(b" 0")]:
            break
        time.sleep(0.1)
    else:
        raise AssertionError("endpoint b never marked unhealthy")
    for _ in range(10):
        assert http_get(d.port)[2] == b"ok from a"
    from tests.support.origin import Origin
    b2 = Origin("b", port=b_port).start()
    try:
        deadline = time.monotonic() + 10
        seen = set()
        while time.monotonic() < deadline and b"ok from b" not in seen:
            seen.add(http_get(d.port)[2])
        assert b"ok from b" in seen
    finally:
        b2.stop()


def test_upgrade_requests_are_tunnelled(dispa):
    # a tiny upgrade-speaking origin: answers 101 then echoes bytes reversed
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    port = srv.getsockname()[1]

    def serve():
        c, _ = srv.accept()
        data = b""
        while b"\r\n\r\n" not in data:
            data += c.recv(4096)
        c.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: echo\r\nConnection: Upgrade\r\n\r\n")
        while True:
            msg = c.recv(4096)
            if not msg:
                break
            c.sendall(msg[::-1])
        c.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    d = dispa(targets=[("u", f"http://127.0.0.1:{port}")])
    s = socket.create_connection(("127.0.0.1", d.port), timeout=5)
    s.sendall(b"GET /ws HTTP/1.1\r\nHost: example.com\r\nUpgrade: echo\r\nConnection: Upgrade\r\n\r\n")
    head = b""
    while b"\r\n\r\n" not in head:
        head += s.recv(4096)
    assert head.startswith(b"HTTP/1.1 101")
    assert b"upgrade: echo" in head.lower()
    s.sendall(b"abc")
    echoed = b""
    while len(echoed) < 3:
        chunk = s.recv(10)
        assert chunk, "tunnel closed early"
        echoed += chunk
    assert echoed == b"cba"
    s.close()
    srv.close()


def test_a_slow_request_head_gets_408_after_the_header_timeout(dispa, origin):
    d = dispa(targets=[("a", origin.url)], server_extra="header_timeout = 1")
    s = socket.create_connection(("127.0.0.1", d.port), timeout=5)
    s.sendall(b"GET / HTTP/1.1\r\nHost: exa")
    t0 = time.monotonic()
    data = b""
    while True:
        chunk = s.recv(4096)
        if not chunk:
            break
        data += chunk
    s.close()
    assert data.startswith(b"HTTP/1.1 408") and b"connection: close" in data.lower()
    assert 0.9 < time.monotonic() - t0 < 2.0
    assert origin.requests == []


def test_an_idle_keep_alive_connection_is_closed_after_the_keep_alive_timeout(dispa, origin):
    d = dispa(targets=[("a", origin.url)], server_extra="keep_alive_timeout = 1")
    s = socket.create_connection(("127.0.0.1", d.port), timeout=5)
    s.sendall(b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n")
    status, _, body = read_one_response(s)
    assert status == 200 and body == b"ok from origin-a"
    t0 = time.monotonic()
    assert s.recv(4096) == b""  # closed by the proxy, without a response
    assert 0.9 < time.monotonic() - t0 < 2.0
    s.close()


def test_absolute_form_targets_are_intercepted_by_their_authority(dispa, origin):
    d = dispa(targets=[("a", origin.url)], domains={"intercept_domains": ["example.com"]})
    out = raw_exchange(d.port, b"GET http://admin.internal/x HTTP/1.1\r\nHost: example.com\r\n"
                               b"Connection: close\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 404")
    assert origin.requests == []
    out = raw_exchange(d.port, b"GET http://example.com/x?q=1 HTTP/1.1\r\nHost: admin.internal\r\n"
                               b"Connection: close\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 200")
    method, target, headers, _ = origin.requests[0]
    assert target == b"/x?q=1"
    assert [v for k, v in headers if k == b"host"] == [b"example.com"]
