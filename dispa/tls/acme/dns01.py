"""DNS-01 (RFC 8555 §8.4): publish ``_acme-challenge.<name> TXT <value>`` and remove it.

Three providers, one interface (:class:`Dns01Provider`: ``present`` / ``cleanup``):

* :class:`Rfc2136Provider`: a dynamic update (RFC 2136) signed with TSIG (RFC 8945) sent
  over TCP to the zone's primary server with dnspython (``dns.update``). The zone is
  configured or found by asking the server for the SOA of each parent of the name.
* :class:`ExecProvider`: runs ``exec_command + [present|cleanup, fqdn, value]`` (the
  convention of lego's ``exec`` provider), with ``DISPA_ACME_ACTION``, ``..._FQDN``,
  ``..._VALUE`` and ``..._DOMAIN`` in the environment; exit status 0 means done.
* :class:`WebhookProvider`: ``POST webhook_url`` with JSON ``{"action", "domain", "fqdn",
  "value"}``; any 2xx means done.

:func:`wait_visible` then polls one DNS server until it answers the TXT value, so the CA
is not asked to validate before the record exists there (for RFC 2136 the server updated;
for the hooks the configured ``propagation_nameserver``, if any).
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import time
from typing import Protocol

log = logging.getLogger("dispa.acme")


class Dns01Error(Exception):
    """The record could not be published or removed."""


def validation_name(domain: str) -> str:
    """``_acme-challenge.<domain>.`` (a wildcard's ``*.`` is dropped, RFC 8555 §8.4)."""
    d = domain[2:] if domain.startswith("*.") else domain
    return f"_acme-challenge.{d.rstrip('.')}."


class Dns01Provider(Protocol):
    async def present(self, domain: str, fqdn: str, value: str) -> None: ...

    async def cleanup(self, domain: str, fqdn: str, value: str) -> None: ...


class Rfc2136Provider:
    """Dynamic updates to ``server:port`` signed with the TSIG key (see the module doc)."""

    def __init__(self, cfg):
        import dns.name
        import dns.tsig

        self.cfg = cfg
        self.keyring = None
        self.keyname = None
        if cfg.tsig_key_name:
            self.keyname = dns.name.from_text(cfg.tsig_key_name)
            self.keyring = {self.keyname: dns.tsig.Key(self.keyname, base64.b64decode(
                cfg.tsig_secret), cfg.tsig_algorithm + ".")}
        self._zones: dict[str, "dns.name.Name"] = {}

    async def _zone(self, fqdn: str):
        import dns.asyncquery
        import dns.exception
        import dns.message
        import dns.name
        import dns.rcode
        import dns.rdatatype

        if self.cfg.zone:
            return dns.name.from_text(self.cfg.zone)
        name = dns.name.from_text(fqdn)
        cached = self._zones.get(fqdn)
        if cached is not None:
            return cached
        candidate = name.parent()
        while True:
            q = dns.message.make_query(candidate, dns.rdatatype.SOA)
            try:
                r = await dns.asyncquery.tcp(q, self.cfg.server, port=self.cfg.port,
                                             timeout=self.cfg.timeout)
            except (OSError, dns.exception.DNSException) as exc:
                raise Dns01Error(f"SOA query to {self.cfg.server}:{self.cfg.port} failed: "
                                 f"{exc}") from None
            if r.rcode() == dns.rcode.NOERROR and any(
                    rr.rdtype == dns.rdatatype.SOA and rr.name == candidate
                    for rr in r.answer):
                self._zones[fqdn] = candidate
                return candidate
            if candidate == dns.name.root:
                raise Dns01Error(f"no zone found for {fqdn} on {self.cfg.server}")
            candidate = candidate.parent()

    async def _update(self, fqdn: str, value: str, *, add: bool) -> None:
        import dns.asyncquery
        import dns.exception
        import dns.name
        import dns.rcode
        import dns.update

        zone = await self._zone(fqdn)
        upd = dns.update.UpdateMessage(zone, keyring=self.keyring, keyname=self.keyname)
        rel = dns.name.from_text(fqdn).relativize(zone)
        txt = '"' + value + '"'
        if add:
            upd.add(rel, self.cfg.ttl, "TXT", txt)
        else:
            upd.delete(rel, "TXT", txt)
        try:
            r = await dns.asyncquery.tcp(upd, self.cfg.server, port=self.cfg.port,
                                         timeout=self.cfg.timeout)
        except (OSError, dns.exception.DNSException) as exc:
            raise Dns01Error(f"update to {self.cfg.server}:{self.cfg.port} failed: {exc}") \
                from None
        if r.rcode() != dns.rcode.NOERROR:
            raise Dns01Error(f"update of {fqdn} refused by {self.cfg.server}: "
                             f"{dns.rcode.to_text(r.rcode())}")

    async def present(self, domain: str, fqdn: str, value: str) -> None:
        await self._update(fqdn, value, add=True)

    async def cleanup(self, domain: str, fqdn: str, value: str) -> None:
        await self._update(fqdn, value, add=False)


class ExecProvider:
    """Runs the operator's command (see the module docstring)."""

    def __init__(self, argv: list[str], timeout: float):
        self.argv = list(argv)
        self.timeout = timeout

    async def _run(self, action: str, domain: str, fqdn: str, value: str) -> None:
        env = dict(os.environ, DISPA_ACME_ACTION=action, DISPA_ACME_DOMAIN=domain,
                   DISPA_ACME_FQDN=fqdn, DISPA_ACME_VALUE=value)
        try:
            proc = await asyncio.create_subprocess_exec(
                *self.argv, action, fqdn, value, env=env, stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        except OSError as exc:
            raise Dns01Error(f"cannot run {self.argv[0]!r}: {exc.strerror or exc}") from None
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), self.timeout)
        except asyncio.TimeoutError:
            proc.kill()
            await proc.wait()
            raise Dns01Error(f"{self.argv[0]} {action} did not finish within "
                             f"{self.timeout:g}s") from None
        except asyncio.CancelledError:
            proc.kill()  # shutdown or reload during the hook: leave no orphan behind
            raise
        if proc.returncode != 0:
            tail = out.decode("utf-8", "replace").strip()[-500:]
            raise Dns01Error(f"{self.argv[0]} {action} exited with {proc.returncode}: {tail}")

    async def present(self, domain: str, fqdn: str, value: str) -> None:
        await self._run("present", domain, fqdn, value)

    async def cleanup(self, domain: str, fqdn: str, value: str) -> None:
        await self._run("cleanup", domain, fqdn, value)


class WebhookProvider:
    """POSTs to the operator's URL (see the module docstring)."""

    def __init__(self, url: str, headers: dict[str, str], timeout: float):
        self.url = url
        self.headers = dict(headers)
        self.timeout = timeout

    async def _post(self, action: str, domain: str, fqdn: str, value: str) -> None:
        import aiohttp

        body = {"action": action, "domain": domain, "fqdn": fqdn, "value": value}
        try:
            async with aiohttp.ClientSession(
                    timeout=aiohttp.ClientTimeout(total=self.timeout)) as s:
                async with s.post(self.url, json=body, headers=self.headers) as r:
                    text = await r.text()
                    if not 200 <= r.status < 300:
                        raise Dns01Error(f"webhook {action}: HTTP {r.status}: {text[:300]}")
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise Dns01Error(f"webhook {action} to {self.url} failed: "
                             f"{exc or type(exc).__name__}") from None

    async def present(self, domain: str, fqdn: str, value: str) -> None:
        await self._post("present", domain, fqdn, value)

    async def cleanup(self, domain: str, fqdn: str, value: str) -> None:
        await self._post("cleanup", domain, fqdn, value)


def make_provider(cfg) -> Dns01Provider:
    """The provider a ``Dns01Config`` names."""
    if cfg.provider == "exec":
        return ExecProvider(cfg.exec_command, cfg.exec_timeout)
    if cfg.provider == "webhook":
        return WebhookProvider(cfg.webhook_url, cfg.webhook_headers, cfg.webhook_timeout)
    return Rfc2136Provider(cfg.rfc2136)


def propagation_server(cfg) -> tuple[str, int] | None:
    """Where :func:`wait_visible` looks, or None (no check)."""
    if cfg.propagation_nameserver:
        host, _, port = cfg.propagation_nameserver.rpartition(":")
        return host.strip("[]"), int(port)
    if cfg.provider == "rfc2136":
        return cfg.rfc2136.server, cfg.rfc2136.port
    return None


async def wait_visible(server: tuple[str, int], fqdn: str, value: str,
                       timeout: float) -> None:
    """Poll ``server`` (TCP) until ``fqdn`` has the TXT ``value``; raise
    :class:`Dns01Error` after ``timeout`` seconds."""
    import dns.asyncquery
    import dns.exception
    import dns.message
    import dns.rdatatype

    deadline = time.monotonic() + timeout
    delay = 0.05
    while True:
        q = dns.message.make_query(fqdn, dns.rdatatype.TXT)
        try:
            r = await dns.asyncquery.tcp(q, server[0], port=server[1],
                                         timeout=max(0.1, min(5.0, deadline - time.monotonic())))
            for rrset in r.answer:
                for rd in rrset:
                    if getattr(rd, "strings", None) and b"".join(rd.strings) == value.encode():
                        return
        except (OSError, dns.exception.DNSException) as exc:
            log.debug("acme: TXT check at %s:%d: %s", server[0], server[1], exc)
        if time.monotonic() >= deadline:
            raise Dns01Error(f"TXT {fqdn} not visible at {server[0]}:{server[1]} within "
                             f"{timeout:g}s")
        await asyncio.sleep(delay)  # polling a DNS server: nothing to wait on instead
        delay = min(delay * 2, 2.0)
