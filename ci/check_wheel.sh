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

# The README's main job from the installed wheel: `dispa-server` with no config serves a
# proxied response from the built-in demo upstream (ports moved off 8080/8081 here).
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
ADMIN=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
"$WORK/venv/bin/dispa-server" --demo-bind "127.0.0.1:$PORT" --demo-admin-port "$ADMIN" >"$WORK/demo.log" 2>&1 &
DEMO=$!
ok=""
for _ in $(seq 1 100); do
  if body=$(curl -fsS "http://127.0.0.1:$PORT/hello" 2>/dev/null); then ok=1; break; fi
  sleep 0.1
done
kill -TERM "$DEMO"; wait "$DEMO" || true
[ -n "$ok" ] || { echo "demo did not answer"; cat "$WORK/demo.log"; exit 1; }
echo "$body" | grep -q "Hello from the Dispa demo upstream"
echo "demo OK: $(echo "$body" | head -1)"
echo "wheel OK: $(ls "$WORK"/dist)"
