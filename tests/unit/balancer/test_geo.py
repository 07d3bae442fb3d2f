"""Geo-aware routing blocks (dispa/balancer/geo.py) against MaxMind's own test databases.

The databases and their expected contents come from github.com/maxmind/MaxMind-DB
(``../shared/data/maxmind``): ``test-data/*.mmdb`` with ``source-data/*.json`` describing
them, and ``bad-data/`` with corrupt files that have crashed or confused other readers.
Known answers below are taken from ``source-data/GeoIP2-City-Test.json``.
"""

from __future__ import annotations

import ipaddress
import shutil
from pathlib import Path

import msgspec
import pytest

maxminddb = pytest.importorskip("maxminddb")

from dispa.balancer.geo import (  # noqa: E402
    GeoChoice,
    GeoCondition,
    GeoDatabase,
    GeoDatabaseError,
    GeoInfo,
    GeoRegion,
    GeoRouter,
    GeoRouterConfig,
    client_ip,
    haversine_km,
)

DATA = Path(__file__).resolve().parents[3].parent / "shared" / "data" / "maxmind"
if not (DATA / "test-data").is_dir():  # pragma: no cover - the checkout always has it
    pytest.skip(f"MaxMind test databases not found at {DATA}", allow_module_level=True)

TEST = DATA / "test-data"
BAD = DATA / "bad-data"
CITY = TEST / "GeoIP2-City-Test.mmdb"
COUNTRY = TEST / "GeoLite2-Country-Test.mmdb"

LONDON = "81.2.69.142"  # GB, EU, London (51.5142, -0.0931), accuracy 10 km
MILTON = "216.160.83.56"  # US, NA, Milton WA
TOKYO_V6 = "2001:218::1"  # JP, AS (35.68536, 139.75309), accuracy 100 km
PRIVATE = "10.0.0.1"  # in no database


@pytest.fixture(scope="module")
def city() -> GeoDatabase:
    db = GeoDatabase(CITY)
    yield db
    db.close()


# ---------------------------------------------------------------- known answers

@pytest.mark.parametrize("ip, country, continent, city_name, lat, lon, radius", [
    (LONDON, "GB", "EU", "London", 51.5142, -0.0931, 10),
    ("2.125.160.216", "GB", "EU", "Boxford", 51.75, -1.25, 100),  # registered in FR: ignored
    ("89.160.20.112", "SE", "EU", "Linköping", 58.4167, 15.6167, 76),
    (MILTON, "US", "NA", "Milton", 47.2513, -122.3149, 22),
    ("67.43.156.1", "BT", "AS", None, 27.5, 90.5, 534),
    (TOKYO_V6, "JP", "AS", None, 35.68536, 139.75309, 100),
    ("2a02:d3c0::1", "GB", "EU", None, 54.75844, -2.69531, 100),
    ("::ffff:81.2.69.142", "GB", "EU", "London", 51.5142, -0.0931, 10),  # IPv4-mapped
    ("2002:5102:458e::1", "GB", "EU", "London", 51.5142, -0.0931, 10),  # 6to4 of 81.2.69.142
])
def test_city_database_known_answers(city, ip, country, continent, city_name, lat, lon,
                                     radius):
    assert city.lookup(ip) == GeoInfo(country=country, continent=continent, city=city_name,
                                      latitude=lat, longitude=lon, accuracy_radius=radius)


def test_partial_records_keep_what_they_have(city):
    # ::2.3.3.0/120 holds only a continent; 2a02:d500::/29 a continent and a location.
    assert city.lookup("2.3.3.1") == GeoInfo(continent="EU")
    info = city.lookup("2a02:d500::1")
    assert (info.country, info.continent, info.has_coordinates) == (None, "EU", True)


def test_registered_country_is_the_fallback_country():
    # GeoIP2-Enterprise-Test: ::5.83.124.0/118 has registered_country RO and no country.
    with GeoDatabase(TEST / "GeoIP2-Enterprise-Test.mmdb") as db:
        assert db.lookup("5.83.124.1") == GeoInfo(country="RO")


def test_country_database_has_no_coordinates():
    with GeoDatabase(COUNTRY) as db:
        info = db.lookup(LONDON)
        assert (info.country, info.continent) == ("GB", "EU")
        assert not info.has_coordinates and info.city is None


def test_metadata_is_exposed(city):
    assert city.database_type == "GeoIP2-City"
    assert city.ip_version == 6 and city.record_size in (24, 28, 32)
    assert city.build_time.year >= 2013
    assert "en" in city.languages


@pytest.mark.parametrize("ip", [
    "", "not-an-ip", "256.1.1.1", "1.2.3", "81.2.69.142/32", "81.2.69.142:80", "[::1]",
    "::g", " ", "1.2.3.4.5", "ｆｆ::1",
])
def test_invalid_addresses_are_none(city, ip):
    assert city.lookup(ip) is None


@pytest.mark.parametrize("ip", [PRIVATE, "127.0.0.1", "::1", "192.0.2.1", "fe80::1%eth0"])
def test_addresses_not_in_the_database_are_none(city, ip):
    assert city.lookup(ip) is None


def test_non_string_input_is_none(city):
    assert city.lookup(None) is None  # type: ignore[arg-type]
    assert city.lookup(b"81.2.69.142") is None  # type: ignore[arg-type]


# ---------------------------------------------------------------- the memo

class _CountingReader:
    def __init__(self, reader):
        self.reader, self.calls = reader, []

    def get(self, addr):
        self.calls.append(str(addr))
        return self.reader.get(addr)

    def close(self):
        self.reader.close()


def test_memo_is_a_bounded_lru():
    db = GeoDatabase(CITY, memo_size=3)
    spy = db._reader = _CountingReader(db._reader)
    a, b, c, d = LONDON, MILTON, TOKYO_V6, "89.160.20.112"
    for ip in (a, b, c, a):  # the second a is a hit and becomes most recent
        db.lookup(ip)
    assert spy.calls == [a, b, c] and db.memo_len() == 3
    db.lookup(d)  # evicts b, the least recently used
    assert db.memo_len() == 3
    db.lookup(a)
    assert spy.calls == [a, b, c, d]  # a is still memoised
    db.lookup(b)
    assert spy.calls == [a, b, c, d, b]  # b was evicted
    for i in range(100):
        db.lookup(f"10.0.{i}.1")  # misses (None) are memoised too, within the bound
    assert db.memo_len() == db.memo_size == 3
    db.close()


def test_memo_skips_invalid_strings_and_can_be_disabled():
    db = GeoDatabase(CITY, memo_size=2)
    for i in range(50):
        assert db.lookup(f"garbage-{i}") is None
    assert db.memo_len() == 0
    db.close()
    off = GeoDatabase(CITY, memo_size=0)
    spy = off._reader = _CountingReader(off._reader)
    off.lookup(LONDON)
    off.lookup(LONDON)
    assert len(spy.calls) == 2 and off.memo_len() == 0
    off.close()


def test_lookup_on_a_closed_database_raises_and_counts():
    db = GeoDatabase(CITY)
    db.close()
    with pytest.raises(GeoDatabaseError, match="closed"):
        db.lookup(LONDON)
    assert db.lookup_errors == 1


# ---------------------------------------------------------------- refusing bad files

def _assert_clear(err: GeoDatabaseError, path: Path) -> str:
    text = str(err)
    assert text.startswith(f"GeoIP database {path}: ")
    assert "\n" not in text and "Traceback" not in text
    assert "InvalidDatabaseError" not in text and "UnicodeDecodeError" not in text
    assert err.path == str(path) and text.endswith(err.problem)
    assert isinstance(err, ValueError)
    return err.problem


# What each bad-data file is refused for with the default checks (verify="structure").
BAD_AT_OPEN = {
    "libmaxminddb/libmaxminddb-corrupt-search-tree.mmdb":
        "search tree is corrupt: node 1 left record points back to the root node",
    "libmaxminddb/libmaxminddb-deep-array-nesting.mmdb":
        "data section is corrupt: record at data offset 0: data nested deeper",
    "libmaxminddb/libmaxminddb-deep-nesting.mmdb":
        "data section is corrupt: record at data offset 0: data nested deeper",
    "libmaxminddb/libmaxminddb-empty-array-last-in-metadata.mmdb": "no location data",
    "libmaxminddb/libmaxminddb-empty-map-last-in-metadata.mmdb": "no location data",
    "libmaxminddb/libmaxminddb-metadata-marker-only.mmdb": "metadata section is empty",
    "libmaxminddb/libmaxminddb-offset-integer-overflow.mmdb":
        "metadata section is corrupt: bad data",
    "libmaxminddb/libmaxminddb-oversized-array.mmdb":
        "data section is corrupt: record at data offset 0: a map or array holds more values",
    "libmaxminddb/libmaxminddb-oversized-map.mmdb":
        "data section is corrupt: record at data offset 0: a map or array holds more values",
    "libmaxminddb/libmaxminddb-separator-record-max-left.mmdb":
        "node 0 left record points into the 16 byte separator",
    "libmaxminddb/libmaxminddb-separator-record-min-left.mmdb":
        "node 0 left record points into the 16 byte separator",
    "libmaxminddb/libmaxminddb-separator-record-min-right.mmdb":
        "node 0 right record points into the 16 byte separator",
    "libmaxminddb/libmaxminddb-uint64-max-epoch.mmdb":
        "metadata build_epoch 18446744073709551615 is out of range",
    "maxminddb-golang/cyclic-data-structure.mmdb": "metadata record_size is 0",
    "maxminddb-golang/invalid-bytes-length.mmdb": "metadata section is corrupt: bad data",
    "maxminddb-golang/invalid-data-record-offset.mmdb":
        "metadata section is corrupt: invalid UTF-8",
    "maxminddb-golang/invalid-map-key-length.mmdb": "metadata record_size is 0",
    "maxminddb-golang/invalid-string-length.mmdb": "metadata section is corrupt: bad data",
    "maxminddb-golang/metadata-is-an-uint128.mmdb": "metadata is an integer, not a map",
    "maxminddb-golang/unexpected-bytes.mmdb": "metadata section is corrupt: bad data",
    "maxminddb-python/bad-unicode-in-map-key.mmdb":
        "16 zero bytes between search tree and data section are missing",
}

# With verify="basic" (metadata and layout only) these open, and their corruption shows on
# lookup, as a counted GeoDatabaseError. The others are refused at open in every mode, or
# (corrupt-search-tree, empty-*-last-in-metadata) open and answer None: their one data
# record ({"ip": "test"}) has no location, and their defect is out of any lookup's path.
BAD_AT_LOOKUP = {
    "libmaxminddb/libmaxminddb-deep-array-nesting.mmdb": "1.1.1.1",
    "libmaxminddb/libmaxminddb-deep-nesting.mmdb": "1.1.1.1",
    "libmaxminddb/libmaxminddb-oversized-array.mmdb": "1.1.1.1",
    "libmaxminddb/libmaxminddb-oversized-map.mmdb": "1.1.1.1",
    "libmaxminddb/libmaxminddb-separator-record-max-left.mmdb": "1.1.1.1",
    "libmaxminddb/libmaxminddb-separator-record-min-left.mmdb": "1.1.1.1",
    "libmaxminddb/libmaxminddb-separator-record-min-right.mmdb": "128.0.0.1",
}
BASIC_OPENS_HARMLESS = {
    "libmaxminddb/libmaxminddb-corrupt-search-tree.mmdb",
    "libmaxminddb/libmaxminddb-empty-array-last-in-metadata.mmdb",
    "libmaxminddb/libmaxminddb-empty-map-last-in-metadata.mmdb",
}

BAD_FILES = sorted(p.relative_to(BAD).as_posix() for p in BAD.rglob("*.mmdb"))


def test_every_bad_data_file_has_an_expectation():
    # A new file in bad-data/ must be looked at and added above.
    assert BAD_FILES == sorted(BAD_AT_OPEN)


@pytest.mark.parametrize("name", BAD_FILES)
@pytest.mark.parametrize("verify", ["structure", "full"])
def test_bad_data_is_refused_at_open(name, verify):
    path = BAD / name
    with pytest.raises(GeoDatabaseError) as info:
        GeoDatabase(path, verify=verify)
    assert BAD_AT_OPEN[name] in _assert_clear(info.value, path)


@pytest.mark.parametrize("name", BAD_FILES)
def test_bad_data_with_basic_checks_fails_at_open_or_on_lookup(name):
    pytest.importorskip("maxminddb.extension")  # the pure reader misses two (next test)
    path = BAD / name
    try:
        db = GeoDatabase(path, verify="basic", mode=maxminddb.MODE_MMAP_EXT)
    except GeoDatabaseError as e:
        assert name not in BAD_AT_LOOKUP and name not in BASIC_OPENS_HARMLESS
        assert BAD_AT_OPEN[name] in _assert_clear(e, path)
        return
    with db:
        if name in BASIC_OPENS_HARMLESS:
            assert [db.lookup(ip) for ip in ("1.1.1.1", "128.0.0.1")] == [None, None]
            return
        ip = BAD_AT_LOOKUP[name]
        for attempt in (1, 2):  # errors are not memoised: every failure raises and counts
            with pytest.raises(GeoDatabaseError) as info:
                db.lookup(ip)
            assert _assert_clear(info.value, path).startswith(f"lookup of {ip} failed: ")
            assert db.lookup_errors == attempt
        assert db.lookup("::1") is None  # an IPv4 database: IPv6 is simply not covered


@pytest.mark.parametrize("name", ["libmaxminddb-separator-record-min-left.mmdb",
                                  "libmaxminddb-separator-record-min-right.mmdb"])
def test_why_structure_is_the_default(name):
    # The pure-Python reader follows a record into the separator and decodes its zero bytes
    # as an empty map: a silent wrong answer. Only the search-tree check catches it.
    path = BAD / "libmaxminddb" / name
    with GeoDatabase(path, verify="basic", mode=maxminddb.MODE_MMAP) as db:
        assert db.lookup("1.1.1.1") is None and db.lookup("128.0.0.1") is None
        assert db.lookup_errors == 0
    with pytest.raises(GeoDatabaseError, match="points into the 16 byte separator"):
        GeoDatabase(path, mode=maxminddb.MODE_MMAP)


@pytest.mark.parametrize("name, problem", [
    ("GeoIP2-City-Test-Broken-Double-Format.mmdb",
     "data section is corrupt: record at data offset"),
    ("GeoIP2-City-Test-Invalid-Node-Count.mmdb",
     "search tree of 100000 nodes (700000 bytes) does not fit before the metadata"),
    ("MaxMind-DB-test-broken-pointers-24.mmdb",
     "search tree is corrupt: node 36 left record points 99988 bytes past the end"),
    ("MaxMind-DB-test-broken-search-tree-24.mmdb",
     "search tree is corrupt: node 0 right record points back to the root node"),
])
def test_broken_test_databases_are_refused(name, problem):
    with pytest.raises(GeoDatabaseError) as info:
        GeoDatabase(TEST / name)
    assert problem in _assert_clear(info.value, TEST / name)


@pytest.mark.parametrize("name", [
    "GeoLite2-ASN-Test.mmdb", "GeoIP2-ISP-Test.mmdb", "GeoIP2-Anonymous-IP-Test.mmdb",
    "GeoIP2-Connection-Type-Test.mmdb", "MaxMind-DB-test-decoder.mmdb",
])
def test_databases_without_location_data_are_refused(name):
    with pytest.raises(GeoDatabaseError) as info:
        GeoDatabase(TEST / name)
    problem = _assert_clear(info.value, TEST / name)
    assert "no location data" in problem and "City or Country database" in problem


@pytest.mark.parametrize("name", [
    "GeoIP2-City-Test.mmdb", "GeoLite2-City-Test.mmdb", "GeoIP2-Country-Test.mmdb",
    "GeoLite2-Country-Test.mmdb", "GeoIP2-Enterprise-Test.mmdb",
    "GeoIP2-Precision-Enterprise-Test.mmdb", "GeoIP2-City-Shield-Test.mmdb",
])
def test_good_location_databases_pass_the_full_check(name):
    GeoDatabase(TEST / name, verify="full").close()


def test_missing_file(tmp_path):
    path = tmp_path / "nope.mmdb"
    with pytest.raises(GeoDatabaseError) as info:
        GeoDatabase(path)
    assert _assert_clear(info.value, path) == "file not found"


def test_directory(tmp_path):
    with pytest.raises(GeoDatabaseError) as info:
        GeoDatabase(tmp_path)
    assert _assert_clear(info.value, tmp_path) == "not a regular file"


def test_empty_file(tmp_path):
    path = tmp_path / "empty.mmdb"
    path.write_bytes(b"")
    with pytest.raises(GeoDatabaseError) as info:
        GeoDatabase(path)
    assert _assert_clear(info.value, path) == "empty file, not a MaxMind DB"


def test_not_a_maxmind_file(tmp_path):
    path = tmp_path / "GeoLite2-City.mmdb"
    path.write_bytes(b"<html>403 Forbidden: license key required</html>\n" * 10)
    with pytest.raises(GeoDatabaseError) as info:
        GeoDatabase(path)
    assert "not a MaxMind DB file" in _assert_clear(info.value, path)


def test_truncated_download(tmp_path):
    path = tmp_path / "truncated.mmdb"
    data = CITY.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # metadata lives at the end: gone
    with pytest.raises(GeoDatabaseError) as info:
        GeoDatabase(path)
    assert "not a MaxMind DB file (no metadata section marker)" in _assert_clear(info.value,
                                                                                  path)


def test_damaged_search_tree(tmp_path):
    path = tmp_path / "damaged.mmdb"
    data = bytearray(CITY.read_bytes())
    data[7:14] = b"\xff" * 7  # node 1 (28-bit records) now points far past the data
    path.write_bytes(bytes(data))
    with pytest.raises(GeoDatabaseError) as info:
        GeoDatabase(path)
    assert "search tree is corrupt: node 1 left record points" in _assert_clear(
        info.value, path)


def test_database_type_mode_and_copy_are_independent_of_the_name(tmp_path):
    copy = tmp_path / "anything.dat"
    shutil.copyfile(CITY, copy)
    with GeoDatabase(copy, mode=maxminddb.MODE_MMAP) as db:  # the pure-Python reader
        assert db.lookup(LONDON).city == "London"


def test_bad_arguments():
    with pytest.raises(ValueError, match="verify"):
        GeoDatabase(CITY, verify="paranoid")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="memo_size"):
        GeoDatabase(CITY, memo_size=-1)


# ---------------------------------------------------------------- client address

def _nets(*cidrs):
    nets = [ipaddress.ip_network(c) for c in cidrs]
    return lambda ip: any(ipaddress.ip_address(ip) in n for n in nets)


TRUST_LB = _nets("10.0.0.0/8", "fd00::/8")


@pytest.mark.parametrize("peer, xff, expected", [
    # an untrusted peer is the client, whatever it claims
    ("203.0.113.9", b"81.2.69.142", "203.0.113.9"),
    # no header: the peer
    ("10.0.0.1", None, "10.0.0.1"),
    ("10.0.0.1", b"", "10.0.0.1"),
    # one trusted hop: the address it saw
    ("10.0.0.1", b"81.2.69.142", "81.2.69.142"),
    # spoofed entries left of the first untrusted hop are ignored
    ("10.0.0.1", b"1.1.1.1, 81.2.69.142", "81.2.69.142"),
    ("10.0.0.1", b"1.1.1.1, 81.2.69.142, 10.0.0.7", "81.2.69.142"),
    # every hop trusted: the left-most
    ("10.0.0.1", b"10.0.0.3, 10.0.0.2", "10.0.0.3"),
    # garbage stops the walk at the last address that could be read
    ("10.0.0.1", b"81.2.69.142, unknown, 10.0.0.2", "10.0.0.2"),
    ("10.0.0.1", b"_hidden", "10.0.0.1"),
    # empty elements are skipped
    ("10.0.0.1", b"81.2.69.142,, ,", "81.2.69.142"),
    # ports, brackets, IPv6, IPv4-mapped, str input
    ("10.0.0.1", b"81.2.69.142:51234", "81.2.69.142"),
    ("10.0.0.1", b"[2001:218::1]:443", "2001:218::1"),
    ("10.0.0.1", b"2001:218::1, fd00::5", "2001:218::1"),
    ("::ffff:10.0.0.1", b"::ffff:81.2.69.142", "81.2.69.142"),
    ("[fd00::1]", "2001:0218:0000::0001", "2001:218::1"),
])
def test_client_ip(peer, xff, expected):
    assert client_ip(peer, xff, TRUST_LB) == expected


def test_client_ip_with_the_proxy_trusted_proxies():
    from dispa.proxy.forwarding import TrustedProxies

    trusted = TrustedProxies(["10.0.0.0/8"]).contains
    assert client_ip("10.1.2.3", b"81.2.69.142, 10.9.9.9", trusted) == "81.2.69.142"
    assert client_ip("198.51.100.1", b"81.2.69.142", trusted) == "198.51.100.1"


def test_client_ip_asks_only_about_hops_it_walks():
    asked = []

    def trusted(ip):
        asked.append(ip)
        return ip.startswith("10.")

    assert client_ip("10.0.0.1", b"5.5.5.5, 81.2.69.142, 10.0.0.2", trusted) == "81.2.69.142"
    assert asked == ["10.0.0.1", "10.0.0.2", "81.2.69.142"]


# ---------------------------------------------------------------- the router

EU = {"name": "eu-west", "target": "pool-eu", "latitude": 51.5072, "longitude": -0.1276}
US = {"name": "us-east", "target": "pool-us", "latitude": 38.9, "longitude": -77.04}
AP = {"name": "ap-northeast", "target": "pool-ap", "latitude": 35.68, "longitude": 139.77}


def _router(city, regions, **cfg) -> GeoRouter:
    config = msgspec.convert({"database": str(CITY), "regions": regions, **cfg},
                             GeoRouterConfig)
    return GeoRouter(config, city)


def _up(*down):
    return lambda target: target not in down


def test_nearest_region_by_coordinates(city):
    router = _router(city, [US, AP, EU])  # no maps: distance decides
    choice = router.choose(LONDON)
    assert isinstance(choice, GeoChoice) and isinstance(choice, list)
    assert choice == ["pool-eu", "pool-us", "pool-ap"]
    assert choice.reason == "nearest" and choice.regions == ("eu-west", "us-east",
                                                             "ap-northeast")
    assert choice.info.city == "London" and choice.skipped == ()
    assert router.choose(TOKYO_V6)[0] == "pool-ap"
    assert router.choose(MILTON)[:2] == ["pool-us", "pool-ap"]  # WA: Tokyo beats London


def test_country_map_wins_over_distance_with_prefer_map(city):
    us = {**US, "countries": ["GB"]}  # contrived: GB is served from us-east
    mapped = _router(city, [us, EU, AP], prefer="map")
    choice = mapped.choose(LONDON)
    assert choice == ["pool-us", "pool-eu", "pool-ap"]
    assert choice.reason == "country"
    nearest = _router(city, [us, EU, AP], prefer="nearest")
    choice = nearest.choose(LONDON)
    assert choice[0] == "pool-eu" and choice.reason == "nearest"


def test_continent_map_then_failover(city):
    eu = {"name": "eu", "target": "pool-eu", "continents": ["EU"]}
    us = {"name": "us", "target": "pool-us", "countries": ["US", "CA"]}
    ap = {"name": "ap", "target": "pool-ap", "continents": ["AS", "OC"]}
    router = _router(city, [eu, us, ap], failover=["us", "eu", "ap"])
    choice = router.choose("89.160.20.112")  # SE: no country map, continent EU
    assert choice == ["pool-eu", "pool-us", "pool-ap"] and choice.reason == "continent"
    assert router.choose(MILTON).reason == "country"
    choice = router.choose("2.3.3.1")  # continent only: still mapped
    assert choice[0] == "pool-eu" and choice.reason == "continent"


def test_country_beats_continent(city):
    eu = {"name": "eu", "target": "pool-eu", "continents": ["EU"]}
    uk = {"name": "uk", "target": "pool-uk", "countries": ["GB"]}
    choice = _router(city, [eu, uk]).choose(LONDON)
    assert choice == ["pool-uk", "pool-eu"] and choice.reason == "country"


def test_failover_when_the_chosen_region_is_unhealthy(city):
    eu = {"name": "eu", "target": "pool-eu", "countries": ["GB"]}
    us = {"name": "us", "target": "pool-us"}
    ap = {"name": "ap", "target": "pool-ap"}
    router = _router(city, [eu, us, ap], failover=["ap", "us"])
    choice = router.choose(LONDON, _up("pool-eu"))
    assert choice == ["pool-ap", "pool-us", "pool-eu"]  # unhealthy last, still listed
    assert choice.reason == "failover" and choice.skipped == ("eu",)
    assert not choice.all_unhealthy
    assert router.choose(LONDON, _up()).reason == "country"


def test_nearest_healthy_region_comes_before_global_failover(city):
    eu = {**EU, "countries": ["GB"]}
    router = _router(city, [AP, US, eu], failover=["ap-northeast", "us-east", "eu-west"])
    choice = router.choose(LONDON, _up("pool-eu"))
    assert choice[0] == "pool-us" and choice.reason == "nearest"
    assert choice.skipped == ("eu-west",)


def test_all_unhealthy_keeps_the_preference_order(city):
    router = _router(city, [US, EU])
    choice = router.choose(LONDON, lambda target: False)
    assert choice == ["pool-eu", "pool-us"] and choice.all_unhealthy
    assert choice.reason == "nearest"


@pytest.mark.parametrize("ip", [PRIVATE, "not-an-ip", "", "::1"])
def test_unknown_clients_get_the_failover_order(city, ip):
    router = _router(city, [EU, US, AP], failover=["us-east", "ap-northeast"])
    choice = router.choose(ip)
    assert choice == ["pool-us", "pool-ap", "pool-eu"]  # unlisted regions last
    assert choice.reason == "unknown-ip" and choice.info is None
    assert router.choose(ip, _up("pool-us")).reason == "unknown-ip"


def test_health_is_asked_once_per_target_and_targets_are_deduplicated(city):
    asked = []

    def healthy(target):
        asked.append(target)
        return True

    regions = [EU, {**US, "target": "pool-eu"}, AP]
    choice = _router(city, regions).choose(LONDON, healthy)
    assert choice == ["pool-eu", "pool-ap"]
    assert choice.regions == ("eu-west", "us-east", "ap-northeast")
    assert sorted(asked) == ["pool-ap", "pool-eu"]


def test_database_errors_route_as_unknown_and_are_counted():
    db = GeoDatabase(BAD / "libmaxminddb" / "libmaxminddb-deep-nesting.mmdb", verify="basic")
    config = msgspec.convert({"database": db.path, "regions": [EU, US],
                              "failover": ["us-east"]}, GeoRouterConfig)
    router = GeoRouter(config, db)
    choice = router.choose("1.1.1.1")
    assert choice == ["pool-us", "pool-eu"] and choice.reason == "unknown-ip"
    assert router.lookup_errors == 1 and db.lookup_errors == 1
    db.close()


def test_router_opens_its_database_from_the_config():
    config = GeoRouterConfig(database=str(COUNTRY), regions=[
        GeoRegion(name="eu", target="pool-eu", continents=["EU"]),
        GeoRegion(name="rest", target="pool-rest")])
    router = GeoRouter(config)
    assert router.database.database_type == "GeoLite2-Country"
    assert router.choose(LONDON).reason == "continent"
    assert router.choose(MILTON).reason == "failover"  # located, nothing mapped, no coords
    router.database.close()


@pytest.mark.parametrize("cfg, message", [
    ({"regions": [EU], "extra": 1}, "Object contains unknown field `extra`"),
    ({"regions": []}, "Expected `array` of length >= 1"),
    ({"regions": [EU, EU]}, "duplicate region names: eu-west"),
    ({"regions": [EU], "failover": ["mars"]}, "failover names unknown regions: mars"),
    ({"regions": [EU, US], "failover": ["eu-west", "eu-west"]}, "failover lists a region twice"),
    ({"regions": [{**EU, "longitude": None}]}, "set both latitude and longitude"),
    ({"regions": [{**EU, "latitude": 91}]}, "Expected `float` <= 90"),
    ({"regions": [{**EU, "countries": ["gb"]}]}, "Expected `str` matching regex"),
    ({"regions": [{**EU, "continents": ["XX"]}]}, "Invalid enum value 'XX'"),
    ({"regions": [EU], "prefer": "closest"}, "Invalid enum value 'closest'"),
    ({"regions": [{**EU, "target": ""}]}, "Expected `str` of length >= 1"),
])
def test_router_config_is_validated(cfg, message):
    with pytest.raises(msgspec.ValidationError, match=message.replace("`", ".").replace(
            "[", r"\[")):
        msgspec.convert({"database": "x.mmdb", **cfg}, GeoRouterConfig)


def test_router_config_defaults():
    config = msgspec.convert({"database": "x.mmdb", "regions": [{"name": "a", "target": "t"}]},
                             GeoRouterConfig)
    assert config.prefer == "map" and config.failover == []
    region = config.regions[0]
    assert (region.latitude, region.longitude, region.countries, region.continents) == (
        None, None, [], [])


# ---------------------------------------------------------------- the geo condition

GB = GeoInfo(country="GB", continent="EU")
SE = GeoInfo(country="SE", continent="EU")
US_INFO = GeoInfo(country="US", continent="NA")
CONTINENT_ONLY = GeoInfo(continent="EU")
COORDS_ONLY = GeoInfo(latitude=1.0, longitude=2.0)


@pytest.mark.parametrize("cond, info, expected", [
    ({"countries": ["GB"]}, GB, True),
    ({"countries": ["GB"]}, SE, False),
    ({"continents": ["EU"]}, SE, True),
    ({"countries": ["US"], "continents": ["EU"]}, SE, True),  # either list
    ({"countries": ["US"], "continents": ["EU"]}, GeoInfo(country="JP", continent="AS"), False),
    ({"continents": ["EU"], "not_countries": ["GB"]}, GB, False),  # exclusions win
    ({"continents": ["EU"], "not_countries": ["GB"]}, SE, True),
    ({"not_countries": ["GB"]}, US_INFO, True),  # only exclusions: everyone else
    ({"not_countries": ["GB"]}, GB, False),
    ({"not_continents": ["EU"]}, SE, False),
    ({"countries": ["GB"]}, CONTINENT_ONLY, False),
    ({"continents": ["EU"]}, CONTINENT_ONLY, True),
    ({"countries": ["GB"]}, None, False),  # unknown location
    ({"not_countries": ["GB"]}, None, False),
    ({"not_countries": ["GB"], "unknown": True}, None, True),
    ({"countries": ["GB"], "unknown": True}, COORDS_ONLY, True),  # no country nor continent
])
def test_geo_condition(cond, info, expected):
    assert msgspec.convert(cond, GeoCondition).matches(info) is expected


def test_geo_condition_with_lookups(city):
    cond = GeoCondition(countries=["GB", "SE"], not_countries=[])
    assert cond.matches(city.lookup(LONDON))
    assert cond.matches(city.lookup("89.160.20.112"))
    assert not cond.matches(city.lookup(MILTON))
    assert not cond.matches(city.lookup(PRIVATE))


@pytest.mark.parametrize("cond, message", [
    ({}, "geo condition needs countries, continents, not_countries or not_continents"),
    ({"countries": ["GBR"]}, "Expected `str` matching regex"),
    ({"continents": ["Europe"]}, "Invalid enum value 'Europe'"),
    ({"countries": ["GB"], "cities": ["London"]}, "Object contains unknown field `cities`"),
])
def test_geo_condition_is_validated(cond, message):
    with pytest.raises(msgspec.ValidationError, match=message.replace("`", ".")):
        msgspec.convert(cond, GeoCondition)


# ---------------------------------------------------------------- helpers

def test_haversine():
    assert haversine_km(51.5072, -0.1276, 51.5072, -0.1276) == 0
    assert haversine_km(51.5072, -0.1276, 40.7128, -74.006) == pytest.approx(5570, abs=10)
    assert haversine_km(0, 0, 0, 180) == pytest.approx(20015, abs=5)  # half the equator
    assert haversine_km(90, 0, -90, 0) == pytest.approx(20015, abs=5)


# ---------------------------------------------------------------- docs

DOC = Path(__file__).resolve().parents[3] / "docs" / "geo.md"


@pytest.mark.parametrize("struct", [GeoRouterConfig, GeoRegion, GeoCondition])
def test_docs_have_a_row_for_every_config_key(struct):
    text = DOC.read_text(encoding="utf-8")
    for field in msgspec.structs.fields(struct):
        assert f"| `{field.encode_name}` |" in text, (
            f"docs/geo.md lacks a row for {struct.__name__}.{field.encode_name}")
