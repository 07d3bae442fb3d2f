"""Helpers shared by the HTTP/1.1 tests: run a parser over input and normalise its events.

``run()`` returns a list of plain tuples that compare equal across twins and across input
splits: consecutive DATA events are merged (how body bytes are grouped into DATA events is
not part of the contract), a head becomes a dict.
"""

from __future__ import annotations

from dispa.protocols.http1.errors import ProtocolError

MAX_EVENTS = 10_000


def head_dict(head) -> dict:
    d = {
        "version": head.version,
        "headers": [[n.decode("latin-1"), v.decode("latin-1")] for n, v in head.headers],
        "content_length": head.content_length,
        "chunked": head.chunked,
        "keep_alive": head.keep_alive,
        "upgrade": head.upgrade,
    }
    if hasattr(head, "method"):
        d["method"] = head.method.decode("latin-1")
        d["target"] = head.target.decode("latin-1")
        d["expect_continue"] = head.expect_continue
    else:
        d["status"] = head.status
        d["reason"] = head.reason.decode("latin-1")
    return d


def _drain(mod, parser, out: list) -> bool:
    """Pull events until NEED_DATA; return False when the parser is finished."""
    for _ in range(MAX_EVENTS):
        try:
            ev = parser.next_event()
        except ProtocolError as exc:
            out.append(("error", exc.status_hint, exc.message))
            return False
        if ev == mod.NEED_DATA:
            return True
        if ev == mod.HEAD:
            out.append(("head", head_dict(parser.head)))
        elif ev == mod.DATA:
            data = parser.take_data()
            assert data, "DATA event with no bytes"
            if out and out[-1][0] == "data":
                out[-1] = ("data", out[-1][1] + data)
            else:
                out.append(("data", data))
        elif ev == mod.END:
            tr = parser.trailers
            out.append(("end", None if tr is None else [[n.decode("latin-1"), v.decode("latin-1")]
                                                        for n, v in tr]))
        elif ev == mod.UPGRADE:
            out.append(("upgrade", parser.take_rest()))
            return False
        else:  # pragma: no cover
            raise AssertionError(f"unknown event {ev!r}")
    raise AssertionError("parser made no progress")


def run(mod, wire: bytes, *, response: bool = False, method: bytes | None = None,
        split: int | None = None, cuts=(), eof: bool = True, **limits) -> list:
    """Parse ``wire`` with ``mod``'s parser; ``split=1`` feeds byte by byte, ``split=k`` in
    k-byte pieces, ``cuts=[i, j]`` in pieces cut at those offsets, by default all at once.
    Returns normalised events (see module docstring)."""
    parser = (mod.ResponseParser if response else mod.RequestParser)(**limits)
    if method is not None:
        parser.expect(method)
    out: list = []
    if split:
        pieces = [wire[i:i + split] for i in range(0, len(wire), split)]
    else:
        bounds = [0, *cuts, len(wire)]
        pieces = [wire[a:b] for a, b in zip(bounds, bounds[1:])]
    for k, piece in enumerate(pieces):
        parser.feed(piece)
        if not _drain(mod, parser, out):
            if out and out[-1][0] == "upgrade":   # the rest of the input is tunnel bytes
                out[-1] = ("upgrade", out[-1][1] + b"".join(pieces[k + 1:]))
            return out
    if eof:
        parser.feed_eof()
        if _drain(mod, parser, out):
            out.append(("eof",))
    return out


def first_error(events: list):
    for ev in events:
        if ev[0] == "error":
            return ev
    return None
