"""Traffic mirroring: a copy of a request goes to a shadow target group.

The copy never affects the client: it is sent on its own connection by a background task,
its response is read and discarded, and any failure is only counted. Bounds keep a slow or
dead shadow from costing memory: at most ``MAX_IN_FLIGHT`` mirrored requests per worker
(more are skipped), at most ``MAX_BODY`` buffered body bytes per request (a longer body
abandons that copy), and ``TIMEOUT`` seconds per copy.
"""

from __future__ import annotations

import asyncio
import logging

log = logging.getLogger("dispa.mirror")

MAX_IN_FLIGHT = 256
MAX_BODY = 1 << 20
TIMEOUT = 10.0
MAX_RESPONSE = 16 << 20


class Mirrors:
    """The worker's mirrored requests in flight."""

    def __init__(self, metrics=None):
        self.metrics = metrics
        self.in_flight = 0

    def begin(self, cluster, name: str) -> "Mirror | None":
        if cluster is None or not cluster.endpoints:
            return None
        if self.in_flight >= MAX_IN_FLIGHT:
            self._count(name, "skipped")
            return None
        return Mirror(self, cluster, name)

    def _count(self, name: str, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.inc("dispa_mirror_requests_total",
                             (("target", name), ("outcome", outcome)))


class Mirror:
    """One mirrored request: fed the upstream head and body by the session."""

    __slots__ = ("mirrors", "cluster", "name", "chunks", "size", "done", "task", "more")

    def __init__(self, mirrors: Mirrors, cluster, name: str):
        self.mirrors = mirrors
        self.cluster = cluster
        self.name = name
        self.chunks: list[bytes] = []
        self.size = 0
        self.done = False
        self.task = None
        self.more = asyncio.Event()

    def send_head(self, head: bytes, client_ip: str) -> None:
        # the copy asks for close-delimited framing so it needs no response parser
        cut = head.rfind(b"\r\n\r\n")
        if cut < 0:
            return
        self.chunks.append(head[:cut] + b"\r\nConnection: close\r\n\r\n")
        i = self.cluster.pick(client_ip, None)
        if i < 0:
            return
        ep = self.cluster.endpoints[i]
        self.mirrors.in_flight += 1
        self.task = asyncio.ensure_future(self._run(ep.host, ep.port))

    def body(self, chunk: bytes) -> None:
        if self.task is None or self.done:
            return
        self.size += len(chunk)
        if self.size > MAX_BODY:
            self.task.cancel()
            self.mirrors._count(self.name, "body_too_large")
            self.done = True
            return
        self.chunks.append(chunk)
        self.more.set()

    def end(self) -> None:
        self.chunks.append(None)  # marks the end of the request
        self.more.set()

    async def _run(self, host: str, port: int) -> None:
        outcome = "ok"
        writer = None
        try:
            async with asyncio.timeout(TIMEOUT):
                reader, writer = await asyncio.open_connection(host, port)
                while True:
                    while self.chunks:
                        piece = self.chunks.pop(0)
                        if piece is None:
                            break
                        writer.write(piece)
                    else:
                        self.more.clear()
                        await self.more.wait()  # more body is coming from the client
                        continue
                    break
                await writer.drain()
                got = 0
                while got <= MAX_RESPONSE:
                    data = await reader.read(65536)
                    if not data:
                        break
                    got += len(data)
        except asyncio.CancelledError:
            outcome = "cancelled"
        except (OSError, TimeoutError) as exc:
            outcome = "timeout" if isinstance(exc, TimeoutError) else "error"
        finally:
            self.done = True
            self.mirrors.in_flight -= 1
            if writer is not None:
                writer.close()
            self.mirrors._count(self.name, outcome)
