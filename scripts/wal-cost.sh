#!/usr/bin/env bash
# What the durable write-ahead log costs: ration-load against a fresh 3-node
# cluster with the Raft log in the WAL (fdatasync before every acknowledgement) and
# in sled (the store before it; a power cut can undo its flush), batched and one
# operation per RPC, alternating, two rounds each, in one run on this machine.
#
#   scripts/wal-cost.sh [duration_s]
#
# Prints each run's line and the WAL/sled ratios. Release build.
set -euo pipefail
cd "$(dirname "$0")/.."
duration="${1:-10}"
cargo build --release -q -p rationd -p ration-load
load=./target/release/ration-load
out=$(mktemp)
for round in 1 2; do
  for mode in "batch:--batch 256 --concurrency 12" "single:--concurrency 512"; do
    name="${mode%%:*}"; flags="${mode#*:}"
    for store in wal sled; do
      line=$($load $flags --log-store "$store" --warmup-s 3 --duration-s "$duration" | tr '\n' ' ')
      opss=$(echo "$line" | grep -o '[0-9]* ops/s' | head -1 | cut -d' ' -f1)
      echo "round $round $name $store $opss | $line" | tee -a "$out"
    done
  done
done
echo
for name in batch single; do
  for round in 1 2; do
    wal=$(awk -v r="$round" -v n="$name" '$2==r && $3==n && $4=="wal" {print $5}' "$out")
    sled=$(awk -v r="$round" -v n="$name" '$2==r && $3==n && $4=="sled" {print $5}' "$out")
    echo "$name round $round: wal $wal ops/s, sled $sled ops/s, wal/sled = $(awk -v a="$wal" -v b="$sled" 'BEGIN {printf "%.2f", a/b}')"
  done
done
