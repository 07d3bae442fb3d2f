"""The ``[http2]`` table and ``protocol`` key of target groups: defaults, compile, and
errors located with file, line and field."""

from __future__ import annotations

import pytest

from dispa.config.load import load_config_text
from dispa.errors import ConfigError
from dispa.protocols.http2 import limits_from

BASE = """
[[targets.targets]]
name = "a"
url = "http://127.0.0.1:9001"
"""


def load(text):
    return load_config_text(BASE + text, fmt="toml", name="dispa.toml")


def test_off_by_default():
    cfg = load("")
    assert cfg.snapshot.http2 is None and limits_from(cfg.snapshot.http2) is None
    assert {c.protocol for c in cfg.snapshot.clusters} == {"http1"}


def test_compiled_limits():
    cfg = load("[http2]\nenabled = true\nmax_concurrent_streams = 7\nabuse_window = 2\n"
               "idle_timeout = 5\nserver_push = true\n")
    lim = limits_from(cfg.snapshot.http2)
    assert lim.max_concurrent_streams == 7 and lim.abuse_window_seconds == 2.0
    assert lim.idle_timeout_seconds == 5.0 and lim.server_push is True


def test_target_group_protocol():
    cfg = load('[[target_groups]]\nname = "g"\nprotocol = "h2c"\n'
               '[[target_groups.targets]]\nname = "b"\nurl = "http://127.0.0.1:9002"\n')
    assert {c.name: c.protocol for c in cfg.snapshot.clusters}["g"] == "h2c"


@pytest.mark.parametrize("text, where, line", [
    ("[http2]\nmax_frame_size = 100\n", "http2.max_frame_size", 6),
    ("[http2]\nbogus = 1\n", "http2.bogus", 6),
    ('[[target_groups]]\nname = "g"\nprotocol = "h2"\n'
     '[[target_groups.targets]]\nname = "b"\nurl = "http://127.0.0.1:9002"\n',
     "target_groups[0].targets[0].url", 10),
    ('[tls]\nalpn = ["h2"]\n', "tls.alpn", 6),
])
def test_errors_name_file_line_and_field(text, where, line):
    with pytest.raises(ConfigError) as err:
        load(text)
    issues = err.value.errors
    hit = [i for i in issues if i.path == where]
    assert hit, [i.format() for i in issues]
    assert hit[0].file == "dispa.toml" and hit[0].line == line, hit[0].format()


def test_websocket_over_h2_on_by_default_and_switchable():
    assert limits_from(load("[http2]\nenabled = true\n").snapshot.http2).websocket is True
    off = load("[http2]\nenabled = true\nwebsocket = false\n").snapshot.http2
    assert limits_from(off).websocket is False
