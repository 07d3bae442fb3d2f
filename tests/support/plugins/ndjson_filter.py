#!/usr/bin/env python3
"""A persistent ``command`` plugin program for tests: newline-delimited JSON, one answer a line.

What it answers depends on the request path (see tests/unit/plugins/test_command.py); by
default it reports its PID and what it saw in headers.
"""
import fcntl
import json
import os
import sys
import time

PID = str(os.getpid())


def concurrency(state_path: str) -> dict:
    """Count calls in progress across all processes in a flock-protected state file,
    keep the maximum, hold the 'slot' a little, then count down."""
    with open(state_path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0)
        cur, mx = (int(x) for x in (f.read().split() or ["0", "0"]))
        cur += 1
        mx = max(mx, cur)
        f.seek(0)
        f.truncate()
        f.write(f"{cur} {mx}")
        f.flush()
        fcntl.flock(f, fcntl.LOCK_UN)
    time.sleep(0.05)
    with open(state_path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0)
        cur, mx = (int(x) for x in f.read().split())
        f.seek(0)
        f.truncate()
        f.write(f"{cur - 1} {mx}")
        f.flush()
        fcntl.flock(f, fcntl.LOCK_UN)
    return {"set_headers": {"X-Cmd-Pid": PID, "X-Concurrent": str(cur)}}


def barrier(state_path: str, parties: int) -> dict:
    """Count myself in, then wait (polling, at most 5 s) until ``parties`` calls are in
    at once: only possible if the pool really runs that many processes side by side."""
    with open(state_path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0)
        n = int(f.read() or "0") + 1
        f.seek(0)
        f.truncate()
        f.write(str(n))
        f.flush()
        fcntl.flock(f, fcntl.LOCK_UN)
    deadline = time.monotonic() + 5.0
    while n < parties and time.monotonic() < deadline:
        time.sleep(0.005)
        with open(state_path) as f:
            n = int(f.read() or "0")
    return {"set_headers": {"X-Cmd-Pid": PID,
                            "X-Barrier": "met" if n >= parties else "timeout"}}


def answer(msg: dict):
    if msg["stage"] == "response":
        if msg["status"] == 500:
            return {"short_circuit": {"status": 503, "body": "replaced",
                                      "headers": {"X-Replaced": "yes"}}}
        return {"set_headers": {"X-Resp-Pid": PID, "X-Upstream-Status": str(msg["status"]),
                                "X-Seen-Method": msg["method"], "X-Seen-Path": msg["path"],
                                "X-Seen-Server": msg["headers"].get("server", "")}}
    path = msg["path"]
    if path == "/block":
        return {"short_circuit": {"status": 403, "body": "blocked",
                                  "headers": {"X-Blocked-By": "cmd"}}}
    if path == "/slow":
        time.sleep(30)
    if path == "/crash":
        sys.exit(3)
    if path == "/garbage":
        return "this is not json"
    if path == "/array":
        return [1, 2]
    if path == "/status99":
        return {"short_circuit": {"status": 99}}
    if path == "/crlf":
        return {"set_headers": {"X-Bad": "a\r\nInjected: 1"}}
    if path == "/badname":
        return {"set_headers": {"X Bad": "v"}}
    if path == "/int":
        return {"set_headers": {"X-Num": 5}}
    if path == "/typo":
        return {"set_header": {"X-A": "1"}}
    if path == "/framing":
        return {"set_headers": {"Content-Length": "0"}}
    if path == "/huge":
        return {"set_headers": {"X-Huge": "x" * 200_000}}
    if path == "/empty":
        return {}
    if path == "/noisy":
        for i in range(5000):
            sys.stderr.write(f"noise line {i} " + "." * 60 + "\n")
        sys.stderr.flush()
    if path == "/env":
        return {"set_headers": {"X-Env-Foo": os.environ.get("FOO", "<unset>"),
                                "X-Env-Home": os.environ.get("HOME", "<unset>"),
                                "X-Env-Lang": os.environ.get("LANG", "<unset>")}}
    if path == "/barrier":
        return barrier(os.environ["CMD_STATE"], int(msg["query"]))
    if path == "/concurrency":
        return concurrency(os.environ["CMD_STATE"])
    return {"set_headers": {"X-Cmd-Pid": PID, "X-Seen-Path": path,
                            "X-Seen-Query": msg["query"],
                            "X-Seen-Host": msg["headers"].get("host", ""),
                            "X-Seen-Client": msg["client_ip"],
                            "X-Seen-Method": msg["method"]}}


def main():
    for line in sys.stdin:
        out = answer(json.loads(line))
        sys.stdout.write((out if isinstance(out, str) else json.dumps(out)) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
