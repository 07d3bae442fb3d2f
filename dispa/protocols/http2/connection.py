"""The ``h2`` connection Dispa's HTTP/2 cores use: ``H2Connection`` with two per-frame and
per-stream costs taken out, same behaviour.

``h2`` stays the framing and the RFC 9113 state machines (ARCHITECTURE §5); this subclass
only replaces two private helpers that Dispa's traffic calls all the time
(docs/http2.md#measured):

- ``_receive_frame`` formats ``repr(frame)`` for a trace log line before anything else, for
  every frame received, even with h2's ``DummyLogger`` (about 3 % of the instructions of a
  small proxied request); the override is h2's body without that line.
- ``_open_streams`` runs for every new stream and every SETTINGS change over *all* the
  connection's streams, through two properties per stream; the override reads the state
  once, with the same count and the same clean-up of closed streams.

Both are copies of private methods of one ``h2`` release, so they apply only to the
release they were copied from (:data:`OVERRIDDEN_FOR`); with any other ``h2`` version
:data:`Connection` is ``H2Connection`` itself. tests/unit/protocols/test_h2_connection.py
checks the two against ``h2``'s own methods.
"""

from __future__ import annotations

import h2
import h2.connection
import h2.stream
from h2.errors import ErrorCodes
from h2.exceptions import StreamClosedError, StreamIDTooLowError
from hyperframe.frame import RstStreamFrame

__all__ = ["Connection", "OVERRIDDEN_FOR", "OVERRIDDEN"]

#: the h2 release whose private methods the overrides copy
OVERRIDDEN_FOR = "4.4.1"

_STREAM_OPEN = h2.stream.STREAM_OPEN
_CLOSED = h2.stream.StreamState.CLOSED


class _Connection(h2.connection.H2Connection):
    """``H2Connection`` without the eager frame ``repr`` and with a cheaper stream count."""

    def _receive_frame(self, frame):
        # h2 4.4.1's H2Connection._receive_frame without its first line,
        # ``self.config.logger.trace("Received frame: %s", repr(frame))``
        try:
            frames, events = self._frame_dispatch_table[frame.__class__](frame)
        except StreamClosedError as e:
            # closed by RST_STREAM: answer RST_STREAM; otherwise a connection error
            if self._stream_is_closed_by_reset(e.stream_id):
                f = RstStreamFrame(e.stream_id)
                f.error_code = e.error_code
                self._prepare_for_sending([f])
                events = e._events
            else:
                raise
        except StreamIDTooLowError as e:
            if self._stream_is_closed_by_reset(e.stream_id):
                f = RstStreamFrame(e.stream_id)
                f.error_code = ErrorCodes.STREAM_CLOSED
                self._prepare_for_sending([f])
                events = []
            elif self._stream_is_closed_by_end(e.stream_id):
                raise StreamClosedError(e.stream_id) from e
            else:
                raise
        else:
            self._prepare_for_sending(frames)
        return events

    def _open_streams(self, remainder: int) -> int:
        # h2's: the open streams with (id % 2) == remainder, deleting closed ones as it goes
        count = 0
        to_delete = None
        for stream_id, stream in self.streams.items():
            state = stream.state_machine.state
            if _STREAM_OPEN[state] and stream_id % 2 == remainder:
                count += 1
            elif state == _CLOSED:
                if to_delete is None:
                    to_delete = [stream_id]
                else:
                    to_delete.append(stream_id)
        if to_delete is not None:
            streams = self.streams
            closed = self._closed_streams
            for stream_id in to_delete:
                closed[stream_id] = streams.pop(stream_id).closed_by
        return count


#: whether this h2 is the release the overrides were copied from
OVERRIDDEN = getattr(h2, "__version__", None) == OVERRIDDEN_FOR

#: the connection class for Dispa's HTTP/2 cores
Connection = _Connection if OVERRIDDEN else h2.connection.H2Connection
