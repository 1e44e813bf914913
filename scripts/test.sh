#!/usr/bin/env bash
# The whole test suite: installs what it needs, runs every Rust test, then
# drives `isthmusctl up` the way a user would (acceptance contract of the
# walking skeleton). Tests that need root for network namespaces print why
# they skip when not root; CI runs as root.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
export PATH="$PWD/.venv/bin:$PATH"

cargo test --workspace --locked

scripts/smoke-up.sh
