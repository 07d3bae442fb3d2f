"""``[websocket]`` and ``[[l4.listeners]]`` in the configuration file: compiled into the
snapshot, and every mistake refused with the file's line and field."""

from __future__ import annotations

import pytest

from dispa.config.load import load_config_text
from dispa.errors import ConfigError

BASE = """
[[targets.targets]]
name = "d"
url = "http://127.0.0.1:9001"

[[target_groups]]
name = "tcp"
[[target_groups.targets]]
name = "a"
url = "http://127.0.0.1:9000"
"""


def errors(text: str) -> str:
    with pytest.raises(ConfigError) as exc:
        load_config_text(BASE + text, fmt="toml", name="c.toml")
    return str(exc.value)


def test_defaults_compile_to_nothing():
    snap = load_config_text(BASE, fmt="toml").snapshot
    assert snap.websocket is None and snap.l4 is None


def test_websocket_and_listeners_compile():
    snap = load_config_text(BASE + """
[websocket]
max_message_size = 1024
ping_interval = 5

[[l4.listeners]]
name = "pg"
bind_address = "127.0.0.1:7000"
target_group = "tcp"
proxy_protocol_send = "v2"

[[l4.listeners]]
name = "dns"
protocol = "udp"
bind_address = "[::1]:7053"
target_group = "default"
idle_timeout = 30
""", fmt="toml").snapshot
    assert snap.websocket == {"max_message_size": 1024, "idle_timeout_seconds": 3600.0,
                              "ping_interval_seconds": 5.0, "ping_timeout_seconds": 20.0}
    pg, dns = snap.l4["listeners"]
    assert (pg["host"], pg["port"], pg["proxy_protocol_send"]) == ("127.0.0.1", 7000, "v2")
    assert (dns["host"], dns["protocol"], dns["idle_timeout_seconds"]) == ("::1", "udp", 30.0)


def test_mistakes_are_reported_with_line_and_field():
    msg = errors("""
[websocket]
ping_timeout = 0

[[l4.listeners]]
name = "x"
bind_address = "127.0.0.1:8080"
target_group = "nope"
protocol = "udp"
proxy_protocol_accept = true

[[l4.listeners]]
name = "x"
bind_address = "not an address"
target_group = "tcp"
trusted_proxies = ["10.0.0.300"]
""")
    assert "c.toml:13: websocket.ping_timeout" in msg  # BASE is 11 lines
    assert "l4.listeners[0].target_group: unknown target group 'nope'" in msg
    assert "l4.listeners[0].bind_address: 127.0.0.1:8080 (tcp)" not in msg  # udp: no clash
    assert "l4.listeners[0].proxy_protocol_accept: accepting the PROXY protocol is TCP only" \
        in msg
    assert "l4.listeners[1].name: duplicate l4 listener 'x'" in msg
    assert "l4.listeners[1].bind_address" in msg
    assert "l4.listeners[1].trusted_proxies: trusted_proxies needs proxy_protocol_accept" in msg
    assert "l4.listeners[1].trusted_proxies[0]: not an IP address" in msg


def test_an_l4_listener_cannot_take_the_http_address():
    msg = errors("""
[server]
bind_address = "127.0.0.1:8080"

[[l4.listeners]]
name = "x"
bind_address = "127.0.0.1:8080"
target_group = "tcp"
""")
    assert "l4.listeners[0].bind_address: 127.0.0.1:8080 (tcp) is already used by " \
           "server.bind_address" in msg


def test_unknown_keys_are_refused():
    msg = errors("""
[[l4.listeners]]
name = "x"
bind_address = "127.0.0.1:7000"
target_group = "tcp"
proxy_protcol_send = "v1"
""")
    assert "proxy_protcol_send" in msg


def test_a_udp_listener_may_send_proxy_protocol_v2_but_not_v1():
    def udp(version):
        return f"""
[[l4.listeners]]
name = "dns"
protocol = "udp"
bind_address = "127.0.0.1:7053"
target_group = "tcp"
proxy_protocol_send = "{version}"
"""
    snap = load_config_text(BASE + udp("v2"), fmt="toml").snapshot
    assert snap.l4["listeners"][0]["proxy_protocol_send"] == "v2"
    assert "l4.listeners[0].proxy_protocol_send: PROXY protocol v1 is TCP only" in errors(udp("v1"))
