#!/usr/bin/env bash
# A/B two builds of `recmesh` under the same open-loop load: CPU per request
# of the mesh process and client-side p50/p99, three alternating rounds.
#   loadtest/scripts/cpu-ab.sh BUILD_A BUILD_B RATE SECONDS
# Each round starts a fresh `BUILD up --no-train --port 0`, warms it for 3 s,
# then measures; CPU is utime + stime from /proc/<pid>/stat.
set -euo pipefail
a=$1 b=$2 rate=$3 dur=$4
lt="${CARGO_TARGET_DIR:-$HOME/.cache/recmesh/target}/release/recmesh-loadtest"
tick=$(getconf CLK_TCK)
out=$(mktemp -d)
for round in 1 2 3; do
  for bin in "$a" "$b"; do
    "$bin" up --no-train --port 0 > "$out/up.log" 2>&1 &
    pid=$!
    sleep 6
    gw=$(grep -oE "gateway +127.0.0.1:[0-9]+" "$out/up.log" | awk '{print $2}')
    "$lt" run --gateway "http://$gw" --rate "$rate" --duration 3 --warmup 0 --out "$out/warm" > /dev/null 2>&1 || true
    t0=$(awk '{print $14+$15}' "/proc/$pid/stat")
    "$lt" run --gateway "http://$gw" --rate "$rate" --duration "$dur" --warmup 0 --out "$out/run" > "$out/run.txt" 2>&1 || true
    t1=$(awk '{print $14+$15}' "/proc/$pid/stat")
    n=$(grep -oE "^[0-9]+ requests measured" "$out/run.txt" | cut -d' ' -f1)
    echo "$(basename "$bin") round $round: cpu ms/request $(echo "($t1-$t0)*1000/$tick/$n" | bc -l | cut -c1-5)," \
      "$(grep -E '^\| all calls' "$out/run.txt" | awk -F'|' '{print "p50",$4,"p99",$7}')"
    kill -INT "$pid"; wait "$pid" || true
  done
done
