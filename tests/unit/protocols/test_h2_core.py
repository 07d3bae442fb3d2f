"""The sans-I/O HTTP/2 core (dispa.protocols.http2), protocol detection
(dispa.server.detect) and gRPC helpers (dispa.proxy.grpc), driven in memory with an h2
client connection: no sockets."""

from __future__ import annotations

import base64

import h2.config
import h2.connection
import h2.events
import h2.settings
import hpack
import pytest
from h2.errors import ErrorCodes
from hyperframe.frame import ContinuationFrame, GoAwayFrame, HeadersFrame

from dispa.protocols.http2 import PREFACE, Abuse, H2Core, H2Limits, parse_priority
from dispa.protocols.http2.grpc_health import health_request, response_status
from dispa.proxy.grpc import grpc_status_for_http, parse_grpc_timeout
from dispa.server.detect import classify, upgrade_request

REQ = [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"a.test"),
       (b":path", b"/")]


def pair(**limits):
    server = H2Core(H2Limits(enabled=True, **limits))
    server.initiate()
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True,
                                                                  header_encoding=None))
    client.initiate_connection()
    server.receive(client.data_to_send())
    client.receive_data(server.data_to_send())
    server.receive(client.data_to_send())
    return server, client


def test_settings_are_advertised():
    server, client = pair(max_concurrent_streams=7, initial_window_size=1000,
                          header_table_size=1024, max_header_list_size=2048)
    rs = client.remote_settings
    assert rs.max_concurrent_streams == 7 and rs.initial_window_size == 1000
    assert rs.header_table_size == 1024 and rs.max_header_list_size == 2048
    assert rs.enable_push == 0  # a server never advertises push (RFC 9113 §6.5.2)
    assert client.outbound_flow_control_window > 1 << 20  # connection window raised


def test_request_events():
    server, client = pair()
    client.send_headers(1, REQ, end_stream=True)
    events = server.receive(client.data_to_send())
    assert isinstance(events[0], h2.events.RequestReceived)
    assert dict(events[0].headers)[b":path"] == b"/"


def test_rapid_reset_is_refused():
    server, client = pair(max_resets_per_window=10)
    with pytest.raises(Abuse) as err:
        for i in range(20):
            sid = client.get_next_available_stream_id()
            client.send_headers(sid, REQ, end_stream=True)
            client.reset_stream(sid, ErrorCodes.CANCEL)
            server.receive(client.data_to_send())
    assert err.value.kind == "rapid_reset"
    server.calm_down(err.value.kind)
    frames = server.data_to_send()
    assert frames and GoAwayFrame.type in frames[3:4]


def test_ping_and_settings_floods_are_refused():
    server, client = pair(max_control_frames_per_window=50)
    with pytest.raises(Abuse) as err:
        for i in range(60):
            client.ping(i.to_bytes(8, "big"))
            server.receive(client.data_to_send())
    assert err.value.kind == "control_flood"
    server, client = pair(max_control_frames_per_window=50)
    with pytest.raises(Abuse):
        for i in range(60):
            client.update_settings({h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: i + 1})
            server.receive(client.data_to_send())


def test_continuation_flood_is_refused():
    server, _ = pair(max_header_block_frames=4)
    frames = HeadersFrame(1, data=hpack.Encoder().encode(REQ)).serialize()
    frames += b"".join(ContinuationFrame(1, data=b"\x40\x01a\x01b").serialize()
                       for _ in range(10))
    with pytest.raises(Abuse) as err:
        server.receive(frames)
    assert err.value.kind == "continuation_flood"


def test_hpack_bomb_is_refused():
    server, _ = pair(max_header_list_size=4096)
    enc = hpack.Encoder()
    big = (b"x-big", b"a" * 3000)
    block = enc.encode(REQ + [big]) + enc.encode([big]) * 50
    with pytest.raises(Abuse) as err:
        server.receive(HeadersFrame(1, data=block, flags=["END_HEADERS", "END_STREAM"]
                                    ).serialize())
    assert err.value.kind == "hpack_bomb"


@pytest.mark.parametrize("value, expected", [
    (None, (3, False)), (b"u=0", (0, False)), (b"u=5, i", (5, True)), (b"i=?0, u=1", (1, False)),
    (b"u=9", (3, False)), (b"u=x, i=?1", (3, True)), ("u=2;foo", (2, False)),
])
def test_priority_field(value, expected):
    assert parse_priority(value) == expected


def test_detection():
    assert classify(PREFACE, True) == "h2"
    assert classify(PREFACE[:10], True) == "more"
    assert classify(b"\x16\x03\x01\x00", True) == "tls"
    assert classify(b"\x16\x03\x01\x00", False) == "reject"
    assert classify(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", True) == "http1"
    assert classify(b"GET / HTTP/1.1\r\nHo", True) == "more"
    assert classify(b"\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n", True) == "http1"
    assert classify(b"INVALID CONNECTION PREFACE\r\n\r\n", True) == "reject"
    settings = base64.urlsafe_b64encode(b"\x00\x03\x00\x00\x00\x64").rstrip(b"=")
    up = (b"GET /x HTTP/1.1\r\nHost: a.test\r\nConnection: Upgrade, HTTP2-Settings\r\n"
          b"Upgrade: h2c\r\nHTTP2-Settings: " + settings + b"\r\nAccept: */*\r\n\r\n")
    assert classify(up, True) == "h2c-upgrade"
    s, headers, method = upgrade_request(up[:-4])
    assert s == settings and method == b"GET"
    assert (b":path", b"/x") in headers and (b":authority", b"a.test") in headers
    assert (b"accept", b"*/*") in headers
    # a body, or no HTTP2-Settings: served as HTTP/1.1
    assert classify(up.replace(b"Accept", b"Content-Length: 5\r\nX"), True) == "http1"
    assert classify(up.replace(b"HTTP2-Settings: ", b"X-S: "), True) == "http1"


def test_grpc_helpers():
    assert parse_grpc_timeout(b"100m") == pytest.approx(0.1)
    assert parse_grpc_timeout(b"2S") == 2.0 and parse_grpc_timeout(b"1H") == 3600.0
    assert parse_grpc_timeout(b"12x") is None and parse_grpc_timeout(b"123456789S") is None
    assert grpc_status_for_http(503) == 14 and grpc_status_for_http(401) == 16
    assert grpc_status_for_http(404) == 12 and grpc_status_for_http(418) == 2
    assert health_request("") == b"\x00\x00\x00\x00\x00"
    assert health_request("svc") == b"\x00\x00\x00\x00\x05\x0a\x03svc"
    assert response_status(b"\x00\x00\x00\x00\x02\x08\x01") == 1
    assert response_status(b"\x00\x00\x00\x00\x02\x08\x02") == 2
    assert response_status(b"\x00\x00\x00\x00\x00") == 0


def test_extended_connect_setting_follows_the_websocket_switch():
    """RFC 8441 §3: SETTINGS_ENABLE_CONNECT_PROTOCOL = 1 only with ``[http2] websocket``;
    h2 then accepts ``:protocol`` on a CONNECT."""
    server, client = pair()
    assert client.remote_settings.enable_connect_protocol == 1
    client.send_headers(1, [(b":method", b"CONNECT"), (b":protocol", b"websocket"),
                            (b":scheme", b"https"), (b":authority", b"a.test"),
                            (b":path", b"/chat")])
    ev = server.receive(client.data_to_send())[0]
    assert isinstance(ev, h2.events.RequestReceived)
    assert (b":protocol", b"websocket") in ev.headers
    _, client = pair(websocket=False)
    assert client.remote_settings.enable_connect_protocol == 0


def test_websocket_accept_value():
    from dispa.proxy.h2_websocket import accept_for
    # RFC 6455 §1.3's example
    assert accept_for(b"dGhlIHNhbXBsZSBub25jZQ==") == b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
