"""``[tls.acme]``: automatic certificates (RFC 8555). The original keys are ``enabled``,
``directory_url``, ``email`` and ``challenge_type``; see docs/tls-acme.md for the rest.

The tables here are plain data checked by msgspec; cross-field rules (a name is required
when ACME is on, the DNS-01 provider needs its settings, ...) are in :func:`check`, which
``config.load`` calls so that errors carry the file, line and key.
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import Annotated, Callable, Literal

import msgspec


class _Table(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Base of these tables: frozen, unknown keys rejected (as config.model._Table)."""


class AcmeCertificate(_Table):
    """``[[tls.acme.certificates]]``: one certificate for several names (SANs).

    ``name`` is the directory under ``<storage_dir>/certs/`` (default: the first name)."""

    name: str = ""
    names: list[str] = []


class Rfc2136Config(_Table):
    """``[tls.acme.dns01.rfc2136]``: dynamic updates (RFC 2136) signed with TSIG (RFC 8945)."""

    server: str = "127.0.0.1"
    port: Annotated[int, msgspec.Meta(ge=1, le=65535)] = 53
    tsig_key_name: str = ""
    tsig_secret: str = ""  # base64, as in a BIND key file
    tsig_algorithm: Literal["hmac-sha256", "hmac-sha384", "hmac-sha512", "hmac-sha224",
                            "hmac-sha1", "hmac-md5"] = "hmac-sha256"
    zone: str = ""  # empty: the closest enclosing zone, found by asking the server for SOA
    ttl: Annotated[int, msgspec.Meta(ge=0)] = 60
    timeout: Annotated[float, msgspec.Meta(gt=0)] = 10.0


class Dns01Config(_Table):
    """``[tls.acme.dns01]``: how the ``_acme-challenge`` TXT record is published."""

    provider: Literal["rfc2136", "exec", "webhook"] = "rfc2136"
    rfc2136: Rfc2136Config = Rfc2136Config()
    # exec: argv; Dispa appends ``present|cleanup <fqdn> <value>`` (lego's exec convention)
    exec_command: list[str] = []
    exec_timeout: Annotated[float, msgspec.Meta(gt=0)] = 60.0
    # webhook: POST {"action": "present"|"cleanup", "domain", "fqdn", "value"} as JSON
    webhook_url: str = ""
    webhook_headers: dict[str, str] = {}
    webhook_timeout: Annotated[float, msgspec.Meta(gt=0)] = 30.0
    # Before answering the challenge, poll this DNS server ("host:port") until the TXT
    # record is visible; empty: the rfc2136 server for rfc2136, no check for exec/webhook.
    propagation_nameserver: str = ""
    propagation_timeout: Annotated[float, msgspec.Meta(gt=0)] = 120.0


class EtcdStorageConfig(_Table):
    """``[tls.acme.etcd]``: account, certificates and the renewal lock in etcd (v3 JSON
    gateway), so one box renews for a cluster and the others copy the result."""

    endpoints: list[str] = msgspec.field(default_factory=lambda: ["http://127.0.0.1:2379"])
    prefix: str = "/dispa/acme/"
    lock_ttl: Annotated[int, msgspec.Meta(ge=5, le=3600)] = 60
    username: str = ""
    password: str = ""
    timeout: Annotated[float, msgspec.Meta(gt=0)] = 10.0


class AcmeConfig(_Table):
    """``[tls.acme]``."""

    enabled: bool = False
    directory_url: str = "https://acme-v02.api.letsencrypt.org/directory"
    email: str = ""
    challenge_type: Literal["http-01", "tls-alpn-01", "dns-01"] = "http-01"
    # What to issue: one certificate per entry of ``names``, plus one per
    # [[tls.acme.certificates]] (several names in one certificate).
    names: list[str] = []
    certificates: list[AcmeCertificate] = []
    key_type: Literal["ec-p256", "ec-p384", "rsa-2048", "rsa-3072", "rsa-4096"] = "ec-p256"
    # Trust for the ACME server's HTTPS (a private CA, pebble in tests); empty: system CAs.
    ca_bundle: str = ""
    # External Account Binding (RFC 8555 §7.3.4), when the CA requires one (ZeroSSL,
    # Google Trust Services, Sectigo, ...): the key id and the base64url HMAC key it gave.
    eab_kid: str = ""
    eab_hmac_key: str = ""
    # Where certificates land for the TLS listeners: <storage_dir>/certs/<name>/
    # {fullchain.pem,privkey.pem}. With storage = "etcd" it is the local copy.
    storage: Literal["directory", "etcd"] = "directory"
    storage_dir: str = "/var/lib/dispa/acme"
    etcd: EtcdStorageConfig = EtcdStorageConfig()
    # Renew once this fraction of the lifetime has passed (Let's Encrypt advises 2/3),
    # plus a random delay of up to renew_jitter x lifetime, so boxes do not renew at once.
    renew_ratio: Annotated[float, msgspec.Meta(gt=0, lt=1)] = 2 / 3
    renew_jitter: Annotated[float, msgspec.Meta(ge=0, lt=1)] = 0.02
    # After a failure: retry_min, doubling up to retry_max (seconds), each +-10% jitter.
    retry_min: Annotated[float, msgspec.Meta(gt=0)] = 60.0
    retry_max: Annotated[float, msgspec.Meta(gt=0)] = 86400.0
    # Look at storage at least this often (seconds): another box may have renewed.
    check_interval: Annotated[float, msgspec.Meta(gt=0)] = 3600.0
    # Bound on one issuance: authorisations, challenge validation and finalisation.
    order_timeout: Annotated[float, msgspec.Meta(gt=0)] = 180.0
    # Revoke the previous certificate (reason "superseded") once its replacement is in
    # place. Off by default: boxes that copy from shared storage serve it a while longer.
    revoke_replaced: bool = False
    dns01: Dns01Config = Dns01Config()


_HOST_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")


def _bad_name(name: str, *, wildcard_ok: bool) -> str | None:
    n = name.lower().rstrip(".")
    if n.startswith("*."):
        if not wildcard_ok:
            return f"{name!r}: a wildcard name needs challenge_type = \"dns-01\" (RFC 8555 §7.1.3)"
        n = n[2:]
    if not n or len(n) > 253 or not all(_HOST_LABEL.match(p) for p in n.split(".")):
        return f"{name!r} is not a DNS name"
    return None


def certificate_set(cfg: AcmeConfig) -> list[tuple[str, tuple[str, ...]]]:
    """``(directory name, names)`` of every configured certificate, in file order; a
    wildcard's directory name is ``_wildcard.<suffix>``."""
    out: list[tuple[str, tuple[str, ...]]] = []
    for n in cfg.names:
        n = n.lower().rstrip(".")
        out.append((_dir_name(n), (n,)))
    for c in cfg.certificates:
        names = tuple(dict.fromkeys(n.lower().rstrip(".") for n in c.names))
        if names:
            out.append((c.name or _dir_name(names[0]), names))
    return out


def _dir_name(name: str) -> str:
    return "_wildcard." + name[2:] if name.startswith("*.") else name


_DIR_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")


def check(cfg: AcmeConfig, issue: Callable[[str, tuple], None], *,
          tls_enabled: bool = True) -> None:
    """Cross-field rules of ``[tls.acme]``; ``issue(message, path below tls.acme)``.
    ``tls_enabled``: whether ``[tls]`` has a listener (TLS-ALPN-01 is answered there)."""
    wildcard_ok = cfg.challenge_type == "dns-01"
    for i, n in enumerate(cfg.names):
        msg = _bad_name(n, wildcard_ok=wildcard_ok)
        if msg:
            issue(msg, ("names", i))
    for i, c in enumerate(cfg.certificates):
        if not c.names:
            issue("a certificate needs at least one name", ("certificates", i, "names"))
        for j, n in enumerate(c.names):
            msg = _bad_name(n, wildcard_ok=wildcard_ok)
            if msg:
                issue(msg, ("certificates", i, "names", j))
        if c.name and not _DIR_NAME.match(c.name):
            issue(f"{c.name!r}: letters, digits, '.', '_' and '-' only (a directory name)",
                  ("certificates", i, "name"))
    seen: dict[str, int] = {}
    for k, (dirname, _) in enumerate(certificate_set(cfg)):
        if dirname in seen:
            issue(f"two certificates would be stored as {dirname!r}", ("certificates",))
        seen[dirname] = k
    if not cfg.enabled:
        return
    if not cfg.names and not cfg.certificates:
        issue("ACME is enabled but no name is configured (names or [[tls.acme.certificates]])",
              ("names",))
    if not cfg.directory_url.startswith(("https://", "http://")):
        issue("must be an http(s):// URL of the ACME directory", ("directory_url",))
    if cfg.retry_min > cfg.retry_max:
        issue(f"retry_min ({cfg.retry_min}) is above retry_max ({cfg.retry_max})", ("retry_min",))
    if cfg.renew_ratio + cfg.renew_jitter >= 1:
        issue(f"renew_ratio + renew_jitter ({cfg.renew_ratio + cfg.renew_jitter:g}) must stay "
              "below 1: the certificate would expire before its renewal", ("renew_jitter",))
    if bool(cfg.eab_kid) != bool(cfg.eab_hmac_key):
        issue("eab_kid and eab_hmac_key go together",
              ("eab_hmac_key" if cfg.eab_kid else "eab_kid",))
    elif cfg.eab_hmac_key and not _is_b64url(cfg.eab_hmac_key):
        issue("not base64url (the HMAC key as the CA gave it)", ("eab_hmac_key",))
    if cfg.storage == "directory" and not cfg.storage_dir:
        issue("storage = \"directory\" needs storage_dir", ("storage_dir",))
    if cfg.storage == "etcd":
        if not cfg.etcd.endpoints:
            issue("storage = \"etcd\" needs at least one endpoint", ("etcd", "endpoints"))
        for i, e in enumerate(cfg.etcd.endpoints):
            if not e.startswith(("http://", "https://")):
                issue(f"{e!r}: an etcd endpoint is an http(s):// URL", ("etcd", "endpoints", i))
    if cfg.challenge_type == "tls-alpn-01" and not tls_enabled:
        issue("tls-alpn-01 is answered on the TLS listener: set [tls] enabled = true",
              ("challenge_type",))
    if cfg.challenge_type == "dns-01":
        d = cfg.dns01
        if d.provider == "rfc2136":
            r = d.rfc2136
            if not r.server:
                issue("the rfc2136 provider needs the DNS server", ("dns01", "rfc2136", "server"))
            if bool(r.tsig_key_name) != bool(r.tsig_secret):
                issue("tsig_key_name and tsig_secret go together",
                      ("dns01", "rfc2136", "tsig_secret"))
            if r.tsig_secret:
                try:
                    base64.b64decode(r.tsig_secret, validate=True)
                except (binascii.Error, ValueError):
                    issue("not base64", ("dns01", "rfc2136", "tsig_secret"))
        elif d.provider == "exec" and not d.exec_command:
            issue("the exec provider needs exec_command (argv list)", ("dns01", "exec_command"))
        elif d.provider == "webhook" and not d.webhook_url.startswith(("http://", "https://")):
            issue("the webhook provider needs an http(s):// webhook_url", ("dns01", "webhook_url"))
        if d.propagation_nameserver and not _host_port(d.propagation_nameserver):
            issue("expected host:port", ("dns01", "propagation_nameserver"))


def _is_b64url(value: str) -> bool:
    try:
        base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
    except (binascii.Error, ValueError):
        return False
    return re.fullmatch(r"[A-Za-z0-9_-]+=*", value) is not None


SECRET_KEYS = (("etcd", "password"), ("dns01", "rfc2136", "tsig_secret"), ("eab_hmac_key",))


def mask_secrets(table: dict) -> dict:
    """``[tls.acme]`` as builtins (``msgspec.to_builtins``) with its secrets as ``***``,
    for /admin/config: the etcd password, the TSIG secret, the EAB HMAC key and the
    webhook header values (they usually carry a token). Changes ``table`` in place."""
    for path in SECRET_KEYS:
        parent = table
        for k in path[:-1]:
            parent = parent.get(k) or {}
        if parent.get(path[-1]):
            parent[path[-1]] = "***"
    headers = (table.get("dns01") or {}).get("webhook_headers") or {}
    for k in headers:
        headers[k] = "***"
    return table


def _host_port(value: str) -> tuple[str, int] | None:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        return None
    return host.strip("[]"), int(port)
