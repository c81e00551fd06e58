#!/usr/bin/env bash
# Longer process-level chaos runs (docs/CHAOS.md): the chaos test of
# crates/rationd/tests/chaos.rs on a release build, once per seed, with a longer
# fault phase than CI's 20 s.
#
#   scripts/chaos.sh                      # 5 random seeds, 300 s of faults each
#   CHAOS_RUNS=20 RATION_CHAOS_SECS=120 scripts/chaos.sh
#   CHAOS_SEEDS="42 811028084" scripts/chaos.sh   # replay given seeds
#   CHAOS_PROFILE=debug scripts/chaos.sh          # the debug build, as in CI
#
# Each run's full output goes to $CHAOS_LOGS/seed-<seed>.log (default
# target/chaos/). RATION_CHAOS_KEEP=1 keeps every run's data directories and node
# logs; RATION_TEST_LOG=info makes the node logs verbose. Exits non-zero if any run
# failed, after running them all.
set -euo pipefail
cd "$(dirname "$0")/.."

secs=${RATION_CHAOS_SECS:-300}
runs=${CHAOS_RUNS:-5}
seeds=${CHAOS_SEEDS:-}
logs=${CHAOS_LOGS:-target/chaos}
profile=(--release)
if [[ ${CHAOS_PROFILE:-release} == debug ]]; then
    profile=()
fi

if [[ -z $seeds ]]; then
    for _ in $(seq "$runs"); do
        seeds+=" $(( $(od -An -N4 -tu4 /dev/urandom) % 1000000007 ))"
    done
fi

mkdir -p "$logs"
echo "chaos: building (${profile[*]:-debug})"
cargo test "${profile[@]}" -p rationd --test chaos --no-run

passed=() failed=()
for seed in $seeds; do
    log="$logs/seed-$seed.log"
    echo "chaos: seed $seed, $secs s of faults -> $log"
    started=$(date +%s)
    if RATION_CHAOS_SECS=$secs RATION_CHAOS_SEED=$seed \
        cargo test "${profile[@]}" -p rationd --test chaos -- --nocapture >"$log" 2>&1; then
        passed+=("$seed")
        sed -n '/==== chaos summary/,/^audit:/p' "$log" | sed 's/^/    /'
        echo "    passed in $(( $(date +%s) - started )) s"
    else
        failed+=("$seed")
        echo "    FAILED after $(( $(date +%s) - started )) s; the end of its log:"
        grep -v '^ *[0-9]*: \|^ *at ' "$log" | tail -40 | sed 's/^/    /'
    fi
done

echo "chaos: ${#passed[@]} passed, ${#failed[@]} failed (seeds: ${failed[*]:-none})"
[[ ${#failed[@]} -eq 0 ]]
