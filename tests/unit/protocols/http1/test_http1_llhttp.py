"""llhttp's own test cases (../shared/data/llhttp/test/{request,response}/*.md).

Each ```http block is one input; the ```log block after it says what llhttp does. We only
compare the outcome: parsed (no "error" line in the log) or rejected. Input bytes follow the
data README: drop the final newline, delete backslash-newline, turn newlines into CRLF, then
expand \\r \\n \\t \\f, \\xNN and octal escapes.

Cases where Dispa deliberately differs are listed in DIFFERENT with the reason. Cases that
only make sense with llhttp's lenient flags (meta "lenient*"/"noScan"... only the lenient
ones) are skipped by the loader with that reason recorded in the test id.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from dispa.protocols.http1.errors import ProtocolError

ROOT = Path(__file__).resolve().parents[4]
LLHTTP = ROOT.parent / "shared" / "data" / "llhttp" / "test"

_ESC = re.compile(rb"\\(x[0-9a-fA-F]{2}|[0-7]{1,3}|[rntf\\])")


def _unescape(text: str) -> bytes:
    if text.endswith("\n"):
        text = text[:-1]
    text = text.replace("\\\n", "")
    raw = text.replace("\n", "\r\n").encode("utf-8")

    def sub(m):
        s = m.group(1)
        if s[:1] == b"x":
            return bytes([int(s[1:], 16)])
        if s[:1].isdigit():
            return bytes([int(s, 8) & 0xFF])
        return {b"r": b"\r", b"n": b"\n", b"t": b"\t", b"f": b"\f", b"\\": b"\\"}[s]

    return _ESC.sub(sub, raw)


def _with_host(kind: str, wire: bytes) -> bytes:
    """llhttp's request corpus mostly omits Host, which RFC 9112 §3.2 requires in HTTP/1.1
    (Dispa: 400, tested elsewhere). So that the cases still test everything else, a
    ``Host: llhttp.test`` line is inserted after the request line of an HTTP/1.1 request that
    has none (first message only)."""
    if kind != "request":
        return wire
    lead = len(wire) - len(wire.lstrip(b"\r\n"))
    line_end = wire.find(b"\r\n", lead)
    if line_end < 0 or not wire[lead:line_end].endswith(b"HTTP/1.1"):
        return wire
    head = wire.split(b"\r\n\r\n", 1)[0]
    if re.search(rb"(?im)^host:", head):
        return wire
    return wire[:line_end + 2] + b"Host: llhttp.test\r\n" + wire[line_end + 2:]


def _llhttp_rejects(log: str) -> bool:
    """An "error" line in the log, except the pause codes (21 PAUSED, 22 PAUSED_UPGRADE,
    23 PAUSED_H2_UPGRADE): those stop the parser on purpose at CONNECT/Upgrade."""
    codes = re.findall(r"error code=(\d+)", log)
    return any(c not in ("21", "22", "23") for c in codes)


def load_cases():
    cases = []
    for kind in ("request", "response"):
        for md in sorted((LLHTTP / kind).glob("*.md")):
            text = md.read_text()
            heading = None
            pending = None   # (meta, wire)
            for block in re.finditer(r"^(##+ [^\n]*)$|<!-- meta=(\{.*?\}) -->\s*```http\n(.*?)```"
                                     r"|```log\n(.*?)```", text, re.M | re.S):
                if block.group(1):
                    heading = block.group(1).lstrip("#").strip()
                elif block.group(2):
                    meta = json.loads(block.group(2))
                    pending = (meta, _unescape(block.group(3)))
                elif block.group(4) is not None and pending:
                    meta, wire = pending
                    pending = None
                    log = block.group(4)
                    case_id = f"{kind}/{md.stem}/{heading}"
                    n = sum(1 for c in cases if c[0].split(" #")[0] == case_id)
                    if n:
                        case_id += f" #{n + 1}"
                    cases.append((case_id, kind, meta, _with_host(kind, wire),
                                  _llhttp_rejects(log)))
    return cases


CASES = load_cases()

# Dispa differs from llhttp on purpose. Keys are case ids (file/heading); values say why.
# Cases whose meta "type" names an llhttp lenient flag ("request-lenient-headers", ...) are
# covered by LENIENT_REASON instead: Dispa has no such leniency (allow_bare_lf aside).
DIFFERENT = {
    "request/sample/No HTTP version":
        "HTTP/0.9 simple requests (no version) are rejected with 400 (brief; RFC 9112 §2.3)",
    "request/pipelining/Should parse multiple events":
        "Host is only added to the first request; the second, Host-less HTTP/1.1 request is "
        "rejected (RFC 9112 §3.2)",
    "request/method/SOURCE request with ICE": "ICE/1.0 is not HTTP; Dispa only speaks HTTP/1.x",
    "request/method/OPTIONS request with RTSP": "RTSP/1.0 is not HTTP",
    "request/method/ANNOUNCE request with RTSP": "RTSP/1.0 is not HTTP",
    "response/sample/HTTP version 0.9": "HTTP/0.x is rejected (400 for requests, 502 here)",
    "request/method/PRI request HTTP2":
        "the HTTP/2 connection preface: llhttp pauses on it; Dispa's HTTP/1 parser sees a "
        "request followed by the invalid line 'SM' (the listener must detect the preface "
        "before choosing the HTTP/1 parser)",
    "response/sample/ICE response": "ICE/1.1 is not HTTP; Dispa only speaks HTTP/1.x",
    "response/sample/RTSP response": "RTSP/1.0 is not HTTP; Dispa only speaks HTTP/1.x",
    "response/transfer-encoding/`chunked` before other transfer-encoding":
        "chunked must be the final coding (RFC 9112 §6.1); llhttp falls back to read-until-"
        "close, Dispa rejects the response (smuggling-safe, 502)",
    "response/transfer-encoding/multiple transfer-encoding where chunked is not the last one":
        "as above; 'identity' is also not a registered coding since RFC 7230",
    "response/transfer-encoding/`chunkedchunked` transfer-encoding does not enable chunked enconding":
        "unknown transfer coding: Dispa rejects (501 for requests, 502 for responses) instead "
        "of reading until close",
}

LENIENT_REASON = "llhttp lenient flag: Dispa is strict RFC 9112 here"


def _outcome(mod, kind, wire, llhttp_error):
    """True if Dispa rejects. Dispa checks a head only once it is complete, so when llhttp
    rejects early and Dispa is still waiting for the rest of the head, EOF is fed to force the
    decision (an incomplete message is rejected)."""
    parser = mod.ResponseParser() if kind == "response" else mod.RequestParser()
    try:
        parser.feed(wire)
        for _ in range(1000):
            ev = parser.next_event()
            if ev == mod.DATA:
                parser.take_data()
            elif ev == mod.UPGRADE:
                return False
            elif ev == mod.NEED_DATA:
                if not llhttp_error or parser.eof:
                    return False
                parser.feed_eof()
    except ProtocolError:
        return True
    raise AssertionError("no progress")


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_llhttp_outcome(http1_impl, case):
    case_id, kind, meta, wire, llhttp_error = case
    dispa_error = _outcome(http1_impl, kind, wire, llhttp_error)
    lenient = "lenient" in meta.get("type", "")
    if dispa_error == llhttp_error:
        assert case_id not in DIFFERENT, f"stale DIFFERENT entry: {case_id}"
        return
    assert lenient or case_id in DIFFERENT, (
        f"undocumented disagreement with llhttp: llhttp {'rejects' if llhttp_error else 'accepts'},"
        f" Dispa {'rejects' if dispa_error else 'accepts'}: {wire!r}")


def test_loader_found_the_cases():
    assert len(CASES) >= 120
    assert len({c[0] for c in CASES}) == len(CASES)
