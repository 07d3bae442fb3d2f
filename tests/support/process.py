"""A real server run as a child process for tests: its output in a log file, a readiness
poll with a deadline, and a stop that never leaves it running.

``ServerProcess`` is the base of the test servers started from a system package
(tests/support/bind9.py, tests/support/pebble.py): a subclass calls ``_spawn`` and then
``_wait_ready`` with its own probe, and gets ``log()``, ``stop()`` and the context manager.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Callable


class ServerProcess:
    """A child server logging to ``log_path``; use as a context manager or call ``stop()``."""

    #: what the server is called in errors
    NAME = "server"
    #: how many characters of the log ``log()`` returns (the tail)
    LOG_TAIL = 4000

    proc: subprocess.Popen
    log_path: Path

    def _spawn(self, cmd: list[str], log_path: Path, **popen) -> None:
        self.log_path = Path(log_path)
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, **popen)

    def _wait_ready(self, probe: Callable[[], bool], timeout: float = 20.0) -> None:
        """Poll ``probe`` (an OSError counts as not ready) until it is true; raise with the
        log if the server exits or is not ready within ``timeout`` (then it is stopped)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.NAME} exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if probe():
                    return
            except OSError:
                pass
            time.sleep(0.05)  # polling a starting server: nothing to wait on instead
        self.stop()
        raise RuntimeError(f"{self.NAME} did not answer within {timeout}s:\n{self.log()}")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-self.LOG_TAIL:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
