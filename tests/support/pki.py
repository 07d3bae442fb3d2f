"""A throwaway PKI for TLS tests: a CA, server and client certificates, CRLs.

Everything is generated with the ``cryptography`` package (EC P-256 keys: fast) and
written as PEM files under a directory the test owns.
"""

from __future__ import annotations

import datetime
import ipaddress
import pathlib

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import AuthorityInformationAccessOID, ExtendedKeyUsageOID, NameOID

_NOW = datetime.datetime.now(datetime.timezone.utc)


def _key():
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def cert_pem(cert) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


class CA:
    """A certificate authority that issues server and client certificates."""

    def __init__(self, name: str = "Dispa Test CA"):
        self.key = _key()
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        self.cert = (
            x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(_NOW - datetime.timedelta(days=1))
            .not_valid_after(_NOW + datetime.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()),
                           critical=False)
            .sign(self.key, hashes.SHA256()))
        self.revoked: list[int] = []

    @property
    def pem(self) -> bytes:
        return cert_pem(self.cert)

    def issue(self, common_name: str, *, dns: list[str] = (), ips: list[str] = (),
              client: bool = False, days: float = 90, not_before_days: float = -1,
              ocsp_url: str = ""):
        """(cert, key) for a server (default) or client certificate."""
        key = _key()
        sans = [x509.DNSName(d) for d in dns] + [x509.IPAddress(ipaddress.ip_address(i))
                                                  for i in ips]
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self.cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(_NOW + datetime.timedelta(days=not_before_days))
            .not_valid_after(_NOW + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH]),
                critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                self.key.public_key()), critical=False))
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        if ocsp_url:
            builder = builder.add_extension(x509.AuthorityInformationAccess([
                x509.AccessDescription(AuthorityInformationAccessOID.OCSP,
                                       x509.UniformResourceIdentifier(ocsp_url))]),
                critical=False)
        return builder.sign(self.key, hashes.SHA256()), key

    def crl(self, revoked=()) -> bytes:
        """A CRL (PEM) listing ``revoked`` certificates."""
        builder = (x509.CertificateRevocationListBuilder().issuer_name(self.cert.subject)
                   .last_update(_NOW - datetime.timedelta(hours=1))
                   .next_update(_NOW + datetime.timedelta(days=30)))
        for cert in revoked:
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(cert.serial_number)
                .revocation_date(_NOW - datetime.timedelta(minutes=5)).build())
        return builder.sign(self.key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def write_pair(directory: pathlib.Path, stem: str, cert, key, chain=()) -> tuple[str, str]:
    """Write ``stem.crt`` (the leaf, then ``chain``) and ``stem.key``; returns their paths."""
    directory.mkdir(parents=True, exist_ok=True)
    crt = directory / f"{stem}.crt"
    k = directory / f"{stem}.key"
    crt.write_bytes(cert_pem(cert) + b"".join(cert_pem(c) for c in chain))
    k.write_bytes(key_pem(key))
    k.chmod(0o600)  # as an operator should keep a key (the store warns about 0644)
    return str(crt), str(k)


def fingerprint(cert) -> str:
    return cert.fingerprint(hashes.SHA256()).hex()


def ocsp_index(certs) -> str:
    """An ``openssl ocsp`` responder index listing ``certs`` as valid."""
    lines = []
    for c in certs:
        serial = format(c.serial_number, "X")
        serial = ("0" + serial) if len(serial) % 2 else serial
        expiry = c.not_valid_after_utc.strftime("%y%m%d%H%M%SZ")
        lines.append(f"V\t{expiry}\t\t{serial}\tunknown\t/CN=x\n")
    return "".join(lines)
