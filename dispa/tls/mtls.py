"""What a TLS connection tells the request path: scheme, SNI, client certificate.

``session_info`` runs once per connection, after the handshake. The client certificate
(already verified by OpenSSL against the CA bundle and CRL of its name or listener) is
described once per distinct certificate (a small cache keyed by its SHA-256) as:

- ``fields`` for filters: ``req.ctx["tls"]`` = {"version", "cipher", "alpn", "sni",
  "client_cert": {"subject", "issuer", "sans", "fingerprint_sha256", "serial",
  "not_after"} or None};
- ``headers`` for the upstream: ``(client_cert_header, 'Hash=<sha256>;Subject="...";
  DNS=...;URI=...')`` (the Envoy x-forwarded-client-cert layout).
"""

from __future__ import annotations

import hashlib

_CACHE_LIMIT = 1024
_cache: dict[bytes, tuple[dict, bytes]] = {}


class TlsInfo:
    """The ``tls`` field of a Session (None on plain connections)."""

    __slots__ = ("fields", "headers")

    def __init__(self, fields: dict, headers: list):
        self.fields = fields
        self.headers = headers


def describe_certificate(der: bytes) -> tuple[dict, bytes]:
    """(fields, forward header value) of a DER certificate; cached."""
    digest = hashlib.sha256(der).digest()
    hit = _cache.get(digest)
    if hit is not None:
        return hit
    from cryptography import x509  # only once a client certificate shows up
    cert = x509.load_der_x509_certificate(der)
    sans: list[str] = []
    dns: list[str] = []
    uris: list[str] = []
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns = [str(v) for v in ext.get_values_for_type(x509.DNSName)]
        uris = [str(v) for v in ext.get_values_for_type(x509.UniformResourceIdentifier)]
        sans = [f"DNS:{d}" for d in dns] + [f"URI:{u}" for u in uris] + [
            f"IP:{ip}" for ip in ext.get_values_for_type(x509.IPAddress)] + [
            f"email:{e}" for e in ext.get_values_for_type(x509.RFC822Name)]
    except x509.ExtensionNotFound:
        pass
    subject = cert.subject.rfc4514_string()
    fields = {
        "subject": subject,
        "issuer": cert.issuer.rfc4514_string(),
        "sans": sans,
        "fingerprint_sha256": digest.hex(),
        "serial": format(cert.serial_number, "x"),
        "not_after": cert.not_valid_after_utc.timestamp(),
    }
    value = f'Hash={digest.hex()};Subject="{_quote(subject)}"'
    value += "".join(f";URI={_clean(u)}" for u in uris)
    value += "".join(f";DNS={_clean(d)}" for d in dns)
    hit = (fields, value.encode("latin-1", "replace"))
    if len(_cache) >= _CACHE_LIMIT:
        _cache.clear()
    _cache[digest] = hit
    return hit


def _quote(text: str) -> str:
    return _clean(text).replace("\\", "\\\\").replace('"', '\\"')


def _clean(text: str) -> str:
    # header values: no control characters, no separators that would split the field
    return "".join(c if 32 <= ord(c) < 127 and c not in ",;" else "_" for c in text)


def session_info(ssl_object, tls_server) -> TlsInfo:
    """The Session's ``tls`` field for a connection whose handshake just finished."""
    cipher = ssl_object.cipher()
    fields = {
        "version": ssl_object.version(),
        "cipher": cipher[0] if cipher else "",
        "alpn": ssl_object.selected_alpn_protocol() or "",
        "sni": getattr(ssl_object, "dispa_sni", "") or "",
        "client_cert": None,
    }
    headers = []
    der = ssl_object.getpeercert(binary_form=True)
    if der:
        cert_fields, value = describe_certificate(der)
        fields["client_cert"] = cert_fields
        name = tls_server.client_cert_header
        if name:
            headers.append((name, value))
    return TlsInfo(fields, headers)
