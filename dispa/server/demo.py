"""The built-in demo upstream for a newcomer's first run (``dispa-server`` without --config).

A tiny HTTP/1.1 origin on an ephemeral loopback port that answers every request with a
short text naming the path it received and the headers Dispa added, so the first curl shows
what a proxy does. It is for demonstration only: it runs inside the master process, which in
production never serves traffic.
"""

from __future__ import annotations

import asyncio

DEMO_CONFIG = """
[server]
bind_address = "{bind}"
workers = 1

[domains]
intercept_domains = []

[[targets.targets]]
name = "demo-upstream"
url = "http://127.0.0.1:{port}"

[targets.load_balancing]
type = "roundrobin"

[targets.health_check]
enabled = true
interval = 5
timeout = 2
healthy_threshold = 1
unhealthy_threshold = 2

[monitoring]
enabled = true
bind_host = "127.0.0.1"
metrics_port = {admin_port}
health_check_port = {admin_port}

[logging]
enabled = false
format = "text"
"""


async def _handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                return
            lines = head.decode("latin-1").split("\r\n")
            request_line = lines[0]
            shown = [l for l in lines[1:] if l.lower().startswith(("x-forwarded", "forwarded", "via", "x-request-id"))]
            length = 0
            for l in lines[1:]:
                if l.lower().startswith("content-length:"):
                    length = int(l.split(":", 1)[1].strip() or 0)
            if length:
                await reader.readexactly(length)
            body = ("Hello from the Dispa demo upstream!\n"
                    f"You asked for: {request_line}\n"
                    "Headers Dispa added on the way:\n" + "".join(f"  {l}\n" for l in shown)).encode()
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; charset=utf-8\r\n"
                         b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
            await writer.drain()
    except (ConnectionError, ValueError):
        pass
    finally:
        writer.close()


async def start_demo_upstream() -> tuple[asyncio.AbstractServer, int]:
    """Start the demo origin on 127.0.0.1 (ephemeral port); return (server, port)."""
    server = await asyncio.start_server(_handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, port
