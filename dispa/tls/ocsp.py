"""OCSP stapling: responses fetched and checked by the master, stapled by the workers.

Master side (:func:`check_response`, :func:`fetch_response`): a response comes from a file
next to the certificate (``<cert_file>.ocsp``, DER, as HAProxy reads it) or, with
``[tls] ocsp_stapling = true``, from the responder named in the certificate's Authority
Information Access, fetched again once half of its validity has passed. A response is used
only when it is SUCCESSFUL, names the leaf's serial and issuer, carries a valid signature
of the issuer or of an OCSP-signing responder certificate the issuer delegated to, says
GOOD, and is not past ``next_update``; it then travels in ``Snapshot.tls`` with its
certificate. Anything else is refused with a warning and nothing is stapled.

Worker side (:func:`install`): Python's ``ssl`` has no server OCSP API, so the status
callback is set through ctypes (``SSL_CTX_set_tlsext_status_cb``); when a client asks
(status_request), the callback finds the response of the context the connection ended on
(after SNI) and hands OpenSSL a copy (``SSL_set_tlsext_status_ocsp_resp``, which takes
ownership of an ``OPENSSL_malloc`` buffer).
"""

from __future__ import annotations

import ctypes
import datetime
import logging
import urllib.request
import weakref

# The master-side functions import cryptography when called (workers never need it).

log = logging.getLogger("dispa.tls")

_SSL_CTRL_SET_TLSEXT_STATUS_REQ_CB = 63
_SSL_CTRL_SET_TLSEXT_STATUS_REQ_OCSP_RESP = 71
_SSL_TLSEXT_ERR_OK = 0
_SSL_TLSEXT_ERR_NOACK = 3


class OcspError(ValueError):
    """A response that must not be stapled."""


def _chain(cert_pem: str) -> list:
    from cryptography import x509
    return x509.load_pem_x509_certificates(cert_pem.encode("ascii"))


def responder_url(cert_pem: str) -> str:
    """The OCSP responder of the leaf (AIA), or ""."""
    from cryptography import x509
    from cryptography.x509.oid import AuthorityInformationAccessOID, ExtensionOID
    leaf = _chain(cert_pem)[0]
    try:
        aia = leaf.extensions.get_extension_for_oid(ExtensionOID.AUTHORITY_INFORMATION_ACCESS)
    except x509.ExtensionNotFound:
        return ""
    for d in aia.value:
        if d.access_method == AuthorityInformationAccessOID.OCSP:
            return d.access_location.value
    return ""


def check_response(der: bytes, cert_pem: str, issuer_pem: str = "", *,
                   now: datetime.datetime | None = None) -> float:
    """Validate a DER response for the leaf of ``cert_pem``; returns its next_update
    (epoch seconds, 0 when the responder gave none). Raises OcspError."""
    from cryptography import x509
    from cryptography.x509 import ocsp
    chain = _chain(cert_pem)
    issuer = x509.load_pem_x509_certificate(issuer_pem.encode()) if issuer_pem else \
        (chain[1] if len(chain) > 1 else None)
    if issuer is None:
        # without the issuer neither the CertID nor the signature can be checked
        raise OcspError("the certificate file has no issuer certificate after the leaf: "
                        "the response cannot be verified")
    resp = verified_response(der, chain[0], issuer, now=now)
    if resp.certificate_status != ocsp.OCSPCertStatus.GOOD:
        raise OcspError(f"certificate status is {resp.certificate_status.name}")
    nxt = resp.next_update_utc
    return nxt.timestamp() if nxt is not None else 0.0


def verified_response(der: bytes, leaf, issuer, *, now: datetime.datetime | None = None):
    """The parsed ``OCSPResponse`` for ``leaf`` (a cryptography certificate) issued by
    ``issuer``, once it is SUCCESSFUL, names this serial and issuer, carries a valid
    signature (the issuer's or a delegated responder's) and is current; its
    ``certificate_status`` (GOOD, REVOKED or UNKNOWN) is the caller's business. Shared by
    stapling and client-certificate checks (tls/client_ocsp.py). Raises OcspError."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509 import ocsp
    try:
        resp = ocsp.load_der_ocsp_response(der)
    except ValueError as exc:
        raise OcspError(f"not an OCSP response: {exc}") from None
    if resp.response_status != ocsp.OCSPResponseStatus.SUCCESSFUL:
        raise OcspError(f"responder said {resp.response_status.name}")
    if resp.serial_number != leaf.serial_number:
        raise OcspError("the response is for another certificate")
    want = hashes.Hash(resp.hash_algorithm)
    want.update(_spki_bits(issuer))
    if resp.issuer_key_hash != want.finalize():
        raise OcspError("the response names another issuer")
    now = now or datetime.datetime.now(datetime.timezone.utc)
    _verify_signature(resp, issuer, now)
    if resp.this_update_utc > now + _SKEW:
        raise OcspError(f"the response is not valid before {resp.this_update_utc.isoformat()}")
    nxt = resp.next_update_utc
    if nxt is not None and nxt <= now:
        raise OcspError(f"the response expired at {nxt.isoformat()}")
    return resp


_SKEW = datetime.timedelta(minutes=5)  # clock difference tolerated on this_update


def _is_responder(resp, cert) -> bool:
    """Whether ``cert`` is the one the response's ResponderID names (by key or name)."""
    from cryptography.hazmat.primitives import hashes
    if resp.responder_key_hash is not None:
        h = hashes.Hash(hashes.SHA1())
        h.update(_spki_bits(cert))
        return h.finalize() == resp.responder_key_hash
    return resp.responder_name == cert.subject


def _verify_signature(resp, issuer, now: datetime.datetime) -> None:
    """RFC 6960 4.2.2.2: the response is signed by the issuing CA itself, or by a
    responder certificate the CA issued for OCSP signing (id-kp-OCSPSigning), which
    travels in the response. Raises OcspError otherwise: a forged or corrupted response
    must never be stapled (clients that check it would refuse the connection)."""
    from cryptography import x509
    from cryptography.exceptions import InvalidSignature
    from cryptography.x509.oid import ExtendedKeyUsageOID
    if _is_responder(resp, issuer):
        signer = issuer
    else:
        signer = next((c for c in resp.certificates if _is_responder(resp, c)), None)
        if signer is None:
            raise OcspError("the response is signed by a responder that is neither the "
                            "issuer nor a certificate included in the response")
        try:
            signer.verify_directly_issued_by(issuer)
        except (ValueError, TypeError, InvalidSignature):
            raise OcspError("the responder certificate was not issued by the "
                            "certificate's issuer") from None
        try:
            eku = signer.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        except x509.ExtensionNotFound:
            eku = ()
        if ExtendedKeyUsageOID.OCSP_SIGNING not in eku:
            raise OcspError("the responder certificate is not authorised for OCSP signing")
        if not signer.not_valid_before_utc <= now <= signer.not_valid_after_utc:
            raise OcspError("the responder certificate is not valid now")
    try:
        _check_signature(signer.public_key(), resp.signature, resp.tbs_response_bytes,
                         resp.signature_hash_algorithm)
    except InvalidSignature:
        raise OcspError("the response signature does not verify") from None


def _check_signature(key, signature: bytes, data: bytes, algorithm) -> None:
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, padding, rsa
    if isinstance(key, rsa.RSAPublicKey):
        key.verify(signature, data, padding.PKCS1v15(), algorithm)
    elif isinstance(key, ec.EllipticCurvePublicKey):
        key.verify(signature, data, ec.ECDSA(algorithm))
    elif isinstance(key, (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)):
        key.verify(signature, data)
    else:
        raise InvalidSignature(f"unsupported responder key type {type(key).__name__}")


def _spki_bits(cert) -> bytes:
    """The subjectPublicKey BIT STRING contents (what issuerKeyHash hashes, RFC 6960)."""
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
    pub = cert.public_key()
    try:
        return pub.public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)
    except (ValueError, TypeError):
        return pub.public_bytes(Encoding.DER, PublicFormat.PKCS1)


def fetch_response(cert_pem: str, issuer_pem: str = "", timeout: float = 10.0) -> bytes:
    """Ask the leaf's responder (blocking: run it in a thread). Raises OcspError."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509 import ocsp
    url = responder_url(cert_pem)
    if not url:
        raise OcspError("the certificate names no OCSP responder")
    chain = _chain(cert_pem)
    issuer = x509.load_pem_x509_certificate(issuer_pem.encode()) if issuer_pem else \
        (chain[1] if len(chain) > 1 else None)
    if issuer is None:
        raise OcspError("the chain has no issuer certificate to ask about")
    req = ocsp.OCSPRequestBuilder().add_certificate(chain[0], issuer, hashes.SHA1()).build()
    http = urllib.request.Request(url, data=req.public_bytes(serialization.Encoding.DER),
                                  headers={"Content-Type": "application/ocsp-request"})
    try:
        with urllib.request.urlopen(http, timeout=timeout) as r:  # noqa: S310 - AIA URL
            return r.read(1 << 20)
    except OSError as exc:
        raise OcspError(f"responder {url}: {exc}") from None


# ---------------------------------------------------------------- worker: stapling

_STATUS_CB = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)
# SSL_CTX* -> (weak reference to its SSLContext, DER response). The weak reference drops
# the entry when the context is freed, so a later context that OpenSSL allocates at the
# same address never staples a response that belongs to another certificate.
_responses: dict[int, tuple] = {}
_lib = None
_callback = None


def _setup(o) -> bool:
    global _lib, _callback
    if _lib is not None:
        return True
    if o.lib is None:
        return False
    lib = o.lib
    lib.SSL_CTX_callback_ctrl.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p]
    lib.SSL_CTX_callback_ctrl.restype = ctypes.c_long
    lib.SSL_ctrl.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_void_p]
    lib.SSL_ctrl.restype = ctypes.c_long
    o.crypto.CRYPTO_malloc.argtypes = [ctypes.c_size_t, ctypes.c_char_p, ctypes.c_int]
    o.crypto.CRYPTO_malloc.restype = ctypes.c_void_p

    def status_cb(ssl_ptr, _arg):
        try:
            entry = _responses.get(lib.SSL_get_SSL_CTX(ssl_ptr))
            der = entry[1] if entry is not None and entry[0]() is not None else None
            if not der:
                return _SSL_TLSEXT_ERR_NOACK
            buf = o.crypto.CRYPTO_malloc(len(der), b"dispa-ocsp", 0)
            if not buf:
                return _SSL_TLSEXT_ERR_NOACK
            ctypes.memmove(buf, der, len(der))
            lib.SSL_ctrl(ssl_ptr, _SSL_CTRL_SET_TLSEXT_STATUS_REQ_OCSP_RESP, len(der), buf)
            return _SSL_TLSEXT_ERR_OK
        except Exception:  # noqa: BLE001 - never raise into OpenSSL
            return _SSL_TLSEXT_ERR_NOACK

    _callback = _STATUS_CB(status_cb)  # kept alive for the life of the process
    _lib = lib
    return True


def install(ctx, der: bytes | None) -> bool:
    """Staple ``der`` on connections that end on ``ctx``; True when the callback is set."""
    from dispa.tls.context import openssl
    o = openssl()
    ptr = o.checked_ptr(ctx)
    if not ptr or not _setup(o):
        return False
    if der:
        def dropped(ref, ptr=ptr):
            if _responses.get(ptr, (None,))[0] is ref:
                del _responses[ptr]
        _responses[ptr] = (weakref.ref(ctx, dropped), bytes(der))
    else:
        _responses.pop(ptr, None)
    return _lib.SSL_CTX_callback_ctrl(ptr, _SSL_CTRL_SET_TLSEXT_STATUS_REQ_CB,
                                      ctypes.cast(_callback, ctypes.c_void_p)) == 1


def forget(ctx) -> None:
    """Drop the response of a context that is being replaced."""
    from dispa.tls.context import openssl
    _responses.pop(openssl().ctx_ptr(ctx), None)
