"""gRPC through Dispa: grpcio client -> Dispa (h2c downstream) -> h2c target group ->
grpcio server, all on 127.0.0.1. Unary, server-streaming, client-streaming and bidi calls,
status codes and trailing metadata, grpc-timeout deadlines, an upstream that is down, and
per-method metrics."""

from __future__ import annotations

import threading
import time
from concurrent import futures

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from tests.support.dispa_proc import DispaProcess, free_port, render_config, wait_for

SERVICE = "test.Echo"
SLEEPING = threading.Event()  # set while a "sleep" call runs in the backend


def _handlers():
    def unary(req, ctx):
        if req == b"fail":
            ctx.set_trailing_metadata((("x-detail", "because"),))
            ctx.abort(grpc.StatusCode.INVALID_ARGUMENT, "bad request body")
        if req.startswith(b"sleep"):
            SLEEPING.set()
            time.sleep(float(req[5:]))
            SLEEPING.clear()
        ctx.set_trailing_metadata((("x-trailer", "t1"),))
        return b"echo:" + req

    def server_stream(req, ctx):
        for i in range(int(req)):
            yield b"item%d" % i

    def client_stream(it, ctx):
        return b"|".join(it)

    def bidi(it, ctx):
        for m in it:
            yield m.upper()

    ident = dict(request_deserializer=None, response_serializer=None)
    return grpc.method_handlers_generic_handler(SERVICE, {
        "Unary": grpc.unary_unary_rpc_method_handler(unary, **ident),
        "ServerStream": grpc.unary_stream_rpc_method_handler(server_stream, **ident),
        "ClientStream": grpc.stream_unary_rpc_method_handler(client_stream, **ident),
        "Bidi": grpc.stream_stream_rpc_method_handler(bidi, **ident),
    })


@pytest.fixture(scope="module")
def backend():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    server.add_generic_rpc_handlers((_handlers(),))
    hs = health.HealthServicer()
    hs.set("", health_pb2.HealthCheckResponse.SERVING)
    hs.set("down", health_pb2.HealthCheckResponse.NOT_SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(hs, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield port
    server.stop(0)


@pytest.fixture(scope="module")
def dispa(tmp_path_factory, backend):
    dead = free_port()  # nothing listens here
    port, admin = free_port(), free_port()
    extra = f"""
[http2]
enabled = true

[[target_groups]]
name = "down"
protocol = "h2c"
max_retries = 0
[[target_groups.targets]]
name = "dead"
url = "http://127.0.0.1:{dead}"

[routing]
[[routing.rules]]
name = "down"
target = "down"
[routing.rules.conditions.path]
prefix = "/down."
"""
    cfg = render_config(port=port, admin_port=admin,
                        targets=[("g1", f"http://127.0.0.1:{backend}")], extra=extra)
    cfg = cfg.replace("[[targets.targets]]", '[targets]\nprotocol = "h2c"\n\n[[targets.targets]]', 1)
    path = tmp_path_factory.mktemp("grpc") / "dispa.toml"
    path.write_text(cfg)
    proc = DispaProcess(path, port=port, admin_port=admin).wait_ready()
    yield proc
    proc.stop()


@pytest.fixture()
def channel(dispa):
    ch = grpc.insecure_channel(f"127.0.0.1:{dispa.port}")
    yield ch
    ch.close()


def _call(ch, name, kind="unary_unary"):
    return getattr(ch, kind)(f"/{SERVICE}/{name}")


def test_unary_round_trip_with_trailers(channel):
    resp, call = _call(channel, "Unary").with_call(b"hello", timeout=10)
    assert resp == b"echo:hello"
    assert call.code() == grpc.StatusCode.OK
    assert ("x-trailer", "t1") in tuple(call.trailing_metadata())


def test_status_code_and_message_pass_through(channel):
    with pytest.raises(grpc.RpcError) as err:
        _call(channel, "Unary")(b"fail", timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details() == "bad request body"
    assert ("x-detail", "because") in tuple(err.value.trailing_metadata())


def test_server_streaming(channel):
    items = list(_call(channel, "ServerStream", "unary_stream")(b"50", timeout=10))
    assert items == [b"item%d" % i for i in range(50)]


def test_client_streaming(channel):
    resp = _call(channel, "ClientStream", "stream_unary")(
        iter([b"a", b"b" * 100000, b"c"]), timeout=10)
    assert resp == b"a|" + b"b" * 100000 + b"|c"


def test_bidi_streaming(channel):
    out = list(_call(channel, "Bidi", "stream_stream")(
        iter([b"x%d" % i for i in range(100)]), timeout=10))
    assert out == [b"X%d" % i for i in range(100)]


def test_concurrent_calls_share_the_connection(channel):
    with futures.ThreadPoolExecutor(16) as ex:
        got = list(ex.map(lambda i: _call(channel, "Unary")(b"%d" % i, timeout=10),
                          range(200)))
    assert got == [b"echo:%d" % i for i in range(200)]


def test_deadline_exceeded_is_mapped(channel, dispa):
    t0 = time.monotonic()
    with pytest.raises(grpc.RpcError) as err:
        _call(channel, "Unary")(b"sleep3", timeout=0.5)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - t0 < 2.5


def test_upstream_down_is_unavailable(channel, dispa):
    with pytest.raises(grpc.RpcError) as err:
        channel.unary_unary("/down.Svc/Call")(b"x", timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "connect" in err.value.details()


def test_health_check_through_dispa_and_direct(channel, backend):
    stub = health_pb2_grpc.HealthStub(channel)
    r = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
    assert r.status == health_pb2.HealthCheckResponse.SERVING
    from dispa.proxy.grpc import health_check
    assert health_check("127.0.0.1", backend) is True
    assert health_check("127.0.0.1", backend, service="down") is False
    assert health_check("127.0.0.1", free_port(), timeout=0.5) is False


def test_per_method_metrics(channel, dispa):
    _call(channel, "Unary")(b"m", timeout=10)
    with pytest.raises(grpc.RpcError):
        channel.unary_unary("/down.Svc/Metric")(b"x", timeout=10)

    def grpc_lines():
        _, body = dispa.admin_get("/metrics")
        lines = [ln for ln in body.decode().splitlines()
                 if ln.startswith("dispa_grpc_requests_total{")]
        ok = [ln for ln in lines if 'method="/test.Echo/Unary"' in ln and 'code="0"' in ln]
        down = [ln for ln in lines if 'method="/down.Svc/Metric"' in ln and 'code="14"' in ln]
        return (ok, down) if ok and down else None
    ok, down = wait_for(grpc_lines, what="per-method gRPC metrics")
    assert float(ok[0].rsplit(" ", 1)[1]) >= 1 and float(down[0].rsplit(" ", 1)[1]) == 1


def test_h2_over_tls_upstream(tmp_path):
    """protocol = "h2": a TLS gRPC backend (ALPN h2), verified against a pinned CA."""
    from tests.support.pki import CA, cert_pem, key_pem
    ca = CA()
    cert, key = ca.issue("grpc.test", dns=["grpc.test"], ips=["127.0.0.1"])
    (tmp_path / "ca.crt").write_bytes(ca.pem)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((_handlers(),))
    creds = grpc.ssl_server_credentials([(key_pem(key), cert_pem(cert))])
    gport = server.add_secure_port("127.0.0.1:0", creds)
    server.start()
    port, admin = free_port(), free_port()
    extra = f"""
[http2]
enabled = true

[tls.upstream]
ca_file = "{tmp_path / 'ca.crt'}"
server_name = "grpc.test"
"""
    cfg = render_config(port=port, admin_port=admin,
                        targets=[("g1", f"https://127.0.0.1:{gport}")], extra=extra)
    cfg = cfg.replace("[[targets.targets]]", '[targets]\nprotocol = "h2"\n\n[[targets.targets]]', 1)
    path = tmp_path / "dispa.toml"
    path.write_text(cfg)
    proc = DispaProcess(path, port=port, admin_port=admin).wait_ready()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            assert ch.unary_unary(f"/{SERVICE}/Unary")(b"tls", timeout=10) == b"echo:tls"
            items = list(ch.unary_stream(f"/{SERVICE}/ServerStream")(b"5", timeout=10))
            assert items == [b"item%d" % i for i in range(5)]
    finally:
        proc.stop()
        server.stop(0)


def test_upstream_streams_exhausted_is_resource_exhausted(tmp_path):
    """One upstream connection (pool.max_total = 1) whose server allows one stream: a second
    concurrent call cannot be placed and gets RESOURCE_EXHAUSTED, the first succeeds."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4),
                         options=[("grpc.max_concurrent_streams", 1)])
    server.add_generic_rpc_handlers((_handlers(),))
    gport = server.add_insecure_port("127.0.0.1:0")
    server.start()
    port, admin = free_port(), free_port()
    cfg = render_config(port=port, admin_port=admin,
                        targets=[("g1", f"http://127.0.0.1:{gport}")],
                        extra="[http2]\nenabled = true\n")
    cfg = cfg.replace("[[targets.targets]]",
                      '[targets]\nprotocol = "h2c"\nmax_retries = 0\n\n[targets.pool]\n'
                      'max_total = 1\nmax_idle = 1\n\n[[targets.targets]]', 1)
    path = tmp_path / "dispa.toml"
    path.write_text(cfg)
    proc = DispaProcess(path, port=port, admin_port=admin).wait_ready()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            assert ch.unary_unary(f"/{SERVICE}/Unary")(b"warm", timeout=10) == b"echo:warm"
            slow = ch.unary_unary(f"/{SERVICE}/Unary").future(b"sleep1", timeout=10)
            wait_for(SLEEPING.is_set, what="the slow call holding the only upstream stream")
            with pytest.raises(grpc.RpcError) as err:
                ch.unary_unary(f"/{SERVICE}/Unary")(b"x", timeout=10)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert slow.result() == b"echo:sleep1"
    finally:
        proc.stop()
        server.stop(0)


def test_active_health_checks_of_grpc_upstreams_use_grpc_health(tmp_path, backend):
    """h2c target groups are probed with grpc.health.v1 (an HTTP/1.1 GET would fail against
    a gRPC server and mark it down): SERVING is healthy, NOT_SERVING is not."""
    sick = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    hs = health.HealthServicer()
    hs.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(hs, sick)
    sick_port = sick.add_insecure_port("127.0.0.1:0")
    sick.start()
    port, admin = free_port(), free_port()
    extra = f"""
[http2]
enabled = true

[[target_groups]]
name = "sick"
protocol = "h2c"
[[target_groups.targets]]
name = "s"
url = "http://127.0.0.1:{sick_port}"
[target_groups.health_check]
interval = 1
timeout = 1
healthy_threshold = 1
unhealthy_threshold = 1
"""
    cfg = render_config(port=port, admin_port=admin,
                        targets=[("g1", f"http://127.0.0.1:{backend}")], extra=extra,
                        health={"enabled": True, "interval": 1, "timeout": 1,
                                "healthy_threshold": 1, "unhealthy_threshold": 1})
    cfg = cfg.replace("[[targets.targets]]", '[targets]\nprotocol = "h2c"\n\n[[targets.targets]]', 1)
    path = tmp_path / "dispa.toml"
    path.write_text(cfg)
    proc = DispaProcess(path, port=port, admin_port=admin).wait_ready()
    try:
        good, bad = f"default/127.0.0.1:{backend}", f"sick/127.0.0.1:{sick_port}"

        def probed():
            h = proc.status()["health"]
            return good in h and bad in h and h[good].get("at") and h[bad].get("at") and h

        h = wait_for(probed, 20, "both endpoints probed")
        assert h[good]["ok"] is True and h[good]["healthy"] is True, h[good]
        wait_for(lambda: proc.status()["health"][bad]["healthy"] is False, 20,
                 "the NOT_SERVING endpoint marked unhealthy")
        assert "NOT_SERVING" in proc.status()["health"][bad]["detail"] or \
            proc.status()["health"][bad]["ok"] is False
    finally:
        proc.stop()
        sick.stop(0)
