#!/usr/bin/env bash
# Runs docs/running-by-hand.md as written: every ```sh host=NAME block runs,
# in order, in the network namespace that stands for host NAME (`all` blocks
# are prepended to every block). The hosts share one working directory, so
# the guide's "copy this file to that host" steps need nothing. Needs root
# and iproute2; isthmusctl and curl must be on PATH. Prints each block's
# output after a `== BLOCK on HOST` line. Usage: by_hand.sh GUIDE WORKDIR
set -euo pipefail
guide=$1
work=$2
prefix="bh$$"
declare -A addr=([primary]=10.77.0.1 [east]=10.77.0.2 [west]=10.77.0.3)

cleanup() {
  for ns in "${!addr[@]}"; do
    local pids
    pids=$(ip netns pids "$prefix-$ns" 2>/dev/null || true)
    # Only what this run started in its own namespaces.
    [ -z "$pids" ] || kill $pids 2>/dev/null || true
  done
  for ns in "${!addr[@]}"; do
    timeout 15 sh -c "while [ -n \"\$(ip netns pids $prefix-$ns 2>/dev/null)\" ]; do sleep 0.2; done" || {
      pids=$(ip netns pids "$prefix-$ns" 2>/dev/null || true)
      [ -z "$pids" ] || kill -9 $pids 2>/dev/null || true
    }
    ip netns del "$prefix-$ns" 2>/dev/null || true
  done
  ip netns del "$prefix-wan" 2>/dev/null || true
}
trap cleanup EXIT

# One "wan" namespace holds a bridge; each host is a namespace with a veth
# on it.
ip netns add "$prefix-wan"
ip -n "$prefix-wan" link add br0 type bridge
ip -n "$prefix-wan" link set br0 up
for h in "${!addr[@]}"; do
  ns="$prefix-$h"
  ip netns add "$ns"
  ip -n "$ns" link set lo up
  ip link add "$prefix-$h" netns "$prefix-wan" type veth peer name eth0 netns "$ns"
  ip -n "$prefix-wan" link set "$prefix-$h" master br0 up
  ip -n "$ns" addr add "${addr[$h]}/24" dev eth0
  ip -n "$ns" link set eth0 up
done

# The guide's blocks, in order: blocks/NN-HOST.sh.
blocks="$work/.blocks"
mkdir -p "$blocks"
awk -v dir="$blocks" '
  /^```sh host=/ { n++; host = substr($2, 6); file = sprintf("%s/%02d-%s.sh", dir, n, host); next }
  /^```/ { file = ""; next }
  file != "" { print > file }
' "$guide"
preamble=$(cat "$blocks"/*-all.sh 2>/dev/null || true)

for block in "$blocks"/*.sh; do
  host=$(basename "$block" .sh)
  host=${host#*-}
  [ "$host" = all ] && continue
  [ -n "${addr[$host]:-}" ] || { echo "by_hand: $block names an unknown host $host" >&2; exit 1; }
  echo "== $(basename "$block") on $host"
  if ! last_output=$(cd "$work" && ip netns exec "$prefix-$host" bash -euo pipefail -c "$preamble
$(cat "$block")" 2>&1); then
    echo "by_hand: $(basename "$block") failed on $host:" >&2
    echo "$last_output" >&2
    for log in "$work"/*/*.log; do
      [ -f "$log" ] || continue
      echo "--- $log (last lines)" >&2
      tail -n 15 "$log" >&2
    done
    exit 1
  fi
  [ -z "$last_output" ] || echo "$last_output"
done
