#!/usr/bin/env bash
# The whole test suite: installs what it needs, runs every Rust test, then
# drives `isthmusctl up` the way a user would. Tests that need root for
# network namespaces print why they skip when not root; CI runs as root.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
export PATH="$PWD/.venv/bin:$PATH"

log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
cargo test --workspace --all-targets --locked 2>&1 | tee "$log" || status=$?

scripts/smoke-up.sh && smoke=1 || { smoke=0; status=1; }

# One closing line for the whole run.
read -r passed failed < <(awk '/^test result:/ {p += $4; f += $6} END {print p+0, f+0}' "$log")
passed=$((passed + smoke))
failed=$((failed + 1 - smoke))
echo "suite: ${passed} passed, ${failed} failed"
exit "$status"
