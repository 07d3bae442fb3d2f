"""Protocol detection on one listener: TLS ClientHello, the HTTP/2 preface, or HTTP/1.

Theory of operation
-------------------
When ``[http2] enabled = true``, a plain listener accepts connections with :class:`Detect`,
which looks at the first bytes the client sends and hands the connection (and those bytes)
to the right protocol object with ``transport.set_protocol``:

==============================  ===================================================
first bytes                     handler
==============================  ===================================================
``0x16`` (TLS handshake record)  :class:`dispa.tls.handshake.TlsAccept` (when certificates
                                 are configured; ALPN then picks h2 or HTTP/1.1)
``PRI * HTTP/2.0\\r\\n\\r\\nSM...``   :class:`dispa.proxy.h2_session.H2Session` (h2c, prior
                                 knowledge, RFC 9113 §3.3)
an HTTP/1.1 request head with    ``101 Switching Protocols``, then H2Session with the
``Upgrade: h2c``                 request as stream 1 (RFC 7540 §3.2)
anything else                    the HTTP/1.1 :class:`~dispa.proxy.protocol.Session`
==============================  ===================================================

Only a prefix of the preface (or of a request head that may carry ``Upgrade: h2c``) is
waited for; a plain HTTP/1.1 request whose head has no ``h2c`` is handed over at once, so
the HTTP/1.1 path pays one ``bytes`` search per connection. What is buffered is bounded
(``_MAX_PEEK``), and a client that sends nothing is closed at the header timeout.
"""

from __future__ import annotations

import asyncio
import base64
import re
import time

from dispa.protocols.http2 import PREFACE

_MAX_PEEK = 16 * 1024
_HTTP1_LINE = re.compile(rb"[^ ]+ [^ ]+ HTTP/\d\.\d\r?$")
_TLS_HANDSHAKE = 0x16
_SWITCHING = (b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n"
              b"Upgrade: h2c\r\n\r\n")


def classify(buf: bytes, tls_ok: bool) -> str:
    """``"tls"``, ``"h2"``, ``"h2c-upgrade"``, ``"http1"``, ``"reject"`` (neither HTTP/1.x
    nor HTTP/2) or ``"more"`` (need more bytes)."""
    if not buf:
        return "more"
    if buf[0] == _TLS_HANDSHAKE and tls_ok:
        return "tls"
    if buf[0] < 0x20 and buf[0] not in (0x0D, 0x0A) or buf[0] >= 0x7F:
        return "reject"  # binary: no HTTP/1 request line starts like this
    n = min(len(buf), len(PREFACE))
    if buf[:n] == PREFACE[:n]:
        return "h2" if n == len(PREFACE) else "more"
    line = buf.lstrip(b"\r\n")  # RFC 9112 §2.2: empty lines before a request are ignored
    nl = line.find(b"\n")
    if nl >= 0 and not _HTTP1_LINE.match(line[:nl]):
        # neither the h2 preface nor an HTTP/1.x request line: close without an answer
        # (RFC 9113 §3.4: an invalid preface ends the connection)
        return "reject"
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        # wait for the whole head (it may ask for h2c), within bounds; a bare-LF head
        # cannot be an h2c upgrade we accept
        return "http1" if len(buf) >= _MAX_PEEK or b"\n\n" in buf else "more"
    head = buf[:end]
    if b"h2c" not in head.lower():
        return "http1"
    return "h2c-upgrade" if upgrade_request(head) is not None else "http1"


def upgrade_request(head: bytes):
    """(HTTP2-Settings bytes, h2 request headers, method) for an acceptable
    ``Upgrade: h2c`` request head, else None (served as HTTP/1.1, upgrade ignored).

    Only requests without a body are upgraded (a body would have to be read first,
    RFC 7540 §3.2); their headers become stream 1's request."""
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or parts[2] != b"HTTP/1.1" or not parts[1].startswith(b"/"):
        return None
    method, target = parts[0], parts[1]
    fields = []
    upgrade = settings = None
    connection = b""
    host = b""
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not name or name != name.strip():
            return None
        name = name.lower()
        value = value.strip()
        if name == b"upgrade":
            upgrade = value.lower()
        elif name == b"http2-settings":
            settings = value
        elif name == b"connection":
            connection += b"," + value.lower()
        elif name == b"host":
            host = value
        elif name in (b"content-length", b"transfer-encoding"):
            if name == b"transfer-encoding" or value != b"0":
                return None
        elif name not in (b"keep-alive", b"proxy-connection", b"te"):
            fields.append((name, value))
    tokens = {t.strip() for t in connection.split(b",")}
    if upgrade != b"h2c" or settings is None or b"upgrade" not in tokens \
            or b"http2-settings" not in tokens:
        return None
    try:
        base64.urlsafe_b64decode(settings + b"=" * (-len(settings) % 4))
    except ValueError:
        return None
    headers = [(b":method", method), (b":scheme", b"http"), (b":authority", host),
               (b":path", target)] + fields
    return settings, headers, method


class Detect(asyncio.Protocol):
    """The first protocol of every connection on a listener that serves several."""

    __slots__ = ("plane", "transport", "buf", "deadline", "done")

    def __init__(self, plane):
        self.plane = plane  # dispa.server.worker.DataPlane
        self.transport = None
        self.buf = b""
        self.deadline = 0.0
        self.done = False

    def connection_made(self, transport) -> None:
        self.transport = transport
        plane = self.plane
        plane.sessions.add(self)
        self.deadline = time.monotonic() + plane.runtime.proxy.header_timeout_seconds

    def connection_lost(self, exc) -> None:
        self.plane.sessions.discard(self)

    def eof_received(self):
        if self.buf and not self.done:
            self._hand_over("http1")  # let the HTTP/1.1 parser judge a truncated head
            proto = self.transport.get_protocol()
            if proto is not self:
                return proto.eof_received()
        return False

    def data_received(self, data: bytes) -> None:
        if self.done:
            return
        self.buf = self.buf + data if self.buf else data
        plane = self.plane
        kind = classify(self.buf, getattr(plane.tls, "base", None) is not None)
        if kind != "more":
            self._hand_over(kind)

    def _hand_over(self, kind: str) -> None:
        self.done = True
        plane = self.plane
        plane.sessions.discard(self)
        transport = self.transport
        buf, self.buf = self.buf, b""
        limits = getattr(plane, "h2_limits", None)
        if kind == "reject":
            plane.metrics.inc("dispa_protocol_errors_total", (("status", "preface"),))
            transport.close()
            return
        if kind == "tls":
            from dispa.tls.handshake import TlsAccept
            proto = TlsAccept(plane)
        elif kind in ("h2", "h2c-upgrade") and limits is not None:
            proto = plane.h2_session_factory()
            if kind == "h2c-upgrade":
                end = buf.find(b"\r\n\r\n")
                up = upgrade_request(buf[:end])
                rest = buf[end + 4:]
                transport.write(_SWITCHING)
                transport.set_protocol(proto)
                proto.connection_made(transport, upgrade=up)
                if rest:
                    proto.data_received(rest)
                return
        else:
            proto = plane.session_factory()
        transport.set_protocol(proto)
        proto.connection_made(transport)
        proto.data_received(buf)

    # the worker's sweeper and drain treat us like a Session
    def on_deadline(self, now: float) -> None:
        self._abort("no request")

    def drain(self) -> None:
        if not self.buf:
            self._abort("draining")

    def _abort(self, why: str) -> None:
        self.done = True
        self.plane.sessions.discard(self)
        if self.transport is not None:
            self.transport.close()
