#!/usr/bin/env bash
# CSR-to-certificate signing per core against the raw ECDSA P-256 signature
# rate of the same provider, and its verification rate (the bound when the
# CSR signature is checked), in one run (median of ROUNDS). Pinned to one
# CPU so "per core" means what it says.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-2000}
ROUNDS=${2:-5}
cargo build -q --release -p isthmus-ca --example signing_bench
taskset -c 0 target/release/examples/signing_bench "$N" "$ROUNDS"
