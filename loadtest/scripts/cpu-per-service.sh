#!/usr/bin/env bash
# CPU per request of each service, the six release binaries as separate
# processes on their default ports, under open-loop load:
#   loadtest/scripts/cpu-per-service.sh RATE SECONDS [more recmesh-loadtest run args]
# e.g. `… 300 20 --bypass-cache` for the whole pipeline on every call.
# CPU is utime + stime from /proc/<pid>/stat over the measured run, divided
# by the requests answered. The features event log goes to tmpfs.
set -euo pipefail
rate=$1 dur=$2
shift 2
tick=$(getconf CLK_TCK)
out=$(mktemp -d)
. "$(dirname "$0")/start-mesh.sh"
start_mesh "$out"
"$R/recmesh-loadtest" run --rate "$rate" --duration 3 --warmup 0 --out "$out/warm" "$@" > /dev/null 2>&1 || true
declare -A t0
for p in "${pids[@]}"; do t0[${p%%:*}]=$(awk '{print $14+$15}' "/proc/${p#*:}/stat"); done
# bash's `time` keyword reports the load generator's own CPU (it shares the cores).
TIMEFORMAT='%U %S'
{ time "$R/recmesh-loadtest" run --rate "$rate" --duration "$dur" --warmup 0 --out "$out/run" "$@" > "$out/run.txt" 2>&1 || true; } 2> "$out/loadgen.time"
n=$(grep -oE "^[0-9]+ requests measured" "$out/run.txt" | cut -d' ' -f1)
grep -E "offered, |degraded|^\| (latency ms|recommend) " "$out/run.txt" | head -5
total=0
for p in "${pids[@]}"; do
  name=${p%%:*}
  t1=$(awk '{print $14+$15}' "/proc/${p#*:}/stat")
  d=$((t1 - t0[$name]))
  total=$((total + d))
  echo "$name: CPU $(echo "$d/$tick" | bc -l | cut -c1-6) s, $(echo "$d*1000/$tick/$n" | bc -l | cut -c1-5) ms per request"
done
echo "all six: CPU $(echo "$total/$tick" | bc -l | cut -c1-6) s, $(echo "$total*1000/$tick/$n" | bc -l | cut -c1-5) ms per request ($n requests)"
read -r lu ls < "$out/loadgen.time"
echo "load generator (not in the total): CPU $(echo "$lu+$ls" | bc -l | cut -c1-6) s, $(echo "($lu+$ls)*1000/$n" | bc -l | cut -c1-5) ms per request"
