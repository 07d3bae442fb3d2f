"""gRPC health checking of upstreams: ``grpc.health.v1.Health/Check`` over HTTP/2.

A sans-I/O request/response pair built with the ``h2`` library, and an asyncio probe with
the shape of ``dispa.balancer.health.tcp_probe``: ``await grpc_probe(endpoint, spec)``
returns ``(ok, detail)``, ok only for ``SERVING``. It lives here (protocols) so that the
active health checker (balancer) can use it without importing the proxy.

Only ``HealthCheckRequest.service`` (field 1) and ``HealthCheckResponse.status`` (field 1)
are needed, so the two protobuf messages are encoded by hand (tag 0x0a, length-delimited;
tag 0x08, varint) instead of depending on generated code.
"""

from __future__ import annotations

import asyncio
import ssl
import struct

import h2.config
import h2.connection
import h2.events
import h2.exceptions

SERVING = 1
_contexts: dict[tuple, ssl.SSLContext] = {}


def h2_client_context(spec: dict | None) -> ssl.SSLContext:
    """A client TLS context offering ALPN h2, for the settings of ``[tls.upstream]`` (or a
    cluster's own table): shared by the upstream h2 pool and the gRPC health probe."""
    spec = spec or {}
    key = (bool(spec.get("verify", True)), spec.get("ca_file") or "",
           spec.get("cert_file") or "", spec.get("key_file") or "")
    ctx = _contexts.get(key)
    if ctx is None:
        ctx = ssl.create_default_context(cafile=key[1] or None)
        if not key[0]:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        if key[2]:
            ctx.load_cert_chain(key[2], key[3] or None)
        ctx.set_alpn_protocols(["h2"])
        _contexts[key] = ctx
    return ctx
_PATH = b"/grpc.health.v1.Health/Check"


def health_request(service: str) -> bytes:
    """A HealthCheckRequest message in gRPC length-prefixed framing."""
    raw = service.encode()
    msg = (b"\x0a" + _varint(len(raw)) + raw) if raw else b""
    return b"\x00" + struct.pack(">I", len(msg)) + msg


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def response_status(body: bytes) -> int | None:
    """HealthCheckResponse.status from a gRPC-framed message (0 when absent: UNKNOWN)."""
    if len(body) < 5 or body[0] != 0:
        return None
    msg = body[5:5 + struct.unpack(">I", body[1:5])[0]]
    i = 0
    while i < len(msg):
        tag = msg[i]
        i += 1
        if tag == 0x08:  # field 1, varint
            value = shift = 0
            while i < len(msg):
                b = msg[i]
                i += 1
                value |= (b & 0x7F) << shift
                shift += 7
                if not b & 0x80:
                    return value
            return None
        return None  # other fields are not expected in a HealthCheckResponse
    return 0


async def grpc_probe(endpoint, spec, tls=None, service: str = "") -> tuple[bool, str]:
    """One ``Health/Check`` call to ``endpoint`` within ``spec.timeout_seconds``.

    ``tls``: an ``UpstreamTls``-like object (``context``, ``server_name``) for h2 over TLS;
    None for h2c. Returns (ok, detail)."""
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True,
                                                                header_encoding=None))
    writer = None
    try:
        async with asyncio.timeout(spec.timeout_seconds):
            if tls is None:
                reader, writer = await asyncio.open_connection(endpoint.host, endpoint.port)
            else:
                reader, writer = await asyncio.open_connection(
                    endpoint.host, endpoint.port, ssl=tls.context,
                    server_hostname=tls.server_name)
            conn.initiate_connection()
            sid = conn.get_next_available_stream_id()
            authority = (spec.host or f"{endpoint.host}:{endpoint.port}").encode()
            conn.send_headers(sid, [
                (b":method", b"POST"), (b":scheme", b"https" if tls else b"http"),
                (b":authority", authority), (b":path", _PATH),
                (b"content-type", b"application/grpc"), (b"te", b"trailers"),
                (b"user-agent", b"dispa-health-check")])
            conn.send_data(sid, health_request(service), end_stream=True)
            writer.write(conn.data_to_send())
            body = b""
            grpc_status = None
            while True:
                data = await reader.read(65536)
                if not data:
                    return False, "connection closed"
                for ev in conn.receive_data(data):
                    if isinstance(ev, h2.events.DataReceived):
                        body += ev.data
                        conn.acknowledge_received_data(ev.flow_controlled_length, sid)
                    elif isinstance(ev, (h2.events.ResponseReceived,
                                         h2.events.TrailersReceived)):
                        for n, v in ev.headers:
                            if n == b"grpc-status" and v.isdigit():
                                grpc_status = int(v)
                    elif isinstance(ev, h2.events.StreamEnded):
                        if grpc_status != 0:
                            return False, f"grpc-status {grpc_status}"
                        status = response_status(body)
                        if status == SERVING:
                            return True, "SERVING"
                        return False, f"health status {status}"
                    elif isinstance(ev, (h2.events.StreamReset,
                                         h2.events.ConnectionTerminated)):
                        return False, "stream reset"
                out = conn.data_to_send()
                if out:
                    writer.write(out)
    except TimeoutError:
        return False, "timeout"
    except (OSError, ssl.SSLError) as exc:
        return False, getattr(exc, "strerror", None) or str(exc)
    except h2.exceptions.ProtocolError as exc:
        return False, f"HTTP/2 error: {exc}"
    finally:
        if writer is not None:
            writer.close()
