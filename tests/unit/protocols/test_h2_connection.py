"""dispa/protocols/http2/connection.py against h2's own H2Connection: the same input bytes
give the same events, the same output bytes and the same stream bookkeeping."""

from __future__ import annotations

import h2
import h2.config
import h2.connection
import h2.events
import hyperframe.frame
import pytest

from dispa.protocols.http2 import connection

REQ = [(b":method", b"GET"), (b":path", b"/"), (b":scheme", b"http"),
       (b":authority", b"example.test")]


def _server(cls):
    c = cls(config=h2.config.H2Configuration(client_side=False, header_encoding=None))
    c.initiate_connection()
    c.data_to_send()
    return c


def _client_bytes():
    """A client's byte stream that leaves the server's streams in every state: open,
    half-closed (remote), reset by the client, and finished both ways."""
    cl = h2.connection.H2Connection(
        config=h2.config.H2Configuration(client_side=True, header_encoding=None))
    cl.initiate_connection()
    chunks = [cl.data_to_send()]
    for sid in (1, 3, 5, 7, 9, 11):
        cl.send_headers(sid, REQ, end_stream=sid % 4 == 1)  # 1, 5, 9: half-closed remote
        chunks.append(cl.data_to_send())
    cl.reset_stream(3)
    chunks.append(cl.data_to_send())
    return chunks


def _events(evs):
    out = []
    for e in evs:
        d = {k: v for k, v in vars(e).items() if k not in ("stream_ended", "priority_updated")}
        out.append((type(e).__name__, repr(sorted(d.items(), key=lambda kv: kv[0]))))
    return out


def _feed(srv, chunks, seen):
    for chunk in chunks:
        try:
            seen.append(_events(srv.receive_data(chunk)))
        except Exception as exc:  # noqa: BLE001 - compared, not hidden
            seen.append(("raised", type(exc).__name__, str(exc)))
        seen.append(srv.data_to_send())


def _drive(cls, extra=(), after=()):
    srv = _server(cls)
    seen = []
    _feed(srv, list(_client_bytes()) + list(extra), seen)
    # stream 5 answered and finished: CLOSED, due for clean-up
    srv.send_headers(5, [(b":status", b"200")], end_stream=True)
    seen.append(srv.data_to_send())
    _feed(srv, after, seen)
    return srv, seen


def test_the_same_bytes_give_the_same_events_output_and_streams():
    ours, ours_seen = _drive(connection.Connection)
    theirs, theirs_seen = _drive(h2.connection.H2Connection)
    assert ours_seen == theirs_seen
    for remainder in (1, 0):
        assert ours._open_streams(remainder) == theirs._open_streams(remainder)
        assert sorted(ours.streams) == sorted(theirs.streams)
        assert ours._closed_streams == theirs._closed_streams
    assert ours.open_inbound_streams == theirs.open_inbound_streams == 4  # 1, 7, 9, 11
    assert 5 in ours._closed_streams and 3 in ours._closed_streams


def _frame(f) -> bytes:
    return f.serialize()


def test_frames_on_reset_and_finished_streams_are_answered_like_h2():
    # DATA on the stream the client reset, on a half-closed (remote) stream and on streams
    # closed both ways, before and after their clean-up: RST_STREAM answers
    extra = [_frame(hyperframe.frame.DataFrame(3, b"late")),
             _frame(hyperframe.frame.DataFrame(1, b"after END_STREAM"))]
    # stream 13 opens (the closed streams 3 and 5 are cleaned up), then DATA on 5
    after = [_frame(hyperframe.frame.HeadersFrame(
                 13, b"\x82\x84\x86\x01\x0cexample.test", flags=["END_HEADERS"])),
             _frame(hyperframe.frame.DataFrame(5, b"after both ends")),
             _frame(hyperframe.frame.DataFrame(3, b"after the clean-up")),
             # HEADERS on the cleaned-up streams: the reset one is answered with
             # RST_STREAM, the one that ended is a connection error (_receive_frame's
             # except branches)
             _frame(hyperframe.frame.HeadersFrame(3, b"\x82", flags=["END_HEADERS"])),
             _frame(hyperframe.frame.HeadersFrame(5, b"\x82", flags=["END_HEADERS"]))]
    ours = _drive(connection.Connection, extra, after)[1]
    theirs = _drive(h2.connection.H2Connection, extra, after)[1]
    assert ours == theirs
    rst = b"\x00\x00\x04\x03\x00"  # an RST_STREAM frame's header
    assert sum(isinstance(x, bytes) and x.startswith(rst) for x in ours) >= 4
    assert ours[-2][:2] == ("raised", "StreamClosedError")


def test_received_frames_are_not_formatted_for_a_trace_line(monkeypatch):
    calls = []

    def counting_repr(self):
        calls.append(type(self).__name__)
        return "frame"
    monkeypatch.setattr(hyperframe.frame.Frame, "__repr__", counting_repr)
    _drive(h2.connection.H2Connection)
    assert calls  # h2's own connection does format every frame
    calls.clear()
    _drive(connection.Connection)
    if connection.OVERRIDDEN:
        assert calls == []
    else:  # another h2 release: its own class, unchanged
        assert connection.Connection is h2.connection.H2Connection


def test_the_overrides_apply_to_the_release_they_were_copied_from_only():
    if h2.__version__ == connection.OVERRIDDEN_FOR:
        assert connection.Connection is not h2.connection.H2Connection
        assert issubclass(connection.Connection, h2.connection.H2Connection)
    else:
        assert connection.Connection is h2.connection.H2Connection


@pytest.mark.parametrize("cls", [connection.Connection, h2.connection.H2Connection])
def test_a_protocol_error_is_the_same_error(cls):
    srv = _server(cls)
    with pytest.raises(h2.exceptions.ProtocolError):
        # a DATA frame on stream 0 (RFC 9113 §6.1), written by hand: hyperframe refuses it
        srv.receive_data(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
                         + b"\x00\x00\x01\x00\x00\x00\x00\x00\x00x")
