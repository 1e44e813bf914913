#!/usr/bin/env bash
# Runs `isthmusctl up multi-network --detach`, executes the command it prints
# last, checks the echo answered with the caller's SPIFFE ID, and checks that
# `down` leaves no process and no network namespace behind.
set -euo pipefail
cd "$(dirname "$0")/.."
state=$(mktemp -d)
out=$(mktemp)
cleanup() { cargo run -q -p isthmusctl -- down --state-dir "$state" >/dev/null 2>&1 || true; rm -rf "$state" "$out" "$out.err"; }
trap cleanup EXIT

cargo run -q -p isthmusctl -- up multi-network --detach --state-dir "$state" | tee "$out"
cmd=$(tail -n 1 "$out")
answer=$(bash -c "$cmd")
echo "$answer"
grep -q 'URI=spiffe://cluster.local/ns/demo/sa/client' <<<"$answer" || { echo "smoke: the echo did not see the caller's SPIFFE ID"; exit 1; }
grep -q '"cluster": "east"' <<<"$answer" || { echo "smoke: the answer names no cluster"; exit 1; }

# Config goes through the CLI, is validated, and reads back.
cargo run -q -p isthmusctl -- apply -f samples/config/echo-canary.yaml --state-dir "$state"
cargo run -q -p isthmusctl -- get virtualservices -n demo --state-dir "$state" | grep -q '^VirtualService *demo *echo' \
  || { echo "smoke: the applied VirtualService does not read back"; exit 1; }
if sed 's/weight: 10/weight: 20/' samples/config/echo-canary.yaml | cargo run -q -p isthmusctl -- apply -f - --state-dir "$state" 2>"$out.err"; then
  echo "smoke: weights summing to 110 were accepted"; exit 1
fi
grep -q 'spec.http\[0\].route\[1\].weight: weights must sum to 100' "$out.err" || { echo "smoke: no field path in: $(cat "$out.err")"; exit 1; }

status=$(cargo run -q -p isthmusctl -- status --state-dir "$state" -o json)
pids=$(python3 -c 'import json,sys; print(" ".join(str(c["pid"]) for c in json.load(sys.stdin)["components"]))' <<<"$status")
prefixes=$(python3 -c 'import json,sys; print(" ".join(sorted({c["netns"].split("-")[0] for c in json.load(sys.stdin)["components"] if c["netns"]})))' <<<"$status")

cargo run -q -p isthmusctl -- down --state-dir "$state"
for pid in $pids; do
  if kill -0 "$pid" 2>/dev/null && ! grep -q '^State:.*Z' "/proc/$pid/status" 2>/dev/null; then
    echo "smoke: process $pid is still running after down"; exit 1
  fi
done
for p in $prefixes; do
  if ls /run/netns 2>/dev/null | grep -q "^$p-"; then echo "smoke: namespaces $p-* remain after down"; exit 1; fi
done
echo "smoke: up, request, status and down behaved"
