"""Dispa load harness: library shared by ``perf/load/run.py`` and ``ci/perf_gate.py``.

Everything runs on 127.0.0.1 only.  Every load step is bounded both in count
and in wall time (wrk -d, pacer -d plus a fixed drain, subprocess timeouts).

Layout
------
* an nginx BACKEND (own prefix/config under a temp dir) answering ``/`` with a
  64-byte body and ``/4k`` with 4096 bytes, keep-alive on;
* the proxies under test (nginx, HAProxy, Dispa or a stand-in), each with the
  same worker count and keep-alive to the backend;
* load tools: wrk (throughput, CPU/request) and ``pacer`` (C, open-loop
  constant-rate latency and idle-connection holder, built here with gcc).

CPU pinning (``cpu_layout``): proxy on CPUs ``0..W-1`` (W = workers, capped so
that at least one CPU is left), backend + load generators on the rest.  On a
2-core machine: proxy on CPU 0, backend + wrk/pacer on CPU 1.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
TEMPLATES = HERE / "templates"
PACER_SRC = HERE / "pacer" / "pacer.c"

BODY64 = "d" * 63 + "\n"          # 64 bytes
BODY4K = "k" * 4096                # 4096 bytes (served as two 2048-byte halves)

ALL_SCENARIOS = ["ka64", "ka4k", "conn", "lat2k", "mem"]
# Opt-in scenarios (never in the default list):
# "pair64": ka64 against the first proxy of --proxies and each other one *at the same time*,
# both on the proxy CPUs, each with its own wrk. The two share the core and whatever the
# neighbours on this VM do to it in that second, so their cost ratio (CPU µs per request)
# is free of the round-to-round drift that sequential rounds suffer. See _measure_pair.
EXTRA_SCENARIOS = ["pair64"]
KNOWN_PROXIES = ["dispa", "nginx", "haproxy", "dispa-filters", "dispa-tracing-1pct",
                 "dispa-access-log", "dispa-control"]
# "dispa-control": a second Dispa with the very same config as "dispa" (an A/A control: its
# ratio to "dispa" shows how far this machine's noise alone moves a ratio).
# "dispa-tracing-1pct": Dispa with [observability.tracing] at sampling_rate = 0.01, exporting
# OTLP/HTTP to tests/support/otlp_receiver.py; its ratio to "dispa" in the same run is the
# cost of tracing (issue #10: throughput >= 0.95). docs/tracing.md#overhead.
TRACING_1PCT = """
[observability.tracing]
enabled = true
exporter = "otlp_http"
endpoint = "http://127.0.0.1:{receiver_port}/v1/traces"
sampling_rate = {rate}
"""
# "dispa-access-log": Dispa writing the combined-format access log (docs/logging.md#cost).
ACCESS_LOG = """
[logging.file]
directory = "{directory}"
[logging.access_log]
enabled = true
format = "combined"
"""
VARIANTS_OF_DISPA = ("dispa-filters", "dispa-tracing-1pct", "dispa-access-log", "dispa-control")
# "dispa-filters": Dispa with FILTER_COUNT no-op sync filters in the global chain; its
# ratio to "dispa" in the same run is the filter API's cost (issue: >= 0.85 throughput).
FILTER_COUNT = 10

CLK_TCK = os.sysconf("SC_CLK_TCK")


def log(msg: str) -> None:
    print(f"[perf {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- tools

APT_PACKAGES = {"nginx": "nginx-light", "haproxy": "haproxy", "wrk": "wrk", "gcc": "gcc", "taskset": "util-linux"}


def which(name: str) -> str | None:
    return shutil.which(name) or next(
        (p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}", f"/sbin/{name}") if os.access(p, os.X_OK)), None)


def ensure_tools(names: list[str]) -> dict[str, str]:
    """Return {tool: path}; apt-get install the missing ones (fresh machines)."""
    missing = [n for n in names if which(n) is None]
    if missing:
        pkgs = sorted({APT_PACKAGES[n] for n in missing})
        if os.geteuid() != 0 or which("apt-get") is None:
            raise RuntimeError(f"missing tools {missing}; install: apt-get install -y {' '.join(pkgs)}")
        log(f"installing {pkgs} with apt-get")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "update", "-q"], check=False, env=env, timeout=300,
                       stdout=subprocess.DEVNULL)
        subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", *pkgs],
                       check=True, env=env, timeout=600, stdout=subprocess.DEVNULL)
        # the Debian nginx package starts a system nginx on :80; it is not ours
        # and not used, but stop it so it does not steal CPU from the runs.
        if "nginx-light" in pkgs and which("systemctl"):
            subprocess.run(["systemctl", "stop", "nginx"], check=False, timeout=30,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    out = {}
    for n in names:
        p = which(n)
        if p is None:
            raise RuntimeError(f"tool {n} still missing")
        out[n] = p
    return out


def build_pacer() -> str:
    """Compile perf/load/pacer/pacer.c with gcc into a cache dir keyed by source hash."""
    src = PACER_SRC.read_bytes()
    h = hashlib.sha256(src).hexdigest()[:16]
    cache = Path(os.environ.get("DISPA_PERF_BIN", Path(tempfile.gettempdir()) / "dispa-perf-bin"))
    cache.mkdir(parents=True, exist_ok=True)
    exe = cache / f"pacer-{h}"
    if not exe.exists():
        tmp = cache / f".pacer-{h}.{os.getpid()}"
        subprocess.run([which("gcc") or "gcc", "-O2", "-Wall", "-o", str(tmp), str(PACER_SRC), "-lm"],
                       check=True, timeout=120)
        tmp.replace(exe)
    return str(exe)


def tool_versions() -> dict:
    def first_line(cmd):
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
            return (p.stdout + p.stderr).strip().splitlines()[0]
        except Exception as e:  # noqa: BLE001
            return f"unavailable: {e}"
    cpu = ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except Exception:  # noqa: BLE001
        pass
    return {
        "nginx": first_line([which("nginx") or "nginx", "-v"]),
        "haproxy": first_line([which("haproxy") or "haproxy", "-v"]),
        "wrk": first_line([which("wrk") or "wrk", "-v"]),
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        "cpu_model": cpu,
        "nproc_online": os.cpu_count(),
        "cpus_allowed": sorted(os.sched_getaffinity(0)),
    }


# --------------------------------------------------------------------------- layout

@dataclass
class Layout:
    proxy_cpus: list[int]
    load_cpus: list[int]
    backend_workers: int
    wrk_threads: int
    note: str = ""

    def cpuset(self, which_: str) -> str:
        return ",".join(map(str, self.proxy_cpus if which_ == "proxy" else self.load_cpus))


def cpu_layout(workers: int, cpus: list[int] | None = None) -> Layout:
    """Proxy CPUs = first W allowed CPUs; load (backend + wrk/pacer) = the rest.

    * 1 CPU: everything shares it (numbers are then only indicative).
    * W >= number of CPUs: the proxy gets all but the last CPU.
    * backend nginx workers = max(1, len(load)//2); wrk threads = max(1, len(load) - backend)
      (on 2 cores: 1 backend worker and 1 wrk thread, both on CPU 1).
    """
    cpus = sorted(cpus if cpus is not None else os.sched_getaffinity(0))
    if len(cpus) == 1:
        return Layout(cpus, cpus, 1, 1, "single CPU: proxy and load share it")
    w = max(1, min(workers, len(cpus) - 1))
    note = "" if w == workers else f"proxy limited to {w} CPU(s) for {workers} workers"
    proxy, load = cpus[:w], cpus[w:]
    bw = max(1, len(load) // 2)
    wt = max(1, len(load) - bw)
    return Layout(proxy, load, bw, wt, note)


# --------------------------------------------------------------------------- /proc

def _all_stats() -> dict[int, list[str]]:
    out = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                s = f.read()
        except OSError:
            continue
        # comm may contain spaces/parens: split after the last ')'
        rest = s[s.rfind(")") + 2:].split()
        out[int(d)] = rest  # rest[0] = state (field 3), rest[1] = ppid (field 4)
    return out


def tree_pids(root: int, stats: dict[int, list[str]] | None = None) -> list[int]:
    stats = stats if stats is not None else _all_stats()
    if root not in stats:
        return []
    children: dict[int, list[int]] = {}
    for pid, st in stats.items():
        children.setdefault(int(st[1]), []).append(pid)
    out, todo = [], [root]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def tree_cpu_us(root: int) -> float:
    """utime+stime (+cutime+cstime of reaped children) of the whole process tree, in µs."""
    user, system = tree_cpu_split_us(root)
    return user + system


def tree_cpu_split_us(root: int) -> tuple[float, float]:
    """(user, system) CPU µs of the whole process tree, reaped children included: what
    the process ran itself and what the kernel ran for it (system calls, softirqs)."""
    stats = _all_stats()
    user = system = 0
    for pid in tree_pids(root, stats):
        st = stats[pid]
        # fields 14..17 (1-based: utime, stime, cutime, cstime) -> rest index 11..14
        user += int(st[11]) + int(st[13])
        system += int(st[12]) + int(st[14])
    return user * 1e6 / CLK_TCK, system * 1e6 / CLK_TCK


def tree_mem_kb(root: int) -> dict:
    pss = rss = 0
    n = 0
    for pid in tree_pids(root):
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        pss += int(line.split()[1])
                    elif line.startswith("Rss:"):
                        rss += int(line.split()[1])
            n += 1
        except OSError:
            continue
    return {"pss_kb": pss, "rss_kb": rss, "processes": n}


# --------------------------------------------------------------------------- processes

def _raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 65536
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, want), max(hard, want)))
    except (ValueError, OSError):  # no CAP_SYS_RESOURCE (containers): use the hard limit
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def nofile_limit() -> int:
    """The RLIMIT_NOFILE our children will get (65536, or the hard limit if we cannot raise it)."""
    _raise_nofile()
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def _preexec() -> None:
    _raise_nofile()
    os.setpgrp()  # own process group, so cleanup can signal the whole tree


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_probe(port: int, path: str = "/", timeout: float = 1.0) -> tuple[bool, str]:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n".encode())
            data = b""
            deadline = time.monotonic() + timeout
            while b"\r\n" not in data and time.monotonic() < deadline:
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
        line = data.split(b"\r\n", 1)[0].decode("latin-1", "replace")
        return line.startswith("HTTP/1."), line
    except OSError as e:
        return False, str(e)


@dataclass
class Server:
    name: str
    cmd: list[str]
    port: int
    cpus: str
    env: dict | None = None
    workdir: str | None = None
    proc: subprocess.Popen | None = None
    status: str = "not started"
    error: str = ""
    logfile: str = ""

    def start(self, ready_timeout: float = 20.0) -> bool:
        full = ["taskset", "-c", self.cpus, *self.cmd] if self.cpus else list(self.cmd)
        self.logfile = os.path.join(self.workdir or tempfile.gettempdir(), f"{self.name}.log")
        lf = open(self.logfile, "wb")
        env = dict(os.environ)
        env.update(self.env or {})
        try:
            self.proc = subprocess.Popen(full, stdout=lf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=env, cwd=self.workdir, preexec_fn=_preexec)
        except OSError as e:
            self.status, self.error = "failed", f"cannot exec {full}: {e}"
            return False
        finally:
            lf.close()
        deadline = time.monotonic() + ready_timeout
        last = ""
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.status = "failed"
                self.error = f"exited with {self.proc.returncode} before ready; log tail: {self.log_tail()}"
                return False
            ok, last = http_probe(self.port, "/", 1.0)
            if ok:
                self.status = "ok"
                return True
            time.sleep(0.2)
        self.status = "failed"
        self.error = f"not ready after {ready_timeout:.0f}s (last probe: {last}); log tail: {self.log_tail()}"
        self.stop()
        return False

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, n: int = 600) -> str:
        try:
            return Path(self.logfile).read_text(errors="replace")[-n:].replace("\n", " | ")
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is None:
            return
        pids = tree_pids(self.proc.pid)
        for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            if self.proc.poll() is not None and not any(os.path.exists(f"/proc/{p}") for p in pids[1:]):
                break
            try:
                os.killpg(self.proc.pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
            for p in pids:
                try:
                    os.kill(p, sig)
                except (ProcessLookupError, PermissionError):
                    pass
            try:
                self.proc.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                continue
        self.proc = None


# --------------------------------------------------------------------------- configs

def render(template: str, **kw) -> str:
    return (TEMPLATES / template).read_text().format(**kw)


def nginx_cmd(prefix: str, conf: str) -> list[str]:
    return [which("nginx") or "nginx", "-p", prefix, "-c", conf, "-e", os.path.join(prefix, "error.log")]


def make_backend(tmp: str, layout: Layout) -> Server:
    prefix = os.path.join(tmp, "backend")
    os.makedirs(prefix, exist_ok=True)
    port = free_port()
    conf = os.path.join(prefix, "nginx.conf")
    nf = nofile_limit()
    Path(conf).write_text(render("nginx_backend.conf", workers=layout.backend_workers, prefix=prefix, port=port,
                                 nofile=nf, worker_connections=nf - 100,
                                 body64=BODY64.replace("\n", "\\n"), body2k=BODY4K[:2048]))
    return Server("backend", nginx_cmd(prefix, conf), port, layout.cpuset("load"), workdir=prefix)


def make_nginx_proxy(tmp: str, name: str, layout: Layout, workers: int, backend_port: int) -> Server:
    prefix = os.path.join(tmp, name)
    os.makedirs(prefix, exist_ok=True)
    port = free_port()
    conf = os.path.join(prefix, "nginx.conf")
    nf = nofile_limit()
    Path(conf).write_text(render("nginx_proxy.conf", workers=workers, prefix=prefix, port=port,
                                 backend_port=backend_port, nofile=nf, worker_connections=nf - 100))
    return Server(name, nginx_cmd(prefix, conf), port, layout.cpuset("proxy"), workdir=prefix)


def make_haproxy(tmp: str, name: str, layout: Layout, workers: int, backend_port: int,
                 slowdown_lua: bool = False, env: dict | None = None) -> Server:
    prefix = os.path.join(tmp, name)
    os.makedirs(prefix, exist_ok=True)
    port = free_port()
    lua_g = lua_f = ""
    if slowdown_lua:
        lua = os.path.join(prefix, "slowdown.lua")
        shutil.copy(TEMPLATES / "slowdown.lua", lua)
        lua_g = f"    lua-load-per-thread {lua}"
        lua_f = "    http-request lua.dispa_slowdown"
    conf = os.path.join(prefix, "haproxy.cfg")
    nf = nofile_limit()
    Path(conf).write_text(render("haproxy.cfg", workers=workers, port=port, backend_port=backend_port,
                                 nofile=nf, maxconn=min(60000, max(12000, nf // 2)),
                                 lua_global=lua_g, lua_frontend=lua_f))
    return Server(name, [which("haproxy") or "haproxy", "-db", "-f", conf], port, layout.cpuset("proxy"),
                  env=env, workdir=prefix)


def default_dispa_cmd() -> str:
    if shutil.which("dispa-server"):
        return "dispa-server --config {config} --workers {workers}"
    # same entry point as the console script, without needing `pip install`
    return (f"{sys.executable} -c \"import sys; from dispa.cli import server_main; sys.exit(server_main())\" "
            "--config {config} --workers {workers}")


def make_dispa(tmp: str, layout: Layout, workers: int, backend_port: int, dispa_cmd: str | None,
               env: dict | None = None, name: str = "dispa", filters: int = 0,
               extra: str = "") -> Server:
    """Dispa (or a stand-in) in the dispa slot.

    ``dispa_cmd`` is a shell-style template with {config} {workers} {port} {backend_port}
    {python}, or ``standin:nginx`` / ``standin:haproxy`` (the latter honours
    DISPA_PERF_SLOWDOWN_US through a Lua busy-wait, for the gate's failure demo).
    """
    import shlex
    if dispa_cmd in ("standin:nginx", "standin:haproxy"):
        if dispa_cmd == "standin:nginx":
            s = make_nginx_proxy(tmp, "dispa", layout, workers, backend_port)
        else:
            s = make_haproxy(tmp, "dispa", layout, workers, backend_port, slowdown_lua=True, env=env)
        s.env = env
        return s
    prefix = os.path.join(tmp, name)
    os.makedirs(prefix, exist_ok=True)
    port = free_port()
    conf = os.path.join(prefix, "dispa.toml")
    text = render("dispa.toml", port=port, workers=workers, backend_port=backend_port)
    for i in range(filters):
        text += (f'\n[[plugins.plugins]]\nname = "noop{i}"\n'
                 'type = "tests.support.filters:Noop"\n')
    text += extra
    Path(conf).write_text(text)
    tpl = dispa_cmd or default_dispa_cmd()
    cmd = [a.format(config=conf, workers=workers, port=port, backend_port=backend_port, python=sys.executable)
           for a in shlex.split(tpl)]
    e = {"PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    e.update(env or {})
    # cwd = the temp prefix: Dispa writes files relative to its cwd (dispa.log), never into the tree
    return Server(name, cmd, port, layout.cpuset("proxy"), env=e, workdir=prefix)


# --------------------------------------------------------------------------- load tools

def run_wrk(port: int, path: str, duration: float, conns: int, threads: int, cpus: str,
            close: bool = False) -> dict:
    script = HERE / ("conn_close.lua" if close else "keepalive.lua")
    d = max(1, int(round(duration)))
    cmd = ["taskset", "-c", cpus, which("wrk") or "wrk", f"-t{threads}", f"-c{conns}", f"-d{d}s",
           "--timeout", "5s", "-s", str(script), f"http://127.0.0.1:{port}{path}"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=d + 30)
    m = re.search(r"^WRKJSON (.*)$", p.stdout, re.M)
    if p.returncode != 0 or not m:
        raise RuntimeError(f"wrk failed rc={p.returncode}: {p.stdout[-400:]} {p.stderr[-400:]}")
    r = json.loads(m.group(1))
    r["rps"] = r["requests"] / (r["duration_us"] / 1e6) if r["duration_us"] else 0.0
    r["errors"] = sum(r[k] for k in ("err_connect", "err_read", "err_write", "err_status", "err_timeout"))
    return r


def run_pacer_lat(pacer: str, port: int, path: str, rate: float, duration: float, conns: int, cpus: str,
                  warmup: float = 0.5) -> dict:
    cmd = ["taskset", "-c", cpus, pacer, "lat", "-a", "127.0.0.1", "-p", str(port), "-P", path,
           "-r", str(rate), "-d", str(duration), "-c", str(conns), "-w", str(warmup)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + warmup + 30,
                       preexec_fn=_raise_nofile)
    if p.returncode != 0:
        raise RuntimeError(f"pacer lat failed rc={p.returncode}: {p.stderr[-400:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def hold_connections(pacer: str, port: int, n: int, cpus: str, sample: Callable[[], dict],
                     connect_timeout: float = 30.0) -> tuple[dict, dict]:
    """Open n idle keep-alive connections (one request each), call sample(), release them."""
    cmd = ["taskset", "-c", cpus, pacer, "hold", "-a", "127.0.0.1", "-p", str(port), "-P", "/",
           "-n", str(n), "-t", str(connect_timeout), "-T", str(connect_timeout + 60)]
    p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=_raise_nofile)
    try:
        import selectors
        sel = selectors.DefaultSelector()
        sel.register(p.stdout, selectors.EVENT_READ)
        if not sel.select(timeout=connect_timeout + 15):
            raise RuntimeError("pacer hold: no ready line")
        line = p.stdout.readline()
        if not line:
            raise RuntimeError(f"pacer hold exited: {p.stderr.read()[-400:]}")
        info = json.loads(line)
        time.sleep(1.0)  # let the proxy settle (lazy allocations, timers)
        snap = sample()
        return info, snap
    finally:
        try:
            p.stdin.close()
        except OSError:
            pass
        try:
            p.wait(timeout=15)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout=5)


# --------------------------------------------------------------------------- scenarios

@dataclass
class Config:
    proxies: list[str] = field(default_factory=lambda: ["dispa", "nginx", "haproxy"])
    scenarios: list[str] = field(default_factory=lambda: list(ALL_SCENARIOS))
    rounds: int = 5
    duration: float = 5.0
    workers: int = 1
    conns: int = 64
    lat_rate: float = 2000.0
    lat_conns: int = 16
    mem_conns: int = 10000
    dispa_cmd: str | None = None
    dispa_env: dict = field(default_factory=dict)
    ready_timeout: float = 20.0
    keep_tmp: bool = False
    warmup: float = 1.0
    tracing_rate: float = 0.01  # "dispa-tracing-1pct"'s sampling_rate (--tracing-rate)
    awake: bool = True   # lat2k: keep the CPUs out of idle (cpus_awake) while measuring


def _measure_wrk(srv: Server, layout: Layout, cfg: Config, path: str, close: bool) -> dict:
    c0 = tree_cpu_us(srv.proc.pid)
    r = run_wrk(srv.port, path, cfg.duration, cfg.conns, layout.wrk_threads, layout.cpuset("load"), close)
    c1 = tree_cpu_us(srv.proc.pid)
    cpu = c1 - c0
    return {"rps": r["rps"], "requests": r["requests"], "errors": r["errors"],
            "cpu_us_per_req": cpu / r["requests"] if r["requests"] else None,
            "cpu_us": cpu, "duration_s": r["duration_us"] / 1e6, "wrk": r}


def _measure_lat(srv_port: int, root_pid: int | None, pacer: str, layout: Layout, cfg: Config) -> dict:
    c0 = tree_cpu_us(root_pid) if root_pid else 0
    r = run_pacer_lat(pacer, srv_port, "/", cfg.lat_rate, cfg.duration, cfg.lat_conns, layout.cpuset("load"))
    c1 = tree_cpu_us(root_pid) if root_pid else 0
    lat = r["lat_us"]
    out = {"p50_us": lat["p50"], "p90_us": lat["p90"], "p95_us": lat["p95"], "p99_us": lat["p99"],
           "p999_us": lat["p999"], "max_us": lat["max"], "mean_us": lat["mean"],
           "achieved_rps": r["achieved_rps"], "errors": r["errors"] + r["timeouts"] + r["non2xx"], "pacer": r}
    if root_pid:
        out["cpu_us_per_req"] = (c1 - c0) / r["completed"] if r["completed"] else None
    return out


class cpus_awake:
    """Keep the given CPUs busy with SCHED_IDLE spinners for the duration of a ``with``.

    A vCPU that goes idle halts, and waking it costs the guest a VM entry: on this VM that
    puts 300-1,000 µs into the P95 of *every* server at 2,000 req/s (nginx direct included),
    so the latency rows measured the hypervisor. A SCHED_IDLE task runs only when nothing else
    wants the CPU and is preempted at once by any wakeup, so the CPU never halts and the
    servers' latency is their own. The spinners end by themselves after ``limit_s``."""

    _CODE = ("import os,time\n"
             "os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))\n"
             "end = time.monotonic() + {limit}\n"
             "while time.monotonic() < end:\n"
             "    pass\n")

    def __init__(self, cpus: list[int], limit_s: float, enabled: bool = True):
        self.cpus, self.limit_s, self.enabled = cpus, limit_s, enabled
        self.procs: list[subprocess.Popen] = []

    def __enter__(self):
        if self.enabled and hasattr(os, "SCHED_IDLE"):
            for c in self.cpus:
                self.procs.append(subprocess.Popen(
                    ["taskset", "-c", str(c), sys.executable, "-c",
                     self._CODE.format(limit=float(self.limit_s))],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        return self

    def __exit__(self, *exc):
        for p in self.procs:
            p.kill()
        for p in self.procs:
            p.wait(timeout=10)
        self.procs.clear()


def _measure_pair(ref: Server, cand: Server, layout: Layout, cfg: Config) -> tuple[dict, dict]:
    """ka64 against two proxies at once (EXTRA_SCENARIOS "pair64"): each proxy's CPU time and
    requests over the same seconds. ``cost_ratio`` (candidate CPU µs/request over the
    reference's) is the inverse of their single-core throughput ratio; ``rps_per_core`` is
    1e6 / cpu_us_per_req, the throughput a proxy would reach with a core to itself."""
    import threading
    out: dict = {}

    def one(key: str, srv: Server) -> None:
        try:
            out[key] = run_wrk(srv.port, "/", cfg.duration, cfg.conns, layout.wrk_threads,
                               layout.cpuset("load"))
        except Exception as e:  # noqa: BLE001
            out[key] = e

    c0 = (tree_cpu_us(ref.proc.pid), tree_cpu_us(cand.proc.pid))
    ts = [threading.Thread(target=one, args=("ref", ref)), threading.Thread(target=one, args=("cand", cand))]
    for t in ts:
        t.start()
    for t in ts:
        t.join(timeout=cfg.duration + 60)
    c1 = (tree_cpu_us(ref.proc.pid), tree_cpu_us(cand.proc.pid))
    for k in ("ref", "cand"):
        if not isinstance(out.get(k), dict):
            raise RuntimeError(f"pair64 {k}: {out.get(k)}")
    res = []
    for i, k in enumerate(("ref", "cand")):
        r = out[k]
        cpu = c1[i] - c0[i]
        per = cpu / r["requests"] if r["requests"] else None
        res.append({"rps": r["rps"], "requests": r["requests"], "errors": r["errors"],
                    "cpu_us_per_req": per, "rps_per_core": 1e6 / per if per else None,
                    "cpu_us": cpu, "duration_s": r["duration_us"] / 1e6, "wrk": r})
    a, b = res
    if a["cpu_us_per_req"] and b["cpu_us_per_req"]:
        b["cost_ratio"] = b["cpu_us_per_req"] / a["cpu_us_per_req"]
        b["throughput_ratio"] = a["cpu_us_per_req"] / b["cpu_us_per_req"]
    return a, b


def _measure_mem(srv: Server, pacer: str, layout: Layout, cfg: Config) -> dict:
    # A fresh instance each round: allocators keep what the previous round's 10k
    # connections used, which would make "idle" already include them.  Warm it
    # with 1 s of ka64 (pools, upstream keep-alive), then idle vs 10k idle conns.
    srv.stop()
    if not srv.start(cfg.ready_timeout):
        raise RuntimeError(f"restart for mem failed: {srv.error}")
    run_wrk(srv.port, "/", 1, cfg.conns, layout.wrk_threads, layout.cpuset("load"))
    time.sleep(1.0)
    idle = tree_mem_kb(srv.proc.pid)
    info, held = hold_connections(pacer, srv.port, cfg.mem_conns, layout.cpuset("load"),
                                  lambda: tree_mem_kb(srv.proc.pid))
    ok = info.get("ok", 0)
    out = {"pss_idle_kb": idle["pss_kb"], "rss_idle_kb": idle["rss_kb"], "pss_conns_kb": held["pss_kb"],
           "rss_conns_kb": held["rss_kb"], "conns_requested": cfg.mem_conns, "conns_ok": ok,
           "errors": cfg.mem_conns - ok, "processes": idle["processes"],
           "kb_per_conn": (held["pss_kb"] - idle["pss_kb"]) / ok if ok else None}
    time.sleep(1.0)  # let the proxy drop the closed connections before the next measurement
    return out


def start_servers(cfg: Config, layout: Layout, tmp: str, workers: int) -> tuple[Server, dict[str, Server]]:
    backend = make_backend(tmp, layout)
    if not backend.start(cfg.ready_timeout):
        raise RuntimeError(f"backend nginx failed: {backend.error}")
    servers: dict[str, Server] = {}
    for name in cfg.proxies:
        if name == "nginx":
            s = make_nginx_proxy(tmp, "nginx", layout, workers, backend.port)
        elif name == "haproxy":
            s = make_haproxy(tmp, "haproxy", layout, workers, backend.port)
        elif name == "dispa":
            s = make_dispa(tmp, layout, workers, backend.port, cfg.dispa_cmd, cfg.dispa_env)
        elif name == "dispa-filters":
            s = make_dispa(tmp, layout, workers, backend.port, None, cfg.dispa_env,
                           name="dispa-filters", filters=FILTER_COUNT)
        elif name == "dispa-tracing-1pct":
            receiver = make_otlp_receiver(tmp, layout)
            log(f"starting otlp-receiver on :{receiver.port}")
            if not receiver.start(cfg.ready_timeout):
                log(f"otlp-receiver FAILED: {receiver.error}")
            servers["otlp-receiver"] = receiver  # stopped with the proxies, never measured
            s = make_dispa(tmp, layout, workers, backend.port, None, cfg.dispa_env,
                           name=name, extra=TRACING_1PCT.format(receiver_port=receiver.port,
                                                           rate=cfg.tracing_rate))
        elif name == "dispa-control":
            s = make_dispa(tmp, layout, workers, backend.port, None, cfg.dispa_env, name=name)
        elif name == "dispa-access-log":
            s = make_dispa(tmp, layout, workers, backend.port, None, cfg.dispa_env, name=name,
                           extra=ACCESS_LOG.format(directory=os.path.join(tmp, name)))
        else:
            raise ValueError(f"unknown proxy {name}")
        log(f"starting {name}: {' '.join(s.cmd)} on :{s.port} cpus {s.cpus}")
        if s.start(cfg.ready_timeout):
            log(f"{name} ready")
        else:
            log(f"{name} FAILED: {s.error}")
        servers[name] = s
    return backend, servers


def make_otlp_receiver(tmp: str, layout: Layout) -> Server:
    """tests/support/otlp_receiver.py as a process (counts spans, keeps none), on the load
    CPUs: at 1 % sampling it receives a few export requests per second."""
    prefix = os.path.join(tmp, "otlp-receiver")
    os.makedirs(prefix, exist_ok=True)
    port = free_port()
    env = {"PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return Server("otlp-receiver", [sys.executable, "-m", "tests.support.otlp_receiver",
                                    "--port", str(port)], port, layout.cpuset("load"), env=env,
                  workdir=prefix)


def run_rounds(cfg: Config, on_round: Callable[[int, dict], None] | None = None) -> dict:
    """Full harness run for one worker count.  Returns the result document."""
    tools = ["nginx", "wrk", "taskset"]
    if "haproxy" in cfg.proxies or cfg.dispa_cmd == "standin:haproxy":
        tools.append("haproxy")
    if {"lat2k", "mem"} & set(cfg.scenarios):
        tools.append("gcc")
    ensure_tools(tools)
    pacer = build_pacer() if {"lat2k", "mem"} & set(cfg.scenarios) else ""
    layout = cpu_layout(cfg.workers)
    tmp = tempfile.mkdtemp(prefix="dispa-perf-")
    doc: dict = {"meta": {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "config": cfg.__dict__.copy(),
                          "layout": layout.__dict__.copy(), "versions": tool_versions(), "tmpdir": tmp},
                 "proxies": {}, "rounds": []}
    backend = None
    servers: dict[str, Server] = {}
    try:
        backend, servers = start_servers(cfg, layout, tmp, cfg.workers)
        doc["meta"]["backend_port"] = backend.port
        for name, s in servers.items():
            doc["proxies"][name] = {"status": s.status, "error": s.error, "cmd": s.cmd, "port": s.port,
                                    "cpus": s.cpus}
        live = [n for n in cfg.proxies if servers[n].status == "ok"]
        # warm-up: connection pools, page cache, lazy init
        for n in live:
            try:
                run_wrk(servers[n].port, "/", cfg.warmup, cfg.conns, layout.wrk_threads, layout.cpuset("load"))
            except Exception as e:  # noqa: BLE001
                log(f"warm-up of {n} failed: {e}")
        for r in range(cfg.rounds):
            rd: dict = {"round": r + 1, "results": {n: {} for n in live}}
            for sc in cfg.scenarios:
                if sc == "pair64":
                    _pair_round(rd, r, live, servers, layout, cfg)
                    continue
                if sc == "lat2k":
                    try:
                        with cpus_awake(layout.proxy_cpus + layout.load_cpus, cfg.duration + 60,
                                        cfg.awake):
                            rd["results"].setdefault("direct", {})["lat2k"] = _measure_lat(
                                backend.port, None, pacer, layout, cfg)
                    except Exception as e:  # noqa: BLE001
                        rd["results"].setdefault("direct", {})["lat2k"] = {"error": str(e)}
                for n in live:
                    s = servers[n]
                    if not s.alive():
                        rd["results"][n][sc] = {"error": "process died"}
                        continue
                    try:
                        if sc == "ka64":
                            res = _measure_wrk(s, layout, cfg, "/", False)
                        elif sc == "ka4k":
                            res = _measure_wrk(s, layout, cfg, "/4k", False)
                        elif sc == "conn":
                            res = _measure_wrk(s, layout, cfg, "/", True)
                        elif sc == "lat2k":
                            with cpus_awake(layout.proxy_cpus + layout.load_cpus, cfg.duration + 60,
                                            cfg.awake):
                                res = _measure_lat(s.port, s.proc.pid, pacer, layout, cfg)
                            d = rd["results"].get("direct", {}).get("lat2k", {})
                            for k in ("p50_us", "p95_us", "p99_us", "p999_us"):
                                if k in d:
                                    res["added_" + k] = res[k] - d[k]
                        elif sc == "mem":
                            res = _measure_mem(s, pacer, layout, cfg)
                        else:
                            raise ValueError(f"unknown scenario {sc}")
                    except Exception as e:  # noqa: BLE001
                        res = {"error": str(e)}
                        log(f"round {r + 1} {n} {sc}: {e}")
                    rd["results"][n][sc] = res
                    if not s.alive():
                        s.status, s.error = "died", f"died during {sc} of round {r + 1}: {s.log_tail()}"
                        doc["proxies"][n].update(status=s.status, error=s.error)
            doc["rounds"].append(rd)
            log(f"round {r + 1}/{cfg.rounds} done: " + short_round(rd))
            if on_round:
                on_round(r, rd)
    finally:
        for s in servers.values():
            s.stop()
        if backend:
            backend.stop()
        if not cfg.keep_tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    doc["summary"], doc["ratios"] = summarize(doc)
    doc["meta"]["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    return doc


def _pair_round(rd: dict, r: int, live: list[str], servers: dict, layout: Layout, cfg: Config) -> None:
    """pair64 for one round: the first live proxy against each of the others, in turn (the
    reference's row keeps its last pairing; each candidate's row has its own cost_ratio)."""
    if len(live) < 2:
        return
    ref = live[0]
    for n in live[1:]:
        try:
            a, b = _measure_pair(servers[ref], servers[n], layout, cfg)
        except Exception as e:  # noqa: BLE001
            a = b = {"error": str(e)}
            log(f"round {r + 1} pair64 {ref}+{n}: {e}")
        rd["results"][ref]["pair64"] = a
        rd["results"][n]["pair64"] = b


def short_round(rd: dict) -> str:
    parts = []
    for n, res in rd["results"].items():
        ka = res.get("ka64", {})
        if "rps" in ka:
            parts.append(f"{n} ka64 {ka['rps']:.0f} rps {ka['cpu_us_per_req'] or 0:.1f} us/req")
        lt = res.get("lat2k", {})
        if "p99_us" in lt:
            parts.append(f"{n} lat2k p99 {lt['p99_us']:.0f} us")
    return "; ".join(parts)


# --------------------------------------------------------------------------- summaries

NO_RATIO_PREFIXES = ("added_",)
SKIP_KEYS = {"wrk", "pacer", "error", "requests", "duration_s", "cpu_us", "conns_requested", "processes"}


def _stats(vals: list[float]) -> dict:
    return {"min": min(vals), "median": statistics.median(vals), "max": max(vals), "n": len(vals),
            "values": vals}


def summarize(doc: dict) -> tuple[dict, dict]:
    """min/median/max per proxy/scenario/metric; ratios vs nginx and haproxy computed round by round."""
    series: dict = {}
    for rd in doc["rounds"]:
        for n, scs in rd["results"].items():
            for sc, res in scs.items():
                for k, v in res.items():
                    if k in SKIP_KEYS or not isinstance(v, (int, float)) or v is None:
                        continue
                    series.setdefault(n, {}).setdefault(sc, {}).setdefault(k, []).append((rd["round"], v))
    summary = {n: {sc: {k: _stats([v for _, v in vals]) for k, vals in ks.items()} for sc, ks in scs.items()}
               for n, scs in series.items()}
    ratios: dict = {}
    for n, scs in series.items():
        for ref in ("nginx", "haproxy", "dispa"):
            if ref == n or ref not in series or n == "direct":
                continue
            if ref == "dispa" and n not in VARIANTS_OF_DISPA:
                continue
            for sc, ks in scs.items():
                for k, vals in ks.items():
                    if k.startswith(NO_RATIO_PREFIXES) or k in ("errors", "cost_ratio", "throughput_ratio"):
                        continue
                    refv = dict(series[ref].get(sc, {}).get(k, []))
                    per = [v / refv[r] for r, v in vals if refv.get(r)]
                    if per:
                        ratios.setdefault(n, {}).setdefault(f"vs_{ref}", {}).setdefault(sc, {})[k] = {
                            "median": statistics.median(per), "per_round": per}
    return summary, ratios


METRIC_ORDER = {
    "ka64": ["rps", "cpu_us_per_req", "errors"],
    "ka4k": ["rps", "cpu_us_per_req", "errors"],
    "pair64": ["rps", "cpu_us_per_req", "rps_per_core", "cost_ratio", "throughput_ratio", "errors"],
    "conn": ["rps", "cpu_us_per_req", "errors"],
    "lat2k": ["p50_us", "p95_us", "p99_us", "p999_us", "added_p50_us", "added_p95_us", "added_p99_us",
              "added_p999_us", "cpu_us_per_req", "achieved_rps", "errors"],
    "mem": ["pss_idle_kb", "rss_idle_kb", "pss_conns_kb", "rss_conns_kb", "kb_per_conn", "conns_ok", "errors"],
}


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        if abs(v) >= 10:
            return f"{v:.1f}"
        return f"{v:.2f}"
    return f"{v:,}" if isinstance(v, int) else str(v)


def markdown(doc: dict) -> str:
    lines = []
    meta = doc["meta"]
    lay = meta["layout"]
    cfgd = meta["config"]
    lines.append(f"Dispa load harness — {meta.get('started', '')}, {cfgd['rounds']} rounds x {cfgd['duration']} s, "
                 f"workers={cfgd['workers']}, proxy CPUs {lay['proxy_cpus']}, load CPUs {lay['load_cpus']}")
    lines.append("")
    for n, p in doc["proxies"].items():
        if p["status"] != "ok":
            lines.append(f"**{n}: {p['status'].upper()}** — {p['error'][:300]}")
    lines.append("")
    order = [n for n in ["dispa", "nginx", "haproxy", "direct", *VARIANTS_OF_DISPA]
             if n in doc["summary"]]
    for sc in cfgd["scenarios"]:
        rows = []
        for n in order:
            ms = doc["summary"][n].get(sc)
            if not ms:
                continue
            for k in METRIC_ORDER.get(sc, sorted(ms)):
                if k not in ms:
                    continue
                st = ms[k]
                rn = doc["ratios"].get(n, {}).get("vs_nginx", {}).get(sc, {}).get(k, {}).get("median")
                rh = doc["ratios"].get(n, {}).get("vs_haproxy", {}).get(sc, {}).get(k, {}).get("median")
                rows.append(f"| {n} | {k} | {_fmt(st['min'])} | {_fmt(st['median'])} | {_fmt(st['max'])} | "
                            f"{'-' if rn is None else f'{rn:.3f}'} | {'-' if rh is None else f'{rh:.3f}'} |")
        if rows:
            lines.append(f"### {sc}")
            lines.append("")
            lines.append("| proxy | metric | min | median | max | ratio vs nginx | ratio vs haproxy |")
            lines.append("|---|---|---:|---:|---:|---:|---:|")
            lines.extend(rows)
            lines.append("")
    if "scaling" in doc:
        lines.append("### scaling (ka64 req/s, median over rounds)")
        lines.append("")
        ws = sorted(doc["scaling"], key=int)
        names = sorted({n for w in ws for n in doc["scaling"][w]})
        lines.append("| proxy | " + " | ".join(f"W={w}" for w in ws) + " |")
        lines.append("|---|" + "---:|" * len(ws))
        for n in names:
            cells = []
            for w in ws:
                v = doc["scaling"][w].get(n, {}).get("rps", {}).get("median")
                cells.append(_fmt(v))
            lines.append(f"| {n} | " + " | ".join(cells) + " |")
        lines.append("")
    variants = [(n, sc, k, r) for n in VARIANTS_OF_DISPA
                for sc, ks in doc["ratios"].get(n, {}).get("vs_dispa", {}).items()
                for k, r in ks.items() if k in ("rps", "cpu_us_per_req")]
    if variants:
        lines.append("### Dispa variants vs dispa (same run)")
        lines.append("")
        lines.append("| variant | scenario | metric | ratio (median) | per round |")
        lines.append("|---|---|---|---:|---|")
        for n, sc, k, r in variants:
            per = ", ".join(f"{x:.3f}" for x in r["per_round"])
            lines.append(f"| {n} | {sc} | {k} | {r['median']:.3f} | {per} |")
        lines.append("")
    lines.append("Ratios are medians of per-round ratios (proxy / reference in the same round). "
                 "cpu_us_per_req = utime+stime of the proxy's process tree / requests completed. "
                 "added_* = proxy percentile - direct-to-backend percentile in the same round.")
    return "\n".join(lines)


# --------------------------------------------------------------------------- plots

def ensure_matplotlib():
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        log("installing matplotlib with pip (plots requested)")
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "matplotlib"], check=True, timeout=600)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plots(doc: dict, outdir: str) -> list[str]:
    plt = ensure_matplotlib()
    os.makedirs(outdir, exist_ok=True)
    made = []
    summ = doc["summary"]
    names = [n for n in ["dispa", "nginx", "haproxy"] if n in summ]
    colors = {"dispa": "#d62728", "nginx": "#2ca02c", "haproxy": "#1f77b4", "direct": "#7f7f7f"}

    def bars(metric: str, scen: list[str], title: str, ylabel: str, fname: str):
        scen = [s for s in scen if any(s in summ[n] and metric in summ[n][s] for n in names)]
        if not scen:
            return
        fig, ax = plt.subplots(figsize=(7, 4))
        width = 0.8 / max(1, len(names))
        for i, n in enumerate(names):
            xs, med, lo, hi = [], [], [], []
            for j, s in enumerate(scen):
                st = summ[n].get(s, {}).get(metric)
                if not st:
                    continue
                xs.append(j + i * width)
                med.append(st["median"])
                lo.append(st["median"] - st["min"])
                hi.append(st["max"] - st["median"])
            ax.bar(xs, med, width, yerr=[lo, hi], capsize=3, label=n, color=colors.get(n))
        ax.set_xticks([j + width * (len(names) - 1) / 2 for j in range(len(scen))], scen)
        ax.set_title(title)
        ax.set_ylabel(ylabel)
        ax.legend()
        ax.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        p = os.path.join(outdir, fname)
        fig.savefig(p, dpi=110)
        plt.close(fig)
        made.append(p)

    bars("rps", ["ka64", "ka4k", "conn"], "Throughput (median, min-max bars)", "req/s", "throughput.png")
    bars("cpu_us_per_req", ["ka64", "ka4k", "conn", "lat2k"], "Proxy CPU per request", "CPU µs / request",
         "cpu_per_request.png")
    # latency percentiles at 2k req/s
    lat_names = [n for n in names + ["direct"] if "lat2k" in summ.get(n, {})]
    if lat_names:
        pcts = ["p50_us", "p95_us", "p99_us", "p999_us"]
        fig, ax = plt.subplots(figsize=(7, 4))
        for n in lat_names:
            ax.plot(["P50", "P95", "P99", "P99.9"], [summ[n]["lat2k"][k]["median"] for k in pcts], marker="o",
                    label=n, color=colors.get(n))
        ax.set_yscale("log")
        ax.set_ylabel("latency µs (median over rounds, log)")
        ax.set_title(f"Latency at {doc['meta']['config']['lat_rate']:.0f} req/s (open loop)")
        ax.legend()
        ax.grid(alpha=0.3, which="both")
        fig.tight_layout()
        p = os.path.join(outdir, "latency.png")
        fig.savefig(p, dpi=110)
        plt.close(fig)
        made.append(p)
    bars("kb_per_conn", ["mem"], "Memory per idle keep-alive connection (PSS)", "KB / connection",
         "mem_per_conn.png")
    if "scaling" in doc:
        fig, ax = plt.subplots(figsize=(7, 4))
        ws = sorted(doc["scaling"], key=int)
        for n in sorted({n for w in ws for n in doc["scaling"][w]}):
            pts = [(int(w), doc["scaling"][w][n]["rps"]["median"]) for w in ws if "rps" in doc["scaling"][w].get(n, {})]
            ax.plot([a for a, _ in pts], [b for _, b in pts], marker="o", label=n, color=colors.get(n))
        ax.set_xlabel("workers")
        ax.set_ylabel("ka64 req/s")
        ax.set_title("Scaling with workers")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        p = os.path.join(outdir, "scaling.png")
        fig.savefig(p, dpi=110)
        plt.close(fig)
        made.append(p)
    return made
