"""Named limits of the HTTP/1.1 parser, each with the precedent it follows.

The parser takes these as keyword arguments (``RequestParser(max_head_bytes=...)``); the
values here are the defaults. Changing a default is a behaviour change for every listener:
say why in the commit.
"""

# The whole head (request/status line + header lines + the blank line, CRLFs counted) may be
# at most this many bytes; more is 431. h11's DEFAULT_MAX_INCOMPLETE_EVENT_SIZE is 16 KiB;
# nginx allows 4 x 8 KiB (large_client_header_buffers); Node's --max-http-header-size was 80
# KiB, now 16 KiB; Go's net/http DefaultMaxHeaderBytes is 1 MiB. 64 KiB admits big cookie
# jars (the ~8 KiB per-line limit still applies) while bounding memory per connection.
MAX_HEAD_BYTES = 65536

# Header fields per head (and trailer fields per trailer section); more is 431.
# Apache LimitRequestFields defaults to 100; HAProxy tune.http.maxhdr is 101.
MAX_HEADER_COUNT = 100

# One line of the head, *counted with its CRLF*. A longer request line is 414, a longer header
# line 431. nginx's large_client_header_buffers is 8k per line; Apache LimitRequestLine and
# LimitRequestFieldSize are 8190; Tomcat maxHttpHeaderSize 8 KiB.
MAX_LINE_BYTES = 8192

# Bytes of chunk extensions after a chunk size (";name=value..."), counted without the size
# digits and the CRLF; more is 400. Chunk extensions are unused in practice, but unbounded
# ones let a client make the proxy buffer without progress (CVE-2023-44487-style amplification
# is the HTTP/2 cousin). Node's llhttp caps the chunk-extensions size at 16 KiB since
# CVE-2024-22019 ; 1 KiB is plenty for anything real.
MAX_CHUNK_EXT_BYTES = 1024

# Hex digits in a chunk size. 16 digits cover a signed 64-bit size; a value that does not fit
# in 63 bits is rejected too. (h11 allows 20 digits and Python ints; nginx stops at off_t.)
MAX_CHUNK_SIZE_DIGITS = 16

# Decimal digits in Content-Length; 18 always fits in a signed 64-bit integer (1 EB).
MAX_CONTENT_LENGTH_DIGITS = 18

# Empty lines (CRLF) ignored before a request or status line. RFC 9112 §2.2: a server SHOULD
# ignore at least one empty line before the request-line (clients that send CRLF after a POST
# body). nginx and llhttp skip any number; a small bound keeps a CRLF flood from being free.
MAX_LEADING_EMPTY_LINES = 4
