"""Pending challenges: what the data plane must answer, and the snapshot that carries it.

Theory of operation
-------------------
The manager registers a challenge (:meth:`PendingChallenges.add_http01`,
:meth:`add_tls_alpn01`) before telling the CA to validate it, and removes it once the
authorisation is decided. Each change calls the ``publish`` callback with
:meth:`PendingChallenges.as_snapshot_field` (the ``Snapshot.acme_challenges`` value:
``{"http01": {token: key_authorization}, "tls_alpn01": {server_name: [cert_pem,
key_pem]}}``, or None when nothing is pending). The master answers by publishing
:func:`with_challenges` of its current snapshot and waits for every worker's ACK, so when
``publish`` returns, every worker answers the challenge.

TLS-ALPN-01 (RFC 8737): the validation certificate is self-signed for the one name, with
the critical ``id-pe-acmeIdentifier`` extension (1.3.6.1.5.5.7.1.31) holding the DER
OCTET STRING of SHA-256(key authorization); the TLS listener serves it to a ClientHello
with that SNI offering only the ``acme-tls/1`` ALPN protocol.
"""

from __future__ import annotations

import datetime
import hashlib
from typing import Awaitable, Callable

import msgspec
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from dispa.config.snapshot import PluginSpec, Snapshot, make_snapshot
from dispa.tls.acme.http01 import FILTER_NAME as HTTP01_FILTER_NAME
from dispa.tls.acme.http01 import TYPE as HTTP01_TYPE

ACME_IDENTIFIER_OID = x509.ObjectIdentifier("1.3.6.1.5.5.7.1.31")
ALPN_PROTOCOL = "acme-tls/1"


def tls_alpn01_certificate(domain: str, key_authorization: str) -> tuple[str, str]:
    """``(cert_pem, key_pem)`` of the RFC 8737 §3 validation certificate for ``domain``."""
    key = ec.generate_private_key(ec.SECP256R1())
    digest = hashlib.sha256(key_authorization.encode("ascii")).digest()
    now = datetime.datetime.now(datetime.timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, domain)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=7))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(domain)]), critical=False)
        # DER: OCTET STRING (0x04), length 32, the digest (RFC 8737 §3)
        .add_extension(x509.UnrecognizedExtension(ACME_IDENTIFIER_OID, b"\x04\x20" + digest),
                       critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM).decode("ascii")
    key_pem = key.private_bytes(serialization.Encoding.PEM,
                                serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()).decode("ascii")
    return cert_pem, key_pem


class PendingChallenges:
    """The challenges the data plane must answer now (see the module docstring)."""

    def __init__(self, publish: Callable[[dict | None], Awaitable[None]]):
        self._publish = publish
        self.http01: dict[str, str] = {}
        self.tls_alpn01: dict[str, tuple[str, str]] = {}

    def as_snapshot_field(self) -> dict | None:
        if not self.http01 and not self.tls_alpn01:
            return None
        return {"http01": dict(self.http01),
                "tls_alpn01": {n: list(v) for n, v in self.tls_alpn01.items()}}

    async def add_http01(self, token: str, key_authorization: str) -> None:
        self.http01[token] = key_authorization
        await self._publish(self.as_snapshot_field())

    async def add_tls_alpn01(self, domain: str, key_authorization: str) -> None:
        self.tls_alpn01[domain] = tls_alpn01_certificate(domain, key_authorization)
        await self._publish(self.as_snapshot_field())

    async def remove(self, *, tokens=(), domains=()) -> None:
        changed = False
        for t in tokens:
            changed |= self.http01.pop(t, None) is not None
        for d in domains:
            changed |= self.tls_alpn01.pop(d, None) is not None
        if changed:
            await self._publish(self.as_snapshot_field())


def with_challenges(snapshot: Snapshot, challenges: dict | None) -> Snapshot:
    """``snapshot`` (as compiled from the configuration, without challenges) plus
    ``challenges``: ``acme_challenges`` set and, while HTTP-01 tokens are pending, the
    responder filter first in the global chain (the pipeline runs it before domain
    interception, see ``http01``). With ``challenges`` None it is ``snapshot`` itself
    (same version): nothing on the request path."""
    if not challenges:
        return snapshot
    pipeline = snapshot.pipeline
    http01 = challenges.get("http01") or {}
    if http01:
        responder = PluginSpec(name=HTTP01_FILTER_NAME, type=HTTP01_TYPE, stage="request",
                               error_strategy="continue", is_global=True,
                               config={"tokens": dict(http01)})
        # apply_before_domain_match stays as configured: the pipeline recognises the
        # responder by its name and runs it (only it) before interception
        pipeline = msgspec.structs.replace(pipeline, plugins=(responder, *pipeline.plugins))
    return replace_fields(snapshot, pipeline=pipeline, acme_challenges=challenges)


def replace_fields(snapshot: Snapshot, **changes) -> Snapshot:
    """``snapshot`` with ``changes`` and its content version recomputed."""
    fields = {f: getattr(snapshot, f) for f in snapshot.__struct_fields__ if f != "version"}
    fields.update(changes)
    return make_snapshot(**fields)
