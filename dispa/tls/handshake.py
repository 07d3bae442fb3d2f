"""Accepting a TLS connection: the handshake, its failures counted by reason, then a Session.

Theory of operation
-------------------
``create_server(ssl=...)`` hides handshake failures (an ``ssl.SSLError`` is an OSError,
which asyncio and uvloop drop silently), so the TLS listener accepts plain TCP with
:class:`TlsAccept` and upgrades it with ``loop.start_tls``. The first step of
``start_tls`` is run at once, inside ``data_received`` of the ClientHello's first bytes
(reading paused), and those bytes are handed to the TLS protocol before reading resumes:
no byte is lost and no extra loop turn is spent. A failure raises out of ``start_tls`` with
the OpenSSL reason, which becomes the label of ``dispa_tls_handshake_errors_total``.

A client that connects and sends nothing, or never finishes, is closed after
``handshake_timeout``; a non-TLS client (an HTTP request on the TLS port) fails at once.

After the handshake a Session (compiled or pure) takes over the TLS transport with its
``tls`` field set (scheme https, client certificate); bytes that arrived between the end of
the handshake and that moment are replayed to it in order. ``_attach`` is also where the
negotiated ALPN protocol picks the connection's handler (``h2``: H2Session, else the
HTTP/1 Session): the one hook for a new ALPN protocol. With ``client_ocsp`` on the context
the connection ended on, ``_attach`` first gets the client leaf's OCSP status (cached, or
asked while this connection's reading is paused) and closes a refused connection
(tls/client_ocsp.py).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time

from dispa.tls.client_ocsp import CHECKS as OCSP_CHECKS
from dispa.tls.mtls import session_info

log = logging.getLogger("dispa.tls")

HANDSHAKES = "dispa_tls_handshakes_total"
HANDSHAKE_ERRORS = "dispa_tls_handshake_errors_total"

# X509_V_ERR_* codes that deserve their own label (the rest: "client_cert_invalid")
_VERIFY_REASONS = {10: "client_cert_expired", 23: "client_cert_revoked",
                   20: "client_cert_untrusted", 2: "client_cert_untrusted",
                   18: "client_cert_untrusted", 19: "client_cert_untrusted",
                   22: "client_cert_chain_too_long", 3: "client_crl_missing",
                   9: "client_cert_not_yet_valid", 12: "client_crl_expired",
                   11: "client_crl_not_yet_valid", 8: "client_crl_bad_signature"}
_SSL_REASONS = {
    "HTTP_REQUEST": "http_on_tls_port", "HTTPS_PROXY_REQUEST": "http_on_tls_port",
    "WRONG_VERSION_NUMBER": "bad_client_hello", "UNSUPPORTED_PROTOCOL": "protocol_version",
    "UNEXPECTED_MESSAGE": "bad_client_hello", "RECORD_LAYER_FAILURE": "bad_client_hello",
    "PACKET_LENGTH_TOO_LONG": "bad_client_hello", "LENGTH_MISMATCH": "bad_client_hello",
    "BAD_PACKET_LENGTH": "bad_client_hello", "DECODE_ERROR": "bad_client_hello",
    "NO_SHARED_CIPHER": "no_shared_cipher", "NO_SUITABLE_KEY_SHARE": "no_shared_group",
    "NO_SHARED_GROUPS": "no_shared_group", "NO_APPLICATION_PROTOCOL": "no_alpn",
    "PEER_DID_NOT_RETURN_A_CERTIFICATE": "client_cert_missing",
    "CALLBACK_FAILED": "sni_rejected", "CLIENTHELLO_TLSEXT": "sni_rejected",
    "NO_CERTIFICATE_ASSIGNED": "no_certificate", "NO_CERTIFICATE_SET": "no_certificate",
}


def reason_of(exc: BaseException, ssl_object=None) -> str:
    """A short, bounded label for a failed handshake."""
    own = getattr(ssl_object, "dispa_reason", None) if ssl_object is not None else None
    if own:
        return own
    if isinstance(exc, ssl.SSLCertVerificationError):
        return _VERIFY_REASONS.get(exc.verify_code, "client_cert_invalid")
    if isinstance(exc, ssl.SSLError):
        r = exc.reason or ""
        if r in _SSL_REASONS:
            return _SSL_REASONS[r]
        if r.startswith(("TLSV1_ALERT_", "SSLV3_ALERT_", "TLSV13_ALERT_")):
            return "client_alert"  # the client refused us (e.g. our certificate)
        if r.startswith(("BAD_", "INVALID_", "UNKNOWN_", "WRONG_")):
            return "bad_client_hello"
        return "ssl_error"
    if isinstance(exc, (ConnectionAbortedError, asyncio.TimeoutError, TimeoutError)):
        return "timeout"
    if isinstance(exc, (ConnectionResetError, BrokenPipeError, EOFError)):
        return "reset"
    return "other"


class _Hold(asyncio.Protocol):
    """Stands in for the Session until it is attached: keeps what arrives, in order."""

    __slots__ = ("data", "eof", "lost")

    def __init__(self):
        self.data: list[bytes] = []
        self.eof = False
        self.lost = False

    def data_received(self, data: bytes) -> None:
        self.data.append(data)

    def eof_received(self):
        self.eof = True
        return True

    def connection_lost(self, exc) -> None:
        self.lost = True


class TlsAccept(asyncio.Protocol):
    """One accepted TCP connection on a TLS listener, until its handshake ends."""

    __slots__ = ("plane", "transport", "timer", "coro", "hold", "started", "t0", "ctx",
                 "reason")

    def __init__(self, plane):
        self.plane = plane  # dispa.server.worker.DataPlane: .tls, .metrics, session_factory
        self.transport = None
        self.timer = None
        self.coro = None
        self.hold = None
        self.started = False
        self.t0 = 0.0
        self.ctx = None
        self.reason = ""  # set by the SNI callback when it refuses the connection

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.t0 = time.monotonic()
        tls = self.plane.tls
        self.timer = asyncio.get_running_loop().call_later(tls.handshake_timeout,
                                                           self._timeout)

    def _timeout(self) -> None:
        self.timer = None
        if not self.started:
            self._failed("timeout")
            self.transport.abort()

    def connection_lost(self, exc) -> None:
        if not self.started:
            if self.timer is not None:
                self.timer.cancel()
                self.timer = None
                self._failed("no_client_hello")

    def eof_received(self):
        return False

    def data_received(self, data: bytes) -> None:
        if self.started:
            return
        self.started = True
        tls = self.plane.tls
        transport = self.transport
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        ctx = tls.base
        if ctx is None:  # no certificate yet (e.g. waiting for ACME)
            self._failed("no_certificate")
            transport.abort()
            return
        transport.pause_reading()
        loop = asyncio.get_running_loop()
        self.hold = _Hold()
        remaining = max(0.05, tls.handshake_timeout - (time.monotonic() - self.t0))
        self.ctx = ctx
        self.coro = loop.start_tls(transport, self.hold, ctx, server_side=True,
                                   ssl_handshake_timeout=remaining)
        # First step now: the TLS protocol replaces us on the transport and schedules its
        # connection_made and resume_reading; the ClientHello bytes go in right after
        # those, before any new read (both run in this same loop turn).
        self._step(None)
        proto = transport.get_protocol()
        if proto is not self:
            loop.call_soon(self._feed_first, proto, data)

    def _feed_first(self, proto, data: bytes) -> None:
        # The ClientHello is (nearly always) in these bytes, so the SNI callback runs
        # inside this call: it can tell this connection why it refused it (uvloop's
        # SSLProtocol does not expose the SSLObject, so the reason cannot be found on it).
        tls = self.plane.tls
        tls.accepting = self
        try:
            _feed(proto, data)
        finally:
            tls.accepting = None

    def _step(self, _fut) -> None:
        try:
            fut = self.coro.send(None)
        except StopIteration as done:
            self._attach(done.value)
            return
        except BaseException as exc:  # noqa: BLE001 - every failure is counted, none escapes
            self._failed(self.reason or reason_of(exc, _last_ssl_object(self.transport)))
            log.debug("TLS handshake failed: %r", exc)
            try:
                self.transport.abort()
            except Exception:  # noqa: BLE001
                pass
            return
        fut.add_done_callback(self._step)

    def _attach(self, app_transport) -> None:
        plane = self.plane
        hold = self.hold
        self.coro = None
        if hold.lost or app_transport.is_closing():
            return
        ssl_object = app_transport.get_extra_info("ssl_object")
        version = ssl_object.version() or "-"
        plane.metrics.inc(HANDSHAKES, (("version", version),))
        allowed = getattr(ssl_object.context, "dispa_versions", None)
        if allowed is not None and not allowed[0] <= _VERSIONS.get(version, "") <= allowed[1]:
            # [[tls.sni]] min_version / max_version: OpenSSL chose the version before the
            # SNI callback, so a name's narrower range is enforced here
            self._failed("version_not_allowed_for_name")
            log.info("TLS %s refused: the requested name allows only %s..%s", version,
                     allowed[0], allowed[1])
            app_transport.abort()
            return
        if getattr(plane, "h2_limits", None) is not None and \
                ssl_object.selected_alpn_protocol() == "h2":
            session = plane.h2_session_factory()  # ALPN h2 (docs/http2.md)
        else:
            session = plane.session_factory()
        try:
            session.tls = session_info(ssl_object, plane.tls)
        except Exception:  # noqa: BLE001 - a certificate we cannot describe
            log.exception("cannot read the TLS session")
            self._failed("client_cert_unreadable")
            app_transport.abort()
            return
        policy = getattr(ssl_object.context, "dispa_client_ocsp", None)
        der = ssl_object.getpeercert(binary_form=True) if policy is not None else None
        if der:
            # client_ocsp (tls/client_ocsp.py): the Session starts once the leaf's status
            # is known; a cached answer decides now, otherwise this connection waits
            # (reading paused, bytes kept in the hold) while the others proceed.
            checker = plane.tls.client_ocsp
            result = checker.cached(der)
            if result is None:
                app_transport.pause_reading()
                checker.query(der, policy).add_done_callback(
                    lambda task: self._ocsp_done(task, policy, session, app_transport))
                return
            if not self._ocsp_verdict(result, policy, session, app_transport):
                return
        self._start(session, app_transport)

    def _ocsp_done(self, task, policy, session, app_transport) -> None:
        if task.cancelled():
            result = _ocsp_unavailable("the check was cancelled")
        else:
            result = task.result()
        if self.hold.lost or app_transport.is_closing():
            return
        if self._ocsp_verdict(result, policy, session, app_transport):
            app_transport.resume_reading()
            self._start(session, app_transport)

    def _ocsp_verdict(self, result, policy, session, app_transport) -> bool:
        """Count the answer; close the connection unless the policy accepts it."""
        metrics = self.plane.metrics
        metrics.inc(OCSP_CHECKS, (("result", result.status), ("source", result.source)))
        if policy.accepts(result.status):
            if result.status != "good":
                log.debug("client certificate %s: OCSP %s (%s), accepted (soft)",
                          _subject(session), result.status, result.detail)
            return True
        reason = "client_ocsp_revoked" if result.status == "revoked" else \
            "client_ocsp_unavailable"
        self._failed(reason)
        log.info("client certificate %s refused: OCSP %s%s", _subject(session),
                 result.status, f" ({result.detail})" if result.detail else "")
        app_transport.abort()
        return False

    def _start(self, session, app_transport) -> None:
        hold = self.hold
        session.connection_made(app_transport)
        app_transport.set_protocol(session)
        for chunk in hold.data:
            session.data_received(chunk)
        if hold.eof and not session.eof_received():
            app_transport.close()

    def _failed(self, reason: str) -> None:
        self.plane.metrics.inc(HANDSHAKE_ERRORS, (("reason", reason),))


_VERSIONS = {"TLSv1.2": "1.2", "TLSv1.3": "1.3"}


def _ocsp_unavailable(detail: str):
    from dispa.tls.client_ocsp import UNAVAILABLE, Result
    return Result(UNAVAILABLE, detail, "none")


def _subject(session) -> str:
    cert = (getattr(session, "tls", None) and session.tls.fields.get("client_cert")) or {}
    return repr(cert.get("subject", "?"))


def _feed(proto, data: bytes) -> None:
    """Give ``data`` to a (buffered) protocol as if the transport had read it."""
    get_buffer = getattr(proto, "get_buffer", None)
    if get_buffer is None:
        proto.data_received(data)
        return
    view = memoryview(data)
    while view:
        buf = get_buffer(len(view))
        n = min(len(buf), len(view))
        buf[:n] = view[:n]
        proto.buffer_updated(n)
        view = view[n:]


def _last_ssl_object(transport):
    proto = transport.get_protocol() if transport is not None else None
    return getattr(proto, "_sslobj", None)
