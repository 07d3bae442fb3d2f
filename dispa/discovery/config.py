"""The ``[service_discovery]`` table and the per-cluster ``[targets.discovery]`` /
``[target_groups.discovery]`` sources.

Theory of operation
-------------------
``[service_discovery]`` holds the original Dispa keys (``provider``, ``consul_address``,
``refresh_interval``, ``health_check_integration``) plus the options of each provider kind
(``[service_discovery.consul]``, ``.etcd``, ``.kubernetes``, ``.dns``) and optional
self-registration (``[service_discovery.register]``). A cluster opts in with a
``discovery`` table naming a *source*: a provider kind (default: the table's ``provider``)
and the provider's own service name, plus filters.

``dispa.discovery.registry`` builds one provider instance per kind in use, passing it this
whole table and every source that names that kind: ``Cls(name, settings, sources)``.

Rules:

1. Every Struct is frozen and rejects unknown keys (own ``_Table`` base, restated here
   because ``config.model`` imports this module; see ``config/routing_model.py``).
2. Per-value constraints live in ``Meta``; cross-field rules (``A``/``AAAA`` need a port,
   two clusters asking for one service with different filters, ...) live in
   :func:`check_discovery`, which ``config.load`` calls with its issue reporter.

WARNING: a new key needs a row in docs/configuration.md (tests/unit/config/test_docs.py).
"""

from __future__ import annotations

import re
from typing import Annotated, Callable, Literal, Optional

import msgspec
from msgspec import Meta

__all__ = [
    "PROVIDER_KINDS", "ConsulOptions", "DiscoverySource", "DnsOptions", "EtcdOptions",
    "KubernetesOptions", "RegisterConfig", "ServiceDiscoveryConfig", "check_discovery",
    "object_ref_ok", "source_kind", "split_object_ref",
]


class _Table(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Base of every table: frozen, unknown keys rejected (as ``config.model._Table``)."""


MAX_SECONDS = 7 * 24 * 3600
Seconds = Annotated[float, Meta(gt=0, le=MAX_SECONDS, description="seconds (> 0)")]
NonNegativeSeconds = Annotated[float, Meta(ge=0, le=MAX_SECONDS,
                                           description="seconds (>= 0)")]
Port = Annotated[int, Meta(ge=0, le=65535)]
ProviderKind = Literal["consul", "etcd", "kubernetes", "dns"]
PROVIDER_KINDS: tuple[str, ...] = ("consul", "etcd", "kubernetes", "dns")
#: Kinds without self-registration (a DNS zone or the Kubernetes API is not written by Dispa).
UNREGISTRABLE: tuple[str, ...] = ("kubernetes", "dns")


# ---------------------------------------------------------------- provider options

class ConsulOptions(_Table):
    """``[service_discovery.consul]`` (the agent address is ``consul_address``)."""

    token: str = ""  # ACL token (X-Consul-Token)
    datacenter: str = ""  # default datacenter of the queries ("" = the agent's)
    kv_prefix: str = ""  # dynamic configuration from this KV prefix ("" = off)
    ca_file: str = ""  # CA bundle for an https:// consul_address
    # self-registration: DeregisterCriticalServiceAfter of the TTL check (Consul: >= 1 min)
    deregister_critical_after: Seconds = 60.0


class EtcdOptions(_Table):
    """``[service_discovery.etcd]``: the etcd v3 cluster."""

    endpoints: list[str] = msgspec.field(
        default_factory=lambda: ["http://127.0.0.1:2379"])
    username: str = ""
    password: str = ""
    ca_file: str = ""
    cert_file: str = ""  # client certificate (mutual TLS)
    key_file: str = ""
    dial_timeout: Seconds = 5.0


class KubernetesOptions(_Table):
    """``[service_discovery.kubernetes]``: how to reach the API server."""

    api_server: str = ""  # "" = from kubeconfig, or in-cluster
    kubeconfig: str = ""
    in_cluster: bool = False  # service-account token + KUBERNETES_SERVICE_HOST/PORT
    token_file: str = ""
    ca_file: str = ""
    namespace: str = "default"  # for a source service without "namespace/"
    # dynamic configuration: ConfigMaps ("namespace/name" or "name") whose keys ending in
    # .toml/.json are fragments (docs/discovery.md, config/merge.py)
    config_maps: list[str] = msgspec.field(default_factory=list)


class DnsOptions(_Table):
    """``[service_discovery.dns]``: resolvers and the cache's TTL clamps."""

    resolvers: list[str] = msgspec.field(default_factory=lambda: ["127.0.0.1:53"])
    timeout: Seconds = 2.0  # per query and resolver
    min_ttl: NonNegativeSeconds = 1.0
    max_ttl: Seconds = 300.0
    negative_ttl: NonNegativeSeconds = 5.0  # NXDOMAIN / NODATA


class RegisterConfig(_Table):
    """``[service_discovery.register]``: announce this Dispa node (self-registration)."""

    service: Annotated[str, Meta(min_length=1)] = "dispa"
    id: str = ""  # "" = "<service>-<hostname>-<port>"
    address: str = ""  # "" = the proxy's bind address, or this host's name if wildcard
    port: Port = 0  # 0 = the proxy's port
    tags: list[str] = msgspec.field(default_factory=list)
    meta: dict[str, str] = msgspec.field(default_factory=dict)
    ttl: Seconds = 15.0  # health-check TTL / lease length
    provider: Literal["", "consul", "etcd", "kubernetes", "dns"] = ""  # "" = the default


class ServiceDiscoveryConfig(_Table):
    """``[service_discovery]``: the providers' settings, shared by every source."""

    provider: ProviderKind = "consul"  # default provider of the sources
    consul_address: str = "http://127.0.0.1:8500"
    refresh_interval: Seconds = 30.0  # poll period / blocking-query wait
    health_check_integration: bool = True  # passing-only (Consul), ready-only (Kubernetes)
    throttle: NonNegativeSeconds = 1.0  # at most one snapshot publish per window
    register: Optional[RegisterConfig] = None
    consul: ConsulOptions = ConsulOptions()
    etcd: EtcdOptions = msgspec.field(default_factory=EtcdOptions)
    kubernetes: KubernetesOptions = KubernetesOptions()
    dns: DnsOptions = msgspec.field(default_factory=DnsOptions)


# ---------------------------------------------------------------- per-cluster source

class DiscoverySource(_Table, kw_only=True):
    """``[targets.discovery]`` / ``[target_groups.discovery]``: where a cluster's endpoints
    come from. The provider-specific keys are ignored by the other providers."""

    provider: Literal["", "consul", "etcd", "kubernetes", "dns"] = ""  # "" = the default
    # Consul service / etcd key prefix / Kubernetes "namespace/name" / DNS name
    service: Annotated[str, Meta(min_length=1)]
    # Consul
    tags: list[str] = msgspec.field(default_factory=list)
    meta: dict[str, str] = msgspec.field(default_factory=dict)
    passing_only: bool = True
    datacenter: str = ""
    # Kubernetes
    label_selector: str = ""
    port_name: str = ""
    # DNS
    record: Literal["SRV", "A", "AAAA"] = "SRV"
    port: Port = 0  # the port of A/AAAA answers
    # All providers
    keep_static: bool = False  # serve the static targets too, merged with discovered ones
    timeout: Seconds = 30.0  # upstream exchange timeout of a discovered endpoint


def source_kind(source: DiscoverySource, settings: Optional[ServiceDiscoveryConfig]) -> str:
    """The provider kind that serves ``source``."""
    if source.provider:
        return source.provider
    return (settings or ServiceDiscoveryConfig()).provider


def check_discovery(settings: Optional[ServiceDiscoveryConfig],
                    sources: list[tuple[tuple, DiscoverySource]],
                    issue: Callable[..., None]) -> None:
    """Cross-field rules. ``sources`` are ``(path of the discovery table, source)``;
    ``issue(message, path)`` records a problem at a field path (file spelling)."""
    seen: dict[tuple[str, str], tuple[tuple, DiscoverySource]] = {}
    for where, source in sources:
        kind = source_kind(source, settings)
        if kind == "dns" and source.record in ("A", "AAAA") and not source.port:
            issue(f"record {source.record!r} needs a port (SRV answers carry their own)",
                  where + ("port",))
        if kind == "kubernetes" and source.service.count("/") > 1:
            issue(f"service {source.service!r}: expected \"name\" or \"namespace/name\"",
                  where + ("service",))
        key = (kind, source.service)
        other = seen.get(key)
        if other is None:
            seen[key] = (where, source)
            continue
        # One provider emits one set per service: two clusters may share it, but only
        # with the same filters (else one of them would get the other's endpoints).
        a = msgspec.structs.replace(other[1], keep_static=False, timeout=30.0)
        b = msgspec.structs.replace(source, keep_static=False, timeout=30.0)
        if a != b:
            issue(f"{kind} service {source.service!r} is also discovered by "
                  f"{_fmt(other[0])} with other filters; one service, one set of filters",
                  where + ("service",))
    if settings is None:
        return
    sd = ("service_discovery",)
    if settings.dns.min_ttl > settings.dns.max_ttl:
        issue(f"min_ttl ({settings.dns.min_ttl:g}) is larger than max_ttl "
              f"({settings.dns.max_ttl:g})", sd + ("dns", "min_ttl"))
    for n, resolver in enumerate(settings.dns.resolvers):
        if _resolver_address(resolver) is None:
            issue(f"resolver {resolver!r}: expected \"ip\", \"ip:port\" or \"[ipv6]:port\"",
                  sd + ("dns", "resolvers", n))
    for n, ref in enumerate(settings.kubernetes.config_maps):
        if not object_ref_ok(ref):
            issue(f"config map {ref!r}: expected \"name\" or \"namespace/name\"",
                  sd + ("kubernetes", "config_maps", n))
    if not settings.etcd.endpoints:
        issue("at least one etcd endpoint is required", sd + ("etcd", "endpoints"))
    for n, url in enumerate(settings.etcd.endpoints):
        if not url.startswith(("http://", "https://")):
            issue(f"endpoint {url!r}: expected \"http://host:port\" or \"https://host:port\"",
                  sd + ("etcd", "endpoints", n))
    if not settings.consul_address.startswith(("http://", "https://")):
        issue(f"consul_address {settings.consul_address!r}: expected \"http://host:port\"",
              sd + ("consul_address",))
    if bool(settings.etcd.cert_file) != bool(settings.etcd.key_file):
        issue("cert_file and key_file go together", sd + ("etcd", "cert_file"))
    register = settings.register
    if register is not None and (register.provider or settings.provider) in UNREGISTRABLE:
        kind = register.provider or settings.provider
        # refused here rather than logged at run time: the operator asked to be announced
        issue(f"the {kind} provider cannot register this node (consul and etcd can)",
              sd + ("register", "provider") if register.provider else sd + ("provider",))


_OBJECT_NAME = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?")


def object_ref_ok(ref: str) -> bool:
    """``"name"`` or ``"namespace/name"`` with Kubernetes object names (RFC 1123 subdomain)."""
    parts = ref.split("/")
    return 1 <= len(parts) <= 2 and all(_OBJECT_NAME.fullmatch(p) for p in parts)


def split_object_ref(ref: str, default_namespace: str) -> tuple[str, str]:
    """``(namespace, name)`` of a validated :func:`object_ref_ok` reference."""
    ns, _, name = ref.rpartition("/")
    return ns or default_namespace, name


def _resolver_address(text: str) -> Optional[tuple[str, int]]:
    """``"ip"`` / ``"ip:port"`` / ``"[v6]:port"`` / ``"v6"`` -> (ip, port), else None."""
    import ipaddress

    text = text.strip()
    host, port = text, 53
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep:
            return None
        if rest:
            if not rest.startswith(":") or not rest[1:].isdigit():
                return None
            port = int(rest[1:])
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
        if not port_text.isdigit():
            return None
        port = int(port_text)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return None
    return (host, port) if 0 < port <= 65535 else None


def resolver_address(text: str) -> tuple[str, int]:
    """The (ip, port) of a validated ``[service_discovery.dns] resolvers`` entry."""
    found = _resolver_address(text)
    if found is None:
        raise ValueError(f"bad resolver address {text!r}")
    return found


def _fmt(path: tuple) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out
