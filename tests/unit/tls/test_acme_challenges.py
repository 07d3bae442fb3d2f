"""Pending ACME challenges: the TLS-ALPN-01 certificate, the snapshot overlay, the HTTP-01
responder filter."""

from __future__ import annotations

import hashlib

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from dispa.config import load_config_text
from dispa.plugins import registry
from dispa.plugins.api import BuildContext, Headers, Request
from dispa.tls.acme.challenges import (
    ACME_IDENTIFIER_OID, HTTP01_FILTER_NAME, PendingChallenges, replace_fields,
    tls_alpn01_certificate, with_challenges,
)
from dispa.tls.acme.http01 import TYPE, AcmeHttp01

BASE = """
[server]
bind_address = "127.0.0.1:8080"
[domains]
intercept_domains = ["app.example.com"]
[[targets.targets]]
name = "a"
url = "http://127.0.0.1:9001"
[plugins]
apply_before_domain_match = false
"""


def test_tls_alpn01_certificate_carries_the_critical_acme_identifier_with_the_digest():
    cert_pem, key_pem = tls_alpn01_certificate("a.example.com", "tok.thumb")
    cert = x509.load_pem_x509_certificate(cert_pem.encode())
    ext = cert.extensions.get_extension_for_oid(ACME_IDENTIFIER_OID)
    assert ext.critical
    # RFC 8737 §3: the extension value is the DER OCTET STRING of SHA-256(key authorization)
    assert ext.value.value == b"\x04\x20" + hashlib.sha256(b"tok.thumb").digest()
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["a.example.com"]
    key = serialization.load_pem_private_key(key_pem.encode(), None)
    assert key.public_key().public_numbers() == cert.public_key().public_numbers()


def test_no_pending_challenge_leaves_the_snapshot_untouched():
    snap = load_config_text(BASE, fmt="toml").snapshot
    assert with_challenges(snap, None) is snap
    assert snap.acme_challenges is None


def test_http01_challenge_puts_the_responder_first_and_before_interception():
    snap = load_config_text(BASE, fmt="toml").snapshot
    pending = {"http01": {"tok": "tok.thumb"}, "tls_alpn01": {}}
    out = with_challenges(snap, pending)
    assert out.version != snap.version
    assert out.acme_challenges == pending
    first = out.pipeline.plugins[0]
    assert (first.name, first.type, first.is_global) == (HTTP01_FILTER_NAME, TYPE, True)
    assert first.config == {"tokens": {"tok": "tok.thumb"}}
    assert out.pipeline.apply_before_domain_match is True
    # taking the challenge away again gives back the very same snapshot (same version)
    back = replace_fields(out, pipeline=snap.pipeline, acme_challenges=None)
    assert back.version == snap.version


def test_tls_alpn01_only_challenge_adds_no_filter():
    snap = load_config_text(BASE, fmt="toml").snapshot
    out = with_challenges(snap, {"http01": {}, "tls_alpn01": {"a.example.com": ["c", "k"]}})
    assert out.pipeline == snap.pipeline
    assert out.acme_challenges["tls_alpn01"] == {"a.example.com": ["c", "k"]}


def _req(method: str, target: str, host: str = "whatever.example") -> Request:
    return Request(method, target, Headers([(b"host", host.encode())]), host=host)


def test_responder_answers_a_pending_token_for_any_host():
    cls = registry.get(TYPE)
    assert cls is AcmeHttp01
    f = cls.build(registry.parse_config(cls, {"tokens": {"tok-1": "tok-1.thumb"}}),
                  BuildContext(instance_name=HTTP01_FILTER_NAME))
    r = f.on_request(_req("GET", "/.well-known/acme-challenge/tok-1", host="not.listed"))
    assert r.status == 200 and r.body == b"tok-1.thumb"
    assert r.headers.get("content-type") == "text/plain"
    assert f.on_request(_req("HEAD", "/.well-known/acme-challenge/tok-1")).status == 200


@pytest.mark.parametrize("method,target", [
    ("GET", "/.well-known/acme-challenge/other"),
    ("GET", "/.well-known/acme-challenge/"),
    ("GET", "/tok-1"),
    ("POST", "/.well-known/acme-challenge/tok-1"),
])
def test_responder_lets_everything_else_through(method, target):
    f = AcmeHttp01(AcmeHttp01.Config(tokens={"tok-1": "x"}), BuildContext())
    assert f.on_request(_req(method, target)) is None


def test_pending_challenges_publish_each_change_and_nothing_at_the_end():
    import asyncio

    seen = []

    async def publish(value):
        seen.append(value)

    async def main():
        p = PendingChallenges(publish)
        await p.add_http01("t", "t.k")
        await p.add_tls_alpn01("a.example.com", "u.k")
        await p.remove(tokens=["t"], domains=["a.example.com"])
        await p.remove(tokens=["t"])  # nothing left to remove: no publish

    asyncio.run(main())
    assert seen[0] == {"http01": {"t": "t.k"}, "tls_alpn01": {}}
    assert set(seen[1]["tls_alpn01"]) == {"a.example.com"}
    assert seen[-1] is None and len(seen) == 3
