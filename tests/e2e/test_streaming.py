"""1 GiB up and down through Dispa with backpressure: the worker's memory stays flat."""

from __future__ import annotations

import http.client
import threading
import time

import pytest

GIB = 1 << 30
pytestmark = pytest.mark.slow


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


class PeakRSS(threading.Thread):
    def __init__(self, pid):
        super().__init__(daemon=True)
        self.pid, self.peak, self.stop_flag = pid, 0, False

    def run(self):
        while not self.stop_flag:
            self.peak = max(self.peak, _rss_kib(self.pid))
            time.sleep(0.02)


@pytest.fixture
def proxy(dispa, origin):
    return dispa(targets=[("a", origin.url)], workers="1", wait_workers=1)


def test_a_1gib_download_streams_in_constant_memory(proxy):
    pid = proxy.status()["workers"][0]["pid"]
    base = _rss_kib(pid)
    mon = PeakRSS(pid)
    mon.start()
    c = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=60)
    c.request("GET", f"/bytes?n={GIB}", headers={"Host": "example.com"})
    r = c.getresponse()
    got = 0
    while True:
        chunk = r.read(1 << 20)
        if not chunk:
            break
        got += len(chunk)
    c.close()
    mon.stop_flag = True
    mon.join()
    assert got == GIB
    assert (mon.peak - base) < 20 * 1024, f"RSS grew by {(mon.peak - base) / 1024:.1f} MB"


def test_a_1gib_upload_streams_in_constant_memory(proxy):
    pid = proxy.status()["workers"][0]["pid"]
    base = _rss_kib(pid)
    mon = PeakRSS(pid)
    mon.start()
    block = b"u" * (1 << 20)

    def body():
        for _ in range(GIB // len(block)):
            yield block

    c = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=60)
    c.request("POST", "/sink", body=body(),
              headers={"Host": "example.com", "Content-Length": str(GIB)})
    r = c.getresponse()
    assert r.status == 200 and int(r.read()) == GIB
    c.close()
    mon.stop_flag = True
    mon.join()
    assert (mon.peak - base) < 20 * 1024, f"RSS grew by {(mon.peak - base) / 1024:.1f} MB"
