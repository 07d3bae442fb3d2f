"""The filter API on the live data path: hooks, short-circuits, error strategies, body hooks,
per-route chains, and plugin metrics. Each test runs against the compiled Session and, in
the pure-twin CI run, against dispa/proxy/session.py."""

from __future__ import annotations

import socket

import pytest

from tests.support.dispa_proc import http_get, read_one_response


def plugins(*entries: dict, before: bool = True) -> str:
    lines = ["[plugins]", f"apply_before_domain_match = {'true' if before else 'false'}"]
    for e in entries:
        lines.append("[[plugins.plugins]]")
        for k, v in e.items():
            if isinstance(v, bool):
                lines.append(f"{k} = {'true' if v else 'false'}")
            elif isinstance(v, (int, float)):
                lines.append(f"{k} = {v}")
            elif isinstance(v, dict):
                inner = ", ".join(f'"{ik}" = "{iv}"' for ik, iv in v.items())
                lines.append(f"{k} = {{ {inner} }}")
            else:
                lines.append(f'{k} = "{v}"')
    return "\n".join(lines) + "\n"


T = "tests.support.filters:"


def upstream_header(origin, name: bytes) -> bytes | None:
    """The value of ``name`` in the last request the origin saw."""
    _, _, headers, _ = origin.requests[-1]
    for k, v in headers:
        if k.lower() == name:
            return v
    return None


def test_a_global_filter_edits_the_request_and_the_response(dispa, origin):
    d = dispa(targets=[("a", origin.url)],
              extra=plugins({"name": "tag", "type": T + "Tag",
                             "config": {"header": "x-tag", "value": "seen"}}))
    status, headers, body = http_get(d.port, "/headers")
    assert status == 200
    assert upstream_header(origin, b"x-tag") == b"seen"  # on_request reached upstream
    assert headers["x-tag"] == "seen"  # on_response reached the client


def test_async_hooks_short_circuit_and_pass(dispa, origin):
    d = dispa(targets=[("a", origin.url)],
              extra=plugins({"name": "gate", "type": T + "AsyncGate"}))
    status, headers, body = http_get(d.port, "/")
    assert status == 401 and body == b"no token\n" and headers["www-authenticate"] == "Token"
    assert origin.requests == []
    status, headers, body = http_get(d.port, "/", headers={"x-token": "ok"})
    assert status == 200 and body == b"ok from origin-a"
    assert headers["x-gate"] == "passed"


def test_async_request_phase_holds_a_request_body_until_it_ends(dispa, origin):
    d = dispa(targets=[("a", origin.url)],
              extra=plugins({"name": "gate", "type": T + "AsyncGate"}))
    body = b"x" * 300_000
    status, _, got = http_get(d.port, "/echo", method="POST", body=body,
                              headers={"x-token": "ok"})
    assert status == 200 and got == body


@pytest.mark.parametrize("strategy,expect", [("continue", 200), ("fail", 500)])
def test_a_raising_filter_obeys_its_error_strategy(dispa, origin, strategy, expect):
    d = dispa(targets=[("a", origin.url)],
              extra=plugins({"name": "boom", "type": T + "Boom", "error_strategy": strategy}))
    status, _, _ = http_get(d.port, "/")
    assert status == expect
    _, metrics = d.admin_get("/metrics")
    assert b'dispa_plugin_errors_total{kind="exception",plugin="boom",stage="request"} 1' \
        in metrics or b'dispa_plugin_errors_total{plugin="boom",stage="request",kind="exception"} 1' \
        in metrics


def test_a_hanging_async_filter_is_cut_by_its_timeout(dispa, origin):
    d = dispa(targets=[("a", origin.url)],
              extra=plugins({"name": "hang", "type": T + "Hang", "timeout": 0.3,
                             "error_strategy": "fail"}))
    status, _, _ = http_get(d.port, "/")
    assert status == 500
    _, metrics = d.admin_get("/metrics")
    assert b'kind="timeout"' in metrics


def test_response_body_hook_reframes_the_body(dispa, origin):
    d = dispa(targets=[("a", origin.url)],
              extra=plugins({"name": "up", "type": T + "Upper"}))
    status, headers, body = http_get(d.port, "/")
    assert status == 200 and body == b"OK FROM ORIGIN-A"
    assert "content-length" not in headers and headers["transfer-encoding"] == "chunked"
    status, headers, body = http_get(d.port, "/bytes?n=200000")
    assert status == 200 and len(body) == 200000


def test_on_response_may_replace_an_upstream_error(dispa, origin):
    d = dispa(targets=[("a", origin.url)],
              extra=plugins({"name": "rep", "type": T + "Replace"}))
    status, _, body = http_get(d.port, "/status/502")
    assert status == 503 and body == b"friendly error page\n"
    # the connection still works afterwards
    status, _, body = http_get(d.port, "/")
    assert status == 200


def test_request_body_hook_refuses_a_large_body_with_413(dispa, origin):
    d = dispa(targets=[("a", origin.url)],
              extra=plugins({"name": "lim", "type": T + "Limit"}))
    status, _, got = http_get(d.port, "/echo", method="POST", body=b"short")
    assert status == 200 and got == b"short"
    s = socket.create_connection(("127.0.0.1", d.port), timeout=5)
    s.sendall(b"POST /echo HTTP/1.1\r\nHost: example.com\r\nTransfer-Encoding: chunked\r\n\r\n"
              b"20\r\n" + b"y" * 32 + b"\r\n0\r\n\r\n")
    status, _, body = read_one_response(s)
    s.close()
    assert status == 413 and body == b"body too large\n"


def test_global_filters_run_before_interception_by_default(dispa, origin):
    extra = plugins({"name": "gate", "type": T + "AsyncGate"})
    d = dispa(targets=[("a", origin.url)], domains={"intercept_domains": ["example.com"]},
              extra=extra)
    # not intercepted, but the global gate answers first (the original default)
    status, _, _ = http_get(d.port, "/", host="other.test")
    assert status == 401
    status, _, _ = http_get(d.port, "/", host="other.test", headers={"x-token": "ok"})
    assert status == 404
    d2 = dispa(targets=[("a", origin.url)], domains={"intercept_domains": ["example.com"]},
               extra=plugins({"name": "gate", "type": T + "AsyncGate"}, before=False))
    status, _, _ = http_get(d2.port, "/", host="other.test")
    assert status == 404


def test_plugin_invocations_are_counted(dispa, origin):
    d = dispa(targets=[("a", origin.url)], extra=plugins({"name": "noop", "type": T + "Noop"}))
    for _ in range(5):
        assert http_get(d.port, "/")[0] == 200
    _, metrics = d.admin_get("/metrics")
    line = [ln for ln in metrics.decode().splitlines()
            if ln.startswith("dispa_plugin_invocations_total") and 'plugin="noop"' in ln]
    assert line and line[0].endswith(" 5"), line


def test_a_bad_plugin_config_is_refused_with_its_path(tmp_path):
    from dispa.config.load import load_config_text
    from dispa.errors import ConfigError

    text = ('[[targets.targets]]\nname = "a"\nurl = "http://127.0.0.1:9"\n'
            + plugins({"name": "t", "type": T + "Tag", "config": {"nope": "1"}})
            + plugins({"name": "t", "type": "no-such-type"}).replace("[plugins]\n", "")
            .replace("apply_before_domain_match = true\n", ""))
    with pytest.raises(ConfigError) as err:
        load_config_text(text, fmt="toml", name="x.toml")
    msg = str(err.value)
    assert "plugins.plugins[0].config" in msg and "nope" in msg
    assert "duplicate plugin name 't'" in msg
    assert "unknown plugin type 'no-such-type'" in msg


def test_a_filter_returning_garbage_is_counted_and_obeys_its_strategy(dispa, origin):
    d = dispa(targets=[("a", origin.url)],
              extra=plugins({"name": "junk", "type": T + "Garbage", "error_strategy": "fail"}))
    assert http_get(d.port, "/")[0] == 500
    _, metrics = d.admin_get("/metrics")
    assert b'kind="bad_return"' in metrics and b'plugin="junk"' in metrics


def test_a_bad_plugin_config_at_reload_is_refused_and_the_old_chain_keeps_working(
        dispa, origin):
    import signal
    import time

    d = dispa(targets=[("a", origin.url)],
              extra=plugins({"name": "tag", "type": T + "Tag",
                             "config": {"header": "x-tag", "value": "v1"}}))
    good = d.config_path.read_text()
    d.config_path.write_text(good.replace('"header" = "x-tag"', '"hedaer" = "x-tag"'))
    d.signal(signal.SIGHUP)
    deadline = time.monotonic() + 20
    st = d.status()
    while time.monotonic() < deadline and st["reloads"]["failed"] < 1:
        time.sleep(0.05)
        st = d.status()
    assert st["reloads"]["failed"] == 1
    assert any("plugins.plugins[0].config" in (e.get("path") or "") and "hedaer" in e["message"]
               for e in st["config_errors"]), st["config_errors"]
    status, headers, _ = http_get(d.port, "/")
    assert status == 200 and headers["x-tag"] == "v1"


def test_async_response_hooks_with_a_close_delimited_upstream(dispa, origin):
    # the upstream sends its whole response and closes while the async hook runs
    d = dispa(targets=[("a", origin.url)],
              extra=plugins({"name": "gate", "type": T + "AsyncGate"}))
    status, headers, body = http_get(d.port, "/close?n=5000", headers={"x-token": "ok"})
    assert status == 200 and body == b"c" * 5000 and headers["x-gate"] == "passed"
