#!/usr/bin/env bash
# The sidecar data plane side by side in one run: requests through two
# isthmus-proxy sidecars (mTLS between them), the same through two Envoy
# 1.40 sidecars, and straight to the app (the physical limit), at one
# connection and at CONNECTIONS; req/s, p50/p99, sidecar CPU per request
# and RSS, with ratios. Loopback; release builds; needs Envoy in .venv.
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_PER_RUN=${1:-10}
CONNECTIONS=${2:-32}
scripts/install-deps.sh >/dev/null
export PATH="$PWD/.venv/bin:$PATH"
cargo build -q --release -p isthmusctl
cargo build -q --release -p isthmus-e2e --example data_plane
target/release/examples/data_plane target/release/isthmusctl "$SECONDS_PER_RUN" "$CONNECTIONS"
