"""Log files: the workers' buffered O_APPEND writer and the master's rotator.

Theory of operation
-------------------
Every worker appends to the *same* file (one access log, one traffic log), each through its
own :class:`AppendFile`: lines are appended to a list and written with **one** ``write(2)``
per flush, when ``buffer_size`` bytes are pending or ``flush_interval`` seconds after the
first pending line (``loop.call_later``), never per request. The file is opened with
``O_APPEND``: the kernel moves the offset to the end and writes under the inode lock, so
whole buffers from different workers never interleave or overwrite each other on a local
file system (every flush ends on a line boundary, so lines stay whole). One shared file was
chosen over one file per worker because operators and log shippers expect one
``access.log``, and because rotation then has one owner: the master.

Rotation (:class:`LogRotator`, in the master) checks each file every
``CHECK_INTERVAL`` seconds: when it reaches ``max_bytes``, or an hour/day boundary has
passed since it was opened (``interval``), it renames it to ``<name>.<YYYYmmdd-HHMMSS>``
and tells the workers to reopen (the same ``ReopenLogs`` message that SIGUSR1 sends, which
is what logrotate's ``postrotate`` uses). The rotated file is then compressed (gzip or
zstd) in a thread, after a grace period that lets the workers' last buffered writes land
in it; the compressor re-reads the file if it grew meanwhile, so no line is lost. Rotated
files older than ``retention_days`` are deleted (0 keeps them forever).

Two races, and how they are closed:

* A worker stalled longer than the grace (a blocked event loop) still holds the renamed
  file open and flushes into it late. Each flush takes a shared ``flock`` on its file
  and checks ``st_nlink``; the compressor takes the exclusive lock for its final size
  check, the rename of the compressed file and the unlink. So a late flush either lands
  before that check (the file grew: compressed again) or finds the file unlinked and
  reopens the path, writing into the new file. The lock is held for microseconds (one
  ``write(2)`` / one ``stat`` + rename + unlink), never across the compression itself.
  A file still growing after ``COMPRESS_TRIES`` passes is left uncompressed, not lost.
* Size is polled: between two checks a file grows by (write rate x interval). The
  rotator shortens its next check as a file nears ``max_bytes`` (from the growth rate
  it observed, down to ``MIN_CHECK_INTERVAL``), so the overshoot stays about
  ``rate x MIN_CHECK_INTERVAL`` plus the workers' unflushed buffers (``buffer_size``
  each, at most ``flush_interval`` old).
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import logging
import os
import re
import shutil
import time
from typing import Callable, Optional

log = logging.getLogger("dispa.observability.rotation")

__all__ = ["AppendFile", "LogRotator", "compress_file", "period_key", "rotated_name"]

#: Seconds between two checks of size and time (the master's rotator).
CHECK_INTERVAL = 0.5
#: The shortest interval between checks when a file is about to reach ``max_bytes``.
MIN_CHECK_INTERVAL = 0.05
#: Compression passes over a rotated file that keeps growing before it is left as is.
COMPRESS_TRIES = 5
#: Seconds between a rename and compressing the renamed file: the workers reopen within
#: milliseconds of the message; this covers a flush they had already started.
COMPRESS_GRACE = 2.0
#: Seconds between two retention sweeps.
RETENTION_INTERVAL = 600.0

_ROTATED_RE = r"\.(\d{8}-\d{6})(?:-(\d+))?(\.gz|\.zst)?$"


# ================================================================ worker side

class AppendFile:
    """A buffered, append-only log file (one per worker and path).

    ``write`` never does I/O unless the buffer is full; ``flush`` does one ``write(2)``.
    ``path == "-"`` writes to standard output (no reopen). With ``text = True`` the writer
    takes ``str`` lines and encodes them (UTF-8) once per flush instead of once per line;
    ``buffer_size`` then counts characters.
    """

    text = False

    def __init__(self, path: str, loop: Optional[asyncio.AbstractEventLoop] = None,
                 buffer_size: int = 65536, flush_interval: float = 1.0,
                 on_error: Optional[Callable[[OSError], None]] = None):
        self.path = path
        self.loop = loop
        self.buffer_size = buffer_size
        self.flush_interval = flush_interval
        self.on_error = on_error
        self._buf: list[bytes] = []
        self._size = 0
        self._timer: Optional[asyncio.TimerHandle] = None
        self.fd = -1
        self.written = 0  # bytes, for tests and stats
        self.lockable = True  # flock works on this file (see _write_locked)
        self.open()

    def open(self) -> None:
        if self.path == "-":
            self.fd = 1
            return
        d = os.path.dirname(self.path)
        if d:
            os.makedirs(d, exist_ok=True)
        self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                          0o644)

    def write(self, data) -> None:
        """Queue ``data`` (whole lines, ``bytes``, or ``str`` in text mode); flush when
        the buffer is full, else arm the timer."""
        self._buf.append(data)
        self._size += len(data)
        if self._size >= self.buffer_size:
            self.flush()
        elif self._timer is None and self.loop is not None:
            self._timer = self.loop.call_later(self.flush_interval, self.flush)

    def flush(self) -> None:
        """Write what is pending with one ``write(2)`` (looping only on a short write)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._buf:
            return
        buf = self._buf
        if self.text:
            data = "".join(buf).encode("utf-8", "replace")
        else:
            data = b"".join(buf) if len(buf) > 1 else buf[0]
        buf.clear()  # in place: a sink may hold this list (AccessLog.emit)
        self._size = 0
        try:
            if self.path == "-":
                self._write_all(data)
            else:
                self._write_locked(data)
            self.written += len(data)
        except OSError as e:  # disk full, file system gone: drop this buffer, keep serving
            if self.on_error is not None:
                self.on_error(e)
            else:
                log.warning("log write to %s failed: %s", self.path, e)

    def _write_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = os.write(self.fd, view)
            view = view[n:]

    def _write_locked(self, data: bytes) -> None:
        # The shared lock excludes compress_file's final check-and-unlink (see the module
        # docstring): the file we hold is either still there (and will be re-read) or
        # already unlinked, then the data goes to the path's new file instead.
        fd = self.fd
        if not self.lockable:
            return self._write_all(data)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
        except OSError:  # a file system without flock (some NFS): unlocked appends
            self.lockable = False
            return self._write_all(data)
        try:
            if os.fstat(fd).st_nlink == 0:
                self.open()  # the compressor removed our file: write to the new one
                fcntl.flock(fd, fcntl.LOCK_UN)
                os.close(fd)
                fd = self.fd
                fcntl.flock(fd, fcntl.LOCK_SH)
            self._write_all(data)
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)

    def reopen(self) -> None:
        """Flush into the old file, then open the path again (after a rename)."""
        self.flush()
        if self.path == "-":
            return
        old = self.fd
        try:
            self.open()
        except OSError as e:
            log.error("reopening %s failed: %s; still writing to the old file", self.path, e)
            return
        if old > 2:
            os.close(old)

    def close(self) -> None:
        self.flush()
        if self.fd > 2:
            os.close(self.fd)
        self.fd = -1


# ================================================================ master side

def period_key(t: float, interval: str) -> Optional[str]:
    """The local hour or day ``t`` falls in (None for ``"none"``)."""
    if interval == "none":
        return None
    lt = time.localtime(t)
    if interval == "hourly":
        return time.strftime("%Y%m%d%H", lt)
    return time.strftime("%Y%m%d", lt)


def rotated_name(path: str, t: float) -> str:
    """``<path>.<YYYYmmdd-HHMMSS>`` (``-<n>`` appended if taken, by a file or its .gz)."""
    base = f"{path}.{time.strftime('%Y%m%d-%H%M%S', time.localtime(t))}"
    name, n = base, 1
    while any(os.path.exists(name + ext) for ext in ("", ".gz", ".zst")):
        name = f"{base}-{n}"
        n += 1
    return name


def compress_file(path: str, method: str) -> str:
    """Compress ``path`` to ``path.gz`` / ``path.zst`` and remove it; return the new name.

    Blocking: run it in a thread. If the file grows while it is compressed (a worker's
    late flush), it is compressed again, so no line is lost.
    """
    ext = ".gz" if method == "gzip" else ".zst"
    out = path + ext
    tmp = out + ".tmp"
    for _ in range(COMPRESS_TRIES):
        size = os.path.getsize(path)
        with open(path, "rb") as src, open(tmp, "wb") as dst:
            if method == "gzip":
                import gzip
                with gzip.GzipFile(fileobj=dst, mode="wb", compresslevel=6) as z:
                    shutil.copyfileobj(src, z, 1 << 20)
            else:
                import zstandard
                cctx = zstandard.ZstdCompressor(level=3)
                cctx.copy_stream(src, dst)
            dst.flush()
            os.fsync(dst.fileno())
            # Exclusive lock: no worker is inside a flush (AppendFile._write_locked) between
            # this size check and the unlink; a later flush sees st_nlink == 0 and reopens.
            fcntl.flock(src.fileno(), fcntl.LOCK_EX)
            try:
                if os.fstat(src.fileno()).st_size == size:
                    os.replace(tmp, out)
                    os.unlink(path)
                    return out
            finally:
                fcntl.flock(src.fileno(), fcntl.LOCK_UN)
    # still written to after COMPRESS_TRIES passes: keep it uncompressed rather than lose
    # what a stalled writer adds; the next start of the rotator tries again
    os.unlink(tmp)
    log.warning("rotated log %s kept growing; left uncompressed", path)
    return path


class _Watched:
    __slots__ = ("path", "max_bytes", "interval", "compression", "retention_days", "period",
                 "last_size", "last_mono")

    def __init__(self, path: str, spec: dict, now: float):
        self.path = path
        self.max_bytes = spec.get("max_bytes", 0)
        self.interval = spec.get("interval", "none")
        self.compression = spec.get("compression", "none")
        self.retention_days = spec.get("retention_days", 0)
        self.period = period_key(now, self.interval)
        self.last_size = -1
        self.last_mono = 0.0

    def next_check(self, size: int, mono: float) -> float:
        """Seconds until this file should be checked again: CHECK_INTERVAL, or less when
        its growth rate says it reaches ``max_bytes`` sooner."""
        delay = CHECK_INTERVAL
        if self.max_bytes and 0 <= self.last_size < size and mono > self.last_mono:
            rate = (size - self.last_size) / (mono - self.last_mono)
            delay = max(MIN_CHECK_INTERVAL, min(CHECK_INTERVAL,
                                                (self.max_bytes - size) / rate))
        self.last_size = size
        self.last_mono = mono
        return delay

    def settings(self) -> tuple:
        return (self.max_bytes, self.interval, self.compression, self.retention_days)


def files_of(observability: Optional[dict]) -> dict[str, dict]:
    """{path: rotation spec} of the log files a snapshot's sinks write."""
    out: dict[str, dict] = {}
    obs = observability or {}
    al = obs.get("access_log")
    if al and al.get("path") not in (None, "-"):
        out[al["path"]] = al.get("rotation") or {}
    tl = obs.get("traffic_log")
    if tl and tl.get("file"):
        out[tl["file"]["path"]] = tl["file"].get("rotation") or {}
    return out


class LogRotator:
    """The master's rotation loop over the log files of the current snapshot.

    ``reopen`` is called (in the loop) after each rename; the master forwards it to every
    worker as ``ReopenLogs``. ``now`` is injectable for tests of time rotation.
    """

    def __init__(self, reopen: Callable[[], None], now: Callable[[], float] = time.time):
        self.reopen = reopen
        self.now = now
        self.files: dict[str, _Watched] = {}
        self._task: Optional[asyncio.Task] = None
        self._jobs: set[asyncio.Future] = set()
        self._last_sweep = 0.0
        self.rotations = 0
        self.delay = CHECK_INTERVAL  # until the next check (tick sets it)

    def configure(self, observability: Optional[dict]) -> None:
        """Watch the files of a (new) snapshot; start or stop the loop as needed."""
        now = self.now()
        new: dict[str, _Watched] = {}
        for path, spec in files_of(observability).items():
            w = _Watched(path, spec, now)
            old = self.files.get(path)
            if old is not None and old.settings() == w.settings():
                w.period = old.period
            new[path] = w
        self.files = new
        active = any(w.max_bytes or w.interval != "none" or w.retention_days
                     or w.compression != "none" for w in new.values())
        if active and self._task is None:
            self._last_sweep = 0.0
            self._task = asyncio.ensure_future(self._run())
        elif not active and self._task is not None:
            self._task.cancel()
            self._task = None

    async def _run(self) -> None:
        # on start: compress what a previous run rotated but did not compress, sweep
        for w in list(self.files.values()):
            for name in self._rotated(w.path):
                if w.compression != "none" and not name.endswith((".gz", ".zst")):
                    self._compress_later(name, w.compression, 0.0)
        while True:
            try:
                self.tick()
            except Exception:  # noqa: BLE001 - a failing check must not stop rotation
                log.exception("log rotation check failed")
                self.delay = CHECK_INTERVAL
            await asyncio.sleep(self.delay)

    def tick(self) -> list[str]:
        """One check of every file; returns the names it rotated to."""
        now = self.now()
        mono = time.monotonic()
        rotated = []
        delay = CHECK_INTERVAL
        for w in self.files.values():
            try:
                size = os.path.getsize(w.path)
            except OSError:
                continue
            delay = min(delay, w.next_check(size, mono))
            period = period_key(now, w.interval)
            due = (w.max_bytes and size >= w.max_bytes) or (
                period is not None and period != w.period and size > 0)
            if period is not None and period != w.period and not size:
                w.period = period
            if due:
                name = rotated_name(w.path, now)
                try:
                    os.rename(w.path, name)
                except OSError as e:
                    log.error("rotating %s failed: %s", w.path, e)
                    continue
                w.period = period
                w.last_size = 0  # the path starts again from empty
                rotated.append(name)
                self.rotations += 1
                log.info("log file rotated", extra={"fields": {
                    "path": w.path, "to": name, "bytes": size}})
                if w.compression != "none":
                    self._compress_later(name, w.compression, COMPRESS_GRACE)
        self.delay = delay
        if rotated:
            self.reopen()
        if rotated or now - self._last_sweep >= RETENTION_INTERVAL:
            self._last_sweep = now
            for w in self.files.values():
                self.sweep(w, now)
        return rotated

    def _rotated(self, path: str) -> list[str]:
        d, base = os.path.split(path)
        pat = re.compile(re.escape(base) + _ROTATED_RE)
        try:
            names = os.listdir(d or ".")
        except OSError:
            return []
        return sorted(os.path.join(d, n) for n in names if pat.match(n))

    def sweep(self, w: _Watched, now: float) -> list[str]:
        """Delete rotated files of ``w`` older than its retention; returns their names."""
        if not w.retention_days:
            return []
        limit = now - w.retention_days * 86400.0
        removed = []
        for name in self._rotated(w.path):
            try:
                if os.path.getmtime(name) < limit:
                    os.unlink(name)
                    removed.append(name)
            except OSError:
                continue
        if removed:
            log.info("old log files removed", extra={"fields": {"files": removed}})
        return removed

    def _compress_later(self, name: str, method: str, delay: float) -> None:
        async def job():
            await asyncio.sleep(delay)
            try:
                out = await asyncio.to_thread(compress_file, name, method)
                if out != name:
                    log.info("rotated log compressed", extra={"fields": {"path": out}})
            except OSError as e:
                if e.errno != errno.ENOENT:
                    log.error("compressing %s failed: %s", name, e)

        fut = asyncio.ensure_future(job())
        self._jobs.add(fut)
        fut.add_done_callback(self._jobs.discard)

    async def close(self) -> None:
        """Stop checking; let compressions already started finish."""
        if self._task is not None:
            self._task.cancel()
            self._task = None
        if self._jobs:
            await asyncio.gather(*self._jobs, return_exceptions=True)
