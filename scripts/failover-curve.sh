#!/usr/bin/env bash
# The Raft timing trade-off behind the defaults: for each setting (rationd timing
# flags in one argument; "" is the defaults), 20 SIGKILLs of the leader of three
# rationd processes (longest time without a successful write after each) and 60 s
# with every core busy and no fault (leader changes).
# Usage: scripts/failover-curve.sh [SETTING ...]   (default: the settings below)
# Prints one `curve:` line per setting; benches/README.md has the last results.
set -euo pipefail
cd "$(dirname "$0")/.."
settings=("$@")
if [ ${#settings[@]} -eq 0 ]; then
  settings=(
    ""
    "--leader-lease-ms 1000 --election-timeout-min-ms 500 --election-timeout-max-ms 1000 --heartbeat-ms 125 --replication-timeout-ms 375"
    "--leader-lease-ms 100 --election-timeout-min-ms 200 --election-timeout-max-ms 400 --heartbeat-ms 50 --replication-timeout-ms 200"
    "--voter-rtt-ms 100"
  )
fi
cargo build --release -p rationd --tests >/dev/null 2>&1 || cargo build --release -p rationd --tests
for s in "${settings[@]}"; do
  RATION_CURVE_ARGS="$s" cargo test --release -p rationd --test failover election_timeout_curve \
    -- --ignored --nocapture 2>&1 | grep '^curve:' || echo "curve: $s: the run failed"
done
