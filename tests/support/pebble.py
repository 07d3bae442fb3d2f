"""The real ``pebble`` ACME test CA (Debian's ``pebble`` package) on loopback ports.

Debian's package ships no test certificates, so ``Pebble`` makes its own: a throwaway CA
and a certificate for 127.0.0.1/localhost for pebble's HTTPS listener; ``ca_bundle`` is
the CA file an ACME client must trust. Pebble validates challenges on ``http_port``
(HTTP-01) and ``tls_port`` (TLS-ALPN-01) of the address its resolver gives for the name
(``dns_port``: a :class:`tests.support.bind9.Bind9` on 127.0.0.1), and runs with
``PEBBLE_VA_NOSLEEP=1`` (no random delay before validating), ``PEBBLE_WFE_NONCEREJECT=0``
(no spurious badNonce) and ``PEBBLE_AUTHZREUSE=0`` (every order validates afresh, so a
renewal really exercises the challenge).
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import shutil
import ssl
import urllib.request
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.support.dispa_proc import free_port
from tests.support.process import ServerProcess

PEBBLE = shutil.which("pebble") or "/usr/bin/pebble"


def _write_tls_files(directory: Path) -> tuple[Path, Path, Path]:
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pebble test listener CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(hours=1))
          .not_valid_after(now + datetime.timedelta(days=2))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    ca_path, cert_path, key_path = (directory / "ca.pem", directory / "cert.pem",
                                    directory / "key.pem")
    ca_path.write_bytes(ca.public_bytes(pem))
    cert_path.write_bytes(cert.public_bytes(pem))
    key_path.write_bytes(key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return ca_path, cert_path, key_path


class Pebble(ServerProcess):
    """A running pebble; ``directory_url`` for clients, ``roots()`` for verification."""

    NAME = "pebble"
    LOG_TAIL = 6000

    def __init__(self, directory: Path, *, dns_port: int, http_port: int = 0,
                 tls_port: int = 0, eab_keys: dict[str, str] | None = None):
        """``eab_keys``: External Account Binding key id -> base64url HMAC key; when
        given, pebble refuses accounts without a binding to one of them."""
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.ca_bundle, cert, key = _write_tls_files(self.dir)
        self.port = free_port()
        self.mgmt_port = free_port()
        self.http_port = http_port or free_port()
        self.tls_port = tls_port or free_port()
        config = {"pebble": {
            "listenAddress": f"127.0.0.1:{self.port}",
            "managementListenAddress": f"127.0.0.1:{self.mgmt_port}",
            "certificate": str(cert), "privateKey": str(key),
            "httpPort": self.http_port, "tlsPort": self.tls_port,
            "ocspResponderURL": "", "externalAccountBindingRequired": bool(eab_keys),
        }}
        if eab_keys:
            config["pebble"]["externalAccountMACKeys"] = dict(eab_keys)
        conf = self.dir / "pebble-config.json"
        conf.write_text(json.dumps(config))
        env = dict(os.environ, PEBBLE_VA_NOSLEEP="1", PEBBLE_WFE_NONCEREJECT="0",
                   PEBBLE_AUTHZREUSE="0")
        self._spawn([PEBBLE, "-config", str(conf), "-dnsserver", f"127.0.0.1:{dns_port}",
                     "-strict=false"], self.dir / "pebble.log", env=env, cwd=self.dir)
        self.directory_url = f"https://127.0.0.1:{self.port}/dir"
        self._wait_ready(self._answers)

    def _ctx(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_bundle))

    def _answers(self) -> bool:
        with urllib.request.urlopen(self.directory_url, context=self._ctx(), timeout=1.0) as r:
            return r.status == 200

    def roots(self) -> bytes:
        """The PEM root of the chains pebble issues (regenerated at each start)."""
        with urllib.request.urlopen(f"https://127.0.0.1:{self.mgmt_port}/roots/0",
                                    context=self._ctx(), timeout=5.0) as r:
            return r.read()

    def intermediates(self) -> bytes:
        with urllib.request.urlopen(f"https://127.0.0.1:{self.mgmt_port}/intermediates/0",
                                    context=self._ctx(), timeout=5.0) as r:
            return r.read()

    def cert_status(self, serial: int) -> dict:
        """Pebble's view of an issued certificate (management API): ``Status`` is
        ``Valid`` or ``Revoked`` (with ``Reason``)."""
        with urllib.request.urlopen(
                f"https://127.0.0.1:{self.mgmt_port}/cert-status-by-serial/{serial:x}",
                context=self._ctx(), timeout=5.0) as r:
            return json.loads(r.read())
