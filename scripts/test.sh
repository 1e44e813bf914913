#!/usr/bin/env bash
# The whole test suite: installs what it needs, runs every Rust test, then
# drives `isthmusctl up` the way a user would. Tests that need root for
# network namespaces, Envoy or etcd print why they skip when those are
# missing; with CI=true they fail instead. The summary names both.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
export PATH="$PWD/.venv/bin:$PATH"

log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
# --no-fail-fast: run every test binary, so the summary names every failure.
cargo test --workspace --all-targets --locked --no-fail-fast 2>&1 | tee "$log" || status=$?

scripts/smoke-up.sh && smoke=1 || { smoke=0; status=1; }

# The closing summary: which tests failed, which could not run here
# (isthmus_e2e::skip prints `SKIPPED NAME: REASON`; with CI=true it fails
# the test instead), then one line with the counts.
read -r passed failed < <(awk '/^test result:/ {p += $4; f += $6} END {print p+0, f+0}' "$log")
failed_names=$(sed -n 's/^---- \(.*\) stdout ----$/\1/p' "$log" | sort -u)
skipped_lines=$(grep -o 'SKIPPED [^:]*: .*' "$log" | sed 's/^SKIPPED //' | sort -u || true)
skipped=0
[ -z "$skipped_lines" ] || skipped=$(wc -l <<<"$skipped_lines")
# A skipped test returns early and so counts as passed in libtest's line.
passed=$((passed - skipped + smoke))
failed=$((failed + 1 - smoke))
echo
if [ -n "$failed_names" ] || [ "$smoke" = 0 ]; then
  echo "failed:"
  [ -z "$failed_names" ] || sed 's/^/  /' <<<"$failed_names"
  [ "$smoke" = 1 ] || echo "  scripts/smoke-up.sh"
fi
if [ "$status" != 0 ] && ! grep -q '^test result:' "$log"; then
  echo "cargo test ran no test: see the build errors above"
fi
if [ -n "$skipped_lines" ]; then
  echo "skipped (could not run their scenario here):"
  sed 's/^/  /' <<<"$skipped_lines"
fi
echo "suite: ${passed} passed, ${failed} failed, ${skipped} skipped"
exit "$status"
