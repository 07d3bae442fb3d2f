"""The sans-I/O WebSocket frame inspector (dispa/protocols/websocket.py): frames pass through
byte for byte at any split, are counted, and violations are caught before a byte of the
offending frame leaves."""

from __future__ import annotations

import os
import struct

import pytest
from hypothesis import given, settings, strategies as st

from dispa.protocols.websocket import (
    Control, FrameInspector, close_frame, encode_frame, parse_close, valid_close_code,
)


def frame(opcode: int, payload: bytes = b"", *, fin: bool = True, mask: bool = True,
          rsv: int = 0, length: int | None = None) -> bytes:
    b0 = (0x80 if fin else 0) | rsv | opcode
    n = len(payload) if length is None else length
    m = 0x80 if mask else 0
    if n < 126:
        head = bytes((b0, m | n))
    elif n < 65536:
        head = bytes((b0, m | 126)) + struct.pack("!H", n)
    else:
        head = bytes((b0, m | 127)) + struct.pack("!Q", n)
    if not mask:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def run(insp: FrameInspector, data: bytes, step: int | None = None) -> tuple[bytes, list]:
    """Feed ``data`` in pieces of ``step`` bytes; return (forwarded bytes, controls)."""
    out, controls = bytearray(), []
    step = step or len(data) or 1
    for i in range(0, len(data), step):
        for p in insp.feed(data[i:i + step]):
            if isinstance(p, Control):
                controls.append(p)
                out += p.raw
            else:
                out += p
    return bytes(out), controls


STREAM = (frame(0x1, b"Hel", fin=False) + frame(0x9, b"ping?") + frame(0x0, b"lo", fin=False)
          + frame(0xA, b"") + frame(0x0, b"!", fin=True) + frame(0x2, os.urandom(300))
          + frame(0x2, os.urandom(70000), rsv=0x40) + frame(0x1, b"")
          + frame(0x8, struct.pack("!H", 4000) + "héllo".encode()))


@pytest.mark.parametrize("step", [1, 2, 3, 7, 64, 1000, None])
def test_a_client_stream_passes_through_intact_at_every_split(step):
    insp = FrameInspector(from_client=True)
    out, controls = run(insp, STREAM, step)
    assert out == STREAM
    assert insp.error is None
    assert insp.frames == 9
    assert insp.messages == 4  # fragmented text, 2 binaries, empty text
    assert [c.opcode for c in controls] == [0x9, 0xA, 0x8]
    assert controls[0].payload == b"ping?"  # unmasked for the tunnel
    assert insp.closed and insp.close_code == 4000 and insp.close_reason == "héllo"


@given(st.lists(st.integers(min_value=1, max_value=200), min_size=1, max_size=60))
@settings(max_examples=60, deadline=None)
def test_any_chunking_forwards_the_same_bytes(cuts):
    insp = FrameInspector(from_client=True)
    out, pos = bytearray(), 0
    data = STREAM
    for c in cuts:
        for p in insp.feed(data[pos:pos + c]):
            out += p.raw if isinstance(p, Control) else p
        pos += c
    for p in insp.feed(data[pos:]):
        out += p.raw if isinstance(p, Control) else p
    assert bytes(out) == data


def test_a_partial_header_is_held_and_the_boundary_is_tracked():
    insp = FrameInspector(from_client=False)
    f = frame(0x2, b"x" * 200, mask=False)
    assert insp.feed(f[:1]) == []  # half a header: nothing forwarded yet
    assert insp.at_boundary
    assert bytes(insp.feed(f[1:50])[0]) == f[:50]
    assert not insp.at_boundary  # mid-payload: the tunnel must not inject a frame now
    insp.feed(f[50:])
    assert insp.at_boundary and insp.messages == 1


@pytest.mark.parametrize("data,code,why", [
    (frame(0x1, b"hi", mask=False), 1002, "unmasked"),
    (frame(0x3, b""), 1002, "reserved opcode"),
    (frame(0x9, b"x", fin=False), 1002, "fragmented control"),
    (frame(0x9, b"x" * 126), 1002, "over 125"),
    (frame(0x0, b"orphan"), 1002, "continuation"),
    (frame(0x1, b"a", fin=False) + frame(0x1, b"b"), 1002, "inside a fragmented"),
    (frame(0x8, b"\x03"), 1002, "1-byte"),
    (frame(0x8, struct.pack("!H", 1005)), 1002, "invalid close code"),
    (frame(0x8, struct.pack("!H", 1000) + b"\xff"), 1007, "UTF-8"),
])
def test_client_violations_are_caught(data, code, why):
    insp = FrameInspector(from_client=True)
    good = frame(0x1, b"ok")
    out, _ = run(insp, good + data)
    assert insp.error is not None and insp.error.code == code and why in insp.error.reason
    assert out.startswith(good)
    assert len(out) < len(good + data)  # nothing past the offending frame's start...
    assert insp.feed(frame(0x1, b"later")) == []  # ...and nothing after it


def test_a_masked_server_frame_is_a_violation():
    insp = FrameInspector(from_client=False)
    out, _ = run(insp, frame(0x1, b"masked", mask=True))
    assert out == b"" and insp.error.code == 1002 and "masked frame" in insp.error.reason


def test_the_message_size_limit_counts_every_fragment():
    insp = FrameInspector(from_client=True, max_message_size=1000)
    ok = frame(0x2, b"a" * 1000)
    frags = frame(0x2, b"b" * 600, fin=False) + frame(0x0, b"c" * 600)
    out, _ = run(insp, ok + frags)
    assert insp.error.code == 1009
    assert out == ok + frags[:len(frame(0x2, b"b" * 600, fin=False))]  # first fragment only


def test_a_huge_declared_length_is_refused_before_its_payload():
    insp = FrameInspector(from_client=True, max_message_size=1 << 20)
    out, _ = run(insp, frame(0x2, b"", length=1 << 40)[:14])
    assert out == b"" and insp.error.code == 1009


def test_nothing_after_a_close_frame_is_forwarded():
    insp = FrameInspector(from_client=True)
    close = frame(0x8, struct.pack("!H", 1000))
    out, _ = run(insp, close + frame(0x1, b"after close"))
    assert out == close and insp.closed


def test_encoded_frames_read_back():
    for mask, from_client in ((True, True), (False, False)):
        for payload in (b"", b"x" * 125, b"y" * 300, b"z" * 70000):
            insp = FrameInspector(from_client=from_client)
            data = encode_frame(0x2, payload, mask=mask)
            out, _ = run(insp, data)
            assert out == data and insp.messages == 1 and insp.error is None
    insp = FrameInspector(from_client=True)
    _, controls = run(insp, close_frame(1001, "é" * 100, mask=True))
    assert len(controls[0].payload) <= 125  # the reason is cut to fit, on a UTF-8 boundary
    assert parse_close(controls[0].payload)[0] == 1001


def test_close_code_ranges():
    assert valid_close_code(1000) and valid_close_code(4999) and valid_close_code(3000)
    assert not any(valid_close_code(c) for c in (999, 1004, 1005, 1006, 1015, 2999, 5000))
