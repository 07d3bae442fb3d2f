"""A stand-in for tracing_export.SpanBatcher that keeps what a TracingSink queues, so unit
tests read the spans without an exporter or its thread."""

from __future__ import annotations

import collections


class Caught:
    """Keeps what is queued: spans put (``put``) and deferred entries (``put_deferred``,
    or the compiled Session's C twin of ``TracingSink.put_started``, which appends to
    ``queue`` as it would to a SpanBatcher's). ``spans`` builds the deferred ones on first
    read, checking the count each entry announced."""

    def __init__(self):
        self.queue: collections.deque = collections.deque()  # (build, args, n)
        self.max_queue_size = 1 << 30
        self.max_batch = 1 << 30
        self._spans: list = []
        self.exported = self.failed = self.dropped = 0

    def put(self, spans):
        self._build()
        self._spans.extend(spans)

    def put_deferred(self, build, args, n):
        self.queue.append((build, args, n))

    def kick(self):
        pass

    def _build(self):
        while self.queue:
            build, args, n = self.queue.popleft()
            spans = build(*args)
            assert len(spans) == n
            self._spans.extend(spans)

    @property
    def spans(self) -> list:
        self._build()
        return self._spans

    def flush(self, timeout=None):
        return True

    def close(self, timeout=0.0):
        pass
