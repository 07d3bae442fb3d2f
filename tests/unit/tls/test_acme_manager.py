"""Renewal scheduling without a CA: failures back off exponentially with jitter, count in
the metric and log a warning. (Issuance and renewal against the real pebble CA are in
tests/e2e/test_acme.py.)"""

from __future__ import annotations

import asyncio
import logging
import random
import time

from dispa.tls.acme.manager import AcmeManager
from dispa.tls.acme_config import AcmeConfig


class Clock:
    def __init__(self, t: float = 1_000_000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


async def _nothing(_):
    return None


def test_failures_back_off_exponentially_up_to_retry_max_and_are_counted(tmp_path, caplog):
    # port 1 on loopback refuses at once: a real, fast failure (no CA double)
    cfg = AcmeConfig(enabled=True, names=["a.example.com"], storage_dir=str(tmp_path),
                     directory_url="http://127.0.0.1:1/dir", retry_min=10, retry_max=50)
    clock = Clock()
    delays = []

    async def main():
        m = AcmeManager(cfg, publish=_nothing, clock=clock, rng=random.Random(7))
        try:
            for _ in range(5):
                before = clock.t
                await m.run_once()
                c = m.certs[0]
                delays.append(c.next_attempt - before)
                clock.t = c.next_attempt  # jump to the retry time
            return m
        finally:
            await m.close()

    with caplog.at_level(logging.WARNING, logger="dispa.acme"):
        m = asyncio.run(main())
    for got, want in zip(delays, [10, 20, 40, 50, 50]):
        assert want * 0.9 <= got <= want * 1.1, delays
    assert m.renewals == {"ok": 0, "failed": 5}
    assert m.certs[0].failures == 5 and "127.0.0.1:1" in m.certs[0].last_error
    assert ("dispa_acme_renewals_total", "ACME issuances and renewals by result",
            {"result": "failed"}, 5.0) in m.gauges()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 5 and "renewal of a.example.com failed" in warnings[0].getMessage()


def test_nothing_is_due_before_the_retry_time(tmp_path):
    cfg = AcmeConfig(enabled=True, names=["a.example.com"], storage_dir=str(tmp_path),
                     directory_url="http://127.0.0.1:1/dir", retry_min=30)
    clock = Clock()

    async def main():
        m = AcmeManager(cfg, publish=_nothing, clock=clock)
        try:
            await m.run_once()
            clock.t += 20  # before the first retry (30 s +-10%)
            await m.run_once()
            return m
        finally:
            await m.close()

    m = asyncio.run(main())
    assert m.renewals["failed"] == 1 and m.rounds == 2


def test_unreachable_etcd_storage_is_a_counted_failure_not_a_crash(tmp_path):
    from dispa.tls.acme_config import EtcdStorageConfig

    cfg = AcmeConfig(enabled=True, names=["a.example.com"], storage_dir=str(tmp_path),
                     storage="etcd", etcd=EtcdStorageConfig(endpoints=["http://127.0.0.1:1"],
                                                            timeout=2.0),
                     directory_url="http://127.0.0.1:1/dir", retry_min=30)

    async def main():
        m = AcmeManager(cfg, publish=_nothing, clock=Clock())
        try:
            await m.run_once()
            return m
        finally:
            await m.close()

    m = asyncio.run(main())
    assert m.renewals["failed"] == 1
    assert "etcd unreachable" in m.certs[0].last_error
    assert not (tmp_path / "certs").exists()


def _self_signed(name: str, not_before: float, not_after: float):
    """A (cert_pem, key_pem) pair for ``name`` with the given validity (epoch seconds)."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    utc = datetime.timezone.utc
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(datetime.datetime.fromtimestamp(not_before, utc))
            .not_valid_after(datetime.datetime.fromtimestamp(not_after, utc))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .sign(key, hashes.SHA256()))
    return (cert.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()))


def _one_round(cfg, clock):
    async def main():
        m = AcmeManager(cfg, publish=_nothing, clock=clock, rng=random.Random(3))
        try:
            await m.run_once()
            return m
        finally:
            await m.close()

    return asyncio.run(main())


def test_a_stored_key_that_is_not_the_chains_makes_the_certificate_due(tmp_path):
    # a box died between writing the new key and the new chain: the files on disk are a
    # valid, far-from-expiry certificate with another certificate's key
    clock = Clock(time.time())
    cert, key = _self_signed("a.example.com", clock.t - 86400, clock.t + 80 * 86400)
    _, other_key = _self_signed("a.example.com", clock.t - 86400, clock.t + 80 * 86400)
    d = tmp_path / "certs" / "a.example.com"
    d.mkdir(parents=True)
    (d / "fullchain.pem").write_bytes(cert)
    cfg = AcmeConfig(enabled=True, names=["a.example.com"], storage_dir=str(tmp_path),
                     directory_url="http://127.0.0.1:1/dir", retry_min=30)
    # the matching pair is not due: no attempt (the CA would be unreachable)
    (d / "privkey.pem").write_bytes(key)
    m = _one_round(cfg, clock)
    assert m.renewals["failed"] == 0 and m.certs[0].next_attempt > clock.t + 30 * 86400
    # the mismatched pair is due at once
    (d / "privkey.pem").write_bytes(other_key)
    m = _one_round(cfg, clock)
    assert m.renewals["failed"] == 1, m.status()
    assert "does not match" in m.status()["certificates"]["a.example.com"]["stored_pair_problem"]
    # a missing key too
    (d / "privkey.pem").unlink()
    m = _one_round(cfg, clock)
    assert m.renewals["failed"] == 1
    assert "missing" in m.certs[0].broken


def test_backoff_near_expiry_is_capped_by_the_remaining_life(tmp_path, caplog):
    clock = Clock(time.time())
    cert, key = _self_signed("a.example.com", clock.t - 89 * 86400, clock.t + 3600)
    d = tmp_path / "certs" / "a.example.com"
    d.mkdir(parents=True)
    (d / "fullchain.pem").write_bytes(cert)
    (d / "privkey.pem").write_bytes(key)
    cfg = AcmeConfig(enabled=True, names=["a.example.com"], storage_dir=str(tmp_path),
                     directory_url="http://127.0.0.1:1/dir", retry_min=100, retry_max=86400)

    async def main():
        m = AcmeManager(cfg, publish=_nothing, clock=clock, rng=random.Random(3))
        try:
            m.certs[0].failures = 12  # 100 x 2^12 s: a day by retry_max
            await m.run_once()
            return m
        finally:
            await m.close()

    with caplog.at_level(logging.WARNING, logger="dispa.acme"):
        m = asyncio.run(main())
    c = m.certs[0]
    assert c.failures == 13
    assert "the current certificate expires in 0.0 days" in caplog.records[-1].getMessage()
    # a quarter of the hour left, +-10%, instead of a day after expiry
    assert 900 * 0.9 <= c.next_attempt - clock.t <= 900 * 1.1, c.next_attempt - clock.t


def test_the_master_never_imports_the_acme_library_not_even_to_issue(tmp_path):
    # the client runs in a child process per issuance (dispa/tls/acme/issuer.py): the
    # master carries no acme/requests/pyOpenSSL (docs/tls-acme.md, Memory)
    import subprocess
    import sys

    now = time.time()
    cert, key = _self_signed("a.example.com", now - 86400, now + 80 * 86400)
    d = tmp_path / "certs" / "a.example.com"
    d.mkdir(parents=True)
    (d / "fullchain.pem").write_bytes(cert)
    (d / "privkey.pem").write_bytes(key)
    code = f"""
import asyncio, sys
from dispa.tls.acme.manager import AcmeManager
from dispa.tls.acme_config import AcmeConfig
async def nothing(_):
    return None
async def main(names):
    cfg = AcmeConfig(enabled=True, names=names, storage_dir={str(tmp_path)!r},
                     directory_url="http://127.0.0.1:1/dir")
    m = AcmeManager(cfg, publish=nothing)
    await m.run_once()
    await m.close()
    print(m.renewals, sorted(n for n in ("acme", "josepy", "requests", "OpenSSL")
                             if n in sys.modules))
    print(m.certs[-1].last_error)
asyncio.run(main(["a.example.com"]))
asyncio.run(main(["a.example.com", "b.example.com"]))  # b is due: an issuance is tried
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True).stdout.splitlines()
    assert out[0] == "{'ok': 0, 'failed': 0} []" and out[1] == "None", out
    assert out[2] == "{'ok': 0, 'failed': 1} []", out
    assert "127.0.0.1:1" in out[3], out  # the child did try the CA
