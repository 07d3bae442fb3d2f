"""Sticky sessions (dispa/balancer/sticky.py): the signed cookie codec, the Set-Cookie builder,
Cookie parsing, config validation, and the policy's hit / re-pin / miss decisions."""

from __future__ import annotations

import base64
import hashlib
import hmac
import pathlib
import re
import zlib

import msgspec
import pytest
from hypothesis import given, settings, strategies as st

from dispa.balancer.sticky import (
    MAX_COOKIE_VALUE_CHARS,
    StickyChoice,
    StickyConfig,
    StickyCookieCodec,
    StickyPolicy,
    build_set_cookie,
    cookie_values,
)

DOC = pathlib.Path(__file__).resolve().parents[3] / "docs" / "resilience.md"
SECRET = "0123456789abcdef-secret"
OLD_SECRET = "fedcba9876543210-secret"
NOW = 1_700_000_000.0
IDS = ["10.0.0.1:8080", "10.0.0.2:8080", "10.0.0.3:8080", "10.0.0.4:8080"]


def codec(*secrets, ttl=3600, name="dispa_sticky") -> StickyCookieCodec:
    return StickyCookieCodec(list(secrets) or [SECRET], ttl, cookie_name=name)


def no_fallback(healthy):  # for decisions that must not consult the fallback
    raise AssertionError("fallback called")


# ------------------------------------------------------------------ codec

def test_round_trip_until_the_expiry():
    c = codec()
    v = c.encode("10.0.0.1:8080", NOW)
    assert c.decode(v, NOW) == "10.0.0.1:8080"
    assert c.decode(v, NOW + 3599) == "10.0.0.1:8080"
    assert c.decode(v, NOW + 3600) is None


def test_value_format_is_base64url_payload_dot_truncated_hmac_sha256():
    v = codec().encode("e1", NOW)
    body, tag = v.split(".")
    assert re.fullmatch(r"[A-Za-z0-9_-]+", body) and re.fullmatch(r"[A-Za-z0-9_-]{22}", tag)
    payload = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
    assert payload == b"\x01" + int(NOW + 3600).to_bytes(8, "big") + b"e1"
    mac = hmac.new(SECRET.encode(), b"dispa-sticky-v1\0dispa_sticky\0" + payload,
                   hashlib.sha256).digest()[:16]
    assert base64.urlsafe_b64decode(tag + "==") == mac


def test_secret_rotation_first_signs_all_verify():
    old = codec(OLD_SECRET).encode("e1", NOW)
    rotated = codec(SECRET, OLD_SECRET)
    assert rotated.decode(old, NOW) == "e1"
    new = rotated.encode("e1", NOW)
    assert codec(SECRET).decode(new, NOW) == "e1"
    assert codec(OLD_SECRET).decode(new, NOW) is None
    assert codec(SECRET).decode(old, NOW) is None  # old secret retired


def test_a_value_for_another_cookie_name_does_not_verify():
    v = codec(name="a").encode("e1", NOW)
    assert codec(name="b").decode(v, NOW) is None


def test_tampering_with_any_character_is_detected():
    c = codec()
    v = c.encode("10.0.0.1:8080", NOW)
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_."
    for k in range(len(v)):
        for ch in alphabet:
            if ch == v[k]:
                continue
            forged = v[:k] + ch + v[k + 1:]
            got = c.decode(forged, NOW)
            # A different last base64 character can decode to the same bytes (unused low
            # bits); such a value carries the same pin, which is harmless.
            assert got is None or got == "10.0.0.1:8080"


def test_a_forged_expiry_is_rejected():
    c = codec()
    body, tag = c.encode("e1", NOW).split(".")
    payload = bytearray(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    payload[1:9] = (2 ** 40).to_bytes(8, "big")
    forged = base64.urlsafe_b64encode(bytes(payload)).rstrip(b"=").decode() + "." + tag
    assert c.decode(forged, NOW) is None


@pytest.mark.parametrize("value", [
    "", ".", "abc", "abc.", ".abc", "a.b.c", "!!!.???", "A" * (MAX_COOKIE_VALUE_CHARS + 1),
    "AQ.AAAAAAAAAAAAAAAAAAAAAA", "é.é", "abcde.fghij", None, 42, b"bytes",
])
def test_malformed_values_give_none(value):
    assert codec().decode(value, NOW) is None


@settings(max_examples=500)
@given(st.text(max_size=200) | st.binary(max_size=50).map(lambda b: base64.urlsafe_b64encode(b).decode()))
def test_decode_never_raises(value):
    assert codec().decode(value, NOW) is None


@given(st.text(min_size=1, max_size=60).filter(lambda s: len(s.encode()) <= 255),
       st.floats(0, 4e9), st.integers(1, 10 ** 6))
def test_any_endpoint_id_round_trips(eid, now, ttl):
    c = codec(ttl=ttl)
    assert c.decode(c.encode(eid, now), now) == eid


def test_encode_rejects_empty_and_oversized_ids_and_codec_needs_a_secret():
    with pytest.raises(ValueError):
        codec().encode("", NOW)
    with pytest.raises(ValueError):
        codec().encode("x" * 256, NOW)
    with pytest.raises(ValueError):
        StickyCookieCodec([], 60)
    with pytest.raises(ValueError):
        StickyCookieCodec([SECRET], 0.5)


# ------------------------------------------------------------------ Set-Cookie builder

@pytest.mark.parametrize("kwargs, expected", [
    (dict(max_age=3600), "s=v; Path=/; Max-Age=3600; HttpOnly; SameSite=Lax"),
    (dict(max_age=60, path="/app", domain="example.com", secure=True, same_site="Strict"),
     "s=v; Path=/app; Domain=example.com; Max-Age=60; HttpOnly; Secure; SameSite=Strict"),
    (dict(max_age=None, http_only=False, same_site=None), "s=v; Path=/"),
    (dict(max_age=10, secure=True, same_site="None"),
     "s=v; Path=/; Max-Age=10; HttpOnly; Secure; SameSite=None"),
])
def test_set_cookie_strings(kwargs, expected):
    assert build_set_cookie("s", "v", **kwargs) == expected


@pytest.mark.parametrize("name, value, kwargs", [
    ("bad name", "v", {}),
    ("s;x", "v", {}),
    ("s", "v;Domain=evil", {}),
    ("s", 'v"', {}),
    ("s", "v", dict(path="/a;Secure")),
    ("s", "v", dict(path="nope")),
    ("s", "v", dict(path="/a\r\nX: y")),
    ("s", "v", dict(domain="a.com; Path=/")),
    ("s", "v", dict(same_site="None")),  # without Secure
    ("__Host-s", "v", dict(secure=True, path="/app")),
    ("__Host-s", "v", dict(secure=True, domain="a.com")),
    ("__Secure-s", "v", {}),
])
def test_set_cookie_rejects_injection_and_refused_combinations(name, value, kwargs):
    with pytest.raises(ValueError):
        build_set_cookie(name, value, max_age=1, **kwargs)


def test_policy_set_cookie_uses_the_configured_attributes():
    cfg = StickyConfig(mode="cookie", secrets=[SECRET], cookie_name="__Host-pin", secure=True,
                       same_site="Strict", http_only=False, ttl=120)
    sc = StickyPolicy(cfg, IDS).set_cookie(1, NOW)
    name_value, *attrs = sc.split("; ")
    assert name_value.startswith("__Host-pin=")
    assert attrs == ["Path=/", "Max-Age=120", "Secure", "SameSite=Strict"]
    assert cfg and codec(name="__Host-pin").decode(name_value.split("=", 1)[1], NOW) == IDS[1]


# ------------------------------------------------------------------ Cookie header parsing

@pytest.mark.parametrize("header, expected", [
    (None, []),
    ("", []),
    ("a=1", []),
    ("dispa_sticky=x", ["x"]),
    ("a=1; dispa_sticky=x; b=2", ["x"]),
    ("dispa_sticky=x;dispa_sticky=y", ["x", "y"]),
    ('dispa_sticky="x"', ["x"]),
    ("dispa_stickyy=x; xdispa_sticky=y; dispa_sticky", []),
    (" dispa_sticky = x ", ["x"]),
])
def test_cookie_values(header, expected):
    assert cookie_values(header, "dispa_sticky") == expected


# ------------------------------------------------------------------ config

def test_config_defaults_keep_the_original_client_ip_stickiness():
    c = StickyConfig()
    assert c.mode == "client_ip" and c.ttl == 3600 and c.cookie_name == "dispa_sticky"
    assert c.http_only and not c.secure and c.same_site == "Lax"


@pytest.mark.parametrize("doc, message", [
    (b'mode = "cookie"\n', "secret"),
    (b'mode = "cookie"\nsecrets = ["short"]\n', "shorter"),
    (b'mode = "header"\n', "header_name"),
    (b'cookie_name = "a b"\n', "cookie_name"),
    (b'cookie_path = "x"\n', "cookie_path"),
    (b'same_site = "None"\n', "secure"),
    (b'cookie_name = "__Host-x"\nsecure = true\ncookie_domain = "a.com"\n', "__Host-"),
    (b'mode = "ip"\n', "Invalid enum value"),
    (b"ttl = 0\n", ">= 1"),
    (b"cookie_ttl = 5\n", "unknown field"),
])
def test_config_rejects(doc, message):
    with pytest.raises(msgspec.ValidationError, match=re.escape(message)):
        msgspec.toml.decode(doc, type=StickyConfig)


def test_secrets_are_redacted_from_repr():
    c = StickyConfig(mode="cookie", secrets=[SECRET, OLD_SECRET])
    assert SECRET not in repr(c) and OLD_SECRET not in str(c)
    assert "secrets=<2 redacted>" in repr(c) and "mode='cookie'" in repr(c)
    assert SECRET not in repr(StickyPolicy(c, IDS).snapshot())


def test_docs_have_a_row_for_every_config_key():
    text = DOC.read_text(encoding="utf-8")
    m = re.search(r"^#+ .*`StickyConfig`.*$", text, re.M)
    assert m, "docs/resilience.md has no heading naming `StickyConfig`"
    section = text[m.end():]
    nxt = re.search(r"^#+ ", section, re.M)
    section = section[:nxt.start()] if nxt else section
    for f in msgspec.structs.fields(StickyConfig):
        assert re.search(rf"^\| `{f.encode_name}` \|", section, re.M), f.name


# ------------------------------------------------------------------ policy: cookie mode

def cookie_policy(**kw) -> StickyPolicy:
    return StickyPolicy(StickyConfig(mode="cookie", secrets=[SECRET], **kw), IDS)


def cookie_of(set_cookie: str) -> str:
    return set_cookie.split(";", 1)[0]


def test_no_cookie_is_a_miss_that_pins_with_the_fallback():
    p = cookie_policy()
    ch = p.choose(NOW, None, lambda h: 2)
    assert isinstance(ch, StickyChoice) and ch.index == 2 and not ch.repinned
    assert ch.set_cookie is not None
    assert p.codec.decode(cookie_of(ch.set_cookie).split("=", 1)[1], NOW) == IDS[2]
    assert (p.hits, p.repins, p.misses) == (0, 0, 1)


def test_a_valid_cookie_is_a_hit_without_a_new_cookie():
    p = cookie_policy()
    pin = cookie_of(p.choose(NOW, None, lambda h: 3).set_cookie)
    ch = p.choose(NOW + 10, None, no_fallback, cookie_header=f"x=1; {pin}")
    assert ch == StickyChoice(3, False, None)
    assert p.hits == 1


def test_a_cookie_is_reissued_when_less_than_half_its_ttl_remains():
    p = cookie_policy(ttl=100)
    pin = cookie_of(p.choose(NOW, None, lambda h: 0).set_cookie)
    assert p.choose(NOW + 50, None, no_fallback, cookie_header=pin).set_cookie is None
    fresh = p.choose(NOW + 51, None, no_fallback, cookie_header=pin)
    assert fresh.index == 0 and not fresh.repinned and fresh.set_cookie is not None
    assert p.hits == 2


def test_an_unhealthy_pinned_endpoint_is_repinned_with_a_new_cookie():
    p = cookie_policy()
    pin = cookie_of(p.choose(NOW, None, lambda h: 1).set_cookie)
    seen = []

    def fallback(h):
        seen.append(h)
        return 2

    ch = p.choose(NOW, [True, False, True, True], fallback, cookie_header=pin)
    assert ch.index == 2 and ch.repinned and ch.set_cookie is not None
    assert seen == [[True, False, True, True]]
    assert p.repins == 1
    # The new cookie pins the new endpoint.
    assert p.choose(NOW, None, no_fallback, cookie_header=cookie_of(ch.set_cookie)).index == 2


def test_a_cookie_for_an_endpoint_no_longer_in_the_cluster_is_repinned():
    old = StickyPolicy(StickyConfig(mode="cookie", secrets=[SECRET]), ["gone:1"] + IDS)
    pin = cookie_of(old.choose(NOW, None, lambda h: 0).set_cookie)
    p = cookie_policy()
    ch = p.choose(NOW, None, lambda h: 0, cookie_header=pin)
    assert ch.index == 0 and ch.repinned and p.repins == 1


def test_the_pin_survives_a_reload_that_reorders_endpoints():
    p = cookie_policy()
    pin = cookie_of(p.choose(NOW, None, lambda h: 1).set_cookie)
    reordered = StickyPolicy(StickyConfig(mode="cookie", secrets=[SECRET]), list(reversed(IDS)))
    assert reordered.choose(NOW, None, no_fallback, cookie_header=pin).index == 2


@pytest.mark.parametrize("header", ["dispa_sticky=garbage", "dispa_sticky=", "dispa_sticky=a.b"])
def test_invalid_cookies_are_misses(header):
    p = cookie_policy()
    ch = p.choose(NOW, None, lambda h: 0, cookie_header=header)
    assert ch.index == 0 and not ch.repinned and ch.set_cookie is not None
    assert p.misses == 1


def test_an_expired_cookie_is_a_miss():
    p = cookie_policy(ttl=10)
    pin = cookie_of(p.choose(NOW, None, lambda h: 1).set_cookie)
    ch = p.choose(NOW + 10, None, lambda h: 3, cookie_header=pin)
    assert ch.index == 3 and not ch.repinned and p.misses == 2


def test_the_first_valid_cookie_of_several_wins():
    p = cookie_policy()
    pin = cookie_of(p.choose(NOW, None, lambda h: 2).set_cookie)
    assert p.choose(NOW, None, no_fallback, cookie_header=f"dispa_sticky=bad; {pin}").index == 2


def test_nothing_usable_gives_minus_one_and_no_cookie():
    p = cookie_policy()
    assert p.choose(NOW, [False] * 4, lambda h: -1) == StickyChoice(-1, False, None)
    assert p.unavailable == 1


# ------------------------------------------------------------------ policy: hashing modes

def runtime_sticky_pick(ids, weights, view, key: bytes) -> int:
    """dispa.proxy.runtime.ClusterRuntime._sticky_pick, restated."""
    best, best_score = -1, -1
    for i, e in enumerate(ids):
        if view is not None and not view[i]:
            continue
        score = zlib.crc32(key + e.encode()) * weights[i]
        if score > best_score:
            best, best_score = i, score
    return best


@settings(max_examples=300)
@given(st.text(min_size=1, max_size=40), st.lists(st.integers(1, 5), min_size=4, max_size=4),
       st.lists(st.booleans(), min_size=4, max_size=4) | st.none())
def test_client_ip_mode_picks_exactly_what_the_runtime_picks_today(ip, weights, view):
    p = StickyPolicy(StickyConfig(), IDS, weights)
    ch = p.choose(NOW, view, no_fallback, client_ip=ip)
    assert ch.index == runtime_sticky_pick(IDS, weights, view, ip.encode("utf-8", "surrogatepass"))
    assert ch.set_cookie is None
    top = runtime_sticky_pick(IDS, weights, None, ip.encode("utf-8", "surrogatepass"))
    assert ch.repinned == (ch.index not in (-1, top))


@settings(max_examples=100)
@given(st.lists(st.text(min_size=1, max_size=15), min_size=1, max_size=50), st.integers(0, 3))
def test_hash_mode_moves_only_the_clients_of_an_unhealthy_endpoint(clients, down):
    p = StickyPolicy(StickyConfig(), IDS)
    before = {c: p.choose(NOW, None, no_fallback, client_ip=c).index for c in clients}
    mask = [i != down for i in range(4)]
    for c in clients:
        ch = p.choose(NOW, mask, no_fallback, client_ip=c)
        if before[c] != down:
            assert ch.index == before[c] and not ch.repinned
        else:
            assert ch.index != down and ch.repinned


def test_header_mode_hashes_the_header_and_falls_back_without_it():
    p = StickyPolicy(StickyConfig(mode="header", header_name="x-session"), IDS)
    a = p.choose(NOW, None, no_fallback, header_value="user-42")
    assert a == p.choose(NOW, None, no_fallback, header_value="user-42")
    assert a.index == runtime_sticky_pick(IDS, [1] * 4, None, b"user-42")
    ch = p.choose(NOW, None, lambda h: 3, header_value=None)
    assert ch == StickyChoice(3, False, None)
    assert (p.hits, p.misses) == (2, 1)


def test_hash_mode_with_nothing_usable():
    p = StickyPolicy(StickyConfig(), IDS)
    assert p.choose(NOW, [False] * 4, no_fallback, client_ip="1.2.3.4") == StickyChoice(-1, False, None)
    assert p.unavailable == 1


def test_set_cookie_outside_cookie_mode_and_bad_construction_raise():
    with pytest.raises(ValueError):
        StickyPolicy(StickyConfig(), IDS).set_cookie(0, NOW)
    with pytest.raises(ValueError):
        StickyPolicy(StickyConfig(), [])
    with pytest.raises(ValueError):
        StickyPolicy(StickyConfig(), IDS, [1])


@settings(max_examples=200)
@given(st.lists(st.tuples(st.sampled_from(["none", "valid", "garbage"]), st.integers(0, 3),
                          st.lists(st.booleans(), min_size=4, max_size=4)), max_size=30))
def test_counters_add_up_to_the_calls(calls):
    p = cookie_policy()
    pins = [p.set_cookie(i, NOW).split(";")[0] for i in range(4)]
    for kind, i, mask in calls:
        header = {"none": None, "valid": pins[i], "garbage": "dispa_sticky=zz.zz"}[kind]
        ch = p.choose(NOW, mask, lambda h: next((k for k in range(4) if h[k]), -1),
                      cookie_header=header)
        assert ch.index == -1 or mask[ch.index]
    snap = p.snapshot()
    assert snap["hits"] + snap["repins"] + snap["misses"] + snap["unavailable"] == len(calls)
