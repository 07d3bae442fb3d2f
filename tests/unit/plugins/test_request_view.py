"""The filter API's Request view made by the proxy (Request._of_head): fields a hook never
reads are never built, and a hook's changes are seen whatever it read first."""

from __future__ import annotations

from dispa.plugins.api import Request


class Head:
    headers = [(b"Host", b"example.com"), (b"Accept", b"*/*")]
    version = 11
    content_length = -1
    chunked = False


def view(target: bytes = b"/a/b?x=1") -> Request:
    return Request._of_head("GET", Head, target, "example.com", "10.0.0.7", b"rid-1")


def test_an_unread_request_is_untouched_and_never_split():
    req = view()
    assert req.untouched()
    assert not req._lz & 1  # the target was never decoded
    assert req.route is None and req.cluster == "" and req.scheme == "http"


def test_reading_splits_the_target_once():
    req = view()
    assert (req.path, req.query, req.original_target) == ("/a/b", "x=1", "/a/b?x=1")
    assert req.untouched() and not req.target_changed()


def test_a_path_written_before_it_was_read_is_kept_and_seen():
    req = view()
    req.path = "/rewritten"
    assert req.path == "/rewritten"
    assert req.query == "x=1"
    assert req.original_target == "/a/b?x=1"
    assert not req.untouched() and req.target_changed()
    assert req.target == "/rewritten?x=1"


def test_a_query_written_before_it_was_read_is_kept_and_seen():
    req = view(b"/p")
    req.query = "y=2"
    assert (req.path, req.query) == ("/p", "y=2")
    assert req.target_changed() and req.target == "/p?y=2"


def test_writing_the_same_value_back_is_not_a_change():
    req = view()
    req.path = req.path
    assert not req.target_changed()


def test_a_header_write_is_a_change():
    req = view()
    req.headers.set("x-added", "1")
    assert not req.untouched()
    assert not req.target_changed()


def test_the_direct_constructor_behaves_the_same():
    req = Request("POST", "/x?q=1", headers=None)
    assert (req.path, req.query) == ("/x", "q=1")
    req.path = "/y"
    assert req.target_changed() and req.target == "/y?q=1"
