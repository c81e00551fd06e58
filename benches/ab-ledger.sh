#!/usr/bin/env bash
# The ledger core benchmark (crates/ration-core/benches/ledger.rs) of an older
# revision and of the work tree, alternating in one run, so both see the same
# machine. The older revision is built in a temporary git worktree with its own
# target directory (its binary would otherwise overwrite this one's).
#
#   benches/ab-ledger.sh daed584            # 2 rounds
#   ROUNDS=3 MEASURE_S=8 benches/ab-ledger.sh HEAD~3
set -euo pipefail
cd "$(dirname "$0")/.."
REV=${1:?usage: benches/ab-ledger.sh REVISION}
ROUNDS=${ROUNDS:-2}
MEASURE_S=${MEASURE_S:-6}
WORK=$(mktemp -d)
cleanup() { git worktree remove --force "$WORK/src" >/dev/null 2>&1 || true; rm -rf "$WORK"; }
trap cleanup EXIT
git worktree add -q --detach "$WORK/src" "$REV"

# "Executable benches/ledger.rs (path)" -> path
bench_binary() { sed -nE 's/.*Executable benches\/ledger\.rs \((.*)\).*/\1/p' | tail -n 1; }
OLD=$(cd "$WORK/src" && CARGO_TARGET_DIR="$WORK/target" cargo bench -p ration-core --bench ledger --no-run 2>&1 | bench_binary)
NEW=$(cargo bench -p ration-core --bench ledger --no-run 2>&1 | bench_binary)
case $OLD in /*) ;; *) OLD="$WORK/src/$OLD" ;; esac
case $NEW in /*) ;; *) NEW="$PWD/$NEW" ;; esac
[ -x "$OLD" ] && [ -x "$NEW" ] || { echo "bench binaries not found: '$OLD' '$NEW'" >&2; exit 1; }

echo "ledger bench: $REV ($(git rev-parse --short "$REV")) against the work tree at $(git rev-parse --short HEAD)$(git diff --quiet || echo ' (modified)'), $ROUNDS rounds"
for round in $(seq 1 "$ROUNDS"); do
  for which in old new; do
    bin=$OLD; [ "$which" = new ] && bin=$NEW
    echo "== round $round: $which"
    # Criterion keeps its history under the current directory: run each build
    # from its own, so neither compares itself with the other.
    mkdir -p "$WORK/run-$which"
    (cd "$WORK/run-$which" && "$bin" --bench --warm-up-time 2 --measurement-time "$MEASURE_S" --noplot 2>&1) |
      grep -E '^ledger:|^memory|^snapshot|^[A-Za-z_0-9/]+ *$|^[A-Za-z_0-9/]+ +time:|^ +time:' | grep -v '%' || true
  done
done
