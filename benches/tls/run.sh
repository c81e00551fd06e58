#!/usr/bin/env bash
# The cost of TLS (issue #15): ration-load against three nodes it starts itself,
# plaintext and with mutual TLS (`--tls`: a development CA, peers on ports of their
# own), same flags otherwise, alternating modes so drift hits both alike. Two
# workloads: Batch (256 operations per RPC, 12 in flight) and one operation per
# RPC (512 in flight). Prints a Markdown table of ops/s and the TLS/plaintext
# ratio per round.
#
#   benches/tls/run.sh                 # 2 rounds of 15 s per run (about 3 min)
#   ROUNDS=3 SECONDS_PER_RUN=30 benches/tls/run.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN=${CARGO_TARGET_DIR:-target}/release
if [ ! -x "$BIN/ration-load" ] || [ ! -x "$BIN/rationd" ]; then
  cargo build --release -p rationd -p ration-load
fi
ROUNDS=${ROUNDS:-2}
DUR=${SECONDS_PER_RUN:-15}

# ops/s of one ration-load run (its summary line: "N ops in T s: R ops/s; ...").
ops() {
  "$BIN/ration-load" --warmup-s 3 --duration-s "$DUR" "$@" 2>&1 |
    sed -nE 's/^[0-9]+ ops in [0-9.]+ s: ([0-9]+) ops\/s.*/\1/p' | tail -n 1
}

echo "TLS cost, $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git rev-parse --short HEAD), $(nproc) CPUs, $ROUNDS rounds of $DUR s per run"
echo
echo "| round | workload | plaintext ops/s | TLS ops/s | TLS / plaintext |"
echo "|---|---|---|---|---|"
for round in $(seq 1 "$ROUNDS"); do
  for workload in batch single; do
    if [ "$workload" = batch ]; then args=(--batch 256 --concurrency 12); else args=(--concurrency 512); fi
    plain=$(ops "${args[@]}")
    tls=$(ops "${args[@]}" --tls)
    ratio=$(awk -v t="$tls" -v p="$plain" 'BEGIN { if (p > 0) printf "%.2f", t / p; else print "n/a" }')
    echo "| $round | $workload | $plain | $tls | $ratio |"
  done
done
