#!/usr/bin/env bash
# Build a wheel, install it with binaries only into a fresh venv (nothing compiled there), and
# check that it runs with its compiled parts in use, outside the source tree.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
WORK=$(mktemp -d /tmp/dispa-wheel.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
python3 -m pip install -q build
python3 -m build --wheel --outdir "$WORK/dist" >"$WORK/build.log" 2>&1 || { tail -40 "$WORK/build.log"; exit 1; }
python3 -m venv "$WORK/venv"
"$WORK/venv/bin/pip" install -q --only-binary=:all: "$WORK"/dist/dispa-*.whl
cd "$WORK"
out=$("$WORK/venv/bin/dispa" --version)
echo "$out"
echo "$out" | grep -q "dispa._hotpath): compiled, in use"
echo "$out" | grep -q "dispa._rust): compiled, in use"
"$WORK/venv/bin/dispa" config check "$ROOT/../shared/compat/config.example.toml"
echo "wheel OK: $(ls "$WORK"/dist)"
