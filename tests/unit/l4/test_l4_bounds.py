"""L4 bookkeeping that needs no upstream: counters that never go backwards across a
listener's replacement, and the bounds on UDP memory (pending datagrams, send buffers)."""

from __future__ import annotations

import asyncio

from dispa.l4.manager import L4Manager, drain_margin
from dispa.l4.udp import _MAX_PENDING_BYTES, UDP_SEND_BUFFER_LIMIT, UdpSession
from tests.support.dispa_proc import free_port


class FakeMetrics:
    def __init__(self):
        self.collectors = []
        self.gauges = {}

    def set_help(self, *a):
        pass

    def add_collector(self, fn):
        self.collectors.append(fn)

    def set_gauge(self, name, labels, value):
        self.gauges[(name, labels)] = value

    def collect(self) -> dict:
        out: dict = {}
        for fn in self.collectors:
            fn(out)
        return out


class FakeServer:
    def __init__(self):
        self.metrics = FakeMetrics()
        self.sessions = set()
        self.runtime = None


def udp_spec(name: str, port: int) -> dict:
    return {"name": name, "protocol": "udp", "host": "127.0.0.1", "port": port,
            "target_group": "g", "proxy_protocol_send": "none",
            "proxy_protocol_accept": False, "trusted_proxies": [], "max_connections": 10,
            "idle_timeout_seconds": 30.0, "connect_timeout_seconds": 1.0, "backlog": 16}


def tcp_spec(name: str, port: int) -> dict:
    return dict(udp_spec(name, port), protocol="tcp")


def test_a_replaced_listener_keeps_its_counters_and_a_retired_one_folds_in():
    async def main():
        server = FakeServer()
        mgr = L4Manager(server)
        server.l4 = mgr
        key = ("dispa_l4_connections_total", (("listener", "dns"),))
        await mgr.start({"listeners": [tcp_spec("dns", free_port())]})
        first = mgr.listeners["dns"]
        first.opened = 5
        first.active.add(object())  # a connection still running
        counters = server.metrics.collect()
        assert counters[key] == 5
        # the address changes: a new listener under the same name
        await mgr.start({"listeners": [tcp_spec("dns", free_port())]})
        second = mgr.listeners["dns"]
        assert second is not first
        second.opened = 1
        first.opened = 6  # the old listener's session is still counted
        assert server.metrics.collect()[key] == 7  # old + new, never backwards
        first.active.clear()  # its last connection ended: folded into the retired total
        assert server.metrics.collect()[key] == 7
        assert mgr._old == [] and mgr._retired["dns"] is first
        # a third replacement adds to the same retired total, not a longer list
        await mgr.start({"listeners": [udp_spec("dns", free_port())]})
        mgr.listeners["dns"].opened = 2
        assert server.metrics.collect()[key] == 9
        assert mgr._old == [] and list(mgr._retired) == ["dns"]
        # the collection is idempotent (the dict passed in keeps the last values)
        out = server.metrics.collect()
        for fn in server.metrics.collectors:
            fn(out)
        assert out[key] == 9
        mgr.drain()

    asyncio.run(main())


class FullTransport:
    """A datagram transport whose user-space buffer is over the limit."""

    def __init__(self, size: int):
        self.size = size
        self.sent = []

    def is_closing(self):
        return False

    def get_write_buffer_size(self):
        return self.size

    def sendto(self, data, addr=None):
        self.sent.append(data)


def test_udp_never_queues_without_bound():
    server = FakeServer()
    mgr = L4Manager(server)
    from dispa.l4.manager import L4Listener
    lst = L4Listener(server, udp_spec("u", 1))
    # the listening socket's send buffer is full: replies are dropped and counted
    lst.handle = FullTransport(UDP_SEND_BUFFER_LIMIT + 1)
    assert lst.sendto(b"x", ("127.0.0.1", 5)) is False and lst.dropped == 1
    lst.handle.size = 0
    assert lst.sendto(b"x", ("127.0.0.1", 5)) is True and lst.handle.sent == [b"x"]
    # a session whose upstream socket is still opening holds at most _MAX_PENDING_BYTES
    s = UdpSession(lst, ("127.0.0.1", 6))
    for _ in range(20):
        s.send(b"z" * 16384)
    assert s.pending_bytes <= _MAX_PENDING_BYTES
    assert len(s.pending) == _MAX_PENDING_BYTES // 16384
    assert lst.dropped == 1 + 20 - len(s.pending)
    # and once open, a full upstream send buffer drops instead of queueing
    s.transport = FullTransport(UDP_SEND_BUFFER_LIMIT + 1)
    s.send(b"y")
    assert s.transport.sent == [] and lst.dropped == 1 + 20 - len(s.pending) + 1
    assert mgr.listeners == {}


def test_the_drain_margin_leaves_time_to_flush_within_the_deadline():
    assert drain_margin(30.0) == 1.0
    assert drain_margin(1.5) == 0.15
    assert 0 < drain_margin(0.01) < 0.01
