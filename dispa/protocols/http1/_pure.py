"""HTTP/1.1 codec, pure-Python twin of ``dispa._hotpath`` (the executable spec).

Theory of operation
-------------------
The codec is sans-I/O and pull-style (h11): the caller ``feed()``s bytes, then calls
``next_event()`` until it returns ``NEED_DATA``. Each call returns one of

    NEED_DATA  more bytes are needed (or, with ``eof`` set, the peer closed cleanly between
               messages)
    HEAD       ``parser.head`` holds the new message head
    DATA       ``parser.take_data()`` returns the next decoded body bytes (all that are
               buffered, chunked coding removed)
    END        the message is complete; ``parser.trailers`` is set for chunked messages
    UPGRADE    the stream switches protocol (Upgrade / CONNECT / 101): the parser is done and
               ``take_rest()`` returns the first bytes of the tunnelled stream

Rule 1: a message is read in two phases. The *scan* phase finds line ends (one ``find`` per
line) and enforces the size limits only; the *parse* phase runs once, when the blank line is
there, and checks syntax line by line. So whatever way the input is split, the same error is
raised for the same bytes ("whole == split" is a tested invariant).

Rule 2: the limit windows. A line starting at head offset ``s`` must have its LF within
``min(max_line_bytes, max_head_bytes - s)`` bytes; if that many bytes are buffered without an
LF, the limit whose window is smaller is reported (the line limit on a tie). This needs no
look-ahead and is the same for whole and split input.

Rule 3: after an error the parser is dead: every later ``next_event()`` raises the same error.
When body bytes were decoded before an error in the same call, they are returned first as
DATA and the error comes on the next call.

Invariants: the buffer never holds bytes of an earlier message; ``head`` is replaced only
by a HEAD event; ``take_data()`` returns each body byte exactly once.

WARNING: every rule, message and status here is mirrored in ``_native/http1_parser.pyx`` and
``_native/http1_writer.pyx``; the test suite and the fuzzer compare the two. Change both.

Performance: this twin is about an order of magnitude slower than the compiled one; it is
used only where the extension is not built (``DISPA_NO_EXTENSIONS=1``).
"""

from __future__ import annotations

import re

from . import limits as _limits
from .errors import ProtocolError

__all__ = [
    "NEED_DATA", "HEAD", "DATA", "END", "UPGRADE", "LAST_CHUNK", "ProtocolError",
    "RequestParser", "ResponseParser", "RequestHead", "ResponseHead",
    "write_request_head", "write_response_head", "encode_chunk",
    "proxy_request_head", "proxy_response_head",
]

NEED_DATA = 0
HEAD = 1
DATA = 2
END = 3
UPGRADE = 4

LAST_CHUNK = b"0\r\n\r\n"

# Parser states (mirrored as C enums in _native/includes/consts.pxi).
_S_HEAD = 0          # reading a head
_S_BODY_CL = 1       # Content-Length body, _remaining bytes to go
_S_CHUNK_SIZE = 2    # expecting a chunk-size line
_S_CHUNK_DATA = 3    # inside a chunk, _remaining bytes to go
_S_CHUNK_CRLF = 4    # expecting the CRLF after chunk data
_S_TRAILERS = 5      # reading the trailer section
_S_BODY_EOF = 6      # close-delimited response body
_S_END = 7           # body done: next_event returns END
_S_UPGRADE = 8       # next_event returns UPGRADE (forever)
_S_CLOSED = 9        # close-delimited message ended: nothing more can come
_S_ERROR = 10        # dead: re-raise

# RFC 9110 §5.6.2 token characters.
_TOKEN_RE = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
# RFC 9110 §5.5: field values are VCHAR / obs-text / SP / HTAB; reject every other CTL
# (NUL, bare CR, LF included).
_BAD_VALUE_RE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
# Request targets: VCHAR only (RFC 9112 §3.2; no SP, no CTL, no obs-text).
_BAD_TARGET_RE = re.compile(rb"[^\x21-\x7e]")

# RFC 9110 §7.6.1: always hop-by-hop; never forwarded.
_HOP_BY_HOP = frozenset((b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer",
                         b"transfer-encoding", b"upgrade", b"content-length"))


def _pe(message: str, status: int, is_response: bool) -> ProtocolError:
    return ProtocolError(message, 502 if is_response else status)


class _Head:
    __slots__ = ("version", "headers", "content_length", "chunked", "keep_alive", "upgrade")

    def __setattr__(self, name, value):
        raise AttributeError(f"{type(self).__name__} is read-only")

    def get(self, name: bytes) -> bytes | None:
        """First value of header ``name`` (given in lowercase), or None."""
        for n, v in self.headers:
            if len(n) == len(name) and n.lower() == name:
                return v
        return None

    def get_all(self, name: bytes) -> list[bytes]:
        """Every value of header ``name`` (given in lowercase), in order."""
        return [v for n, v in self.headers if len(n) == len(name) and n.lower() == name]


class RequestHead(_Head):
    """One request head (read-only). See the module docstring of ``dispa.protocols.http1``."""

    __slots__ = ("method", "target", "expect_continue")

    def __repr__(self):
        return f"<RequestHead {self.method!r} {self.target!r} HTTP/{self.version // 10}.{self.version % 10}>"


class ResponseHead(_Head):
    """One response head (read-only)."""

    __slots__ = ("status", "reason")

    def __repr__(self):
        return f"<ResponseHead {self.status} {self.reason!r}>"


_set = object.__setattr__


def _parse_version(v: bytes, is_response: bool) -> int:
    """``HTTP/1.1`` -> 11. RFC 9112 §2.3: exactly "HTTP/" DIGIT "." DIGIT."""
    if (len(v) != 8 or v[:5] != b"HTTP/" or v[6] != 0x2E
            or not (0x30 <= v[5] <= 0x39) or not (0x30 <= v[7] <= 0x39)):
        raise _pe("invalid HTTP version", 400, is_response)
    major = v[5] - 0x30
    minor = v[7] - 0x30
    if major == 1 and minor <= 1:
        return 10 + minor
    if major == 0:
        raise _pe("HTTP/0.x is not supported", 400, is_response)
    raise _pe("HTTP version not supported", 505, is_response)


class _Parser:
    _is_response = False

    def __init__(self, *, max_head_bytes: int = _limits.MAX_HEAD_BYTES,
                 max_header_count: int = _limits.MAX_HEADER_COUNT,
                 max_line_bytes: int = _limits.MAX_LINE_BYTES,
                 max_chunk_ext_bytes: int = _limits.MAX_CHUNK_EXT_BYTES,
                 allow_bare_lf: bool = False):
        self._max_head = int(max_head_bytes)
        self._max_count = int(max_header_count)
        self._max_line = int(max_line_bytes)
        self._max_ext = int(max_chunk_ext_bytes)
        self._bare_lf = bool(allow_bare_lf)
        self._buf = bytearray()
        self.eof = False
        self.head = None
        self.trailers = None
        self._state = _S_HEAD
        self._data = b""
        self._error = None
        self._remaining = 0
        self._new_message()

    def _new_message(self):
        self._lead = 0          # leading empty lines skipped
        self._in_lead = True
        self._sc_line = 0       # start of the line being scanned (buffer offset)
        self._sc_pos = 0        # where the LF search resumes
        self._sc_count = 0      # header lines completed
        self._sc_first = True   # the line being scanned is the start line

    def reset(self) -> None:
        """Forget everything buffered and start over (limits are kept)."""
        self._buf = bytearray()
        self.eof = False
        self.head = None
        self.trailers = None
        self._state = _S_HEAD
        self._data = b""
        self._error = None
        self._remaining = 0
        self._new_message()

    def feed(self, data) -> None:
        """Append ``data`` (any bytes-like object) to the buffer. Raises RuntimeError after
        ``feed_eof()``."""
        if self.eof:
            raise RuntimeError("feed() after feed_eof()")
        self._buf += data

    def feed_eof(self) -> None:
        """The peer closed its side."""
        self.eof = True

    def take_data(self) -> bytes:
        """The body bytes announced by the last DATA event (b"" if none)."""
        d = self._data
        self._data = b""
        return d

    def take_rest(self) -> bytes:
        """All unconsumed buffered bytes; empties the buffer."""
        rest = bytes(self._buf)
        self._buf = bytearray()
        return rest

    # -- events -------------------------------------------------------------------------

    def next_event(self) -> int:
        """Return NEED_DATA, HEAD, DATA, END or UPGRADE; raise ProtocolError on bad input."""
        state = self._state
        if state == _S_HEAD:
            return self._next_head()
        if state == _S_BODY_CL:
            buf = self._buf
            if not buf:
                if self.eof:
                    return self._fail(self._incomplete())
                return NEED_DATA
            n = min(self._remaining, len(buf))
            self._data = bytes(buf[:n])
            del buf[:n]
            self._remaining -= n
            if self._remaining == 0:
                self._state = _S_UPGRADE if self.head.upgrade else _S_END
            return DATA
        if _S_CHUNK_SIZE <= state <= _S_TRAILERS:
            return self._next_chunked()
        if state == _S_END:
            self._state = _S_HEAD
            self._new_message()
            return END
        if state == _S_BODY_EOF:
            if self._buf:
                self._data = bytes(self._buf)
                self._buf = bytearray()
                return DATA
            if self.eof:
                self._state = _S_CLOSED
                return END
            return NEED_DATA
        if state == _S_UPGRADE:
            return UPGRADE
        if state == _S_CLOSED:
            return NEED_DATA
        raise ProtocolError(self._error.message, self._error.status_hint)

    def _incomplete(self) -> ProtocolError:
        return _pe("incomplete response" if self._is_response else "incomplete request", 400,
                   self._is_response)

    def _fail(self, exc: ProtocolError):
        self._state = _S_ERROR
        self._error = exc
        raise exc

    def _next_head(self) -> int:
        try:
            end = self._scan_head()
        except ProtocolError as exc:
            self._fail(exc)
        if end < 0:
            if self.eof and self._buf:
                self._fail(self._incomplete())
            return NEED_DATA
        raw = bytes(self._buf[:end])
        del self._buf[:end]
        try:
            self._parse_head(raw)
        except ProtocolError as exc:
            self._fail(exc)
        return HEAD

    # -- scan phase (limits only) -------------------------------------------------------

    def _scan_head(self) -> int:
        """Skip leading empty lines, then scan lines; return the head's end offset or -1."""
        buf = self._buf
        if self._in_lead:
            while True:
                if buf[:2] == b"\r\n":
                    del buf[:2]
                elif buf[:1] == b"\n":
                    if not self._bare_lf:
                        raise _pe("bare LF line ending", 400, self._is_response)
                    del buf[:1]
                elif buf == b"\r" or not buf:
                    return -1
                else:
                    break
                self._lead += 1
                if self._lead > _limits.MAX_LEADING_EMPTY_LINES:
                    raise _pe("too many empty lines before the start line", 400,
                              self._is_response)
            self._in_lead = False
        return self._scan_lines(False)

    def _scan_lines(self, trailers: bool) -> int:
        buf = self._buf
        n = len(buf)
        max_line = self._max_line
        max_head = self._max_head
        while True:
            s = self._sc_line
            head_room = max_head - s
            limit = max_line if max_line <= head_room else head_room
            lim_end = s + limit
            i = buf.find(b"\n", self._sc_pos, lim_end if lim_end < n else n)
            if i < 0:
                if n >= lim_end:
                    raise self._limit_error(trailers, max_line <= head_room)
                self._sc_pos = n
                return -1
            if (i == s or (i == s + 1 and buf[s] == 13)) and not self._sc_first:
                return i + 1
            if self._sc_first and not trailers:
                self._sc_first = False
            else:
                self._sc_first = False
                self._sc_count += 1
                if self._sc_count > self._max_count:
                    if trailers:
                        raise _pe("too many trailer fields", 431, self._is_response)
                    raise _pe("too many headers", 431, self._is_response)
            self._sc_line = self._sc_pos = i + 1

    def _limit_error(self, trailers: bool, line: bool) -> ProtocolError:
        if trailers:
            return _pe("trailer line too long" if line else "trailer section too large", 431,
                       self._is_response)
        if line and self._sc_first:
            if self._is_response:
                return _pe("status line too long", 502, True)
            return ProtocolError("request line too long", 414)
        if line:
            return _pe("header line too long", 431, self._is_response)
        return _pe("response head too large" if self._is_response else "request head too large",
                   431, self._is_response)

    # -- parse phase (syntax) -----------------------------------------------------------

    def _lines(self, raw: bytes):
        """Yield the content of each line of ``raw`` (terminators removed, checked)."""
        pos = 0
        n = len(raw)
        bare_lf = self._bare_lf
        while pos < n:
            i = raw.index(b"\n", pos)
            if i > pos and raw[i - 1] == 13:
                yield raw[pos:i - 1]
            else:
                if not bare_lf:
                    raise _pe("bare LF line ending", 400, self._is_response)
                yield raw[pos:i]
            pos = i + 1

    def _header_line(self, line: bytes):
        """Split one field line into (name, value); RFC 9112 §5."""
        is_resp = self._is_response
        if line[0] in (0x20, 0x09):
            raise _pe("obs-fold is not allowed", 400, is_resp)
        colon = line.find(b":")
        if colon < 0:
            raise _pe("header line without colon", 400, is_resp)
        if colon == 0:
            raise _pe("empty header name", 400, is_resp)
        name = line[:colon]
        if name[-1] in (0x20, 0x09):
            raise _pe("whitespace before colon", 400, is_resp)
        if not _TOKEN_RE.match(name):
            raise _pe("invalid header name", 400, is_resp)
        value = line[colon + 1:].strip(b" \t")
        if _BAD_VALUE_RE.search(value):
            raise _pe("invalid header value", 400, is_resp)
        return name, value

    def _parse_fields(self, lines, head_fields: bool):
        """Parse field lines; return (headers, framing facts)."""
        is_resp = self._is_response
        headers = []
        host = 0
        cl = -1
        te = False
        chunked = False
        conn_close = conn_keep = conn_upgrade = False
        has_upgrade = False
        expect = False
        for line in lines:
            if not line:
                break
            name, value = self._header_line(line)
            headers.append((name, value))
            if not head_fields:
                continue
            lname = name.lower()
            if lname == b"host" and not is_resp:
                host += 1
                if host > 1:
                    raise _pe("duplicate Host header", 400, is_resp)
            elif lname == b"content-length":
                if cl >= 0:
                    raise _pe("duplicate Content-Length header", 400, is_resp)
                if (not value or len(value) > _limits.MAX_CONTENT_LENGTH_DIGITS
                        or not value.isdigit()):
                    raise _pe("invalid Content-Length", 400, is_resp)
                cl = int(value)
            elif lname == b"transfer-encoding":
                te = True
                for coding in value.split(b","):
                    coding = coding.strip(b" \t").lower()
                    if not _TOKEN_RE.match(coding):
                        raise _pe("malformed Transfer-Encoding", 400, is_resp)
                    if chunked:
                        raise _pe("chunked must be the final transfer coding", 400, is_resp)
                    if coding == b"chunked":
                        chunked = True
                    else:
                        # Re-framing as chunked would silently drop any other coding
                        # (gzip, deflate, ...), so a proxy refuses them (RFC 9112 §6.1).
                        raise _pe("unsupported transfer coding", 501, is_resp)
            elif lname == b"connection":
                for tok in value.split(b","):
                    tok = tok.strip(b" \t").lower()
                    if tok == b"close":
                        conn_close = True
                    elif tok == b"keep-alive":
                        conn_keep = True
                    elif tok == b"upgrade":
                        conn_upgrade = True
            elif lname == b"upgrade":
                has_upgrade = True
            elif lname == b"expect":
                if value.lower() == b"100-continue":
                    expect = True
        return (headers, host, cl, te, chunked, conn_close, conn_keep, conn_upgrade,
                has_upgrade, expect)

    def _framing_checks(self, version, cl, te, chunked):
        is_resp = self._is_response
        if te and cl >= 0:
            raise _pe("both Content-Length and Transfer-Encoding", 400, is_resp)
        if te and version == 10:
            raise _pe("Transfer-Encoding in an HTTP/1.0 message", 400, is_resp)
        if te and not chunked and not is_resp:
            raise _pe("final transfer coding is not chunked", 400, is_resp)

    # -- chunked body -------------------------------------------------------------------

    def _next_chunked(self) -> int:
        pieces = []
        try:
            self._decode_chunks(pieces)
        except ProtocolError as exc:
            if pieces:
                self._state = _S_ERROR
                self._error = exc
                self._data = b"".join(pieces)
                return DATA
            self._fail(exc)
        if pieces:
            self._data = b"".join(pieces)
            return DATA
        if self._state == _S_END:
            self._state = _S_HEAD
            self._new_message()
            return END
        if self._state == _S_UPGRADE:
            return UPGRADE
        if self.eof:
            self._fail(self._incomplete())
        return NEED_DATA

    def _decode_chunks(self, pieces) -> None:
        buf = self._buf
        is_resp = self._is_response
        while True:
            state = self._state
            if state == _S_CHUNK_DATA:
                if not buf:
                    return
                n = min(self._remaining, len(buf))
                pieces.append(bytes(buf[:n]))
                del buf[:n]
                self._remaining -= n
                if self._remaining:
                    return
                self._state = _S_CHUNK_CRLF
            elif state == _S_CHUNK_SIZE:
                window = _limits.MAX_CHUNK_SIZE_DIGITS + self._max_ext + 2
                i = buf.find(b"\n", 0, window if window < len(buf) else len(buf))
                if i < 0:
                    if len(buf) >= window:
                        raise _pe("chunk header too long", 400, is_resp)
                    return
                line = bytes(buf[:i + 1])
                del buf[:i + 1]
                size = self._parse_chunk_size(line)
                if size == 0:
                    self._state = _S_TRAILERS
                    self._sc_line = self._sc_pos = self._sc_count = 0
                    self._sc_first = False
                else:
                    self._remaining = size
                    self._state = _S_CHUNK_DATA
            elif state == _S_CHUNK_CRLF:
                if not buf:
                    return
                if buf[0] == 13:
                    if len(buf) < 2:
                        return
                    if buf[1] != 10:
                        raise _pe("missing CRLF after chunk data", 400, is_resp)
                    del buf[:2]
                elif buf[0] == 10 and self._bare_lf:
                    del buf[:1]
                else:
                    raise _pe("missing CRLF after chunk data", 400, is_resp)
                self._state = _S_CHUNK_SIZE
            else:  # _S_TRAILERS
                end = self._scan_lines(True)
                if end < 0:
                    return
                raw = bytes(buf[:end])
                del buf[:end]
                self.trailers = self._parse_fields(self._lines(raw), False)[0]
                self._state = _S_UPGRADE if self.head.upgrade else _S_END
                return

    def _parse_chunk_size(self, line: bytes) -> int:
        """RFC 9112 §7.1: chunk-size [ chunk-ext ] CRLF, chunk-ext validated by grammar."""
        is_resp = self._is_response
        if line.endswith(b"\r\n"):
            line = line[:-2]
        else:
            if not self._bare_lf:
                raise _pe("bare LF line ending", 400, is_resp)
            line = line[:-1]
        n = len(line)
        i = 0
        while i < n and line[i] in _HEXDIGITS:
            i += 1
        if i == 0:
            raise _pe("invalid chunk size", 400, is_resp)
        if i > _limits.MAX_CHUNK_SIZE_DIGITS:
            raise _pe("chunk size too large", 400, is_resp)
        size = int(line[:i], 16)
        if size > 0x7FFFFFFFFFFFFFFF:
            raise _pe("chunk size too large", 400, is_resp)
        if n - i > self._max_ext:
            raise _pe("chunk extension too long", 400, is_resp)
        if i < n and not _CHUNK_EXT_RE.match(line, i):
            raise _pe("invalid chunk extension", 400, is_resp)
        return size


_HEXDIGITS = frozenset(b"0123456789abcdefABCDEF")
# RFC 9112 §7.1.1: *( BWS ";" BWS ext-name [ BWS "=" BWS ext-val ] ), ext-val = token /
# quoted-string (qdtext = HTAB / SP / %x21 / %x23-5B / %x5D-7E / obs-text).
_TCHARS = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]"
_CHUNK_EXT_RE = re.compile(
    rb"(?:[ \t]*;[ \t]*" + _TCHARS + rb"+(?:[ \t]*=[ \t]*(?:" + _TCHARS
    + rb"+|\"(?:[\t \x21\x23-\x5b\x5d-\x7e\x80-\xff]|\\[\t \x21-\x7e\x80-\xff])*\"))?)+\Z")


class RequestParser(_Parser):
    """Parse requests from a downstream byte stream (RFC 9112). See ``_Parser.next_event``."""

    _is_response = False

    def _parse_head(self, raw: bytes) -> None:
        lines = self._lines(raw)
        line = next(lines)
        sp = line.find(b" ")
        if sp < 0:
            raise ProtocolError("invalid request line", 400)
        method = line[:sp]
        if not _TOKEN_RE.match(method):
            raise ProtocolError("invalid method", 400)
        sp2 = line.rfind(b" ")
        if sp2 == sp:
            raise ProtocolError("invalid request line", 400)
        version = _parse_version(line[sp2 + 1:], False)
        target = line[sp + 1:sp2]
        if not target or _BAD_TARGET_RE.search(target):
            raise ProtocolError("invalid request target", 400)
        (headers, host, cl, te, chunked, conn_close, conn_keep, conn_upgrade, has_upgrade,
         expect) = self._parse_fields(lines, True)
        self._framing_checks(version, cl, te, chunked)
        if version == 11 and not host:
            raise ProtocolError("missing Host header", 400)
        if version == 11:
            keep_alive = not conn_close
        else:
            keep_alive = conn_keep and not conn_close
        upgrade = method == b"CONNECT" or (version == 11 and has_upgrade and conn_upgrade)
        head = RequestHead()
        _set(head, "method", method)
        _set(head, "target", target)
        _set(head, "version", version)
        _set(head, "headers", headers)
        _set(head, "content_length", cl)
        _set(head, "chunked", chunked)
        _set(head, "keep_alive", keep_alive)
        _set(head, "upgrade", upgrade)
        _set(head, "expect_continue", expect)
        self.head = head
        self.trailers = None
        if chunked:
            self._state = _S_CHUNK_SIZE
            self.trailers = []
        elif cl > 0:
            self._state = _S_BODY_CL
            self._remaining = cl
        else:
            self._state = _S_UPGRADE if upgrade else _S_END


class ResponseParser(_Parser):
    """Parse responses from an upstream byte stream (RFC 9112). Call ``expect(method)``
    before each response. Every error has ``status_hint`` 502."""

    _is_response = True

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._method = b"GET"

    def expect(self, method: bytes) -> None:
        """The method of the request this response answers (HEAD: no body; CONNECT + 2xx:
        tunnel). Stays in force until the next call."""
        self._method = bytes(method)

    def _parse_head(self, raw: bytes) -> None:
        lines = self._lines(raw)
        line = next(lines)
        sp = line.find(b" ")
        if sp < 0:
            raise ProtocolError("invalid status line", 502)
        version = _parse_version(line[:sp], True)
        code = line[sp + 1:sp + 4]
        if (len(code) != 3 or not code.isdigit() or code[0] == 0x30
                or (len(line) > sp + 4 and line[sp + 4] != 0x20)):
            raise ProtocolError("invalid status code", 502)
        status = int(code)
        reason = line[sp + 5:]
        if _BAD_VALUE_RE.search(reason):
            raise ProtocolError("invalid reason phrase", 502)
        (headers, host, cl, te, chunked, conn_close, conn_keep, conn_upgrade, has_upgrade,
         expect) = self._parse_fields(lines, True)
        self._framing_checks(version, cl, te, chunked)
        if version == 11:
            keep_alive = not conn_close
        else:
            keep_alive = conn_keep and not conn_close
        method = self._method
        upgrade = status == 101 or (method == b"CONNECT" and 200 <= status < 300)
        if upgrade:
            state = _S_UPGRADE
        elif status < 200 or status in (204, 304) or method == b"HEAD":
            state = _S_END
        elif chunked:
            state = _S_CHUNK_SIZE
        elif te:
            # RFC 9112 §6.3 rule 4: a final coding other than chunked: read until close.
            state = _S_BODY_EOF
            keep_alive = False
        elif cl >= 0:
            state = _S_BODY_CL if cl > 0 else _S_END
        else:
            state = _S_BODY_EOF
            keep_alive = False
        head = ResponseHead()
        _set(head, "status", status)
        _set(head, "reason", reason)
        _set(head, "version", version)
        _set(head, "headers", headers)
        _set(head, "content_length", cl)
        _set(head, "chunked", chunked)
        _set(head, "keep_alive", keep_alive)
        _set(head, "upgrade", upgrade)
        self.head = head
        self.trailers = [] if state == _S_CHUNK_SIZE else None
        self._state = state
        self._remaining = cl


# -- writer -------------------------------------------------------------------------------


def _check_token(value, what: str) -> bytes:
    value = bytes(value)
    if not _TOKEN_RE.match(value):
        raise ValueError(f"invalid {what}: {value!r}")
    return value


def _check_value(value, what: str) -> bytes:
    value = bytes(value)
    if _BAD_VALUE_RE.search(value):
        raise ValueError(f"invalid {what}: {value!r}")
    return value


def _write_fields(out: list, headers) -> None:
    for name, value in headers:
        out.append(_check_token(name, "header name"))
        out.append(b": ")
        out.append(_check_value(value, "header value"))
        out.append(b"\r\n")


def write_request_head(method: bytes, target: bytes, headers) -> bytes:
    """``METHOD target HTTP/1.1`` CRLF, ``Name: value`` CRLF per header, CRLF.
    Raises ValueError on an invalid method token, a target with SP/CTL, an invalid header
    name, or CR/LF/NUL/CTL in a value."""
    out = [_check_token(method, "method"), b" "]
    target = bytes(target)
    if not target or _BAD_TARGET_RE.search(target):
        raise ValueError(f"invalid request target: {target!r}")
    out.append(target)
    out.append(b" HTTP/1.1\r\n")
    _write_fields(out, headers)
    out.append(b"\r\n")
    return b"".join(out)


def _status_line(status, reason) -> bytes:
    if not isinstance(status, int) or not 100 <= status <= 999:
        raise ValueError(f"invalid status: {status!r}")
    return b"HTTP/1.1 %d %s\r\n" % (status, _check_value(reason, "reason phrase"))


def write_response_head(status: int, reason: bytes, headers) -> bytes:
    """``HTTP/1.1 status reason`` CRLF, fields, CRLF. Raises ValueError like
    ``write_request_head`` and for a status outside 100-999."""
    out = [_status_line(status, reason)]
    _write_fields(out, headers)
    out.append(b"\r\n")
    return b"".join(out)


def encode_chunk(data) -> bytes:
    """One chunk: hex size CRLF data CRLF. Raises ValueError for empty data (use
    LAST_CHUNK)."""
    data = bytes(data)
    if not data:
        raise ValueError("empty chunk: use LAST_CHUNK")
    return b"%x\r\n%s\r\n" % (len(data), data)


def _connection_tokens(headers) -> set:
    tokens = set()
    for n, v in headers:
        if len(n) == 10 and n.lower() == b"connection":
            for tok in v.split(b","):
                tok = tok.strip(b" \t").lower()
                if tok:
                    tokens.add(tok)
    return tokens


def _proxy_fields(out: list, head, keep_upgrade: bool, drop, extra) -> None:
    headers = head.headers
    tokens = _connection_tokens(headers)
    for n, v in headers:
        ln = n.lower()
        if ln == b"upgrade" and keep_upgrade:
            pass
        elif ln in _HOP_BY_HOP or ln in tokens or ln in drop:
            continue
        out.append(n)
        out.append(b": ")
        out.append(v)
        out.append(b"\r\n")
    if extra:
        _write_fields(out, extra)
    out.append(b"\r\n")


def proxy_request_head(head: RequestHead, target: bytes, drop, extra) -> bytes:
    """The upstream request head for ``head``: ``METHOD target HTTP/1.1``, then head.headers
    minus hop-by-hop fields, fields named by Connection, Content-Length and names in ``drop``
    (lowercase); Upgrade is kept when ``head.upgrade``; then ``extra`` (validated). Raises
    ValueError for an invalid target or extra field."""
    target = bytes(target)
    if not target or _BAD_TARGET_RE.search(target):
        raise ValueError(f"invalid request target: {target!r}")
    out = [head.method, b" ", target, b" HTTP/1.1\r\n"]
    _proxy_fields(out, head, head.upgrade, drop, extra)
    return b"".join(out)


def proxy_response_head(head: ResponseHead, drop, extra) -> bytes:
    """The downstream response head for ``head``: ``HTTP/1.1 status reason``, fields as in
    ``proxy_request_head``; Upgrade is kept for 101."""
    out = [_status_line(head.status, head.reason)]
    _proxy_fields(out, head, head.status == 101, drop, extra)
    return b"".join(out)
