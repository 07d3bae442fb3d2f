"""Choose between the compiled modules and their pure-Python twins.

``DISPA_NO_EXTENSIONS=1`` selects the pure twins everywhere (aiohttp's ``NO_EXTENSIONS``);
otherwise the compiled module is used when it imports. ``build_info()`` reports what is in
use; ``dispa --version`` and ``dispa doctor`` print it.
"""

from __future__ import annotations

import os

NO_EXTENSIONS = os.environ.get("DISPA_NO_EXTENSIONS", "") not in ("", "0")

hotpath = None
rust = None
_hotpath_error: str | None = None
_rust_error: str | None = None

if not NO_EXTENSIONS:
    try:
        from dispa import _hotpath as hotpath  # type: ignore[no-redef]
    except ImportError as exc:  # pragma: no cover - depends on the build
        _hotpath_error = str(exc)
    try:
        from dispa import _rust as rust  # type: ignore[no-redef]
    except ImportError as exc:  # pragma: no cover - depends on the build
        _rust_error = str(exc)


def build_info() -> dict:
    """What is compiled and what is in use.

    Returns a dict with ``hotpath`` and ``rust`` entries, each holding ``built`` (the
    compiled module imports), ``in_use`` and the module's own ``version``/``debug`` info,
    plus ``no_extensions`` (the environment switch).
    """
    info: dict = {"no_extensions": NO_EXTENSIONS}
    for name, mod, err in (("hotpath", hotpath, _hotpath_error), ("rust", rust, _rust_error)):
        entry: dict = {"built": mod is not None, "in_use": mod is not None}
        if mod is not None:
            entry.update(getattr(mod, "build_info", lambda: {})())
        elif NO_EXTENSIONS:
            entry["reason"] = "DISPA_NO_EXTENSIONS is set"
        elif err:
            entry["reason"] = err
        info[name] = entry
    return info
