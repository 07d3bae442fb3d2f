"""OCSP checking of client certificates (mTLS), in the workers.

Theory of operation
-------------------
``client_ocsp`` in ``[tls.client_auth]`` (or a ``[[tls.sni]]`` entry's) turns it on for
the connections that end on that context: :meth:`TlsServer._build` hangs a
:class:`Policy` on the ``SSLContext`` (``dispa_client_ocsp``). After the handshake, and
before the Session sees a byte, ``TlsAccept._attach`` (tls/handshake.py) asks
:class:`ClientOcsp` about the verified leaf certificate:

- a cached answer (keyed by the certificate's SHA-256, kept until the response's
  ``next_update``, bounded LRU) decides at once;
- otherwise the connection's reading is paused and one query is started (a second
  connection with the same certificate waits for the same query): the issuer is found in
  the configured CA bundle (by authority key id, then by name, and must have signed the
  leaf), the request is built with ``cryptography.x509.ocsp`` and POSTed over a small
  asyncio HTTP/1.1 client to the certificate's AIA responder or ``client_ocsp_url``, all
  within ``client_ocsp_timeout``. The response is verified as stapling does it
  (:func:`dispa.tls.ocsp.verified_response`: issuer or delegated responder signature,
  serial, issuer, freshness).

The event loop never blocks: the only waits are socket waits; parsing and one signature
check per answer run inline (tens of microseconds). Results: ``good`` (accept),
``revoked`` (close), ``unknown`` or ``unavailable`` (responder unreachable, timed out,
answered garbage, or no responder/issuer to ask): ``soft`` accepts, ``hard`` closes.
A responder that failed is not asked again for ``_BACKOFF`` seconds (answers are then
``unavailable`` at once), so a dead responder does not cost every new connection a
timeout.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import logging
import time
from urllib.parse import urlsplit

log = logging.getLogger("dispa.tls")

CHECKS = "dispa_tls_client_ocsp_total"
GOOD, REVOKED, UNKNOWN, UNAVAILABLE = "good", "revoked", "unknown", "unavailable"
_BACKOFF = 5.0  # seconds a failed responder is left alone
_MAX_BODY = 1 << 20  # an OCSP response is a few KiB; refuse anything absurd
DEFAULT_CACHE_SIZE = 4096


def parse_http_url(url: str) -> tuple[str, int, str] | str:
    """(host, port, path) of an ``http://`` responder URL, or why it is not one."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        return f"{url!r} is not a URL ({exc})"
    if parts.scheme.lower() != "http":
        return f"{url!r}: only http:// OCSP responders are supported"
    if not parts.hostname:
        return f"{url!r} has no host"
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return parts.hostname, port or 80, path


class Policy:
    """The client-OCSP settings of one context (from its ``client_auth`` dict)."""

    __slots__ = ("mode", "url", "timeout", "ca_pem")

    def __init__(self, mode: str, url: str, timeout: float, ca_pem: str):
        self.mode = mode  # "soft" | "hard"
        self.url = url  # "" : the certificate's AIA responder
        self.timeout = timeout
        self.ca_pem = ca_pem

    @classmethod
    def from_auth(cls, auth: dict | None) -> "Policy | None":
        if not auth or auth.get("mode", "off") == "off" or \
                auth.get("client_ocsp", "off") == "off":
            return None
        return cls(auth["client_ocsp"], auth.get("client_ocsp_url", ""),
                   float(auth.get("client_ocsp_timeout", 3.0)), auth.get("ca_pem", ""))

    def accepts(self, status: str) -> bool:
        return status == GOOD or (status != REVOKED and self.mode == "soft")


class Result:
    """One check's outcome: status, why (for the log), and whether a responder was asked."""

    __slots__ = ("status", "detail", "source")

    def __init__(self, status: str, detail: str = "", source: str = "responder"):
        self.status = status
        self.detail = detail
        self.source = source  # "responder" | "cache" | "backoff" | "none"


class ClientOcsp:
    """A worker's checker: answer cache, in-flight queries, issuer index, back-off."""

    def __init__(self, metrics=None, cache_size: int = DEFAULT_CACHE_SIZE, clock=time.time):
        self.metrics = metrics
        self.cache_size = cache_size
        self.clock = clock
        self._cache: collections.OrderedDict[bytes, tuple[str, float]] = \
            collections.OrderedDict()
        self._inflight: dict[bytes, asyncio.Task] = {}
        self._down: dict[str, float] = {}  # responder URL -> when to try again
        self._issuers: dict[bytes, tuple[dict, dict]] = {}  # CA bundle hash -> indexes
        self.queries = 0  # requests sent to responders (tests, status)
        if metrics is not None and hasattr(metrics, "set_help"):
            metrics.set_help(CHECKS, "counter",
                             "client-certificate OCSP checks, by result and source")

    # -- cache ----------------------------------------------------------------------
    def cached(self, der: bytes) -> Result | None:
        """The cached answer for this certificate, if still before its next_update."""
        key = hashlib.sha256(der).digest()
        hit = self._cache.get(key)
        if hit is None:
            return None
        if hit[1] <= self.clock():
            del self._cache[key]
            return None
        self._cache.move_to_end(key)
        return Result(hit[0], "cached answer", "cache")

    def _remember(self, key: bytes, status: str, until: float) -> None:
        if until <= self.clock():
            return  # no next_update: newer status is always available (RFC 6960 4.2.2.1)
        self._cache[key] = (status, until)
        self._cache.move_to_end(key)
        while len(self._cache) > max(1, self.cache_size):
            self._cache.popitem(last=False)

    # -- queries --------------------------------------------------------------------
    def query(self, der: bytes, policy: Policy) -> "asyncio.Future[Result]":
        """A task answering for ``der``; shared by connections presenting the same
        certificate while it runs. Never raises: failures are UNAVAILABLE results."""
        key = hashlib.sha256(der).digest()
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.ensure_future(self._ask(key, der, policy))
            self._inflight[key] = task
            task.add_done_callback(lambda _t, k=key: self._inflight.pop(k, None))
        return task

    async def _ask(self, key: bytes, der: bytes, policy: Policy) -> Result:
        try:
            return await self._ask_inner(key, der, policy)
        except Exception as exc:  # noqa: BLE001 - a bug must not leave a connection hanging
            log.exception("client OCSP check failed")
            return Result(UNAVAILABLE, f"internal error: {exc!r}", "none")

    async def _ask_inner(self, key: bytes, der: bytes, policy: Policy) -> Result:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.x509 import ocsp as xocsp

        from dispa.tls import ocsp
        leaf = x509.load_der_x509_certificate(der)
        issuer = self._issuer(leaf, policy.ca_pem)
        if issuer is None:
            return Result(UNAVAILABLE, "the issuer is not in the client CA bundle", "none")
        url = policy.url or aia_ocsp_url(leaf)
        if not url:
            return Result(UNAVAILABLE, "the certificate names no OCSP responder", "none")
        target = parse_http_url(url)
        if isinstance(target, str):
            return Result(UNAVAILABLE, target, "none")
        now = self.clock()
        if self._down.get(url, 0.0) > now:
            return Result(UNAVAILABLE, f"responder {url} failed recently", "backoff")
        request = xocsp.OCSPRequestBuilder().add_certificate(leaf, issuer, hashes.SHA1()) \
            .build().public_bytes(serialization.Encoding.DER)
        self.queries += 1
        try:
            body = await asyncio.wait_for(post(*target, request), policy.timeout)
        except (OSError, asyncio.TimeoutError, ValueError, EOFError) as exc:
            self._down[url] = self.clock() + _BACKOFF
            why = "timed out" if isinstance(exc, asyncio.TimeoutError) else str(exc) or \
                type(exc).__name__
            return Result(UNAVAILABLE, f"responder {url}: {why}")
        try:
            resp = ocsp.verified_response(body, leaf, issuer)
        except ocsp.OcspError as exc:
            self._down[url] = self.clock() + _BACKOFF
            return Result(UNAVAILABLE, f"responder {url}: {exc}")
        status = {xocsp.OCSPCertStatus.GOOD: GOOD,
                  xocsp.OCSPCertStatus.REVOKED: REVOKED}.get(resp.certificate_status, UNKNOWN)
        nxt = resp.next_update_utc
        if nxt is not None:
            self._remember(key, status, nxt.timestamp())
        detail = ""
        if status == REVOKED and resp.revocation_time_utc is not None:
            detail = f"revoked at {resp.revocation_time_utc.isoformat()}"
        return Result(status, detail)

    # -- issuer lookup --------------------------------------------------------------
    def _issuer(self, leaf, ca_pem: str):
        """The certificate of the bundle that signed ``leaf`` (key id, then name)."""
        from cryptography import x509
        from cryptography.exceptions import InvalidSignature
        h = hashlib.sha256(ca_pem.encode()).digest()
        idx = self._issuers.get(h)
        if idx is None:
            by_kid: dict[bytes, list] = {}
            by_name: dict = {}
            try:
                cas = x509.load_pem_x509_certificates(ca_pem.encode())
            except ValueError:
                cas = []
            for ca in cas:
                try:
                    kid = ca.extensions.get_extension_for_class(
                        x509.SubjectKeyIdentifier).value.digest
                    by_kid.setdefault(kid, []).append(ca)
                except x509.ExtensionNotFound:
                    pass
                by_name.setdefault(ca.subject, []).append(ca)
            if len(self._issuers) > 64:
                self._issuers.clear()
            idx = self._issuers[h] = (by_kid, by_name)
        by_kid, by_name = idx
        candidates = []
        try:
            aki = leaf.extensions.get_extension_for_class(
                x509.AuthorityKeyIdentifier).value.key_identifier
            candidates += by_kid.get(aki, []) if aki else []
        except x509.ExtensionNotFound:
            pass
        candidates += by_name.get(leaf.issuer, [])
        for ca in candidates:
            try:
                leaf.verify_directly_issued_by(ca)
                return ca
            except (ValueError, TypeError, InvalidSignature):
                continue
        return None


def aia_ocsp_url(cert) -> str:
    """The OCSP responder in a certificate's Authority Information Access, or ""."""
    from cryptography import x509
    from cryptography.x509.oid import AuthorityInformationAccessOID
    try:
        aia = cert.extensions.get_extension_for_class(x509.AuthorityInformationAccess).value
    except x509.ExtensionNotFound:
        return ""
    for d in aia:
        if d.access_method == AuthorityInformationAccessOID.OCSP:
            return d.access_location.value
    return ""


async def post(host: str, port: int, path: str, body: bytes) -> bytes:
    """POST an OCSP request (HTTP/1.1, one request per connection); the response body.
    Raises OSError/ValueError/EOFError on a transport or protocol failure."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        hostport = host if port == 80 else f"{host}:{port}"
        if ":" in host and not host.startswith("["):
            hostport = f"[{host}]" if port == 80 else f"[{host}]:{port}"
        writer.write(f"POST {path} HTTP/1.1\r\nHost: {hostport}\r\n"
                     "Content-Type: application/ocsp-request\r\n"
                     "Accept: application/ocsp-response\r\n"
                     f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
                     .encode("latin-1") + body)
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        if len(head) > 16384:
            raise ValueError("response head too large")
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or parts[1] != "200":
            raise ValueError(f"HTTP status line {lines[0][:80]!r}")
        headers = {}
        for line in lines[1:]:
            if ":" in line:
                k, v = line.split(":", 1)
                headers[k.strip().lower()] = v.strip()
        if "chunked" in headers.get("transfer-encoding", "").lower():
            return await _read_chunked(reader)
        if "content-length" in headers:
            n = int(headers["content-length"])
            if not 0 <= n <= _MAX_BODY:
                raise ValueError(f"Content-Length {n}")
            return await reader.readexactly(n)
        data = await reader.read(_MAX_BODY + 1)  # until close
        while data and len(data) <= _MAX_BODY:
            more = await reader.read(_MAX_BODY + 1 - len(data))
            if not more:
                break
            data += more
        if len(data) > _MAX_BODY:
            raise ValueError("response body too large")
        return data
    except asyncio.IncompleteReadError as exc:
        raise EOFError("the responder closed the connection early") from exc
    except asyncio.LimitOverrunError as exc:
        raise ValueError("response head too large") from exc
    finally:
        writer.close()


async def _read_chunked(reader) -> bytes:
    out = bytearray()
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";")[0].strip(), 16)
        if size == 0:
            break
        if len(out) + size > _MAX_BODY:
            raise ValueError("response body too large")
        out += await reader.readexactly(size)
        await reader.readexactly(2)
    return bytes(out)
