"""Which provider class serves which ``provider`` kind, and building them from the config.

Provider modules are imported lazily (by ``"module:Class"``), so a Dispa that uses no
discovery, or only DNS, never imports aiohttp or another provider's dependencies.

One provider instance serves a kind: it is built as ``Cls(name, settings, sources)`` with
the whole ``[service_discovery]`` table and every source that names the kind, and emits one
``EndpointSet`` per source ``service``. Its name is the kind (``"consul"``): that is the
``provider`` label of the metrics and the key of /admin/status.
"""

from __future__ import annotations

import importlib
import socket
from typing import Optional

from dispa.discovery.config import (
    DiscoverySource, ServiceDiscoveryConfig, source_kind,
)
from dispa.discovery.provider import Instance, Provider

__all__ = ["PROVIDERS", "build_provider", "cluster_sources", "provider_class", "self_instance",
           "sources_by_kind"]

#: ``provider`` kind -> ``"module:Class"``
PROVIDERS: dict[str, str] = {
    "consul": "dispa.discovery.consul:ConsulProvider",
    "etcd": "dispa.discovery.etcd:EtcdProvider",
    "kubernetes": "dispa.discovery.kubernetes:KubernetesProvider",
    "dns": "dispa.discovery.dns:DnsProvider",
}


def provider_class(kind: str) -> type[Provider]:
    """Import and return the provider class of ``kind``. Raises ``KeyError`` for an unknown
    kind, ``ImportError`` when its module (or a dependency of it) is missing."""
    module, _, cls = PROVIDERS[kind].partition(":")
    return getattr(importlib.import_module(module), cls)


def build_provider(kind: str, settings: ServiceDiscoveryConfig,
                   sources: list[DiscoverySource]) -> Provider:
    """One provider instance for ``kind`` watching ``sources``; named after the kind."""
    provider = provider_class(kind)(kind, settings, list(sources))
    if not getattr(provider, "kind", ""):
        provider.kind = kind
    return provider


def cluster_sources(config) -> dict[str, DiscoverySource]:
    """``{cluster name: source}`` of a validated ``config.model.Config`` (``[targets]`` is
    the cluster ``default``)."""
    out: dict[str, DiscoverySource] = {}
    if config.cluster.discovery is not None:
        out["default"] = config.cluster.discovery
    for group in config.target_groups:
        if group.discovery is not None:
            out[group.name] = group.discovery
    return out


def sources_by_kind(settings: Optional[ServiceDiscoveryConfig],
                    sources: dict[str, DiscoverySource]) -> dict[str, list[DiscoverySource]]:
    """Group sources by the kind that serves them; one entry per distinct service (two
    clusters on one service share the set, see ``check_discovery``)."""
    out: dict[str, list[DiscoverySource]] = {}
    for source in sources.values():
        kind = source_kind(source, settings)
        bucket = out.setdefault(kind, [])
        if all(s.service != source.service for s in bucket):
            bucket.append(source)
    return out


def self_instance(register, static) -> Instance:
    """The :class:`Instance` that ``[service_discovery.register]`` announces for this node:
    the proxy's first listener unless ``address``/``port`` say otherwise; a wildcard bind
    address announces this host's name."""
    listener = static.listeners[0]
    host = register.address or listener.host
    if host in ("", "0.0.0.0", "::"):
        host = socket.gethostname()
    port = register.port or listener.port
    instance_id = register.id or f"{register.service}-{socket.gethostname()}-{port}"
    return Instance(service=register.service, id=instance_id, host=host, port=port,
                    tags=tuple(register.tags), meta=dict(register.meta),
                    ttl_seconds=float(register.ttl))
