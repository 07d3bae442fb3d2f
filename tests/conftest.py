"""Shared fixtures: real origins and real dispa-server processes on 127.0.0.1."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.support.dispa_proc import DispaProcess, free_port, render_config  # noqa: E402
from tests.support.origin import Origin  # noqa: E402

SHARED = ROOT.parent / "shared"


def pytest_report_header(config):
    from dispa import _native
    info = _native.build_info()
    return (f"dispa build: hotpath in use={info['hotpath']['in_use']}, "
            f"rust in use={info['rust']['in_use']}, "
            f"DISPA_NO_EXTENSIONS={os.environ.get('DISPA_NO_EXTENSIONS', '')!r}")


@pytest.fixture
def origin():
    o = Origin("origin-a").start()
    yield o
    o.stop()


@pytest.fixture
def origins():
    started = []

    def make(name: str) -> Origin:
        o = Origin(name).start()
        started.append(o)
        return o

    yield make
    for o in started:
        o.stop()


@pytest.fixture
def dispa(tmp_path):
    """Factory: ``dispa(targets=[(name, url)], ...) -> DispaProcess`` (ready, stopped at teardown)."""
    procs = []

    def start(*, workers: str | None = None, wait_workers: int | None = None, env=None,
              args=None, config_text: str | None = None, **cfg) -> DispaProcess:
        port = cfg.pop("port", None) or free_port()
        admin_port = cfg.pop("admin_port", None) or free_port()
        text = config_text if config_text is not None else render_config(
            port=port, admin_port=admin_port, **cfg)
        path = tmp_path / f"dispa-{len(procs)}.toml"
        path.write_text(text)
        p = DispaProcess(path, workers=workers, env=env, args=args, port=port,
                         admin_port=admin_port)
        procs.append(p)
        return p.wait_ready(workers=wait_workers)

    yield start
    for p in procs:
        p.stop()
