"""ARCHITECTURE §4: imports point downwards.

``proxy`` may use ``routing``, ``balancer``, ``security``, ``observability``; none of those
import ``proxy`` or ``server``. ``config`` knows every feature's schema but no feature imports
``server``. Checked on the source (ast), so a lazy import inside a function counts too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[2] / "dispa"

# package -> packages it must never import
FORBIDDEN = {
    "routing": ("dispa.proxy", "dispa.server", "dispa.admin"),
    "balancer": ("dispa.proxy", "dispa.server", "dispa.admin"),
    "security": ("dispa.proxy", "dispa.server", "dispa.admin"),
    "observability": ("dispa.proxy", "dispa.server", "dispa.admin"),
    "config": ("dispa.proxy", "dispa.server", "dispa.admin"),
    "protocols": ("dispa.proxy", "dispa.server", "dispa.admin", "dispa.config"),
    "proxy": ("dispa.server", "dispa.admin"),
    "discovery": ("dispa.proxy", "dispa.server"),
    "tls": ("dispa.proxy", "dispa.server"),
    "plugins": ("dispa.server",),
    "admin": ("dispa.server", "dispa.proxy"),
    "l4": ("dispa.proxy", "dispa.server", "dispa.admin"),
}


def _imports(path: Path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.lineno, node.module


CASES = [(pkg, path) for pkg in FORBIDDEN for path in sorted((PKG / pkg).rglob("*.py"))]


@pytest.mark.parametrize("pkg,path", CASES, ids=[str(p.relative_to(PKG)) for _, p in CASES])
def test_imports_point_down(pkg, path):
    bad = [f"{path.relative_to(PKG)}:{line} imports {mod}"
           for line, mod in _imports(path)
           if any(mod == f or mod.startswith(f + ".") for f in FORBIDDEN[pkg])]
    assert not bad, "\n".join(bad)


def test_the_check_sees_every_package():
    assert len(CASES) > 20
