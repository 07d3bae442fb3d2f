"""The dispa-server runtime: workers, respawn, reload, graceful shutdown, bad input.

Every test runs a real dispa-server process in front of real origins on 127.0.0.1.
"""

from __future__ import annotations

import concurrent.futures
import http.client
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from tests.support.dispa_proc import ROOT, free_port, http_get, render_config, wait_for

SHARED = ROOT.parent / "shared"
COMPAT = SHARED / "compat" / "config.example.toml"


def _children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True)
    return [int(x) for x in out.stdout.split()]


_wait = wait_for


class Load:
    """A bounded keep-alive load: ``threads`` clients, each sending ``per_thread`` requests."""

    def __init__(self, port: int, threads: int = 4, per_thread: int = 600, path: str = "/"):
        self.port, self.threads, self.per_thread, self.path = port, threads, per_thread, path
        self.ok = 0
        self.failures: list[str] = []
        self.bodies: list[bytes] = []
        self._lock = threading.Lock()
        self._pool = concurrent.futures.ThreadPoolExecutor(threads)
        self._futs = []

    def _run(self):
        conn = None
        for _ in range(self.per_thread):
            try:
                if conn is None:
                    conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
                conn.request("GET", self.path, headers={"Host": "example.com"})
                r = conn.getresponse()
                body = r.read()
                with self._lock:
                    if r.status == 200:
                        self.ok += 1
                        self.bodies.append(body)
                    else:
                        self.failures.append(f"status {r.status}: {body[:80]!r}")
                if r.getheader("connection", "").lower() == "close":
                    conn.close()
                    conn = None
            except (OSError, http.client.HTTPException) as exc:
                with self._lock:
                    self.failures.append(repr(exc))
                if conn is not None:
                    conn.close()
                conn = None
        if conn is not None:
            conn.close()

    def start(self) -> "Load":
        self._futs = [self._pool.submit(self._run) for _ in range(self.threads)]
        return self

    def done(self) -> int:
        return self.ok + len(self.failures)

    def join(self, timeout=120):
        for f in self._futs:
            f.result(timeout)
        self._pool.shutdown()


def test_worker_count_matches_the_workers_flag(dispa, origin):
    d = dispa(targets=[("a", origin.url)], workers="2", wait_workers=2)
    st = d.status()
    pids = {w["pid"] for w in st["workers"]}
    assert len(st["workers"]) == 2 and len(pids) == 2
    assert set(_children(d.proc.pid)) == pids
    assert http_get(d.port)[0] == 200


def test_workers_auto_uses_the_usable_cpus(dispa, origin):
    d = dispa(targets=[("a", origin.url)], workers="auto")
    n = len(os.sched_getaffinity(0))
    _wait(lambda: len([w for w in d.status()["workers"] if w["state"] == "ready"]) == n,
          what=f"{n} workers")


def test_each_worker_has_its_own_reuseport_listener_and_serves(dispa, origin):
    d = dispa(targets=[("a", origin.url)], workers="2", wait_workers=2)
    # /proc/<pid>/fd of each worker holds a listening socket on the port
    for w in d.status()["workers"]:
        out = subprocess.run(["ss", "-Hltnp", f"sport = :{d.port}"], capture_output=True, text=True)
        assert f"pid={w['pid']}" in out.stdout


def test_a_killed_worker_is_replaced_and_traffic_keeps_flowing(dispa, origin):
    d = dispa(targets=[("a", origin.url)], workers="2", wait_workers=2)
    load = Load(d.port, threads=2, per_thread=400).start()
    victim = d.status()["workers"][0]["pid"]
    os.kill(victim, signal.SIGKILL)
    _wait(lambda: [w for w in d.status()["workers"]
                   if w["state"] == "ready" and w["pid"] != victim and w["id"] == 0],
          what="replacement worker")
    load.join()
    st = d.status()
    assert st["workers"][0]["restarts"] == 1
    assert victim not in {w["pid"] for w in st["workers"]}
    # Requests in flight on the killed worker's connections may fail; traffic continues.
    assert load.ok >= 700, load.failures[:5]
    assert http_get(d.port)[0] == 200


def test_crash_looping_workers_make_the_master_exit_non_zero(dispa, origin):
    d = dispa(targets=[("a", origin.url)], workers="1", wait_workers=1)
    for _ in range(6):
        if d.proc.poll() is not None:
            break
        try:
            pid = _wait(lambda: next((w["pid"] for w in d.status()["workers"]
                                      if w["state"] == "ready"), None), timeout=10)
        except (AssertionError, OSError):
            break
        os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)
    assert d.proc.wait(30) == 3
    assert "crash loop" in d.log()


def test_sighup_reload_changes_the_target_with_zero_failed_requests(dispa, origins, tmp_path):
    a, b = origins("origin-a"), origins("origin-b")
    d = dispa(targets=[("t", a.url)], workers="2", wait_workers=2)
    v1 = d.status()["snapshot_version"]
    load = Load(d.port, threads=4, per_thread=600).start()
    _wait(lambda: load.done() > 300, what="load to start")
    d.config_path.write_text(d.config_path.read_text().replace(a.url, b.url))
    d.signal(signal.SIGHUP)
    load.join()
    assert load.failures == []
    assert load.ok == 2400
    bodies = set(load.bodies)
    assert b"ok from origin-b" in bodies and b"ok from origin-a" in bodies
    st = d.status()
    assert st["snapshot_version"] != v1
    assert all(w["snapshot_version"] == st["snapshot_version"] for w in st["workers"])
    assert http_get(d.port)[2] == b"ok from origin-b"


def test_a_changed_config_file_reloads_by_itself(dispa, origins):
    a, b = origins("origin-a"), origins("origin-b")
    d = dispa(targets=[("t", a.url)])
    assert http_get(d.port)[2] == b"ok from origin-a"
    d.config_path.write_text(d.config_path.read_text().replace(a.url, b.url))
    _wait(lambda: http_get(d.port)[2] == b"ok from origin-b", what="file-change reload")
    assert d.status()["reloads"]["ok"] == 1


def test_invalid_config_at_reload_is_refused_and_the_old_one_keeps_serving(dispa, origin):
    d = dispa(targets=[("t", origin.url)])
    good = d.config_path.read_text()
    d.config_path.write_text(good.replace('type = "roundrobin"', 'type = "roundrobbin"'))
    d.signal(signal.SIGHUP)
    st = _wait(lambda: (s := d.status())["reloads"]["failed"] >= 1 and s, what="failed reload")
    assert any("roundrobbin" in e["message"] or "load_balancing" in (e.get("path") or "")
               for e in st["config_errors"]), st["config_errors"]
    assert http_get(d.port)[0] == 200
    assert "config reload refused" in d.log()
    # fixing the file clears the error
    d.config_path.write_text(good + "\n")
    d.signal(signal.SIGHUP)
    _wait(lambda: d.status()["reloads"]["ok"] >= 1 and not d.status()["config_errors"],
          what="good reload")


def test_sigterm_lets_an_in_flight_slow_request_complete(dispa, origin):
    d = dispa(targets=[("t", origin.url)], workers="1", wait_workers=1)
    result = {}

    def slow():
        result["r"] = http_get(d.port, "/delay?ms=1000", timeout=15)

    t = threading.Thread(target=slow)
    t.start()
    _wait(lambda: origin.targets(), what="request to reach the origin")
    t0 = time.monotonic()
    d.signal(signal.SIGTERM)
    t.join(15)
    code = d.proc.wait(15)
    assert result["r"][0] == 200 and result["r"][2] == b"ok from origin-a"
    assert code == 0
    assert time.monotonic() - t0 >= 0.5
    # and nothing listens any more
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", d.port), timeout=1).close()


def test_a_second_signal_exits_immediately(dispa, origin):
    d = dispa(targets=[("t", origin.url)], server_extra="shutdown_timeout = 30")
    def slow():
        try:
            http_get(d.port, "/delay?ms=5000", timeout=15)
        except (OSError, http.client.HTTPException):
            pass  # the immediate exit cuts it off: that is the point

    t = threading.Thread(target=slow)
    t.start()
    _wait(lambda: origin.targets(), what="request to reach the origin")
    d.signal(signal.SIGTERM)
    time.sleep(0.2)
    d.signal(signal.SIGTERM)
    code = d.proc.wait(5)
    assert code != 0
    t.join(10)


def test_listener_change_at_reload_starts_new_workers_before_old_ones_stop(dispa, origin):
    d = dispa(targets=[("t", origin.url)], workers="1", wait_workers=1)
    old_pid = d.status()["workers"][0]["pid"]
    new_port = free_port()
    d.config_path.write_text(d.config_path.read_text().replace(
        f'bind_address = "127.0.0.1:{d.port}"', f'bind_address = "127.0.0.1:{new_port}"'))
    d.signal(signal.SIGHUP)
    _wait(lambda: d.status()["workers"][0]["pid"] != old_pid, what="new generation")
    assert http_get(new_port)[0] == 200
    assert d.status()["reloads"]["last"]["rolling_restart"] is True


def test_compat_example_passes_config_check():
    out = subprocess.run([sys.executable, "-m", "dispa", "config", "check", str(COMPAT)],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "OK" in out.stdout


def test_compat_example_runs_with_targets_pointed_at_loopback(tmp_path, origins):
    backends = [origins(f"o{i}") for i in range(3)]
    text = COMPAT.read_text()
    for ip_port, o in zip(["192.168.1.100:3000", "192.168.1.101:3000", "192.168.1.200:8080"], backends):
        text = text.replace(f"http://{ip_port}", o.url)
    port, mport, hport = free_port(), free_port(), free_port()
    text = text.replace('bind_address = "0.0.0.0:8080"', f'bind_address = "127.0.0.1:{port}"')
    text = text.replace("metrics_port = 9090", f"metrics_port = {mport}")
    text = text.replace("health_check_port = 8081", f"health_check_port = {hport}")
    assert "192.168." not in text.split("# ==================== 高级配置示例")[0]
    # the example's traffic log (type = "both") goes under tmp_path, not the repository
    text = text.replace('url = "sqlite://./data/traffic.db"',
                        f'url = "sqlite://{tmp_path}/data/traffic.db"')
    text = text.replace('directory = "./logs"', f'directory = "{tmp_path}/logs"')
    cfg = tmp_path / "compat.toml"
    cfg.write_text(text)
    from tests.support.dispa_proc import DispaProcess
    d = DispaProcess(cfg, workers="1", port=port, admin_port=hport)
    try:
        d.wait_ready()
        seen = set()
        for _ in range(12):
            status, headers, body = http_get(port, host="api.myapp.com")
            assert status == 200
            seen.add(body)
        assert len(seen) == 3  # weighted over all three loopback targets
        assert http_get(port, host="health.example.com")[0] == 404  # excluded
        assert http_get(port, host="a.test.com")[0] == 200  # wildcard
        code, body = d.admin_get("/metrics")
        assert code == 200
        d.admin_port = mport
        code2, body2 = d.admin_get("/metrics")
        assert code2 == 200 and b"dispa_requests_total" in body2
    finally:
        d.stop()
    # the original traffic log: every request above is a row in SQLite and a file record
    import sqlite3
    db = tmp_path / "data" / "traffic.db"
    rows = sqlite3.connect(db).execute("SELECT COUNT(*) FROM " + _traffic_table(db)).fetchone()[0]
    assert rows == 14  # 12 + the excluded host (404) + the wildcard
    assert sum(len(p.read_bytes().splitlines()) for p in (tmp_path / "logs").iterdir()
               if p.is_file()) == 14


def _traffic_table(db) -> str:
    import sqlite3
    names = [r[0] for r in sqlite3.connect(db).execute(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'")]
    assert len(names) == 1, names
    return names[0]


def test_invalid_config_exits_2_listing_every_error_without_traceback(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[server]\nbind_address = "127.0.0.1:notaport"\nworkerz = 2\n\n'
                   '[[targets.targets]]\nname = "a"\nurl = "ftp://x"\n')
    out = subprocess.run([sys.executable, "-m", "dispa.server", "--config", str(bad)],
                         capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    errors = [l for l in out.stderr.splitlines() if l.startswith("error:")]
    assert len(errors) >= 3, out.stderr
    assert "workerz" in out.stderr and "bind_address" in out.stderr and "url" in out.stderr
    assert re.search(r"bad\.toml:\d+", out.stderr)


def test_port_in_use_is_a_clear_error(tmp_path, origin):
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen()
    port = blocker.getsockname()[1]
    cfg = tmp_path / "c.toml"
    cfg.write_text(render_config(port=port, admin_port=free_port(), targets=[("a", origin.url)]))
    try:
        out = subprocess.run([sys.executable, "-m", "dispa.server", "--config", str(cfg)],
                             capture_output=True, text=True, cwd=ROOT, timeout=30)
    finally:
        blocker.close()
    assert out.returncode == 1
    assert f"127.0.0.1:{port}" in out.stderr and "already in use" in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize("value", ["0", "-3", "many", "1.5", "99999"])
def test_nonsense_workers_value_is_a_clear_error(tmp_path, value):
    out = subprocess.run([sys.executable, "-m", "dispa.server", "--config", str(COMPAT),
                          "--workers", value], capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert out.returncode == 2
    assert "invalid --workers value" in out.stderr
    assert "Traceback" not in out.stderr


def test_demo_mode_serves_a_proxied_response():
    port, admin = free_port(), free_port()
    p = subprocess.Popen([sys.executable, "-m", "dispa.server", "--demo", "--demo-bind",
                          f"127.0.0.1:{port}", "--demo-admin-port", str(admin)],
                         cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        def ok():
            try:
                return http_get(port, "/hello", host=f"127.0.0.1:{port}")
            except OSError:
                return None
        status, headers, body = _wait(ok, what="demo")
        assert status == 200
        assert b"Hello from the Dispa demo upstream" in body
        assert b"GET /hello" in body and b"X-Forwarded-For: 127.0.0.1" in body
    finally:
        p.send_signal(signal.SIGTERM)
        assert p.wait(20) == 0


def test_admin_endpoints_of_the_original(dispa, origin):
    d = dispa(targets=[("backend-1", origin.url)])
    for _ in range(3):
        http_get(d.port, "/x", host="example.com")
    code, body = d.admin_get("/health")
    assert code == 200 and b"healthy" in body
    code, body = d.admin_get("/metrics")
    text = body.decode()
    assert code == 200
    m = re.search(r'dispa_requests_total\{[^}]*domain="example.com"[^}]*method="GET"[^}]*status="200"[^}]*\} (\S+)', text)
    assert m and float(m.group(1)) == 3.0, text[:2000]
    assert "dispa_request_duration_seconds_bucket" in text
    assert re.search(r'dispa_target_health\{[^}]*target="backend-1"[^}]*\} 1', text)
    code, body = d.admin_get("/metrics/json")
    assert code == 200 and b"dispa_requests_total" in body
    st = d.status()
    assert st["workers"][0]["pid"] > 0 and st["snapshot_version"]
    assert st["workers"][0]["snapshot_version"] == st["snapshot_version"]
    code, body = d.admin_get("/admin/config")
    assert code == 200 and origin.url.encode() in body


def test_runtime_log_level_change_reaches_the_workers(dispa, origin):
    d = dispa(targets=[("a", origin.url)])
    c = http.client.HTTPConnection("127.0.0.1", d.admin_port, timeout=5)
    c.request("PUT", "/admin/log-level", body=b'{"level": "debug"}',
              headers={"Content-Type": "application/json"})
    r = c.getresponse()
    assert r.status == 200, r.read()
    r.read()
    c.request("GET", "/admin/log-level")
    assert b"debug" in c.getresponse().read()
    c.close()


def test_an_address_not_on_this_machine_is_a_clear_error(tmp_path, origin):
    cfg = tmp_path / "c.toml"
    # 192.0.2.0/24 is TEST-NET-1: never assigned here. Binding sends no traffic.
    cfg.write_text(render_config(port=8080, admin_port=free_port(), targets=[("a", origin.url)])
                   .replace('"127.0.0.1:8080"', '"192.0.2.1:8080"'))
    out = subprocess.run([sys.executable, "-m", "dispa.server", "--config", str(cfg)],
                         capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert out.returncode == 1
    assert "192.0.2.1:8080" in out.stderr and "not assigned to this machine" in out.stderr


def test_admin_port_in_use_is_a_clear_error(tmp_path, origin):
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen()
    admin = blocker.getsockname()[1]
    cfg = tmp_path / "c.toml"
    cfg.write_text(render_config(port=free_port(), admin_port=admin, targets=[("a", origin.url)]))
    try:
        out = subprocess.run([sys.executable, "-m", "dispa.server", "--config", str(cfg)],
                             capture_output=True, text=True, cwd=ROOT, timeout=30)
    finally:
        blocker.close()
    assert out.returncode == 1
    assert f"127.0.0.1:{admin}" in out.stderr and "Traceback" not in out.stderr


def test_workers_leave_when_the_master_is_killed(dispa, origin):
    d = dispa(targets=[("a", origin.url)], workers="2", wait_workers=2)
    pids = [w["pid"] for w in d.status()["workers"]]
    d.proc.kill()
    d.proc.wait(5)

    def gone():
        return all(not os.path.exists(f"/proc/{p}") or
                   open(f"/proc/{p}/stat").read().split()[2] == "Z" for p in pids)
    _wait(gone, timeout=15, what="orphaned workers to exit")


def test_check_flag_validates_without_starting(tmp_path):
    out = subprocess.run([sys.executable, "-m", "dispa.server", "--config", str(COMPAT), "--check"],
                         capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert out.returncode == 0 and "OK" in out.stdout


def test_config_schema_is_json_schema():
    import json
    out = subprocess.run([sys.executable, "-m", "dispa", "config", "schema"], capture_output=True,
                         text=True, cwd=ROOT, timeout=30)
    schema = json.loads(out.stdout)
    assert schema["$schema"].startswith("https://json-schema.org/")
    assert "Config" in json.dumps(schema["$defs"])
