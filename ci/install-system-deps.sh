#!/usr/bin/env bash
# System packages the build, the tests and the benchmarks need (Debian 12).
# Idempotent: installs only what is missing. Needs root (or sudo).
set -euo pipefail
PKGS=(build-essential curl openssl nginx-light haproxy wrk procps etcd-server dnsmasq pebble bind9 bind9-utils postgresql nghttp2-client prometheus bind9-dnsutils iproute2)
missing=()
for p in "${PKGS[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
SUDO=""
[ "$(id -u)" = 0 ] || SUDO="sudo"
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing system packages: ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi
# The Rust toolchain builds dispa._rust; rustup is the supported way to get it.
if ! command -v cargo >/dev/null 2>&1; then
  if [ -x "$HOME/.cargo/bin/cargo" ]; then
    export PATH="$HOME/.cargo/bin:$PATH"
  else
    echo "cargo not found: install Rust (https://rustup.rs) or set DISPA_NO_RUST=1" >&2
    exit 1
  fi
fi
