#!/usr/bin/env bash
# The README's test command: set up everything on a fresh machine and run the whole suite.
#   bash ci/test.sh            compiled build, then the pure-Python twins, then the fuzz smoke
#   FAST=1 bash ci/test.sh     skip the slow e2e tests
set -euo pipefail
# the nginx hash trace test must run, never skip, in CI (nginx-light is installed)
export DISPA_REQUIRE_NGINX=1
cd "$(dirname "$0")/.."
bash ci/install-system-deps.sh
# h2spec (HTTP/2 conformance, tests/conformance): a pinned version from the Go module proxy
export PATH="$PATH:/usr/local/go/bin"
if ! command -v go >/dev/null 2>&1; then
  # no Go toolchain on this machine (the reference machine has one): Debian's
  SUDO=""
  [ "$(id -u)" = 0 ] || SUDO="sudo"
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq golang-go >/dev/null
fi
if [ ! -x "$HOME/go/bin/h2spec" ]; then
  GOBIN=$HOME/go/bin go install github.com/summerwind/h2spec/cmd/h2spec@v2.2.1+incompatible
fi
export H2SPEC="$HOME/go/bin/h2spec"
export PATH="$HOME/.cargo/bin:$PATH"
python3 -m pip install -q --upgrade pip >/dev/null
# Editable install: compiles dispa/_hotpath*.so and dispa/_rust*.so into the source tree, so
# the tests, the worker subprocesses and `python -m dispa` all use the compiled parts.
python3 -m pip install -q -e '.[test]'
python3 -m dispa --version

PYTEST_ARGS=(-q -p no:cacheprovider)
[ "${FAST:-0}" = 1 ] && PYTEST_ARGS+=(-m "not slow")

echo "== compiled build: full suite"
python3 -m pytest "${PYTEST_ARGS[@]}" tests

echo "== pure-Python twins (DISPA_NO_EXTENSIONS=1): unit, golden, fuzz and integration"
DISPA_NO_EXTENSIONS=1 python3 -m pytest "${PYTEST_ARGS[@]}" -m "not slow" tests/unit tests/fuzz tests/integration tests/meta

echo "== workers as fresh interpreters (DISPA_SPAWN=exec) instead of forked: the runtime tests"
DISPA_SPAWN=exec python3 -m pytest "${PYTEST_ARGS[@]}" tests/e2e/test_runtime.py
