"""An RFC 8555 client on the ``acme`` library: account, order, challenges, certificate.

Theory of operation
-------------------
This module runs in the issuer child process (``issuer``), never in the master. The
``acme`` library is synchronous (``requests``), so every call into it runs in a thread,
one at a time per client, and the event loop never blocks. The thread is a daemon
(``_in_thread``), not the loop's default executor: nothing waits for it. What must happen
elsewhere - publishing a challenge to the workers, a DNS update - goes through the
:class:`Solver` the caller passes (in the child: a request to the master).

Order of :meth:`AcmeClient.issue` (RFC 8555 §7.4):

1. a fresh private key for the certificate and a CSR for the names;
2. ``newOrder``; for each authorisation not yet valid, pick the configured challenge type,
   compute the key authorisation (§8.1) and ``solver.present`` it;
3. only when every challenge is in place, answer them all (so DNS propagation of one
   record does not race the validation of another), poll the authorisations, finalise,
   download the chain;
4. ``solver.cleanup`` every presented challenge, whatever happened.

Polling (step 3) is done here, not by the library's ``poll_and_finalize``: that one sleeps
in its thread until ``order_timeout``, so a shutdown or a reconfiguration during an order
would leave a thread talking to the CA for minutes. Here each thread does exactly one HTTP
request (bounded by ``timeout``) and the waits between polls are ``asyncio.sleep`` on the
loop (Retry-After honoured, 0.2 s doubling to 2 s otherwise): a cancelled issuance leaves
at most one request in flight.

The account key (EC P-256, ES256) and the account URL are kept in the storage under
``accounts/<server>/account.json``; a stored key is re-registered with
``onlyReturnExisting`` semantics (``newAccount`` answers 200 with the existing account).
External Account Binding (RFC 8555 §7.3.4: ZeroSSL, Google, Sectigo, ...) signs the
account key with the CA-issued ``eab_kid`` / ``eab_hmac_key`` at registration.

``acme`` 2.x+ dropped TLS-ALPN-01; :class:`TLSALPN01` restores the challenge type (its
response body is ``{}`` like the others).
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from typing import Protocol

import josepy as jose
import requests
from acme import challenges, client, crypto_util, errors, messages
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from dispa.tls.acme.errors import AcmeError
from dispa.tls.acme.storage import Storage, account_key_name, dumps, server_id

__all__ = ["AcmeClient", "AcmeError", "Solver", "new_private_key", "server_id"]

log = logging.getLogger("dispa.acme")

USER_AGENT = "dispa-acme"


class TLSALPN01Response(challenges.KeyAuthorizationChallengeResponse):
    """Response to a TLS-ALPN-01 challenge (RFC 8737 §3): an empty JSON object."""

    typ = "tls-alpn-01"


class TLSALPN01(challenges.KeyAuthorizationChallenge):
    """The TLS-ALPN-01 challenge (RFC 8737)."""

    typ = "tls-alpn-01"
    response_cls = TLSALPN01Response

    def validation(self, account_key: jose.JWK, **unused) -> str:
        return self.key_authorization(account_key)


if "tls-alpn-01" not in challenges.Challenge.TYPES:
    challenges.Challenge.register(TLSALPN01)
    challenges.ChallengeResponse.register(TLSALPN01Response)


class Solver(Protocol):
    """Puts a challenge answer in place and takes it away (the manager implements it).

    ``challenge_type`` is ``http-01``, ``tls-alpn-01`` or ``dns-01``; ``domain`` the
    identifier (``*.example.com`` for a wildcard); ``token`` the challenge token;
    ``key_authorization`` its key authorisation; ``value`` what the CA checks (the key
    authorisation, or for DNS-01 its base64url SHA-256)."""

    async def present(self, challenge_type: str, domain: str, token: str,
                      key_authorization: str, value: str) -> None: ...

    async def cleanup(self, challenge_type: str, domain: str, token: str,
                      key_authorization: str, value: str) -> None: ...


def new_private_key(key_type: str) -> bytes:
    """A PKCS#8 PEM private key: ``ec-p256``, ``ec-p384`` or ``rsa-<bits>``."""
    if key_type.startswith("rsa-"):
        key = rsa.generate_private_key(public_exponent=65537, key_size=int(key_type[4:]))
    else:
        key = ec.generate_private_key(ec.SECP384R1() if key_type == "ec-p384"
                                      else ec.SECP256R1())
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


class AcmeClient:
    """One ACME account at one server (see the module docstring)."""

    def __init__(self, directory_url: str, storage: Storage, *, email: str = "",
                 ca_bundle: str = "", timeout: int = 30, eab_kid: str = "",
                 eab_hmac_key: str = ""):
        self.directory_url = directory_url
        self.storage = storage
        self.email = email
        self.eab = (eab_kid, eab_hmac_key) if eab_kid else None
        self.verify: bool | str = ca_bundle or True
        self.timeout = timeout
        self._client: client.ClientV2 | None = None
        self._key: jose.JWK | None = None
        self._lock = asyncio.Lock()

    @property
    def account_key_name(self) -> str:
        return account_key_name(self.directory_url)

    async def _account(self) -> client.ClientV2:
        if self._client is not None:
            return self._client
        raw = await self.storage.get(self.account_key_name)
        stored = json.loads(raw) if raw else None
        if stored:
            key = jose.JWK.from_json(stored["key"])
        else:
            key = jose.JWKEC(key=ec.generate_private_key(ec.SECP256R1()))
        c = await _in_thread(self._register, key)
        if not stored or stored.get("uri") != c.net.account.uri:
            await self.storage.put(self.account_key_name, dumps(
                {"key": key.to_json(), "uri": c.net.account.uri, "email": self.email,
                 "directory": self.directory_url}))
            log.info("acme: account registered", extra={"fields": {
                "uri": c.net.account.uri, "directory": self.directory_url}})
        self._client, self._key = c, key
        return c

    def _register(self, key: jose.JWK) -> client.ClientV2:
        alg = jose.ES256 if isinstance(key, jose.JWKEC) else jose.RS256
        net = client.ClientNetwork(key, alg=alg, verify_ssl=self.verify,
                                   user_agent=USER_AGENT, timeout=self.timeout)
        directory = client.ClientV2.get_directory(self.directory_url, net)
        c = client.ClientV2(directory, net)
        eab = None
        if self.eab is not None:
            eab = messages.ExternalAccountBinding.from_data(
                account_public_key=key.public_key(), kid=self.eab[0], hmac_key=self.eab[1],
                directory=directory)
        reg = messages.NewRegistration.from_data(
            email=self.email or None, terms_of_service_agreed=True,
            external_account_binding=eab)
        try:
            c.new_account(reg)
        except errors.ConflictError as exc:
            # the key already has an account (RFC 8555 §7.3.1): use it
            uri = exc.location
            c.net.account = messages.RegistrationResource(uri=uri, body=messages.Registration())
            c.query_registration(c.net.account)
        return c

    async def issue(self, names: tuple[str, ...], *, challenge_type: str, solver: Solver,
                    key_type: str = "ec-p256", timeout: float = 180.0) -> tuple[bytes, bytes]:
        """Order, validate and download a certificate for ``names``.

        Returns ``(fullchain_pem, privkey_pem)``. Raises :class:`AcmeError`."""
        async with self._lock:
            try:
                return await self._issue(names, challenge_type, solver, key_type, timeout)
            except AcmeError:
                raise
            except errors.ValidationError as exc:
                raise AcmeError("validation failed: " + _validation_detail(exc)) from None
            except errors.TimeoutError:
                raise AcmeError(f"the CA did not finish within {timeout:g}s") from None
            except messages.Error as exc:
                if exc.code in ("accountDoesNotExist", "unauthorized"):
                    self._client = None  # stale account (a reset CA): register again next time
                raise AcmeError(f"the CA refused: {exc}") from None
            except requests.RequestException as exc:
                self._client = None  # network trouble: a fresh session next time
                raise AcmeError(f"ACME server {self.directory_url} unreachable: "
                                f"{_root_cause(exc)}") from None
            except (errors.Error, OSError, ValueError) as exc:
                self._client = None  # network trouble: a fresh session next time
                raise AcmeError(f"{type(exc).__name__}: {exc}") from None
            except Exception as exc:  # noqa: BLE001 - requests' exceptions and the like
                self._client = None
                raise AcmeError(f"{type(exc).__name__}: {exc}") from None

    async def revoke(self, fullchain_pem: bytes, reason: int = 4) -> None:
        """Revoke the leaf of ``fullchain_pem`` with the account key (RFC 8555 §7.6);
        ``reason`` 4 is *superseded* (RFC 5280 §5.3.1). Raises :class:`AcmeError`."""
        from cryptography import x509

        async with self._lock:
            try:
                c = await self._account()
                cert = x509.load_pem_x509_certificate(fullchain_pem)
                await _in_thread(c.revoke, cert, reason)
            except messages.Error as exc:
                raise AcmeError(f"the CA refused the revocation: {exc}") from None
            except requests.RequestException as exc:
                self._client = None
                raise AcmeError(f"ACME server {self.directory_url} unreachable: "
                                f"{_root_cause(exc)}") from None
            except (errors.Error, OSError, ValueError) as exc:
                raise AcmeError(f"{type(exc).__name__}: {exc}") from None

    async def _issue(self, names, challenge_type, solver, key_type, timeout):
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        c = await self._account()
        key_pem = await _in_thread(new_private_key, key_type)  # RSA-4096: about a second
        csr_pem = crypto_util.make_csr(key_pem, list(names))
        orderr = await _in_thread(c.new_order, csr_pem)
        presented: list[tuple] = []
        try:
            todo = []
            for authzr in orderr.authorizations:
                body = authzr.body
                if body.status == messages.STATUS_VALID:
                    continue  # reused authorisation (RFC 8555 §7.1.4)
                domain = body.identifier.value
                if body.wildcard:
                    domain = "*." + domain
                challb = next((cb for cb in body.challenges
                               if getattr(cb.chall, "typ", None) == challenge_type), None)
                if challb is None:
                    offered = ", ".join(sorted({getattr(cb.chall, "typ", "?")
                                                for cb in body.challenges}))
                    raise AcmeError(f"the CA offers no {challenge_type} challenge for {domain} "
                                    f"(offered: {offered})")
                chall = challb.chall
                ka = chall.key_authorization(self._key)
                value = chall.validation(self._key) if challenge_type == "dns-01" else ka
                args = (challenge_type, domain, chall.encode("token"), ka, value)
                await solver.present(*args)
                presented.append(args)
                todo.append(challb)
            for challb in todo:
                await _in_thread(c.answer_challenge, challb, challb.chall.response(self._key))
            await _poll_authorizations(c, orderr, deadline)
        finally:
            for args in presented:
                try:
                    await solver.cleanup(*args)
                except Exception as exc:  # noqa: BLE001 - cleanup is best effort
                    log.warning("acme: cleanup of %s for %s failed: %s", args[0], args[1], exc)
        fullchain = await _finalize(c, orderr, deadline)
        return fullchain.encode("ascii"), key_pem


def _retry_after(response, default: float) -> float:
    """Seconds from a Retry-After header in seconds (RFC 9110 §10.2.3), else ``default``;
    a date form is rare at ACME servers and falls back to ``default``."""
    try:
        return max(0.0, float(response.headers.get("Retry-After", "")))
    except (TypeError, ValueError):
        return default


async def _sleep_before(deadline: float, seconds: float) -> None:
    """Wait ``seconds`` on the loop, or raise the library's TimeoutError when that would
    pass ``deadline`` (loop time)."""
    left = deadline - asyncio.get_running_loop().time()
    if left <= 0:
        raise errors.TimeoutError()
    await asyncio.sleep(min(seconds, left))


async def _poll_authorizations(c: client.ClientV2, orderr, deadline: float) -> None:
    """Poll each authorisation until it is decided (one request per thread, waits on the
    loop); raise ``errors.ValidationError`` if one is not valid."""
    failed = []
    for authzr in orderr.authorizations:
        delay = 0.2
        while authzr.body.status == messages.STATUS_PENDING:
            authzr, response = await _in_thread(c.poll, authzr)
            if authzr.body.status != messages.STATUS_PENDING:
                break
            await _sleep_before(deadline, _retry_after(response, delay))
            delay = min(delay * 2, 2.0)
        if authzr.body.status != messages.STATUS_VALID:
            failed.append(authzr)
    if failed:
        raise errors.ValidationError(failed)


async def _finalize(c: client.ClientV2, orderr, deadline: float) -> str:
    """Send the CSR, poll the order until it is valid, download the chain (RFC 8555 §7.4)."""
    try:
        await _in_thread(c.begin_finalization, orderr)
    except messages.Error as exc:
        if exc.code != "orderNotReady":  # not ready yet: finalise again once it is
            raise
    delay = 0.2
    while True:
        # POST-as-GET (RFC 8555 §6.3); the library has no public one-shot order poll
        response = await _in_thread(c._post_as_get, orderr.uri)
        body = messages.Order.from_json(response.json())
        if body.status == messages.STATUS_VALID and body.certificate is not None:
            cert = await _in_thread(c._post_as_get, body.certificate)
            return cert.text
        if body.status == messages.STATUS_INVALID:
            raise AcmeError("the CA abandoned the order: "
                            f"{body.error or 'no detail from the CA'}")
        if body.status == messages.STATUS_READY:
            await _in_thread(c.begin_finalization, orderr)
        await _sleep_before(deadline, _retry_after(response, delay))
        delay = min(delay * 2, 2.0)


async def _in_thread(fn, *args):
    """``fn(*args)`` in a daemon thread; its result or exception, awaited on the loop."""
    loop = asyncio.get_running_loop()
    fut = loop.create_future()

    def done(ok: bool, value) -> None:
        if fut.done():
            return  # the caller was cancelled (shutdown, reconfiguration)
        if ok:
            fut.set_result(value)
        else:
            fut.set_exception(value)

    def run() -> None:
        try:
            r = fn(*args)
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting coroutine
            ok, r = False, exc
        else:
            ok = True
        try:
            loop.call_soon_threadsafe(done, ok, r)
        except RuntimeError:
            pass  # the loop is closed: nobody waits any more

    threading.Thread(target=run, name="dispa-acme", daemon=True).start()
    return await fut


def _root_cause(exc: BaseException) -> str:
    while exc.__context__ is not None or exc.__cause__ is not None:
        exc = exc.__cause__ or exc.__context__
    reason = getattr(exc, "reason", None) or exc
    return f"{type(exc).__name__}: {reason}"[:300]


def _validation_detail(exc: errors.ValidationError) -> str:
    out = []
    for authzr in exc.failed_authzrs:
        for cb in authzr.body.challenges:
            if cb.error is not None:
                out.append(f"{authzr.body.identifier.value}: {cb.error.typ} {cb.error.detail}")
    return "; ".join(out) or "no detail from the CA"
