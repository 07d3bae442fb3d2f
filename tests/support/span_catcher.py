"""A stand-in for tracing_export.SpanBatcher that keeps what a TracingSink queues, so unit
tests read the spans without an exporter or its thread."""

from __future__ import annotations


class Caught:
    """Keeps the spans put (``put``) and builds deferred ones at once (``put_deferred``,
    checking the count the sink announced)."""

    def __init__(self):
        self.spans = []
        self.exported = self.failed = self.dropped = 0

    def put(self, spans):
        self.spans.extend(spans)

    def put_deferred(self, build, args, n):
        spans = build(*args)
        assert len(spans) == n
        self.spans.extend(spans)

    def flush(self, timeout=None):
        return True

    def close(self, timeout=0.0):
        pass
