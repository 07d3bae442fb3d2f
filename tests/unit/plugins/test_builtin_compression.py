"""``compression``: negotiation, eligibility, head edits and streaming bodies, checked by
decompressing with the reference libraries (zlib/gzip, brotli, zstandard)."""

from __future__ import annotations

import gzip
import random
import zlib

import msgspec
import pytest
from hypothesis import given, settings, strategies as st

from dispa.plugins.api import BuildContext, Headers, Request, ResponseHead
from dispa.plugins.builtin import BUILTIN_FILTERS, Compression
from dispa.plugins.builtin import compression as mod
from dispa.plugins.builtin.compression import negotiate

brotli = pytest.importorskip("brotli")
zstandard = pytest.importorskip("zstandard")

ALL = ("gzip", "br", "zstd")


def _build(**cfg) -> Compression:
    return Compression.build(msgspec.convert(cfg, Compression.Config), BuildContext())


def _req(accept="gzip, deflate, br, zstd", method="GET") -> Request:
    h = [(b"Host", b"example.com")]
    if accept is not None:
        h.append((b"Accept-Encoding", accept.encode()))
    return Request(method, "/", Headers(h), host="example.com")


def _resp(status=200, ctype="text/html; charset=utf-8", length=None, *extra) -> ResponseHead:
    h = []
    if ctype is not None:
        h.append((b"Content-Type", ctype.encode()))
    if length is not None:
        h.append((b"Content-Length", str(length).encode()))
    h += [(k.encode(), v.encode()) for k, v in extra]
    return ResponseHead(status, Headers(h))


class Decoder:
    """An incremental reference decoder per coding."""

    def __init__(self, coding: str):
        if coding == "gzip":
            d = zlib.decompressobj(16 + zlib.MAX_WBITS)
            self.feed = d.decompress
        elif coding == "br":
            d = brotli.Decompressor()

            def feed(data: bytes) -> bytes:
                # brotli >= 1.2 hands out at most ~32 KiB per call; drain the rest
                out = [d.process(data)]
                while out[-1]:
                    out.append(d.process(b""))
                return b"".join(out)

            self.feed = feed
        else:
            d = zstandard.ZstdDecompressor().decompressobj()
            self.feed = d.decompress


def _decompress(coding: str, data: bytes) -> bytes:
    if coding == "gzip":
        return gzip.decompress(data)
    if coding == "br":
        return brotli.decompress(data)
    return zstandard.ZstdDecompressor().decompressobj().decompress(data)


def _body(n: int, seed: int = 7) -> bytes:
    """Compressible text with some random noise (so blocks are not trivially repetitive)."""
    rnd = random.Random(seed)
    words = [b"proxy", b"upstream", b"listener", b"route", b"cluster", b"endpoint", b"filter"]
    out = bytearray()
    while len(out) < n:
        out += rnd.choice(words) + b" " + str(rnd.random()).encode() + b"\n"
    return bytes(out[:n])


def _serve(f: Compression, req: Request, resp: ResponseHead, chunks) -> bytes:
    assert f.on_response(req, resp) is None
    out = []
    for i, c in enumerate(chunks):
        out.append(f.on_response_body(req, resp, c, i == len(chunks) - 1))
    return b"".join(out)


# --------------------------------------------------------------------------- config

def test_type_name_and_body_declaration():
    assert Compression.name == "compression" and Compression in BUILTIN_FILTERS
    assert Compression.wants_response_body is True


def test_good_config_and_defaults():
    c = msgspec.convert({}, Compression.Config)
    assert c.algorithms == ("zstd", "br", "gzip")
    assert c.min_length == 512
    assert c.content_types == ("text/*", "application/json", "application/javascript",
                               "application/xml", "image/svg+xml")
    assert (c.level.gzip, c.level.br, c.level.zstd) == (6, 4, 3)
    c = msgspec.convert({"algorithms": ["gzip"], "min_length": 0, "content_types": ["text/"],
                         "level": {"gzip": 9}}, Compression.Config)
    assert c.level.gzip == 9 and c.level.br == 4


@pytest.mark.parametrize("cfg", [{"algos": ["gzip"]}, {"level": {"deflate": 5}}])
def test_unknown_keys_are_refused_at_every_level(cfg):
    with pytest.raises(msgspec.ValidationError, match="unknown field"):
        msgspec.convert(cfg, Compression.Config)


@pytest.mark.parametrize("cfg", [
    {"algorithms": []}, {"algorithms": ["deflate"]}, {"algorithms": ["gzip", "gzip"]},
    {"min_length": -1}, {"content_types": []}, {"content_types": ["*/json"]},
    {"content_types": ["text/html; charset=utf-8"]},
    {"level": {"gzip": 0}}, {"level": {"gzip": 10}}, {"level": {"br": 12}},
    {"level": {"zstd": 20}}, {"level": {"zstd": 0}},
])
def test_bad_values_are_refused(cfg):
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert(cfg, Compression.Config)


def test_a_missing_library_drops_its_algorithm(monkeypatch):
    monkeypatch.setattr(mod, "AVAILABLE", frozenset({"gzip"}))
    assert _build().algorithms == ("gzip",)
    with pytest.raises(ValueError, match="none of"):
        _build(algorithms=["br", "zstd"])


# --------------------------------------------------------------------------- negotiation

@pytest.mark.parametrize("accept,prefs,expected", [
    ("gzip, br, zstd", ALL, "gzip"),                    # equal q: the server's order decides
    ("gzip, br, zstd", ("zstd", "br", "gzip"), "zstd"),
    ("gzip;q=1.0, br;q=0.5", ("br", "gzip"), "gzip"),   # higher q wins over preference
    ("br;q=0.9, gzip;q=0.8", ("gzip", "br"), "br"),
    ("gzip;q=0", ALL, None),
    ("identity", ALL, None),
    ("", ALL, None),
    ("*", ("br", "gzip"), "br"),
    ("*;q=0.5, gzip", ("br", "gzip"), "gzip"),
    ("*, br;q=0", ("br", "gzip"), "gzip"),              # explicit refusal beats '*'
    ("*;q=0", ALL, None),
    ("x-gzip", ALL, "gzip"),
    ("GZIP", ALL, "gzip"),
    ("gzip ; q=0.5 , br ; Q=0.6", ALL, "br"),
    ("gzip;q=abc, br", ALL, "br"),                      # malformed member ignored
    ("gzip;q=2, br;q=0.1", ALL, "br"),                  # out-of-range q ignored
    ("deflate, compress", ALL, None),
    ("br", ("gzip",), None),                            # not configured
])
def test_negotiate(accept, prefs, expected):
    members = [m.strip() for m in accept.split(",") if m.strip()]
    assert negotiate(members, prefs) == expected


def test_accept_encoding_split_over_several_fields():
    f = _build(algorithms=["br", "gzip"])
    req = Request("GET", "/", Headers([(b"Accept-Encoding", b"gzip;q=0.2"),
                                       (b"accept-encoding", b"br;q=0.9")]))
    resp = _resp(length=10_000)
    f.on_response(req, resp)
    assert resp.headers.get("content-encoding") == "br"


# --------------------------------------------------------------------------- eligibility

@pytest.mark.parametrize("status", [101, 204, 206, 304])
def test_statuses_without_a_compressible_body_are_skipped(status):
    resp = _resp(status, length=10_000)
    _build().on_response(_req(), resp)
    assert "content-encoding" not in resp.headers and "vary" not in resp.headers


@pytest.mark.parametrize("extra", [
    ("Content-Encoding", "gzip"),
    ("Content-Encoding", "identity"),
    ("Cache-Control", "public, No-Transform"),
    ("Content-Range", "bytes 0-9/100"),
])
def test_responses_that_must_not_be_transformed_are_skipped(extra):
    resp = _resp(200, "text/plain", 10_000, extra)
    before = list(resp.headers.raw)
    _build().on_response(_req(), resp)
    assert resp.headers.raw == before


@pytest.mark.parametrize("ctype,compressed", [
    ("text/html", True), ("TEXT/CSS; charset=utf-8", True), ("application/json", True),
    ("application/javascript", True), ("image/svg+xml", True), ("application/xml", True),
    ("image/png", False), ("application/octet-stream", False), ("video/mp4", False),
    (None, False),
])
def test_content_types(ctype, compressed):
    resp = _resp(200, ctype, 10_000)
    _build().on_response(_req(), resp)
    assert ("content-encoding" in resp.headers) is compressed


def test_content_type_prefixes_are_configurable():
    f = _build(content_types=["application/vnd.", "text/plain"])
    for ctype, compressed in [("application/vnd.api+json", True), ("text/plain", True),
                              ("text/html", False)]:
        resp = _resp(200, ctype, 10_000)
        f.on_response(_req(), resp)
        assert ("content-encoding" in resp.headers) is compressed, ctype


@pytest.mark.parametrize("length,compressed", [(0, False), (511, False), (512, True),
                                               (None, True)])
def test_min_length_applies_to_a_known_length_only(length, compressed):
    resp = _resp(200, "text/plain", length)
    _build().on_response(_req(), resp)
    assert ("content-encoding" in resp.headers) is compressed


def test_min_length_zero_still_skips_an_empty_body():
    resp = _resp(200, "text/plain", 0)
    _build(min_length=0).on_response(_req(), resp)
    assert "content-encoding" not in resp.headers


def test_head_is_not_compressed_but_varies():
    resp = _resp(200, "text/plain", 10_000)
    f = _build()
    req = _req(method="HEAD")
    f.on_response(req, resp)
    assert "content-encoding" not in resp.headers
    assert resp.headers.get("content-length") == "10000"
    assert resp.headers.get("vary") == "Accept-Encoding"
    assert f.on_response_body(req, resp, b"", True) == b""


def test_eligible_response_varies_even_when_this_client_gets_identity():
    resp = _resp(200, "text/plain", 10_000)
    _build().on_response(_req(accept=None), resp)
    assert "content-encoding" not in resp.headers
    assert resp.headers.get("vary") == "Accept-Encoding"


def test_vary_is_not_duplicated():
    resp = _resp(200, "text/plain", 10_000, ("Vary", "Origin"), ("vary", "accept-encoding"))
    _build().on_response(_req(), resp)
    assert resp.headers.get_all("vary") == ["Origin", "accept-encoding"]


def test_vary_fields_are_merged_when_one_is_added():
    resp = _resp(200, "text/plain", 10_000, ("Vary", "Origin"), ("vary", "Cookie"))
    _build().on_response(_req(), resp)
    assert resp.headers.get_all("vary") == ["Origin, Cookie, Accept-Encoding"]


# --------------------------------------------------------------------------- head edits

def test_head_edits_when_compressing():
    resp = _resp(200, "text/plain", 10_000, ("ETag", '"abc"'), ("Accept-Ranges", "bytes"))
    _build(algorithms=["gzip"]).on_response(_req(), resp)
    h = resp.headers
    assert h.get("content-encoding") == "gzip"
    assert "content-length" not in h and "accept-ranges" not in h
    assert h.get("etag") == 'W/"abc"'
    assert h.get("vary") == "Accept-Encoding"


def test_weak_etag_stays_as_is():
    resp = _resp(200, "text/plain", 10_000, ("ETag", 'W/"abc"'))
    _build().on_response(_req(), resp)
    assert resp.headers.get("etag") == 'W/"abc"'


# --------------------------------------------------------------------------- bodies

@pytest.mark.parametrize("coding", ALL)
def test_whole_body_round_trip(coding):
    body = _body(50_000)
    f = _build(algorithms=[coding])
    resp = _resp(200, "application/json", len(body))
    out = _serve(f, _req(), resp, [body])
    assert resp.headers.get("content-encoding") == coding
    assert len(out) < len(body) // 2
    assert _decompress(coding, out) == body


@pytest.mark.parametrize("coding", ALL)
def test_large_body_fed_chunk_by_chunk_streams_and_round_trips(coding):
    body = _body(3 * 1024 * 1024 + 123)
    rnd = random.Random(coding)
    chunks, i = [], 0
    while i < len(body):
        n = rnd.choice([1, 7, 100, 4096, 65536, 200_000])
        chunks.append(body[i:i + n])
        i += n
    chunks += [b""]                                  # the core's end marker may be empty
    f = _build(algorithms=[coding])
    req, resp = _req(), _resp(200, "text/plain", None)
    assert f.on_response(req, resp) is None
    dec, fed, got = Decoder(coding), 0, bytearray()
    for n, c in enumerate(chunks):
        end = n == len(chunks) - 1
        out = f.on_response_body(req, resp, c, end)
        got += dec.feed(out)
        fed += len(c)
        # progress: every byte handed in so far can already be decoded by the client
        assert len(got) == fed, f"chunk {n}: decoded {len(got)} of {fed}"
    assert bytes(got) == body
    # and the one-shot reference decoder agrees on the whole stream
    whole = _serve(_build(algorithms=[coding]), _req(), _resp(200, "text/plain"), chunks)
    assert _decompress(coding, whole) == body


@pytest.mark.parametrize("coding", ALL)
def test_empty_body_still_yields_a_valid_stream(coding):
    f = _build(algorithms=[coding])
    out = _serve(f, _req(), _resp(200, "text/plain", None), [b""])
    assert out and _decompress(coding, out) == b""


@pytest.mark.parametrize("coding", ALL)
def test_levels_are_applied(coding):
    body = _body(200_000)
    lo = {"gzip": 1, "br": 0, "zstd": 1}[coding]
    hi = {"gzip": 9, "br": 9, "zstd": 19}[coding]
    small = _serve(_build(algorithms=[coding], level={coding: hi}), _req(),
                   _resp(200, "text/plain"), [body])
    big = _serve(_build(algorithms=[coding], level={coding: lo}), _req(),
                 _resp(200, "text/plain"), [body])
    assert len(small) < len(big)
    assert _decompress(coding, small) == _decompress(coding, big) == body


def test_uncompressed_responses_pass_chunks_through_untouched():
    f = _build()
    req, resp = _req(accept="identity"), _resp(200, "text/plain", 10_000)
    f.on_response(req, resp)
    chunk = b"x" * 1000
    assert f.on_response_body(req, resp, chunk, False) is chunk
    assert f.on_response_body(req, resp, b"tail", True) == b"tail"


def test_a_response_on_response_never_saw_passes_through():
    f = _build()
    chunk = b"abc"
    assert f.on_response_body(_req(), _resp(), chunk, True) is chunk


def test_concurrent_responses_keep_separate_streams():
    f = _build(algorithms=["gzip"])
    a_req, a_resp = _req(), _resp(200, "text/plain")
    b_req, b_resp = _req(), _resp(200, "text/plain")
    f.on_response(a_req, a_resp)
    f.on_response(b_req, b_resp)
    a = [f.on_response_body(a_req, a_resp, b"aaaa" * 100, False)]
    b = [f.on_response_body(b_req, b_resp, b"bbbb" * 100, False)]
    a.append(f.on_response_body(a_req, a_resp, b"A", True))
    b.append(f.on_response_body(b_req, b_resp, b"B", True))
    assert gzip.decompress(b"".join(a)) == b"aaaa" * 100 + b"A"
    assert gzip.decompress(b"".join(b)) == b"bbbb" * 100 + b"B"


def test_state_is_dropped_after_the_last_chunk():
    f = _build(algorithms=["gzip"])
    req, resp = _req(), _resp(200, "text/plain")
    f.on_response(req, resp)
    assert req.ctx
    f.on_response_body(req, resp, b"x", True)
    assert not req.ctx


# --------------------------------------------------------------------------- never raises


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=80))
def test_negotiate_never_raises_and_picks_a_configured_coding(accept):
    members = [m.strip() for m in accept.split(",") if m.strip()]
    assert negotiate(members, ALL) in (*ALL, None)
