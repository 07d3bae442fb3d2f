"""The master's admin HTTP server: health, metrics, status, config, log level.

A small asyncio HTTP/1.1 server on the control plane (never the data plane). It favours
being boring and robust over being fast: bounded head (8 KiB) and body (64 KiB), header and
idle timeouts, a connection cap, keep-alive, and no traceback ever sent to a client.

Routes (see docs/admin-api.md)::

    GET  /health            200 {"status": "healthy", ...} | 503 {"status": "unhealthy", ...}
    GET  /metrics           Prometheus text format 0.0.4
    GET  /metrics/json      the same metrics as JSON
    GET  /admin/status      runtime status
    GET  /admin/config      effective configuration (secrets masked by the provider)
    GET  /admin/log-level   {"level": "info"}
    PUT  /admin/log-level   body {"level": "debug"} -> {"level": "debug", "previous": "info"}
    POST /admin/cache/purge body {"prefix": "GET|http|example.com|/img/"} or {"key": ...},
                            optional "plugin": purge response caches in every worker

``HEAD`` is accepted wherever ``GET`` is.
"""

from __future__ import annotations

import asyncio
import email.utils
import errno
import logging
import re
import socket
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

import msgspec

from dispa.errors import StartupError
from dispa.observability import logs

__all__ = ["AdminProvider", "AdminServer"]

log = logging.getLogger(__name__)

MAX_HEAD = 8 * 1024
MAX_BODY = 64 * 1024
HEADER_TIMEOUT = 10.0
IDLE_TIMEOUT = 30.0
BODY_TIMEOUT = 10.0
WRITE_TIMEOUT = 30.0
MAX_CONNECTIONS = 256

PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
JSON_CONTENT_TYPE = "application/json"

_TOKEN = re.compile(rb"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_TARGET = re.compile(rb"^[\x21-\x7e]+$")
_VERSION = re.compile(rb"^HTTP/(\d)\.(\d)$")

_REASONS = {
    200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
    408: "Request Timeout", 413: "Content Too Large", 415: "Unsupported Media Type",
    431: "Request Header Fields Too Large", 500: "Internal Server Error",
    501: "Not Implemented", 503: "Service Unavailable", 505: "HTTP Version Not Supported",
}

_json = msgspec.json.Encoder(enc_hook=str)


class AdminProvider(Protocol):
    """What the master gives the admin server. Every method may raise; the server answers
    500 ``{"error": "internal error"}`` and logs the exception."""

    async def metrics_text(self) -> str:
        """Prometheus text exposition (format 0.0.4)."""
        ...

    async def metrics_json(self) -> dict:
        """The same metrics as a JSON-able dict."""
        ...

    def status(self) -> dict:
        """Body of ``GET /admin/status``."""
        ...

    def config(self) -> dict:
        """Body of ``GET /admin/config``; secrets already masked."""
        ...

    def health(self) -> tuple[bool, dict]:
        """``(healthy, body)`` for ``GET /health``."""
        ...

    def set_log_level(self, level: str) -> None:
        """Change the log level of the master and workers.

        Raises:
            ValueError: unknown level (answered 400 with the message).
        """
        ...


class _BadRequest(Exception):
    def __init__(self, status: int, message: str):
        self.status = status
        self.message = message
        super().__init__(message)


class _Request:
    __slots__ = ("method", "target", "path", "version", "headers", "body", "keep_alive")

    def __init__(self, method: str, target: str, version: tuple[int, int],
                 headers: list[tuple[str, str]]):
        self.method = method
        self.target = target
        self.path = target.split("?", 1)[0]
        self.version = version
        self.headers = headers
        self.body = b""
        conn = ",".join(v for k, v in headers if k == "connection").lower()
        tokens = {t.strip() for t in conn.split(",")}
        if version >= (1, 1):
            self.keep_alive = "close" not in tokens
        else:
            self.keep_alive = "keep-alive" in tokens

    def header(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k == name]


class _Response:
    __slots__ = ("status", "body", "content_type", "headers")

    def __init__(self, status: int, body: bytes, content_type: str = JSON_CONTENT_TYPE,
                 headers: Sequence[tuple[str, str]] = ()):
        self.status = status
        self.body = body
        self.content_type = content_type
        self.headers = headers


def _json_response(status: int, obj: Any, headers: Sequence[tuple[str, str]] = ()) -> _Response:
    return _Response(status, _json.encode(obj), JSON_CONTENT_TYPE, headers)


def _error(status: int, message: str, headers: Sequence[tuple[str, str]] = ()) -> _Response:
    return _json_response(status, {"error": message, "status": status}, headers)


def _parse_head(head: bytes) -> _Request:
    """Parse a request head (without the blank line). Raises _BadRequest."""
    lines = head.split(b"\n")
    lines = [ln[:-1] if ln.endswith(b"\r") else ln for ln in lines]
    parts = lines[0].split(b" ")
    if len(parts) != 3:
        raise _BadRequest(400, "malformed request line")
    method, target, version = parts
    if not _TOKEN.match(method):
        raise _BadRequest(400, "malformed request method")
    if not _TARGET.match(target):
        raise _BadRequest(400, "malformed request target")
    m = _VERSION.match(version)
    if not m:
        raise _BadRequest(400, "malformed HTTP version")
    ver = (int(m.group(1)), int(m.group(2)))
    if ver[0] != 1:
        raise _BadRequest(505, "only HTTP/1.0 and HTTP/1.1 are supported")
    headers: list[tuple[str, str]] = []
    for line in lines[1:]:
        if not line:
            raise _BadRequest(400, "empty header line")
        if line[:1] in (b" ", b"\t"):
            raise _BadRequest(400, "obsolete line folding is not allowed")
        name, sep, value = line.partition(b":")
        if not sep or not _TOKEN.match(name):
            raise _BadRequest(400, "malformed header line")
        value = value.strip(b" \t")
        if any(c < 0x20 and c != 0x09 or c == 0x7F for c in value):
            raise _BadRequest(400, "invalid character in header value")
        headers.append((name.decode("ascii").lower(), value.decode("latin-1")))
    t = target.decode("ascii")
    if t.startswith(("http://", "https://")):  # absolute-form: keep the path
        rest = t.split("://", 1)[1]
        slash = rest.find("/")
        t = rest[slash:] if slash >= 0 else "/"
    elif not t.startswith("/") and t != "*":
        raise _BadRequest(400, "malformed request target")
    return _Request(method.decode("ascii"), t, ver, headers)


def _addr(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host or '*'}:{port}"


class AdminServer:
    """The admin HTTP server. Create, ``await start(listeners)``, ``await close()``.

    After :meth:`start`, ``ports`` lists the bound port of each listener (useful with port 0)
    and ``sockets`` every bound socket.
    """

    def __init__(self, provider: AdminProvider, *, max_connections: int = MAX_CONNECTIONS,
                 header_timeout: float = HEADER_TIMEOUT, idle_timeout: float = IDLE_TIMEOUT):
        self.provider = provider
        self.max_connections = max_connections
        self.header_timeout = header_timeout
        self.idle_timeout = idle_timeout
        self.ports: list[int] = []
        self.sockets: list[socket.socket] = []
        self._servers: list[asyncio.base_events.Server] = []
        self._conns: dict[asyncio.Task, asyncio.StreamWriter] = {}
        self._closing = False
        self._routes: dict[str, dict[str, Callable[[_Request], Awaitable[_Response]]]] = {
            "/health": {"GET": self._health},
            "/metrics": {"GET": self._metrics},
            "/metrics/json": {"GET": self._metrics_json},
            "/admin/status": {"GET": self._status},
            "/admin/config": {"GET": self._config},
            "/admin/log-level": {"GET": self._get_log_level, "PUT": self._put_log_level},
            "/admin/cache/purge": {"POST": self._purge_cache},
            "/admin/tls/rollback": {"POST": self._tls_rollback},  # docs/tls.md
        }

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self, listeners: Sequence[tuple[str, int]]) -> None:
        """Bind and listen on every ``(host, port)``.

        Raises:
            StartupError: an address is in use, not permitted, or not available; the message
                names the address. Listeners already bound are closed first.
        """
        try:
            for host, port in listeners:
                try:
                    server = await asyncio.start_server(
                        self._on_connection, host or None, port, reuse_address=True,
                        limit=MAX_HEAD * 2)
                except OSError as e:
                    if e.errno == errno.EADDRINUSE:
                        why = "address already in use"
                    elif e.errno == errno.EACCES:
                        why = "permission denied (ports below 1024 need privileges)"
                    else:
                        why = e.strerror or str(e)
                    raise StartupError(
                        f"admin API cannot listen on {_addr(host, port)}: {why}") from e
                self._servers.append(server)
                socks = list(server.sockets)
                self.sockets.extend(socks)
                self.ports.append(socks[0].getsockname()[1] if socks else port)
                log.info("admin API listening", extra=logs.fields(
                    address=_addr(host, self.ports[-1])))
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        """Stop listening and close every open connection. Idempotent."""
        self._closing = True
        servers, self._servers = self._servers, []
        for s in servers:
            s.close()
        conns = dict(self._conns)
        for t, w in conns.items():
            t.cancel()
            w.transport.abort()  # a read in progress ends even if the cancel were lost
        if conns:
            await asyncio.wait(list(conns), timeout=5.0)
        for s in servers:
            try:
                await s.wait_closed()
            except Exception:  # pragma: no cover
                pass
        self.sockets = []

    # -- connection handling ----------------------------------------------------------------

    async def _on_connection(self, reader: asyncio.StreamReader,
                             writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._conns[task] = writer
        try:
            if self._closing:
                return
            if len(self._conns) > self.max_connections:
                await self._send(writer, _error(503, "too many admin connections"), False, False)
                return
            await self._serve(reader, writer)
        except (asyncio.CancelledError, ConnectionError, asyncio.IncompleteReadError,
                asyncio.TimeoutError):
            pass
        except Exception:
            log.exception("admin connection failed")
        finally:
            if task is not None:
                self._conns.pop(task, None)
            writer.close()
            try:
                async with asyncio.timeout(1.0):
                    await writer.wait_closed()
            except BaseException:
                pass

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        buf = bytearray()
        while not self._closing:
            # Head: wait up to idle_timeout for the first byte, then header_timeout in all.
            try:
                head, buf = await self._read_head(reader, buf)
                if head is None:
                    return  # clean close or idle timeout between requests
                req = _parse_head(head)
                await self._read_body(reader, req, buf)
            except _BadRequest as e:
                await self._send(writer, _error(e.status, e.message), False, False)
                await _linger(reader, writer)
                return
            buf = buf[len(req.body):] if req.body else buf
            resp = await self._dispatch(req)
            await self._send(writer, resp, req.keep_alive, req.method == "HEAD")
            if not req.keep_alive:
                return

    async def _read_head(self, reader: asyncio.StreamReader,
                         buf: bytearray) -> tuple[bytes | None, bytearray]:
        loop = asyncio.get_running_loop()
        deadline: float | None = None
        while True:
            # Skip empty lines between requests (RFC 9112 §2.2).
            while buf[:2] == b"\r\n" or buf[:1] == b"\n":
                del buf[:2 if buf[:2] == b"\r\n" else 1]
            end, sep_len = _find_head_end(buf)
            if end >= 0:
                if end > MAX_HEAD:
                    raise _BadRequest(431, "request head too large")
                head = bytes(buf[:end])
                del buf[:end + sep_len]
                return head, buf
            if len(buf) > MAX_HEAD:
                raise _BadRequest(431, "request head too large")
            if buf and deadline is None:
                deadline = loop.time() + self.header_timeout
            timeout = self.idle_timeout if deadline is None else deadline - loop.time()
            if timeout <= 0:
                raise _BadRequest(408, "timed out reading the request head")
            try:
                async with asyncio.timeout(timeout):
                    chunk = await reader.read(16384)
            except TimeoutError:
                if deadline is None:
                    return None, buf
                raise _BadRequest(408, "timed out reading the request head") from None
            if not chunk:
                if buf:
                    raise _BadRequest(400, "connection closed inside the request head")
                return None, buf
            buf += chunk

    async def _read_body(self, reader: asyncio.StreamReader, req: _Request,
                         buf: bytearray) -> None:
        if req.header("transfer-encoding"):
            raise _BadRequest(501, "Transfer-Encoding is not supported; send Content-Length")
        cls = req.header("content-length")
        if not cls:
            return
        if len(set(cls)) != 1 or not cls[0].isdigit() or len(cls[0]) > 18:
            raise _BadRequest(400, "invalid Content-Length")
        n = int(cls[0])
        if n > MAX_BODY:
            raise _BadRequest(413, f"request body larger than {MAX_BODY} bytes")
        if n == 0:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + BODY_TIMEOUT
        while len(buf) < n:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise _BadRequest(408, "timed out reading the request body")
            try:
                async with asyncio.timeout(remaining):
                    chunk = await reader.read(16384)
            except TimeoutError:
                raise _BadRequest(408, "timed out reading the request body") from None
            if not chunk:
                raise asyncio.IncompleteReadError(bytes(buf), n)
            buf += chunk
        req.body = bytes(buf[:n])

    async def _send(self, writer: asyncio.StreamWriter, resp: _Response, keep_alive: bool,
                    head_only: bool) -> None:
        reason = _REASONS.get(resp.status, "Unknown")
        lines = [
            f"HTTP/1.1 {resp.status} {reason}",
            f"Content-Type: {resp.content_type}",
            f"Content-Length: {len(resp.body)}",
            f"Date: {email.utils.formatdate(usegmt=True)}",
            "Server: dispa-admin",
            "Cache-Control: no-store",
            "Connection: " + ("keep-alive" if keep_alive else "close"),
        ]
        lines.extend(f"{k}: {v}" for k, v in resp.headers)
        data = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        writer.write(data if head_only else data + resp.body)
        async with asyncio.timeout(WRITE_TIMEOUT):
            await writer.drain()

    # -- routing ----------------------------------------------------------------------------

    async def _dispatch(self, req: _Request) -> _Response:
        methods = self._routes.get(req.path)
        if methods is None:
            return _error(404, f"no such endpoint: {req.path}")
        method = "GET" if req.method == "HEAD" else req.method
        handler = methods.get(method)
        if handler is None:
            allow = list(methods)
            if "GET" in allow:
                allow.append("HEAD")
            return _error(405, f"method {req.method} not allowed on {req.path}",
                          (("Allow", ", ".join(allow)),))
        try:
            return await handler(req)
        except Exception:
            log.exception("admin endpoint failed",
                          extra=logs.fields(method=req.method, path=req.path))
            return _error(500, "internal error")

    async def _health(self, req: _Request) -> _Response:
        healthy, body = self.provider.health()
        body = dict(body or {})
        body.setdefault("status", "healthy" if healthy else "unhealthy")
        return _json_response(200 if healthy else 503, body)

    async def _metrics(self, req: _Request) -> _Response:
        text = await self.provider.metrics_text()
        return _Response(200, text.encode("utf-8"), PROMETHEUS_CONTENT_TYPE)

    async def _metrics_json(self, req: _Request) -> _Response:
        return _json_response(200, await self.provider.metrics_json())

    async def _status(self, req: _Request) -> _Response:
        refresh = getattr(self.provider, "refresh_status", None)
        if refresh is not None:
            await refresh()
        return _json_response(200, self.provider.status())

    async def _config(self, req: _Request) -> _Response:
        return _json_response(200, self.provider.config())

    def _current_level(self) -> str:
        getter = getattr(self.provider, "log_level", None)
        if callable(getter):
            return str(getter())
        return logs.get_level()

    async def _get_log_level(self, req: _Request) -> _Response:
        return _json_response(200, {"level": self._current_level()})

    async def _put_log_level(self, req: _Request) -> _Response:
        try:
            body = msgspec.json.decode(req.body) if req.body else None
        except msgspec.DecodeError:
            return _error(400, "body must be JSON: {\"level\": \"debug\"}")
        if not isinstance(body, dict) or not isinstance(body.get("level"), str):
            return _error(400, "body must be a JSON object with a string \"level\"")
        previous = self._current_level()
        try:
            self.provider.set_log_level(body["level"])
        except ValueError as e:
            return _error(400, str(e))
        level = body["level"].strip().lower()
        log.info("log level changed", extra=logs.fields(level=level, previous=previous))
        return _json_response(200, {"level": level, "previous": previous})

    async def _purge_cache(self, req: _Request) -> _Response:
        try:
            body = msgspec.json.decode(req.body) if req.body else None
        except msgspec.DecodeError:
            return _error(400, "body must be JSON: {\"prefix\": \"...\"} or {\"key\": \"...\"}")
        if not isinstance(body, dict) or set(body) - {"prefix", "key", "plugin"} or \
                not any(isinstance(body.get(k), str) for k in ("prefix", "key")) or \
                any(k in body and not isinstance(body[k], str) for k in body):
            return _error(400, "body must be a JSON object with a string \"prefix\" or "
                               "\"key\" (and optionally \"plugin\")")
        purge = getattr(self.provider, "purge_cache", None)
        if purge is None:
            return _error(404, "no cache in this server")
        try:
            result = purge(body.get("prefix"), body.get("key"), body.get("plugin"))
        except ValueError as e:
            return _error(400, str(e))
        log.info("cache purge requested", extra=logs.fields(**{k: body.get(k) for k in body}))
        return _json_response(200, result)


    async def _tls_rollback(self, req: _Request) -> _Response:
        """``{"cert_file": "..."}``: serve that certificate's previous version again."""
        try:
            body = msgspec.json.decode(req.body) if req.body else None
        except msgspec.DecodeError:
            body = None
        if not isinstance(body, dict) or set(body) != {"cert_file"} or \
                not isinstance(body["cert_file"], str):
            return _error(400, "body must be JSON: {\"cert_file\": \"/path/of/the.crt\"}")
        rollback = getattr(self.provider, "tls_rollback", None)
        if rollback is None:
            return _error(404, "TLS is not enabled")
        try:
            result = await rollback(body["cert_file"])
        except LookupError as e:
            return _error(404, str(e.args[0]) if e.args else "not found")
        except ValueError as e:
            return _error(409, str(e))
        return _json_response(200, result)


async def _linger(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """After an error answer: half-close, then discard what the client still sends (bounded)
    so that closing with unread input does not reset the connection before the client has
    read the answer."""
    try:
        if writer.can_write_eof():
            writer.write_eof()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 1.0
        budget = 256 * 1024
        while budget > 0:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            async with asyncio.timeout(remaining):
                chunk = await reader.read(16384)
            if not chunk:
                return
            budget -= len(chunk)
    except (OSError, TimeoutError, RuntimeError):
        return


def _find_head_end(buf: bytearray) -> tuple[int, int]:
    """Index of the blank line ending a head and its length, or (-1, 0)."""
    i = buf.find(b"\r\n\r\n")
    j = buf.find(b"\n\n")
    if i >= 0 and (j < 0 or i <= j):
        return i, 4
    if j >= 0:
        # "\r\n\n" and "\n\r\n" are both tolerated via the plain-LF search
        k = buf.find(b"\n\r\n")
        if k >= 0 and k < j:
            return k, 3
        return j, 2
    k = buf.find(b"\n\r\n")
    if k >= 0:
        return k, 3
    return -1, 0
