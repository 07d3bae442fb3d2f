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
    assert store.rollback(crt)["id"] == v1 and store.certificates()[0]["id"] == v1
    # the rollback holds through a forced re-read (SIGHUP, config reload) ...
    assert not store.refresh(force=True) and store.certificates()[0]["id"] == v1
    assert store.status()["certificates"][0]["rolled_back"]
    with pytest.raises(LookupError):
        store.rollback(str(tmp_path / "nope.crt"))
    payload = store.payload()
    assert payload["certificates"][0]["cert_pem"].startswith("-----BEGIN CERTIFICATE")
    # ... until the files change: then the new files serve again
    cert3, key3 = ca.issue("v3", dns=["site.test"])
    with open(key, "wb") as f:
        f.write(key_pem(key3))
    with open(crt, "wb") as f:
        f.write(cert_pem(cert3))
    os.utime(crt, ns=(time.time_ns() + 2 * 10**9,) * 2)
    assert store.refresh() and store.certificates()[0]["id"] not in (v1, v2)
    assert not store.status()["certificates"][0]["rolled_back"]
    v3 = store.certificates()[0]["id"]
    assert store.rollback(crt)["id"] == v1  # what served before v3
    assert store.rollback(crt)["id"] == v3  # a second rollback undoes the first
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
    assert server.ticket_mode == "callback" and len(server.ticket_keys) == 2
    # the callback never fails a handshake: with no key it just issues no ticket
    from dispa.tls import tickets
    tickets.set_keys([])
    try:
        client = ssl.create_default_context(cadata=ca.pem.decode())
        client.maximum_version = ssl.TLSVersion.TLSv1_2
        assert _handshake(server.base, client, "a.test").version() == "TLSv1.2"
    finally:
        tickets.set_keys(server.ticket_keys)


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


def _ocsp_der(ca, cert, *, status="good", next_update_days=1.0, signer=None,
              signer_key=None, include=(), by_name=False):
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
    ).responder_id(ocsp.OCSPResponderEncoding.NAME if by_name
                   else ocsp.OCSPResponderEncoding.HASH, signer or ca.cert)
    if include:
        b = b.certificates(list(include))
    return b.sign(signer_key or ca.key, hashes.SHA256()).public_bytes(
        serialization.Encoding.DER)


def _responder(ca, *, ocsp_signing=True):
    """A delegated OCSP responder certificate issued by ``ca`` (RFC 6960 4.2.2.2)."""
    import datetime
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    eku = ExtendedKeyUsageOID.OCSP_SIGNING if ocsp_signing else ExtendedKeyUsageOID.SERVER_AUTH
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "responder")]))
            .issuer_name(ca.cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
            .sign(ca.key, hashes.SHA256()))
    return cert, key


def test_ocsp_signature_is_verified(ca):
    """A response whose signature does not check out is never stapled: forged by another
    key, signed by a responder the issuer did not delegate to, or unverifiable."""
    from dispa.tls.ocsp import OcspError, check_response
    cert, _ = ca.issue("s.test", dns=["s.test"])
    chain = (cert_pem(cert) + ca.pem).decode()
    # names the issuer as responder (by name), but signed with another key
    impostor = CA("Dispa Test CA")
    forged = _ocsp_der(ca, cert, signer=impostor.cert, signer_key=impostor.key, by_name=True)
    with pytest.raises(OcspError, match="signature does not verify"):
        check_response(forged, chain)
    # one flipped byte in the signature
    good = bytearray(_ocsp_der(ca, cert))
    good[-3] ^= 0x01
    with pytest.raises(OcspError):
        check_response(bytes(good), chain)
    # a delegated responder with id-kp-OCSPSigning, included in the response: accepted
    rcert, rkey = _responder(ca)
    assert check_response(_ocsp_der(ca, cert, signer=rcert, signer_key=rkey,
                                     include=[rcert]), chain) > time.time()
    # delegated, but not included / not authorised / not issued by the issuer
    with pytest.raises(OcspError, match="neither the issuer"):
        check_response(_ocsp_der(ca, cert, signer=rcert, signer_key=rkey), chain)
    bad_cert, bad_key = _responder(ca, ocsp_signing=False)
    with pytest.raises(OcspError, match="not authorised"):
        check_response(_ocsp_der(ca, cert, signer=bad_cert, signer_key=bad_key,
                                 include=[bad_cert]), chain)
    stranger_cert, stranger_key = _responder(CA("elsewhere"))
    with pytest.raises(OcspError, match="not issued by"):
        check_response(_ocsp_der(ca, cert, signer=stranger_cert, signer_key=stranger_key,
                                 include=[stranger_cert]), chain)
    # a chain without the issuer: nothing to verify against, refused
    with pytest.raises(OcspError, match="no issuer"):
        check_response(_ocsp_der(ca, cert), cert_pem(cert).decode())


def test_forged_ocsp_file_is_not_stapled(ca, tmp_path, caplog):
    cert, key = ca.issue("f.test", dns=["f.test"])
    crt, _ = write_pair(tmp_path, "f", cert, key, chain=[ca.cert])
    with open(crt + ".ocsp", "wb") as f:
        impostor = CA("Dispa Test CA")
        f.write(_ocsp_der(ca, cert, signer=impostor.cert, signer_key=impostor.key,
                          by_name=True))
    store = _store(tmp_path)
    with caplog.at_level("WARNING", logger="dispa.tls"):
        store.refresh(force=True)
    assert not store.payload()["certificates"][0].get("ocsp")
    assert not store.status()["certificates"][0]["ocsp_stapled"]
    assert "signature does not verify" in caplog.text


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
    # once the file's response passes next_update, it is no longer stapled
    real = store.clock
    store.clock = lambda: real() + 2 * 86400
    assert store.refresh() and not store.payload()["certificates"][0]["ocsp"]
    assert not store.status()["certificates"][0]["ocsp_stapled"]


def _handshake(server_ctx, client_ctx, sni):
    """Run a handshake in memory; the server side's SSLObject."""
    si, so, ci, co = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    s = server_ctx.wrap_bio(si, so, server_side=True)
    c = client_ctx.wrap_bio(ci, co, server_hostname=sni)
    for _ in range(10):
        for side, out, peer in ((c, co, si), (s, so, ci)):
            try:
                side.do_handshake()
            except ssl.SSLWantReadError:
                pass
            data = out.read()
            if data:
                peer.write(data)
    return s


def test_per_name_ciphers(ca, tmp_path):
    """[[tls.sni]] ciphers apply to TLS 1.2 connections for those names: the cipher list
    is the one of the context the SNI callback moves the connection to."""
    from dispa.tls.config import SniConfig
    write_pair(tmp_path, "a", *ca.issue("a", dns=["a.test", "c.test"]))
    store = _store(tmp_path, ciphers="ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-ECDSA-CHACHA20-POLY1305",
                   sni=[SniConfig(names=["c.test"], ciphers="ECDHE-ECDSA-CHACHA20-POLY1305")])
    store.refresh(force=True)
    server = tctx.TlsServer()
    server.update(store.payload())
    client = ssl.create_default_context(cadata=ca.pem.decode())
    client.maximum_version = ssl.TLSVersion.TLSv1_2
    client.set_ciphers("ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-ECDSA-CHACHA20-POLY1305")
    assert _handshake(server.base, client, "a.test").cipher()[0] == \
        "ECDHE-ECDSA-AES128-GCM-SHA256"
    assert _handshake(server.base, client, "c.test").cipher()[0] == \
        "ECDHE-ECDSA-CHACHA20-POLY1305"
    # a client that offers none of this name's ciphers fails; other names still work
    only_aes = ssl.create_default_context(cadata=ca.pem.decode())
    only_aes.maximum_version = ssl.TLSVersion.TLSv1_2
    only_aes.set_ciphers("ECDHE-ECDSA-AES128-GCM-SHA256")
    with pytest.raises(ssl.SSLError):
        _handshake(server.base, only_aes, "c.test")
    assert _handshake(server.base, only_aes, "a.test").cipher()


def test_sni_ciphers_are_checked(ca, tmp_path):
    crt, key = write_pair(tmp_path, "a", *ca.issue("a", dns=["a.test"]))
    issues = _issues(TARGET + f'''
[tls]
enabled = true
[[tls.certificates]]
cert_file = "{crt}"
key_file = "{key}"
[[tls.sni]]
names = ["a.test"]
ciphers = "NOPE-NOTHING"
''')
    assert [p for p, _ in issues] == ["tls.sni[0].ciphers"]


def test_world_readable_key_is_warned_about_and_keys_stay_out_of_logs(ca, tmp_path, caplog):
    crt, key = write_pair(tmp_path, "k", *ca.issue("k", dns=["k.test"]))
    os.chmod(key, 0o644)
    store = _store(tmp_path)
    with caplog.at_level("DEBUG", logger="dispa"):
        store.refresh(force=True)
        store.rotate_ticket_keys()
        server = tctx.TlsServer()
        server.update(store.payload())
    assert "readable by every user" in caplog.text
    secret = store.certificates()[0]["key_pem"]
    body = "".join(secret.splitlines()[1:-1])
    # neither the key nor the ticket keys show in logs or in /admin/status
    import json
    shown = caplog.text + json.dumps(store.status()) + json.dumps(store.errors())
    assert body[:40] not in shown and "PRIVATE KEY" not in shown
    assert store.ticket_keys[0].hex() not in shown


def test_cluster_tls_tables(ca, tmp_path):
    """[target_groups.tls] applies to that group's https endpoints only; an endpoint in two
    clusters with different TLS settings is refused (it has one pool); a client pair
    whose key does not match is refused at load."""
    from dispa.tls.upstream import upstream_tls
    lc = load_config_text(TARGET + '''
[[target_groups]]
name = "g"
[[target_groups.targets]]
name = "b"
url = "https://b.example:8443"
[target_groups.tls]
verify = false
server_name = "b.internal"
[[target_groups]]
name = "h"
[[target_groups.targets]]
name = "c"
url = "https://c.example"
''', fmt="toml")
    tls = lc.snapshot.tls
    b = upstream_tls(tls, "b.example:8443", "b.example")
    c = upstream_tls(tls, "c.example:443", "c.example")
    assert b.server_name == "b.internal" and b.context.verify_mode == ssl.CERT_NONE
    assert c.server_name == "c.example" and c.context.verify_mode == ssl.CERT_REQUIRED
    assert upstream_tls(tls, "127.0.0.1:9", "127.0.0.1") is None  # http://
    crt, _ = write_pair(tmp_path, "cl", *ca.issue("cl", client=True))
    other = tmp_path / "other.key"
    other.write_bytes(key_pem(ca.issue("x")[1]))
    issues = _issues(TARGET + f'''
[[target_groups]]
name = "g"
[[target_groups.targets]]
name = "b"
url = "https://b.example"
[target_groups.tls]
server_name = "b.internal"
cert_file = "{crt}"
key_file = "{other}"
[[target_groups]]
name = "h"
[[target_groups.targets]]
name = "b"
url = "https://b.example:443"
''')
    assert ("target_groups[0].tls.cert_file", ) == tuple(
        p for p, m in issues if "does not match" in m)
    assert any(p == "target_groups[1].tls" and "other TLS settings" in m for p, m in issues)
    # a CA bundle that is not PEM is refused at load, not by a worker later
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    issues = _issues(TARGET + f'[tls.upstream]\nca_file = "{garbage}"\n'
                     f'[tls.client_auth]\nmode = "optional"\nca_file = "{garbage}"\n')
    assert {p for p, m in issues if "no usable PEM" in m} == {"tls.upstream.ca_file",
                                                              "tls.client_auth.ca_file"}


def test_expired_crl_is_reported(ca, tmp_path, caplog):
    import datetime
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    now = datetime.datetime.now(datetime.timezone.utc)
    crl = (x509.CertificateRevocationListBuilder().issuer_name(ca.cert.subject)
           .last_update(now - datetime.timedelta(days=2))
           .next_update(now - datetime.timedelta(days=1))
           .sign(ca.key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))
    (tmp_path / "ca.pem").write_bytes(ca.pem)
    (tmp_path / "crl.pem").write_bytes(crl)
    certs = tmp_path / "certs"
    write_pair(certs, "a", *ca.issue("a", dns=["a.test"]))
    from dispa.tls.config import ClientAuthConfig, compile_tls
    cfg = TlsConfig(enabled=True, certificate_dirs=[str(certs)], client_auth=ClientAuthConfig(
        mode="optional", ca_file=str(tmp_path / "ca.pem"), crl_file=str(tmp_path / "crl.pem")))
    store = CertStore()
    store.configure(cfg, compile_tls(cfg, []))
    with caplog.at_level("ERROR", logger="dispa.tls"):
        store.refresh(force=True)
    assert "client_crl_expired" in caplog.text
    v = ssl.SSLCertVerificationError(1, "x")
    v.verify_code = 12
    assert reason_of(v) == "client_crl_expired"


def test_degrades_without_ctypes_access(ca, tmp_path, caplog, monkeypatch):
    """On an OpenSSL/CPython the ctypes code cannot use, contexts still build and serve:
    per-worker ticket keys and no staple (with warnings), and names whose client auth
    differs from the listener's are refused rather than served unverified."""
    from dispa.tls.config import ClientAuthConfig, SniConfig
    fake = tctx._OpenSSL.__new__(tctx._OpenSSL)
    fake.lib = fake.crypto = None
    fake.error = "simulated: libssl not usable through ctypes"
    fake.ssl_ok = False
    monkeypatch.setattr(tctx, "_openssl", fake)
    (tmp_path / "cca.pem").write_bytes(ca.pem)
    certs = tmp_path / "certs"
    cert, key = ca.issue("a", dns=["a.test", "m.test"])
    crt, _ = write_pair(certs, "a", cert, key, chain=[ca.cert])
    with open(crt + ".ocsp", "wb") as f:
        f.write(_ocsp_der(ca, cert))
    store = _store(certs, sni=[SniConfig(names=["m.test"], client_auth=ClientAuthConfig(
        mode="required", ca_file=str(tmp_path / "cca.pem")))])
    store.refresh(force=True)
    store.rotate_ticket_keys()
    server = tctx.TlsServer()
    with caplog.at_level("WARNING", logger="dispa.tls"):
        server.update(store.payload())
    assert server.ready and server.ticket_mode == ""
    assert "not shared between workers" in caplog.text and "simulated" in caplog.text
    assert "OCSP stapling unavailable" in caplog.text
    assert "per-name client_auth" in caplog.text
    client = ssl.create_default_context(cadata=ca.pem.decode())
    assert _handshake(server.base, client, "a.test").version()
    with pytest.raises(ssl.SSLError):
        _handshake(server.base, client, "m.test")
    assert tctx.check_groups(["X25519", "P-256"])  # a multi-group list needs ctypes
    assert tctx.check_groups(["X25519"]) is None  # one group: Python's own API


def test_listener_level_client_auth_checks_the_crl(ca, tmp_path):
    """[tls.client_auth] on the listener (no per-name switch): a revoked client certificate
    is refused by the CRL, a good one accepted, no certificate refused ("required")."""
    from dispa.tls.config import ClientAuthConfig
    good_cert, good_key = ca.issue("good-client", client=True)
    bad_cert, bad_key = ca.issue("revoked-client", client=True)
    (tmp_path / "ca.pem").write_bytes(ca.pem)
    (tmp_path / "crl.pem").write_bytes(ca.crl([bad_cert]))
    certs = tmp_path / "certs"
    write_pair(certs, "a", *ca.issue("a", dns=["a.test"]))
    store = _store(certs, client_auth=ClientAuthConfig(
        mode="required", ca_file=str(tmp_path / "ca.pem"), crl_file=str(tmp_path / "crl.pem")))
    store.refresh(force=True)
    server = tctx.TlsServer()
    server.update(store.payload())

    def client(cert, key):
        c = ssl.create_default_context(cadata=ca.pem.decode())
        c.maximum_version = ssl.TLSVersion.TLSv1_2  # the verdict inside the handshake
        if cert is not None:
            crt, k = write_pair(tmp_path / "c", f"c{id(cert)}", cert, key)
            c.load_cert_chain(crt, k)
        return c

    assert _handshake(server.base, client(good_cert, good_key), "a.test").getpeercert()
    with pytest.raises(ssl.SSLError, match="revoked"):
        _handshake(server.base, client(bad_cert, bad_key), "a.test")
    with pytest.raises(ssl.SSLError):
        _handshake(server.base, client(None, None), "a.test")
