#!/usr/bin/env bash
# The primary's Delta ADS at scale: a release primary process, CLIENTS
# Delta-ADS clients over real gRPC and mTLS (one connection each), SERVICES
# services of ENDPOINTS endpoints; endpoint-change latency to every client
# (p50, p99), primary RSS per client, CPU for a full push.
set -euo pipefail
cd "$(dirname "$0")/.."
CLIENTS=${1:-1000}
SERVICES=${2:-1000}
ENDPOINTS=${3:-10}
CHANGES=${4:-20}
if [ "$(ulimit -n)" -lt $((CLIENTS * 3)) ]; then ulimit -n $((CLIENTS * 4)) || true; fi
cargo build -q --release -p isthmusctl
cargo build -q --release -p isthmus-e2e --example xds_scale
target/release/examples/xds_scale target/release/isthmusctl "$CLIENTS" "$SERVICES" "$ENDPOINTS" "$CHANGES"
