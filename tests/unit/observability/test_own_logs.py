"""Dispa's own logs: one line per record in json / logfmt / text, runtime level changes."""

from __future__ import annotations

import io
import logging
import re

import msgspec
import pytest

from dispa.observability import logs

TS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


@pytest.fixture
def out():
    buf = io.StringIO()
    yield buf
    logs.configure("json", "info", stream=io.StringIO())


def lines(buf: io.StringIO) -> list[str]:
    return buf.getvalue().splitlines()


def test_json_line_has_core_keys_and_structured_fields(out):
    logs.configure("json", "info", stream=out, process="worker-3")
    logging.getLogger("dispa.server.worker").info(
        "worker started", extra=logs.fields(worker=3, port=8080))
    [line] = lines(out)
    d = msgspec.json.decode(line)
    assert list(d)[:6] == ["ts", "level", "logger", "process", "pid", "msg"]
    assert TS.match(d["ts"])
    assert d["level"] == "info"
    assert d["logger"] == "dispa.server.worker"
    assert d["process"] == "worker-3"
    assert isinstance(d["pid"], int)
    assert d["msg"] == "worker started"
    assert d["worker"] == 3 and d["port"] == 8080


def test_field_named_like_a_core_key_does_not_hide_it(out):
    logs.configure("json", stream=out)
    logging.getLogger("dispa").info("spawned", extra=logs.fields(pid=123, msg="x"))
    d = msgspec.json.decode(lines(out)[0])
    assert d["pid"] != 123 and d["field.pid"] == 123 and d["field.msg"] == "x"
    assert d["msg"] == "spawned"


def test_exception_is_one_line_with_type_message_and_stack(out):
    logs.configure("json", stream=out)
    try:
        raise ValueError("boom\nsecond line")
    except ValueError:
        logging.getLogger("dispa.x").exception("failed")
    [line] = lines(out)
    d = msgspec.json.decode(line)
    assert d["level"] == "error"
    assert d["exc"] == "ValueError: boom second line"
    assert "test_own_logs.py:" in d["stack"] and "\n" not in d["stack"]


def test_logfmt_quotes_values_per_logfmt_rules(out):
    logs.configure("logfmt", stream=out, process="master")
    logging.getLogger("dispa.m").warning(
        'reload "failed"', extra=logs.fields(path="/etc/d ispa.toml", n=2, ok=False, none=None,
                                             empty="", eq="a=b", plain="abc"))
    [line] = lines(out)
    assert line.startswith("ts=")
    assert " level=warning logger=dispa.m process=master pid=" in line
    assert ' msg="reload \\"failed\\""' in line
    assert ' path="/etc/d ispa.toml"' in line
    assert " n=2 ok=false none=null" in line
    assert ' empty=""' in line and ' eq="a=b"' in line and " plain=abc" in line


def test_logfmt_exception_and_newlines_stay_on_one_line(out):
    logs.configure("logfmt", stream=out)
    try:
        1 / 0
    except ZeroDivisionError:
        logging.getLogger("dispa").error("multi\nline", exc_info=True)
    [line] = lines(out)
    assert 'msg="multi\\nline"' in line
    assert 'exc="ZeroDivisionError: division by zero"' in line


def test_text_format_is_human_readable_with_traceback(out):
    logs.configure("text", stream=out, process="master")
    try:
        raise KeyError("k")
    except KeyError:
        logging.getLogger("dispa.t").exception("oops", extra=logs.fields(a=1))
    text = out.getvalue()
    first = text.splitlines()[0]
    assert re.match(r"^\S+Z ERROR +master\[\d+\] dispa\.t: oops a=1$", first)
    assert "Traceback" in text


def test_bad_field_value_is_reprd_never_raises(out):
    logs.configure("json", stream=out)

    class Weird:
        def __repr__(self):
            return "<weird>"

    logging.getLogger("dispa").info("x", extra=logs.fields(obj=Weird(), d={1.5: Weird()}))
    d = msgspec.json.decode(lines(out)[0])
    assert d["obj"] == "<weird>"
    assert "d" in d


@pytest.mark.parametrize("formatter", [logs.JsonFormatter, logs.LogfmtFormatter,
                                       logs.TextFormatter])
def test_bad_format_args_never_raise(formatter):
    # Called directly: pytest's own capture handler would raise on the bad record first.
    record = logging.LogRecord("dispa", logging.INFO, __file__, 1, "%d items",
                               ("not-a-number",), None)
    line = formatter(process="master").format(record)
    assert "%d items" in line and "\n" not in line


def test_set_level_changes_filtering_at_runtime(out):
    logs.configure("json", "info", stream=out)
    log = logging.getLogger("dispa.y")
    log.debug("hidden")
    logs.set_level("DEBUG")
    assert logs.get_level() == "debug"
    log.debug("shown")
    logs.set_level("warning")
    log.info("hidden too")
    assert [msgspec.json.decode(x)["msg"] for x in lines(out)] == ["shown"]
    assert logs.get_level() == "warning"


@pytest.mark.parametrize("bad", ["loud", "", "INFO2", 10, None])
def test_set_level_rejects_unknown_levels(bad):
    before = logs.get_level()
    with pytest.raises(ValueError):
        logs.set_level(bad)  # type: ignore[arg-type]
    assert logs.get_level() == before


def test_configure_rejects_unknown_format():
    with pytest.raises(ValueError, match="format"):
        logs.configure("xml")


def test_configure_twice_replaces_the_handler(out):
    logs.configure("json", stream=io.StringIO())
    logs.configure("json", stream=out)
    logging.getLogger("dispa").info("once")
    assert len(lines(out)) == 1
    ours = [h for h in logging.getLogger("dispa").handlers if isinstance(h, logs._DispaHandler)]
    assert len(ours) == 1


def test_fields_helper_returns_extra_dict():
    assert logs.fields(a=1) == {"fields": {"a": 1}}
