"""Worker side of TLS: SSLContexts per server name, the SNI callback, ticket keys.

Theory of operation
-------------------
``Snapshot.tls`` carries validated PEM (the master checked every pair). When a snapshot
arrives, :meth:`TlsServer.update` builds every context off to the side and then swaps
three dicts (exact names, wildcard suffixes, ACME TLS-ALPN-01 names) and the base context
in one step. Each new connection's handshake starts on the base context (the default
certificate); its ``sni_callback`` moves the connection to the context of the name the
client asked for: exact name, then ``*.parent`` wildcard, then the default. A rotation
therefore never touches a listener or a connection that already finished its handshake.

Python's ``ssl`` has no API for some OpenSSL settings; these go through ctypes on the
context's ``SSL_CTX*`` (``_openssl``): session-ticket keys shared by all workers
(a ticket key callback, tls/tickets.py), key-exchange groups (``SSL_CTRL_SET_GROUPS_LIST``),
the client-certificate chain depth, and, for per-name client auth, the verify mode of the
connection (``SSL_set_SSL_CTX`` does not copy it; nginx re-applies it the same way).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import logging
import os
import ssl
import sys

from dispa.tls import ocsp, tickets
from dispa.tls.client_ocsp import ClientOcsp, Policy

log = logging.getLogger("dispa.tls")

VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}
# ALPN protocols the data plane speaks; others in the configuration are not offered.
SERVED_ALPN = ("h2", "http/1.1")  # h2 only with [http2] enabled (config/load.py)
ACME_ALPN = "acme-tls/1"  # RFC 8737
_MODES = {"off": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL, "required": ssl.CERT_REQUIRED}

# ---------------------------------------------------------------- OpenSSL through ctypes

_SSL_CTRL_SET_GROUPS_LIST = 92
_X509_V_FLAG_CRL_CHECK = 0x4  # ssl.VERIFY_CRL_CHECK_LEAF
TICKET_KEY_BYTES = tickets.KEY_BYTES


def _mapped(stem: str) -> str | None:
    """The path of the shared library ``stem`` (libssl, libcrypto) already mapped into
    this process by ``_ssl``: the very copy Python's ``ssl`` uses, not another one that
    ``find_library`` might pick (a wheel or a venv can bring its own OpenSSL)."""
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
            for line in f:
                path = line.rsplit(None, 1)[-1] if "/" in line else ""
                name = os.path.basename(path)
                if name.startswith(stem + ".so") or name.startswith(stem + "-"):
                    return path
    except OSError:
        pass
    return None


def _plausible(ptr: int | None) -> bool:
    """A value read out of a Python object that can be an OpenSSL heap pointer: not NULL,
    not a small integer, aligned. Cheap; guards the calls below against a layout change."""
    return bool(ptr) and ptr > 0xFFFF and ptr % ctypes.sizeof(ctypes.c_void_p) == 0


class _OpenSSL:
    """The libssl the ``ssl`` module uses, or ``None`` fields when it cannot be found.

    ``error`` says why a feature is unavailable; ``ssl_ok`` is True once the layout of
    ``_ssl._SSLSocket`` was checked (the SSL* that per-name client auth needs)."""

    def __init__(self):
        self.lib = None
        self.crypto = None
        self.error = ""
        self.ssl_ok = False
        try:
            # ``import ssl`` above loaded _ssl, which mapped libssl/libcrypto already. Only
            # that copy will do: another one (find_library) has its own allocator and
            # state, and a buffer it allocates must not be freed by the other.
            name = _mapped("libssl")
            crypto_name = _mapped("libcrypto")
            if name is None or crypto_name is None:
                self.error = ("the ssl module's OpenSSL is not a shared library of this "
                              "process (statically linked?)")
                return
            lib = ctypes.CDLL(name)
            lib.OpenSSL_version_num.restype = ctypes.c_ulong
            if lib.OpenSSL_version_num() != ssl.OPENSSL_VERSION_NUMBER:
                self.error = f"{name} is not the OpenSSL the ssl module runs on"
                return
            lib.SSL_CTX_ctrl.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_long,
                                         ctypes.c_void_p]
            lib.SSL_CTX_ctrl.restype = ctypes.c_long
            lib.SSL_CTX_get_options.argtypes = [ctypes.c_void_p]
            lib.SSL_CTX_get_options.restype = ctypes.c_uint64
            lib.SSL_CTX_set_verify_depth.argtypes = [ctypes.c_void_p, ctypes.c_int]
            lib.SSL_CTX_set_verify_depth.restype = None
            lib.SSL_get_SSL_CTX.argtypes = [ctypes.c_void_p]
            lib.SSL_get_SSL_CTX.restype = ctypes.c_void_p
            lib.SSL_set_verify.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p]
            lib.SSL_set_verify.restype = None
            lib.SSL_set_verify_depth.argtypes = [ctypes.c_void_p, ctypes.c_int]
            lib.SSL_set_verify_depth.restype = None
            lib.SSL_get0_param.argtypes = [ctypes.c_void_p]
            lib.SSL_get0_param.restype = ctypes.c_void_p
            lib.SSL_set_cipher_list.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
            lib.SSL_set_cipher_list.restype = ctypes.c_int
            crypto = ctypes.CDLL(crypto_name)
            for fn in (crypto.X509_VERIFY_PARAM_set_flags, crypto.X509_VERIFY_PARAM_clear_flags):
                fn.argtypes = [ctypes.c_void_p, ctypes.c_ulong]
                fn.restype = ctypes.c_int
            self.crypto = crypto
            self.lib = lib
        except (OSError, AttributeError) as exc:
            self.error = f"libssl not usable through ctypes: {exc}"
            return
        self.ssl_ok = self._self_test()

    @staticmethod
    def ctx_ptr(ctx: ssl.SSLContext) -> int:
        # PySSLContext starts with PyObject_HEAD then ``SSL_CTX *ctx``.
        return ctypes.c_void_p.from_address(id(ctx) + object.__basicsize__).value or 0

    def checked_ptr(self, ctx: ssl.SSLContext) -> int:
        """The SSL_CTX* of ``ctx``, checked against a value Python also knows (options)."""
        if self.lib is None:
            return 0
        ptr = self.ctx_ptr(ctx)
        if not _plausible(ptr) or self.lib.SSL_CTX_get_options(ptr) != int(ctx.options):
            return 0
        return ptr

    @staticmethod
    def _raw_ssl_ptr(ssl_object) -> int:
        # PySSLSocket: PyObject_HEAD, PyObject *Socket, SSL *ssl (CPython 3.7 to 3.13)
        inner = getattr(ssl_object, "_sslobj", None)
        if inner is None:
            return 0
        return ctypes.c_void_p.from_address(
            id(inner) + object.__basicsize__ + ctypes.sizeof(ctypes.c_void_p)).value or 0

    def _self_test(self) -> bool:
        """Check once, on a connection object made here, that the SSL* read out of
        ``_ssl._SSLSocket`` belongs to its context; a CPython with another layout turns
        the features that need it off (with a warning) instead of crashing a worker."""
        try:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            obj = ctx.wrap_bio(ssl.MemoryBIO(), ssl.MemoryBIO(), server_side=True)
            ptr = self._raw_ssl_ptr(obj)
            cptr = self.checked_ptr(ctx)
            if cptr and _plausible(ptr) and ptr not in (id(obj), id(obj._sslobj), id(ctx)) \
                    and self.lib.SSL_get_SSL_CTX(ptr) == cptr:
                return True
        except Exception:  # noqa: BLE001 - any surprise means: do not use it
            pass
        self.error = (f"the layout of _ssl objects in Python {sys.version.split()[0]} is not "
                      "the one expected")
        return False

    def ssl_ptr(self, ssl_object) -> int:
        """The SSL* of an ``ssl.SSLObject``; 0 when the layout check failed."""
        if not self.ssl_ok:
            return 0
        ptr = self._raw_ssl_ptr(ssl_object)
        return ptr if _plausible(ptr) else 0


_openssl: _OpenSSL | None = None


def openssl() -> _OpenSSL:
    global _openssl
    if _openssl is None:
        _openssl = _OpenSSL()
    return _openssl


def set_ticket_keys(ctx: ssl.SSLContext, keys: list[bytes]) -> str:
    """Make ``ctx`` encrypt session tickets with ``keys[0]`` (80 bytes each) and accept
    the others (tls/tickets.py). Returns "callback" (current and previous keys accepted),
    "single" (OpenSSL's one-key API: the previous key is not accepted) or "" (not shared:
    each worker uses its own random key)."""
    if not keys:
        return ""
    o = openssl()
    tickets.set_keys(keys)
    if tickets.install(ctx, o):
        return "callback"
    if tickets.install_single(ctx, o, keys[0]):
        return "single"
    return ""


def set_groups(ctx: ssl.SSLContext, groups: list[str]) -> bool:
    """Key-exchange groups in preference order ("X25519:P-256"); True when accepted."""
    o = openssl()
    ptr = o.checked_ptr(ctx)
    if not ptr:
        if len(groups) == 1:
            try:
                ctx.set_ecdh_curve(groups[0])
                return True
            except (ValueError, ssl.SSLError):
                return False
        return False
    return o.lib.SSL_CTX_ctrl(ptr, _SSL_CTRL_SET_GROUPS_LIST, 0,
                              ":".join(groups).encode("ascii")) == 1


def check_groups(groups: list[str]) -> str | None:
    """An error message when OpenSSL refuses this group list (used by config checks)."""
    if not all(g.isascii() and g.replace("-", "").replace("_", "").isalnum() for g in groups):
        return f"curves {groups!r}: names are letters, digits, '-' and '_'"
    if not set_groups(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), groups):
        return f"curves {groups!r}: OpenSSL does not know this list of groups"
    return None


@contextlib.contextmanager
def pem_path(data: str | bytes):
    """A path that reads as ``data`` (a memfd): OpenSSL's loaders want files, and key
    material must not land on disk."""
    fd = os.memfd_create("dispa-pem", os.MFD_CLOEXEC)
    try:
        os.write(fd, data.encode("ascii") if isinstance(data, str) else data)
        yield f"/proc/self/fd/{fd}"
    finally:
        os.close(fd)


# ---------------------------------------------------------------- contexts

def build_context(settings: dict, cert: dict | None, auth: dict | None,
                  ticket_keys: list[bytes] | None = None, *, alpn: list[str] | None = None
                  ) -> ssl.SSLContext:
    """A server context for one certificate with the listener settings and client auth."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = VERSIONS[settings.get("min_version", "1.2")]
    ctx.maximum_version = VERSIONS[settings.get("max_version", "1.3")]
    ctx.options |= ssl.OP_CIPHER_SERVER_PREFERENCE | ssl.OP_NO_COMPRESSION
    if settings.get("ciphers"):
        ctx.set_ciphers(settings["ciphers"])
    if not settings.get("session_tickets", True):
        ctx.options |= ssl.OP_NO_TICKET
    if settings.get("curves") and not set_groups(ctx, settings["curves"]):
        raise ValueError(f"curves {settings['curves']!r} refused by OpenSSL")
    offer = alpn if alpn is not None else [p for p in settings.get("alpn", ["http/1.1"])
                                           if p in SERVED_ALPN]
    if offer:
        ctx.set_alpn_protocols(offer)
    if cert is not None:
        with pem_path(cert["cert_pem"]) as cp, pem_path(cert["key_pem"]) as kp:
            ctx.load_cert_chain(cp, kp)
    if auth is not None and auth.get("mode", "off") != "off":
        with pem_path(auth["ca_pem"]) as ca:
            ctx.load_verify_locations(cafile=ca)
        if auth.get("crl_pem"):
            with pem_path(auth["crl_pem"]) as crl:
                ctx.load_verify_locations(cafile=crl)
            ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
        ctx.verify_mode = _MODES[auth["mode"]]
        o = openssl()
        ptr = o.checked_ptr(ctx)
        if ptr:
            o.lib.SSL_CTX_set_verify_depth(ptr, int(auth.get("verify_depth", 4)))
    if ticket_keys:
        set_ticket_keys(ctx, ticket_keys)
    return ctx


def _wild_suffix(name: str) -> str | None:
    return name[1:] if name.startswith("*.") else None


class _Entry:
    """The context of one server name and what the session needs to know about it."""

    __slots__ = ("ctx", "verify_mode", "depth", "crl", "verify")

    def __init__(self, ctx: ssl.SSLContext, auth: dict):
        self.ctx = ctx
        self.verify_mode = _MODES[auth.get("mode", "off")]
        self.depth = int(auth.get("verify_depth", 4))
        self.crl = bool(auth.get("crl_pem")) and self.verify_mode != ssl.CERT_NONE
        # what SSL_set_SSL_CTX does not carry over from the context (see _sni)
        self.verify = (self.verify_mode, self.depth, self.crl)


class TlsServer:
    """The TLS state of one worker: contexts by name, built from ``Snapshot.tls``."""

    def __init__(self, metrics=None):
        self.metrics = metrics
        self.base: ssl.SSLContext | None = None
        self.base_verify = (ssl.CERT_NONE, 4, False)
        self.exact: dict[str, _Entry] = {}
        self.wild: dict[str, _Entry] = {}
        self.acme: dict[str, ssl.SSLContext] = {}
        self.strict = False
        self.handshake_timeout = 10.0
        self.client_cert_header = b""
        # client_ocsp: answers cached across snapshots (tls/client_ocsp.py)
        self.client_ocsp = ClientOcsp(metrics)
        self._key = None
        self._acme_key = None
        self._contexts: list[ssl.SSLContext] = []
        self.ticket_keys: list[bytes] = []
        # the TlsAccept whose first bytes are being fed (handshake.py): the SNI callback
        # reports its refusals there
        self.accepting = None
        # "callback": shared keys, previous one accepted; "single": shared, one key;
        # "": not shared (see tls/tickets.py)
        self.ticket_mode = ""
        self._ticket_warned = False

    @property
    def ready(self) -> bool:
        return self.base is not None

    def update(self, tls: dict | None, acme_challenges: dict | None = None) -> None:
        """Build the contexts of ``tls`` (Snapshot.tls) and swap them in; raises on a
        certificate OpenSSL refuses (the caller NACKs the snapshot)."""
        if not tls or not tls.get("enabled"):
            self.base = None
            self._key = None
            return
        keys = [bytes.fromhex(k) for k in tls.get("ticket_keys") or []]
        key = hashlib.sha256(json.dumps(
            {k: v for k, v in tls.items() if k not in ("ticket_keys", "upstream")},
            sort_keys=True).encode()).digest()
        if key != self._key:
            self._build(tls, keys)
            self._key = key
        elif keys != self.ticket_keys:
            if self.ticket_mode == "callback":
                tickets.set_keys(keys)  # the callback reads them: no context to touch
            else:
                modes = {set_ticket_keys(ctx, keys) for ctx in self._contexts}
                self.ticket_mode = modes.pop() if len(modes) == 1 else ""
        self.ticket_keys = keys
        self._update_acme(tls.get("settings", {}), (acme_challenges or {}).get("tls_alpn01"))

    @property
    def ticket_keys_ok(self) -> bool:
        """Session tickets made by one worker resume on every other one."""
        return bool(self.ticket_mode)

    def _build(self, tls: dict, ticket_keys: list[bytes]) -> None:
        settings = tls.get("settings", {})
        listener_auth = tls.get("client_auth") or {"mode": "off"}
        certs = tls.get("certificates") or []
        per_name: dict[str, dict] = {}
        for entry in tls.get("sni") or []:
            for name in entry["names"]:
                per_name.setdefault(name, entry)
        built: dict[tuple, _Entry] = {}
        contexts: list[ssl.SSLContext] = []

        def entry_for(cert: dict | None, sni: dict | None) -> _Entry:
            auth = sni["client_auth"] if sni is not None else listener_auth
            # per-name TLS 1.2 ciphers: the connection takes the cipher list of the
            # context the SNI callback moves it to (OpenSSL 1.1.1+ chooses the cipher
            # after that callback; tests/unit/tls test_per_name_ciphers)
            ciphers = (sni or {}).get("ciphers") or settings.get("ciphers", "")
            # per-name versions: checked after the handshake (tls/handshake.py _attach)
            versions = tuple((sni or {}).get("versions") or ()) or None
            k = (cert["id"] if cert else "", json.dumps(auth, sort_keys=True), ciphers,
                 versions)
            e = built.get(k)
            if e is None:
                ctx = build_context(dict(settings, ciphers=ciphers), cert, auth, ticket_keys)
                _staple(ctx, cert)
                ctx.dispa_client_ocsp = Policy.from_auth(auth)
                ctx.dispa_versions = versions
                contexts.append(ctx)
                e = built[k] = _Entry(ctx, auth)
            return e

        # which certificate serves which name: the first certificate listing it wins
        cert_of: dict[str, dict] = {}
        for cert in certs:
            for name in cert["names"]:
                cert_of.setdefault(name, cert)
        default = None
        wanted = settings.get("default_certificate") or ""
        if wanted:
            default = _lookup(cert_of, wanted)
        if default is None and certs:
            default = certs[0]

        def sni_of(name: str) -> dict | None:
            a = per_name.get(name)
            if a is None and "." in name and not name.startswith("*."):
                a = per_name.get("*" + name[name.index("."):])
            return a

        exact: dict[str, _Entry] = {}
        wild: dict[str, _Entry] = {}
        for name in list(cert_of) + [n for n in per_name if n not in cert_of]:
            cert = _lookup(cert_of, name) or default
            e = entry_for(cert, sni_of(name))
            suffix = _wild_suffix(name)
            if suffix is not None:
                wild[suffix] = e
            else:
                exact[name] = e
        base = build_context(settings, default, listener_auth, ticket_keys)
        _staple(base, default)
        base.dispa_client_ocsp = Policy.from_auth(listener_auth)
        base.sni_callback = self._sni
        contexts.append(base)
        base_verify = _Entry(base, listener_auth).verify
        if not openssl().ssl_ok and any(e.verify != base_verify
                                        for e in list(exact.values()) + list(wild.values())):
            log.warning("per-name client_auth differs from the listener's but cannot be "
                        "applied (%s): handshakes for those names are refused",
                        openssl().error or "no libssl access")
        modes = {set_ticket_keys(c, ticket_keys) for c in contexts} if ticket_keys else {""}
        mode = modes.pop() if len(modes) == 1 else ""
        if ticket_keys and mode != "callback" and not self._ticket_warned:
            self._ticket_warned = True
            if not mode:
                log.warning("session-ticket keys not shared between workers (%s): resumption "
                            "works only on the worker that issued a ticket",
                            openssl().error or "OpenSSL refused the key")
            elif mode == "single":
                log.warning("session tickets: %s; tickets made before a key rotation will "
                            "not resume", tickets.unavailable_reason() or "no key callback")
        self.ticket_mode = mode
        # the swap: new handshakes see the new tables; finished ones keep their context
        for old in self._contexts:
            if all(old is not c for c in contexts):
                ocsp.forget(old)
        self.exact, self.wild, self._contexts = exact, wild, contexts
        self.base_verify = base_verify
        self.strict = bool(settings.get("strict_sni"))
        self.handshake_timeout = float(settings.get("handshake_timeout", 10.0))
        self.client_ocsp.cache_size = int(settings.get("client_ocsp_cache_size", 4096))
        self.client_cert_header = (tls.get("client_cert_header") or "").encode("latin-1")
        self.base = base

    def _update_acme(self, settings: dict, pending: dict | None) -> None:
        key = json.dumps(pending, sort_keys=True) if pending else None
        if key == self._acme_key:
            return
        acme = {}
        for name, (cert_pem, key_pem) in (pending or {}).items():
            acme[name.lower()] = build_context(
                dict(settings, min_version="1.2", max_version="1.3", curves=[]),
                {"id": "acme", "cert_pem": cert_pem, "key_pem": key_pem}, None,
                alpn=[ACME_ALPN])
        self.acme = acme
        self._acme_key = key

    # -- the SNI callback (runs inside the handshake) --------------------------------
    def _sni(self, ssl_object, server_name, base_ctx):
        try:
            if server_name is None:
                return None
            name = server_name.lower().rstrip(".")
            ssl_object.dispa_sni = name
            if self.acme:
                challenge = self.acme.get(name)
                if challenge is not None:
                    ssl_object.context = challenge
                    return None
            e = self.exact.get(name)
            if e is None:
                dot = name.find(".")
                if dot > 0:
                    e = self.wild.get(name[dot:])
            if e is None:
                if self.strict:
                    self._refuse(ssl_object, "unknown_sni")
                    return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
                return None  # stays on the default certificate
            if e.ctx is not base_ctx:
                ssl_object.context = e.ctx
                if e.verify != self.base_verify:
                    # The connection keeps the verify mode, depth and flags of the
                    # context it started on; set this name's (nginx does the same).
                    o = openssl()
                    ptr = o.ssl_ptr(ssl_object)
                    if ptr and o.lib.SSL_get_SSL_CTX(ptr) == o.ctx_ptr(e.ctx):
                        o.lib.SSL_set_verify(ptr, _openssl_mode(e.verify_mode), None)
                        o.lib.SSL_set_verify_depth(ptr, e.depth)
                        param = o.lib.SSL_get0_param(ptr)
                        if e.crl:
                            o.crypto.X509_VERIFY_PARAM_set_flags(param, _X509_V_FLAG_CRL_CHECK)
                        else:
                            o.crypto.X509_VERIFY_PARAM_clear_flags(param,
                                                                   _X509_V_FLAG_CRL_CHECK)
                    else:
                        self._refuse(ssl_object, "client_auth_unavailable")
                        return ssl.ALERT_DESCRIPTION_INTERNAL_ERROR
            return None
        except Exception:  # noqa: BLE001 - never let a bug escape into OpenSSL
            log.exception("SNI callback failed")
            self._refuse(ssl_object, "internal")
            return ssl.ALERT_DESCRIPTION_INTERNAL_ERROR

    def _refuse(self, ssl_object, reason: str) -> None:
        """Label a refusal for dispa_tls_handshake_errors_total."""
        try:
            ssl_object.dispa_reason = reason
        except Exception:  # noqa: BLE001
            pass
        if self.accepting is not None:
            self.accepting.reason = reason


def _staple(ctx: ssl.SSLContext, cert: dict | None) -> None:
    der = bytes.fromhex(cert["ocsp"]) if cert and cert.get("ocsp") else None
    if der and not ocsp.install(ctx, der):
        log.warning("OCSP stapling unavailable: %s", openssl().error or "no libssl access")


def _openssl_mode(mode: ssl.VerifyMode) -> int:
    # SSL_VERIFY_PEER = 1, SSL_VERIFY_FAIL_IF_NO_PEER_CERT = 2 (what Python sets as well)
    if mode == ssl.CERT_REQUIRED:
        return 3
    if mode == ssl.CERT_OPTIONAL:
        return 1
    return 0


def _lookup(table: dict, name: str):
    hit = table.get(name)
    if hit is None and "." in name and not name.startswith("*."):
        hit = table.get("*" + name[name.index("."):])
    return hit
