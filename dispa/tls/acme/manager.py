"""Issuance and renewal scheduling, in the master.

Theory of operation
-------------------
One :class:`AcmeManager` per ``[tls.acme]`` configuration. It runs one task that loops:

1. for each configured certificate, read ``certs/<name>/fullchain.pem`` from the storage
   (:meth:`_refresh`); with etcd storage, copy a changed pair to the local
   ``<storage_dir>/certs/<name>/`` (where the TLS listeners read it) and report it;
2. a certificate is *due* when it is missing, cannot be served (unreadable, its key
   missing or not the chain's: a crash between the two writes), does not cover the
   configured names, or
   ``now >= not_before + lifetime x (renew_ratio + jitter)``; the jitter is drawn once per
   certificate serial in ``[0, renew_jitter)``, so boxes and certificates spread out;
3. due certificates are renewed under the storage lock (tried, never waited for: another
   box holding it is renewing, and step 1 will find its result). Under the lock each is read
   again first, since another box may just have renewed it;
4. a failure (any :class:`AcmeError` or storage error) counts
   ``dispa_acme_renewals_total{result="failed"}``, logs a warning, and schedules the next
   try after ``retry_min x 2^(failures-1)`` seconds, at most ``retry_max`` and at most a
   quarter of the certificate's remaining life (but never under ``retry_min``), +-10%;
5. sleep until the earliest due time, at most ``check_interval`` seconds (:meth:`wake`
   cuts the sleep short).

The clock is injected (``clock``, seconds since the epoch) so tests move time instead of
faking the CA; ``renew_ratio`` near 0 makes a real CA's long-lived certificate due soon.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import random
import time
from typing import Callable

from cryptography import x509

from dispa.tls.acme.challenges import PendingChallenges
from dispa.tls.acme.errors import AcmeError
from dispa.tls.acme.dns01 import (
    Dns01Error, make_provider, propagation_server, validation_name, wait_visible,
)
from dispa.tls.acme.storage import DirectoryStorage, Storage, StorageError, open_storage
from dispa.tls.acme_config import AcmeConfig, certificate_set

log = logging.getLogger("dispa.acme")

CLOSE_TIMEOUT = 10.0


class CertState:
    """What the manager knows about one configured certificate."""

    __slots__ = ("name", "names", "serial", "not_before", "not_after", "jitter",
                 "next_attempt", "failures", "last_error", "last_renewed", "fullchain",
                 "broken")

    def __init__(self, name: str, names: tuple[str, ...]):
        self.name = name
        self.names = names
        self.serial: int | None = None
        self.not_before = 0.0
        self.not_after = 0.0
        self.jitter = 0.0
        self.next_attempt = 0.0  # epoch seconds; 0: now
        self.failures = 0
        self.last_error: str | None = None
        self.last_renewed: float | None = None
        self.fullchain: bytes | None = None
        # why the stored pair cannot be served (unreadable chain, key missing or not the
        # chain's): the certificate is due at once, whatever its dates
        self.broken: str | None = None

    def as_dict(self) -> dict:
        return {"names": list(self.names), "serial": None if self.serial is None
                else format(self.serial, "x"), "not_before": self.not_before or None,
                "not_after": self.not_after or None, "next_attempt": self.next_attempt,
                "failures": self.failures, "last_error": self.last_error,
                "last_renewed": self.last_renewed, "stored_pair_problem": self.broken}


class _Solver:
    """The client's Solver: HTTP-01 and TLS-ALPN-01 through the workers, DNS-01 through
    the configured provider."""

    def __init__(self, cfg: AcmeConfig, pending: PendingChallenges):
        self.pending = pending
        self.dns_cfg = cfg.dns01
        self.dns = make_provider(cfg.dns01) if cfg.challenge_type == "dns-01" else None

    async def present(self, kind, domain, token, key_authorization, value) -> None:
        if kind == "http-01":
            await self.pending.add_http01(token, key_authorization)
        elif kind == "tls-alpn-01":
            await self.pending.add_tls_alpn01(domain, key_authorization)
        else:
            fqdn = validation_name(domain)
            try:
                await self.dns.present(domain, fqdn, value)
                server = propagation_server(self.dns_cfg)
                if server is not None:
                    await wait_visible(server, fqdn, value, self.dns_cfg.propagation_timeout)
            except Dns01Error as exc:
                raise AcmeError(f"dns-01 for {domain}: {exc}") from None

    async def cleanup(self, kind, domain, token, key_authorization, value) -> None:
        if kind == "http-01":
            await self.pending.remove(tokens=[token])
        elif kind == "tls-alpn-01":
            await self.pending.remove(domains=[domain])
        else:
            await self.dns.cleanup(domain, validation_name(domain), value)


class AcmeManager:
    """Keeps every configured certificate issued and renewed (see the module docstring).

    ``publish(challenges)`` puts a ``Snapshot.acme_challenges`` value in front of the
    workers and returns once they have it; ``on_issued(name)`` is called (and awaited if it
    returns an awaitable) after ``<storage_dir>/certs/<name>/`` got a new pair."""

    def __init__(self, cfg: AcmeConfig, *, publish, on_issued: Callable | None = None,
                 storage: Storage | None = None, clock: Callable[[], float] = time.time,
                 rng: random.Random | None = None):
        self.cfg = cfg
        self.storage = storage if storage is not None else open_storage(cfg)
        self.local = (self.storage if isinstance(self.storage, DirectoryStorage)
                      else DirectoryStorage(cfg.storage_dir))
        self.pending = PendingChallenges(publish)
        self._client = None  # see ``client``
        self.on_issued = on_issued
        self.clock = clock
        self.rng = rng or random.Random()
        self.certs = [CertState(n, names) for n, names in certificate_set(cfg)]
        self.renewals = {"ok": 0, "failed": 0}
        self.revocations = {"ok": 0, "failed": 0}  # revoke_replaced
        self.lock_busy = 0  # rounds skipped because another manager held the lock
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self.rounds = 0

    @property
    def client(self):
        """The ACME client: a child process per issuance (``issuer``), so the master never
        imports the ``acme`` library (about 12 MB with ``requests`` and ``pyOpenSSL``)."""
        if self._client is None:
            from dispa.tls.acme.issuer import IssuerProcess

            self._client = IssuerProcess(self.cfg, self.storage)
        return self._client

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.ensure_future(self._run())

    def wake(self) -> None:
        """Check the certificates now (tests, admin)."""
        self._wake.set()

    async def close(self) -> None:
        """Stop the loop. An order in progress is abandoned; its challenges are cleaned
        up, but a hook that hangs (DNS-01 exec or webhook) is not waited for beyond
        ``CLOSE_TIMEOUT`` seconds: shutdown and reloads must not depend on it."""
        if self._task is not None:
            task, self._task = self._task, None
            task.cancel()
            done, _ = await asyncio.wait({task}, timeout=CLOSE_TIMEOUT)
            if not done:
                log.warning("acme: challenge cleanup still running after %ss; not waiting",
                            CLOSE_TIMEOUT)
            elif not task.cancelled() and task.exception() is not None:
                log.error("acme: manager loop ended with %r", task.exception())
        await self.storage.close()
        if self.local is not self.storage:
            await self.local.close()

    async def _run(self) -> None:
        while True:
            crashed = False
            try:
                await self.run_once()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the loop must survive any bug in one round
                log.exception("acme: renewal round failed")
                crashed = True
            now = self.clock()
            nxt = min([c.next_attempt for c in self.certs], default=now + self.cfg.check_interval)
            delay = max(0.0, min(nxt - now, self.cfg.check_interval))
            if crashed:  # a round that failed before scheduling must not spin the loop
                delay = max(delay, self.cfg.retry_min)
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), delay)
            except asyncio.TimeoutError:
                pass

    # ------------------------------------------------------------------ one round
    async def run_once(self) -> None:
        """Read storage, renew what is due (if the lock is free)."""
        self.rounds += 1
        for c in self.certs:
            try:
                await self._refresh(c)
            except StorageError as exc:
                self._failed(c, f"storage: {exc}")
        now = self.clock()
        due = [c for c in self.certs if c.next_attempt <= now]
        if not due:
            return
        try:
            lock = await self.storage.try_lock()
        except StorageError as exc:
            for c in due:
                self._failed(c, f"storage lock: {exc}")
            return
        if lock is None:
            # another box (or process) is renewing: look at its result a bit later
            self.lock_busy += 1
            log.info("acme: renewal lock held elsewhere; checking storage again later")
            for c in due:
                c.next_attempt = now + min(self.cfg.retry_min, self.cfg.check_interval)
            return
        try:
            for c in due:
                try:
                    await self._refresh(c)  # a peer may have renewed while we waited
                    if c.next_attempt > self.clock():
                        continue
                    await self._renew(c)
                except StorageError as exc:
                    self._failed(c, f"storage: {exc}")
        finally:
            await lock.release()

    async def _refresh(self, c: CertState) -> None:
        fullchain = await self.storage.get(f"certs/{c.name}/fullchain.pem")
        if fullchain is None:
            c.fullchain = c.serial = c.broken = None
            c.not_before = c.not_after = 0.0
            if c.failures == 0:
                c.next_attempt = 0.0
            return
        if fullchain != c.fullchain:
            key = await self.storage.get(f"certs/{c.name}/privkey.pem")
            try:
                cert = x509.load_pem_x509_certificate(fullchain)
            except ValueError as exc:
                broken = f"the chain is unreadable ({exc})"
            else:
                broken = _pair_problem(cert, key)
            c.fullchain, c.broken = fullchain, broken  # (after the reads: a StorageError
            # above leaves the state as it was, and the next round checks again)
            if c.broken is not None:
                # e.g. a crash between writing the key and the chain: serving is impossible
                # until a new pair is issued, whatever the dates say
                c.serial = None
                c.next_attempt = 0.0 if c.failures == 0 else c.next_attempt
                log.warning("acme: stored certificate %s cannot be served: %s; issuing anew",
                            c.name, c.broken)
                return
            if cert.serial_number != c.serial:
                c.jitter = self.rng.random() * self.cfg.renew_jitter
            c.serial = cert.serial_number
            c.not_before = cert.not_valid_before_utc.timestamp()
            c.not_after = cert.not_valid_after_utc.timestamp()
            if self.local is not self.storage:
                await self._export(c, fullchain, key)
        lifetime = max(0.0, c.not_after - c.not_before)
        renew_at = c.not_before + lifetime * (self.cfg.renew_ratio + c.jitter)
        covers = set(c.names) <= set(_names_of(c.fullchain))
        if not covers or c.broken is not None:
            renew_at = 0.0
        if c.failures == 0 or renew_at > self.clock():
            # a failure's backoff holds until the certificate is due again
            if c.failures and renew_at > self.clock():
                c.failures = 0
                c.last_error = None
            c.next_attempt = renew_at

    async def _export(self, c: CertState, fullchain: bytes, key: bytes) -> None:
        """Copy a pair from shared storage to the local directory the listeners read
        (unless the local copy is that pair already, key included)."""
        if (await self.local.get(f"certs/{c.name}/fullchain.pem") == fullchain
                and await self.local.get(f"certs/{c.name}/privkey.pem") == key):
            return
        await self.local.put(f"certs/{c.name}/privkey.pem", key)
        await self.local.put(f"certs/{c.name}/fullchain.pem", fullchain)
        log.info("acme: certificate copied from shared storage",
                 extra={"fields": {"certificate": c.name, "serial": format(c.serial or 0, "x")}})
        await self._notify(c.name)

    async def _renew(self, c: CertState) -> None:
        replaced = c.fullchain if c.broken is None and c.serial is not None else None
        log.info("acme: requesting a certificate", extra={"fields": {
            "certificate": c.name, "names": list(c.names),
            "challenge": self.cfg.challenge_type}})
        try:
            fullchain, key = await self.client.issue(
                c.names, challenge_type=self.cfg.challenge_type,
                solver=_Solver(self.cfg, self.pending), key_type=self.cfg.key_type,
                timeout=self.cfg.order_timeout)
            # the key first: a reader that sees the new chain finds its key already there
            await self.storage.put(f"certs/{c.name}/privkey.pem", key)
            await self.storage.put(f"certs/{c.name}/fullchain.pem", fullchain)
            if self.local is not self.storage:
                await self.local.put(f"certs/{c.name}/privkey.pem", key)
                await self.local.put(f"certs/{c.name}/fullchain.pem", fullchain)
        except (AcmeError, StorageError) as exc:
            self._failed(c, str(exc))
            return
        self.renewals["ok"] += 1
        c.failures = 0
        c.last_error = None
        c.last_renewed = self.clock()
        c.fullchain = None  # re-read below: serial, dates, next renewal
        await self._refresh(c)
        log.info("acme: certificate issued", extra={"fields": {
            "certificate": c.name, "serial": format(c.serial or 0, "x"),
            "not_after": c.not_after, "next_renewal": c.next_attempt}})
        await self._notify(c.name)
        if self.cfg.revoke_replaced and replaced is not None:
            await self._revoke(c.name, replaced)

    async def _revoke(self, name: str, fullchain: bytes) -> None:
        """Revoke a replaced certificate (``revoke_replaced``), after the new pair is
        stored and the listeners were told; a failure is logged and counted only."""
        serial = format(x509.load_pem_x509_certificate(fullchain).serial_number, "x")
        try:
            await self.client.revoke(fullchain)
        except AcmeError as exc:
            self.revocations["failed"] += 1
            log.warning("acme: revoking the replaced certificate %s (serial %s) failed: %s",
                        name, serial, exc)
            return
        self.revocations["ok"] += 1
        log.info("acme: replaced certificate revoked", extra={"fields": {
            "certificate": name, "serial": serial}})

    def _failed(self, c: CertState, error: str) -> None:
        self.renewals["failed"] += 1
        c.failures += 1
        c.last_error = error
        now = self.clock()
        delay = min(self.cfg.retry_min * 2 ** (min(c.failures, 64) - 1), self.cfg.retry_max)
        if c.not_after > now and c.broken is None:
            # close to expiry, retry more often than retry_max: at least 4 tries in what is
            # left of the certificate's life (never faster than retry_min)
            delay = min(delay, max(self.cfg.retry_min, (c.not_after - now) / 4))
        delay *= 0.9 + 0.2 * self.rng.random()
        c.next_attempt = now + delay
        expiry = ""
        if c.not_after and c.broken is None:
            left = c.not_after - now
            expiry = (f"; the current certificate expires in {left / 86400:.1f} days"
                      if left > 0 else "; the current certificate has EXPIRED")
        log.warning("acme: renewal of %s failed (attempt %d, next in %.0fs%s): %s",
                    c.name, c.failures, delay, expiry, error)

    async def _notify(self, name: str) -> None:
        if self.on_issued is None:
            return
        try:
            r = self.on_issued(name)
            if inspect.isawaitable(r):
                await r
        except Exception:  # noqa: BLE001 - the certificate is stored; polling picks it up
            log.exception("acme: certificate reload hook failed")

    # ------------------------------------------------------------------ reporting
    def status(self) -> dict:
        return {"challenge_type": self.cfg.challenge_type, "storage": self.cfg.storage,
                "directory_url": self.cfg.directory_url,
                "renewals": dict(self.renewals), "lock_busy": self.lock_busy,
                "revocations": dict(self.revocations),
                "pending_challenges": len(self.pending.http01) + len(self.pending.tls_alpn01),
                "certificates": {c.name: c.as_dict() for c in self.certs}}

    def gauges(self) -> list[tuple[str, str, dict, float]]:
        """Metrics in the master's gauge tuple form."""
        out = [("dispa_acme_renewals_total", "ACME issuances and renewals by result",
                {"result": r}, float(n)) for r, n in self.renewals.items()]
        if self.cfg.revoke_replaced:
            out += [("dispa_acme_revocations_total", "Replaced certificates revoked, by result",
                     {"result": r}, float(n)) for r, n in self.revocations.items()]
        for c in self.certs:
            if c.not_after:
                out.append(("dispa_acme_certificate_not_after_seconds",
                            "Expiry of the ACME certificate (epoch seconds)",
                            {"certificate": c.name}, c.not_after))
            out.append(("dispa_acme_next_renewal_seconds",
                        "When the ACME manager next tries this certificate (epoch seconds)",
                        {"certificate": c.name}, c.next_attempt))
            out.append(("dispa_acme_renewal_failures",
                        "Consecutive failed attempts for this certificate",
                        {"certificate": c.name}, float(c.failures)))
        return out


def _pair_problem(cert: x509.Certificate, key_pem: bytes | None) -> str | None:
    """Why ``key_pem`` cannot serve ``cert`` (missing, unreadable, another key), or None."""
    from cryptography.hazmat.primitives import serialization

    if key_pem is None:
        return "its private key is missing"
    from cryptography.exceptions import UnsupportedAlgorithm

    try:
        key = serialization.load_pem_private_key(key_pem, None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        return f"its private key is unreadable ({exc})"
    pub = serialization.PublicFormat.SubjectPublicKeyInfo
    if (key.public_key().public_bytes(serialization.Encoding.DER, pub)
            != cert.public_key().public_bytes(serialization.Encoding.DER, pub)):
        return "its private key does not match the certificate"
    return None


def _names_of(fullchain: bytes | None) -> list[str]:
    if not fullchain:
        return []
    try:
        cert = x509.load_pem_x509_certificate(fullchain)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        return [n.lower() for n in san.value.get_values_for_type(x509.DNSName)]
    except (ValueError, x509.ExtensionNotFound):
        return []
