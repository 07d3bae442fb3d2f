"""The Kubernetes API double (tests/support/k8s_double.py) against the documented list/watch
semantics (kubernetes.io/docs/reference/using-api/api-concepts), with a plain blocking
client: if the double drifts from the API, the provider tests prove nothing."""

from __future__ import annotations

import http.client
import json
import socket
import time
import urllib.parse

import pytest

from tests.support.k8s_double import (
    K8sDouble, LabelSelector, config_map, endpoint_slice, endpoints_object, service,
)

TOKEN = "test-token"
SLICES = "/apis/discovery.k8s.io/v1/namespaces/default/endpointslices"


@pytest.fixture
def api():
    d = K8sDouble(token=TOKEN, bookmark_interval=0.2).start()
    yield d
    d.close()


def _url(path: str, **query) -> str:
    return path + ("?" + urllib.parse.urlencode(query) if query else "")


def get(api: K8sDouble, path: str, token: str | None = TOKEN, **query) -> tuple[int, dict]:
    c = http.client.HTTPConnection("127.0.0.1", api.port, timeout=5)
    try:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        c.request("GET", _url(path, **query), headers=headers)
        r = c.getresponse()
        return r.status, json.loads(r.read())
    finally:
        c.close()


class Watch:
    """A blocking watch stream reader: ``next()`` returns one decoded event."""

    def __init__(self, api: K8sDouble, path: str, **query):
        self.conn = http.client.HTTPConnection("127.0.0.1", api.port, timeout=5)
        self.conn.request("GET", _url(path, watch="1", **query),
                          headers={"Authorization": f"Bearer {TOKEN}"})
        self.resp = self.conn.getresponse()
        self.status = self.resp.status
        assert self.resp.getheader("Transfer-Encoding") == "chunked" or self.status != 200

    def next(self) -> dict:
        line = self.resp.readline()
        if not line:
            raise EOFError
        return json.loads(line)

    def next_not_bookmark(self) -> dict:
        for _ in range(100):
            ev = self.next()
            if ev["type"] != "BOOKMARK":
                return ev
        raise AssertionError("only bookmarks")

    def close(self):
        self.conn.close()


def _slice(name: str, svc: str = "api", addrs=("10.0.0.1",), **kw) -> dict:
    return endpoint_slice("default", svc, name, list(addrs), **kw)


def test_list_carries_the_global_resource_version_and_items_their_own(api):
    a = api.create(_slice("a"))
    api.create(config_map("default", "cfg", {"k": "v"}))  # another kind: same counter
    b = api.create(_slice("b"))
    assert (a["metadata"]["resourceVersion"], b["metadata"]["resourceVersion"]) == ("1", "3")
    code, body = get(api, SLICES)
    assert code == 200
    assert body["kind"] == "EndpointSliceList"
    assert body["apiVersion"] == "discovery.k8s.io/v1"
    assert body["metadata"]["resourceVersion"] == "3"
    assert [i["metadata"]["name"] for i in body["items"]] == ["a", "b"]
    updated = api.update(_slice("a", addrs=("10.0.0.9",)))
    assert updated["metadata"]["resourceVersion"] == "4"
    assert updated["metadata"]["uid"] == a["metadata"]["uid"]


def test_get_one_object_and_404_status_for_a_missing_one(api):
    api.create(service("default", "api", [("http", 80, 8080)]))
    code, body = get(api, "/api/v1/namespaces/default/services/api")
    assert code == 200 and body["spec"]["ports"][0]["targetPort"] == 8080
    code, body = get(api, "/api/v1/namespaces/default/services/nope")
    assert code == 404
    assert body["kind"] == "Status" and body["reason"] == "NotFound" and body["code"] == 404


def test_create_update_delete_refuse_the_wrong_state(api):
    api.create(_slice("a"))
    with pytest.raises(KeyError):
        api.create(_slice("a"))
    with pytest.raises(KeyError):
        api.update(_slice("zz"))
    with pytest.raises(KeyError):
        api.delete("EndpointSlice", "default", "zz")


@pytest.mark.parametrize("selector, names", [
    ("kubernetes.io/service-name=api", ["a", "b"]),
    ("kubernetes.io/service-name==web", ["c"]),
    ("kubernetes.io/service-name!=api", ["c"]),
    ("kubernetes.io/service-name in (web, api),tier=gold", ["b"]),
    ("kubernetes.io/service-name notin (web)", ["a", "b"]),
    ("tier", ["b", "c"]),
    ("!tier", ["a"]),
])
def test_label_selectors_filter_lists(api, selector, names):
    api.create(_slice("a"))
    api.create(_slice("b", labels={"tier": "gold"}))
    api.create(_slice("c", svc="web", labels={"tier": "silver"}))
    code, body = get(api, SLICES, labelSelector=selector)
    assert code == 200
    assert [i["metadata"]["name"] for i in body["items"]] == names


def test_a_bad_selector_is_a_400_status(api):
    code, body = get(api, SLICES, labelSelector="a in b")
    assert code == 400 and body["reason"] == "BadRequest"
    with pytest.raises(ValueError):
        LabelSelector("x in (")


def test_field_selector_and_namespaces(api):
    api.create(endpoints_object("default", "api", ["10.0.0.1"]))
    api.create(endpoints_object("default", "web", ["10.0.0.2"]))
    api.create(endpoints_object("other", "api", ["10.0.0.3"]))
    code, body = get(api, "/api/v1/namespaces/default/endpoints",
                     fieldSelector="metadata.name=api")
    assert [i["subsets"][0]["addresses"][0]["ip"] for i in body["items"]] == ["10.0.0.1"]
    code, body = get(api, "/api/v1/endpoints", fieldSelector="metadata.name=api")
    assert sorted(i["metadata"]["namespace"] for i in body["items"]) == ["default", "other"]


def test_pages_come_from_one_snapshot_and_an_old_continue_token_is_gone(api):
    for n in range(5):
        api.create(_slice(f"s{n}"))
    code, page = get(api, SLICES, limit="2")
    assert len(page["items"]) == 2 and page["metadata"]["remainingItemCount"] == 3
    api.create(_slice("s9"))  # after the first page: not in this list
    names = [i["metadata"]["name"] for i in page["items"]]
    token = page["metadata"]["continue"]
    while token:
        code, page = get(api, SLICES, limit="2", **{"continue": token})
        assert code == 200 and page["metadata"]["resourceVersion"] == "5"
        names += [i["metadata"]["name"] for i in page["items"]]
        token = page["metadata"].get("continue")
    assert names == ["s0", "s1", "s2", "s3", "s4"]
    code, page = get(api, SLICES, limit="2")
    api.compact()
    code, body = get(api, SLICES, limit="2", **{"continue": page["metadata"]["continue"]})
    assert code == 410 and body["reason"] == "Expired"


def test_watch_replays_every_event_after_the_resource_version_then_streams_live(api):
    api.create(_slice("a"))  # rv 1
    api.update(_slice("a", addrs=("10.0.0.2",)))  # rv 2
    api.create(_slice("b"))  # rv 3
    w = Watch(api, SLICES, resourceVersion="1")
    try:
        assert w.status == 200
        evs = [w.next() for _ in range(2)]
        assert [(e["type"], e["object"]["metadata"]["name"],
                 e["object"]["metadata"]["resourceVersion"]) for e in evs] == [
            ("MODIFIED", "a", "2"), ("ADDED", "b", "3")]
        api.delete("EndpointSlice", "default", "a")  # rv 4
        ev = w.next()
        # a DELETED event carries the object as of its deletion
        assert (ev["type"], ev["object"]["metadata"]["resourceVersion"]) == ("DELETED", "4")
        assert ev["object"]["endpoints"][0]["addresses"] == ["10.0.0.2"]
    finally:
        w.close()


def test_watch_without_a_resource_version_starts_with_the_current_state(api):
    api.create(_slice("a"))
    api.create(_slice("b"))
    api.delete("EndpointSlice", "default", "a")
    w = Watch(api, SLICES)
    try:
        ev = w.next()
        assert (ev["type"], ev["object"]["metadata"]["name"]) == ("ADDED", "b")
        api.create(_slice("c"))
        assert w.next()["object"]["metadata"]["name"] == "c"
    finally:
        w.close()


def test_an_object_leaving_or_entering_the_selector_is_deleted_or_added(api):
    api.create(_slice("a"))
    w = Watch(api, SLICES, resourceVersion="1", labelSelector="tier=gold")
    try:
        api.update(_slice("a", labels={"tier": "gold"}))
        api.update(_slice("a", labels={"tier": "gold", "x": "y"}))
        api.update(_slice("a"))
        assert [w.next()["type"] for _ in range(3)] == ["ADDED", "MODIFIED", "DELETED"]
    finally:
        w.close()


def test_bookmarks_only_when_asked_and_they_carry_the_current_version(api):
    api.create(_slice("a"))
    api.create(_slice("other", svc="web"))  # rv 2: not in the watched selection
    w = Watch(api, SLICES, resourceVersion="2", allowWatchBookmarks="true",
              labelSelector="kubernetes.io/service-name=api")
    try:
        ev = w.next()
        assert ev["type"] == "BOOKMARK"
        assert ev["object"]["kind"] == "EndpointSlice"
        assert ev["object"]["metadata"] == {"resourceVersion": "2"}
    finally:
        w.close()
    w = Watch(api, SLICES, resourceVersion="2", timeoutSeconds="1")
    try:
        t0 = time.monotonic()
        with pytest.raises(EOFError):  # no bookmark: the stream stays silent until timeout
            w.next()
        assert time.monotonic() - t0 >= 0.9
    finally:
        w.close()


def test_a_compacted_resource_version_gets_an_error_event_with_status_410(api):
    api.create(_slice("a"))
    api.create(_slice("b"))
    api.compact()
    w = Watch(api, SLICES, resourceVersion="1")
    try:
        assert w.status == 200
        ev = w.next()
        assert ev["type"] == "ERROR"
        assert ev["object"]["kind"] == "Status" and ev["object"]["code"] == 410
        assert ev["object"]["reason"] == "Expired"
        with pytest.raises(EOFError):
            w.next()
    finally:
        w.close()
    w = Watch(api, SLICES, resourceVersion="2")  # at the compaction point: still fine
    try:
        api.create(_slice("c"))
        assert w.next()["object"]["metadata"]["name"] == "c"
    finally:
        w.close()
    api.gone_as_http = True
    code, body = get(api, SLICES, watch="1", resourceVersion="1")
    assert code == 410 and body["code"] == 410


def test_requests_need_the_bearer_token(api):
    code, body = get(api, SLICES, token=None)
    assert code == 401 and body["reason"] == "Unauthorized"
    assert get(api, SLICES, token="wrong")[0] == 401
    assert get(api, SLICES)[0] == 200


def test_the_discovery_api_can_be_switched_off_for_the_endpoints_fallback(api):
    api.create(endpoints_object("default", "api", ["10.0.0.1"]))
    assert get(api, "/apis/discovery.k8s.io/v1")[0] == 200
    api.discovery_api = False
    code, body = get(api, SLICES)
    assert code == 404 and body["reason"] == "NotFound"
    assert get(api, "/apis/discovery.k8s.io/v1")[0] == 404
    assert get(api, SLICES, watch="1")[0] == 404
    assert get(api, "/api/v1/namespaces/default/endpoints/api")[0] == 200


def test_drop_watches_cuts_streams_and_stop_start_keeps_port_and_store(api):
    api.create(_slice("a"))
    w = Watch(api, SLICES, resourceVersion="1")
    time_limit = time.monotonic() + 5
    while api.open_watches() == 0 and time.monotonic() < time_limit:
        time.sleep(0.02)
    assert api.drop_watches() == 1
    with pytest.raises((EOFError, http.client.IncompleteRead, ConnectionError)):
        w.next()
    w.close()
    port = api.port
    api.stop()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    api.start()
    assert api.port == port
    code, body = get(api, SLICES)
    assert [i["metadata"]["name"] for i in body["items"]] == ["a"]
