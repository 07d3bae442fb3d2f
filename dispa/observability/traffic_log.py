"""Traffic logging (the original Dispa feature): one record per request, to a JSON-lines
file, SQLite or PostgreSQL, batched off the request path.

Theory of operation
-------------------
``[logging] enabled/type`` with ``[logging.file]`` and ``[logging.database]`` compile to
``Snapshot.observability["traffic_log"]`` (config/logging_model.py). :func:`factory` builds
one :class:`TrafficLog` sink per worker with one :class:`BatchWriter` per store
(``type = "both"``: the file and the database, each with its own queue).

For each exchange the sink builds one row (a tuple in :data:`COLUMNS` order, every string
redacted) and appends it to each writer's **bounded** deque: O(1), no I/O. When a queue
holds ``queue_size`` rows (the store is slower than the traffic) the row is dropped and
``dispa_traffic_log_dropped_total{store}`` counts it, so memory stays bounded and requests
never wait for the database. Each writer's task takes up to ``batch_size`` rows every
``flush_interval`` seconds (sooner when a batch is full) and writes them in one call:
``executemany`` in one transaction (SQLite, in its own thread: sqlite3 blocks), binary
``COPY`` (PostgreSQL, asyncpg), one ``write(2)`` (file). Rows leave the queue only once
written; a failed batch is retried with back-off (``dispa_traffic_log_errors_total``).
On graceful shutdown the worker awaits :meth:`TrafficLog.flush`, which writes everything
queued (bounded by ``connection_timeout``): no record is lost.

The schema (created if absent; docs/logging.md) is the same in both databases, with
``ts`` as ``timestamptz`` in PostgreSQL and ISO-8601 UTC text in SQLite. Worker 0 deletes
rows older than ``retention_days`` at start and hourly.

asyncpg and sqlite3 are imported only by workers whose config uses them.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import time
from typing import Any, Optional

import msgspec

from dispa.observability.redaction import build_redactor

log = logging.getLogger("dispa.observability.traffic_log")

__all__ = ["COLUMNS", "BatchWriter", "TrafficLog", "factory", "make_row", "open_store"]

#: Column order of a row (and of the tables).
COLUMNS = ("ts", "request_id", "worker", "client_ip", "method", "scheme", "host", "target",
           "protocol", "status", "duration_ms", "bytes_in", "bytes_out", "route", "cluster",
           "endpoint", "upstream_ms", "attempts", "error", "request_headers")

DROPPED = "dispa_traffic_log_dropped_total"
ERRORS = "dispa_traffic_log_errors_total"
WRITTEN = "dispa_traffic_log_written_total"
RETENTION_INTERVAL = 3600.0

_json = msgspec.json.Encoder()


def iso_utc(ts: float) -> str:
    """``2026-11-29T04:28:28.123456Z``."""
    sec = int(ts)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec)) + ".%06dZ" % int(
        (ts - sec) * 1e6)


def make_row(ex, red, worker: int) -> tuple:
    """One exchange as a redacted row (``ts`` as epoch seconds; stores convert it).

    Fast path: header values are decoded once, header rules applied by name, and the
    client's strings (target, host, error, unruled header values) are checked together
    with one :meth:`Redactor.suspect`; only when that says a regex or query rule could
    apply does the row go through :func:`make_row_slow` (the reference, field by field),
    so both give the same row.
    """
    rules = red._headers
    target = ex.target
    host = ex.host
    err = ex.error
    headers = []
    scan = [target or "", host or "", err or ""]
    for k, v in ex.request_headers or ():
        k = k.decode("latin-1")
        v = v.decode("latin-1")
        a = rules.get(k.lower()) if rules else None
        if a is None:
            headers.append((k, v))
            scan.append(v)
        elif a != "redact":
            headers.append((k, red.apply(a, v)))
    if (red._needles or red._always or red._qnames) and red.suspect("\0".join(scan)):
        return make_row_slow(ex, red, worker)
    attempts = ex.attempts
    up = ex.upstream_seconds if attempts else None
    route = ex.route
    return (ex.start, ex.request_id or None, worker, red.field("client_ip", ex.client_ip),
            ex.method, ex.scheme or "http", host or None, target, ex.version, ex.status,
            round((ex.duration or 0.0) * 1000.0, 3), ex.bytes_in or 0, ex.bytes_out or 0,
            str(route) if route is not None else None, ex.cluster, ex.endpoint,
            round(up * 1000.0, 3) if up is not None else None, len(attempts),
            err or None, _json.encode(headers).decode("utf-8", "replace"))


def make_row_slow(ex, red, worker: int) -> tuple:
    """:func:`make_row`, every string through the redactor (the reference)."""
    headers = red.headers(ex.request_headers or ())
    up = ex.upstream_seconds
    return (ex.start, ex.request_id or None, worker, red.field("client_ip", ex.client_ip),
            ex.method, ex.scheme or "http", red.text(ex.host) if ex.host else None,
            red.target(ex.target), ex.version, ex.status,
            round((ex.duration or 0.0) * 1000.0, 3), ex.bytes_in or 0, ex.bytes_out or 0,
            str(ex.route) if ex.route is not None else None, ex.cluster, ex.endpoint,
            round(up * 1000.0, 3) if up is not None else None, len(ex.attempts or ()),
            red.text(ex.error) if ex.error else None,
            _json.encode(headers).decode("utf-8", "replace"))


# ================================================================ stores

class FileStore:
    """JSON lines appended to ``path`` (rotated by the master, see rotation.py)."""

    label = "file"

    def __init__(self, path: str):
        self.path = path
        self.file = None

    async def open(self) -> None:
        from dispa.observability.rotation import AppendFile
        # no buffer of its own: the writer already batches, one write(2) per batch
        self.file = AppendFile(self.path, None, buffer_size=0)

    async def write(self, rows: list) -> None:
        out = []
        for r in rows:
            d = dict(zip(COLUMNS, r))
            d["ts"] = iso_utc(r[0])
            d["request_headers"] = msgspec.Raw(r[-1].encode("utf-8"))
            out.append(_json.encode(d))
        out.append(b"")
        self.file.write(b"\n".join(out))  # buffer_size 0: written now

    def reopen(self) -> None:
        if self.file is not None:
            self.file.reopen()

    async def delete_older(self, cutoff: float) -> int:
        return 0  # rotated files are removed by the master's rotator

    async def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


_SQLITE_SCHEMA = """
CREATE TABLE IF NOT EXISTS {t} (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  ts TEXT NOT NULL, request_id TEXT, worker INTEGER, client_ip TEXT, method TEXT,
  scheme TEXT, host TEXT, target TEXT, protocol TEXT, status INTEGER, duration_ms REAL,
  bytes_in INTEGER, bytes_out INTEGER, route TEXT, cluster TEXT, endpoint TEXT,
  upstream_ms REAL, attempts INTEGER, error TEXT, request_headers TEXT);
CREATE INDEX IF NOT EXISTS {t}_ts ON {t} (ts);
"""


class SqliteStore:
    """SQLite through one dedicated thread (sqlite3 calls block)."""

    label = "sqlite"

    def __init__(self, path: str, table: str, timeout: float):
        self.path = path
        self.table = table
        self.timeout = timeout
        self._exec = None
        self._conn = None

    async def open(self) -> None:
        from concurrent.futures import ThreadPoolExecutor
        if self._exec is None:
            self._exec = ThreadPoolExecutor(1, thread_name_prefix="dispa-sqlite")
        await asyncio.get_running_loop().run_in_executor(self._exec, self._open)

    def _open(self) -> None:
        import sqlite3
        if self.path != ":memory:":
            d = os.path.dirname(self.path)
            if d:
                os.makedirs(d, exist_ok=True)
        conn = sqlite3.connect(self.path, timeout=self.timeout, check_same_thread=False,
                               isolation_level=None)
        # WAL: the workers' writers and readers do not block each other
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.executescript("BEGIN IMMEDIATE;" + _SQLITE_SCHEMA.format(t=self.table)
                           + "COMMIT;")
        self._conn = conn
        cols = ", ".join(COLUMNS)
        self._insert = (f"INSERT INTO {self.table} ({cols}) VALUES "
                        f"({', '.join('?' * len(COLUMNS))})")

    def _write(self, rows: list) -> None:
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.executemany(self._insert, [(iso_utc(r[0]),) + r[1:] for r in rows])
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:  # (a failed COMMIT may already have ended it)
                conn.execute("ROLLBACK")
            raise

    async def write(self, rows: list) -> None:
        await asyncio.get_running_loop().run_in_executor(self._exec, self._write, rows)

    def _delete(self, cutoff: float) -> int:
        cur = self._conn.execute(f"DELETE FROM {self.table} WHERE ts < ?", (iso_utc(cutoff),))
        return cur.rowcount

    async def delete_older(self, cutoff: float) -> int:
        return await asyncio.get_running_loop().run_in_executor(self._exec, self._delete,
                                                                cutoff)

    async def close(self) -> None:
        if self._exec is None:
            return
        if self._conn is not None:
            conn, self._conn = self._conn, None
            await asyncio.get_running_loop().run_in_executor(self._exec, conn.close)
        self._exec.shutdown(wait=False)
        self._exec = None


_PG_SCHEMA = """
CREATE TABLE IF NOT EXISTS {t} (
  id BIGSERIAL PRIMARY KEY,
  ts TIMESTAMPTZ NOT NULL, request_id TEXT, worker INTEGER, client_ip TEXT, method TEXT,
  scheme TEXT, host TEXT, target TEXT, protocol TEXT, status INTEGER,
  duration_ms DOUBLE PRECISION, bytes_in BIGINT, bytes_out BIGINT, route TEXT, cluster TEXT,
  endpoint TEXT, upstream_ms DOUBLE PRECISION, attempts INTEGER, error TEXT,
  request_headers JSONB);
CREATE INDEX IF NOT EXISTS {t}_ts ON {t} (ts);
"""


class PostgresStore:
    """PostgreSQL through an asyncpg pool; each batch is one binary ``COPY``."""

    label = "postgresql"

    def __init__(self, dsn: str, table: str, max_connections: int, timeout: float):
        self.dsn = dsn
        self.table = table
        self.max_connections = max_connections
        self.timeout = timeout
        self.pool = None

    async def open(self) -> None:
        import asyncpg  # only in workers that log to PostgreSQL
        self.pool = await asyncpg.create_pool(
            self.dsn, min_size=1, max_size=self.max_connections, timeout=self.timeout,
            command_timeout=None)
        async with self.pool.acquire() as c:
            async with c.transaction():
                # workers start together: serialise CREATE TABLE IF NOT EXISTS (it races)
                await c.execute("SELECT pg_advisory_xact_lock(hashtext($1))", self.table)
                await c.execute(_PG_SCHEMA.format(t=self.table))

    async def write(self, rows: list) -> None:
        import datetime
        utc = datetime.timezone.utc
        fromts = datetime.datetime.fromtimestamp
        records = [(fromts(r[0], utc),) + r[1:] for r in rows]
        # bounded: a server that stops answering (not refusing) fails the batch, which is
        # retried, instead of stalling the writer (and the shutdown flush) forever
        async with self.pool.acquire(timeout=self.timeout) as c:
            await c.copy_records_to_table(self.table, records=records, columns=COLUMNS,
                                          timeout=max(self.timeout, 30.0))

    async def delete_older(self, cutoff: float) -> int:
        import datetime
        async with self.pool.acquire() as c:
            r = await c.execute(f"DELETE FROM {self.table} WHERE ts < $1",
                                datetime.datetime.fromtimestamp(cutoff, datetime.timezone.utc))
        return int(r.split()[-1]) if r else 0

    async def close(self) -> None:
        if self.pool is not None:
            pool, self.pool = self.pool, None
            try:
                await asyncio.wait_for(pool.close(), 5.0)
            except (asyncio.TimeoutError, Exception):  # noqa: BLE001
                pool.terminate()


def sqlite_path(url: str) -> str:
    """``sqlite://./data/t.db`` -> ``./data/t.db``; ``sqlite::memory:`` -> ``:memory:``."""
    if url in ("sqlite::memory:", "sqlite://:memory:"):
        return ":memory:"
    if url.startswith("sqlite://"):
        return url[len("sqlite://"):]
    return url[len("sqlite:"):]


def open_store(spec: dict):
    """The store object for one ``traffic_log`` spec part (not yet opened)."""
    if "path" in spec:
        return FileStore(spec["path"])
    url = spec["url"]
    if url.startswith("sqlite:"):
        return SqliteStore(sqlite_path(url), spec["table"], spec["connection_timeout"])
    return PostgresStore(url, spec["table"], spec["max_connections"],
                         spec["connection_timeout"])


# ================================================================ the queue

class BatchWriter:
    """A bounded queue of rows in front of one store, drained by one task."""

    def __init__(self, store, queue_size: int, batch_size: int, flush_interval: float,
                 metrics=None, retention_days: int = 0, sweeper: bool = False,
                 timeout: float = 30.0):
        self.store = store
        self.queue: collections.deque = collections.deque()
        self.queue_size = queue_size
        self.batch_size = batch_size
        self.flush_interval = flush_interval
        self.metrics = metrics
        self.retention_days = retention_days
        self.sweeper = sweeper
        self.timeout = timeout
        self.dropped = 0
        self.written = 0
        self._labels = (("store", store.label),)
        self._wake = asyncio.Event()
        self._closing = False
        self._task = asyncio.ensure_future(self._run())

    def put(self, row: tuple) -> None:
        """Queue a row, or drop and count it when the queue is full (never blocks)."""
        q = self.queue
        if len(q) >= self.queue_size:
            self.dropped += 1
            if self.metrics is not None:
                self.metrics.inc(DROPPED, self._labels)
            return
        q.append(row)
        if len(q) >= self.batch_size:
            self._wake.set()

    async def _open(self) -> None:
        delay = 0.1
        while True:
            try:
                await self.store.open()
                return
            except Exception as e:  # noqa: BLE001 - keep queueing, retry with back-off
                if self._closing:
                    raise
                self._error("open", e)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    def _error(self, what: str, e: BaseException) -> None:
        if self.metrics is not None:
            self.metrics.inc(ERRORS, self._labels)
        log.warning("traffic log %s %s failed: %s", self.store.label, what, e)

    async def _run(self) -> None:
        try:
            await self._open()
        except Exception:  # noqa: BLE001 - closing before the store ever opened
            return
        last_sweep = 0.0
        delay = 0.1
        while True:
            if not self.queue and self._closing:
                return
            if self.sweeper and self.retention_days and \
                    time.monotonic() - last_sweep > RETENTION_INTERVAL:
                last_sweep = time.monotonic()
                try:
                    n = await self.store.delete_older(
                        time.time() - self.retention_days * 86400.0)
                    if n:
                        log.info("old traffic records deleted",
                                 extra={"fields": {"rows": n, "store": self.store.label}})
                except Exception as e:  # noqa: BLE001
                    self._error("retention", e)
            if len(self.queue) < self.batch_size and not self._closing:
                try:
                    await asyncio.wait_for(self._wake.wait(), self.flush_interval)
                except asyncio.TimeoutError:
                    pass
            self._wake.clear()
            if not self.queue:
                continue
            n = min(len(self.queue), self.batch_size)
            batch = [self.queue[i] for i in range(n)]
            try:
                await self.store.write(batch)
            except Exception as e:  # noqa: BLE001 - keep the rows, retry after a pause
                self._error("write", e)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            delay = 0.1
            for _ in range(n):
                self.queue.popleft()
            self.written += n
            if self.metrics is not None:
                self.metrics.inc(WRITTEN, self._labels, n)

    async def flush(self) -> None:
        """Write everything queued (bounded by ``timeout``), then close the store."""
        self._closing = True
        self._wake.set()
        try:
            await asyncio.wait_for(asyncio.shield(self._task), self.timeout)
        except asyncio.TimeoutError:
            self._task.cancel()
        if self.queue:
            # the store stayed unreachable for the whole shutdown budget: say how many,
            # and count them as dropped so written + dropped still adds up to requests
            n = len(self.queue)
            log.error("traffic log %s: %d records not written at shutdown",
                      self.store.label, n)
            self.dropped += n
            if self.metrics is not None:
                self.metrics.inc(DROPPED, self._labels, n)
            self.queue.clear()
        await self.store.close()

    def reopen(self) -> None:
        fn = getattr(self.store, "reopen", None)
        if fn is not None:
            fn()


class TrafficLog:
    """The sink: one redacted row per exchange, queued to each store's writer."""

    def __init__(self, spec: dict, redaction: Optional[dict], ctx):
        self.spec = spec
        self.redaction = redaction
        self.red = build_redactor(redaction)
        self.worker = getattr(ctx, "worker_id", 0) or 0
        metrics = getattr(ctx, "metrics", None)
        self.writers: list[BatchWriter] = []
        for part in (spec.get("file"), spec.get("database")):
            if not part:
                continue
            store = open_store(part)
            timeout = part.get("connection_timeout", 30.0)
            self.writers.append(BatchWriter(
                store, spec["queue_size"], spec["batch_size"], spec["flush_interval"],
                metrics, spec.get("retention_days", 0), sweeper=self.worker == 0,
                timeout=min(max(timeout, 1.0), 10.0)))

    def __call__(self, ex) -> None:
        row = make_row(ex, self.red, self.worker)
        for w in self.writers:
            w.put(row)

    def reopen(self) -> None:
        for w in self.writers:
            w.reopen()

    async def flush(self) -> None:
        await asyncio.gather(*(w.flush() for w in self.writers))

    async def close(self) -> None:
        await self.flush()


def factory(snapshot, ctx, previous) -> Any:
    """``exchange.SINK_FACTORIES`` entry: the traffic log sink, or None when it is off."""
    obs = getattr(snapshot, "observability", None) or {}
    spec = obs.get("traffic_log")
    if not spec:
        return None
    redaction = obs.get("redaction")
    if previous is not None and previous.spec == spec and previous.redaction == redaction:
        return previous
    return TrafficLog(spec, redaction, ctx)


def _register() -> None:
    from dispa.observability.exchange import SINK_FACTORIES
    if factory not in SINK_FACTORIES:
        SINK_FACTORIES.append(factory)


_register()
