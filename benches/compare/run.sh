#!/usr/bin/env bash
# Side by side (issue #18): the same "debit if enough remains" workload against
#   - etcd, 3 members on loopback, one key per client, a txn on mod_revision;
#   - Redis, one node, a Lua debit script, appendonly with appendfsync always;
#   - Ration, 3 nodes (ration-load: Batch of 256, 12 in flight; one operation
#     per RPC, 512 in flight; one operation per message on 8 Pipeline calls, 1,024
#     in flight), its Raft log synced (the default `wal` store), and the same
#     three workloads against one Ration node alone (`-1node`: like for like with
#     the single Redis, which is not replicated either),
#   - and, as a floor rather than a system, one Ration node answering gRPC health
#     checks, one per RPC, 512 in flight (`grpc-floor-1node`: the same server,
#     layers and client as one operation per RPC, with no Raft and no ledger work;
#     its row counts health checks, not debits),
# interleaved over ROUNDS rounds so drift hits all alike, 64 clients for etcd and
# Redis. Prints a Markdown table (ops/s, p50, p99 of each RPC: a Ration Batch RPC
# carries 256 debits; ratios to Redis and etcd) and writes
# benches/compare.svg. etcd and Redis come from the distribution's
# packages (etcd-server, redis-server): installed with apt-get when missing and
# allowed, else that system is skipped with a message. Every run checks for
# overshoot and fails if it finds one: each etcd/Redis key must end at its cap
# minus the debits that succeeded; Ration's ledger figures (consumed + leased) must
# stay within the cap.
#
#   benches/compare/run.sh                        # 2 rounds of 10 s (about 5 min)
#   ROUNDS=3 SECONDS_PER_RUN=20 benches/compare/run.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
BIN=${CARGO_TARGET_DIR:-target}/release
ROUNDS=${ROUNDS:-2}
DUR=${SECONDS_PER_RUN:-10}
cargo build --release -q -p rationd -p ration-load

install_pkg() { # program package
  command -v "$1" >/dev/null 2>&1 && return 0
  if command -v apt-get >/dev/null 2>&1; then
    local sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo -n"
    echo "installing $2 (apt-get)" >&2
    if $sudo apt-get install -y -qq --no-install-recommends "$2" >/dev/null 2>&1 ||
       { $sudo apt-get update -qq >/dev/null 2>&1 && $sudo apt-get install -y -qq --no-install-recommends "$2" >/dev/null 2>&1; }; then
      # Packaged services are not wanted running: this script starts its own.
      command -v systemctl >/dev/null 2>&1 && $sudo systemctl disable --now "${3:-$2}" >/dev/null 2>&1 || true
      command -v "$1" >/dev/null 2>&1 && return 0
    fi
  fi
  echo "SKIPPED $2: $1 is not installed and could not be installed" >&2
  return 1
}
HAVE_ETCD=0; install_pkg etcd etcd-server etcd && HAVE_ETCD=1 || true
HAVE_REDIS=0; install_pkg redis-server redis-server && HAVE_REDIS=1 || true

WORK=$(mktemp -d)
PIDS=()
cleanup() { for p in "${PIDS[@]:-}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT

if [ "$HAVE_ETCD" = 1 ]; then
  CL=""
  for i in 1 2 3; do CL+="${CL:+,}e$i=http://127.0.0.1:2${i}380"; done
  for i in 1 2 3; do
    etcd --name "e$i" --data-dir "$WORK/etcd$i" \
      --listen-client-urls "http://127.0.0.1:2${i}379" --advertise-client-urls "http://127.0.0.1:2${i}379" \
      --listen-peer-urls "http://127.0.0.1:2${i}380" --initial-advertise-peer-urls "http://127.0.0.1:2${i}380" \
      --initial-cluster "$CL" --initial-cluster-state new --initial-cluster-token compare \
      >"$WORK/etcd$i.log" 2>&1 &
    PIDS+=($!)
  done
  for _ in $(seq 1 100); do curl -sf http://127.0.0.1:21379/health >/dev/null 2>&1 && break; sleep 0.2; done
fi
if [ "$HAVE_REDIS" = 1 ]; then
  redis-server --port 26379 --bind 127.0.0.1 --dir "$WORK" --appendonly yes --appendfsync always \
    --save '' --daemonize no >"$WORK/redis.log" 2>&1 &
  PIDS+=($!)
  for _ in $(seq 1 50); do (exec 3<>/dev/tcp/127.0.0.1/26379) 2>/dev/null && break; sleep 0.1; done
fi

# "N ops in T s: R ops/s; latency ...: p50 X us, p99 Y us, ..." -> "R X Y"
summary() { sed -nE 's/^[0-9]+ ops in [0-9.]+ s: ([0-9]+) ops\/s; latency[^:]*: p50 ([0-9]+) us, p99 ([0-9]+) us.*/\1 \2 \3/p' | tail -n 1; }
RESULTS="$WORK/results.tsv"
: >"$RESULTS"
run() { # name command...
  local name=$1; shift
  local out; out=$("$@" 2>&1) || { echo "$name FAILED:" >&2; echo "$out" >&2; return 1; }
  if echo "$out" | grep -q OVERSHOT; then echo "$name OVERSHOT its cap:" >&2; echo "$out" >&2; return 1; fi
  local s; s=$(echo "$out" | summary)
  [ -n "$s" ] || { echo "$name: no summary line:" >&2; echo "$out" >&2; return 1; }
  echo "$ROUND $name $s" >>"$RESULTS"
}
for ROUND in $(seq 1 "$ROUNDS"); do
  run "ration-batch" "$BIN/ration-load" --warmup-s 2 --duration-s "$DUR" --batch 256 --concurrency 12
  run "ration-single" "$BIN/ration-load" --warmup-s 2 --duration-s "$DUR" --concurrency 512
  run "ration-pipeline" "$BIN/ration-load" --warmup-s 2 --duration-s "$DUR" --concurrency 1024 --pipeline
  # Like for like with Redis (one node, not replicated): Ration on one node, its
  # log synced as in the cluster.
  run "ration-batch-1node" "$BIN/ration-load" --nodes 1 --warmup-s 2 --duration-s "$DUR" --batch 256 --concurrency 12
  run "ration-single-1node" "$BIN/ration-load" --nodes 1 --warmup-s 2 --duration-s "$DUR" --concurrency 512
  run "ration-pipeline-1node" "$BIN/ration-load" --nodes 1 --warmup-s 2 --duration-s "$DUR" --concurrency 1024 --pipeline
  # What one operation per RPC cannot go below here: an RPC that does no work.
  run "grpc-floor-1node" "$BIN/ration-load" --nodes 1 --floor --warmup-s 2 --duration-s "$DUR" --concurrency 512
  [ "$HAVE_REDIS" = 1 ] && run "redis-lua-always" "$BIN/ration-compare" --system redis \
    --endpoint 127.0.0.1:26379 --duration-s "$DUR" --prefix "r$ROUND"
  [ "$HAVE_ETCD" = 1 ] && run "etcd-txn" "$BIN/ration-compare" --system etcd \
    --endpoint 127.0.0.1:21379 --duration-s "$DUR" --prefix "r$ROUND"
done

echo "Debits side by side, $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git rev-parse --short HEAD), $(nproc) CPUs, $ROUNDS rounds of $DUR s"
echo
echo "| round | system | debits/s | p50 us per RPC | p99 us per RPC | vs Redis | vs etcd |"
echo "|---|---|---|---|---|---|---|"
awk '
  { r[NR]=$1; n[NR]=$2; ops[NR]=$3; p50[NR]=$4; p99[NR]=$5
    if ($2=="redis-lua-always") redis[$1]=$3; if ($2=="etcd-txn") etcd[$1]=$3 }
  END { for (i=1;i<=NR;i++) {
      vr = (r[i] in redis && redis[r[i]]>0) ? sprintf("%.2fx", ops[i]/redis[r[i]]) : "n/a"
      ve = (r[i] in etcd && etcd[r[i]]>0) ? sprintf("%.1fx", ops[i]/etcd[r[i]]) : "n/a"
      printf "| %s | %s | %d | %s | %s | %s | %s |\n", r[i], n[i], ops[i], p50[i], p99[i], vr, ve } }' "$RESULTS"

# The chart: mean ops/s per system, one bar each (log scale would hide nothing here:
# labels carry the numbers).
awk -v out="$ROOT/benches/compare.svg" '
  { sum[$2]+=$3; cnt[$2]++; if (!($2 in seen)) { seen[$2]=1; order[++k]=$2 } }
  END {
    max=0; for (i=1;i<=k;i++) { m[i]=sum[order[i]]/cnt[order[i]]; if (m[i]>max) max=m[i] }
    w=720; bh=36; gap=14; left=170; h=60+k*(bh+gap)
    printf "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"%d\" height=\"%d\" font-family=\"sans-serif\" font-size=\"13\">\n", w, h > out
    printf "<text x=\"10\" y=\"24\" font-size=\"15\">Debits per second, mean of %d rounds (higher is better)</text>\n", cnt[order[1]] > out
    for (i=1;i<=k;i++) {
      y=44+(i-1)*(bh+gap); bw=(max>0)? (w-left-120)*m[i]/max : 0
      printf "<text x=\"10\" y=\"%d\">%s</text>\n", y+bh/2+5, order[i] > out
      printf "<rect x=\"%d\" y=\"%d\" width=\"%.1f\" height=\"%d\" fill=\"%s\"/>\n", left, y, bw, bh, (order[i] ~ /^ration/ ? "#2b6cb0" : "#a0aec0") > out
      printf "<text x=\"%.1f\" y=\"%d\">%d</text>\n", left+bw+6, y+bh/2+5, m[i] > out
    }
    print "</svg>" > out
  }' "$RESULTS"
echo
echo "chart: benches/compare.svg"
