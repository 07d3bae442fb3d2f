"""Micro-benchmark: decode a chunked request body (16 chunks of 1 KiB with extensions and a
trailer) and encode chunks, compiled twin vs pure twin. Run: pytest perf/micro --benchmark-only"""

from __future__ import annotations

import importlib

import pytest

IMPLS = ("dispa._hotpath", "dispa.protocols.http1._pure")

HEAD = b"POST /upload HTTP/1.1\r\nHost: example.com\r\nTransfer-Encoding: chunked\r\n\r\n"
CHUNK = b"x" * 1024
BODY = b"".join(b"400;n=%d\r\n" % i + CHUNK + b"\r\n" for i in range(16)) + b"0\r\nX-Sum: 1\r\n\r\n"


@pytest.fixture(params=IMPLS, ids=("hotpath", "pure"))
def impl(request):
    return importlib.import_module(request.param)


def test_bench_chunked_decode(benchmark, impl):
    parser = impl.RequestParser()
    feed, next_event, take = parser.feed, parser.next_event, parser.take_data
    data_ev, end_ev = impl.DATA, impl.END

    def parse():
        feed(HEAD)
        next_event()  # HEAD
        feed(BODY)
        n = 0
        while True:
            ev = next_event()
            if ev == data_ev:
                n += len(take())
            elif ev == end_ev:
                return n

    assert benchmark(parse) == 16 * 1024


def test_bench_chunk_encode(benchmark, impl):
    encode = impl.encode_chunk
    benchmark(lambda: encode(CHUNK))
    assert encode(b"abc") == b"3\r\nabc\r\n"
