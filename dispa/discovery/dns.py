"""The DNS discovery provider: SRV, A and AAAA records, with a TTL-respecting cache.

Theory of operation
-------------------
Each source (``[target_groups.discovery] provider = "dns"``) names a DNS name and a record
type:

* ``SRV``: the SRV records of the name (``_http._tcp.api.example``). Only the *lowest
  priority group that has targets* is used (RFC 2782: lower priority first; a group whose
  targets do not resolve, or the "." target, is skipped). Each target is resolved to its A
  and AAAA addresses; an endpoint gets the record's port and weight (weight 0, "very
  rarely", becomes 1: the balancers need weights >= 1).
* ``A`` / ``AAAA``: the addresses of the name, each with the source's ``port``.

Answers are cached for their TTL clamped to ``[min_ttl, max_ttl]``; NXDOMAIN and NODATA
answers are cached for ``negative_ttl`` (they are authoritative "no instances" answers and
empty the cluster). A source is re-queried when the earliest TTL among the records it used
expires, so a zone change reaches Dispa within one (clamped) TTL plus the watcher's throttle.

Several resolvers are tried in order: a timeout, SERVFAIL/REFUSED or a network error moves
to the next one. When every resolver fails, the source's answer is an *error*: nothing is
emitted (the last known good endpoints stay in force), the provider's health turns
``stale`` and the query is retried with exponential backoff.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from typing import Callable, Optional

import dns.asyncresolver
import dns.exception
import dns.name
import dns.nameserver
import dns.rdatatype
import dns.resolver

from dispa.discovery.config import DiscoverySource, DnsOptions, ServiceDiscoveryConfig, \
    resolver_address
from dispa.discovery.provider import Backoff, DiscoveredEndpoint, Emit, EndpointSet, Provider

__all__ = ["DnsCache", "DnsError", "DnsProvider", "SrvRecord", "select_srv"]

log = logging.getLogger("dispa.discovery.dns")

#: Ceiling of the retry backoff after a failed query (DNS queries are cheap).
MAX_RETRY_SECONDS = 5.0


class DnsError(Exception):
    """Every resolver failed (timeouts, SERVFAIL, network errors): not an answer."""


class SrvRecord(tuple):
    """``(priority, weight, port, target)`` of one SRV record (target without final dot)."""

    __slots__ = ()

    def __new__(cls, priority: int, weight: int, port: int, target: str):
        return super().__new__(cls, (priority, weight, port, target))

    priority = property(lambda self: self[0])
    weight = property(lambda self: self[1])
    port = property(lambda self: self[2])
    target = property(lambda self: self[3])


class _Entry:
    __slots__ = ("values", "expires", "negative")

    def __init__(self, values: tuple, expires: float, negative: bool):
        self.values = values
        self.expires = expires
        self.negative = negative


class DnsCache:
    """Answers by ``(name, rdtype)``, each until its clamped TTL runs out.

    ``put(name, rdtype, values, ttl)`` stores a positive answer for
    ``clamp(ttl, min_ttl, max_ttl)`` seconds; ``put_negative`` stores NXDOMAIN/NODATA for
    ``negative_ttl``. ``get`` returns ``(values, expires_at)`` or None when absent or
    expired (values is ``()`` for a negative entry).
    """

    def __init__(self, min_ttl: float, max_ttl: float, negative_ttl: float,
                 clock: Callable[[], float] = time.monotonic):
        self.min_ttl = float(min_ttl)
        self.max_ttl = float(max_ttl)
        self.negative_ttl = float(negative_ttl)
        self.clock = clock
        self._entries: dict[tuple[str, str], _Entry] = {}
        # Expired entries go on the next ``get`` of their name; names nobody asks for any
        # more (SRV targets that left the zone) are pruned when the cache has grown to
        # twice its size after the last prune, so it stays bounded by the live names.
        self._prune_at = 64

    def _store(self, key: tuple[str, str], entry: _Entry) -> None:
        self._entries[key] = entry
        if len(self._entries) >= self._prune_at:
            now = self.clock()
            self._entries = {k: e for k, e in self._entries.items() if e.expires > now}
            self._prune_at = max(64, 2 * len(self._entries))

    def clamp(self, ttl: float) -> float:
        return min(self.max_ttl, max(self.min_ttl, float(ttl)))

    def put(self, name: str, rdtype: str, values: tuple, ttl: float) -> float:
        """Store a positive answer; returns its expiry time."""
        expires = self.clock() + self.clamp(ttl)
        self._store((name, rdtype), _Entry(tuple(values), expires, False))
        return expires

    def put_negative(self, name: str, rdtype: str) -> float:
        """Store NXDOMAIN/NODATA; returns its expiry time."""
        expires = self.clock() + self.negative_ttl
        self._store((name, rdtype), _Entry((), expires, True))
        return expires

    def get(self, name: str, rdtype: str) -> Optional[tuple[tuple, float]]:
        entry = self._entries.get((name, rdtype))
        if entry is None:
            return None
        if entry.expires <= self.clock():
            del self._entries[(name, rdtype)]
            return None
        return entry.values, entry.expires

    def is_negative(self, name: str, rdtype: str) -> bool:
        entry = self._entries.get((name, rdtype))
        return entry is not None and entry.negative and entry.expires > self.clock()

    def __len__(self) -> int:
        return len(self._entries)


def select_srv(records: list[SrvRecord], addresses: dict[str, tuple[str, ...]],
               ) -> tuple[DiscoveredEndpoint, ...]:
    """The endpoints of the lowest priority group that has targets (RFC 2782).

    ``addresses`` maps an SRV target to its resolved addresses. A target of "." (the
    service is decidedly not available) or without addresses contributes nothing; a group
    that contributes nothing is skipped in favour of the next priority.
    """
    for priority in sorted({r.priority for r in records}):
        out: list[DiscoveredEndpoint] = []
        for r in records:
            if r.priority != priority or r.target in ("", "."):
                continue
            for address in addresses.get(r.target, ()):
                out.append(DiscoveredEndpoint(
                    host=address, port=r.port, weight=max(1, r.weight),
                    meta={"target": r.target, "priority": r.priority, "srv_weight": r.weight}))
        if out:
            return tuple(out)
    return ()


class DnsProvider(Provider):
    """DNS service discovery (module docstring); one instance serves every DNS source."""

    kind = "dns"

    def __init__(self, name: str, settings: ServiceDiscoveryConfig,
                 sources: list[DiscoverySource], *, clock: Callable[[], float] = time.monotonic):
        super().__init__(name)
        self.options: DnsOptions = settings.dns
        self.sources = list(sources)
        self.clock = clock
        self.cache = DnsCache(self.options.min_ttl, self.options.max_ttl,
                              self.options.negative_ttl, clock)
        self.nameservers = [resolver_address(r) for r in self.options.resolvers]
        self._resolvers = []
        for host, port in self.nameservers:
            r = dns.asyncresolver.Resolver(configure=False)
            r.nameservers = [dns.nameserver.Do53Nameserver(host, port)]
            r.timeout = r.lifetime = float(self.options.timeout)
            r.retry_servfail = False
            r.cache = None  # ours clamps TTLs and caches negative answers
            self._resolvers.append(r)
        self.resolver_failures = [0] * len(self._resolvers)
        self._preferred = 0
        self.queries = 0
        self._failing: dict[str, str] = {}  # service -> last error

    # ------------------------------------------------------------------ queries
    async def _query(self, name: str, rdtype: str) -> tuple[tuple, float]:
        """``(values, expires_at)`` from the cache or the resolvers; ``()`` for NXDOMAIN /
        NODATA. Raises :class:`DnsError` when every resolver fails."""
        cached = self.cache.get(name, rdtype)
        if cached is not None:
            return cached
        qname = dns.name.from_text(name)
        problems = []
        # failover: start with the resolver that answered last, then the others in order
        n = len(self._resolvers)
        for i in [(self._preferred + k) % n for k in range(n)]:
            resolver = self._resolvers[i]
            self.queries += 1
            try:
                answer = await resolver.resolve(qname, rdtype, search=False)
            except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
                self._preferred = i
                return (), self.cache.put_negative(name, rdtype)
            except (dns.exception.Timeout, dns.resolver.NoNameservers, OSError,
                    dns.exception.DNSException) as exc:
                self.resolver_failures[i] += 1
                host, port = self.nameservers[i]
                problems.append(f"{host}:{port}: {type(exc).__name__}")
                continue
            self._preferred = i
            rrset = answer.rrset
            if rdtype == "SRV":
                values = tuple(SrvRecord(r.priority, r.weight, r.port,
                                         r.target.to_text(omit_final_dot=True) or ".")
                               for r in rrset)
            else:
                values = tuple(r.address for r in rrset)
            return values, self.cache.put(name, rdtype, values, rrset.ttl)
        raise DnsError("every resolver failed: " + "; ".join(problems))

    async def _addresses(self, name: str, families: tuple[str, ...]) -> tuple[tuple, float]:
        out: list[str] = []
        expires = float("inf")
        for rdtype in families:
            values, exp = await self._query(name, rdtype)
            out += values
            expires = min(expires, exp)
        return tuple(out), expires

    async def resolve(self, source: DiscoverySource) -> tuple[tuple[DiscoveredEndpoint, ...],
                                                              float]:
        """The endpoints of ``source`` and when to ask again (monotonic time).
        Raises :class:`DnsError` for a failed resolution."""
        name = source.service.rstrip(".") + "."
        if source.record in ("A", "AAAA"):
            addresses, expires = await self._addresses(name, (source.record,))
            return tuple(DiscoveredEndpoint(host=a, port=source.port) for a in addresses), \
                expires
        records, expires = await self._query(name, "SRV")
        targets = sorted({r.target for r in records if r.target not in ("", ".")})
        resolved: dict[str, tuple[str, ...]] = {}
        for target in targets:
            addresses, exp = await self._addresses(target.rstrip(".") + ".", ("A", "AAAA"))
            resolved[target] = addresses
            expires = min(expires, exp)
        return select_srv(list(records), resolved), expires

    # ------------------------------------------------------------------ Provider
    async def run(self, emit: Emit) -> None:
        await asyncio.gather(*(self._watch(s, emit) for s in self.sources))
        await asyncio.Event().wait()  # no sources: nothing to do until cancelled

    async def _watch(self, source: DiscoverySource, emit: Emit) -> None:
        backoff = Backoff(initial=0.5, maximum=MAX_RETRY_SECONDS)
        while True:
            try:
                endpoints, expires = await self.resolve(source)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # DnsError, or a malformed answer
                self._failing[source.service] = str(exc)
                self.health.failed(f"{source.service}: {exc}")
                log.warning("dns discovery of %s failed: %s", source.service, exc)
                await backoff.sleep()
                continue
            backoff.reset()
            self._failing.pop(source.service, None)
            if not self._failing:
                self.health.ok()
            revision = hashlib.sha256(
                ",".join(sorted(e.id for e in endpoints)).encode()).hexdigest()[:12]
            result = emit(EndpointSet(provider=self.name, service=source.service,
                                      endpoints=endpoints, revision=revision))
            if asyncio.iscoroutine(result):
                await result
            # re-query when the earliest TTL used expires (a floor guards a clock quirk)
            await asyncio.sleep(max(0.05, expires - self.clock()))

    def status(self) -> dict:
        return {**super().status(),
                "resolvers": [f"{h}:{p}" for h, p in self.nameservers],
                "resolver_failures": list(self.resolver_failures),
                "queries": self.queries, "cached": len(self.cache),
                "preferred_resolver": "%s:%d" % self.nameservers[self._preferred],
                "failing_services": dict(self._failing)}
