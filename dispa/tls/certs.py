"""Certificate pairs: load and validate a PEM chain with its key (master side).

A pair is accepted only when the files are readable, the chain parses, the key is the
private half of the leaf's public key, and the leaf is valid now. What comes back is plain
data (PEM text, names, expiry) that crosses to the workers inside ``Snapshot.tls``.
"""

from __future__ import annotations

import datetime
import hashlib
import os

# cryptography is imported by the functions that need it: a configuration without TLS
# never loads it (master or worker).


class CertError(ValueError):
    """A certificate pair that must not be served; the message says why."""


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise CertError(f"{what} {path!r} cannot be read: {exc.strerror or exc}") from None


def _spki(public_key) -> bytes:
    from cryptography.hazmat.primitives import serialization
    return public_key.public_bytes(serialization.Encoding.DER,
                                   serialization.PublicFormat.SubjectPublicKeyInfo)


def cert_names(cert) -> list[str]:
    """The DNS names of the subjectAltName, lowercased; the CN when there is no SAN."""
    from cryptography import x509
    from cryptography.x509.oid import NameOID
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = [n.lower().rstrip(".") for n in san.get_values_for_type(x509.DNSName)]
    except x509.ExtensionNotFound:
        names = [a.value.lower() for a in cert.subject.get_attributes_for_oid(
            NameOID.COMMON_NAME) if isinstance(a.value, str)]
    return list(dict.fromkeys(names))


def parse_pair(cert_pem: bytes, key_pem: bytes, *, where: str = "",
               now: datetime.datetime | None = None) -> dict:
    """Validate a chain and key given as PEM bytes; the pair as plain data."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    label = f"{where}: " if where else ""
    try:
        chain = x509.load_pem_x509_certificates(cert_pem)
    except ValueError as exc:
        raise CertError(f"{label}the certificate file holds no valid PEM certificate "
                        f"({exc})") from None
    if not chain:
        raise CertError(f"{label}the certificate file holds no certificate")
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as exc:
        raise CertError(f"{label}the key file holds no usable unencrypted PEM private key "
                        f"({str(exc).splitlines()[0] if str(exc) else exc})") from None
    leaf = chain[0]
    if _spki(key.public_key()) != _spki(leaf.public_key()):
        raise CertError(f"{label}the private key does not match the certificate")
    now = now or datetime.datetime.now(datetime.timezone.utc)
    not_after = leaf.not_valid_after_utc
    if not_after <= now:
        raise CertError(f"{label}the certificate expired at {not_after.isoformat()}")
    if leaf.not_valid_before_utc > now:
        raise CertError(f"{label}the certificate is not valid before "
                        f"{leaf.not_valid_before_utc.isoformat()}")
    pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain)
    return {
        "id": hashlib.sha256(pem).hexdigest()[:16],
        "names": cert_names(leaf),
        "subject": leaf.subject.rfc4514_string(),
        "not_after": not_after.timestamp(),
        "fingerprint": leaf.fingerprint(hashes.SHA256()).hex(),
        "cert_pem": pem.decode("ascii"),
        "key_pem": key_pem.decode("ascii"),
    }


def load_pair(cert_file: str, key_file: str) -> dict:
    """Read and validate a pair of files (see :func:`parse_pair`); raises CertError."""
    cert_pem = _read(cert_file, "certificate file")
    key_pem = _read(key_file, "key file")
    info = parse_pair(cert_pem, key_pem, where=cert_file)
    info["source"] = os.path.abspath(cert_file)
    return info


def file_state(*paths: str) -> tuple:
    """What changes when a file is replaced: (mtime_ns, size, inode) per path; None if gone."""
    out = []
    for p in paths:
        try:
            st = os.stat(p)
            out.append((st.st_mtime_ns, st.st_size, st.st_ino))
        except OSError:
            out.append(None)
    return tuple(out)
