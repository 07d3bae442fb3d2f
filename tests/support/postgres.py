"""A real PostgreSQL server for tests (Debian's postgresql package), on 127.0.0.1.

``initdb`` and ``postgres`` refuse to run as root; under root (CI containers) the data
directory is handed to the unprivileged ``nobody`` user and both run through ``runuser``.
The server listens on a free loopback port with ``trust`` authentication (tests only) and
a Unix socket inside its temporary directory; :meth:`Postgres.stop` shuts it down fast.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import time

from tests.support.dispa_proc import free_port


def _bindir() -> str:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found:
        raise RuntimeError("PostgreSQL is not installed (apt-get install postgresql): "
                           "/usr/lib/postgresql/*/bin/initdb not found")
    return os.path.dirname(found[-1])


class Postgres:
    """``Postgres().start()``; ``dsn``; ``query(sql)``; ``stop()``."""

    def __init__(self, user: str = "nobody"):
        self.bindir = _bindir()
        self.root = tempfile.mkdtemp(prefix="dispa-pg-")
        self.data = os.path.join(self.root, "data")
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.as_user = user if os.geteuid() == 0 else None
        self.log_path = os.path.join(self.root, "postgres.log")

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _cmd(self, argv: list[str]) -> list[str]:
        if self.as_user:
            return ["runuser", "-u", self.as_user, "--"] + argv
        return argv

    def start(self, timeout: float = 60.0) -> "Postgres":
        if self.as_user:
            os.chmod(self.root, 0o777)
            shutil.chown(self.root, user=self.as_user)
        r = subprocess.run(self._cmd([os.path.join(self.bindir, "initdb"), "-D", self.data,
                                      "-U", "postgres", "-A", "trust", "-E", "UTF8",
                                      "--no-sync"]),
                           capture_output=True, text=True, timeout=timeout)
        if r.returncode != 0:
            raise RuntimeError(f"initdb failed: {r.stdout}\n{r.stderr}")
        log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            self._cmd([os.path.join(self.bindir, "postgres"), "-D", self.data,
                       "-k", self.root, "-p", str(self.port), "-h", "127.0.0.1",
                       "-c", "fsync=off", "-c", "synchronous_commit=off",
                       "-c", "full_page_writes=off", "-c", "max_connections=50",
                       "-c", "shared_buffers=16MB"]),
            stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"postgres exited with {self.proc.returncode}:\n"
                                   + self.log())
            try:
                self.query("SELECT 1")
                return self
            except Exception as e:  # noqa: BLE001 - not accepting connections yet
                last = str(e)
            time.sleep(0.1)
        self.stop()
        raise TimeoutError(f"postgres did not accept connections: {last}\n{self.log()}")

    def log(self) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()[-4000:]
        except OSError:
            return ""

    def query(self, sql: str, *args):
        """Run one statement on a fresh connection (asyncpg); rows as a list of Records."""
        import asyncio

        import asyncpg

        async def run():
            c = await asyncpg.connect(self.dsn, timeout=5)
            try:
                return await c.fetch(sql, *args)
            finally:
                await c.close()
        return asyncio.run(run())

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: "smart" shutdown; SIGINT would be "fast"
            self.proc.send_signal(2)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        shutil.rmtree(self.root, ignore_errors=True)
