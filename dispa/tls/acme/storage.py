"""Where the ACME manager keeps its account and certificates, and the renewal lock.

Theory of operation
-------------------
A storage is a small key -> bytes store with one lock. Keys are relative paths
(``accounts/<server>/account.json``, ``certs/<name>/fullchain.pem``,
``certs/<name>/privkey.pem``). Two backends:

* :class:`DirectoryStorage`: files under one directory. A write goes to a temporary file
  in the same directory, is fsynced and renamed over the old one (``os.replace``), so a
  reader (the TLS store polling the directory) sees the old or the new file, never half a
  file. Private keys and the account are mode 0600. The lock is ``flock(LOCK_EX|LOCK_NB)``
  on ``<dir>/renew.lock``: it holds between processes of one box (and between two
  managers in one process, each with its own open file), and the kernel drops it when the
  holder dies.
* :class:`EtcdStorage`: keys under a prefix in etcd, spoken to through etcd's v3 JSON
  gateway (``/v3/kv/range``, ``/v3/kv/put``, ``/v3/kv/txn``, ``/v3/lease/*``) with aiohttp,
  so boxes of a cluster share one account and one set of certificates. The lock is a key
  created in a transaction only if it does not exist (``create_revision == 0``), attached
  to a lease that a background task keeps alive; if the holder dies, the lease expires
  after ``lock_ttl`` seconds and another box may take over.

Rule: the lock is only ever *tried* (never waited for). The manager that does not get it
assumes another one is renewing, and reads the result from storage later.
"""

from __future__ import annotations

import asyncio
import base64
import fcntl
import json
import logging
import os
import re
import tempfile
import urllib.parse
from typing import Protocol

log = logging.getLogger("dispa.acme")

LOCK_NAME = "renew.lock"


class StorageError(Exception):
    """The storage cannot be read or written (I/O error, etcd unreachable or refusing)."""


class Lock(Protocol):
    """A held lock; :meth:`release` gives it back (idempotent)."""

    async def release(self) -> None: ...


class Storage(Protocol):
    """Key -> bytes with a try-lock (see the module docstring)."""

    async def get(self, key: str) -> bytes | None: ...

    async def put(self, key: str, data: bytes) -> None: ...

    async def try_lock(self) -> Lock | None: ...

    async def close(self) -> None: ...


def server_id(directory_url: str) -> str:
    """A directory-safe name for the ACME server (accounts are per server)."""
    u = urllib.parse.urlsplit(directory_url)
    return re.sub(r"[^A-Za-z0-9.-]+", "_", f"{u.netloc}{u.path}").strip("_") or "acme"


def account_key_name(directory_url: str) -> str:
    """The storage key of the account at that server."""
    return f"accounts/{server_id(directory_url)}/account.json"


def _private(key: str) -> bool:
    return key.endswith(("privkey.pem", "account.json"))


# ------------------------------------------------------------------ directory

class DirectoryStorage:
    """Files under ``root`` (created mode 0700 when missing)."""

    def __init__(self, root: str):
        self.root = os.path.abspath(root)

    def path(self, key: str) -> str:
        """The file of ``key``; refuses keys that would leave ``root``."""
        p = os.path.normpath(os.path.join(self.root, key))
        if not p.startswith(self.root + os.sep):
            raise StorageError(f"key {key!r} leaves the storage directory")
        return p

    async def get(self, key: str) -> bytes | None:
        try:
            with open(self.path(key), "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StorageError(f"cannot read {self.path(key)}: {exc.strerror or exc}") from None

    async def put(self, key: str, data: bytes) -> None:
        # in a thread: the two fsyncs can take seconds on a busy disk, and the master's
        # loop also serves /health and supervises the workers
        await asyncio.to_thread(write_atomic, self.path(key), data,
                                0o600 if _private(key) else 0o644)

    async def try_lock(self) -> "_FlockLock | None":
        try:
            os.makedirs(self.root, mode=0o700, exist_ok=True)
            fd = os.open(os.path.join(self.root, LOCK_NAME), os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise StorageError(f"cannot open the lock file in {self.root}: "
                               f"{exc.strerror or exc}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        return _FlockLock(fd)

    async def close(self) -> None:
        pass


class _FlockLock:
    def __init__(self, fd: int):
        self._fd: int | None = fd

    async def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)


def write_atomic(path: str, data: bytes, mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` so a reader sees the old or the new content, never a
    mix: temporary file in the same directory, fsync, ``os.replace``. Raises
    :class:`StorageError`."""
    directory = os.path.dirname(path)
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                os.fchmod(f.fileno(), mode)
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        dfd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dfd)  # the rename itself survives a crash
        finally:
            os.close(dfd)
    except OSError as exc:
        raise StorageError(f"cannot write {path}: {exc.strerror or exc}") from None


# ------------------------------------------------------------------ etcd

class _Again(Exception):
    """Internal: repeat the request once on the same endpoint."""


def _etcd_error(data) -> str:
    if isinstance(data, dict):
        return str(data.get("error") or data.get("message") or data)[:300]
    return str(data)[:300]


def _b64(s: str | bytes) -> str:
    return base64.b64encode(s.encode() if isinstance(s, str) else s).decode("ascii")


class EtcdStorage:
    """Keys under ``prefix`` in etcd (v3 JSON gateway; etcd 3.4+)."""

    def __init__(self, endpoints: list[str], *, prefix: str = "/dispa/acme/",
                 lock_ttl: int = 60, username: str = "", password: str = "",
                 timeout: float = 10.0, owner: str = ""):
        self.endpoints = [e.rstrip("/") for e in endpoints]
        self.prefix = prefix if prefix.endswith("/") else prefix + "/"
        self.lock_ttl = lock_ttl
        self.username = username
        self.password = password
        self.timeout = timeout
        self.owner = owner or f"{os.uname().nodename}:{os.getpid()}"
        self._session = None
        self._token: str | None = None

    async def _call(self, path: str, body: dict) -> dict:
        import aiohttp  # the master only: workers never import this module

        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.timeout))
        last: Exception | None = None
        for endpoint in self.endpoints:
            for attempt in (1, 2, 3):  # a dead pooled connection, then an expired token
                try:
                    return await self._post(endpoint, path, body)
                except _Again as exc:
                    last = exc.__cause__ or exc
                    if attempt == 3:
                        break
                except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
                    last = exc  # try the next endpoint
                    break
        raise StorageError(f"etcd unreachable ({', '.join(self.endpoints)}): {last}")

    async def _post(self, endpoint: str, path: str, body: dict) -> dict:
        """One request; raises ``_Again`` when it is worth repeating at once on the same
        endpoint: a pooled connection etcd had closed (a restart), or an expired token
        (etcd's simple tokens live ``--auth-token-ttl``, 300 s by default, and renewals
        are days apart: log in again)."""
        import aiohttp

        try:
            if self.username and self._token is None:
                async with self._session.post(
                        f"{endpoint}/v3/auth/authenticate",
                        json={"name": self.username, "password": self.password}) as r:
                    data = await r.json(content_type=None)
                    if r.status != 200 or "token" not in data:
                        raise StorageError(f"etcd authentication failed: {_etcd_error(data)}")
                    self._token = data["token"]
            headers = {"Authorization": self._token} if self._token else {}
            async with self._session.post(f"{endpoint}{path}", json=body,
                                          headers=headers) as r:
                data = await r.json(content_type=None)
        except aiohttp.ServerDisconnectedError as exc:
            raise _Again() from exc
        if not isinstance(data, dict):
            data = {"error": data}
        if self.username and (r.status == 401 or data.get("code") == 16):
            self._token = None
            raise _Again(f"etcd refused the token: {_etcd_error(data)}")
        if r.status != 200:
            raise StorageError(f"etcd {path}: HTTP {r.status}: {_etcd_error(data)}")
        return data

    async def get(self, key: str) -> bytes | None:
        data = await self._call("/v3/kv/range", {"key": _b64(self.prefix + key)})
        kvs = data.get("kvs") or []
        if not kvs:
            return None
        return base64.b64decode(kvs[0].get("value", ""))

    async def put(self, key: str, data: bytes) -> None:
        await self._call("/v3/kv/put", {"key": _b64(self.prefix + key), "value": _b64(data)})

    async def try_lock(self) -> "_EtcdLock | None":
        lease = (await self._call("/v3/lease/grant", {"TTL": str(self.lock_ttl)})).get("ID")
        if not lease:
            raise StorageError("etcd granted no lease")
        key = _b64(self.prefix + LOCK_NAME)
        txn = {
            "compare": [{"key": key, "result": "EQUAL", "target": "CREATE",
                         "create_revision": "0"}],
            "success": [{"request_put": {"key": key, "value": _b64(self.owner),
                                         "lease": lease}}],
        }
        res = await self._call("/v3/kv/txn", txn)
        if not res.get("succeeded"):
            await self._revoke(lease)
            return None
        return _EtcdLock(self, lease)

    async def _revoke(self, lease: str) -> None:
        try:
            await self._call("/v3/lease/revoke", {"ID": lease})
        except StorageError as exc:
            log.warning("acme: could not revoke the etcd lock lease (it expires by itself): %s",
                        exc)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


class _EtcdLock:
    """The lock key's lease, kept alive every ttl/3 seconds until released.

    ``lost`` turns True when etcd says the lease is gone (it expired while etcd was out of
    reach): another box may be renewing too. The renewal in progress goes on (two valid
    certificates are harmless; the last one written wins) and the error is logged."""

    def __init__(self, storage: EtcdStorage, lease: str):
        self._storage = storage
        self.lease = lease
        self.lost = False
        self._task: asyncio.Task | None = asyncio.ensure_future(self._keepalive())

    async def _keepalive(self) -> None:
        period = max(0.5, self._storage.lock_ttl / 3)
        while not self.lost:
            await asyncio.sleep(period)
            try:
                res = await self._storage._call("/v3/lease/keepalive", {"ID": self.lease})
            except StorageError as exc:
                log.warning("acme: etcd lock keepalive failed: %s", exc)
                continue
            # the gateway streams {"result": {"ID", "TTL"}}; an expired lease has no TTL
            if int((res.get("result") or res).get("TTL") or 0) <= 0:
                self.lost = True
                log.error("acme: the etcd renewal lock expired while held (etcd was out of "
                          "reach for over %ss); another box may renew as well",
                          self._storage.lock_ttl)

    async def release(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
            await self._storage._revoke(self.lease)


def open_storage(cfg) -> Storage:
    """The storage an ``AcmeConfig`` names."""
    if cfg.storage == "etcd":
        e = cfg.etcd
        return EtcdStorage(e.endpoints, prefix=e.prefix, lock_ttl=e.lock_ttl,
                           username=e.username, password=e.password, timeout=e.timeout)
    return DirectoryStorage(cfg.storage_dir)


def dumps(obj) -> bytes:
    """JSON for the account file (sorted keys: the same account gives the same bytes)."""
    return json.dumps(obj, sort_keys=True, indent=1).encode()
