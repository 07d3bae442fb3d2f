"""A real etcd server (Debian's ``etcd-server`` package, ``/usr/bin/etcd``) for tests.

``EtcdServer`` starts a single-member etcd on free loopback ports with its own data dir under
the test's tmp dir, polls ``/health`` until it answers, and offers a small blocking client
over etcd's documented gRPC-gateway JSON API (``/v3/kv/put`` ...) so a test can change the
registry behind the provider's back. Variants:

* ``auth=True``: a ``root`` user (password ``ROOT_PASSWORD``) is created and auth enabled;
  the helper's own client authenticates as root.
  ``extra_args=("--auth-token-ttl", "1")`` makes tokens expire after a second unused.
* ``tls=True``: certificates are generated with ``cryptography`` (a test CA, a server cert for
  127.0.0.1/localhost and a client cert); etcd requires client certificates
  (``--client-cert-auth``). ``pki`` holds the file paths.

``TcpProxy`` is a loopback TCP forwarder a test puts between the provider and etcd to cut
the provider's connections (``cut()``: drop every connection and refuse new ones) while the
test keeps writing to etcd directly, then ``restore()`` it.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import http.client
import json
import os
import shutil
import signal
import ssl
import subprocess
import threading
import time
from pathlib import Path

from tests.support.dispa_proc import free_port

ETCD = shutil.which("etcd") or "/usr/bin/etcd"
ROOT_PASSWORD = "root-secret"


def b64(s: str | bytes) -> str:
    return base64.b64encode(s.encode() if isinstance(s, str) else s).decode()


def unb64(s: str) -> str:
    return base64.b64decode(s).decode()


def prefix_end(prefix: str) -> bytes:
    p = bytearray(prefix.encode())
    while p and p[-1] == 0xFF:
        p.pop()
    p[-1] += 1
    return bytes(p)


# --- certificates -----------------------------------------------------------------------

def make_pki(directory: Path) -> dict[str, str]:
    """A test CA, a server cert (127.0.0.1, ::1, localhost) and a client cert, as PEM files."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)

    def key():
        return ec.generate_private_key(ec.SECP256R1())

    def name(cn):
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def write(stem, cert, k):
        (directory / f"{stem}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (directory / f"{stem}-key.pem").write_bytes(k.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))

    ca_key = key()
    ca_name = name("dispa test CA")
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False,
                                       encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    write("ca", ca, ca_key)

    def leaf(stem, cn, usages, sans):
        k = key()
        b = (x509.CertificateBuilder().subject_name(name(cn)).issuer_name(ca.subject)
             .public_key(k.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(now - datetime.timedelta(minutes=5))
             .not_valid_after(now + datetime.timedelta(days=1))
             .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
             .add_extension(x509.ExtendedKeyUsage(usages), critical=False))
        if sans:
            b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        write(stem, b.sign(ca_key, hashes.SHA256()), k)

    server_sans = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                   x509.IPAddress(ipaddress.ip_address("::1"))]
    # etcd's gateway dials its own gRPC server with the server cert as a client cert, so the
    # server cert carries both usages.
    leaf("server", "etcd", [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
         server_sans)
    leaf("client", "dispa", [ExtendedKeyUsageOID.CLIENT_AUTH], [])
    return {"ca": str(directory / "ca.pem"),
            "server_cert": str(directory / "server.pem"),
            "server_key": str(directory / "server-key.pem"),
            "client_cert": str(directory / "client.pem"),
            "client_key": str(directory / "client-key.pem")}


# --- the server --------------------------------------------------------------------------

class EtcdError(Exception):
    pass


class EtcdServer:
    """One etcd member on 127.0.0.1; ``start()`` returns once ``/health`` says true."""

    def __init__(self, workdir: Path, *, auth: bool = False, tls: bool = False,
                 extra_args: tuple[str, ...] = ()):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.data_dir = self.workdir / "data"
        self.auth = auth
        self.tls = tls
        self.extra_args = list(extra_args)
        self.client_port = free_port()
        self.peer_port = free_port()
        self.pki = make_pki(self.workdir / "pki") if tls else {}
        self.proc: subprocess.Popen | None = None
        self.log_path = self.workdir / "etcd.log"
        self._token: str | None = None
        self._auth_enabled = False

    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.client_port}"

    def _cmd(self) -> list[str]:
        client = f"{self.scheme}://127.0.0.1:{self.client_port}"
        peer = f"http://127.0.0.1:{self.peer_port}"
        cmd = [ETCD, "--name", "t", "--data-dir", str(self.data_dir),
               "--listen-client-urls", client, "--advertise-client-urls", client,
               "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
               "--initial-cluster", f"t={peer}", "--initial-cluster-state", "new",
               "--logger", "zap", "--log-level", "warn",
               # a fast single-member election, and no disk syncs (tmp data)
               "--heartbeat-interval", "50", "--election-timeout", "500",
               "--unsafe-no-fsync"]
        if self.tls:
            cmd += ["--cert-file", self.pki["server_cert"], "--key-file", self.pki["server_key"],
                    "--trusted-ca-file", self.pki["ca"], "--client-cert-auth"]
        return cmd + self.extra_args

    def start(self, timeout: float = 20.0) -> "EtcdServer":
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self._cmd(), stdout=log, stderr=subprocess.STDOUT,
                                     cwd=self.workdir)
        log.close()
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"etcd exited with {self.proc.returncode}:\n{self.log()}")
            try:
                status, body = self._request("GET", "/health", None, auth=False, timeout=2)
                if status == 200 and json.loads(body).get("health") == "true":
                    break
                last = body
            except (OSError, http.client.HTTPException, ValueError) as exc:
                last = exc
            time.sleep(0.05)
        else:
            raise RuntimeError(f"etcd not healthy after {timeout}s ({last!r}):\n{self.log()}")
        if self.auth and not self._auth_enabled:
            self._enable_auth()
        self._token = None
        return self

    def _enable_auth(self) -> None:
        self.call("/v3/auth/role/add", {"name": "root"})
        self.call("/v3/auth/user/add", {"name": "root", "password": ROOT_PASSWORD})
        self.call("/v3/auth/user/grant", {"user": "root", "role": "root"})
        self.call("/v3/auth/enable", {})
        self._auth_enabled = True

    def add_user(self, name: str, password: str, prefix: str) -> None:
        """A user with read/write access to keys under ``prefix`` only."""
        role = f"role-{name}"
        self.call("/v3/auth/role/add", {"name": role})
        self.call("/v3/auth/role/grant", {"name": role, "perm": {
            "permType": "READWRITE", "key": b64(prefix), "range_end": b64(prefix_end(prefix))}})
        self.call("/v3/auth/user/add", {"name": name, "password": password})
        self.call("/v3/auth/user/grant", {"user": name, "role": role})

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def restart(self) -> "EtcdServer":
        """Stop and start again on the same ports and data dir (simple auth tokens die)."""
        self.stop()
        return self.start()

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    # --- a small blocking client ---------------------------------------------------------
    def ssl_context(self) -> ssl.SSLContext | None:
        if not self.tls:
            return None
        ctx = ssl.create_default_context(cafile=self.pki["ca"])
        ctx.load_cert_chain(self.pki["client_cert"], self.pki["client_key"])
        return ctx

    def _request(self, method: str, path: str, body: dict | None, *, auth: bool = True,
                 timeout: float = 10.0) -> tuple[int, bytes]:
        if self.tls:
            conn = http.client.HTTPSConnection("127.0.0.1", self.client_port, timeout=timeout,
                                               context=self.ssl_context())
        else:
            conn = http.client.HTTPConnection("127.0.0.1", self.client_port, timeout=timeout)
        headers = {"Content-Type": "application/json"}
        if auth and self._auth_enabled:
            if self._token is None:
                self._token = self._authenticate()
            headers["Authorization"] = self._token
        try:
            conn.request(method, path, body=None if body is None else json.dumps(body),
                         headers=headers)
            r = conn.getresponse()
            return r.status, r.read()
        finally:
            conn.close()

    def _authenticate(self) -> str:
        status, body = self._request("POST", "/v3/auth/authenticate",
                                     {"name": "root", "password": ROOT_PASSWORD}, auth=False)
        if status != 200:
            raise EtcdError(f"authenticate: {status} {body!r}")
        return json.loads(body)["token"]

    def call(self, path: str, body: dict) -> dict:
        """POST one gateway request; raise EtcdError on an error answer."""
        status, raw = self._request("POST", path, body)
        if status == 401 and self._auth_enabled:
            self._token = None
            status, raw = self._request("POST", path, body)
        if status != 200:
            raise EtcdError(f"{path}: {status} {raw!r}")
        return json.loads(raw)

    def put(self, key: str, value: str | dict, lease: int | None = None) -> int:
        """Put ``key``; a dict value is stored as JSON. Returns the new store revision."""
        v = json.dumps(value) if isinstance(value, dict) else value
        body = {"key": b64(key), "value": b64(v)}
        if lease:
            body["lease"] = lease
        return int(self.call("/v3/kv/put", body)["header"]["revision"])

    def delete(self, key: str) -> int:
        return int(self.call("/v3/kv/deleterange", {"key": b64(key)})["header"]["revision"])

    def get_prefix(self, prefix: str) -> dict[str, str]:
        r = self.call("/v3/kv/range", {"key": b64(prefix), "range_end": b64(prefix_end(prefix))})
        return {unb64(kv["key"]): unb64(kv.get("value", "")) for kv in r.get("kvs", [])}

    def lease_of(self, key: str) -> int:
        """The lease id ``key`` is attached to (0: none, or no such key)."""
        kvs = self.call("/v3/kv/range", {"key": b64(key)}).get("kvs") or [{}]
        return int(kvs[0].get("lease", 0))

    def revision(self) -> int:
        answer = self.call("/v3/kv/range", {"key": b64("\0"), "count_only": True})
        return int(answer["header"]["revision"])

    def compact(self, revision: int | None = None) -> int:
        rev = revision if revision is not None else self.revision()
        self.call("/v3/kv/compaction", {"revision": rev, "physical": True})
        return rev

    def grant(self, ttl: int) -> int:
        return int(self.call("/v3/lease/grant", {"TTL": ttl})["ID"])

    def lease_ttl(self, lease: int) -> int:
        """Remaining TTL of ``lease`` (-1 when it is gone)."""
        return int(self.call("/v3/lease/timetolive", {"ID": lease}).get("TTL", -1))


# --- a cuttable TCP proxy ----------------------------------------------------------------

class TcpProxy:
    """Forward 127.0.0.1:``port`` to ``target_port``; ``cut()`` drops every connection and
    makes new ones fail (accepted, then closed at once) until ``restore()``."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.port = free_port()
        self.connections = 0  # accepted while up
        self.up = True
        self._writers: set[asyncio.StreamWriter] = set()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server = None

    def start(self) -> "TcpProxy":
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    async def _start(self):
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port,
                                                  reuse_address=True)

    async def _handle(self, reader, writer):
        if not self.up:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.transport.abort()
            return
        self.connections += 1
        self._writers.update((writer, up_writer))

        async def pipe(src, dst):
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (OSError, asyncio.CancelledError):
                pass
            finally:
                dst.transport.abort()
                self._writers.discard(dst)

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    def _call(self, fn):
        async def run():
            fn()
        asyncio.run_coroutine_threadsafe(run(), self._loop).result(10)

    def cut(self) -> None:
        def do():
            self.up = False
            for w in list(self._writers):
                w.transport.abort()
            self._writers.clear()
        self._call(do)

    def restore(self) -> None:
        def do():
            self.up = True
        self._call(do)

    def stop(self) -> None:
        def do():
            self.up = False
            for w in list(self._writers):
                w.transport.abort()
            if self._server is not None:
                self._server.close()
        self._call(do)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)


def etcd_available() -> str:
    """The etcd binary path; fails (never skips) when the package is missing."""
    if not os.path.exists(ETCD):
        raise RuntimeError("etcd not found: install Debian's etcd-server "
                           "(ci/install-system-deps.sh)")
    return ETCD
