"""Access logs and traffic logging end to end: a real dispa-server, a real origin, a real
PostgreSQL (Debian's) and SQLite; records counted against requests sent, zero loss on
SIGTERM, rotation and compression under a bounded load, SIGUSR1 reopen, the drop counter
with a blocked PostgreSQL table, redaction proven by grepping every sink's output, and the
log level changed at runtime in every process.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import glob
import gzip
import http.client
import json
import os
import signal
import sqlite3
import threading
import time
from pathlib import Path

import pytest
import zstandard

from tests.support.dispa_proc import DispaProcess, free_port, render_config, wait_for
from tests.support.origin import Origin
from tests.support.postgres import Postgres

# Secrets every request carries; none may appear in any sink's output.
CARD = "4111111111111111"
BEARER = "SeCrEtBeArErToKeN-0123456789"
COOKIE = "CoOkIeSeSsIoN-9876543210"
QTOKEN = "QuErYtOkEn-abcdef"
SECRETS = (CARD, BEARER, COOKIE, QTOKEN)
HEADERS = {"Authorization": f"Bearer {BEARER}", "Cookie": f"sid={COOKIE}",
           "User-Agent": "e2e/1.0", "Referer": f"https://shop.example/?card={CARD}"}


@pytest.fixture(scope="module")
def pg():
    server = Postgres().start()
    yield server
    server.stop()


@pytest.fixture
def origin():
    o = Origin("origin-log").start()
    yield o
    o.stop()


def _start(tmp_path: Path, origin: Origin, logging_toml: str, workers: int = 2
           ) -> DispaProcess:
    port, admin = free_port(), free_port()
    cfg = render_config(port=port, admin_port=admin, workers=workers,
                        targets=[("a", f"http://127.0.0.1:{origin.port}")])
    # replace the helper's [logging] table by the test's
    head, _, _ = cfg.partition("[logging]")
    path = tmp_path / "dispa.toml"
    path.write_text(head + logging_toml)
    return DispaProcess(path, port=port, admin_port=admin).wait_ready(workers=workers)


def _burst(port: int, n: int, threads: int = 4, prefix: str = "r") -> int:
    """``n`` requests over ``threads`` keep-alive connections; returns the 200s."""
    def run(k: int) -> int:
        ok = 0
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            for i in range(k, n, threads):
                c.request("GET", f"/?i={prefix}{i}&card={CARD}&token={QTOKEN}",
                          headers={"Host": "example.com", **HEADERS})
                r = c.getresponse()
                r.read()
                ok += r.status == 200
        finally:
            c.close()
        return ok

    with concurrent.futures.ThreadPoolExecutor(threads) as ex:
        return sum(ex.map(run, range(threads)))


def _assert_no_secrets(data: bytes, where: str) -> None:
    for s in SECRETS:
        assert s.encode() not in data, f"{s} leaked into {where}"


def _logging(tmp_path: Path, db_url: str, extra: str = "") -> str:
    # long flush intervals and large batches: at SIGTERM most records are still queued,
    # so only the shutdown flush can write them
    return f"""
[logging]
enabled = true
type = "both"
retention_days = 30
level = "info"

[logging.file]
directory = "{tmp_path}"
rotation = false

[logging.database]
url = "{db_url}"
batch_size = 5000
flush_interval = 30

[logging.access_log]
enabled = true
format = "combined"
buffer_size = 1048576
flush_interval = 30
{extra}
"""


N = 300


def test_sqlite_file_and_access_log_count_exactly_n_and_nothing_leaks(tmp_path, origin):
    d = _start(tmp_path, origin, _logging(tmp_path, f"sqlite://{tmp_path}/traffic.db"))
    assert _burst(d.port, N) == N
    assert d.stop() == 0  # SIGTERM right after the burst
    db = sqlite3.connect(tmp_path / "traffic.db")
    assert db.execute("SELECT count(*) FROM traffic_log").fetchone() == (N,)
    assert db.execute("SELECT count(DISTINCT request_id) FROM traffic_log").fetchone() == (N,)
    assert db.execute("SELECT count(*) FROM traffic_log WHERE status = 200 AND "
                      "target LIKE '/?i=r%&card=************1111&token=***'").fetchone() == (N,)
    headers = dict(json.loads(db.execute(
        "SELECT request_headers FROM traffic_log LIMIT 1").fetchone()[0]))
    assert headers["Authorization"] == "***" and headers["Cookie"] == "***"
    db.close()
    access = (tmp_path / "access.log").read_text().splitlines()
    assert len(access) == N
    assert all(' 200 ' in x and '"e2e/1.0"' in x for x in access)
    traffic = (tmp_path / "traffic.log").read_text().splitlines()
    assert len(traffic) == N and len({json.loads(x)["request_id"] for x in traffic}) == N
    for f in tmp_path.iterdir():  # every sink: access log, JSON lines, SQLite (+WAL)
        if f.name not in ("dispa.toml", "dispa.log"):
            _assert_no_secrets(f.read_bytes(), f.name)


def test_postgresql_counts_exactly_n_after_sigterm_and_nothing_leaks(tmp_path, origin, pg):
    pg.query("DROP TABLE IF EXISTS traffic_pg")
    d = _start(tmp_path, origin, _logging(tmp_path, pg.dsn, extra="").replace(
        'flush_interval = 30\n\n[logging.access_log]',
        'flush_interval = 30\ntable = "traffic_pg"\nmax_connections = 2\n\n'
        '[logging.access_log]'))
    assert _burst(d.port, N) == N
    assert d.stop() == 0
    assert pg.query("SELECT count(*) FROM traffic_pg")[0][0] == N
    assert pg.query("SELECT count(DISTINCT request_id) FROM traffic_pg")[0][0] == N
    assert pg.query("SELECT count(DISTINCT worker) FROM traffic_pg")[0][0] >= 1
    rows = pg.query("SELECT * FROM traffic_pg")
    dump = "\n".join(repr(dict(r)) for r in rows).encode()
    _assert_no_secrets(dump, "PostgreSQL rows")
    assert rows[0]["request_headers"] and "***" in rows[0]["request_headers"]
    assert len((tmp_path / "access.log").read_text().splitlines()) == N


def test_drop_counter_when_postgresql_is_blocked(tmp_path, origin, pg):
    pg.query("DROP TABLE IF EXISTS traffic_slow")
    toml = f"""
[logging]
enabled = true
type = "database"
[logging.database]
url = "{pg.dsn}"
table = "traffic_slow"
queue_size = 40
batch_size = 10
flush_interval = 0.05
connection_timeout = 10
"""
    d = _start(tmp_path, origin, toml, workers=1)
    wait_for(lambda: pg.query("SELECT to_regclass('traffic_slow') IS NOT NULL")[0][0],
             what="the traffic table created by the worker")
    release = threading.Event()
    locked = threading.Event()

    def hold_lock():
        import asyncpg

        async def run():
            c = await asyncpg.connect(pg.dsn)
            tr = c.transaction()
            await tr.start()
            await c.execute("LOCK TABLE traffic_slow IN ACCESS EXCLUSIVE MODE")
            locked.set()
            while not release.is_set():
                await asyncio.sleep(0.05)
            await tr.rollback()
            await c.close()
        asyncio.run(run())

    t = threading.Thread(target=hold_lock, daemon=True)
    t.start()
    try:
        assert locked.wait(10)
        n = 200
        assert _burst(d.port, n, threads=2) == n  # requests never wait for the store

        def dropped() -> float:
            _, body = d.admin_get("/metrics")
            for line in body.decode().splitlines():
                if line.startswith("dispa_traffic_log_dropped_total"):
                    return float(line.rsplit(" ", 1)[1])
            return 0.0
        lost = wait_for(dropped, what="dispa_traffic_log_dropped_total > 0")
        assert lost >= n - 40 - 10  # the queue (40, incl. the blocked batch) kept the rest
    finally:
        release.set()
        t.join(10)
    # the store unblocked: what was queued is written; written + dropped == sent
    wait_for(lambda: pg.query("SELECT count(*) FROM traffic_slow")[0][0] + dropped() == n,
             what="queued records written after the lock was released")
    assert d.stop() == 0
    assert pg.query("SELECT count(*) FROM traffic_slow")[0][0] + lost == n


def _metric(d: DispaProcess, name: str) -> float:
    """Sum of every series of ``name`` on the admin /metrics (all workers)."""
    _, body = d.admin_get("/metrics")
    return sum(float(line.rsplit(" ", 1)[1]) for line in body.decode().splitlines()
               if line.startswith(name + "{") or line.startswith(name + " "))


def test_postgresql_restarted_mid_run_records_queued_then_written(tmp_path, origin):
    """The database restarts while Dispa serves: requests keep succeeding, the records
    of the outage wait in the queue (the errors counter says why), and once PostgreSQL
    is back they are written; after SIGTERM every request has exactly one row."""
    import subprocess
    server = Postgres().start()
    try:
        toml = f"""
[logging]
enabled = true
type = "database"
[logging.database]
url = "{server.dsn}"
table = "traffic_restart"
queue_size = 5000
batch_size = 50
flush_interval = 0.05
connection_timeout = 5
"""
        d = _start(tmp_path, origin, toml, workers=2)

        def count() -> int:
            try:
                return server.query("SELECT count(*) FROM traffic_restart")[0][0]
            except Exception:  # noqa: BLE001 - down, or the table not created yet
                return -1
        n1, n2 = 100, 150
        assert _burst(d.port, n1, prefix="a") == n1
        wait_for(lambda: count() == n1, what="the first records written")
        args = server.proc.args
        # fast shutdown (SIGINT to the postmaster itself, not to the runuser wrapper):
        # the workers' connections are cut mid-run
        with open(os.path.join(server.data, "postmaster.pid")) as f:
            os.kill(int(f.readline()), signal.SIGINT)
        server.proc.wait(20)
        assert _burst(d.port, n2, prefix="b") == n2  # requests never wait for the store
        wait_for(lambda: _metric(d, "dispa_traffic_log_errors_total") > 0,
                 what="write errors counted while PostgreSQL is down")
        assert _metric(d, "dispa_traffic_log_dropped_total") == 0
        with open(server.log_path, "ab") as log:
            server.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        wait_for(lambda: count() == n1 + n2, timeout=40,
                 what="the records queued during the outage written after the restart")
        assert d.stop() == 0
        assert count() == n1 + n2
        rows = server.query("SELECT count(DISTINCT request_id) FROM traffic_restart")
        assert rows[0][0] == n1 + n2
    finally:
        server.stop()


def _read_all(path: str) -> bytes:
    if path.endswith(".gz"):
        return gzip.open(path).read()
    if path.endswith(".zst"):
        with open(path, "rb") as f:
            return zstandard.ZstdDecompressor().stream_reader(f).read()
    return open(path, "rb").read()


@pytest.mark.parametrize("compression", ["gzip", "zstd"])
def test_rotation_compression_and_retention_under_load(tmp_path, origin, compression):
    ext = ".gz" if compression == "gzip" else ".zst"
    old = tmp_path / f"access.log.20200101-000000{ext}"
    old.write_bytes(b"old")
    os.utime(old, (time.time() - 40 * 86400,) * 2)
    toml = f"""
[logging]
retention_days = 30
[logging.file]
directory = "{tmp_path}"
max_file_size = 4096
compression = "{compression}"
[logging.access_log]
enabled = true
format = "json"
buffer_size = 2048
flush_interval = 0.05
"""
    d = _start(tmp_path, origin, toml)
    wait_for(lambda: not old.exists(), what="retention to delete a 40-day-old rotated file")
    sent = 0
    deadline = time.monotonic() + 30
    # bounded load: at most 1500 requests or 30 s, until two compressed files exist
    while sent < 1500 and time.monotonic() < deadline:
        sent += _burst(d.port, 50, threads=2, prefix=f"b{sent}-")
        if len(glob.glob(str(tmp_path / f"access.log.*{ext}"))) >= 2:
            break
        time.sleep(0.1)  # pace the load so the 0.5 s size check sees several files
    wait_for(lambda: len(glob.glob(str(tmp_path / f"access.log.*{ext}"))) >= 2,
             what=f"two rotated {compression} files")
    assert d.stop() == 0
    # every request is in exactly one file: rotated+compressed, rotated, or current
    files = sorted(glob.glob(str(tmp_path / "access.log*")))
    lines = []
    for f in files:
        lines += [json.loads(x)["uri"] for x in _read_all(f).splitlines()]
    assert len(lines) == sent and len(set(lines)) == sent
    assert any(f.endswith(ext) for f in files)


def test_sigusr1_reopens_the_access_log(tmp_path, origin):
    toml = f"""
[logging.file]
directory = "{tmp_path}"
rotation = false
[logging.access_log]
enabled = true
format = "common"
flush_interval = 0.05
"""
    d = _start(tmp_path, origin, toml)
    log = tmp_path / "access.log"
    assert _burst(d.port, 20, prefix="before") == 20
    wait_for(lambda: log.exists() and log.read_text().count("\n") == 20,
             what="20 lines in access.log")
    log.rename(tmp_path / "access.log.1")  # what logrotate does, then postrotate:
    d.signal(signal.SIGUSR1)
    wait_for(log.exists, what="access.log reopened (created) after SIGUSR1")
    assert _burst(d.port, 10, prefix="after") == 10
    wait_for(lambda: log.read_text().count("\n") == 10, what="10 lines in the new file")
    assert d.stop() == 0
    assert "?i=after" in log.read_text() and "?i=before" not in log.read_text()
    assert (tmp_path / "access.log.1").read_text().count("\n") == 20


def test_log_level_changes_at_runtime_in_every_process(tmp_path, origin):
    d = _start(tmp_path, origin, "[logging]\nlevel = \"info\"\n")

    def put(body: bytes) -> tuple[int, dict]:
        c = http.client.HTTPConnection("127.0.0.1", d.admin_port, timeout=10)
        try:
            c.request("PUT", "/admin/log-level", body=body,
                      headers={"Content-Type": "application/json"})
            r = c.getresponse()
            return r.status, json.loads(r.read())
        finally:
            c.close()

    def everywhere(level: str):
        def check():
            st = d.status()["log_level"]
            ws = st["workers"]
            # each worker's entry is what that process reported (logs.get_level() there)
            return st if st["master"] == level and len(ws) == 2 and \
                set(ws.values()) == {level} else None
        return wait_for(check, what=f"master and both workers at {level} in /admin/status")

    everywhere("info")
    assert put(b'{"level": "debug"}') == (200, {"level": "debug", "previous": "info"})
    everywhere("debug")
    assert put(b'{"level": "error"}')[0] == 200
    everywhere("error")
    status, body = put(b'{"level": "loud"}')
    assert status == 400 and "unknown log level" in json.dumps(body)
    everywhere("error")
    assert d.stop() == 0


def test_reload_switches_the_access_log_format_without_losing_lines(tmp_path, origin):
    base = f"""
[logging.file]
directory = "{tmp_path}"
rotation = false
[logging.access_log]
enabled = true
flush_interval = 30
format = "{{fmt}}"
"""
    d = _start(tmp_path, origin, base.replace("{fmt}", "common"))
    assert _burst(d.port, 15, prefix="common") == 15  # buffered (flush_interval 30 s)
    head = d.config_path.read_text().split("[logging.file]")[0]
    d.config_path.write_text(head + base.replace("{fmt}", "json"))
    version = d.status()["snapshot_version"]
    d.signal(signal.SIGHUP)
    wait_for(lambda: d.status()["snapshot_version"] != version, what="the reload applied")
    assert _burst(d.port, 5, prefix="json") == 5
    assert d.stop() == 0
    lines = (tmp_path / "access.log").read_text().splitlines()
    # the old sink flushed its 15 buffered text lines when the reload replaced it
    assert len(lines) == 20
    assert sum(x.startswith("127.0.0.1 - - [") for x in lines) == 15
    assert sum(json.loads(x)["uri"].startswith("/?i=json") for x in lines
               if x.startswith("{")) == 5
