"""Log files: the buffered O_APPEND writer, rotation by size and time, compression,
retention."""

from __future__ import annotations

import asyncio
import gzip
import os
import time

import pytest
import zstandard

from dispa.observability import rotation
from dispa.observability.rotation import AppendFile, LogRotator, compress_file, period_key


def test_append_file_buffers_until_size_then_one_write(tmp_path, monkeypatch):
    writes = []
    real = os.write

    def counting(fd, data):
        writes.append(bytes(data))
        return real(fd, data)

    monkeypatch.setattr(rotation.os, "write", counting)
    f = AppendFile(str(tmp_path / "a.log"), None, buffer_size=100, flush_interval=1.0)
    for i in range(9):
        f.write(b"line %02d..\n" % i)  # 10 bytes each: 90 bytes pending
    assert writes == [] and (tmp_path / "a.log").read_bytes() == b""
    f.write(b"line 09..\n")
    assert len(writes) == 1 and len(writes[0]) == 100  # one write(2) for ten lines
    f.close()
    assert (tmp_path / "a.log").read_bytes().count(b"\n") == 10


def test_append_file_flushes_on_timer():
    async def main(path):
        loop = asyncio.get_running_loop()
        f = AppendFile(path, loop, buffer_size=1 << 20, flush_interval=0.05)
        f.write(b"x\n")
        assert os.path.getsize(path) == 0
        deadline = time.monotonic() + 5
        while os.path.getsize(path) == 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert os.path.getsize(path) == 2
        f.close()

    import tempfile
    with tempfile.TemporaryDirectory() as d:
        asyncio.run(main(os.path.join(d, "t.log")))


def test_shared_file_two_writers_lines_whole(tmp_path):
    path = str(tmp_path / "shared.log")
    a = AppendFile(path, None, buffer_size=4096)
    b = AppendFile(path, None, buffer_size=4096)
    for i in range(2000):
        (a if i % 2 else b).write(b"%06d-%s\n" % (i, b"x" * 50))
    a.close()
    b.close()
    lines = open(path, "rb").read().splitlines()
    assert len(lines) == 2000 and all(len(x) == 57 for x in lines)


def test_reopen_after_rename(tmp_path):
    path = tmp_path / "r.log"
    f = AppendFile(str(path), None, buffer_size=1 << 20)
    f.write(b"old\n")
    os.rename(path, tmp_path / "r.log.1")
    f.write(b"still-old\n")  # buffered: flushed into the renamed file by reopen
    f.reopen()
    f.write(b"new\n")
    f.close()
    assert (tmp_path / "r.log.1").read_bytes() == b"old\nstill-old\n"
    assert path.read_bytes() == b"new\n"


@pytest.mark.parametrize("method, opener", [
    ("gzip", lambda p: gzip.open(p).read()),
    ("zstd", lambda p: zstandard.ZstdDecompressor().stream_reader(open(p, "rb")).read()),
])
def test_compress_file(tmp_path, method, opener):
    src = tmp_path / "x.log.20260101-000000"
    data = b"".join(b"line %d\n" % i for i in range(10000))
    src.write_bytes(data)
    out = compress_file(str(src), method)
    assert not src.exists() and out.endswith(".gz" if method == "gzip" else ".zst")
    assert opener(out) == data and os.path.getsize(out) < len(data) // 3


def test_period_keys():
    t = time.mktime((2026, 11, 29, 10, 59, 59, 0, 0, -1))
    assert period_key(t, "hourly") != period_key(t + 1, "hourly")
    assert period_key(t, "daily") == period_key(t + 1, "daily")
    assert period_key(t, "none") is None


def _spec(path, **rot):
    r = {"max_bytes": 0, "interval": "none", "compression": "none", "retention_days": 0}
    r.update(rot)
    return {"access_log": {"path": str(path), "rotation": r}}


def test_rotator_size_and_time_and_retention(tmp_path):
    clock = [time.mktime((2026, 11, 29, 10, 30, 0, 0, 0, -1))]
    reopened = []

    async def main():
        rot = LogRotator(lambda: reopened.append(1), now=lambda: clock[0])
        log = tmp_path / "access.log"
        log.write_bytes(b"a" * 10)
        # an old rotated file (40 days) and a recent one (1 day)
        old = tmp_path / "access.log.20261020-000000.gz"
        recent = tmp_path / "access.log.20261128-000000.gz"
        for p, age in ((old, 40), (recent, 1)):
            p.write_bytes(b"x")
            os.utime(p, (clock[0] - age * 86400, clock[0] - age * 86400))
        rot.configure(_spec(log, max_bytes=100, interval="hourly", retention_days=30))
        try:
            assert rot.tick() == []  # small, same hour; the first sweep runs
            assert not old.exists() and recent.exists()
            log.write_bytes(b"a" * 100)  # size reached
            first = rot.tick()
            assert len(first) == 1 and not log.exists() and reopened == [1]
            log.write_bytes(b"b" * 10)
            assert rot.tick() == []
            clock[0] += 1800  # the next hour: time rotation of a non-empty file
            second = rot.tick()
            assert len(second) == 1 and second != first and reopened == [1, 1]
            assert open(second[0], "rb").read() == b"b" * 10
        finally:
            await rot.close()

    asyncio.run(main())


def test_rotator_compresses_after_grace(tmp_path, monkeypatch):
    monkeypatch.setattr(rotation, "COMPRESS_GRACE", 0.0)

    async def main():
        rot = LogRotator(lambda: None)
        log = tmp_path / "t.log"
        log.write_bytes(b"z\n" * 1000)
        rot.configure(_spec(log, max_bytes=1024, compression="gzip"))
        [name] = rot.tick()
        await rot.close()  # waits for the compression job
        assert not os.path.exists(name)
        assert gzip.open(name + ".gz").read() == b"z\n" * 1000

    asyncio.run(main())


@pytest.mark.parametrize("method", ["gzip", "zstd"])
def test_stalled_writer_flushing_after_compression_loses_nothing(tmp_path, method):
    """The gap the grace period leaves: a worker that missed the reopen (a stalled loop)
    flushes into the rotated file after it was compressed and removed. The flush must
    find the file gone and write to the path's new file instead of an unlinked inode."""
    path = tmp_path / "a.log"
    stalled = AppendFile(str(path), None, buffer_size=1 << 20)
    stalled.write(b"before\n")
    stalled.flush()
    rotated = str(path) + ".20260101-000000"
    os.rename(path, rotated)
    fresh = AppendFile(str(path), None, buffer_size=1 << 20)  # a worker that reopened
    fresh.write(b"fresh\n")
    fresh.flush()
    out = compress_file(rotated, method)
    stalled.write(b"late\n")  # buffered before the rotation, flushed after compression
    stalled.flush()
    stalled.close()
    fresh.close()
    data = (gzip.open(out).read() if method == "gzip"
            else zstandard.ZstdDecompressor().stream_reader(open(out, "rb")).read())
    assert data == b"before\n"
    assert sorted(path.read_bytes().splitlines()) == [b"fresh", b"late"]


def test_writers_during_compression_lose_no_line(tmp_path):
    """Writers keep flushing into the rotated file while it is compressed (bounded: 20000
    lines, 4 writer threads): every line ends up in the compressed file or the new one."""
    import threading
    path = tmp_path / "b.log"
    writers = [AppendFile(str(path), None, buffer_size=512) for _ in range(4)]
    for i in range(4000):
        writers[i % 4].write(b"%08d\n" % i)
    for w in writers:
        w.flush()
    rotated = str(path) + ".20260101-000000"
    os.rename(path, rotated)
    start = threading.Barrier(5)

    def write(k):
        start.wait()
        for i in range(4000 + k, 20000, 4):
            writers[k].write(b"%08d\n" % i)
        writers[k].close()  # the last flush; never reopened (a stalled worker)

    threads = [threading.Thread(target=write, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    start.wait()
    out = compress_file(rotated, "gzip")
    for t in threads:
        t.join(30)
    if out == rotated:  # kept growing: left uncompressed, still complete
        lines = open(out, "rb").read().splitlines()
    else:
        lines = gzip.open(out).read().splitlines()
    if path.exists():
        lines += path.read_bytes().splitlines()
    assert sorted(int(x) for x in lines) == list(range(20000))


def test_rotator_checks_sooner_as_a_file_nears_max_bytes(tmp_path):
    w = rotation._Watched(str(tmp_path / "x"), {"max_bytes": 10_000_000}, time.time())
    assert w.next_check(0, 100.0) == rotation.CHECK_INTERVAL  # no rate yet
    # 4 MB/s with 6 MB to go: the full interval
    assert w.next_check(2_000_000, 100.5) == rotation.CHECK_INTERVAL
    # 16 MB/s with 2 MB to go: due in 0.125 s, checked then (not 0.5 s = 6 MB over)
    assert w.next_check(8_000_000, 100.875) == pytest.approx(0.125)
    # almost there: the floor
    assert w.next_check(9_999_000, 101.0) == rotation.MIN_CHECK_INTERVAL
