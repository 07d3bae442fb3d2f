"""Session-ticket keys shared by every worker, with the previous key still accepted.

Theory of operation
-------------------
The master makes an 80-byte key every ``ticket_key_rotation`` seconds and ships the
current and the previous one in ``Snapshot.tls["ticket_keys"]`` (current first). A key is
``name (16) | HMAC-SHA256 secret (32) | AES-256 key (32)``, the layout of OpenSSL's own
``SSL_CTRL_SET_TLSEXT_TICKET_KEYS``.

OpenSSL's key API holds one key, so a ticket issued just before a rotation would no
longer resume. Like nginx's ``ssl_session_ticket_key`` list, the worker installs a ticket
key callback (``SSL_CTX_set_tlsext_ticket_key_cb``, via ``SSL_CTX_callback_ctrl`` through
ctypes) on every context: new tickets are encrypted with the current key; a ticket is
decrypted with whichever known key its name selects, and one made with the previous key
is renewed (return 2), so clients move to the current key on their next resumption. A
ticket with an unknown name falls back to a full handshake.

The keys live in one module-level tuple (a worker has one TLS server); the callback reads
it on each call, so a rotation replaces the tuple and touches no context. OpenSSL consults
the context a connection *started* on (``session_ctx``), i.e. the base context; the
callback is set on every context anyway.

When the callback cannot be installed (libssl not reachable through ctypes, a build
without the deprecated 3.0 API), :func:`install` returns False and the caller falls back
to the single-key API: resumption then works across workers until the next rotation.
"""

from __future__ import annotations

import ctypes
import logging

log = logging.getLogger("dispa.tls")

KEY_BYTES = 80  # 16 name + 32 HMAC secret + 32 AES key
_SSL_CTRL_SET_TLSEXT_TICKET_KEY_CB = 72
_SSL_CTRL_SET_TLSEXT_TICKET_KEYS = 59

# int cb(SSL *s, unsigned char key_name[16], unsigned char *iv, EVP_CIPHER_CTX *ctx,
#        HMAC_CTX *hctx, int enc)
_CB_TYPE = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                            ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int)

_keys: tuple[bytes, ...] = ()  # current first, then the previous one
_callback = None  # the CFUNCTYPE object: kept alive for the life of the process
_lib = None
_failed = ""
stats = {"encrypted": 0, "decrypted_current": 0, "decrypted_previous": 0, "unknown": 0,
         "errors": 0}


def set_keys(keys: list[bytes]) -> None:
    """The keys the callback uses from now on (current first); wrong sizes are dropped."""
    global _keys
    _keys = tuple(bytes(k) for k in keys if len(k) == KEY_BYTES)


def current_keys() -> tuple[bytes, ...]:
    return _keys


def _setup(o) -> bool:
    """Bind the libcrypto functions the callback needs and make the callback once."""
    global _callback, _lib, _failed
    if _callback is not None:
        return True
    if _failed:
        return False
    if o.lib is None or o.crypto is None:
        _failed = o.error or "libssl not reachable through ctypes"
        return False
    try:
        crypto = o.crypto
        o.lib.SSL_CTX_callback_ctrl.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p]
        o.lib.SSL_CTX_callback_ctrl.restype = ctypes.c_long
        crypto.EVP_aes_256_cbc.restype = ctypes.c_void_p
        crypto.EVP_aes_256_cbc.argtypes = []
        crypto.EVP_sha256.restype = ctypes.c_void_p
        crypto.EVP_sha256.argtypes = []
        for fn in (crypto.EVP_EncryptInit_ex, crypto.EVP_DecryptInit_ex):
            fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_char_p,
                           ctypes.c_void_p]
            fn.restype = ctypes.c_int
        crypto.HMAC_Init_ex.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int,
                                        ctypes.c_void_p, ctypes.c_void_p]
        crypto.HMAC_Init_ex.restype = ctypes.c_int
        crypto.RAND_bytes.argtypes = [ctypes.c_void_p, ctypes.c_int]
        crypto.RAND_bytes.restype = ctypes.c_int
        aes = crypto.EVP_aes_256_cbc()
        sha256 = crypto.EVP_sha256()
        if not aes or not sha256:
            raise AttributeError("EVP_aes_256_cbc/EVP_sha256 unavailable")
    except AttributeError as exc:  # a symbol this OpenSSL does not export
        _failed = f"ticket key callback unavailable: {exc}"
        return False

    def callback(_ssl, key_name, iv, cipher_ctx, hmac_ctx, enc):
        # Runs inside the handshake (ctypes takes the GIL). Never raises into OpenSSL.
        try:
            keys = _keys
            if enc == 1:  # a new ticket: the current key
                if not keys:
                    return 0  # OpenSSL 3 sends no ticket; the handshake goes on
                k = keys[0]
                if crypto.RAND_bytes(iv, 16) != 1:
                    return -1
                ctypes.memmove(key_name, k[:16], 16)
                if crypto.EVP_EncryptInit_ex(cipher_ctx, aes, None, k[48:80], iv) != 1 or \
                        crypto.HMAC_Init_ex(hmac_ctx, k[16:48], 32, sha256, None) != 1:
                    return -1
                stats["encrypted"] += 1
                return 1
            name = ctypes.string_at(key_name, 16)
            for i, k in enumerate(keys):
                if k[:16] == name:
                    if crypto.HMAC_Init_ex(hmac_ctx, k[16:48], 32, sha256, None) != 1 or \
                            crypto.EVP_DecryptInit_ex(cipher_ctx, aes, None, k[48:80],
                                                      iv) != 1:
                        return -1
                    if i == 0:
                        stats["decrypted_current"] += 1
                        return 1
                    stats["decrypted_previous"] += 1
                    return 2  # valid, but issue a new ticket under the current key
            stats["unknown"] += 1
            return 0  # unknown key: full handshake
        except Exception:  # noqa: BLE001 - an exception must not cross into OpenSSL
            stats["errors"] += 1
            return 0  # no ticket / full handshake, rather than a failed handshake

    _callback = _CB_TYPE(callback)
    _lib = o.lib
    return True


def install(ctx, o) -> bool:
    """Make ``ctx`` use the shared keys through the callback; False when unavailable."""
    ptr = o.checked_ptr(ctx)
    if not ptr or not _setup(o):
        return False
    return _lib.SSL_CTX_callback_ctrl(ptr, _SSL_CTRL_SET_TLSEXT_TICKET_KEY_CB,
                                      ctypes.cast(_callback, ctypes.c_void_p)) == 1


def install_single(ctx, o, key: bytes) -> bool:
    """The fallback: OpenSSL's one-key API (the previous key is not accepted)."""
    ptr = o.checked_ptr(ctx)
    if not ptr or len(key) != KEY_BYTES:
        return False
    return o.lib.SSL_CTX_ctrl(ptr, _SSL_CTRL_SET_TLSEXT_TICKET_KEYS, len(key), key) == 1


def unavailable_reason() -> str:
    return _failed
