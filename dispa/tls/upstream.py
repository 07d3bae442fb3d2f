"""Upstream TLS: the client context a pool uses for an ``https://`` target.

The settings are ``[tls.upstream]``, or the ``tls`` table of the endpoint's cluster
(``[targets.tls]``, ``[target_groups.tls]``; config checks make sure an endpoint listed by
two clusters gets the same from both, as it has one pool). Verification is on by default
(system trust store, or the pinned ``ca_file``); the name
sent in SNI and checked against the certificate is ``server_name`` or the target's host;
an optional client certificate is presented. Contexts are cached per settings (and file
state, so a replaced CA or client certificate is picked up at the next snapshot).
"""

from __future__ import annotations

import ssl

from dispa.tls.certs import file_state

_contexts: dict[tuple, ssl.SSLContext] = {}


class UpstreamTls:
    """What ``Pool.connect`` passes to ``loop.create_connection``."""

    __slots__ = ("context", "server_name")

    def __init__(self, context: ssl.SSLContext, server_name: str | None):
        self.context = context
        self.server_name = server_name


def client_context(spec: dict) -> ssl.SSLContext:
    files = [spec.get(k) or "" for k in ("ca_file", "cert_file", "key_file")]
    key = (bool(spec.get("verify", True)), *files, file_state(*[f for f in files if f]))
    ctx = _contexts.get(key)
    if ctx is None:
        ctx = ssl.create_default_context(cafile=files[0] or None)
        if not spec.get("verify", True):
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        if files[1]:
            ctx.load_cert_chain(files[1], files[2] or None)
        ctx.set_alpn_protocols(["http/1.1"])
        if len(_contexts) > 64:
            _contexts.clear()
        _contexts[key] = ctx
    return ctx


def upstream_tls(tls: dict | None, endpoint_id: str, host: str) -> UpstreamTls | None:
    """The pool's TLS settings for one endpoint, or None for a plain http:// endpoint."""
    up = (tls or {}).get("upstream")
    if not up or endpoint_id not in up.get("endpoints", ()):
        return None
    # the endpoint's cluster has its own [targets.tls] / [target_groups.tls]
    up = (up.get("per_endpoint") or {}).get(endpoint_id) or up
    return UpstreamTls(client_context(up), up.get("server_name") or host)


def set_pool_tls(pool, tls: UpstreamTls | None) -> None:
    """Give ``pool`` its TLS settings; when they changed (a reload), idle connections made
    with the old ones are closed so that no request goes out under settings that no
    longer apply."""
    old = pool.tls
    if old is None and tls is None:
        return
    if old is not None and tls is not None and old.context is tls.context \
            and old.server_name == tls.server_name:
        return
    pool.tls = tls
    for conn in list(pool.idle):
        conn.close()
