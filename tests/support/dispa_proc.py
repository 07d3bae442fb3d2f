"""Start real ``dispa-server`` processes for integration and e2e tests."""

from __future__ import annotations

import collections
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


_recent_ports: collections.deque = collections.deque(maxlen=256)


def free_port() -> int:
    """A loopback port nothing listens on now, and not one this process handed out
    recently: the kernel may give the same ephemeral port to two bind(0) calls in a row
    once the first socket is closed (a test's proxy and admin ports then collided)."""
    for _ in range(64):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _recent_ports:
            _recent_ports.append(port)
            return port
    raise RuntimeError("no fresh loopback port in 64 tries")


def render_config(*, port: int, admin_port: int, targets: list[tuple[str, str]] | list,
                  lb: str = "roundrobin", workers: int = 1, health: dict | None = None,
                  domains: dict | None = None, server_extra: str = "", extra: str = "") -> str:
    """A config in the original Dispa TOML format, pointed at loopback targets."""
    lines = ["[server]", f'bind_address = "127.0.0.1:{port}"', f"workers = {workers}",
             server_extra, "", "[domains]"]
    d = domains or {"intercept_domains": []}
    for k, v in d.items():
        lines.append(f"{k} = {json.dumps(v)}")
    lines.append("")
    for t in targets:
        name, url, *rest = t
        weight = rest[0] if rest else 1
        lines += ["[[targets.targets]]", f'name = "{name}"', f'url = "{url}"', f"weight = {weight}", ""]
    lines += ["[targets.load_balancing]", f'type = "{lb}"', "", "[targets.health_check]"]
    h = {"enabled": False} if health is None else health
    for k, v in h.items():
        lines.append(f"{k} = {json.dumps(v)}")
    lines += ["", "[monitoring]", "enabled = true", 'bind_host = "127.0.0.1"',
              f"metrics_port = {admin_port}", f"health_check_port = {admin_port}", "",
              "[logging]", "enabled = false", 'format = "json"', 'level = "info"', "", extra]
    return "\n".join(lines)


class DispaProcess:
    """A running dispa-server; ``stop()`` sends SIGTERM and waits."""

    def __init__(self, config_path: Path, *, workers: str | None = None, env: dict | None = None,
                 args: list[str] | None = None, port: int = 0, admin_port: int = 0):
        self.config_path = config_path
        self.port = port
        self.admin_port = admin_port
        cmd = [sys.executable, "-m", "dispa.server", "--config", str(config_path)]
        if workers is not None:
            cmd += ["--workers", workers]
        cmd += args or []
        self.log_path = config_path.with_suffix(".log")
        self._log = open(self.log_path, "wb")
        full_env = dict(os.environ)
        full_env.update(env or {})
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT,
                                     env=full_env)

    def wait_ready(self, timeout: float = 30.0, workers: int | None = None) -> "DispaProcess":
        """Wait until /admin/status shows ``workers`` ready workers (or any, if None)."""
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"dispa-server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                st = self.status()
                ready = [w for w in st["workers"] if w["state"] == "ready"]
                if ready and (workers is None or len(ready) == workers):
                    return self
                last = st
            except (OSError, http.client.HTTPException, ValueError) as exc:
                last = exc
            time.sleep(0.05)
        raise TimeoutError(f"dispa-server not ready: {last}\n{self.log()}")

    def admin_get(self, path: str) -> tuple[int, bytes]:
        c = http.client.HTTPConnection("127.0.0.1", self.admin_port, timeout=10)
        try:
            c.request("GET", path)
            r = c.getresponse()
            return r.status, r.read()
        finally:
            c.close()

    def status(self) -> dict:
        code, body = self.admin_get("/admin/status")
        if code != 200:
            raise ValueError(code)
        return json.loads(body)

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-6000:]

    def signal(self, sig) -> None:
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()
        return self.proc.returncode


def http_get(port: int, path: str = "/", host: str = "example.com", timeout: float = 10.0,
             method: str = "GET", headers: dict | None = None, body: bytes | None = None
             ) -> tuple[int, dict, bytes]:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        h = {"Host": host}
        h.update(headers or {})
        c.request(method, path, body=body, headers=h)
        r = c.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        c.close()


def read_one_response(sock, *, method: bytes = b"GET") -> tuple[int, bytes, bytes]:
    """Read exactly one HTTP/1.1 response from ``sock``: (status, raw head, body).

    TCP gives no message boundaries; a response may arrive in any number of
    segments, so tests must never assume one ``recv`` holds a whole response.
    Bytes that follow the response in the same segment are discarded, so use
    it for the last response expected before the peer closes or goes idle.
    """
    import h11

    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method=method, target="/", headers=[("Host", "x")]))
    conn.send(h11.EndOfMessage())
    head, body, status = b"", b"", 0
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            chunk = sock.recv(65536)
            conn.receive_data(chunk)
            if not chunk:
                raise ConnectionError("connection closed before the response was complete")
            continue
        if isinstance(event, h11.Response):
            status = event.status_code
            head = b"".join(k + b": " + v + b"\r\n" for k, v in event.headers)
        elif isinstance(event, h11.Data):
            body += bytes(event.data)
        elif isinstance(event, h11.EndOfMessage):
            return status, head, body


def wait_for(cond, timeout: float = 20.0, what: str = "condition"):
    """Poll ``cond()`` (every 50 ms, bounded by ``timeout``) until it returns something true;
    return that value or fail naming ``what``. For states a test cannot be told about."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")
