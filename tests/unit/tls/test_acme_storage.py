"""Directory storage for ACME: atomic writes, private modes, the flock lock."""

from __future__ import annotations

import asyncio
import os
import stat

import pytest

from dispa.tls.acme.storage import DirectoryStorage, StorageError


def run(coro):
    return asyncio.run(coro)


def test_put_then_get_round_trips_and_replaces_whole_files(tmp_path):
    s = DirectoryStorage(str(tmp_path))
    run(s.put("certs/a/fullchain.pem", b"one"))
    run(s.put("certs/a/fullchain.pem", b"two"))
    assert run(s.get("certs/a/fullchain.pem")) == b"two"
    assert run(s.get("certs/missing/fullchain.pem")) is None
    # no temporary file is left next to the result
    assert os.listdir(tmp_path / "certs" / "a") == ["fullchain.pem"]


def test_private_keys_and_the_account_are_readable_by_the_owner_only(tmp_path):
    s = DirectoryStorage(str(tmp_path))
    run(s.put("certs/a/privkey.pem", b"k"))
    run(s.put("accounts/x/account.json", b"{}"))
    run(s.put("certs/a/fullchain.pem", b"c"))
    mode = lambda p: stat.S_IMODE(os.stat(tmp_path / p).st_mode)  # noqa: E731
    assert mode("certs/a/privkey.pem") == 0o600
    assert mode("accounts/x/account.json") == 0o600
    assert mode("certs/a/fullchain.pem") == 0o644


def test_a_key_cannot_leave_the_directory(tmp_path):
    s = DirectoryStorage(str(tmp_path / "store"))
    with pytest.raises(StorageError):
        run(s.put("../escape", b"x"))


def test_only_one_holder_of_the_lock_until_it_is_released(tmp_path):
    a, b = DirectoryStorage(str(tmp_path)), DirectoryStorage(str(tmp_path))

    async def main():
        held = await a.try_lock()
        assert held is not None
        assert await b.try_lock() is None  # a second open file: flock refuses
        await held.release()
        again = await b.try_lock()
        assert again is not None
        await again.release()

    run(main())


def test_unwritable_directory_is_a_storage_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    s = DirectoryStorage(str(blocker))
    with pytest.raises(StorageError):
        run(s.put("certs/a/fullchain.pem", b"x"))


def test_the_lock_of_a_process_killed_mid_renewal_is_free_again(tmp_path):
    import signal
    import subprocess
    import sys

    holder = subprocess.Popen(
        [sys.executable, "-c", f"""
import asyncio, sys, time
from dispa.tls.acme.storage import DirectoryStorage
lock = asyncio.run(DirectoryStorage({str(tmp_path)!r}).try_lock())
print("locked" if lock else "busy", flush=True)
sys.stdin.read()  # hold it until killed
"""], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        s = DirectoryStorage(str(tmp_path))
        assert run(s.try_lock()) is None  # held by the other process
        assert (tmp_path / "renew.lock").read_text().strip() == str(holder.pid)
        holder.send_signal(signal.SIGKILL)  # the box dies mid-renewal
        holder.wait(10)
        lock = run(s.try_lock())  # the kernel dropped the flock with the process
        assert lock is not None
        run(lock.release())
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
        holder.stdin.close()
        holder.stdout.close()


def test_a_reader_of_the_old_file_keeps_it_whole_while_it_is_replaced(tmp_path):
    # the TLS store may be reading fullchain.pem while a renewal replaces it: the write is a
    # rename of a new file, never a rewrite in place (which would truncate the reader's file)
    s = DirectoryStorage(str(tmp_path))
    old = b"-----OLD-----\n" * 2000
    run(s.put("certs/a/fullchain.pem", old))
    path = tmp_path / "certs" / "a" / "fullchain.pem"
    before = os.stat(path).st_ino
    with open(path, "rb") as reader:
        head = reader.read(100)
        run(s.put("certs/a/fullchain.pem", b"new"))
        assert head + reader.read() == old
    assert os.stat(path).st_ino != before and path.read_bytes() == b"new"
