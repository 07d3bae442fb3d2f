"""The HPACK codec HTTP/2 connections use (dispa/protocols/http2/hpack_codec.py) against the
``hpack`` library, the reference: RFC 7541 appendix C examples, round trips in both
directions with the dynamic table kept in step, table size changes, limits and errors, and
hypothesis-generated header lists. With the compiled codec (dispa._rust) these are
differential tests; in the pure run the codec *is* the ``hpack`` library."""

from __future__ import annotations

import h2.config
import h2.connection
import h2.events
import h2.settings
import hpack
import pytest
from hpack.exceptions import (
    HPACKDecodingError, InvalidTableIndex, InvalidTableSizeError, OversizedHeaderListError,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from dispa import _native
from dispa.protocols.http2 import H2Core, H2Limits, hpack_codec
from dispa.protocols.http2.hpack_codec import Decoder, Encoder


def test_compiled_codec_is_used_when_built():
    built = _native.rust is not None and hasattr(_native.rust, "HpackEncoder")
    assert hpack_codec.IMPLEMENTATION == ("compiled" if built else "pure")
    core = H2Core(H2Limits(enabled=True, header_table_size=1024, max_header_list_size=5000))
    assert isinstance(core.conn.encoder, Encoder) and isinstance(core.conn.decoder, Decoder)
    assert core.conn.decoder.max_allowed_table_size == 1024
    assert core.conn.decoder.max_header_list_size == 5000


# RFC 7541 appendix C.3 (requests without Huffman) and C.4 (with Huffman): one decoder
# across the three requests, so the dynamic table carries over.
_C_REQUESTS = [
    [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"),
     (b":authority", b"www.example.com")],
    [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"),
     (b":authority", b"www.example.com"), (b"cache-control", b"no-cache")],
    [(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/index.html"),
     (b":authority", b"www.example.com"), (b"custom-key", b"custom-value")],
]
_C3 = ["828684410f7777772e6578616d706c652e636f6d",
       "828684be58086e6f2d6361636865",
       "828785bf400a637573746f6d2d6b65790c637573746f6d2d76616c7565"]
_C4 = ["828684418cf1e3c2e5f23a6ba0ab90f4ff",
       "828684be5886a8eb10649cbf",
       "828785bf408825a849e95ba97d7f8925a849e95bb8e8b4bf"]
# C.5/C.6: responses with a 256-octet table, evictions included
_C_RESPONSES = [
    [(b":status", b"302"), (b"cache-control", b"private"),
     (b"date", b"Mon, 21 Oct 2013 20:13:21 GMT"), (b"location", b"https://www.example.com")],
    [(b":status", b"307"), (b"cache-control", b"private"),
     (b"date", b"Mon, 21 Oct 2013 20:13:21 GMT"), (b"location", b"https://www.example.com")],
    [(b":status", b"200"), (b"cache-control", b"private"),
     (b"date", b"Mon, 21 Oct 2013 20:13:22 GMT"), (b"location", b"https://www.example.com"),
     (b"content-encoding", b"gzip"),
     (b"set-cookie", b"foo=ASDJKHQKBZXOQWEOPIUAXQWEOIU; max-age=3600; version=1")],
]
_C6 = ["488264025885aec3771a4b6196d07abe941054d444a8200595040b8166e082a62d1bff6e919d29ad1718"
       "63c78f0b97c8e9ae82ae43d3",
       "4883640effc1c0bf",
       "88c16196d07abe941054d444a8200595040b8166e084a62d1bffc05a839bd9ab77ad94e7821dd7f2e6c7"
       "b335dfdfcd5b3960d5af27087f3672c1ab270fb5291f9587316065c003ed4ee5b1063d5007"]


@pytest.mark.parametrize("blocks", [_C3, _C4], ids=["C.3", "C.4"])
def test_rfc7541_request_examples(blocks):
    d = Decoder()
    for hexblock, headers in zip(blocks, _C_REQUESTS):
        assert [tuple(h) for h in d.decode(bytes.fromhex(hexblock), raw=True)] == headers


def test_rfc7541_response_examples_with_eviction():
    d = Decoder()
    d.header_table_size = 256
    e = Encoder()
    e.header_table_size = 256
    ref = hpack.Decoder()
    ref.header_table_size = 256
    for hexblock, headers in zip(_C6, _C_RESPONSES):
        assert [tuple(h) for h in d.decode(bytes.fromhex(hexblock), raw=True)] == headers
        assert [tuple(h) for h in ref.decode(e.encode(headers), raw=True)] == headers


def test_encoder_matches_rfc_huffman_example():
    e = Encoder()
    assert e.encode(_C_REQUESTS[0]).hex() == _C4[0]


def test_str_and_sensitive_fields():
    e = Encoder()
    ref = hpack.Decoder()
    block = e.encode([(":method", "GET"), ("x-token", "s3cret", True),
                      hpack.NeverIndexedHeaderTuple(b"authorization", b"Basic x"),
                      (b"x-a", b"1")])
    out = ref.decode(block, raw=True)
    assert [tuple(h) for h in out] == [(b":method", b"GET"), (b"x-token", b"s3cret"),
                                       (b"authorization", b"Basic x"), (b"x-a", b"1")]
    assert [type(h).__name__ for h in out[1:3]] == ["NeverIndexedHeaderTuple"] * 2
    # never-indexed fields are not in the dynamic table; the rest are
    assert [n for n, _ in ref.header_table.dynamic_entries] == [b"x-a"]
    # and the decoder reports never-indexed fields as such (for re-encoding upstream)
    d = Decoder()
    got = d.decode(hpack.Encoder().encode([(b"cookie", b"a=1", True)]), raw=True)
    assert isinstance(got[0], hpack.NeverIndexedHeaderTuple)
    assert d.decode(hpack.Encoder().encode([(b"x", "é".encode())])) == [("x", "é")]


def test_encoder_table_stays_capped_whatever_the_peer_allows():
    """A client advertising a 2^31 table must not make us keep every response header."""
    core = H2Core(H2Limits(enabled=True))
    core.initiate()
    c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True,
                                                             header_encoding=None))
    c.local_settings = h2.settings.Settings(client=True, initial_values={
        h2.settings.SettingCodes.HEADER_TABLE_SIZE: 1 << 31})
    c.initiate_connection()
    core.receive(c.data_to_send())
    c.receive_data(core.data_to_send())
    core.receive(c.data_to_send())
    for i in range(400):
        c.send_headers(2 * i + 1, [(b":method", b"GET"), (b":scheme", b"http"),
                                   (b":path", b"/"), (b":authority", b"a")], end_stream=True)
        core.receive(c.data_to_send())
        core.conn.send_headers(2 * i + 1, [(b":status", b"200"),
                                           (b"x-request-id", b"%032d" % i)], end_stream=True)
        events = c.receive_data(core.data_to_send())
        assert any(isinstance(e, h2.events.ResponseReceived) and
                   (b"x-request-id", b"%032d" % i) in e.headers for e in events)
    enc = core.conn.encoder
    assert enc.header_table_size == hpack_codec.ENCODER_MAX_TABLE_SIZE
    table = enc.dynamic_table() if hasattr(enc, "dynamic_table") else \
        list(enc.header_table.dynamic_entries)
    assert sum(len(n) + len(v) + 32 for n, v in table) <= hpack_codec.ENCODER_MAX_TABLE_SIZE


def test_dict_input_puts_pseudo_headers_first():
    block = Encoder().encode({b"x-a": b"1", b":status": b"200"})
    assert hpack.Decoder().decode(block, raw=True) == [(b":status", b"200"), (b"x-a", b"1")]


def test_table_size_updates_reach_the_peer():
    e, ref = Encoder(), hpack.Decoder()
    for i in range(30):
        ref.decode(e.encode([(b"x-n", b"v%d" % i)]))
    e.header_table_size = 0
    e.header_table_size = 100
    ref.max_allowed_table_size = 100
    assert ref.decode(e.encode([(b"x-n", b"again")]), raw=True) == [(b"x-n", b"again")]
    assert ref.header_table_size == 100
    assert ref.header_table.dynamic_entries[0] == (b"x-n", b"again")


def test_decoder_limits_and_errors():
    d = Decoder()
    d.max_header_list_size = 100
    with pytest.raises(OversizedHeaderListError):
        d.decode(hpack.Encoder().encode([(b"x-big", b"v" * 200)]))
    d = Decoder()
    d.max_allowed_table_size = 100
    with pytest.raises(InvalidTableSizeError):
        d.decode(b"\x3f\xe1\x1f")  # size update to 4096
    with pytest.raises(InvalidTableIndex):
        d.decode(b"\xbe")  # index 62: empty dynamic table
    for bad in (b"\x82\x20",  # size update after a field
                b"\x40\x85ab",  # truncated literal
                b"\x40\x81\x00\x00",  # Huffman padding not all ones
                b"\x40\x84\xff\xff\xff\xff\x00",  # EOS in a Huffman string
                b"\xff\xff\xff\xff\xff\xff\xff"):  # integer too long / truncated
        with pytest.raises(HPACKDecodingError):
            Decoder().decode(bad)
    # a shrunk limit the peer has not followed with a size update
    d = Decoder()
    d.decode(hpack.Encoder().encode([(b"x", b"1")]))
    d.max_allowed_table_size = 10
    with pytest.raises(InvalidTableSizeError):
        d.decode(b"\x82")


def _goaway_code(core, block: bytes) -> int:
    c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    c.initiate_connection()
    core.receive(c.data_to_send())
    from hyperframe.frame import HeadersFrame
    f = HeadersFrame(1)
    f.flags.add("END_HEADERS")
    f.data = block
    with pytest.raises(h2.exceptions.ProtocolError):
        core.receive(f.serialize())
    events = c.receive_data(core.data_to_send())
    return [e.error_code for e in events if isinstance(e, h2.events.ConnectionTerminated)][0]


@pytest.mark.parametrize("block", [b"\xbe", b"\x40\x85ab", b"\x82\x20"])
def test_h2_answers_codec_errors_as_with_hpack(block):
    """A HEADERS frame with a bad block: the same GOAWAY as with the hpack library."""
    core = H2Core(H2Limits(enabled=True))
    core.initiate()
    ref = H2Core(H2Limits(enabled=True))
    ref.conn.encoder, ref.conn.decoder = hpack.Encoder(), hpack.Decoder()
    ref.initiate()
    assert _goaway_code(core, block) == _goaway_code(ref, block) != 0


_name = st.binary(min_size=1, max_size=12) | st.sampled_from(
    [b":status", b":path", b"content-type", b"server", b"date", b"x-a", b"cookie"])
_value = st.binary(max_size=40) | st.sampled_from([b"200", b"/", b"text/plain", b""])
_field = st.tuples(_name, _value, st.booleans())
_blocks = st.lists(st.lists(_field, max_size=12), min_size=1, max_size=8)
_sizes = st.lists(st.sampled_from([0, 64, 256, 4096, 8192]), max_size=8)


@settings(max_examples=150, deadline=None)
@given(blocks=_blocks, sizes=_sizes, huffman=st.booleans())
def test_differential_round_trips(blocks, sizes, huffman):
    """Ours encodes, hpack decodes; hpack encodes, ours decodes; tables stay equal."""
    ours_e, ref_d = Encoder(), hpack.Decoder()
    ref_e, ours_d = hpack.Encoder(), Decoder()
    for d in (ref_d, ours_d):
        d.max_allowed_table_size = 8192
    for i, block in enumerate(blocks):
        if i < len(sizes):
            ours_e.header_table_size = sizes[i]
            ref_e.header_table_size = sizes[i]
        want = [(n, v) for n, v, _ in block]
        fields = [(n, v, s) for n, v, s in block]
        assert [tuple(h) for h in ref_d.decode(ours_e.encode(fields, huffman), raw=True)] == want
        assert [tuple(h) for h in ours_d.decode(ref_e.encode(fields, huffman), raw=True)] == want
        if hasattr(ours_d, "dynamic_table"):
            assert ours_d.dynamic_table() == list(ref_e.header_table.dynamic_entries)
            assert ours_e.dynamic_table() == list(ref_d.header_table.dynamic_entries)


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=64), limit=st.sampled_from([0, 100, 4096]))
def test_fuzz_decoder_agrees_with_hpack(data, limit):
    """Arbitrary bytes: both accept with the same fields, or both refuse."""
    ours, ref = Decoder(), hpack.Decoder()
    for d in (ours, ref):
        d.max_header_list_size = 2000
        d.max_allowed_table_size = limit
        d.header_table_size = min(limit, 4096)
    try:
        want = [tuple(h) for h in ref.decode(data, raw=True)]
    except (hpack.HPACKError, IndexError, TypeError):
        want = None
    try:
        got = [tuple(h) for h in ours.decode(data, raw=True)]
    except hpack.HPACKError:
        got = None
    assert got == want
