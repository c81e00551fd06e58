#!/usr/bin/env bash
# Many fresh simulation seeds on a release build (crates/ration-sim), split over
# parallel jobs, with a summary at the end.
#
#   scripts/sim-soak.sh 20000             # 20,000 seeds, 3 voters, from a fresh range
#   scripts/sim-soak.sh 2000 5            # 2,000 seeds with 5 voters
#   SIM_FIRST_SEED=41000 scripts/sim-soak.sh 3000   # a given range
#   SIM_JOBS=1 scripts/sim-soak.sh 100    # one job (default: one per core)
#
# Each job's output goes to $SIM_LOGS/<first>-<voters>v-job<k>.log (default
# target/sim-soak/), the summary to $SIM_LOGS/<first>-<voters>v-summary.txt. Every
# failing seed is listed with its replay command. Exits non-zero if any seed failed.
set -euo pipefail
cd "$(dirname "$0")/.."

n=${1:?usage: scripts/sim-soak.sh <seeds> [voters]}
voters=${2:-3}
jobs=${SIM_JOBS:-$(nproc)}
logs=${SIM_LOGS:-target/sim-soak}
# A range no earlier run used: the minutes since 1970, times 1,000, plus 10^12
# (CI's own rotating ranges start at the minutes times 1,000, so they never meet).
first=${SIM_FIRST_SEED:-$(( 1000000000000 + $(date +%s) / 60 * 1000 ))}
mkdir -p "$logs"

cargo test --release -p ration-sim --test sim --no-run 2>&1 | tail -n 1
chunk=$(( (n + jobs - 1) / jobs ))
started=$(date +%s)
pids=()
for k in $(seq 0 $(( jobs - 1 ))); do
    from=$(( first + k * chunk ))
    count=$(( n - k * chunk < chunk ? n - k * chunk : chunk ))
    (( count > 0 )) || continue
    log="$logs/$first-${voters}v-job$k.log"
    if [[ $voters == 3 ]]; then
        env RATION_SIM_FIRST_SEED=$from RATION_SIM_SEEDS=$count \
            cargo test --release -q -p ration-sim --test sim many_seeds -- --nocapture >"$log" 2>&1 &
    else
        env RATION_SIM_FIRST_SEED_5=$from RATION_SIM_SEEDS_5=$count \
            cargo test --release -q -p ration-sim --test sim five_voters -- --nocapture >"$log" 2>&1 &
    fi
    pids+=($!)
done
status=0
for p in "${pids[@]}"; do
    wait "$p" || status=1
done
elapsed=$(( $(date +%s) - started ))

summary="$logs/$first-${voters}v-summary.txt"
{
    echo "sim soak: $n seeds with $voters voters from $first, $jobs jobs, ${elapsed} s wall"
    echo "per job:"
    grep -h "seeds ($voters voters) in" "$logs/$first-${voters}v-job"*.log | sed 's/^/  /'
    failed=$(grep -h "^seed .* failed at\|panicked in the simulation" "$logs/$first-${voters}v-job"*.log || true)
    if [[ -n $failed ]]; then
        echo "FAILURES:"
        grep -h -A1 "^seed .* failed at\|panicked in the simulation" "$logs/$first-${voters}v-job"*.log | sed 's/^/  /'
    else
        echo "failures: none"
    fi
    awk -v n="$n" -v e="$elapsed" -v j="$jobs" \
        'BEGIN { printf "wall time per seed: %.1f ms (%d jobs; %.1f ms of one core per seed)\n", e * 1000 / n, j, e * 1000 * j / n }'
} | tee "$summary"
exit $status
