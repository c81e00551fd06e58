#!/usr/bin/env bash
# Two rationd builds under the same ration-load workload, in turns, in one run:
# each round runs A then B, then B then A (the run that comes second in a pair
# was often faster on this machine, whichever build it was). Per run it prints
# the rate and the nodes' CPU per operation (user + system time of every rationd
# process from /proc, over 6 s in the middle of the measured 10 s).
#
#   benches/ab-node.sh /tmp/rationd-a /tmp/rationd-b --batch 256 --concurrency 12
#   ROUNDS=3 benches/ab-node.sh A B --nodes 1 --pipeline --concurrency 1024
#
# ration-load comes from the release build (`cargo build --release -p
# ration-load`). Environment variables reach both builds' nodes alike.
set -euo pipefail
cd "$(dirname "$0")/.."
A=${1:?usage: benches/ab-node.sh RATIOND_A RATIOND_B [ration-load flags]}
B=${2:?usage: benches/ab-node.sh RATIOND_A RATIOND_B [ration-load flags]}
shift 2
ROUNDS=${ROUNDS:-3}
LOAD=${CARGO_TARGET_DIR:-target}/release/ration-load
[ -x "$LOAD" ] || { echo "no $LOAD: cargo build --release -p ration-load" >&2; exit 1; }
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
# Each build under a name of its own, so its processes can be told apart.
cp "$A" "$WORK/rationd-a"
cp "$B" "$WORK/rationd-b"
TICK=$(getconf CLK_TCK)

cpu_ticks() { # program name -> user + system ticks of its processes
  local total=0 p
  for p in $(pgrep -x "$1"); do
    total=$((total + $(awk '{print $14 + $15}' "/proc/$p/stat")))
  done
  echo "$total"
}

one() { # a|b, then ration-load's flags
  local which=$1 out="$WORK/out" t0 t1 rate
  shift
  "$LOAD" --rationd "$WORK/rationd-$which" "$@" --warmup-s 2 --duration-s 10 >"$out" 2>&1 &
  local pid=$!
  sleep 5
  t0=$(cpu_ticks "rationd-$which")
  sleep 6
  t1=$(cpu_ticks "rationd-$which")
  wait "$pid" || { echo "ration-load failed:" >&2; cat "$out" >&2; exit 1; }
  rate=$(sed -nE 's/.* ([0-9]+) ops\/s;.*/\1/p' "$out" | head -n 1)
  awk -v w="$which" -v r="$ROUND" -v rate="$rate" -v d="$((t1 - t0))" -v tick="$TICK" \
    -v err="$(sed -nE 's/.*; ([0-9]+) errors$/\1/p' "$out" | head -n 1)" \
    'BEGIN { printf "round %s %s: %d ops/s, node CPU %.2f us per op, %s errors\n", r, w, rate, d / tick * 1e6 / (6 * rate), err }'
}

echo "A = $A, B = $B, ration-load $* ($ROUNDS rounds, each A B then B A)"
for ROUND in $(seq 1 "$ROUNDS"); do
  one a "$@"
  one b "$@"
  one b "$@"
  one a "$@"
done
