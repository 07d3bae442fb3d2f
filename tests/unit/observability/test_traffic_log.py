"""Traffic logging: the bounded batch queue, its drop counter, the SQLite and file stores."""

from __future__ import annotations

import asyncio
import json
import sqlite3

from dispa.observability.metrics import WorkerMetrics
from dispa.observability.redaction import Redactor
from dispa.observability.traffic_log import (
    COLUMNS, DROPPED, BatchWriter, FileStore, SqliteStore, TrafficLog, make_row)

from tests.unit.observability.test_access_log import _ex

RED = Redactor({"mask_headers": ["authorization", "cookie"], "mask_query_params": ["token"]})


class BlockedStore:
    """A store whose writes wait until the test opens the gate (the issue's deliberately
    blocked store); it records every batch it was given."""

    label = "blocked"

    def __init__(self):
        self.gate = asyncio.Event()
        self.batches: list[list] = []

    async def open(self):
        pass

    async def write(self, rows):
        await self.gate.wait()
        self.batches.append(list(rows))

    async def close(self):
        pass


def _counter(metrics: WorkerMetrics, name: str) -> float:
    for n, labels, v in metrics.export()["counters"]:
        if n == name:
            return v
    return 0.0


def test_row_is_redacted_and_complete():
    row = make_row(_ex(), RED, 1)
    assert len(row) == len(COLUMNS)
    d = dict(zip(COLUMNS, row))
    assert d["target"] == "/a?token=***&card=************1111"
    headers = dict(json.loads(d["request_headers"]))
    assert headers["Authorization"] == "***" and headers["Cookie"] == "***"
    assert d["status"] == 200 and d["worker"] == 1 and d["attempts"] == 1
    assert d["duration_ms"] == 12.3 and d["upstream_ms"] == 10.0


def test_blocked_store_drops_beyond_the_queue_and_counts():
    async def main():
        metrics = WorkerMetrics()
        store = BlockedStore()
        w = BatchWriter(store, queue_size=50, batch_size=10, flush_interval=0.01,
                        metrics=metrics)
        for i in range(120):
            w.put((i,))
            await asyncio.sleep(0)  # let the writer take a batch (and block in it)
        assert len(w.queue) == 50 and w.dropped == 70
        assert _counter(metrics, DROPPED) == 70
        store.gate.set()
        await w.flush()
        written = [r[0] for b in store.batches for r in b]
        assert written == list(range(50))  # in order, nothing queued is lost
        assert all(len(b) <= 10 for b in store.batches)

    asyncio.run(main())


def test_failed_batches_are_retried_not_lost():
    class Flaky(BlockedStore):
        fails = 2

        async def write(self, rows):
            if self.fails:
                self.fails -= 1
                raise OSError("database is down")
            self.batches.append(list(rows))

    async def main():
        store = Flaky()
        w = BatchWriter(store, 1000, 100, 0.01)
        for i in range(30):
            w.put((i,))
        await w.flush()
        assert [r[0] for b in store.batches for r in b] == list(range(30))

    asyncio.run(main())


def test_sqlite_and_file_stores(tmp_path):
    class Ctx:
        loop = None
        metrics = WorkerMetrics()
        worker_id = 0

    async def main():
        spec = {"queue_size": 1000, "batch_size": 7, "flush_interval": 0.05,
                "retention_days": 30,
                "file": {"path": str(tmp_path / "traffic.log"), "rotation": {}},
                "database": {"url": f"sqlite://{tmp_path}/t.db", "max_connections": 1,
                             "connection_timeout": 5.0, "table": "traffic_log"}}
        sink = TrafficLog(spec, {"mask_headers": ["authorization", "cookie"],
                                 "mask_query_params": ["token"], "card_numbers": True}, Ctx())
        for i in range(25):
            sink(_ex(request_id=f"r{i}"))
        await sink.flush()

    asyncio.run(main())
    db = sqlite3.connect(tmp_path / "t.db")
    rows = db.execute("SELECT request_id, target, request_headers FROM traffic_log "
                      "ORDER BY id").fetchall()
    assert [r[0] for r in rows] == [f"r{i}" for i in range(25)]
    assert all("SECRET" not in r[2] and "s3cr3t" not in r[1] for r in rows)
    lines = (tmp_path / "traffic.log").read_text().splitlines()
    assert len(lines) == 25 and json.loads(lines[0])["request_headers"][0] == ["Host",
                                                                               "example.com"]
    for f in tmp_path.iterdir():
        data = f.read_bytes()
        assert b"4111111111111111" not in data and b"SECRET-TOKEN-1" not in data


def test_sqlite_retention_deletes_old_rows(tmp_path):
    async def main():
        s = SqliteStore(str(tmp_path / "r.db"), "traffic_log", 5.0)
        await s.open()
        old = make_row(_ex(start=1_000_000.0), RED, 0)
        new = make_row(_ex(start=2_000_000_000.0), RED, 0)
        await s.write([old, new])
        assert await s.delete_older(1_500_000_000.0) == 1
        await s.close()

    asyncio.run(main())
    assert sqlite3.connect(tmp_path / "r.db").execute(
        "SELECT count(*) FROM traffic_log").fetchone() == (1,)


def test_file_store_reopen(tmp_path):
    async def main():
        s = FileStore(str(tmp_path / "t.log"))
        await s.open()
        await s.write([make_row(_ex(), RED, 0)])
        (tmp_path / "t.log").rename(tmp_path / "t.log.1")
        s.reopen()
        await s.write([make_row(_ex(), RED, 0)])
        await s.close()

    asyncio.run(main())
    assert len((tmp_path / "t.log").read_text().splitlines()) == 1
    assert len((tmp_path / "t.log.1").read_text().splitlines()) == 1


def test_records_the_store_never_took_are_counted_at_shutdown():
    """The store is down for the whole shutdown budget: the records still queued are
    reported and counted as dropped (written + dropped == sent), never silently lost."""
    class Down(BlockedStore):
        async def open(self):
            raise OSError("connection refused")

    async def main():
        metrics = WorkerMetrics()
        w = BatchWriter(Down(), 1000, 100, 0.01, metrics=metrics, timeout=0.3)
        for i in range(30):
            w.put((i,))
        await w.flush()
        assert w.written == 0 and w.dropped == 30 and not w.queue
        assert _counter(metrics, DROPPED) == 30

    asyncio.run(main())
