"""Micro-benchmark: parse one request head (~640 B, Chrome 124 navigation) and one response
head, compiled twin vs pure twin. Run: pytest perf/micro --benchmark-only"""

from __future__ import annotations

import importlib

import pytest

IMPLS = ("dispa._hotpath", "dispa.protocols.http1._pure")

CHROME_GET = (
    b"GET /wiki/Special:Search?search=python&go=Go HTTP/1.1\r\n"
    b"Host: en.wikipedia.org\r\n"
    b"Connection: keep-alive\r\n"
    b'sec-ch-ua: "Chromium";v="124", "Google Chrome";v="124", "Not-A.Brand";v="99"\r\n'
    b"sec-ch-ua-mobile: ?0\r\n"
    b'sec-ch-ua-platform: "Linux"\r\n'
    b"Upgrade-Insecure-Requests: 1\r\n"
    b"User-Agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
    b"Chrome/124.0.0.0 Safari/537.36\r\n"
    b"Accept: text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,"
    b"*/*;q=0.8\r\n"
    b"Sec-Fetch-Site: none\r\n"
    b"Sec-Fetch-Mode: navigate\r\n"
    b"Sec-Fetch-User: ?1\r\n"
    b"Sec-Fetch-Dest: document\r\n"
    b"Accept-Encoding: gzip, deflate, br, zstd\r\n"
    b"Accept-Language: en-US,en;q=0.9\r\n"
    b"\r\n"
)

NGINX_200 = (
    b"HTTP/1.1 200 OK\r\n"
    b"Server: nginx/1.24.0\r\n"
    b"Date: Mon, 06 May 2024 10:00:00 GMT\r\n"
    b"Content-Type: text/html; charset=utf-8\r\n"
    b"Content-Length: 0\r\n"
    b"Connection: keep-alive\r\n"
    b"Cache-Control: private, max-age=0\r\n"
    b'ETag: "6638a9c0-2b3"\r\n'
    b"Vary: Accept-Encoding\r\n"
    b"\r\n"
)


@pytest.fixture(params=IMPLS, ids=("hotpath", "pure"))
def impl(request):
    return importlib.import_module(request.param)


def test_bench_parse_request_head(benchmark, impl):
    parser = impl.RequestParser()
    feed, next_event = parser.feed, parser.next_event

    def parse():
        feed(CHROME_GET)
        next_event()   # HEAD
        next_event()   # END

    benchmark(parse)
    assert parser.head.method == b"GET" and len(parser.head.headers) == 14


def test_bench_parse_response_head(benchmark, impl):
    parser = impl.ResponseParser()
    feed, next_event = parser.feed, parser.next_event

    def parse():
        feed(NGINX_200)
        next_event()
        next_event()

    benchmark(parse)
    assert parser.head.status == 200
