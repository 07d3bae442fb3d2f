"""dispa/cache/store.py: LRU order, byte budgets, refusal, disk persistence, purge by prefix."""

from __future__ import annotations

import os
import time

import pytest

from dispa.cache.store import DiskStore, Entry, MemoryStore, TieredStore, entry_bytes


def E(body: bytes = b"x", status: int = 200, headers=((b"Content-Type", b"text/plain"),),
      t: float = 1.0, vary=()) -> Entry:
    return Entry(status, tuple(headers), body, t, t - 0.5, t, tuple(vary))


def cost(key: str, e: Entry) -> int:
    return entry_bytes(key, e)


class TestEntryBytes:
    def test_counts_key_body_and_header_bytes(self):
        e = E(b"12345", headers=((b"Ab", b"cde"),))
        assert entry_bytes("key", e) == 3 + 5 + 5


class TestMemoryStore:
    def test_get_put_delete(self):
        s = MemoryStore(1000)
        assert s.get("a") is None
        assert s.put("a", E(b"1"))
        assert s.get("a").body == b"1"
        assert len(s) == 1 and s.size_bytes == cost("a", E(b"1"))
        assert s.delete("a") and not s.delete("a")
        assert len(s) == 0 and s.size_bytes == 0

    def test_replacing_a_key_recounts_its_bytes(self):
        s = MemoryStore(1000)
        s.put("a", E(b"1" * 10))
        s.put("a", E(b"1" * 3))
        assert len(s) == 1 and s.size_bytes == cost("a", E(b"1" * 3))

    def test_evicts_least_recently_used_first(self):
        one = cost("a", E(b"x" * 10))
        s = MemoryStore(3 * one)
        for k in "abc":
            s.put(k, E(b"x" * 10))
        s.get("a")                       # a is now the most recently used
        s.put("d", E(b"x" * 10))         # evicts b
        assert s.keys() == ["c", "a", "d"]
        assert s.get("b") is None and s.evictions == 1

    def test_byte_budget_is_never_exceeded(self):
        s = MemoryStore(100)
        for i in range(50):
            s.put(f"k{i}", E(b"y" * (i % 30)))
            assert s.size_bytes <= 100
        assert s.size_bytes == sum(cost(k, s.get(k)) for k in s.keys())

    def test_oversize_entry_is_refused_and_removes_the_old_one(self):
        s = MemoryStore(1000, max_entry_bytes=50)
        s.put("a", E(b"small"))
        assert not s.put("a", E(b"z" * 100))
        assert s.get("a") is None and len(s) == 0 and s.size_bytes == 0

    def test_entry_larger_than_the_whole_budget_is_refused_without_evicting(self):
        s = MemoryStore(40)
        s.put("a", E(b"1"))
        assert not s.put("b", E(b"z" * 100))
        assert s.get("a") is not None and s.evictions == 0

    def test_purge_prefix(self):
        s = MemoryStore(10_000)
        for k in ("GET|h|/a/1", "GET|h|/a/2", "GET|h|/b", "GET|h|/a/1\x00v"):
            s.put(k, E())
        assert s.purge_prefix("GET|h|/a/") == 3
        assert s.keys() == ["GET|h|/b"]
        assert s.purge_prefix("nothing") == 0

    def test_negative_budget_is_rejected(self):
        with pytest.raises(ValueError):
            MemoryStore(-1)


class TestDiskStore:
    def test_round_trip_keeps_every_field(self, tmp_path):
        s = DiskStore(str(tmp_path), 10_000)
        e = Entry(203, ((b"A", b"1"), (b"B", b"\xe9")), b"\x00body\xff", 5.0, 4.0, 4.5,
                  (("accept", "text/html"), ("x-a", None)))
        assert s.put("k", e)
        assert s.get("k") == e
        assert len(s) == 1 and s.size_bytes == os.path.getsize(s._file("k"))

    def test_survives_a_restart(self, tmp_path):
        s = DiskStore(str(tmp_path), 10_000)
        s.put("GET|http|h|/a|", E(b"persisted"))
        s.put("GET|http|h|/b|", E(b"too"))
        again = DiskStore(str(tmp_path), 10_000)
        assert len(again) == 2 and again.size_bytes == s.size_bytes
        assert again.get("GET|http|h|/a|").body == b"persisted"

    def test_one_file_per_key_and_no_temporary_files_left(self, tmp_path):
        s = DiskStore(str(tmp_path), 10_000)
        s.put("a", E())
        s.put("a", E(b"2"))
        s.put("b", E())
        names = sorted(os.listdir(tmp_path))
        assert len(names) == 2 and all(n.endswith(".dce") for n in names)

    def test_evicts_oldest_by_mtime_and_keeps_the_budget(self, tmp_path):
        s = DiskStore(str(tmp_path), 10_000)
        s.put("probe", E(b"x" * 100))
        one = s.size_bytes
        s.delete("probe")
        s = DiskStore(str(tmp_path), 3 * one)
        for k in ("a", "b", "c"):
            s.put(k, E(b"x" * 100))
        s.get("a")                       # reading does not refresh disk order
        s.put("d", E(b"x" * 100))
        assert s.keys() == ["b", "c", "d"] and s.evictions == 1
        assert not os.path.exists(s._file("a"))
        assert s.size_bytes <= 3 * one

    def test_restart_orders_by_mtime(self, tmp_path):
        s = DiskStore(str(tmp_path), 10_000)
        s.put("new", E())
        s.put("old", E())
        past = time.time() - 1000
        os.utime(s._file("old"), (past, past))
        again = DiskStore(str(tmp_path), 10_000)
        assert again.keys() == ["old", "new"]

    def test_restart_with_a_smaller_budget_evicts(self, tmp_path):
        s = DiskStore(str(tmp_path), 10_000)
        for k in "abcd":
            s.put(k, E(b"x" * 100))
        one = s.size_bytes // 4
        again = DiskStore(str(tmp_path), 2 * one)
        assert len(again) == 2 and again.size_bytes <= 2 * one
        assert len(os.listdir(tmp_path)) == 2

    def test_oversize_is_refused(self, tmp_path):
        s = DiskStore(str(tmp_path), 10_000, max_entry_bytes=200)
        s.put("a", E(b"small"))
        assert not s.put("a", E(b"z" * 500))
        assert s.get("a") is None and os.listdir(tmp_path) == []

    def test_corrupt_and_truncated_files_are_misses_and_removed(self, tmp_path):
        s = DiskStore(str(tmp_path), 10_000)
        s.put("a", E(b"hello world"))
        s.put("b", E(b"hello world"))
        with open(s._file("a"), "r+b") as f:
            f.truncate(os.path.getsize(s._file("a")) - 3)
        with open(s._file("b"), "wb") as f:
            f.write(b"not a cache file")
        assert s.get("a") is None and s.get("b") is None
        assert os.listdir(tmp_path) == []
        assert len(s) == 0 and s.size_bytes == 0

    def test_leftover_temporary_and_foreign_files_at_startup(self, tmp_path):
        (tmp_path / ".tmp-abc").write_bytes(b"partial")
        (tmp_path / ("0" * 64 + ".dce")).write_bytes(b"junk")
        (tmp_path / "README").write_text("keep me")
        s = DiskStore(str(tmp_path), 10_000)
        assert len(s) == 0
        assert sorted(os.listdir(tmp_path)) == ["README"]

    def test_a_file_written_by_another_worker_is_adopted(self, tmp_path):
        a = DiskStore(str(tmp_path), 10_000)
        b = DiskStore(str(tmp_path), 10_000)
        a.put("shared", E(b"from a"))
        assert "shared" not in b
        assert b.get("shared").body == b"from a"
        assert "shared" in b and b.size_bytes == a.size_bytes

    def test_purge_prefix_removes_files(self, tmp_path):
        s = DiskStore(str(tmp_path), 10_000)
        for k in ("p/1", "p/2", "q/1"):
            s.put(k, E())
        assert s.purge_prefix("p/") == 2
        assert s.keys() == ["q/1"] and len(os.listdir(tmp_path)) == 1

    def test_delete(self, tmp_path):
        s = DiskStore(str(tmp_path), 10_000)
        s.put("a", E())
        assert s.delete("a") and not s.delete("a")
        assert os.listdir(tmp_path) == []


class TestTieredStore:
    def make(self, tmp_path, mem=10_000):
        return TieredStore(MemoryStore(mem), DiskStore(str(tmp_path), 100_000))

    def test_put_writes_both_and_get_prefers_memory(self, tmp_path):
        t = self.make(tmp_path)
        t.put("a", E(b"1"))
        assert "a" in t.memory and "a" in t.disk
        assert t.get("a").body == b"1"

    def test_disk_hit_is_promoted_after_restart(self, tmp_path):
        self.make(tmp_path).put("a", E(b"1"))
        t = self.make(tmp_path)
        assert "a" not in t.memory
        assert t.get("a").body == b"1" and "a" in t.memory

    def test_memory_eviction_keeps_the_disk_copy(self, tmp_path):
        one = cost("a", E(b"x" * 50))
        t = self.make(tmp_path, mem=one)
        t.put("a", E(b"x" * 50))
        t.put("b", E(b"x" * 50))
        assert "a" not in t.memory and t.get("a") is not None
        assert t.evictions == 0

    def test_delete_purge_len(self, tmp_path):
        t = self.make(tmp_path)
        for k in ("x/1", "x/2", "y"):
            t.put(k, E())
        assert len(t) == 3
        assert t.purge_prefix("x/") == 2
        assert t.delete("y") and len(t) == 0
        assert t.size_bytes == 0
