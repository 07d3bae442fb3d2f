"""TCP and UDP listeners of a running dispa-server, against real servers on loopback:
load balancing (round robin, least connections, client-IP hashing), health checks and
failover, PROXY protocol v1/v2 sent (parsed by the test's own upstream) and accepted (from
HAProxy's ``send-proxy-v2``), connection limits, idle timeouts, UDP sessions."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import socket
import struct
import subprocess
import time

import pytest

from tests.support.dispa_proc import free_port, render_config, wait_for

V2_SIG = b"\r\n\r\n\x00\r\nQUIT\n"


# -------------------------------------------------------------------------- helpers


def parse_proxy_header(data: bytes):
    """The test's own reading of a PROXY header: (version, src, dst, rest). Written from
    HAProxy's proxy-protocol.txt, independent of dispa/l4/proxy_protocol.py."""
    if data.startswith(b"PROXY "):
        line, rest = data.split(b"\r\n", 1)
        _, proto, src, dst, sport, dport = line.decode().split(" ")
        return 1, (src, int(sport)), (dst, int(dport)), rest
    assert data.startswith(V2_SIG), data[:16]
    ver_cmd, fam, length = data[12], data[13], struct.unpack("!H", data[14:16])[0]
    assert ver_cmd == 0x21 and fam == 0x11, (ver_cmd, fam)  # v2 PROXY, TCP over IPv4
    body = data[16:16 + length]
    src, dst = socket.inet_ntoa(body[0:4]), socket.inet_ntoa(body[4:8])
    sport, dport = struct.unpack("!HH", body[8:12])
    return 2, (src, sport), (dst, dport), data[16 + length:]


class TcpUpstream:
    """Answers ``<name>\\n`` then echoes; with ``proxy_header``, first reads a PROXY header
    and answers ``<name> <src ip>:<src port>\\n``. Counts open connections."""

    def __init__(self, name: str, *, proxy_header: bool = False):
        self.name = name
        self.proxy_header = proxy_header
        self.open = 0
        self.accepted = 0
        self.eofs = 0  # connections whose client half-closed (a FIN, not a reset)
        self.headers = []
        self.server = None
        self.port = 0

    async def start(self):
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _handle(self, reader, writer):
        self.open += 1
        self.accepted += 1
        try:
            greeting = self.name.encode()
            if self.proxy_header:
                data = b""
                while True:
                    data += await reader.read(4096)
                    if data.startswith(b"PROXY ") and b"\r\n" in data or \
                            data.startswith(V2_SIG) and len(data) >= 16 and \
                            len(data) >= 16 + struct.unpack("!H", data[14:16])[0]:
                        break
                hdr = parse_proxy_header(data)
                self.headers.append(hdr)
                greeting += f" {hdr[1][0]}:{hdr[1][1]}".encode()
            writer.write(greeting + b"\n")
            if self.proxy_header and hdr[3]:
                writer.write(hdr[3])  # bytes that came with the header: echoed too
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
            self.eofs += 1
            writer.write(b"<eof>")  # the client's half-close reached us
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            self.open -= 1
            writer.close()


def config(upstreams, listeners: str, *, lb: str = "roundrobin", health: str = "",
           extra: str = "", server_extra: str = "") -> tuple[str, int, int]:
    port, admin = free_port(), free_port()
    text = render_config(port=port, admin_port=admin, server_extra=server_extra,
                         targets=[("unused", f"http://127.0.0.1:{free_port()}")], extra="")
    text += '\n[[target_groups]]\nname = "tcp"\n'
    for i, u in enumerate(upstreams):
        text += f'[[target_groups.targets]]\nname = "u{i}"\nurl = "http://127.0.0.1:{u}"\n'
    text += f'[target_groups.load_balancing]\ntype = "{lb}"\n'
    text += "[target_groups.health_check]\n" + (health or "enabled = false\n")
    text += listeners + extra
    return text, port, admin


def listener(port: int, **kw) -> str:
    """One ``[[l4.listeners]]`` table; ``kw`` adds or overrides keys."""
    keys = {"name": "l4test", "bind_address": f"127.0.0.1:{port}", "target_group": "tcp"}
    keys.update(kw)
    lines = ["[[l4.listeners]]"]
    for k, v in keys.items():
        if isinstance(v, bool):
            v = "true" if v else "false"
        elif isinstance(v, (str, list)):
            v = json.dumps(v)
        lines.append(f"{k} = {v}")
    return "\n".join(lines) + "\n"


def start(dispa, text, port, admin, workers="1"):
    return dispa(config_text=text, port=port, admin_port=admin, workers=workers)


def metric(d, prefix: str) -> float:
    _, body = d.admin_get("/metrics")
    for line in body.decode().splitlines():
        if line.startswith(prefix + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def closed_by_peer(reader) -> bool:
    """The proxy closed the connection without sending a byte (a FIN, or a reset when our
    unread bytes were still queued on its side)."""
    try:
        return await asyncio.wait_for(reader.read(), 10) == b""
    except ConnectionResetError:
        return True


async def tcp_connect(port: int, local_ip: str = "127.0.0.1"):
    return await asyncio.open_connection("127.0.0.1", port, local_addr=(local_ip, 0))


# -------------------------------------------------------------------------- TCP


def test_tcp_round_robin_echo_and_half_close(dispa):
    async def main():
        a, b = await TcpUpstream("A").start(), await TcpUpstream("B").start()
        lport = free_port()
        text, port, admin = config([a.port, b.port], listener(lport))
        d = start(dispa, text, port, admin)
        names = []
        for _ in range(4):
            r, w = await tcp_connect(lport)
            names.append((await r.readline()).strip().decode())
            payload = bytes(range(256)) * 4096  # 1 MiB each way
            w.write(payload)
            w.write_eof()  # half-close: the upstream sees EOF and still answers
            got = await asyncio.wait_for(r.readexactly(len(payload) + 5), 20)
            assert got == payload + b"<eof>"
            assert await r.read() == b""
            w.close()
        return d, names

    d, names = asyncio.run(asyncio.wait_for(main(), 60))
    assert names == ["A", "B", "A", "B"]
    assert metric(d, 'dispa_l4_connections_total{listener="l4test"}') == 4
    assert metric(d, 'dispa_l4_bytes_total{listener="l4test",direction="in"}') == 4 << 20


def test_least_connections_sends_a_new_connection_to_the_least_busy_endpoint(dispa):
    async def main():
        ups = [await TcpUpstream(n).start() for n in "ABC"]
        lport = free_port()
        text, port, admin = config([u.port for u in ups], listener(lport),
                                   lb="leastconnections")
        d = start(dispa, text, port, admin)
        conns = []
        for _ in range(3):
            r, w = await tcp_connect(lport)
            conns.append(((await r.readline()).strip().decode(), r, w))
        assert sorted(c[0] for c in conns) == ["A", "B", "C"]
        freed = conns[1][0]
        conns[1][2].close()
        # poll Dispa's own count (its release of the endpoint), not the upstream's: the
        # upstream closes its side before Dispa has read that close
        deadline = time.monotonic() + 10
        while metric(d, 'dispa_l4_active_connections{listener="l4test"}') != 2:
            assert time.monotonic() < deadline, "the closed connection is still counted"
            await asyncio.sleep(0.02)
        r, w = await tcp_connect(lport)
        assert (await r.readline()).strip().decode() == freed  # round robin would differ
        for c in conns:
            c[2].close()
        w.close()

    asyncio.run(asyncio.wait_for(main(), 60))


def test_consistent_hash_keeps_each_client_ip_on_one_endpoint(dispa):
    async def main():
        ups = [await TcpUpstream(n).start() for n in "ABC"]
        lport = free_port()
        text, port, admin = config([u.port for u in ups], listener(lport),
                                   lb="consistent_hash")
        start(dispa, text, port, admin)
        seen = {}
        for rnd in range(2):
            for i in range(2, 22):
                ip = f"127.0.0.{i}"
                r, w = await tcp_connect(lport, ip)
                name = (await r.readline()).strip().decode()
                w.close()
                if rnd == 0:
                    seen[ip] = name
                else:
                    assert seen[ip] == name, ip  # stable per client IP
        return seen

    seen = asyncio.run(asyncio.wait_for(main(), 60))
    assert len(set(seen.values())) >= 2  # and spread over endpoints


def test_a_dead_endpoint_is_failed_over_then_health_checked_out(dispa):
    async def main():
        live = await TcpUpstream("L").start()
        dead_port = free_port()  # nothing listens there
        lport = free_port()
        text, port, admin = config(
            [dead_port, live.port], listener(lport),
            health="enabled = true\ninterval = 0.3\ntimeout = 0.25\nunhealthy_threshold = 1\n"
                   "healthy_threshold = 1\n")
        d = start(dispa, text, port, admin)
        # the master's TCP connect check marks it down
        wait_for(lambda: any(not v.get("healthy", True) for v in
                             d.status().get("health", {}).values()), 20,
                 "the dead endpoint to be marked unhealthy")
        failures = metric(d, 'dispa_l4_upstream_connect_failures_total{listener="l4test"}')
        for _ in range(6):
            r, w = await tcp_connect(lport)
            assert (await r.readline()).strip() == b"L"
            w.close()
        # no more connects to the dead endpoint once it is out
        assert metric(d, 'dispa_l4_upstream_connect_failures_total{listener="l4test"}') \
            == failures
        return d

    d = asyncio.run(asyncio.wait_for(main(), 60))
    health = d.status()["health"]
    assert [v["detail"] for k, v in health.items() if k.startswith("tcp/")] and \
        any(v["detail"] == "connected" for k, v in health.items() if k.startswith("tcp/"))


def test_connect_failures_fail_over_to_the_next_endpoint(dispa):
    async def main():
        live = await TcpUpstream("L").start()
        lport = free_port()
        text, port, admin = config([free_port(), live.port], listener(lport))
        d = start(dispa, text, port, admin)
        for _ in range(4):
            r, w = await tcp_connect(lport)
            assert (await r.readline()).strip() == b"L"
            w.close()
        return d

    d = asyncio.run(asyncio.wait_for(main(), 60))
    assert metric(d, 'dispa_l4_upstream_connect_failures_total{listener="l4test"}') >= 1


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_proxy_protocol_is_sent_to_the_upstream(dispa, version):
    async def main():
        up = await TcpUpstream("P", proxy_header=True).start()
        lport = free_port()
        text, port, admin = config([up.port], listener(lport, proxy_protocol_send=version))
        start(dispa, text, port, admin)
        r, w = await tcp_connect(lport, "127.0.0.7")
        client = w.get_extra_info("sockname")
        w.write(b"payload after the header")
        line = (await r.readline()).strip().decode()
        assert line == f"P 127.0.0.7:{client[1]}"
        assert await r.readexactly(24) == b"payload after the header"
        w.close()
        return up.headers[0]

    ver, src, dst, _ = asyncio.run(asyncio.wait_for(main(), 30))
    assert ver == int(version[1]) and src[0] == "127.0.0.7" and dst[0] == "127.0.0.1"


def test_proxy_protocol_v2_from_haproxy_is_accepted_and_passed_on(dispa, tmp_path):
    haproxy = shutil.which("haproxy")
    assert haproxy, "haproxy is a test dependency (ci/install-system-deps.sh)"

    async def main():
        up = await TcpUpstream("H", proxy_header=True).start()
        lport, hport = free_port(), free_port()
        text, port, admin = config([up.port], listener(
            lport, proxy_protocol_accept=True, trusted_proxies=["127.0.0.1/32"],
            proxy_protocol_send="v1"))
        d = start(dispa, text, port, admin)
        cfg = tmp_path / "haproxy.cfg"
        cfg.write_text(f"""
global
    maxconn 100
defaults
    mode tcp
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend fe
    bind 127.0.0.1:{hport}
    default_backend be
backend be
    server dispa 127.0.0.1:{lport} send-proxy-v2
""")
        proc = subprocess.Popen([haproxy, "-db", "-f", str(cfg)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 10
            while True:
                try:
                    r, w = await tcp_connect(hport, "127.0.0.9")
                    break
                except OSError:
                    assert time.monotonic() < deadline, "haproxy did not start"
                    await asyncio.sleep(0.05)
            client = w.get_extra_info("sockname")
            # the client's own address crossed HAProxy (v2) and Dispa (v1) intact
            line = (await asyncio.wait_for(r.readline(), 10)).strip().decode()
            assert line == f"H 127.0.0.9:{client[1]}"
            w.write(b"ping")
            assert await r.readexactly(4) == b"ping"
            w.close()
        finally:
            proc.terminate()
            proc.wait(10)
        # a direct connection without a header from the trusted peer is refused
        r, w = await tcp_connect(lport)
        w.write(b"GET / HTTP/1.0\r\n\r\n")
        assert await closed_by_peer(r)
        w.close()
        return d

    d = asyncio.run(asyncio.wait_for(main(), 60))
    assert metric(d, 'dispa_l4_rejected_total{listener="l4test",reason="proxy_protocol"}') == 1


def test_proxy_protocol_accept_refuses_untrusted_peers(dispa):
    async def main():
        up = await TcpUpstream("U").start()
        lport = free_port()
        text, port, admin = config([up.port], listener(
            lport, proxy_protocol_accept=True, trusted_proxies=["10.0.0.0/8"]))
        d = start(dispa, text, port, admin)
        r, w = await tcp_connect(lport)
        w.write(b"PROXY TCP4 1.2.3.4 5.6.7.8 1111 2222\r\nhello")
        assert await closed_by_peer(r)
        w.close()
        assert up.accepted == 0
        return d

    d = asyncio.run(asyncio.wait_for(main(), 30))
    assert metric(d, 'dispa_l4_rejected_total{listener="l4test",reason="untrusted"}') == 1


def test_a_proxy_header_sent_byte_by_byte_is_cut_at_the_header_timeout(dispa):
    """Slowloris on the PROXY header: each byte resets no timer; the header must be whole
    within min(10 s, idle_timeout) of the accept."""
    async def main():
        up = await TcpUpstream("U").start()
        lport = free_port()
        text, port, admin = config([up.port], listener(
            lport, proxy_protocol_accept=True, trusted_proxies=["127.0.0.0/8"],
            idle_timeout=1.0))
        d = start(dispa, text, port, admin)
        r, w = await tcp_connect(lport)
        t0 = time.monotonic()
        header = b"PROXY TCP4 1.2.3.4 5.6.7.8 1111 2222"  # the CRLF never comes
        cut = None
        for i in range(len(header)):  # bounded: 37 bytes, 0.1 s apart
            w.write(header[i:i + 1])
            try:
                got = await asyncio.wait_for(r.read(1), 0.1)
            except asyncio.TimeoutError:
                continue
            except ConnectionResetError:
                got = b""
            assert got == b""
            cut = time.monotonic() - t0
            break
        w.close()
        assert up.accepted == 0
        return d, cut

    d, cut = asyncio.run(asyncio.wait_for(main(), 30))
    assert cut is not None and 0.8 < cut < 3.5, cut  # the 1 s header deadline (+ a sweep)
    assert metric(d, 'dispa_l4_rejected_total{listener="l4test",reason="proxy_protocol"}') == 1


def test_refused_connections_give_their_slot_back(dispa):
    """Connection-limit accounting on errors: with max_connections = 1, connections refused
    for every reason in turn must each free the one slot, or the valid one is refused."""
    async def main():
        up = await TcpUpstream("U", proxy_header=True).start()
        lport = free_port()
        text, port, admin = config([up.port], listener(
            lport, max_connections=1, proxy_protocol_accept=True,
            trusted_proxies=["127.0.0.1/32"], proxy_protocol_send="v1"))
        d = start(dispa, text, port, admin)
        r, w = await tcp_connect(lport, "127.0.0.5")  # untrusted peer
        assert await closed_by_peer(r)
        w.close()
        r, w = await tcp_connect(lport)  # trusted, malformed header
        w.write(b"HELLO world\r\n")
        assert await closed_by_peer(r)
        w.close()
        r, w = await tcp_connect(lport)  # trusted, gives up before the header ends
        w.write(b"PROXY TCP4 1.2.3.4")
        w.write_eof()
        assert await closed_by_peer(r)
        w.close()
        r, w = await tcp_connect(lport)  # the slot is free for a good one
        w.write(b"PROXY TCP4 192.0.2.1 192.0.2.2 4000 80\r\n")
        assert (await asyncio.wait_for(r.readline(), 10)).strip() == b"U 192.0.2.1:4000"
        w.close()
        return d

    d = asyncio.run(asyncio.wait_for(main(), 30))
    lab = 'dispa_l4_rejected_total{listener="l4test",reason='
    assert metric(d, lab + '"untrusted"}') == 1
    assert metric(d, lab + '"proxy_protocol"}') == 2
    assert metric(d, lab + '"limit"}') == 0


def test_connections_over_the_limit_are_closed_at_once_and_counted(dispa):
    async def main():
        up = await TcpUpstream("C").start()
        lport = free_port()
        text, port, admin = config([up.port], listener(lport, max_connections=2))
        d = start(dispa, text, port, admin)
        held = []
        for _ in range(2):
            r, w = await tcp_connect(lport)
            assert (await r.readline()).strip() == b"C"
            held.append(w)
        r, w = await tcp_connect(lport)
        assert await closed_by_peer(r)
        assert up.accepted == 2
        held[0].close()
        deadline = time.monotonic() + 10
        while metric(d, 'dispa_l4_active_connections{listener="l4test"}') > 1:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        r, w = await tcp_connect(lport)
        assert (await r.readline()).strip() == b"C"  # room again
        w.close()
        held[1].close()
        return d

    d = asyncio.run(asyncio.wait_for(main(), 30))
    assert metric(d, 'dispa_l4_rejected_total{listener="l4test",reason="limit"}') == 1


def test_an_idle_tcp_connection_is_closed(dispa):
    async def main():
        up = await TcpUpstream("I").start()
        lport = free_port()
        text, port, admin = config([up.port], listener(lport, idle_timeout=0.5))
        d = start(dispa, text, port, admin)
        r, w = await tcp_connect(lport)
        assert (await r.readline()).strip() == b"I"
        t0 = time.monotonic()
        assert await asyncio.wait_for(r.read(), 10) == b""
        assert 0.4 < time.monotonic() - t0 < 5
        w.close()
        return d

    d = asyncio.run(asyncio.wait_for(main(), 30))
    assert metric(d, 'dispa_l4_idle_closed_total{listener="l4test"}') == 1


def resilience(d, cluster: str = "tcp") -> dict:
    """The first worker's resilience state of ``cluster`` (/admin/status)."""
    return next(iter(d.status()["resilience"].values()))[cluster]


def test_connect_failures_trip_the_endpoint_breaker_and_eject_the_outlier(dispa):
    async def main():
        live = await TcpUpstream("L").start()
        lport = free_port()
        text, port, admin = config([free_port(), live.port], listener(lport), extra="""
[target_groups.circuit_breaker]
failure_threshold = 1
recovery_time = 60
[target_groups.outlier_detection]
consecutive_5xx = 1
base_ejection_time = 60
max_ejection_time = 60
max_ejection_percent = 50
""")
        d = start(dispa, text, port, admin)
        for _ in range(4):  # round robin: the dead endpoint is tried at least once
            r, w = await tcp_connect(lport)
            assert (await r.readline()).strip() == b"L"
            w.close()
        return d

    d = asyncio.run(asyncio.wait_for(main(), 60))
    state = resilience(d)
    assert [e["state"] for e in state["breakers"]["endpoints"]] == ["open", "closed"], state
    assert [e["times_ejected"] for e in state["outlier"]["endpoints"]] == [1, 0], state


def test_an_open_group_breaker_refuses_new_connections(dispa):
    async def main():
        live = await TcpUpstream("L").start()
        lport = free_port()
        text, port, admin = config([free_port(), live.port], listener(lport), extra="""
[target_groups.circuit_breaker]
failure_threshold = 1
recovery_time = 60
[target_groups.group_breaker]
open_endpoint_percent = 50
""")
        d = start(dispa, text, port, admin)
        outcomes = []
        for _ in range(4):
            r, w = await tcp_connect(lport)
            try:
                line = await asyncio.wait_for(r.readline(), 10)
            except ConnectionResetError:
                line = b""
            outcomes.append(line.strip())
            w.close()
        return d, outcomes

    d, outcomes = asyncio.run(asyncio.wait_for(main(), 60))
    # the dead endpoint's failure opened its breaker, which opened the group's: from then
    # on every connection is refused at once, the live endpoint included
    assert outcomes[-1] == b"" and outcomes.count(b"") >= 3, outcomes
    assert metric(d, 'dispa_l4_rejected_total{listener="l4test",reason="breaker"}') \
        == outcomes.count(b"")


def test_at_the_shutdown_deadline_both_sides_are_half_closed_not_reset(dispa):
    async def main():
        up = await TcpUpstream("S").start()
        lport = free_port()
        text, port, admin = config([up.port], listener(lport),
                                   server_extra="shutdown_timeout = 1.5")
        d = start(dispa, text, port, admin)
        r, w = await tcp_connect(lport)
        assert (await r.readline()).strip() == b"S"
        t0 = time.monotonic()
        d.signal(signal.SIGTERM)
        # draining: the stream goes on (a byte stream has no boundary to stop at)
        w.write(b"still here\n")
        assert await asyncio.wait_for(r.readline(), 10) == b"still here\n"
        # at the deadline: a FIN (read() returns b""), where a reset would raise
        assert await asyncio.wait_for(r.read(), 20) == b""
        elapsed = time.monotonic() - t0
        deadline = time.monotonic() + 10
        while up.eofs < 1:  # the upstream got a FIN too, not a reset
            assert time.monotonic() < deadline, "the upstream saw no half-close"
            await asyncio.sleep(0.02)
        w.close()
        return d, elapsed

    d, elapsed = asyncio.run(asyncio.wait_for(main(), 60))
    # ran until the deadline less its flush margin (0.15 s of 1.5), not cut at the drain
    assert elapsed >= 1.2, elapsed
    assert d.proc.wait(15) == 0
    assert "l4: 1 connections half-closed at the shutdown deadline" in d.log()


# -------------------------------------------------------------------------- UDP


class UdpEcho(asyncio.DatagramProtocol):
    """Answers each datagram with ``<name>:<source port>:<data>``."""

    def __init__(self, name):
        self.name = name
        self.sources = set()

    def connection_made(self, transport):
        self.transport = transport

    def datagram_received(self, data, addr):
        self.sources.add(addr)
        self.transport.sendto(f"{self.name}:{addr[1]}:".encode() + data, addr)


class UdpClient(asyncio.DatagramProtocol):
    def __init__(self):
        self.queue = asyncio.Queue()

    def datagram_received(self, data, addr):
        self.queue.put_nowait((data, addr))


def test_udp_sessions_per_client_with_idle_expiry_and_a_bounded_table(dispa):
    async def main():
        loop = asyncio.get_running_loop()
        ups = []
        for n in "XY":
            t, p = await loop.create_datagram_endpoint(lambda n=n: UdpEcho(n),
                                                       local_addr=("127.0.0.1", 0))
            ups.append((t, p))
        lport = free_port()
        text, port, admin = config([t.get_extra_info("sockname")[1] for t, _ in ups],
                                   listener(lport, protocol="udp", idle_timeout=1.0,
                                            max_connections=2))
        d = start(dispa, text, port, admin)
        clients = []
        for _ in range(3):
            t, p = await loop.create_datagram_endpoint(UdpClient,
                                                       remote_addr=("127.0.0.1", lport))
            clients.append((t, p))
        replies = []
        for i, (t, p) in enumerate(clients[:2]):
            for k in range(3):
                t.sendto(f"c{i}m{k}".encode())
                data, addr = await asyncio.wait_for(p.queue.get(), 10)
                assert addr == ("127.0.0.1", lport)  # replies come from the listener
                replies.append(data.decode())
        # round robin: each client is one session on one endpoint, through one socket
        by_client = [{r.split(":")[0] for r in replies[:3]}, {r.split(":")[0] for r in replies[3:]}]
        assert by_client == [{"X"}, {"Y"}]
        assert len({r.split(":")[1] for r in replies[:3]}) == 1
        assert all(r.endswith(f"c{i // 3}m{i % 3}") for i, r in enumerate(replies))
        # a third client address is over max_connections: dropped, counted
        clients[2][0].sendto(b"too many")
        deadline = time.monotonic() + 10
        while metric(d, 'dispa_l4_rejected_total{listener="l4test",reason="limit"}') < 1:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        assert clients[2][1].queue.empty()
        # idle sessions expire; then the third client gets a session
        deadline = time.monotonic() + 10
        while metric(d, 'dispa_l4_active_connections{listener="l4test"}') > 0:
            assert time.monotonic() < deadline, "sessions did not expire"
            await asyncio.sleep(0.05)
        clients[2][0].sendto(b"now")
        data, _ = await asyncio.wait_for(clients[2][1].queue.get(), 10)
        assert data.endswith(b":now")
        for t, _ in clients + ups:
            t.close()
        return d

    d = asyncio.run(asyncio.wait_for(main(), 60))
    assert metric(d, 'dispa_l4_idle_closed_total{listener="l4test"}') >= 2
    assert metric(d, 'dispa_l4_datagrams_total{listener="l4test",direction="in"}') == 7


def test_l4_config_errors_name_the_field(tmp_path):
    from dispa.config.load import load_config_text
    from dispa.errors import ConfigError
    text, _, _ = config([9], listener(9999, target_group="nope", protocol="udp",
                                      proxy_protocol_send="v1"))
    with pytest.raises(ConfigError) as exc:
        load_config_text(text, fmt="toml")
    msg = str(exc.value)
    assert "l4.listeners[0].target_group: unknown target group 'nope'" in msg
    assert "l4.listeners[0].proxy_protocol_send: PROXY protocol v1 is TCP only" in msg


class UdpProxyEcho(asyncio.DatagramProtocol):
    """Reads the PROXY v2 header that starts each datagram (the test's own parse, from
    proxy-protocol.txt) and answers with the source it names and the payload after it."""

    def __init__(self):
        self.headers = []

    def connection_made(self, transport):
        self.transport = transport

    def datagram_received(self, data, addr):
        assert data.startswith(V2_SIG), data[:16]
        ver_cmd, fam, length = data[12], data[13], struct.unpack("!H", data[14:16])[0]
        body = data[16:16 + length]
        src = socket.inet_ntoa(body[0:4])
        sport, dport = struct.unpack("!HH", body[8:12])
        self.headers.append((ver_cmd, fam, src, sport, socket.inet_ntoa(body[4:8]), dport))
        self.transport.sendto(f"{src}:{sport}:".encode() + data[16 + length:], addr)


def test_udp_sends_a_proxy_protocol_v2_header_on_every_datagram(dispa):
    async def main():
        loop = asyncio.get_running_loop()
        ut, up = await loop.create_datagram_endpoint(UdpProxyEcho,
                                                     local_addr=("127.0.0.1", 0))
        lport = free_port()
        text, port, admin = config([ut.get_extra_info("sockname")[1]],
                                   listener(lport, protocol="udp", proxy_protocol_send="v2"))
        start(dispa, text, port, admin)
        t, p = await loop.create_datagram_endpoint(
            UdpClient, local_addr=("127.0.0.9", 0), remote_addr=("127.0.0.1", lport))
        me = t.get_extra_info("sockname")
        for k in range(3):
            t.sendto(f"m{k}".encode())
            data, _ = await asyncio.wait_for(p.queue.get(), 10)
            assert data == f"127.0.0.9:{me[1]}:m{k}".encode()
        t.close()
        ut.close()
        return up.headers

    headers = asyncio.run(asyncio.wait_for(main(), 30))
    assert len(headers) == 3
    # version 2, PROXY command; AF_INET + DGRAM (0x12); destination: the listener
    assert all(h[0] == 0x21 and h[1] == 0x12 and h[4] == "127.0.0.1" for h in headers), headers
