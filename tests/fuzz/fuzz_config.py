"""Fuzz target: the configuration loader raises only ConfigError, whatever the bytes.

Run with atheris (``pip install atheris``)::

    python tests/fuzz/fuzz_config.py -max_total_time=60 [corpus_dir]

The first input byte picks the format (even: TOML, odd: YAML); the rest is the document.
Seeds: the original example file and tests/golden/config/*.toml. Without atheris, the
bounded Hypothesis twin in tests/unit/config/test_fuzz.py runs in the normal test suite.
"""

from __future__ import annotations

import sys

from dispa.config import load_config_text
from dispa.errors import ConfigError


def test_one_input(data: bytes) -> None:
    """One fuzz iteration: any exception other than ConfigError is a finding."""
    if not data:
        return
    fmt = "yaml" if data[0] & 1 else "toml"
    text = data[1:].decode("utf-8", errors="replace")
    try:
        load_config_text(text, fmt=fmt, name="<fuzz>", env={"SET": "1"})
    except ConfigError:
        pass


def main() -> None:  # pragma: no cover - needs atheris
    import atheris

    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":  # pragma: no cover
    main()
