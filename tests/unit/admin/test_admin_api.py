"""The master's admin HTTP server, driven by real HTTP clients on 127.0.0.1."""

from __future__ import annotations

import asyncio
import http.client
import json
import socket
import threading
import time

import pytest
import uvloop

from dispa.admin.api import AdminServer
from dispa.errors import StartupError
from dispa.observability import logs


class FakeProvider:
    def __init__(self):
        self.healthy = True
        self.level = "info"
        self.fail = False

    async def metrics_text(self) -> str:
        if self.fail:
            raise RuntimeError("secret internals")
        return "# HELP dispa_workers Live workers.\n# TYPE dispa_workers gauge\ndispa_workers 2\n"

    async def metrics_json(self) -> dict:
        return {"counters": [], "histograms": [], "gauges": [], "requests_total": 5}

    def status(self) -> dict:
        if self.fail:
            raise RuntimeError("secret internals")
        return {"workers": [{"id": 1, "pid": 123}], "version": "0.1.0"}

    def config(self) -> dict:
        return {"server": {"bind": "0.0.0.0:8080"}, "password": "***"}

    def health(self) -> tuple[bool, dict]:
        return self.healthy, {"workers": 2}

    def set_log_level(self, level: str) -> None:
        logs._parse_level(level)  # raises ValueError like the real master
        self.level = level.lower()

    def log_level(self) -> str:
        return self.level


class Running:
    """An AdminServer on its own event loop in a thread, so tests use blocking clients."""

    def __init__(self, provider, loop_factory=asyncio.new_event_loop, **kw):
        self.provider = provider
        self.loop = loop_factory()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = AdminServer(provider, **kw)
        self.call(self.server.start([("127.0.0.1", 0)]))
        self.port = self.server.ports[0]

    def call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    def stop(self):
        self.call(self.server.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@pytest.fixture
def provider():
    return FakeProvider()


@pytest.fixture(params=[asyncio.new_event_loop, uvloop.new_event_loop],
                ids=["asyncio", "uvloop"])
def admin(request, provider):
    r = Running(provider, request.param)
    yield r
    r.stop()


def request(port, method, path, body=None, headers=None):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        c.request(method, path, body=body, headers=headers or {})
        r = c.getresponse()
        return r.status, dict(r.getheaders()), r.read()
    finally:
        c.close()


def raw(port, data: bytes, read_timeout=5.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=read_timeout) as s:
        s.sendall(data)
        chunks = []
        while True:
            try:
                b = s.recv(65536)
            except (ConnectionResetError, socket.timeout):
                break
            if not b:
                break
            chunks.append(b)
        return b"".join(chunks)


def status_of(resp: bytes) -> int:
    return int(resp.split(b" ", 2)[1])


def test_start_on_port_zero_exposes_the_bound_port_and_sockets(admin):
    assert admin.port > 0
    assert admin.server.sockets and admin.server.sockets[0].getsockname()[1] == admin.port


def test_health_is_200_when_healthy(admin):
    st, h, body = request(admin.port, "GET", "/health")
    assert st == 200
    assert h["Content-Type"] == "application/json"
    assert int(h["Content-Length"]) == len(body)
    assert json.loads(body) == {"workers": 2, "status": "healthy"}


def test_health_is_503_when_unhealthy(admin, provider):
    provider.healthy = False
    st, _, body = request(admin.port, "GET", "/health")
    assert st == 503 and json.loads(body)["status"] == "unhealthy"


def test_metrics_is_prometheus_text(admin):
    st, h, body = request(admin.port, "GET", "/metrics")
    assert st == 200
    assert h["Content-Type"].startswith("text/plain; version=0.0.4")
    assert b"dispa_workers 2" in body


def test_metrics_json(admin):
    st, _, body = request(admin.port, "GET", "/metrics/json?pretty=1")
    assert st == 200 and json.loads(body)["requests_total"] == 5


def test_admin_status_and_config(admin):
    st, _, body = request(admin.port, "GET", "/admin/status")
    assert st == 200 and json.loads(body)["workers"][0]["pid"] == 123
    st, _, body = request(admin.port, "GET", "/admin/config")
    assert st == 200 and json.loads(body)["password"] == "***"


def test_log_level_get_and_put(admin, provider):
    st, _, body = request(admin.port, "GET", "/admin/log-level")
    assert st == 200 and json.loads(body) == {"level": "info"}
    st, _, body = request(admin.port, "PUT", "/admin/log-level", body=b'{"level":"debug"}',
                          headers={"Content-Type": "application/json"})
    assert st == 200 and json.loads(body) == {"level": "debug", "previous": "info"}
    assert provider.level == "debug"
    st, _, body = request(admin.port, "GET", "/admin/log-level")
    assert json.loads(body) == {"level": "debug"}


@pytest.mark.parametrize("body", [b'{"level":"loud"}', b"not json", b"[]", b'{"level": 3}',
                                  b"", b'{"lvl":"debug"}'])
def test_put_log_level_rejects_bad_input_with_400(admin, provider, body):
    st, h, resp = request(admin.port, "PUT", "/admin/log-level", body=body)
    assert st == 400 and h["Content-Type"] == "application/json"
    assert "error" in json.loads(resp)
    assert provider.level == "info"


def test_unknown_path_is_404_json(admin):
    st, _, body = request(admin.port, "GET", "/nope")
    assert st == 404 and json.loads(body)["error"].startswith("no such endpoint")


def test_wrong_method_is_405_with_allow(admin):
    st, h, body = request(admin.port, "POST", "/health", body=b"{}")
    assert st == 405 and h["Allow"] == "GET, HEAD"
    st, h, _ = request(admin.port, "DELETE", "/admin/log-level")
    assert st == 405 and h["Allow"] == "GET, PUT, HEAD"


def test_head_returns_headers_without_body(admin):
    resp = raw(admin.port, b"HEAD /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    head, _, rest = resp.partition(b"\r\n\r\n")
    assert status_of(resp) == 200 and b"Content-Length: " in head and rest == b""


def test_provider_exception_is_500_without_traceback(admin, provider):
    provider.fail = True
    for path in ("/metrics", "/admin/status"):
        st, _, body = request(admin.port, "GET", path)
        assert st == 500
        assert json.loads(body)["error"] == "internal error"
        assert b"secret" not in body and b"Traceback" not in body


@pytest.mark.parametrize("line", [
    b"GARBAGE\r\n\r\n",
    b"GET /health\r\n\r\n",
    b"GET /health HTTP/1.1 extra\r\n\r\n",
    b"GET /health FTP/1.0\r\n\r\n",
    b"G@T /health HTTP/1.1\r\n\r\n",
    b"GET health HTTP/1.1\r\n\r\n",
    b"GET /health HTTP/1.1\r\nbad header\r\n\r\n",
    b"GET /health HTTP/1.1\r\nX: a\r\n folded\r\n\r\n",
    b"GET /health HTTP/1.1\r\nContent-Length: abc\r\n\r\n",
    b"GET /health HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
])
def test_malformed_requests_are_400(admin, line):
    resp = raw(admin.port, line)
    assert status_of(resp) == 400
    assert b'"error"' in resp and b"Connection: close" in resp


def test_http2_version_is_505(admin):
    assert status_of(raw(admin.port, b"GET /health HTTP/2.0\r\n\r\n")) == 505


def test_huge_head_is_431(admin):
    resp = raw(admin.port, b"GET /health HTTP/1.1\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n")
    assert status_of(resp) == 431


def test_huge_head_without_end_is_431(admin):
    resp = raw(admin.port, b"GET /health HTTP/1.1\r\nX-Big: " + b"a" * 9000)
    assert status_of(resp) == 431


def test_body_over_64k_is_413(admin):
    resp = raw(admin.port, b"PUT /admin/log-level HTTP/1.1\r\nContent-Length: 70000\r\n\r\n"
               + b"x" * 70000)
    assert status_of(resp) == 413


def test_transfer_encoding_is_refused(admin):
    resp = raw(admin.port, b"PUT /admin/log-level HTTP/1.1\r\nTransfer-Encoding: chunked\r\n"
               b"\r\n0\r\n\r\n")
    assert status_of(resp) == 501


def test_keep_alive_serves_several_requests_on_one_connection(admin):
    c = http.client.HTTPConnection("127.0.0.1", admin.port, timeout=5)
    try:
        for path in ("/health", "/metrics", "/nope", "/admin/log-level"):
            c.request("GET", path)
            r = c.getresponse()
            r.read()
            assert r.getheader("Connection") == "keep-alive"
        c.request("PUT", "/admin/log-level", body=b'{"level":"warning"}')
        r = c.getresponse()
        assert r.status == 200 and json.loads(r.read())["level"] == "warning"
    finally:
        c.close()


def test_pipelined_requests_are_answered_in_order(admin):
    resp = raw(admin.port, b"GET /health HTTP/1.1\r\n\r\n"
               b"PUT /admin/log-level HTTP/1.1\r\nContent-Length: 17\r\n\r\n{\"level\":\"error\"}"
               b"GET /nope HTTP/1.1\r\nConnection: close\r\n\r\n")
    statuses = [int(part[:3]) for part in resp.split(b"HTTP/1.1 ")[1:]]
    assert statuses == [200, 200, 404]


def test_http10_closes_by_default(admin):
    resp = raw(admin.port, b"GET /health HTTP/1.0\r\n\r\n")
    assert status_of(resp) == 200 and b"Connection: close" in resp


def test_bare_lf_line_endings_are_tolerated(admin):
    resp = raw(admin.port, b"GET /health HTTP/1.1\nConnection: close\n\n")
    assert status_of(resp) == 200


def test_idle_connection_is_closed_after_the_idle_timeout(provider):
    r = Running(provider, idle_timeout=0.3, header_timeout=0.3)
    try:
        with socket.create_connection(("127.0.0.1", r.port), timeout=5) as s:
            t0 = time.monotonic()
            assert s.recv(100) == b""  # server closed without a response
            assert time.monotonic() - t0 < 3
        with socket.create_connection(("127.0.0.1", r.port), timeout=5) as s:
            s.sendall(b"GET /hea")  # partial head: header timeout answers 408
            data = b""
            while chunk := s.recv(1000):  # the server closes after the 408
                data += chunk
            assert status_of(data) == 408
    finally:
        r.stop()


def test_address_in_use_is_a_startup_error_naming_the_address(admin, provider):
    async def go():
        other = AdminServer(provider)
        await other.start([("127.0.0.1", admin.port)])

    with pytest.raises(StartupError, match=f"127.0.0.1:{admin.port}.*in use"):
        admin.call(go())


def test_failed_second_listener_closes_the_first(admin, provider):
    other = AdminServer(provider)
    with pytest.raises(StartupError):
        admin.call(other.start([("127.0.0.1", 0), ("127.0.0.1", admin.port)]))
    assert other.sockets == []


def test_close_drops_open_keep_alive_connections(provider):
    r = Running(provider)
    c = http.client.HTTPConnection("127.0.0.1", r.port, timeout=5)
    c.request("GET", "/health")
    c.getresponse().read()
    r.stop()
    with pytest.raises((ConnectionError, http.client.HTTPException, OSError)):
        c.request("GET", "/health")
        c.getresponse()
    c.close()
