"""What a request stream's consumer gets from H2Session: the fields after the received
header checks, with split ``cookie`` fields joined back, last and never indexed (RFC 9113
§8.2.3), whether h2's inbound normalisation or hpack_codec's compiled checks are on; and
a request the checks refuse never reaches a stream."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import h2.config
import h2.connection
import h2.events
import hpack

from dispa.protocols.http2 import H2Limits
from dispa.proxy.h2_session import H2Session, StreamBase
from tests.unit.protocols.test_h2_session import Transport


class Stream(StreamBase):
    def on_data(self, data):
        pass

    def on_end(self, trailers):
        pass

    def on_reset(self):
        pass


def _run(send):
    """Open a session, let ``send(client)`` queue requests, return (fields per stream id,
    events the client got back)."""
    async def main():
        server = SimpleNamespace(metrics=SimpleNamespace(inc=lambda *a, **k: None),
                                 sessions=set(), draining=False, runtime=SimpleNamespace(
                                     proxy=SimpleNamespace(keep_alive_timeout_seconds=60.0)))
        t = Transport()
        s = H2Session(server, H2Limits(enabled=True))
        s.connection_made(t)
        got = {}

        def handoff(h2s, sid, pseudo, fields, ended):
            got[sid] = fields
            return Stream(h2s, sid)
        s._handoff = handoff
        c = h2.connection.H2Connection(h2.config.H2Configuration(
            client_side=True, header_encoding=None, validate_outbound_headers=False,
            normalize_outbound_headers=False))
        c.initiate_connection()
        s.data_received(c.data_to_send())
        c.receive_data(t.take())
        send(c)
        s.data_received(c.data_to_send())
        await asyncio.sleep(0)
        return got, c.receive_data(t.take())
    return asyncio.run(main())


REQ = [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"), (b":authority", b"a")]


def test_split_cookies_are_joined_last_and_never_indexed():
    got, _ = _run(lambda c: c.send_headers(
        1, REQ + [(b"cookie", b"a=1"), (b"x-a", b"1"), (b"cookie", b"b=2")], end_stream=True))
    fields = got[1]
    assert [tuple(f) for f in fields] == [(b"x-a", b"1"), (b"cookie", b"a=1; b=2")]
    assert isinstance(fields[-1], hpack.NeverIndexedHeaderTuple)


def test_refused_request_reaches_no_stream():
    got, events = _run(lambda c: c.send_headers(
        1, REQ + [(b"x", b"a\r\nx-b: c")], end_stream=True))
    assert got == {}
    assert any(isinstance(e, h2.events.ConnectionTerminated) and e.error_code == 1
               for e in events), events
