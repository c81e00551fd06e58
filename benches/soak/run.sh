#!/usr/bin/env bash
# Soak benchmark for bounded growth (issue #14, point 4).
#
# Starts three rationd nodes on loopback in a temporary directory, drives them at
# full load (`ration-load --batch 256 --concurrency 12`, fresh client ids each
# phase) for several consecutive phases, and after each phase, with the load
# stopped, measures: RSS per node, the leader's snapshot (size, build time, save
# time), the restart time of one follower (SIGKILL, restart, until /readyz is 200
# and its applied index reaches the leader's), the catch-up time of a brand-new
# learner (added with `rationctl member add`, removed after), disk per node and
# per entry of its data directory, and the audit record count. Prints a markdown
# table with the slopes per million audit records and a 30-day projection at 10k
# grants/s, and writes it to benches/soak/last-run.md (raw figures beside it in
# last-run.json).
#
#   benches/soak/run.sh [--phase-seconds N] [--phases N] [--bin-dir DIR]
#                       [--max-wait-seconds N] [--work-dir DIR] [--out FILE] [--keep]
#                       [--rationd-config FILE] [--learner-add join|rationctl]
#
# Defaults: 3 phases of 240 s; binaries from $CARGO_TARGET_DIR/release (or
# target/release), built with cargo if absent; waits (snapshot, restart, catch-up)
# give up after 900 s and record "timeout"; --rationd-config passes a TOML file to
# every node (e.g. `keep_log_after_snapshot = 100`, so that short phases also make
# the learner install a snapshot); --keep keeps the work directory (logs, JSON).
# Every process it started is stopped on exit, also on Ctrl-C. Needs bash, python3
# (standard library), curl, du. SOAK_NODE_LOG sets the nodes' RATION_LOG (default warn).
#
# The new learner joins with `rationd --join <leader>` (the node adds itself as a
# learner, the documented way to grow a cluster). `--learner-add rationctl` starts
# it with `--initial-cluster-state existing` and adds it with `rationctl member add`
# instead (before the fix in ration-server's `removal`, such a learner took the
# previous phase's learner removal, replayed, for its own and exited).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
PHASE_SECONDS=240
PHASES=3
BIN_DIR=""
MAX_WAIT=900
WORK_PARENT="${TMPDIR:-/tmp}"
OUT="$HERE/last-run.md"
KEEP=0
NODE_CONFIG=()
LEARNER_ADD=join
COMMAND_LINE="benches/soak/run.sh $*"

usage() { sed -n '2,36p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
  case "$1" in
    --phase-seconds) PHASE_SECONDS="$2"; shift 2 ;;
    --phases) PHASES="$2"; shift 2 ;;
    --bin-dir) BIN_DIR="$2"; shift 2 ;;
    --max-wait-seconds) MAX_WAIT="$2"; shift 2 ;;
    --work-dir) WORK_PARENT="$2"; shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    --keep) KEEP=1; shift ;;
    --learner-add) LEARNER_ADD="$2"; shift 2 ;;
    --rationd-config) NODE_CONFIG=(--config "$(cd "$(dirname "$2")" && pwd)/$(basename "$2")"); shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "unknown argument: $1" >&2; usage >&2; exit 2 ;;
  esac
done

log() { printf '[soak %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

# ---------------------------------------------------------------- binaries
if [ -z "$BIN_DIR" ]; then
  BIN_DIR="${CARGO_TARGET_DIR:-$ROOT/target}/release"
  if [ ! -x "$BIN_DIR/rationd" ] || [ ! -x "$BIN_DIR/rationctl" ] || [ ! -x "$BIN_DIR/ration-load" ]; then
    log "building rationd, rationctl and ration-load (release) into $BIN_DIR"
    (cd "$ROOT" && cargo build --release -p rationd -p rationctl -p ration-load)
  fi
fi
for b in rationd rationctl ration-load; do
  [ -x "$BIN_DIR/$b" ] || die "$BIN_DIR/$b not found (build it, or give --bin-dir)"
done
RATIOND="$BIN_DIR/rationd"
RATIONCTL="$BIN_DIR/rationctl"
LOAD="$BIN_DIR/ration-load"
export RATIONCTL
if ! "$LOAD" --help | grep -q -- '--client-id-base'; then
  die "$LOAD has no --client-id-base: every phase after the first would be refused as a replay of the first (issue #18); rebuild ration-load from this branch"
fi
command -v curl >/dev/null || die "curl is needed"
case "$LEARNER_ADD" in join|rationctl) ;; *) die "--learner-add is join or rationctl" ;; esac

# ---------------------------------------------------------------- state, cleanup
mkdir -p "$WORK_PARENT"
WORK=$(mktemp -d "$WORK_PARENT/ration-soak.XXXXXX")
PY="python3 $HERE/soak.py"
declare -A NODE_PID=()      # node id -> pid of its rationd
declare -a EXTRA_PIDS=()    # rationctl calls running in the background
CLEANED=0

cleanup() {
  [ "$CLEANED" = 1 ] && return
  CLEANED=1
  local pids=("${NODE_PID[@]}" "${EXTRA_PIDS[@]}")
  local alive=()
  for p in "${pids[@]}"; do
    if kill -0 "$p" 2>/dev/null; then kill -TERM "$p" 2>/dev/null || true; alive+=("$p"); fi
  done
  for _ in $(seq 50); do
    local any=0
    for p in "${alive[@]}"; do kill -0 "$p" 2>/dev/null && any=1; done
    [ "$any" = 0 ] && break
    sleep 0.1
  done
  for p in "${alive[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  if [ "$KEEP" = 1 ]; then log "kept $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT
trap 'exit 143' TERM

# Ports: 3 nodes and one learner per phase, each a gRPC and a metrics port.
read -r -a PORTS <<<"$($PY ports $(( 2 * (3 + PHASES) )))"
port_of() { echo "${PORTS[$(( 2 * ($1 - 1) ))]}"; }        # gRPC port of node id $1
mport_of() { echo "${PORTS[$(( 2 * ($1 - 1) + 1 ))]}"; }   # metrics port of node id $1
addr_of() { echo "127.0.0.1:$(port_of "$1")"; }
CLUSTER="1=$(addr_of 1),2=$(addr_of 2),3=$(addr_of 3)"
EPS="$(addr_of 1),$(addr_of 2),$(addr_of 3)"

now() { date +%s.%N; }
elapsed() { python3 -c "import sys; print('%.2f' % (float(sys.argv[2]) - float(sys.argv[1])))" "$1" "$2"; }

# start_node ID EXTRA_FLAGS...: the same flags every time, so a restart is a restart.
start_node() {
  local id=$1; shift
  mkdir -p "$WORK/node-$id"
  RATION_LOG="${SOAK_NODE_LOG:-warn}" "$RATIOND" --node-id "$id" --listen "$(addr_of "$id")" \
    --metrics-listen "127.0.0.1:$(mport_of "$id")" --data-dir "$WORK/node-$id" \
    ${NODE_CONFIG[@]+"${NODE_CONFIG[@]}"} "$@" \
    >>"$WORK/node-$id.log" 2>&1 &
  NODE_PID[$id]=$!
}
start_member() { start_node "$1" --initial-cluster "$CLUSTER"; }

# alive PID: running (not gone, not a zombie waiting to be reaped).
alive() { [ -r "/proc/$1/status" ] && ! grep -q '^State:[[:space:]]*Z' "/proc/$1/status" 2>/dev/null; }
rss_kb() { awk -v k="$2:" '$1 == k { print $2 }' "/proc/$1/status" 2>/dev/null || true; }
http_ok() { [ "$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "$1" || true)" = 200 ]; }

# disk_rec FILE KEY DIR: du -sb of DIR and of each entry at its top level.
disk_rec() {
  local f=$1 key=$2 dir=$3
  [ -d "$dir" ] || return 0
  $PY rec "$f" "$key.total" "$(du -sb "$dir" | cut -f1)"
  local e
  for e in "$dir"/* "$dir"/.[!.]*; do
    [ -e "$e" ] || continue
    $PY rec "$f" "$key.entries.$(basename "$e" | tr . _)" "$(du -sb "$e" | cut -f1)"
  done
}

note() { log "$2"; python3 - "$1" "$2" <<'EOF'
import json, sys
p, n = sys.argv[1], sys.argv[2]
d = json.load(open(p))
d.setdefault("notes", []).append(n)
json.dump(d, open(p, "w"), indent=1, sort_keys=True)
EOF
}

# get_leader: sets lid laddr lapplied lcommit lrecords (retried for up to 60 s).
get_leader() {
  local l=""
  for _ in $(seq 120); do
    l=$($PY status "$EPS")
    [ -n "$l" ] && break
    sleep 0.5
  done
  [ -n "$l" ] || die "no leader among $EPS within 60 s (logs in $WORK/node-*.log)"
  read -r lid laddr lapplied lcommit lrecords <<<"$l"
}

# ---------------------------------------------------------------- the cluster
log "work dir $WORK; binaries $BIN_DIR; $PHASES phases of $PHASE_SECONDS s"
for i in 1 2 3; do start_member "$i"; done
get_leader
for i in 1 2 3; do
  for _ in $(seq 100); do http_ok "http://127.0.0.1:$(mport_of "$i")/readyz" && break; sleep 0.2; done
done
log "cluster up: $EPS"

COMMIT=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)
if [ -n "$(git -C "$ROOT" status --porcelain -- crates 2>/dev/null || true)" ]; then COMMIT="$COMMIT (crates/ modified)"; fi
RUN_JSON="$WORK/run.json"
$PY rec "$RUN_JSON" started "$(date -u +%Y-%m-%dT%H:%M:%SZ)"
$PY rec "$RUN_JSON" commit "$COMMIT"
$PY rec "$RUN_JSON" phases "$PHASES"
$PY rec "$RUN_JSON" phase_seconds "$PHASE_SECONDS"
$PY rec "$RUN_JSON" max_wait_s "$MAX_WAIT"
$PY rec "$RUN_JSON" command "$COMMAND_LINE"
$PY rec "$RUN_JSON" learner_add "$LEARNER_ADD"
[ ${#NODE_CONFIG[@]} -gt 0 ] && $PY rec "$RUN_JSON" node_config "$(cat "${NODE_CONFIG[1]}")"
$PY rec "$RUN_JSON" machine "\"$(nproc) CPUs, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(uname -sr)\""

CUMULATIVE=0
for phase in $(seq "$PHASES"); do
  PJ="$WORK/phase-$phase.json"
  echo '{}' >"$PJ"
  $PY rec "$PJ" phase "$phase"

  # ---- load
  log "phase $phase: load for $PHASE_SECONDS s"
  LOAD_LOG="$WORK/load-$phase.log"
  set +e
  "$LOAD" --endpoints "$EPS" --batch 256 --concurrency 12 --warmup-s 0 \
    --duration-s "$PHASE_SECONDS" --client-id-base "soak-$$-p$phase" >"$LOAD_LOG" 2>&1
  load_rc=$?
  set -e
  read -r ops secs rate errors <<<"$($PY load-summary "$LOAD_LOG")"
  CUMULATIVE=$(( CUMULATIVE + PHASE_SECONDS ))
  $PY rec "$PJ" cumulative_load_s "$CUMULATIVE"
  $PY rec "$PJ" ops "$ops"; $PY rec "$PJ" load_s "$secs"; $PY rec "$PJ" ops_per_s "$rate"
  $PY rec "$PJ" errors "$errors"
  log "phase $phase: $ops ops ($rate ops/s), $errors errors"
  [ "$load_rc" = 0 ] || note "$PJ" "ration-load exited $load_rc: $(tail -n 3 "$LOAD_LOG" | tr '\n' ' ')"
  if [ "$errors" -gt 0 ] 2>/dev/null && [ "$ops" -gt 0 ]; then
    note "$PJ" "ration-load counted $errors failed operations of $ops"
  fi

  # ---- any node that died under load is noted and restarted
  for i in 1 2 3; do
    if ! alive "${NODE_PID[$i]}"; then
      rc=0; wait "${NODE_PID[$i]}" || rc=$?
      note "$PJ" "node $i died during the load (exit $rc; last log: $(tail -n 2 "$WORK/node-$i.log" | tr '\n' ' ')); restarted"
      start_member "$i"
    fi
  done

  # ---- let every node apply what the leader has, then the figures as the load left them
  get_leader
  for i in 1 2 3; do
    [ "$i" = "$lid" ] && continue
    w=$($PY wait-node "$(addr_of "$i")" "$EPS" --since "$(now)" --timeout 120)
    [ "$w" = timeout ] && note "$PJ" "node $i had not caught up with the leader 120 s after the load"
  done
  get_leader
  $PY rec "$PJ" leader "$lid"
  $PY rec "$PJ" applied_index "$lapplied"
  $PY rec "$PJ" audit_records "$lrecords"
  for i in 1 2 3; do
    $PY rec "$PJ" "rss_kb.$i" "$(rss_kb "${NODE_PID[$i]}" VmRSS)"
    $PY rec "$PJ" "hwm_kb.$i" "$(rss_kb "${NODE_PID[$i]}" VmHWM)"
    disk_rec "$PJ" "disk.$i" "$WORK/node-$i"
  done
  log "phase $phase: leader n$lid, applied $lapplied, $lrecords audit records"

  # ---- snapshot: build on the leader, on request
  SNAP="$WORK/node-$lid/snapshot.bin"
  old_mtime=$(python3 -c "import os,sys; p=sys.argv[1]; print(os.stat(p).st_mtime_ns if os.path.exists(p) else 0)" "$SNAP")
  t0=$(now)
  "$RATIONCTL" --endpoints "$laddr" --timeout-ms $(( MAX_WAIT * 1000 )) -o json \
    snapshot save "$WORK/saved.snap" >"$WORK/save-$phase.json" 2>"$WORK/save-$phase.err" &
  save_pid=$!
  EXTRA_PIDS+=("$save_pid")
  build=$($PY wait-mtime "$SNAP" "$old_mtime" --since "$t0" --timeout "$MAX_WAIT")
  save_rc=0; wait "$save_pid" || save_rc=$?
  EXTRA_PIDS=()
  t1=$(now)
  $PY rec "$PJ" snapshot_build_s "$build"
  if [ "$save_rc" = 0 ]; then
    $PY rec "$PJ" snapshot_save_s "$(elapsed "$t0" "$t1")"
    $PY rec "$PJ" snapshot_audit_records "$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["audit_records"])' "$WORK/save-$phase.json" 2>/dev/null || echo null)"
  else
    $PY rec "$PJ" snapshot_save_s failed
    note "$PJ" "snapshot save failed after $(elapsed "$t0" "$t1") s: $(tr '\n' ' ' <"$WORK/save-$phase.err")"
  fi
  rm -f "$WORK/saved.snap" "$WORK/saved.part"
  [ -f "$SNAP" ] && $PY rec "$PJ" snapshot_bytes "$(stat -c %s "$SNAP")"
  log "phase $phase: snapshot build $build s, save rc $save_rc, $( [ -f "$SNAP" ] && stat -c %s "$SNAP") bytes"

  # ---- restart one follower
  get_leader
  victim=$(( lid % 3 + 1 ))
  $PY rec "$PJ" restart_node "$victim"
  kill -KILL "${NODE_PID[$victim]}"
  wait "${NODE_PID[$victim]}" 2>/dev/null || true
  t0=$(now)
  start_member "$victim"
  r=$($PY wait-node "$(addr_of "$victim")" "$EPS" --since "$t0" --min-applied "$lapplied" \
        --readyz "http://127.0.0.1:$(mport_of "$victim")/readyz" --timeout "$MAX_WAIT" \
        --pid "${NODE_PID[$victim]}")
  [ "$r" = exited ] && note "$PJ" "node $victim exited while restarting: $(tail -n 2 "$WORK/node-$victim.log" | tr '\n' ' ')"
  $PY rec "$PJ" restart_ready_s "$r"
  $PY rec "$PJ" restart_rss_kb "$(rss_kb "${NODE_PID[$victim]}" VmRSS)"
  log "phase $phase: node $victim restarted, ready in $r s"

  # ---- a brand-new learner
  lrn=$(( 3 + phase ))
  $PY rec "$PJ" learner_id "$lrn"
  get_leader
  if [ "$LEARNER_ADD" = join ]; then
    t0=$(now)
    start_node "$lrn" --join "$laddr"
    c=$($PY wait-node "$(addr_of "$lrn")" "$EPS" --since "$t0" --min-applied "$lapplied" \
          --timeout "$MAX_WAIT" --pid "${NODE_PID[$lrn]}")
  else
    start_node "$lrn" --initial-cluster-state existing
    for _ in $(seq 100); do http_ok "http://127.0.0.1:$(mport_of "$lrn")/livez" && break; sleep 0.1; done
    get_leader
    t0=$(now)
    "$RATIONCTL" --endpoints "$EPS" --timeout-ms $(( MAX_WAIT * 1000 )) \
      member add "$lrn" "$(addr_of "$lrn")" >"$WORK/add-$phase.out" 2>&1 &
    add_pid=$!
    EXTRA_PIDS+=("$add_pid")
    c=$($PY wait-node "$(addr_of "$lrn")" "$EPS" --since "$t0" --min-applied "$lapplied" \
          --timeout "$MAX_WAIT" --pid "${NODE_PID[$lrn]}")
    add_rc=0; wait "$add_pid" || add_rc=$?
    EXTRA_PIDS=()
    if [ "$add_rc" != 0 ]; then
      if grep -q "was added as a learner but has not caught up" "$WORK/add-$phase.out"; then
        note "$PJ" "rationctl member add answered after its own 5 s wait that node $lrn was added but not caught up yet (expected; the script kept waiting)"
      else
        note "$PJ" "rationctl member add exited $add_rc: $(tr '\n' ' ' <"$WORK/add-$phase.out")"
      fi
    fi
  fi
  [ "$c" = exited ] && note "$PJ" "learner $lrn exited before it caught up: $(grep -v '^\s*$' "$WORK/node-$lrn.log" | tail -n 2 | cut -c1-400 | tr '\n' ' ')"
  $PY rec "$PJ" learner_catchup_s "$c"
  $PY rec "$PJ" learner_rss_kb "$(rss_kb "${NODE_PID[$lrn]}" VmRSS)"
  if [ -f "$WORK/node-$lrn/snapshot.bin" ]; then $PY rec "$PJ" learner_via "snapshot install"; else $PY rec "$PJ" learner_via "log replication"; fi
  disk_rec "$PJ" "disk.learner" "$WORK/node-$lrn"
  log "phase $phase: learner $lrn caught up in $c s"
  if ! "$RATIONCTL" --endpoints "$EPS" --timeout-ms 60000 member remove "$lrn" >"$WORK/remove-$phase.out" 2>&1; then
    note "$PJ" "rationctl member remove $lrn failed: $(tr '\n' ' ' <"$WORK/remove-$phase.out")"
  fi
  for _ in $(seq 300); do alive "${NODE_PID[$lrn]}" || break; sleep 0.1; done
  if alive "${NODE_PID[$lrn]}"; then
    note "$PJ" "learner $lrn had not exited 30 s after its removal; killed"
    kill -KILL "${NODE_PID[$lrn]}" 2>/dev/null || true
  fi
  wait "${NODE_PID[$lrn]}" 2>/dev/null || true
  unset "NODE_PID[$lrn]"
  rm -rf "$WORK/node-$lrn"
done

# ---------------------------------------------------------------- report
$PY render "$WORK" "$OUT"
python3 - "$WORK" "${OUT%.md}.json" <<'EOF'
import glob, json, os, sys
d = sys.argv[1]
phases = sorted((json.load(open(p)) for p in glob.glob(os.path.join(d, "phase-*.json"))),
                key=lambda p: p["phase"])
out = {"run": json.load(open(os.path.join(d, "run.json"))), "phases": phases}
json.dump(out, open(sys.argv[2], "w"), indent=1, sort_keys=True)
EOF
log "wrote $OUT and ${OUT%.md}.json"
