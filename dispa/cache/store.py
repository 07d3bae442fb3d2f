"""Response stores for the cache filter: a bounded in-memory LRU and an optional disk tier.

Theory of operation
-------------------
A store maps a *key* (``str``, built by the filter) to an :class:`Entry` (a complete stored
response plus the times the age calculation needs). Every store has the same small
interface (:class:`Store`): ``get``, ``put``, ``delete``, ``purge_prefix``, ``len()`` and
``size_bytes``, and counts ``evictions``. Stores know nothing about HTTP; the rules live in
``policy.py``.

Rule 1: a store is bounded by bytes. An entry costs ``len(key) + len(body) + Σ(len(name) +
len(value))`` in memory (:func:`entry_bytes`; Python object overhead is not counted), and
its file size on disk. An entry larger than ``max_entry_bytes`` (or than the whole budget)
is refused, and it also removes any older entry under that key: the older one is superseded.

Rule 2: memory eviction is least-recently-*used* (``get`` refreshes), O(1) per operation
on an ``OrderedDict``. Disk eviction is oldest-*written* first (by mtime, which ``put``
sets); reading does not touch the file, so hits cost no metadata write.

Rule 3: disk writes are atomic: the file is written under a temporary name in the same
directory and renamed over the target (``os.replace``), so a reader (another worker, or
this one after a crash) sees either the old file or the new one, never a torn one. A file
that does not parse (wrong magic, short body, key mismatch) is treated as absent and removed.

Disk format (one file per key, named ``sha256(key).hex() + ".dce"``)::

    b"DSPCACH1"  |  u32 big-endian head length  |  msgpack head  |  body bytes

where the head is a :class:`_DiskHead` (the key, so collisions and scans are checked, and
the entry's fields except the body, plus the body length).

Limits: the disk tier does blocking file I/O on the worker's event loop (small files on a
local disk; not yet measured). Several workers may share one directory — writes are atomic
and a ``get`` reads files it has not indexed — but each worker enforces ``max_bytes`` on
its own view of the directory; give each worker its own directory (``{worker_id}`` in the
filter's ``disk_path``) when the bound must be exact.
"""

from __future__ import annotations

import hashlib
import os
import struct
import tempfile
from collections import OrderedDict
from typing import Protocol

import msgspec

__all__ = ["Entry", "Store", "MemoryStore", "DiskStore", "TieredStore", "entry_bytes"]


class Entry(msgspec.Struct, frozen=True):
    """One stored response.

    ``status`` 0 marks a *Vary marker*: an entry under the primary key whose only field is
    ``vary`` (the names listed), telling the filter to look the variant up under a secondary
    key. ``vary`` on a real entry holds the request's normalised values of those fields
    (``policy.vary_values``), checked again on every lookup.
    """

    status: int
    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes
    stored_at: float
    request_time: float
    response_time: float
    vary: tuple[tuple[str, str | None], ...] = ()


def entry_bytes(key: str, entry: Entry) -> int:
    """What ``entry`` under ``key`` costs against a memory budget (see Rule 1)."""
    return len(key) + len(entry.body) + sum(len(k) + len(v) for k, v in entry.headers)


class Store(Protocol):
    """The interface every store offers (structural; nothing needs to inherit it)."""

    evictions: int

    def get(self, key: str) -> Entry | None: ...
    def put(self, key: str, entry: Entry) -> bool: ...
    def delete(self, key: str) -> bool: ...
    def purge_prefix(self, prefix: str) -> int: ...
    def __len__(self) -> int: ...
    @property
    def size_bytes(self) -> int: ...


class MemoryStore:
    """A byte-bounded LRU map in process memory.

    ``get`` → the entry (now most recently used) or ``None``. ``put`` → ``True`` if stored,
    ``False`` if refused (too large; any older entry under the key is removed). ``delete``
    → whether the key was there. ``purge_prefix`` → how many keys starting with ``prefix``
    were removed (O(n)). Never raises for well-typed input.
    """

    def __init__(self, max_bytes: int, max_entry_bytes: int | None = None):
        if max_bytes < 0:
            raise ValueError("max_bytes must be >= 0")
        self.max_bytes = max_bytes
        self.max_entry_bytes = max_bytes if max_entry_bytes is None else max_entry_bytes
        self._data: OrderedDict[str, tuple[Entry, int]] = OrderedDict()
        self._size = 0
        self.evictions = 0

    def get(self, key: str) -> Entry | None:
        item = self._data.get(key)
        if item is None:
            return None
        self._data.move_to_end(key)
        return item[0]

    def put(self, key: str, entry: Entry) -> bool:
        n = entry_bytes(key, entry)
        self.delete(key)
        if n > self.max_entry_bytes or n > self.max_bytes:
            return False
        data = self._data
        while self._size + n > self.max_bytes and data:
            _, (_, old) = data.popitem(last=False)
            self._size -= old
            self.evictions += 1
        data[key] = (entry, n)
        self._size += n
        return True

    def delete(self, key: str) -> bool:
        item = self._data.pop(key, None)
        if item is None:
            return False
        self._size -= item[1]
        return True

    def purge_prefix(self, prefix: str) -> int:
        doomed = [k for k in self._data if k.startswith(prefix)]
        for k in doomed:
            self.delete(k)
        return len(doomed)

    def keys(self) -> list[str]:
        """The keys, least recently used first."""
        return list(self._data)

    def __contains__(self, key: object) -> bool:
        return key in self._data

    def __len__(self) -> int:
        return len(self._data)

    @property
    def size_bytes(self) -> int:
        return self._size


_MAGIC = b"DSPCACH1"
_LEN = struct.Struct(">I")
_SUFFIX = ".dce"
_TMP_PREFIX = ".tmp-"


class _DiskHead(msgspec.Struct, frozen=True, array_like=True):
    key: str
    status: int
    headers: tuple[tuple[bytes, bytes], ...]
    stored_at: float
    request_time: float
    response_time: float
    vary: tuple[tuple[str, str | None], ...]
    body_len: int


_encode = msgspec.msgpack.Encoder().encode
_decode_head = msgspec.msgpack.Decoder(_DiskHead).decode


class DiskStore:
    """A byte-bounded directory of entry files that survives restarts (see the module doc).

    Same return values as :class:`MemoryStore`. Opening scans the directory once (reading
    each file's head only) to rebuild the index, and removes leftover temporary files.
    ``OSError`` from the file system is contained: a failed write is a refused ``put``,
    a failed read a miss.
    """

    def __init__(self, path: str, max_bytes: int, max_entry_bytes: int | None = None):
        if max_bytes < 0:
            raise ValueError("max_bytes must be >= 0")
        self.path = os.path.abspath(path)
        self.max_bytes = max_bytes
        self.max_entry_bytes = max_bytes if max_entry_bytes is None else max_entry_bytes
        self.evictions = 0
        # key -> (file size, mtime); ordered oldest write first
        self._index: OrderedDict[str, tuple[int, float]] = OrderedDict()
        self._size = 0
        os.makedirs(self.path, exist_ok=True)
        self._scan()

    # -- file helpers ------------------------------------------------------------------------

    def _file(self, key: str) -> str:
        return os.path.join(self.path,
                            hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()
                            + _SUFFIX)

    @staticmethod
    def _read_head(f) -> _DiskHead | None:
        pre = f.read(len(_MAGIC) + _LEN.size)
        if len(pre) != len(_MAGIC) + _LEN.size or pre[:len(_MAGIC)] != _MAGIC:
            return None
        (n,) = _LEN.unpack(pre[len(_MAGIC):])
        raw = f.read(n)
        if len(raw) != n:
            return None
        try:
            return _decode_head(raw)
        except msgspec.DecodeError:
            return None

    def _scan(self) -> None:
        found = []
        try:
            names = os.listdir(self.path)
        except OSError:
            return
        for name in names:
            full = os.path.join(self.path, name)
            if name.startswith(_TMP_PREFIX):
                # a write interrupted by a crash
                _unlink(full)
                continue
            if not name.endswith(_SUFFIX):
                continue
            try:
                st = os.stat(full)
                with open(full, "rb") as f:
                    head = self._read_head(f)
            except OSError:
                continue
            if head is None or self._file(head.key) != full:
                _unlink(full)
                continue
            found.append((st.st_mtime, head.key, st.st_size))
        found.sort()
        for mtime, key, size in found:
            self._index[key] = (size, mtime)
            self._size += size
        self._evict(0)

    def _forget(self, key: str) -> None:
        item = self._index.pop(key, None)
        if item is not None:
            self._size -= item[0]

    def _evict(self, incoming: int) -> None:
        while self._size + incoming > self.max_bytes and self._index:
            key, (size, _) = self._index.popitem(last=False)
            self._size -= size
            self.evictions += 1
            _unlink(self._file(key))

    # -- the Store interface -----------------------------------------------------------------

    def get(self, key: str) -> Entry | None:
        path = self._file(key)
        try:
            with open(path, "rb") as f:
                head = self._read_head(f)
                if head is None or head.key != key:
                    raise _Corrupt
                body = f.read(head.body_len + 1)
                if len(body) != head.body_len:
                    raise _Corrupt
                st = os.fstat(f.fileno())
        except FileNotFoundError:
            self._forget(key)
            return None
        except _Corrupt:
            self._forget(key)
            _unlink(path)
            return None
        except OSError:
            return None
        if key not in self._index:
            # written by another worker sharing the directory: adopt it
            self._index[key] = (st.st_size, st.st_mtime)
            self._size += st.st_size
            self._evict(0)
        return Entry(head.status, head.headers, body, head.stored_at, head.request_time,
                     head.response_time, head.vary)

    def put(self, key: str, entry: Entry) -> bool:
        head = _encode(_DiskHead(key, entry.status, entry.headers, entry.stored_at,
                                 entry.request_time, entry.response_time, entry.vary,
                                 len(entry.body)))
        size = len(_MAGIC) + _LEN.size + len(head) + len(entry.body)
        path = self._file(key)
        if size > self.max_entry_bytes or size > self.max_bytes:
            self.delete(key)
            return False
        self._forget(key)
        self._evict(size)
        try:
            fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX, dir=self.path)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(_MAGIC)
                    f.write(_LEN.pack(len(head)))
                    f.write(head)
                    f.write(entry.body)
                os.replace(tmp, path)
            except BaseException:
                _unlink(tmp)
                raise
            mtime = os.stat(path).st_mtime
        except OSError:
            _unlink(path)
            return False
        self._index[key] = (size, mtime)
        self._size += size
        return True

    def delete(self, key: str) -> bool:
        known = key in self._index
        self._forget(key)
        path = self._file(key)
        try:
            os.unlink(path)
        except OSError:
            return known
        return True

    def purge_prefix(self, prefix: str) -> int:
        doomed = [k for k in self._index if k.startswith(prefix)]
        for k in doomed:
            self.delete(k)
        return len(doomed)

    def keys(self) -> list[str]:
        """The indexed keys, oldest write first."""
        return list(self._index)

    def __contains__(self, key: object) -> bool:
        return key in self._index

    def __len__(self) -> int:
        return len(self._index)

    @property
    def size_bytes(self) -> int:
        return self._size


class _Corrupt(Exception):
    pass


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


class TieredStore:
    """Memory in front of disk. ``get`` tries memory, then disk (promoting a disk hit into
    memory); ``put`` writes both and succeeds if either kept it; ``delete`` and
    ``purge_prefix`` act on both (``purge_prefix`` counts distinct keys). ``len()`` counts
    distinct keys; ``size_bytes`` and ``evictions`` are the disk tier's, which holds the
    authoritative copy (a memory eviction loses nothing)."""

    def __init__(self, memory: MemoryStore, disk: DiskStore):
        self.memory = memory
        self.disk = disk

    @property
    def evictions(self) -> int:
        return self.disk.evictions

    def get(self, key: str) -> Entry | None:
        e = self.memory.get(key)
        if e is not None:
            return e
        e = self.disk.get(key)
        if e is not None:
            self.memory.put(key, e)
        return e

    def put(self, key: str, entry: Entry) -> bool:
        a = self.memory.put(key, entry)
        b = self.disk.put(key, entry)
        return a or b

    def delete(self, key: str) -> bool:
        a = self.memory.delete(key)
        b = self.disk.delete(key)
        return a or b

    def purge_prefix(self, prefix: str) -> int:
        doomed = {k for k in self.memory.keys() if k.startswith(prefix)}
        doomed.update(k for k in self.disk.keys() if k.startswith(prefix))
        for k in doomed:
            self.delete(k)
        return len(doomed)

    def __len__(self) -> int:
        return len(set(self.memory.keys()) | set(self.disk.keys()))

    @property
    def size_bytes(self) -> int:
        return self.disk.size_bytes
