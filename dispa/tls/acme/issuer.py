"""The ACME client in a child process: one issuance (or revocation) per process.

Theory of operation
-------------------
The ``acme`` library, ``josepy``, ``requests`` and ``pyOpenSSL`` (which ``acme`` imports)
weigh about 12 MB, and once imported they stay for the life of the process. The master is
long-lived and must stay small, and renewals are rare (every two months per certificate),
so the master never imports them: :class:`IssuerProcess` (the master's side, light) runs
``python -m dispa.tls.acme.issuer`` for each issuance round and speaks JSON lines with it:

* master -> child, first line: the request (``op`` ``issue`` or ``revoke``, the server,
  the account as stored, the names, ...);
* child -> master: ``present`` / ``cleanup`` (a challenge to put in place or remove: the
  master does it, since the workers and the DNS hooks are its business) and ``account``
  (a new account to store), each answered by the master with ``{"ok": true}`` or
  ``{"error": ...}``; ``log`` (re-logged by the master under ``dispa.acme``); and last
  ``done`` (the certificate and its key) or ``error``.

The protocol runs on the child's original stdout; the child points fd 1 at stderr first,
so nothing a library prints can corrupt it. Stopping (shutdown, reconfiguration) kills the
child: no thread or process outlives the manager, whatever the library was doing. The
master then cleans up every challenge the child presented and did not clean up itself.
The child does what :class:`dispa.tls.acme.client.AcmeClient` describes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys

import dispa
from dispa.tls.acme.errors import AcmeError
from dispa.tls.acme.storage import account_key_name

log = logging.getLogger("dispa.acme")

_PYTHONPATH = os.path.dirname(os.path.dirname(os.path.abspath(dispa.__file__)))


class IssuerProcess:
    """The master's side (see the module docstring); the interface the manager uses:
    :meth:`issue` and :meth:`revoke`, as :class:`~dispa.tls.acme.client.AcmeClient`."""

    def __init__(self, cfg, storage):
        self.cfg = cfg
        self.storage = storage
        self.pid: int | None = None  # the running child, if any (tests, status)

    @property
    def account_key_name(self) -> str:
        return account_key_name(self.cfg.directory_url)

    def _request(self, op: str, **more) -> dict:
        cfg = self.cfg
        return dict(op=op, directory_url=cfg.directory_url, ca_bundle=cfg.ca_bundle,
                    email=cfg.email, eab_kid=cfg.eab_kid, eab_hmac_key=cfg.eab_hmac_key,
                    log_level=log.getEffectiveLevel(), **more)

    async def issue(self, names, *, challenge_type: str, solver, key_type: str = "ec-p256",
                    timeout: float = 180.0) -> tuple[bytes, bytes]:
        """Order, validate and download a certificate; ``(fullchain_pem, privkey_pem)``.
        Raises :class:`AcmeError`."""
        done = await self._run(self._request(
            "issue", names=list(names), challenge_type=challenge_type, key_type=key_type,
            timeout=timeout), solver)
        return done["fullchain"].encode("ascii"), done["key"].encode("ascii")

    async def revoke(self, fullchain_pem: bytes, reason: int = 4) -> None:
        """Revoke the leaf of ``fullchain_pem`` (reason 4: superseded)."""
        await self._run(self._request("revoke", fullchain=fullchain_pem.decode("ascii"),
                                      reason=reason), None)

    async def _run(self, request: dict, solver) -> dict:
        try:
            account = await self.storage.get(self.account_key_name)
        except Exception as exc:  # noqa: BLE001 - a StorageError, reported as such
            raise AcmeError(f"cannot read the account: {exc}") from None
        request["account"] = account.decode() if account else None
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_PYTHONPATH, env.get("PYTHONPATH"))
                                            if p)
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "dispa.tls.acme.issuer", env=env,
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                limit=1 << 20)
        except OSError as exc:
            raise AcmeError(f"cannot start the ACME issuer process: {exc}") from None
        self.pid = proc.pid
        presented: list[list] = []
        try:
            _send(proc.stdin, request)
            while True:
                line = await proc.stdout.readline()
                if not line:
                    rc = await proc.wait()
                    raise AcmeError(f"the ACME issuer process ended (exit status {rc}) "
                                    "without an answer")
                msg = json.loads(line)
                kind = msg.get("type")
                if kind == "log":
                    log.log(msg.get("level", logging.INFO), "%s", msg.get("message", ""),
                            extra={"fields": msg.get("fields") or {}})
                elif kind in ("present", "cleanup"):
                    args = msg["args"]
                    try:
                        await getattr(solver, kind)(*args)
                        if kind == "present":
                            presented.append(args)
                        elif args in presented:
                            presented.remove(args)
                        _send(proc.stdin, {"ok": True})
                    except Exception as exc:  # noqa: BLE001 - told to the child
                        _send(proc.stdin, {"error": str(exc) or type(exc).__name__})
                elif kind == "account":
                    try:
                        await self.storage.put(self.account_key_name,
                                               msg["data"].encode())
                        _send(proc.stdin, {"ok": True})
                    except Exception as exc:  # noqa: BLE001 - told to the child
                        _send(proc.stdin, {"error": f"storage: {exc}"})
                elif kind == "done":
                    return msg
                elif kind == "error":
                    raise AcmeError(msg.get("message") or "the ACME issuer failed")
        except (ValueError, KeyError, TypeError) as exc:
            raise AcmeError(f"garbled answer from the ACME issuer process: {exc}") from None
        except (BrokenPipeError, ConnectionResetError):
            rc = await proc.wait()
            raise AcmeError(f"the ACME issuer process ended (exit status {rc})") from None
        finally:
            if proc.returncode is None:
                proc.kill()  # also on cancellation: nothing outlives the manager
                await asyncio.shield(proc.wait())
            self.pid = None
            for args in presented:  # the child died before cleaning up
                try:
                    await solver.cleanup(*args)
                except Exception as exc:  # noqa: BLE001 - best effort
                    log.warning("acme: cleanup of %s for %s failed: %s", args[0], args[1], exc)


def _send(stream, obj: dict) -> None:
    stream.write(json.dumps(obj).encode() + b"\n")


# ---------------------------------------------------------------------- the child

class _Parent:
    """The child's link to the master: requests answered in order (one at a time)."""

    def __init__(self, out, reader: asyncio.StreamReader):
        self.out = out
        self.reader = reader
        self.lock = asyncio.Lock()

    def send(self, obj: dict) -> None:
        self.out.write(json.dumps(obj) + "\n")
        self.out.flush()

    async def ask(self, obj: dict) -> None:
        async with self.lock:
            self.send(obj)
            line = await self.reader.readline()
            if not line:
                raise SystemExit(1)  # the master is gone
            answer = json.loads(line)
            if "error" in answer:
                raise AcmeError(answer["error"])


class _Solver:
    def __init__(self, parent: _Parent):
        self.parent = parent

    async def present(self, *args) -> None:
        await self.parent.ask({"type": "present", "args": list(args)})

    async def cleanup(self, *args) -> None:
        await self.parent.ask({"type": "cleanup", "args": list(args)})


class _AccountStorage:
    """The one key the client reads and writes: the account, kept by the master."""

    def __init__(self, parent: _Parent, account: str | None):
        self.parent = parent
        self.account = account

    async def get(self, key: str) -> bytes | None:
        return self.account.encode() if self.account else None

    async def put(self, key: str, data: bytes) -> None:
        await self.parent.ask({"type": "account", "data": data.decode()})


class _LogToParent(logging.Handler):
    def __init__(self, parent: _Parent):
        super().__init__()
        self.parent = parent

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.parent.send({"type": "log", "level": record.levelno,
                              "message": record.getMessage(),
                              "fields": getattr(record, "fields", None)})
        except Exception:  # noqa: BLE001 - logging must never break the issuance
            pass


async def _child(out) -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 20)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    request = json.loads(await reader.readline())
    parent = _Parent(out, reader)
    handler = _LogToParent(parent)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)  # the libraries: warnings and worse
    log.setLevel(int(request.get("log_level") or logging.INFO))
    from dispa.tls.acme.client import AcmeClient

    client = AcmeClient(request["directory_url"], _AccountStorage(parent, request["account"]),
                        email=request["email"], ca_bundle=request["ca_bundle"],
                        eab_kid=request["eab_kid"], eab_hmac_key=request["eab_hmac_key"])
    try:
        if request["op"] == "revoke":
            await client.revoke(request["fullchain"].encode("ascii"), request["reason"])
            parent.send({"type": "done"})
            return
        fullchain, key = await client.issue(
            tuple(request["names"]), challenge_type=request["challenge_type"],
            solver=_Solver(parent), key_type=request["key_type"], timeout=request["timeout"])
        parent.send({"type": "done", "fullchain": fullchain.decode("ascii"),
                     "key": key.decode("ascii")})
    except AcmeError as exc:
        parent.send({"type": "error", "message": str(exc)})


def main() -> None:
    # the protocol gets the original stdout; whatever else writes to fd 1 lands on stderr
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    try:
        asyncio.run(_child(out))
    except Exception as exc:  # noqa: BLE001 - reported to the master, which logs it
        out.write(json.dumps({"type": "error",
                              "message": f"{type(exc).__name__}: {exc}"}) + "\n")
        out.flush()


if __name__ == "__main__":
    main()
