"""TLS control-plane and worker pieces without a server: pair validation, the certificate
store (rotation, refusal, rollback, ticket keys), contexts and SNI, client-cert fields,
handshake failure labels, and the [tls] configuration checks."""

from __future__ import annotations

import asyncio
import os
import ssl
import time

import pytest

from dispa.config import load_config_text
from dispa.errors import ConfigError
from dispa.tls import context as tctx
from dispa.tls.certs import CertError, load_pair, parse_pair
from dispa.tls.config import TlsConfig
from dispa.tls.handshake import reason_of
from dispa.tls.mtls import describe_certificate
from dispa.tls.store import CertStore
from tests.support.pki import CA, cert_pem, key_pem, write_pair


@pytest.fixture(scope="module")
def ca():
    return CA()


def test_pair_validation(ca, tmp_path):
    cert, key = ca.issue("a.test", dns=["a.test", "*.b.test"])
    info = parse_pair(cert_pem(cert), key_pem(key))
    assert info["names"] == ["a.test", "*.b.test"] and info["not_after"] > time.time()
    other = ca.issue("x")[1]
    with pytest.raises(CertError, match="does not match"):
        parse_pair(cert_pem(cert), key_pem(other))
    old, old_key = ca.issue("old.test", dns=["old.test"], days=-1, not_before_days=-10)
    with pytest.raises(CertError, match="expired"):
        parse_pair(cert_pem(old), key_pem(old_key))
    with pytest.raises(CertError, match="no valid PEM"):
        parse_pair(b"garbage", key_pem(key))
    with pytest.raises(CertError, match="cannot be read"):
        load_pair(str(tmp_path / "missing.crt"), str(tmp_path / "missing.key"))


def _store(tmp_path, **kw):
    cfg = TlsConfig(enabled=True, certificate_dirs=[str(tmp_path)], **kw)
    from dispa.tls.config import compile_tls
    store = CertStore()
    store.configure(cfg, compile_tls(cfg, []))
    return store


def test_store_rotation_refusal_and_rollback(ca, tmp_path):
    crt, key = write_pair(tmp_path, "site", *ca.issue("v1", dns=["site.test"]))
    store = _store(tmp_path)
    assert store.refresh(force=True)
    v1 = store.certificates()[0]["id"]
    assert not store.refresh()  # nothing changed
    # a mismatched key is refused; v1 stays
    with open(key, "wb") as f:
        f.write(key_pem(ca.issue("other")[1]))
    os.utime(key, ns=(time.time_ns() + 10**9,) * 2)
    assert not store.refresh()
    assert store.certificates()[0]["id"] == v1
    assert "does not match" in store.errors()[0]["error"]
    # a good replacement is taken and v1 is kept as previous
    cert2, key2 = ca.issue("v2", dns=["site.test"])
    with open(crt, "wb") as f:
        f.write(cert_pem(cert2))
    with open(key, "wb") as f:
        f.write(key_pem(key2))
    assert store.refresh()
    v2 = store.certificates()[0]["id"]
    assert v2 != v1 and store.errors() == []
    assert store.status()["certificates"][0]["previous_id"] == v1
    assert store.rollback(crt) and store.certificates()[0]["id"] == v1
    payload = store.payload()
    assert payload["certificates"][0]["cert_pem"].startswith("-----BEGIN CERTIFICATE")
    gauge = store.expiry_gauges()[0]
    assert gauge[0] == "dispa_tls_certificate_expiry_seconds" and gauge[3] > 80 * 86400


def test_ticket_keys_rotate(ca, tmp_path):
    write_pair(tmp_path, "site", *ca.issue("v1", dns=["site.test"]))
    now = [1000.0]
    store = _store(tmp_path, ticket_key_rotation=60)
    store.clock = lambda: now[0]
    assert store.rotate_ticket_keys()
    first = store.payload()["ticket_keys"]
    assert len(bytes.fromhex(first[0])) == 80
    assert not store.rotate_ticket_keys()
    now[0] += 61
    assert store.rotate_ticket_keys() and store.payload()["ticket_keys"] != first


def test_expiry_warning_is_logged(ca, tmp_path, caplog):
    write_pair(tmp_path, "soon", *ca.issue("soon", dns=["soon.test"], days=3))
    store = _store(tmp_path, expiry_warning_days=7)
    with caplog.at_level("WARNING", logger="dispa.tls"):
        store.refresh(force=True)
    assert "expires in" in caplog.text


def test_contexts_and_sni_table(ca, tmp_path):
    write_pair(tmp_path, "a", *ca.issue("a", dns=["a.test"]))
    write_pair(tmp_path, "w", *ca.issue("w", dns=["*.w.test"]))
    store = _store(tmp_path, default_certificate="a.test", curves=["X25519", "P-256"])
    store.refresh(force=True)
    store.rotate_ticket_keys()
    server = tctx.TlsServer()
    server.update(store.payload())
    assert server.ready and set(server.exact) == {"a.test"} and set(server.wild) == {".w.test"}
    assert server.ticket_keys_ok  # the ctypes path works on this OpenSSL
    base = server.base
    server.update(store.payload())  # unchanged: nothing rebuilt
    assert server.base is base
    store.rotate_ticket_keys(force=True)
    server.update(store.payload())  # only the ticket key changed: same contexts
    assert server.base is base and server.ticket_keys_ok


def test_groups_and_ciphers_are_checked():
    assert tctx.check_groups(["X25519", "P-256"]) is None
    assert "OpenSSL does not know" in tctx.check_groups(["nope"])


def test_client_certificate_fields(ca):
    cert, _ = ca.issue("alice", client=True, dns=["alice.example"])
    from cryptography.hazmat.primitives.serialization import Encoding
    fields, header = describe_certificate(cert.public_bytes(Encoding.DER))
    assert fields["subject"] == "CN=alice" and fields["sans"] == ["DNS:alice.example"]
    assert header.startswith(f"Hash={fields['fingerprint_sha256']};".encode())
    assert b'Subject="CN=alice"' in header


def test_handshake_failure_labels():
    err = ssl.SSLError(1, "x")
    err.reason = "HTTP_REQUEST"
    assert reason_of(err) == "http_on_tls_port"
    v = ssl.SSLCertVerificationError(1, "x")
    v.verify_code = 23
    assert reason_of(v) == "client_cert_revoked"
    assert reason_of(ConnectionAbortedError()) == "timeout"
    assert reason_of(asyncio.TimeoutError()) == "timeout"


def _issues(text: str) -> list[tuple[str, str]]:
    with pytest.raises(ConfigError) as e:
        load_config_text(text, fmt="toml")
    return [(i.path, i.message) for i in e.value.errors]


TARGET = '[[targets.targets]]\nname = "a"\nurl = "http://127.0.0.1:9"\n'


def test_config_errors_name_the_field(ca, tmp_path):
    crt, _ = write_pair(tmp_path, "a", *ca.issue("a", dns=["a.test"]))
    bad_key = tmp_path / "bad.key"
    bad_key.write_bytes(key_pem(ca.issue("b")[1]))
    issues = _issues(TARGET + f'''
[tls]
enabled = true
min_version = "1.3"
max_version = "1.2"
curves = ["nope"]
[[tls.certificates]]
cert_file = "{crt}"
key_file = "{bad_key}"
[tls.client_auth]
mode = "required"
''')
    paths = {p for p, _ in issues}
    assert {"tls.min_version", "tls.curves", "tls.certificates[0].cert_file",
            "tls.client_auth.ca_file"} <= paths
    assert any("does not match" in msg for _, msg in issues)
    assert [p for p, _ in _issues(TARGET + "[tls]\nenabled = true\n")] == ["tls.enabled"]


def test_https_targets_compile_to_upstream_tls():
    lc = load_config_text('[[targets.targets]]\nname = "a"\nurl = "https://api.example"\n',
                          fmt="toml")
    assert lc.snapshot.clusters[0].endpoints[0].port == 443
    assert lc.snapshot.tls["upstream"]["endpoints"] == ["api.example:443"]
    assert all(not l.tls for l in lc.static.listeners)
    plain = load_config_text(TARGET, fmt="toml")
    assert plain.snapshot.tls is None


def _ocsp_der(ca, cert, *, status="good", next_update_days=1.0):
    import datetime
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509 import ocsp
    now = datetime.datetime.now(datetime.timezone.utc)
    st = {"good": ocsp.OCSPCertStatus.GOOD, "revoked": ocsp.OCSPCertStatus.REVOKED}[status]
    b = ocsp.OCSPResponseBuilder().add_response(
        cert=cert, issuer=ca.cert, algorithm=hashes.SHA1(), cert_status=st,
        this_update=now - datetime.timedelta(hours=1),
        next_update=now + datetime.timedelta(days=next_update_days),
        revocation_time=now if status == "revoked" else None, revocation_reason=None,
    ).responder_id(ocsp.OCSPResponderEncoding.HASH, ca.cert)
    return b.sign(ca.key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


def test_ocsp_responses_are_checked_before_stapling(ca, tmp_path):
    from dispa.tls.ocsp import OcspError, check_response
    cert, key = ca.issue("o.test", dns=["o.test"])
    chain = (cert_pem(cert) + ca.pem).decode()
    assert check_response(_ocsp_der(ca, cert), chain) > time.time()
    with pytest.raises(OcspError, match="REVOKED"):
        check_response(_ocsp_der(ca, cert, status="revoked"), chain)
    with pytest.raises(OcspError, match="expired"):
        check_response(_ocsp_der(ca, cert, next_update_days=-0.01), chain)
    other = ca.issue("p.test")[0]
    with pytest.raises(OcspError, match="another certificate"):
        check_response(_ocsp_der(ca, other), chain)
    with pytest.raises(OcspError, match="another issuer"):
        check_response(_ocsp_der(ca, cert), (cert_pem(cert) + CA("x").pem).decode())
    # a <cert>.ocsp file next to the certificate is picked up by the store
    crt, _ = write_pair(tmp_path, "o", cert, key, chain=[ca.cert])
    with open(crt + ".ocsp", "wb") as f:
        f.write(_ocsp_der(ca, cert))
    store = _store(tmp_path)
    store.refresh(force=True)
    assert store.payload()["certificates"][0]["ocsp"]
    assert store.status()["certificates"][0]["ocsp_stapled"]
