#!/usr/bin/env bash
# The election-timeout trade-off behind the defaults: for each setting, 20 SIGKILLs
# of the leader of three rationd processes (longest time without a successful
# write after each) and 60 s with every core busy and no fault (leader changes).
# Usage: scripts/failover-curve.sh [min,max ...]   (default: four settings)
# Prints one `curve:` line per setting; benches/README.md has the last results.
set -euo pipefail
cd "$(dirname "$0")/.."
settings=("$@")
if [ ${#settings[@]} -eq 0 ]; then
  settings=(300,600 500,1000 750,1500 1000,2000)
fi
cargo build --release -p rationd --tests >/dev/null 2>&1 || cargo build --release -p rationd --tests
for s in "${settings[@]}"; do
  RATION_CURVE_ELECTION="$s" cargo test --release -p rationd --test failover election_timeout_curve \
    -- --ignored --nocapture 2>&1 | grep '^curve:' || echo "curve: election $s: the run failed"
done
