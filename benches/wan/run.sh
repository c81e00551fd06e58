#!/usr/bin/env bash
# Ration across regions, on one machine: three rationd processes behind the
# user-space WAN proxy (ration_testkit::proxy, Fault::Wan), a fresh cluster per run.
# For each layout: batched throughput (256 x 12, 256 x 48 and 256 x 192 in flight), one
# operation per RPC (512 in flight), Raft entries per second, 20 SDK gateways
# (decisions/s and cluster writes per 1,000), then leader SIGKILLs (kill to first
# write through a survivor, with the 20 gateways deciding 10,000 calls/s each
# through the kills: their refusals per kill).
#
# Usage: benches/wan/run.sh [LAYOUT ...]
#   LAYOUT = NAME:WAN_SPEC[:NODE_ARGS], WAN_SPEC as ration-load --wan takes it.
#   Default: 0, 50, 100 and 300 ms round trips (every link, the generator's too,
#   delayed D/2 each way, as issue #22 measured), and three regions.
# Env: WAN_SECONDS (15), WAN_KILLS (10), WAN_ONLY (comma-separated workloads:
#   batch12,batch48,batch192,single,sdk,failover).
set -euo pipefail
cd "$(dirname "$0")/../.."
secs=${WAN_SECONDS:-15}
kills=${WAN_KILLS:-10}
only=${WAN_ONLY:-batch12,batch48,batch192,single,sdk,failover}
uniform() { # one-way ms -> spec with every link (and the generator's) at that delay
  local d=$1
  echo "1-2=$d,1-3=$d,2-3=$d,c-1=$d,c-2=$d,c-3=$d"
}
layouts=("$@")
if [ ${#layouts[@]} -eq 0 ]; then
  layouts=(
    "rtt0:"
    "rtt50:$(uniform 25):--voter-rtt-ms 50"
    "rtt100:$(uniform 50):--voter-rtt-ms 100"
    "rtt300:$(uniform 150):--voter-rtt-ms 300"
    # us-east (1), eu-west (2), ap-south (3); the generator and its gateways in us-east.
    "3regions:1-2=40~5,1-3=110~10,2-3=65~5,c-2=40~5,c-3=110~10:--voter-rtt-ms 230"
  )
fi
cargo build --release -p rationd -p ration-load >/dev/null 2>&1 || cargo build --release -p rationd -p ration-load
load=target/release/ration-load
want() { [[ ",$only," == *",$1,"* ]]; }
for layout in "${layouts[@]}"; do
  IFS=: read -r name spec node_args <<<"$layout"
  wan=()
  [ -n "$spec" ] && wan=(--wan "$spec")
  nargs=()
  [ -n "$node_args" ] && nargs=(--node-args "$node_args")
  echo "== $name: wan '${spec:-none}' nodes '${node_args:-defaults}'"
  run() { # label, ration-load flags...
    local label=$1; shift
    local out
    out=$("$load" "${wan[@]}" "${nargs[@]}" "$@" 2>&1) || { echo "$name $label: FAILED"; echo "$out" | tail -5; return 0; }
    echo "$out" | grep -E "ops/s|raft entries|decisions|writes per|failover|OVERSHOT|cap held" | sed "s/^/$name $label: /"
  }
  want batch12 && run batch12 --duration-s "$secs" --batch 256 --concurrency 12
  want batch48 && run batch48 --duration-s "$secs" --batch 256 --concurrency 48
  want batch192 && run batch192 --duration-s "$secs" --batch 256 --concurrency 192
  want single && run single --duration-s "$secs" --concurrency 512
  want sdk && run sdk --duration-s "$secs" --gateways 20
  want failover && run failover --gateways 20 --gateway-rate 10000 --duration-s 5 --failovers "$kills"
done
