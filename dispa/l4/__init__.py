"""L4 proxying: TCP and UDP listeners to target groups, PROXY protocol v1/v2 (docs/l4.md).

``manager.L4Manager`` (one per worker) binds ``Snapshot.l4``'s listeners; ``tcp`` and
``udp`` move the bytes; ``proxy_protocol`` builds and parses PROXY headers (sans-I/O).
"""
