"""Renewal scheduling without a CA: failures back off exponentially with jitter, count in
the metric and log a warning. (Issuance and renewal against the real pebble CA are in
tests/e2e/test_acme.py.)"""

from __future__ import annotations

import asyncio
import logging
import random

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
