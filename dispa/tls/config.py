"""``[tls]``: TLS termination, SNI certificates, client certificates (mTLS) and upstream TLS.

The tables as the operator writes them (see docs/tls.md and docs/configuration.md). The
``[tls.acme]`` table lives in ``acme_config.py``. Cross-field rules are in ``check_tls``
(called by ``config.load``); the runtime form is built by ``compile_tls``.
"""

from __future__ import annotations

import os
from typing import Annotated, Literal, Optional

import msgspec
from msgspec import Meta

from dispa.tls.acme_config import AcmeConfig

Seconds = Annotated[float, Meta(gt=0, le=7 * 24 * 3600, description="seconds (> 0)")]
TlsVersion = Literal["1.2", "1.3"]


class _Table(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Base of these tables: frozen, unknown keys rejected (as config.model._Table)."""


class CertificateConfig(_Table):
    """One ``[[tls.certificates]]`` entry: a certificate chain and its private key (PEM)."""

    cert_file: Annotated[str, Meta(min_length=1)]
    key_file: Annotated[str, Meta(min_length=1)]
    # SNI names this certificate serves; empty: the DNS names of its subjectAltName
    names: list[str] = msgspec.field(default_factory=list)


class ClientAuthConfig(_Table):
    """``[tls.client_auth]`` (and per name in ``[[tls.sni]]``): client certificates."""

    mode: Literal["off", "optional", "required"] = "off"
    ca_file: str = ""  # PEM bundle of the CAs client certificates must chain to
    crl_file: str = ""  # PEM CRLs; when set, the leaf certificate is checked against them
    verify_depth: Annotated[int, Meta(ge=1, le=16)] = 4
    # OCSP check of the client's leaf after the handshake (tls/client_ocsp.py): "soft"
    # refuses revoked certificates only, "hard" accepts only a "good" answer
    client_ocsp: Literal["off", "soft", "hard"] = "off"
    client_ocsp_url: str = ""  # http:// responder used instead of the certificate's AIA
    client_ocsp_timeout: Annotated[float, Meta(gt=0, le=60, description="seconds")] = 3.0


class SniConfig(_Table):
    """One ``[[tls.sni]]`` entry: settings for some server names (exact or ``*.`` wildcard)."""

    names: Annotated[list[str], Meta(min_length=1)]
    # TLS 1.2 cipher string for these names ("" keeps [tls] ciphers).
    ciphers: str = ""
    # Versions allowed for these names ("" keeps [tls] min_version / max_version). OpenSSL
    # settles the version before the SNI callback runs, so a narrower range is enforced
    # right after the handshake: a connection outside it is closed and counted
    # (reason "version_not_allowed_for_name"), before any request is read.
    min_version: Literal["", "1.2", "1.3"] = ""
    max_version: Literal["", "1.2", "1.3"] = ""
    client_auth: ClientAuthConfig = ClientAuthConfig()


class UpstreamTlsConfig(_Table):
    """``[tls.upstream]``: how Dispa connects to ``https://`` targets."""

    verify: bool = True
    ca_file: str = ""  # pinned CA bundle; empty: the system trust store
    server_name: str = ""  # SNI and name to verify; empty: the target's host
    cert_file: str = ""  # client certificate presented to the upstream
    key_file: str = ""


class TlsConfig(_Table):
    """``[tls]``: a TLS listener in front of the same routes as ``[server]``."""

    enabled: bool = False
    bind_address: str = "0.0.0.0:8443"
    certificates: list[CertificateConfig] = msgspec.field(default_factory=list)
    # Directories of pairs: NAME.crt (or NAME.pem) with NAME.key, re-read on change.
    certificate_dirs: list[str] = msgspec.field(default_factory=list)
    default_certificate: str = ""  # a server name; its certificate answers unknown names
    strict_sni: bool = False  # refuse unknown names (alert unrecognized_name) instead
    min_version: TlsVersion = "1.2"
    max_version: TlsVersion = "1.3"
    ciphers: str = ""  # OpenSSL cipher string for TLS 1.2; "" keeps OpenSSL's default
    curves: list[str] = msgspec.field(default_factory=list)  # key-exchange groups, in order
    alpn: list[Literal["h2", "http/1.1"]] = msgspec.field(
        default_factory=lambda: ["http/1.1"])
    handshake_timeout: Seconds = 10.0
    session_tickets: bool = True
    ticket_key_rotation: Seconds = 3600.0
    reload_interval: Seconds = 2.0  # how often certificate files are checked for changes
    expiry_warning_days: Annotated[int, Meta(ge=0, le=3650)] = 14
    # Fetch OCSP responses from each certificate's responder (AIA) and staple them; a
    # <cert_file>.ocsp file next to a certificate is stapled whatever this says.
    ocsp_stapling: bool = False
    client_auth: ClientAuthConfig = ClientAuthConfig()
    # client_ocsp answers kept per worker (each until the response's next_update)
    client_ocsp_cache_size: Annotated[int, Meta(ge=1, le=1_000_000)] = 4096
    # Upstream header carrying the verified client certificate's fingerprint, subject and
    # SANs; always removed from what a client sent (on every listener). "" turns it off.
    client_cert_header: str = "x-client-cert"
    sni: list[SniConfig] = msgspec.field(default_factory=list)
    upstream: UpstreamTlsConfig = UpstreamTlsConfig()
    acme: AcmeConfig = AcmeConfig()
    # kubernetes.io/tls Secrets ("namespace/name" or "name") served like certificate files,
    # watched through [service_discovery.kubernetes] (docs/discovery-kubernetes.md)
    kubernetes_secrets: list[str] = msgspec.field(default_factory=list)


# ---------------------------------------------------------------- checks (config.load)

def _readable(path: str) -> str | None:
    if not os.path.isfile(path):
        return f"{path!r} does not exist or is not a file"
    if not os.access(path, os.R_OK):
        return f"{path!r} is not readable"
    return None


def _pem_bundle(path: str, what: str) -> str | None:
    """Why OpenSSL would refuse ``path`` as a CA bundle or CRL file (None: it loads);
    found here rather than in a worker that would refuse the snapshot."""
    problem = _readable(path)
    if problem:
        return problem
    import ssl
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=path)
    except (ssl.SSLError, OSError, ValueError) as exc:
        return f"{path!r} holds no usable PEM {what} ({getattr(exc, 'reason', None) or exc})"
    return None


def check_tls(tls: TlsConfig, issue, http_address) -> None:
    """Cross-field rules of ``[tls]``; ``issue(message, path)`` reports one problem.
    ``http_address`` is the parsed ``[server] bind_address`` (or None)."""
    from dispa.config.load import parse_host_port, normalize_hostname
    from dispa.tls.certs import CertError, load_pair

    where = ("tls",)
    if tls.min_version > tls.max_version:
        issue(f"min_version {tls.min_version} is above max_version {tls.max_version}",
              where + ("min_version",))
    for n, sni in enumerate(tls.sni):
        lo, hi = sni.min_version or tls.min_version, sni.max_version or tls.max_version
        if lo > hi:
            issue(f"min_version {lo} is above max_version {hi}", where + ("sni", n, "min_version"))
        elif lo < tls.min_version or hi > tls.max_version:
            issue(f"versions {lo}..{hi} reach outside the listener's "
                  f"{tls.min_version}..{tls.max_version}: a name can only narrow them",
                  where + ("sni", n, "min_version" if lo < tls.min_version else "max_version"))
    address = parse_host_port(tls.bind_address)
    if isinstance(address, str):
        issue(f"bind_address {tls.bind_address!r}: {address}", where + ("bind_address",))
    elif tls.enabled and http_address is not None and address[1] == http_address[1] \
            and address[1] != 0:
        issue(f"bind_address {tls.bind_address!r} uses the port of server.bind_address",
              where + ("bind_address",))
    for path, ciphers in [(where + ("ciphers",), tls.ciphers)] + [
            (where + ("sni", n, "ciphers"), s.ciphers) for n, s in enumerate(tls.sni)]:
        if ciphers:
            import ssl
            try:
                ssl.create_default_context().set_ciphers(ciphers)
            except ssl.SSLError:
                issue(f"ciphers {ciphers!r} selects no cipher OpenSSL knows", path)
    if tls.curves:
        from dispa.tls.context import check_groups
        bad = check_groups(tls.curves)
        if bad:
            issue(bad, where + ("curves",))
    for n, cert in enumerate(tls.certificates):
        path = where + ("certificates", n)
        problem = _readable(cert.cert_file) or _readable(cert.key_file)
        if problem:
            issue(problem, path + ("cert_file",))
            continue
        try:
            load_pair(cert.cert_file, cert.key_file)
        except CertError as exc:
            issue(str(exc), path + ("cert_file",))
        for i, name in enumerate(cert.names):
            if _sni_name(name, normalize_hostname) is None:
                issue(f"{name!r} is not a host name or \"*.\" wildcard", path + ("names", i))
    for n, d in enumerate(tls.certificate_dirs):
        if not os.path.isdir(d):
            issue(f"{d!r} is not a directory", where + ("certificate_dirs", n))
    from dispa.discovery.config import object_ref_ok
    for n, ref in enumerate(tls.kubernetes_secrets):
        if not object_ref_ok(ref):
            issue(f"secret {ref!r}: expected \"name\" or \"namespace/name\"",
                  where + ("kubernetes_secrets", n))
    if tls.enabled and not tls.certificates and not tls.certificate_dirs \
            and not tls.acme.enabled and not tls.kubernetes_secrets:
        issue("TLS is enabled but no certificate is configured: add [[tls.certificates]], "
              "certificate_dirs, kubernetes_secrets or [tls.acme]", where + ("enabled",))
    auths = [(where + ("client_auth",), tls.client_auth)]
    for n, sni in enumerate(tls.sni):
        for i, name in enumerate(sni.names):
            if _sni_name(name, normalize_hostname) is None:
                issue(f"{name!r} is not a host name or \"*.\" wildcard",
                      where + ("sni", n, "names", i))
        auths.append((where + ("sni", n, "client_auth"), sni.client_auth))
    for path, auth in auths:
        if auth.mode != "off" and not auth.ca_file:
            issue(f"client_auth mode {auth.mode!r} needs ca_file", path + ("ca_file",))
        _check_client_ocsp(auth, path, issue)
        for key, what in (("ca_file", "CA certificate"), ("crl_file", "CRL")):
            value = getattr(auth, key)
            if value:
                problem = _pem_bundle(value, what)
                if problem:
                    issue(problem, path + (key,))
    if tls.client_cert_header and not _token(tls.client_cert_header):
        issue(f"{tls.client_cert_header!r} is not a valid header name",
              where + ("client_cert_header",))
    check_upstream(tls.upstream, where + ("upstream",), issue)


def _check_client_ocsp(auth: ClientAuthConfig, path: tuple, issue) -> None:
    if auth.client_ocsp != "off" and auth.mode == "off":
        issue(f"client_ocsp {auth.client_ocsp!r} checks client certificates: it needs "
              "client_auth mode \"optional\" or \"required\"", path + ("client_ocsp",))
    if auth.client_ocsp_url:
        from dispa.tls.client_ocsp import parse_http_url
        parsed = parse_http_url(auth.client_ocsp_url)
        if isinstance(parsed, str):
            issue(parsed, path + ("client_ocsp_url",))


def check_upstream(up: UpstreamTlsConfig, where: tuple, issue) -> None:
    """``[tls.upstream]`` and a cluster's ``tls`` table: files readable, pairs complete."""
    if bool(up.cert_file) != bool(up.key_file):
        issue("cert_file and key_file go together", where + ("cert_file",))
    for key in ("ca_file", "cert_file", "key_file"):
        value = getattr(up, key)
        if value:
            problem = _pem_bundle(value, "CA certificate") if key == "ca_file" \
                else _readable(value)
            if problem:
                issue(problem, where + (key,))
    if up.cert_file and up.key_file and not (_readable(up.cert_file) or
                                             _readable(up.key_file)):
        from dispa.tls.certs import CertError, load_pair
        try:
            load_pair(up.cert_file, up.key_file)
        except CertError as exc:
            issue(str(exc), where + ("cert_file",))


def check_cluster_tls(clusters: list[tuple[tuple, object]], issue) -> None:
    """``[targets.tls]`` / ``[target_groups.tls]``: each table checked, and an https://
    endpoint listed by two clusters must get the same TLS settings from both (an endpoint
    has one connection pool per worker, whichever cluster sends to it)."""
    from dispa.config.load import endpoint_id, is_https_url, parse_upstream_url
    seen: dict[str, tuple] = {}
    for path, cluster in clusters:
        tls = getattr(cluster, "tls", None)
        if tls is not None:
            check_upstream(tls, path + ("tls",), issue)
        for e in cluster.endpoints:
            if not is_https_url(e.url):
                continue
            parsed = parse_upstream_url(e.url)
            if isinstance(parsed, str):
                continue  # reported with the endpoint
            eid = endpoint_id(*parsed)
            if eid in seen and seen[eid][1] != tls:
                other = ".".join(str(p) for p in seen[eid][0])
                issue(f"https endpoint {eid} is also in {other} with other TLS settings; "
                      "give both the same tls table", path + ("tls",))
            seen.setdefault(eid, (path, tls))


def _token(value: str) -> bool:
    import re
    return re.fullmatch(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+", value) is not None


def _sni_name(name: str, normalize) -> str | None:
    if name.startswith("*."):
        rest = normalize(name[2:])
        return None if rest is None else "*." + rest
    return normalize(name)


# ---------------------------------------------------------------- compile (config.compile)

def _upstream_settings(up: UpstreamTlsConfig) -> dict:
    return {"verify": up.verify, "ca_file": up.ca_file, "server_name": up.server_name,
            "cert_file": up.cert_file, "key_file": up.key_file}


def compile_tls(tls: TlsConfig, https_endpoints: list[str],
                per_endpoint: dict[str, UpstreamTlsConfig] | None = None) -> Optional[dict]:
    """The plain-data settings the master's certificate store completes with certificates
    (``Snapshot.tls``); None when there is neither a TLS listener nor an https target.
    ``per_endpoint``: endpoints whose cluster has its own ``tls`` table."""
    if not tls.enabled and not https_endpoints:
        return None
    from dispa.config.load import normalize_hostname

    def auth(a: ClientAuthConfig) -> dict:
        out = {"mode": a.mode, "ca_file": a.ca_file, "crl_file": a.crl_file,
               "verify_depth": a.verify_depth}
        if a.client_ocsp != "off":  # absent when off: contexts and snapshots unchanged
            out.update(client_ocsp=a.client_ocsp, client_ocsp_url=a.client_ocsp_url,
                       client_ocsp_timeout=float(a.client_ocsp_timeout))
        return out

    out: dict = {
        "enabled": tls.enabled,
        "settings": {
            "min_version": tls.min_version, "max_version": tls.max_version,
            "ciphers": tls.ciphers, "curves": list(tls.curves),
            "alpn": list(tls.alpn), "handshake_timeout": float(tls.handshake_timeout),
            "session_tickets": tls.session_tickets, "strict_sni": tls.strict_sni,
            "client_ocsp_cache_size": tls.client_ocsp_cache_size,
            "default_certificate": (normalize_hostname(tls.default_certificate) or "")
            if tls.default_certificate else "",
        },
        "client_auth": auth(tls.client_auth),
        "client_cert_header": tls.client_cert_header.lower() if tls.enabled else "",
        "sni": [{"names": [_sni_name(n, normalize_hostname) for n in s.names],
                 "ciphers": s.ciphers, "client_auth": auth(s.client_auth),
                 "versions": [s.min_version or tls.min_version, s.max_version or tls.max_version]
                 if (s.min_version or s.max_version) else None}
                for s in tls.sni],
        "upstream": {"endpoints": sorted(https_endpoints), **_upstream_settings(tls.upstream)},
    }
    if per_endpoint:
        out["upstream"]["per_endpoint"] = {
            eid: _upstream_settings(up) for eid, up in sorted(per_endpoint.items())}
    return out
