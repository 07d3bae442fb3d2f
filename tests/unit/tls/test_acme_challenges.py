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
    # the operator's setting is kept: the pipeline runs the responder alone before
    # interception (test_pipeline_answers_the_challenge_for_any_host_...)
    assert out.pipeline.apply_before_domain_match is False
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


TAGGED = BASE.replace("apply_before_domain_match = false", """apply_before_domain_match = {before}
[[plugins.plugins]]
name = "tag"
type = "tests.support.filters:Tag"
""")


def _pipeline_start(before: bool, host: str, target: str, pending=True):
    """Build the worker's runtime for the snapshot (with an HTTP-01 token pending) and
    start one request as the Session does; returns (pipeline, plan)."""
    import asyncio

    from dispa.protocols.http1 import HEAD, RequestParser
    from dispa.proxy.runtime import WorkerState, build_runtime

    snap = load_config_text(TAGGED.format(before="true" if before else "false"),
                            fmt="toml").snapshot
    if pending:
        snap = with_challenges(snap, {"http01": {"tok": "tok.thumb"}, "tls_alpn01": {}})
    loop = asyncio.new_event_loop()
    try:
        rt = build_runtime(snap, WorkerState(loop))
        p = RequestParser()
        p.feed(f"GET {target} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        assert p.next_event() == HEAD
        intercepted = rt.intercept.match(host.encode())
        return rt.pipeline, rt.pipeline.start(None, p.head, host.encode(), target.encode(),
                                              intercepted, "10.0.0.9", b"rid-1")
    finally:
        loop.close()


def test_pipeline_answers_the_challenge_for_any_host_without_the_operators_filters():
    # apply_before_domain_match = false, a global filter "tag", a Host not intercepted
    pipeline, plan = _pipeline_start(False, "new.example.org", "/.well-known/acme-challenge/tok")
    assert pipeline.before_intercept  # the Session hands such requests to the pipeline
    assert plan.response.status == 200 and plan.response.body == b"tok.thumb"
    assert "tag" not in plan.req.ctx  # the operator's filter did not run
    # any other request for that Host gets the usual rejection, still without the filter
    _, plan = _pipeline_start(False, "new.example.org", "/index.html")
    assert plan.response.status == 404 and b"not served" in plan.response.body
    assert "tag" not in plan.req.ctx and not plan.resp_hooks and not plan.log_hooks
    # an unknown token is not answered either
    _, plan = _pipeline_start(False, "new.example.org", "/.well-known/acme-challenge/nope")
    assert plan.response.status == 404


def test_pipeline_keeps_the_operators_order_for_intercepted_hosts_and_when_asked():
    # intercepted Host: the responder first, then the operator's global filter as usual
    _, plan = _pipeline_start(False, "app.example.com", "/.well-known/acme-challenge/tok")
    assert plan.response.status == 200 and "tag" not in plan.req.ctx
    _, plan = _pipeline_start(False, "app.example.com", "/page")
    assert plan.response is None and plan.req.ctx["tag"] == "1"
    # apply_before_domain_match = true: every global filter runs before interception
    _, plan = _pipeline_start(True, "new.example.org", "/page")
    assert plan.req.ctx["tag"] == "1" and plan.response.status == 404


def test_without_a_pending_challenge_foreign_hosts_never_reach_the_pipeline():
    pipeline, _ = _pipeline_start(False, "app.example.com", "/", pending=False)
    assert not pipeline.before_intercept and pipeline.acme_http01 is None
