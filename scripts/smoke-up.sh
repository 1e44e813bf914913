#!/usr/bin/env bash
# Runs `isthmusctl up multi-network --detach`, executes the command it prints
# last, checks the echo answered with the caller's SPIFFE ID, and checks that
# `down` leaves no process and no network namespace behind. On the way it
# applies config, kills the primary and restarts it with `isthmusctl
# restart`, and rotates the root, an intermediate and the root again.
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

# Secrets stay private: the state dir is 0700, its record 0600, and no join
# token is on any component's command line.
[ "$(stat -c %a "$state")" = 700 ] || { echo "smoke: $state is mode $(stat -c %a "$state"), not 700"; exit 1; }
[ "$(stat -c %a "$state/mesh.json")" = 600 ] || { echo "smoke: mesh.json is not mode 600"; exit 1; }
if grep -q 'ist1\.' "$state/mesh.json"; then echo "smoke: a join token is recorded on a command line"; exit 1; fi

# Config goes through the CLI, is validated, and reads back.
cargo run -q -p isthmusctl -- apply -f samples/config/echo-canary.yaml --state-dir "$state"
cargo run -q -p isthmusctl -- get virtualservices -n demo --state-dir "$state" | grep -q '^VirtualService *demo *echo' \
  || { echo "smoke: the applied VirtualService does not read back"; exit 1; }
if sed 's/weight: 10/weight: 20/' samples/config/echo-canary.yaml | cargo run -q -p isthmusctl -- apply -f - --state-dir "$state" 2>"$out.err"; then
  echo "smoke: weights summing to 110 were accepted"; exit 1
fi
grep -q 'spec.http\[0\].route\[1\].weight: weights must sum to 100' "$out.err" || { echo "smoke: no field path in: $(cat "$out.err")"; exit 1; }

# proxy-config shows what a proxy holds.
cargo run -q -p isthmusctl -- proxy-config client-east clusters --state-dir "$state" | grep -q 'outbound|8080||echo.demo.svc.cluster.local' \
  || { echo "smoke: proxy-config shows no echo cluster"; exit 1; }

ctl() { cargo run -q -p isthmusctl -- "$@" --state-dir "$state"; }

# The primary crashes (SIGKILL) and is brought back by the documented
# command; `status` follows the new process, the CA commands below run
# against it, and `down` at the end stops it.
primary_pid() { ctl status -o json | python3 -c 'import json,sys; print(next(c["pid"] for c in json.load(sys.stdin)["components"] if c["name"] == "primary"))'; }
old_pid=$(primary_pid)
kill -9 "$old_pid"
ctl restart primary | tee "$out"
grep -q '^primary restarted (pid [0-9]*)' "$out" || { echo "smoke: restart printed: $(cat "$out")"; exit 1; }
ctl status -o json | python3 -c '
import json, sys
p = next(c for c in json.load(sys.stdin)["components"] if c["name"] == "primary")
assert p["running"] and p["pid"] != int(sys.argv[1]), p
' "$old_pid" || { echo "smoke: status does not show the restarted primary running"; exit 1; }
for _ in $(seq 100); do ctl ca status >/dev/null 2>&1 && break; sleep 0.2; done
ctl ca status >/dev/null || { echo "smoke: the restarted primary does not answer"; exit 1; }

# The CA commands: a full root rotation and an intermediate rotation, then
# a second root rotation (the sequence that used to wedge phase 2); the
# status shows one root (the last) holding all three workloads, and a
# request still crosses the mesh.
old_root=$(ctl ca status -o json | python3 -c 'import json,sys; print(json.load(sys.stdin)["signingRoot"])')
ctl ca rotate-root | tee "$out"
grep -q '^done: root' "$out" || { echo "smoke: ca rotate-root did not finish"; exit 1; }
ctl ca rotate-intermediate east | tee "$out"
grep -q '^done: intermediate' "$out" || { echo "smoke: ca rotate-intermediate did not finish"; exit 1; }
ctl ca rotate-root | tee "$out"
grep -q '^done: root' "$out" || { echo "smoke: ca rotate-root after rotate-intermediate did not finish"; exit 1; }
ctl ca status -o json | python3 -c '
import json, sys
v = json.load(sys.stdin)
old = sys.argv[1]
assert [r["fingerprint"] for r in v["roots"]] == [v["signingRoot"]] != [old], v["roots"]
assert v["roots"][0]["workloads"] == 3, v["roots"]
assert all(c["root"] == v["signingRoot"] for c in v["clusters"]), v["clusters"]
' "$old_root" || { echo "smoke: ca status after the rotations is wrong"; exit 1; }
ctl ca status
bash -c "$cmd" | grep -q 'URI=spiffe://cluster.local/ns/demo/sa/client' || { echo "smoke: no request after the rotations"; exit 1; }

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
echo "smoke: up, request, config, CA rotation, status and down behaved"
