"""Geo-aware routing building blocks: where is this client, and which region should serve it.

Theory of operation
-------------------
``GeoDatabase`` wraps a MaxMind DB (``.mmdb``: GeoIP2/GeoLite2 City or Country, or any
database with the same record layout, e.g. DB-IP Lite) read through the ``maxminddb`` package
(C extension when it is installed, memory-mapped). ``GeoRouter`` turns a client address into
an ordered list of target groups, and ``GeoCondition`` is the ``geo`` predicate for routing
rules. ``client_ip`` finds the address to locate behind trusted proxies.

Rules:

1. A database is checked when it is opened, never on the request path: a missing or
   unreadable file, a file that is not a MaxMind DB, corrupt metadata, a search tree that
   does not fit the file or holds records pointing outside it, corrupt data records (a
   sample, or all with ``verify="full"``) and a database without location data all raise
   ``GeoDatabaseError`` with one line naming the file and the problem. What the open-time
   checks do not see (data records outside the sample) surfaces on ``lookup`` as
   ``GeoDatabaseError`` and is counted in ``GeoDatabase.lookup_errors``.
2. ``lookup`` never raises for bad *input*: an invalid address, an address the database
   does not cover (IPv6 in an IPv4 database) or a record without location data is ``None``.
3. A ``GeoDatabase`` is immutable. Refreshing the data means opening a new one (off the event
   loop: the checks read the whole search tree) and swapping it in; when the new file is
   refused the old instance keeps serving (docs/geo.md).
4. ``GeoRouter.choose`` never raises: a database error counts in ``GeoRouter.lookup_errors``
   and the client is routed as unknown (failover order).
5. Lookups are memoised per instance in a bounded LRU (client addresses repeat); the memo
   dies with the instance, so a reload never serves answers from the old file.
"""

from __future__ import annotations

import importlib
import math
import mmap
import os
import socket
import sys
from array import array
from collections import OrderedDict
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Annotated, Any, Literal, Optional

import msgspec
from msgspec import Meta

__all__ = [
    "CONTINENTS",
    "GeoChoice",
    "GeoCondition",
    "GeoDatabase",
    "GeoDatabaseError",
    "GeoInfo",
    "GeoRegion",
    "GeoRouter",
    "GeoRouterConfig",
    "client_ip",
    "haversine_km",
]

#: Continent codes as MaxMind (and GeoNames) write them.
CONTINENTS = frozenset({"AF", "AN", "AS", "EU", "NA", "OC", "SA"})

_METADATA_MARKER = b"\xab\xcd\xefMaxMind.com"
_METADATA_WINDOW = 128 * 1024  # the spec: metadata lives in the last 128 KiB
_SEPARATOR = 16  # zero bytes between the search tree and the data section
_MAX_EPOCH = 253402300799  # 9999-12-31T23:59:59Z, the last instant a datetime can hold
_SAMPLE_RECORDS = 4096  # search-tree records whose data is decoded by verify="structure"
_SAMPLE_DATA = 256  # distinct data records decoded at most by verify="structure"
_LOCATION_KEYS = ("country", "registered_country", "represented_country", "continent",
                  "location", "city")
_EARTH_RADIUS_KM = 6371.0088  # IUGG mean radius


class GeoDatabaseError(ValueError):
    """A GeoIP database that cannot be used; ``str(e)`` is one line naming file and problem."""

    def __init__(self, path: str, problem: str) -> None:
        self.path = path
        self.problem = problem
        super().__init__(f"GeoIP database {path}: {problem}")


class GeoInfo(msgspec.Struct, frozen=True, kw_only=True):
    """Where an address is, as far as the database knows. Every field may be ``None``."""

    country: Optional[str] = None  # ISO 3166-1 alpha-2 ("GB"); registered country as fallback
    continent: Optional[str] = None  # "EU", "NA", ... (CONTINENTS)
    latitude: Optional[float] = None
    longitude: Optional[float] = None
    accuracy_radius: Optional[int] = None  # km, as the database states it
    city: Optional[str] = None  # English name

    @property
    def has_coordinates(self) -> bool:
        return self.latitude is not None and self.longitude is not None


# ---------------------------------------------------------------- the database

_READER_PHRASES = (  # maxminddb's messages -> ours (the file's name is already in front)
    ("exceeds the maximum depth", "data nested deeper than the reader allows"),
    ("exceeds the configured resource limits", "data exceeds the reader's size or depth "
                                               "limits"),
    ("exceeds the maximum number of values", "a map or array holds more values than the "
                                             "reader allows"),
    ("search tree is corrupt", "search tree is corrupt"),
    ("contains bad data", "bad data (unknown data type or corrupt data)"),
    ("Is this a valid MaxMind DB file?", "not a valid MaxMind DB file"),
)


def _describe(exc: BaseException) -> str:
    """One line for what a reader or decoder raised on corrupt input (no class names)."""
    if isinstance(exc, UnicodeError):
        return "invalid UTF-8 in a string"
    if isinstance(exc, RecursionError):
        return "data nested too deeply"
    if isinstance(exc, MemoryError):
        return "a length field asks for more memory than is available"
    text = " ".join(str(exc).split())
    for needle, phrase in _READER_PHRASES:
        if needle in text:
            return phrase
    return text.rstrip(".") or "unreadable data"


_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bytes: "bytes",
               list: "an array", bool: "a boolean"}


_V4_MAPPED = bytes(10) + b"\xff\xff"


def _canonical(text: str) -> Optional[str]:
    """``text`` as a canonical address string, or None if it is not an IP address.

    IPv4 must be a strict dotted quad (no leading zeros, no short forms); IPv6 is
    compressed (``2001:218::1``), an IPv4-mapped address becomes IPv4 and a zone
    (``fe80::1%eth0``) is dropped. Uses inet_pton/inet_ntop: ~0.5 us, where ipaddress
    takes ~5 us.
    """
    try:
        socket.inet_pton(socket.AF_INET, text)
        return text  # inet_pton only accepts the canonical dotted quad
    except OSError:
        pass
    except (ValueError, TypeError):  # an embedded NUL, or not a str
        return None
    try:
        packed = socket.inet_pton(socket.AF_INET6, text.split("%", 1)[0])
    except (OSError, ValueError):
        return None
    if packed[:12] == _V4_MAPPED:
        return socket.inet_ntop(socket.AF_INET, packed[12:])
    return socket.inet_ntop(socket.AF_INET6, packed)


def _code(value: Any) -> Optional[str]:
    """The code of a GeoIP2 ``{"iso_code": ...}``/``{"code": ...}`` map, or a flat string."""
    if isinstance(value, dict):
        value = value.get("iso_code", value.get("code"))
    if isinstance(value, str) and len(value) == 2 and value.isascii() and value.isalpha():
        return value.upper()
    return None


def _number(value: Any, limit: float) -> Optional[float]:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = float(value)
        if math.isfinite(value) and -limit <= value <= limit:
            return value
    return None


def _to_info(record: Any) -> Optional[GeoInfo]:
    """GeoInfo from a GeoIP2-style record; None when it holds nothing usable."""
    if not isinstance(record, dict):
        return None
    country = _code(record.get("country")) or _code(record.get("registered_country"))
    continent = _code(record.get("continent"))
    if continent not in CONTINENTS:
        continent = None
    lat = lon = radius = city = None
    loc = record.get("location")
    if isinstance(loc, dict):
        lat = _number(loc.get("latitude"), 90.0)
        lon = _number(loc.get("longitude"), 180.0)
        if lat is None or lon is None:
            lat = lon = None
        r = loc.get("accuracy_radius")
        if isinstance(r, int) and not isinstance(r, bool) and r >= 0:
            radius = r
    names = record.get("city")
    names = names.get("names") if isinstance(names, dict) else None
    if isinstance(names, dict) and isinstance(names.get("en"), str):
        city = names["en"]
    if country is None and continent is None and lat is None:
        return None
    return GeoInfo(country=country, continent=continent, latitude=lat, longitude=lon,
                   accuracy_radius=radius, city=city)


def _records(tree: bytes, record_size: int, node_count: int) -> array:
    """Every search-tree record as an unsigned 32-bit array: [left0, right0, left1, ...].

    Built with strided slices (C speed) rather than a Python loop per node, so checking a
    City database's millions of nodes takes a fraction of a second.
    """
    if record_size == 32:
        be = tree
    elif record_size == 24:
        out = bytearray(node_count * 8)
        out[1::4] = tree[0::3]
        out[2::4] = tree[1::3]
        out[3::4] = tree[2::3]
        be = bytes(out)
    else:  # 28: the middle byte's high nibble tops the left record, its low nibble the right
        out = bytearray(node_count * 8)
        middle = tree[3::7]
        out[0::8] = middle.translate(_HIGH_NIBBLE)
        out[1::8] = tree[0::7]
        out[2::8] = tree[1::7]
        out[3::8] = tree[2::7]
        out[4::8] = middle.translate(_LOW_NIBBLE)
        out[5::8] = tree[4::7]
        out[6::8] = tree[5::7]
        out[7::8] = tree[6::7]
        be = bytes(out)
    values = array("I")
    if values.itemsize != 4:  # pragma: no cover - every supported platform has 32-bit "I"
        values = array("L")
    values.frombytes(be)
    if sys.byteorder == "little":
        values.byteswap()
    return values


_HIGH_NIBBLE = bytes(b >> 4 for b in range(256))
_LOW_NIBBLE = bytes(b & 0x0F for b in range(256))


def _where(index: int) -> str:
    return f"node {index // 2} {'right' if index % 2 else 'left'} record"


class GeoDatabase:
    """A checked, memoised MaxMind DB reader.

    ``verify`` chooses the open-time checks (each includes the previous):

    - ``"basic"``: the file, the metadata, the layout (search tree, separator, data section);
    - ``"structure"`` (default): every search-tree record points to a node, to nothing, or
      into the data section; a sample of data records (all of them in small files) decodes,
      and the data holds location fields;
    - ``"full"``: every distinct data record referenced by the tree decodes (slow on City
      databases: seconds to minutes; for CI or an offline check).
    """

    __slots__ = ("path", "database_type", "ip_version", "node_count", "record_size",
                 "build_epoch", "languages", "lookup_errors", "_reader", "_memo",
                 "_memo_size", "_closed")

    def __init__(self, path: str | os.PathLike, *, memo_size: int = 4096,
                 verify: Literal["basic", "structure", "full"] = "structure",
                 mode: Optional[int] = None) -> None:
        if verify not in ("basic", "structure", "full"):
            raise ValueError(f"verify must be 'basic', 'structure' or 'full', not {verify!r}")
        if memo_size < 0:
            raise ValueError("memo_size must be >= 0")
        self.path = os.fspath(path)
        self.lookup_errors = 0
        self._memo: OrderedDict[str, Optional[GeoInfo]] = OrderedDict()
        self._memo_size = memo_size
        self._closed = True
        self._reader = None
        try:  # an optional dependency: say so clearly
            importlib.import_module("maxminddb.decoder")
        except ImportError:
            raise self._error("the maxminddb package is not installed (pip install "
                              "maxminddb)") from None
        before = self._stat()
        meta = self._check_file(verify)
        self.database_type: str = meta["database_type"]
        self.ip_version: int = meta["ip_version"]
        self.node_count: int = meta["node_count"]
        self.record_size: int = meta["record_size"]
        self.build_epoch: int = meta["build_epoch"]
        self.languages: tuple[str, ...] = tuple(meta.get("languages") or ())
        self._reader = self._open_reader(mode)
        self._closed = False
        after = self._stat()
        if (before.st_ino, before.st_size, before.st_mtime_ns) != (
                after.st_ino, after.st_size, after.st_mtime_ns):
            self.close()
            raise self._error("the file changed while it was being opened; install updates "
                              "by renaming a complete file over the old one, then retry")

    # -------------------------------------------------------------- opening

    def _error(self, problem: str) -> GeoDatabaseError:
        return GeoDatabaseError(self.path, problem)

    def _stat(self) -> os.stat_result:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            raise self._error("file not found") from None
        except OSError as e:
            raise self._error(f"cannot read the file: {e.strerror or e}") from None
        if not os.path.isfile(self.path):
            raise self._error("not a regular file")
        return st

    def _check_file(self, verify: str) -> dict:
        """Run the open-time checks on a private read-only map of the file; its metadata."""
        try:
            with open(self.path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size == 0:
                    raise self._error("empty file, not a MaxMind DB")
                with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                    return self._check_buffer(buf, size, verify)
        except GeoDatabaseError:
            raise
        except OSError as e:
            raise self._error(f"cannot read the file: {e.strerror or e}") from None

    def _check_buffer(self, buf: mmap.mmap, size: int, verify: str) -> dict:
        from maxminddb.decoder import Decoder  # the pure-Python decoder: offsets on demand

        marker = buf.rfind(_METADATA_MARKER, max(0, size - _METADATA_WINDOW))
        if marker == -1:
            raise self._error("not a MaxMind DB file (no metadata section marker)")
        meta_start = marker + len(_METADATA_MARKER)
        if meta_start >= size:
            raise self._error("metadata section is empty (truncated file)")
        try:
            meta, _ = Decoder(buf, meta_start).decode(meta_start)
        except Exception as e:  # corrupt bytes raise whatever the decoder trips on
            raise self._error(f"metadata section is corrupt: {_describe(e)}") from None
        meta = self._check_metadata(meta)

        node_count, record_size = meta["node_count"], meta["record_size"]
        tree_size = node_count * record_size // 4
        data_start = tree_size + _SEPARATOR
        if data_start > marker:
            raise self._error(
                f"search tree of {node_count} nodes ({tree_size} bytes) does not fit before "
                f"the metadata at byte {marker} (node_count or record_size is wrong, or the "
                "file is truncated)")
        if buf[tree_size:data_start] != bytes(_SEPARATOR):
            raise self._error("the 16 zero bytes between search tree and data section are "
                              "missing (node_count or record_size is wrong, or the file is "
                              "corrupt)")
        if verify == "basic":
            return meta

        data_size = marker - data_start
        values = _records(buf[:tree_size], record_size, node_count)
        top = self._check_tree(values, node_count, data_size)
        decoder = Decoder(buf, data_start)
        if verify == "full":
            pointers = sorted({v for v in values if v > node_count})
        else:
            step = max(1, len(values) // _SAMPLE_RECORDS)
            pointers = sorted({v for v in values[::step] if v > node_count})
            if len(pointers) > _SAMPLE_DATA:
                stride = len(pointers) / _SAMPLE_DATA
                pointers = [pointers[int(i * stride)] for i in range(_SAMPLE_DATA)]
        located = False
        for pointer in pointers:
            offset = pointer - node_count - _SEPARATOR
            try:
                record, _ = decoder.decode(data_start + offset)
            except Exception as e:
                raise self._error(f"data section is corrupt: record at data offset {offset}: "
                                  f"{_describe(e)}") from None
            located = located or (isinstance(record, dict)
                                  and any(k in record for k in _LOCATION_KEYS))
        if not pointers and top <= node_count:
            raise self._error("the search tree holds no data records (empty database)")
        if pointers and not located:
            raise self._error(
                f"no location data (country, continent or location) in its records "
                f"(database_type {meta['database_type']!r}); geo routing needs a City or "
                "Country database")
        return meta

    def _check_metadata(self, meta: Any) -> dict:
        if not isinstance(meta, dict):
            kind = _TYPE_NAMES.get(type(meta), type(meta).__name__)
            raise self._error(f"metadata is {kind}, not a map")

        def need_int(key: str, allowed=None, low: int = 0, high: int = 2**64) -> int:
            value = meta.get(key)
            if value is None:
                raise self._error(f"metadata lacks {key}")
            if not isinstance(value, int) or isinstance(value, bool):
                raise self._error(f"metadata {key} is not an integer")
            if allowed is not None and value not in allowed:
                raise self._error(f"metadata {key} is {value}; expected one of "
                                  f"{', '.join(map(str, allowed))}")
            if not low <= value <= high:
                raise self._error(f"metadata {key} {value} is out of range")
            return value

        need_int("binary_format_major_version", allowed=(2,))
        need_int("binary_format_minor_version")
        need_int("record_size", allowed=(24, 28, 32))
        need_int("ip_version", allowed=(4, 6))
        need_int("node_count", low=1, high=2**32 - 1)
        need_int("build_epoch", high=_MAX_EPOCH)
        dtype = meta.get("database_type")
        if not isinstance(dtype, str) or not dtype:
            raise self._error("metadata database_type is missing or not a string")
        langs = meta.get("languages", [])
        if not isinstance(langs, list) or not all(isinstance(x, str) for x in langs):
            raise self._error("metadata languages is not a list of strings")
        desc = meta.get("description", {})
        if not isinstance(desc, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in desc.items()):
            raise self._error("metadata description is not a map of strings")
        return meta

    def _check_tree(self, values: array, node_count: int, data_size: int) -> int:
        """Each record is a node (1..node_count-1), empty (node_count) or data (past the
        separator, inside the data section). 0 is the root: nothing may point back to it.
        Returns the largest record value."""
        bad = frozenset(range(node_count + 1, node_count + _SEPARATOR)) | {0}
        if not bad.isdisjoint(values):  # C-speed scan; the slow search only on failure
            at = next(i for i, v in enumerate(values) if v in bad)
            what = "points back to the root node" if values[at] == 0 else (
                "points into the 16 byte separator before the data section")
            raise self._error(f"search tree is corrupt: {_where(at)} {what}")
        top = max(values)
        if top >= node_count + _SEPARATOR + data_size:
            raise self._error(
                f"search tree is corrupt: {_where(values.index(top))} points "
                f"{top - node_count - _SEPARATOR - data_size + 1} bytes past the end of the "
                f"data section ({data_size} bytes)")
        return top

    def _open_reader(self, mode: Optional[int]):
        import maxminddb

        try:
            return maxminddb.open_database(self.path, maxminddb.MODE_AUTO if mode is None
                                           else mode)
        except Exception as e:
            raise self._error(f"the maxminddb reader refused it: {_describe(e)}") from None

    # -------------------------------------------------------------- lookups

    @property
    def build_time(self) -> datetime:
        """When the database was built (metadata ``build_epoch``), UTC."""
        return datetime.fromtimestamp(self.build_epoch, tz=timezone.utc)

    @property
    def memo_size(self) -> int:
        return self._memo_size

    def memo_len(self) -> int:
        """Entries now in the lookup memo (at most ``memo_size``)."""
        return len(self._memo)

    def lookup(self, ip: str) -> Optional[GeoInfo]:
        """Where ``ip`` is; None for an invalid or uncovered address or no location data.

        Raises GeoDatabaseError (and counts it in ``lookup_errors``) when the record for
        ``ip`` is corrupt or the database is closed; such failures are not memoised.
        """
        memo = self._memo
        if ip in memo:
            memo.move_to_end(ip)
            return memo[ip]
        addr = _canonical(ip.strip()) if isinstance(ip, str) else None
        if addr is None:
            return None  # not memoised: invalid strings are cheap to reject, and unbounded
        if self._closed:
            self.lookup_errors += 1
            raise self._error("lookup on a closed database")
        if self.ip_version == 4 and ":" in addr:
            info = None  # an IPv4 database covers no IPv6 address
        else:
            try:
                info = _to_info(self._reader.get(addr))
            except Exception as e:
                self.lookup_errors += 1
                raise self._error(f"lookup of {addr} failed: {_describe(e)}") from None
        if self._memo_size:
            memo[ip] = info
            if len(memo) > self._memo_size:
                memo.popitem(last=False)
        return info

    def close(self) -> None:
        """Release the file map and the memo; later lookups raise GeoDatabaseError."""
        self._closed = True
        self._memo.clear()
        if self._reader is not None:
            self._reader.close()

    def __enter__(self) -> GeoDatabase:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"GeoDatabase({self.path!r}, type={self.database_type!r}, "
                f"ipv{self.ip_version}, built {self.build_time:%Y-%m-%d})")


# ---------------------------------------------------------------- the client address

def _hop(text: str) -> Optional[str]:
    """One X-Forwarded-For element as a canonical address, or None if it is not one.

    Accepts ``1.2.3.4``, ``1.2.3.4:5678``, ``2001:db8::1``, ``[2001:db8::1]`` and
    ``[2001:db8::1]:443`` (some proxies append the port); see ``_canonical``.
    """
    text = text.strip().strip('"')
    if text.startswith("["):
        end = text.find("]")
        if end == -1:
            return None
        text = text[1:end]
    elif text.count(":") == 1:
        text = text.split(":", 1)[0]
    return _canonical(text)


def client_ip(peer: str, xff: bytes | str | None, trusted: Callable[[str], bool]) -> str:
    """The client's address: ``peer``, or the right-most X-Forwarded-For hop not vouched for.

    Starting from the TCP peer, while the current address is a trusted proxy
    (``trusted(address)``) the next hop to the left of ``xff`` (all X-Forwarded-For values
    joined with commas) is believed. Stops at the first untrusted address (the client) or at
    the left end. An element that is not an address (``unknown``, an obfuscated
    identifier, garbage) stops the walk at the last address that could be read; empty
    elements are skipped. Addresses are returned in canonical form (IPv6 compressed,
    IPv4-mapped IPv6 as IPv4), and that is what ``trusted`` is asked about.
    """
    current = _hop(peer) or peer
    if not xff or not trusted(current):
        return current
    if isinstance(xff, (bytes, bytearray, memoryview)):
        xff = bytes(xff).decode("latin-1")
    for element in reversed(xff.split(",")):
        if not element.strip():
            continue
        hop = _hop(element)
        if hop is None:
            break
        current = hop
        if not trusted(hop):
            break
    return current


def haversine_km(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    """Great-circle distance in kilometres between two points given in degrees."""
    p1, p2 = math.radians(lat1), math.radians(lat2)
    dp, dl = p2 - p1, math.radians(lon2 - lon1)
    h = math.sin(dp / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return 2 * _EARTH_RADIUS_KM * math.asin(min(1.0, math.sqrt(h)))


# ---------------------------------------------------------------- configuration

class _Table(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Base of the geo tables: frozen, unknown keys rejected (as dispa.config.model)."""


NonEmpty = Annotated[str, Meta(min_length=1)]
CountryCode = Annotated[str, Meta(pattern="^[A-Z]{2}$", description="ISO 3166-1 alpha-2")]
ContinentCode = Literal["AF", "AN", "AS", "EU", "NA", "OC", "SA"]
Latitude = Annotated[float, Meta(ge=-90, le=90)]
Longitude = Annotated[float, Meta(ge=-180, le=180)]


class GeoRegion(_Table):
    """One ``[[geo.regions]]`` entry: a region served by one target group."""

    name: NonEmpty
    target: NonEmpty  # a target group name
    latitude: Optional[Latitude] = None  # where the region is, for prefer = nearest ordering
    longitude: Optional[Longitude] = None
    countries: list[CountryCode] = msgspec.field(default_factory=list)
    continents: list[ContinentCode] = msgspec.field(default_factory=list)

    def __post_init__(self) -> None:
        if (self.latitude is None) != (self.longitude is None):
            raise ValueError(f"region {self.name!r}: set both latitude and longitude, or "
                             "neither")


class GeoRouterConfig(_Table):
    """``[geo]``: the database and the regions that clients are mapped to."""

    database: NonEmpty  # path of a .mmdb file (City or Country)
    regions: Annotated[list[GeoRegion], Meta(min_length=1)]
    failover: list[str] = msgspec.field(default_factory=list)  # region names; [] = declared
    prefer: Literal["map", "nearest"] = "map"

    def __post_init__(self) -> None:
        names = [r.name for r in self.regions]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"duplicate region names: {', '.join(dup)}")
        unknown = [n for n in self.failover if n not in names]
        if unknown:
            raise ValueError(f"failover names unknown regions: {', '.join(unknown)}")
        if len(set(self.failover)) != len(self.failover):
            raise ValueError("failover lists a region twice")


class GeoCondition(_Table):
    """The ``geo`` routing condition: where the client must (not) be.

    Matches when the country is not in ``not_countries``, the continent not in
    ``not_continents``, and - if ``countries`` or ``continents`` is set - the country is in
    ``countries`` or the continent in ``continents``. A client whose location is unknown
    (no database answer, or neither country nor continent) matches iff ``unknown``.
    """

    countries: list[CountryCode] = msgspec.field(default_factory=list)
    continents: list[ContinentCode] = msgspec.field(default_factory=list)
    not_countries: list[CountryCode] = msgspec.field(default_factory=list)
    not_continents: list[ContinentCode] = msgspec.field(default_factory=list)
    unknown: bool = False

    def __post_init__(self) -> None:
        if not (self.countries or self.continents or self.not_countries
                or self.not_continents):
            raise ValueError("geo condition needs countries, continents, not_countries or "
                             "not_continents")

    def matches(self, info: Optional[GeoInfo]) -> bool:
        if info is None or (info.country is None and info.continent is None):
            return self.unknown
        country, continent = info.country, info.continent
        if country is not None and country in self.not_countries:
            return False
        if continent is not None and continent in self.not_continents:
            return False
        if not (self.countries or self.continents):
            return True
        return (country is not None and country in self.countries) or (
            continent is not None and continent in self.continents)


# ---------------------------------------------------------------- the router

Reason = Literal["country", "continent", "nearest", "failover", "unknown-ip"]


class GeoChoice(list):
    """``GeoRouter.choose``'s answer: target names, best first, plus why.

    - ``reason``: the rule that placed the first entry ("country", "continent", "nearest",
      "failover", or "unknown-ip" when the client could not be located);
    - ``regions``: region names in the same preference order as the targets (one per
      region: two regions sharing a target appear once in the list, twice here);
    - ``skipped``: unhealthy regions that ranked above the first entry;
    - ``all_unhealthy``: no candidate was healthy (the list is then the plain preference
      order, so a caller may still try it);
    - ``info``: the GeoInfo the decision was based on.
    """

    __slots__ = ("reason", "regions", "skipped", "all_unhealthy", "info")

    reason: Reason
    regions: tuple[str, ...]
    skipped: tuple[str, ...]
    all_unhealthy: bool
    info: Optional[GeoInfo]

    def __init__(self, targets, reason: Reason, regions: tuple[str, ...],
                 skipped: tuple[str, ...], all_unhealthy: bool,
                 info: Optional[GeoInfo]) -> None:
        super().__init__(targets)
        self.reason = reason
        self.regions = regions
        self.skipped = skipped
        self.all_unhealthy = all_unhealthy
        self.info = info

    def __repr__(self) -> str:
        return (f"GeoChoice({list.__repr__(self)}, reason={self.reason!r}, "
                f"skipped={self.skipped!r})")


class _Plan:
    """One preference order, precomputed: (region index, reason) pairs and their names."""

    __slots__ = ("entries", "targets", "regions", "reason")

    def __init__(self, entries: tuple[tuple[int, str], ...], regions: tuple[GeoRegion, ...]):
        self.entries = entries
        self.targets = tuple(dict.fromkeys(regions[i].target for i, _ in entries))
        self.regions = tuple(regions[i].name for i, _ in entries)
        self.reason = entries[0][1]


class GeoRouter:
    """Orders a config's regions for one client.

    Decision order for a located client (``prefer = "map"``): regions listing its country
    (declaration order), then regions listing its continent, then every other region with
    coordinates by great-circle distance (when the client has coordinates), then the rest in
    ``failover`` order (regions missing from ``failover`` follow in declaration order).
    ``prefer = "nearest"`` puts the distance ordering first when the client has coordinates.
    An unknown client gets the failover order (reason "unknown-ip"). Health is applied last:
    healthy targets keep their order and go first; the reason is that of the first one.

    Orders are memoised per (country, continent, coordinates), so a request costs a memo
    hit in the database, one here, and one ``healthy`` call per distinct target.
    """

    __slots__ = ("config", "database", "lookup_errors", "_regions", "_failover",
                 "_by_country", "_by_continent", "_coords", "_plans", "_unknown")

    _PLAN_MEMO = 4096

    def __init__(self, config: GeoRouterConfig, database: Optional[GeoDatabase] = None) -> None:
        self.config = config
        self.database = database if database is not None else GeoDatabase(config.database)
        self.lookup_errors = 0
        self._regions = tuple(config.regions)
        index = {r.name: i for i, r in enumerate(self._regions)}
        listed = [index[n] for n in config.failover]
        self._failover = tuple(listed + [i for i in range(len(self._regions))
                                         if i not in listed])
        self._by_country: dict[str, list[int]] = {}
        self._by_continent: dict[str, list[int]] = {}
        for i, r in enumerate(self._regions):
            for c in r.countries:
                self._by_country.setdefault(c, []).append(i)
            for c in r.continents:
                self._by_continent.setdefault(c, []).append(i)
        self._coords = tuple((i, r.latitude, r.longitude) for i, r in enumerate(self._regions)
                             if r.latitude is not None)
        self._plans: dict[tuple, _Plan] = {}
        self._unknown = _Plan(tuple((i, "unknown-ip") for i in self._failover), self._regions)

    def _plan(self, info: Optional[GeoInfo]) -> _Plan:
        if info is None or (info.country is None and info.continent is None
                            and not info.has_coordinates):
            return self._unknown
        key = (info.country, info.continent, info.latitude, info.longitude)
        plan = self._plans.get(key)
        if plan is None:
            if len(self._plans) >= self._PLAN_MEMO:
                self._plans.clear()
            plan = self._plans[key] = _Plan(self._order(info), self._regions)
        return plan

    def _order(self, info: GeoInfo) -> tuple[tuple[int, str], ...]:
        """(region index, reason) for every region, best first."""
        seen: set[int] = set()
        order: list[tuple[int, str]] = []

        def add(indices, reason: str) -> None:
            for i in indices:
                if i not in seen:
                    seen.add(i)
                    order.append((i, reason))

        def mapped() -> None:
            add(self._by_country.get(info.country, ()), "country")
            add(self._by_continent.get(info.continent, ()), "continent")

        def nearest() -> None:
            if info.has_coordinates:
                ranked = sorted(self._coords, key=lambda c: (
                    haversine_km(info.latitude, info.longitude, c[1], c[2]), c[0]))
                add((c[0] for c in ranked), "nearest")

        if self.config.prefer == "nearest":
            nearest()
            mapped()
        else:
            mapped()
            nearest()
        add(self._failover, "failover")
        return tuple(order)

    def locate(self, ip: str) -> Optional[GeoInfo]:
        """``database.lookup`` that never raises: errors count in ``lookup_errors``."""
        try:
            return self.database.lookup(ip)
        except GeoDatabaseError:
            self.lookup_errors += 1
            return None

    def choose(self, ip: str, healthy: Optional[Callable[[str], bool]] = None) -> GeoChoice:
        """Target groups for the client at ``ip``, best first (the first healthy one wins).

        ``healthy(target)`` says whether a target group can take traffic (None: all can);
        it is called once per distinct target. Never raises; see GeoChoice for the
        explanation attached to the list.
        """
        return self.choose_for(self.locate(ip), healthy)

    def choose_for(self, info: Optional[GeoInfo],
                   healthy: Optional[Callable[[str], bool]] = None) -> GeoChoice:
        """``choose`` for a client already located (or None when unknown)."""
        plan = self._plan(info)
        if healthy is not None:
            down = {t for t in plan.targets if not healthy(t)}
            if down:
                return self._without(plan, down, info)
        return GeoChoice(plan.targets, plan.reason, plan.regions, (), False, info)

    def _without(self, plan: _Plan, down: set[str], info: Optional[GeoInfo]) -> GeoChoice:
        regions = self._regions
        good = [e for e in plan.entries if regions[e[0]].target not in down]
        if not good:
            return GeoChoice(plan.targets, plan.reason, plan.regions, (), True, info)
        bad = [e for e in plan.entries if regions[e[0]].target in down]
        first = plan.entries.index(good[0])
        skipped = tuple(regions[i].name for i, _ in plan.entries[:first])
        ranked = good + bad
        targets = dict.fromkeys(regions[i].target for i, _ in ranked)
        return GeoChoice(targets, good[0][1], tuple(regions[i].name for i, _ in ranked),
                         skipped, False, info)
