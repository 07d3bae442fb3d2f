"""The discovery provider interface (STYLE C7, step 1).

A provider talks to one registry (Consul, etcd, Kubernetes, DNS) in the master and emits
*endpoint sets*: for each service it watches, the complete list of live endpoints it knows.
It knows nothing about snapshots, workers or other providers; the watcher
(``dispa.discovery.watcher``) dedupes, throttles, merges provider output with the static
targets and publishes a new snapshot.

Contract
--------
* ``run(emit)`` runs until cancelled. It calls ``emit(update)`` with a complete
  :class:`EndpointSet` per service whenever the registry's answer changes (emitting an
  unchanged set is allowed; the watcher drops duplicates). It never raises for a registry
  error: it records the error in :attr:`health` (``ProviderHealth``), keeps the last set it
  emitted in force (it simply does not emit), and retries with exponential backoff
  (:class:`Backoff`). ``asyncio.CancelledError`` ends it.
* ``register(instance)`` / ``deregister()`` are optional self-registration (Consul TTL check,
  etcd lease, ...); the default raises ``NotImplementedError``.
* ``close()`` releases sessions and sockets.

A service name is the provider's own (Consul service, etcd key prefix, Kubernetes
``namespace/service``, DNS name). The target group that consumes it is configured by the
operator (``[target_groups.discovery]``), not by the provider.
"""

from __future__ import annotations

import asyncio
import random
import time
from typing import Awaitable, Callable, Optional, Union

import msgspec

__all__ = ["Backoff", "DiscoveredEndpoint", "EndpointSet", "Instance", "Provider",
           "ProviderHealth", "Emit"]


class DiscoveredEndpoint(msgspec.Struct, frozen=True):
    """One live instance of a service as a registry reports it."""

    host: str  # an IP address or a name; IPv6 without brackets
    port: int
    weight: int = 1
    # Free-form registry data (tags, zone, node, ...), kept for status pages and filters.
    meta: dict = msgspec.field(default_factory=dict)

    @property
    def id(self) -> str:
        """``host:port``: the same id a static endpoint gets (``snapshot.EndpointSpec.id``)."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


class EndpointSet(msgspec.Struct, frozen=True):
    """The complete set of endpoints of one service, as of ``revision``."""

    provider: str  # the provider instance's name (``Provider.name``)
    service: str
    endpoints: tuple[DiscoveredEndpoint, ...]
    revision: str = ""  # registry index / resourceVersion / serial, for status and logs


class Instance(msgspec.Struct, frozen=True):
    """What self-registration announces: this Dispa node."""

    service: str  # name to register under
    id: str  # unique per node, e.g. "dispa-<hostname>-<port>"
    host: str
    port: int
    tags: tuple[str, ...] = ()
    meta: dict = msgspec.field(default_factory=dict)
    ttl_seconds: float = 15.0  # health TTL / lease length


class ProviderHealth:
    """A provider's own health, shown in /admin/status and as metrics.

    ``state`` is ``"starting"`` until the first answer or the first error, ``"ok"`` while
    the registry answers, and ``"stale"`` after an error until it answers again: what is in
    force is not confirmed by the registry (the last known good endpoints, or the static
    targets when it never answered: ``last_success`` is then None). A registry that never
    answers is ``stale`` from its first failed attempt, not ``starting`` forever: an operator
    watching the state must see the outage (docs/discovery.md). ``last_success`` is a
    wall-clock time (``time.time()``) or None.
    """

    __slots__ = ("state", "last_success", "last_error", "errors", "reconnects")

    def __init__(self) -> None:
        self.state = "starting"
        self.last_success: Optional[float] = None
        self.last_error: Optional[str] = None
        self.errors = 0
        self.reconnects = 0

    def ok(self) -> None:
        self.state = "ok"
        self.last_success = time.time()
        self.last_error = None

    def failed(self, error: str) -> None:
        self.errors += 1
        self.last_error = error
        self.state = "stale"

    def staleness_seconds(self) -> float:
        """Seconds since the last successful answer (0 while healthy, inf if never)."""
        if self.state == "ok":
            return 0.0
        if self.last_success is None:
            return float("inf")
        return max(0.0, time.time() - self.last_success)

    def as_dict(self) -> dict:
        s = self.staleness_seconds()
        return {"state": self.state, "last_success": self.last_success,
                "last_error": self.last_error, "errors": self.errors,
                "reconnects": self.reconnects,
                "staleness_seconds": None if s == float("inf") else round(s, 3)}


class Backoff:
    """Exponential backoff with full jitter (AWS architecture blog), reset on success."""

    def __init__(self, initial: float = 0.5, maximum: float = 30.0, factor: float = 2.0):
        self.initial = initial
        self.maximum = maximum
        self.factor = factor
        self._next = initial

    def reset(self) -> None:
        self._next = self.initial

    def next_delay(self) -> float:
        delay = random.uniform(self.initial / 2, self._next)
        self._next = min(self.maximum, self._next * self.factor)
        return delay

    async def sleep(self) -> None:
        await asyncio.sleep(self.next_delay())


Emit = Callable[[EndpointSet], Union[None, Awaitable[None]]]


class Provider:
    """Base class of the discovery providers; see the module docstring for the contract."""

    #: registry key used in config (``provider = "consul"``)
    kind: str = ""

    def __init__(self, name: str):
        self.name = name
        self.health = ProviderHealth()

    async def run(self, emit: Emit) -> None:
        """Watch the registry and emit endpoint sets until cancelled."""
        raise NotImplementedError

    async def register(self, instance: Instance) -> None:
        """Announce this node (optional)."""
        raise NotImplementedError(f"{self.kind or type(self).__name__} has no self-registration")

    async def deregister(self) -> None:
        """Withdraw what ``register`` announced (optional; called on graceful shutdown)."""
        raise NotImplementedError(f"{self.kind or type(self).__name__} has no self-registration")

    async def close(self) -> None:
        """Release connections. Idempotent."""

    def status(self) -> dict:
        """For /admin/status: kind, health and provider-specific details."""
        return {"kind": self.kind, **self.health.as_dict()}
