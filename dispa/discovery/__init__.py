"""Service discovery: endpoints of clusters from Consul, etcd, Kubernetes or DNS.

``provider`` (the interface every provider implements), ``config`` (the
``[service_discovery]`` and ``[*.discovery]`` tables), ``registry`` (kind -> provider class,
imported lazily), ``watcher`` (dedupe, throttle, merge into snapshots; run by the master),
and one module per provider (``consul``, ``etcd``, ``kubernetes``, ``dns``).
docs/discovery.md describes the whole feature.

Nothing is imported here: ``config.model`` imports ``discovery.config`` and must not pull in
the providers' dependencies.
"""
