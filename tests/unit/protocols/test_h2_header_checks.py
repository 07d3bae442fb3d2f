"""Received header checks (RFC 9113 §8.2/§8.3): with the compiled codec, H2Core turns h2's
inbound validation off and runs ``hpack_codec.check_headers`` (rust/src/hpack_check.rs)
instead. It must refuse exactly what h2 refuses: differential tests against
``h2.utilities.validate_headers`` (listed cases and hypothesis-generated lists), and
malformed requests and trailers through H2Core end as GOAWAY PROTOCOL_ERROR either way."""

from __future__ import annotations

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import pytest
from h2.utilities import HeaderValidationFlags, validate_headers
from hypothesis import given, settings
from hypothesis import strategies as st

from dispa.protocols.http2 import H2Core, H2Limits, hpack_codec

KINDS = {hpack_codec.REQUEST: HeaderValidationFlags(False, False, False, False),
         hpack_codec.RESPONSE: HeaderValidationFlags(True, False, True, False),
         hpack_codec.TRAILERS: HeaderValidationFlags(False, True, False, False)}


def h2_refuses(headers, kind) -> bool:
    try:
        list(validate_headers(headers, KINDS[kind]))
    except h2.exceptions.ProtocolError:
        return True
    return False


def ours_refuses(headers, kind) -> bool:
    check = hpack_codec.check_headers
    if check is None:  # pure build: h2's own validation is what runs
        return h2_refuses(headers, kind)
    return check(headers, kind) is not None


REQ = [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"), (b":authority", b"a")]
CASES = [
    (REQ, 0), (REQ + [(b"te", b"trailers"), (b"accept", b"")], 0),
    (REQ + [(b"te", b"TrAiLeRs")], 0), (REQ + [(b"te", b"gzip")], 0),
    (REQ + [(b"Accept", b"x")], 0), (REQ + [(b"x y", b"1")], 0), (REQ + [(b"a:b", b"1")], 0),
    (REQ + [(b"x", b" 1")], 0), (REQ + [(b"x", b"1\t")], 0), (REQ + [(b"x", b"1\r\n2")], 0),
    (REQ + [(b"x", b"\x00")], 0), (REQ + [(b"x", b"\x7f\x80")], 0), (REQ + [(b"\x7f", b"1")], 0),
    (REQ + [(b"connection", b"close")], 0), (REQ + [(b"upgrade", b"h2c")], 0),
    (REQ + [(b"keep-alive", b"1")], 0), (REQ + [(b"transfer-encoding", b"chunked")], 0),
    (REQ + [(b":method", b"GET")], 0), (REQ + [(b":foo", b"1")], 0),
    (REQ[:1] + [(b"x", b"1")] + REQ[1:], 0), (REQ + [(b":status", b"200")], 0),
    (REQ[:2] + REQ[3:], 0), (REQ[1:], 0), ([REQ[0], REQ[1], (b":path", b""), REQ[3]], 0),
    (REQ + [(b"host", b"a")], 0), (REQ + [(b"host", b"b")], 0),
    (REQ[:3] + [(b"host", b"a")], 0), (REQ[:3] + [(b"host", b"a"), (b"host", b"a")], 0),
    (REQ[:3], 0), ([(b":method", b"CONNECT"), (b":authority", b"a:443")], 0),
    ([(b":method", b"CONNECT"), (b":authority", b"a:443"), (b":path", b"/")], 0),
    ([(b":method", b"CONNECT"), (b":protocol", b"websocket"), (b":scheme", b"http"),
      (b":path", b"/ws"), (b":authority", b"a")], 0),
    ([(b":method", b"CONNECT"), (b":protocol", b"websocket"), (b":authority", b"a")], 0),
    (REQ + [(b":protocol", b"websocket")], 0), ([(b"", b"x")] + REQ, 0),
    ([(b":status", b"200"), (b"server", b"x")], 1), ([(b"server", b"x")], 1),
    ([(b":status", b"200"), (b":path", b"/")], 1), ([(b":status", b"103"), (b"link", b"<a>")], 1),
    ([(b"grpc-status", b"0")], 2), ([(b":status", b"200")], 2), ([], 2),
    ([(b"grpc-message", b" x")], 2), ([(b"te", b"x")], 2),
]


@pytest.mark.parametrize("headers,kind", CASES)
def test_same_decision_as_h2(headers, kind):
    assert ours_refuses(headers, kind) == h2_refuses(headers, kind)


_names = st.sampled_from([b":method", b":scheme", b":path", b":authority", b":status",
                          b":protocol", b":x", b"host", b"te", b"connection", b"x-a", b"X-A",
                          b"a b", b"", b"a:b", b"cookie"]) | st.binary(min_size=1, max_size=6)
_values = st.sampled_from([b"GET", b"CONNECT", b"http", b"/", b"", b"a", b"trailers",
                           b" a", b"a\t", b"a\nb", b"200"]) | st.binary(max_size=6)


@settings(max_examples=400, deadline=None)
@given(headers=st.lists(st.tuples(_names, _values), max_size=8),
       kind=st.sampled_from(sorted(KINDS)))
def test_fuzz_same_decision_as_h2(headers, kind):
    assert ours_refuses(headers, kind) == h2_refuses(headers, kind)


def test_h2_validation_is_replaced_only_with_the_compiled_check():
    core = H2Core(H2Limits(enabled=True))
    assert core.conn.config.validate_inbound_headers == (hpack_codec.check_headers is None)
    check = hpack_codec.check_headers
    if check is not None:  # any sequence of (bytes, bytes) pairs, not only lists
        assert check(tuple(REQ), hpack_codec.REQUEST) is None
        assert check(iter(REQ + [(b"TE", b"x")]), hpack_codec.REQUEST) is not None


def _client():
    c = h2.connection.H2Connection(h2.config.H2Configuration(
        client_side=True, header_encoding=None, validate_outbound_headers=False,
        normalize_outbound_headers=False))
    c.initiate_connection()
    return c


def _server(c):
    core = H2Core(H2Limits(enabled=True))
    core.initiate()
    core.receive(c.data_to_send())
    c.receive_data(core.data_to_send())
    core.receive(c.data_to_send())
    return core


@pytest.mark.parametrize("extra", [[(b"Upper", b"1")], [(b"connection", b"close")],
                                   [(b"te", b"gzip")], [(b":path", b"/")], [(b"x", b" 1")],
                                   [(b"host", b"other")], [(b"x", b"a\r\nx-b: c")],
                                   [(b"x", b"a\x00")], [(b"x\r\ny", b"1")]])
def test_malformed_request_is_a_connection_error(extra):
    c = _client()
    core = _server(c)
    c.send_headers(1, REQ + extra, end_stream=True)
    with pytest.raises(h2.exceptions.ProtocolError):
        core.receive(c.data_to_send())
    ended = [e for e in c.receive_data(core.data_to_send())
             if isinstance(e, h2.events.ConnectionTerminated)]
    assert ended and ended[0].error_code == h2.errors.ErrorCodes.PROTOCOL_ERROR


def test_valid_request_and_trailers_pass_and_bad_trailers_do_not():
    c = _client()
    core = _server(c)
    c.send_headers(1, REQ + [(b"te", b"trailers"), (b"cookie", b"a=1"), (b"cookie", b"b=2")])
    c.send_data(1, b"x")
    c.send_headers(1, [(b"x-sum", b"1")], end_stream=True)
    events = core.receive(c.data_to_send())
    req = [e for e in events if isinstance(e, h2.events.RequestReceived)]
    assert req and (b":path", b"/") in req[0].headers
    assert [e.headers for e in events if isinstance(e, h2.events.TrailersReceived)] == \
        [[(b"x-sum", b"1")]]
    c.send_headers(3, REQ)
    c.send_headers(3, [(b":path", b"/")], end_stream=True)  # pseudo-header in trailers
    with pytest.raises(h2.exceptions.ProtocolError):
        core.receive(c.data_to_send())
