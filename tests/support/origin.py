"""A real HTTP/1.1 origin server for tests, on 127.0.0.1, parsed by h11 (the trusted
reference implementation), recording exactly what it received.

Runs its own event loop in a thread so tests can use blocking clients. Routes:

  /                      200, body "ok from <name>"
  /delay?ms=N            waits N ms, then 200
  /status/NNN            answers with that status
  /echo                  200, echoes the request body
  /bytes?n=N             200, N bytes (Content-Length), streamed in 64 KiB writes
  /chunked?n=N&size=S    200, chunked, N chunks of S bytes
  /close?n=N             200 with no length: body delimited by closing the connection
  /headers               200, the request headers as JSON
  /stall?ms=N            200, Content-Length 10: 5 bytes, a pause of N ms, 5 more bytes
  /cacheable?max_age=S&delay=MS&cc=...
                         200 with Cache-Control (max-age=S, or the raw `cc`), an ETag and
                         Date, body "version N" (N counts the full responses it sent for
                         that path); If-None-Match matching the ETag gets a 304

``requests`` lists (method, target, headers, body) for every complete request it saw, in
order; ``raw`` holds the raw bytes of each connection.
"""

from __future__ import annotations

import asyncio
import json
import threading
import urllib.parse

import h11


class Origin:
    def __init__(self, name: str = "origin", host: str = "127.0.0.1", port: int = 0):
        self.name = name
        self.host = host
        self.port = port
        self.requests: list[tuple[bytes, bytes, list, bytes]] = []
        self.served: dict[str, int] = {}  # full responses per path (/cacheable)
        # switches a test may flip at any time: every request gets this status / delay
        self.force_status: int | None = None
        self.force_delay_ms: int = 0
        self.raw: list[bytearray] = []
        self.connections = 0
        self._loop = asyncio.new_event_loop()
        self._server = None
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._lock = threading.Lock()

    # lifecycle ---------------------------------------------------------------------
    def start(self) -> "Origin":
        self._thread.start()
        fut = asyncio.run_coroutine_threadsafe(self._start(), self._loop)
        fut.result(10)
        return self

    async def _start(self):
        self._server = await asyncio.start_server(self._handle, self.host, self.port,
                                                  reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]

    def stop(self) -> None:
        async def _stop():
            if self._server is not None:
                self._server.close()
                for w in list(self._writers):
                    w.transport.abort()
        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(_stop(), self._loop).result(10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)

    _writers: set = set()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def targets(self) -> list[bytes]:
        with self._lock:
            return [r[1] for r in self.requests]

    # serving -----------------------------------------------------------------------
    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self._writers = self._writers | {writer}
        self.connections += 1
        raw = bytearray()
        self.raw.append(raw)
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=65536)
        try:
            while True:
                req, body = await self._read_request(conn, reader, raw)
                if req is None:
                    return
                with self._lock:
                    self.requests.append((req.method, req.target, list(req.headers), body))
                keep = await self._respond(conn, writer, req, body)
                if not keep or conn.our_state is h11.MUST_CLOSE:
                    return
                conn.start_next_cycle()
        except (h11.RemoteProtocolError, ConnectionError, h11.LocalProtocolError):
            return
        finally:
            self._writers = self._writers - {writer}
            writer.close()

    async def _read_request(self, conn, reader, raw):
        req = None
        body = bytearray()
        counting = False  # /sink counts body bytes instead of keeping them
        count = 0
        while True:
            ev = conn.next_event()
            if ev is h11.NEED_DATA:
                data = await reader.read(262144)
                if len(raw) < 1 << 20:
                    raw += data  # big bodies are not kept: memory stays flat
                conn.receive_data(data)
                if not data and req is None:
                    return None, b""
                continue
            if isinstance(ev, h11.Request):
                req = ev
                counting = req.target.startswith(b"/sink")
            elif isinstance(ev, h11.Data):
                if counting:
                    count += len(ev.data)
                else:
                    body += ev.data
            elif isinstance(ev, h11.EndOfMessage):
                return req, (str(count).encode() if counting else bytes(body))
            elif isinstance(ev, h11.ConnectionClosed):
                return None, b""

    async def _respond(self, conn, writer, req, body) -> bool:
        url = urllib.parse.urlsplit(req.target.decode())
        q = dict(urllib.parse.parse_qsl(url.query))
        path = url.path
        send = lambda ev: writer.write(conn.send(ev))  # noqa: E731
        hdrs = [("X-Origin", self.name)]
        if self.force_delay_ms:
            await asyncio.sleep(self.force_delay_ms / 1000)
        if self.force_status is not None:
            path = f"/status/{self.force_status}"
        if path.startswith("/delay"):
            await asyncio.sleep(int(q.get("ms", "1000")) / 1000)
        if path.startswith("/status/"):
            status = int(path.rsplit("/", 1)[1])
            data = f"status {status} from {self.name}".encode()
            send(h11.Response(status_code=status, headers=hdrs + [("Content-Length", str(len(data)))]))
            send(h11.Data(data=data))
        elif path == "/stall":
            # Content-Length 10: 5 bytes, a pause of ms, then 5 more
            send(h11.Response(status_code=200, headers=hdrs + [("Content-Length", "10")]))
            send(h11.Data(data=b"12345"))
            await writer.drain()
            await asyncio.sleep(int(q.get("ms", "1000")) / 1000)
            send(h11.Data(data=b"67890"))
        elif path == "/cacheable":
            import email.utils
            cc = q.get("cc") or f"max-age={q.get('max_age', '60')}"
            etag = '"v1"'
            common = hdrs + [("Cache-Control", cc), ("ETag", etag),
                             ("Date", email.utils.formatdate(usegmt=True))]
            if q.get("delay"):
                await asyncio.sleep(int(q["delay"]) / 1000)
            inm = [v for k, v in req.headers if k.lower() == b"if-none-match"]
            if inm and etag.encode() in inm[0]:
                send(h11.Response(status_code=304, headers=common))
            else:
                self.served[path] = self.served.get(path, 0) + 1
                data = f"version {self.served[path]}".encode()
                send(h11.Response(status_code=200, headers=common + [
                    ("Content-Length", str(len(data))), ("Content-Type", "text/plain")]))
                send(h11.Data(data=data))
        elif path == "/sink":
            send(h11.Response(status_code=200, headers=hdrs + [("Content-Length", str(len(body)))]))
            send(h11.Data(data=body))
        elif path == "/echo":
            send(h11.Response(status_code=200, headers=hdrs + [("Content-Length", str(len(body)))]))
            send(h11.Data(data=body))
        elif path == "/headers":
            data = json.dumps([[k.decode(), v.decode()] for k, v in req.headers]).encode()
            send(h11.Response(status_code=200, headers=hdrs + [("Content-Length", str(len(data))),
                                                               ("Content-Type", "application/json")]))
            send(h11.Data(data=data))
        elif path == "/bytes":
            n = int(q.get("n", "0"))
            send(h11.Response(status_code=200, headers=hdrs + [("Content-Length", str(n))]))
            block = b"x" * 65536
            left = n
            while left:
                k = min(left, len(block))
                send(h11.Data(data=block[:k]))
                left -= k
                await writer.drain()
        elif path == "/chunked":
            n, size = int(q.get("n", "3")), int(q.get("size", "10"))
            send(h11.Response(status_code=200, headers=hdrs + [("Transfer-Encoding", "chunked")]))
            for i in range(n):
                send(h11.Data(data=bytes([97 + i % 26]) * size))
                await writer.drain()
        elif path == "/close":
            n = int(q.get("n", "100"))
            writer.write(b"HTTP/1.1 200 OK\r\nX-Origin: " + self.name.encode() + b"\r\n\r\n" + b"c" * n)
            await writer.drain()
            return False
        else:
            data = f"ok from {self.name}".encode()
            send(h11.Response(status_code=200, headers=hdrs + [("Content-Length", str(len(data)))]))
            if req.method != b"HEAD":
                send(h11.Data(data=data))
        send(h11.EndOfMessage())
        await writer.drain()
        return True
