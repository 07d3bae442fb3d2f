"""Filters used by the integration tests (referenced as ``tests.support.filters:Name``)."""

from __future__ import annotations

import asyncio

import msgspec

from dispa.plugins.api import Filter, HTTPError, Response


class Noop(Filter):
    """Overrides on_request and does nothing (the perf gate's "no-op sync filter")."""

    name = "test-noop"

    def on_request(self, req):
        return None


class TagConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    header: str = "x-tag"
    value: str = "1"


class Tag(Filter):
    """Sets a request header and a response header; counts log calls in a header-less way."""

    name = "test-tag"
    Config = TagConfig

    def on_request(self, req):
        req.headers.set(self.config.header, self.config.value)
        req.ctx["tag"] = self.config.value

    def on_response(self, req, resp):
        resp.headers.set(self.config.header, req.ctx.get("tag", "?"))


class AsyncGate(Filter):
    """Async on_request: answers 401 unless the request carries x-token: ok."""

    name = "test-async-gate"

    async def on_request(self, req):
        await asyncio.sleep(0)
        if req.headers.get("x-token") != "ok":
            return Response(401, "no token\n", {"www-authenticate": "Token"})
        return None

    async def on_response(self, req, resp):
        await asyncio.sleep(0)
        resp.headers.set("x-gate", "passed")


class Boom(Filter):
    """Raises in on_request (the error strategy decides)."""

    name = "test-boom"

    def on_request(self, req):
        raise RuntimeError("boom")


class Hang(Filter):
    """An async hook that never returns (bounded by the plugin timeout)."""

    name = "test-hang"

    async def on_request(self, req):
        await asyncio.Event().wait()


class Upper(Filter):
    """Response body hook: upper-cases the body (changes nothing in length, but the proxy
    cannot know that, so it re-frames)."""

    name = "test-upper"
    wants_response_body = True

    def on_response_body(self, req, resp, chunk, end):
        return chunk.upper()


class Replace(Filter):
    """on_response replaces 5xx answers with a friendly page."""

    name = "test-replace"

    def on_response(self, req, resp):
        if resp.status >= 500:
            return Response(503, "friendly error page\n")


class Limit(Filter):
    """Request body hook: refuses bodies over 10 bytes with 413."""

    name = "test-limit"
    wants_request_body = True

    def on_request(self, req):
        req.ctx["n"] = 0

    def on_request_body(self, req, chunk, end):
        req.ctx["n"] += len(chunk)
        if req.ctx["n"] > 10:
            raise HTTPError(413, "body too large")
        return chunk


class Garbage(Filter):
    """Returns something that is neither None nor a Response."""

    name = "test-garbage"

    def on_request(self, req):
        return 42


class Deny(Filter):
    """Answers 403 for targets under /deny (a short-circuit from a sync hook)."""

    name = "test-deny"

    def on_request(self, req):
        if req.path.startswith("/deny"):
            return Response(403, "denied\n")
        return None


class Flaky(Filter):
    """Raises on every third call (the error strategy decides)."""

    name = "test-flaky"

    def __init__(self, config, ctx):
        super().__init__(config, ctx)
        self.calls = 0

    def on_request(self, req):
        self.calls += 1
        if not self.calls % 3:
            raise RuntimeError("flaky")
        return None


class Retarget(Filter):
    """Sets the path named by an ``x-retarget`` header, without reading the target first."""

    name = "test-retarget"

    def on_request(self, req):
        path = req.headers.get("x-retarget")
        if path:
            req.path = path
        return None


class Record(Filter):
    """Keeps every request view it sees (class-level ``seen``; tests clear it)."""

    name = "test-record"
    seen: list = []

    def on_request(self, req):
        Record.seen.append(req)
        return None
