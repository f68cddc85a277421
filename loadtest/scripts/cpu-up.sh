#!/usr/bin/env bash
# CPU per request of `recmesh up` (the whole mesh in one process, with the
# model bundle it trains or reuses from its state folder) under open-loop
# load with the response cache bypassed:
#   loadtest/scripts/cpu-up.sh RATE SECONDS [more `recmesh up` args, e.g. --no-train]
# SCENARIO=loadtest/scenarios/million.toml runs the load from that scenario
# (its users and call mix; RATE and SECONDS still apply).
# CPU is utime + stime of the process from /proc/<pid>/stat over the measured
# run, divided by the requests answered (the load generator is not counted).
# Binaries from $CARGO_TARGET_DIR/release (default ~/.cache/recmesh/target).
set -euo pipefail
rate=$1 dur=$2
shift 2
R="${CARGO_TARGET_DIR:-$HOME/.cache/recmesh/target}/release"
out=$(mktemp -d)
scenario=()
if [ -n "${SCENARIO:-}" ]; then scenario=(--scenario "$SCENARIO"); fi
"$R/recmesh" up "$@" > "$out/up.log" 2>&1 &
pid=$!
trap 'kill -INT $pid 2>/dev/null || true; wait $pid 2>/dev/null || true; rm -rf "$out"' EXIT
for _ in $(seq 1 600); do
  grep -q "recmesh is up" "$out/up.log" && break
  kill -0 $pid 2>/dev/null || { cat "$out/up.log"; exit 1; }
  sleep 1
done
sleep 2
"$R/recmesh-loadtest" run "${scenario[@]}" --rate "$rate" --duration 3 --warmup 0 --bypass-cache --out "$out/warm" > /dev/null 2>&1 || true
tick=$(getconf CLK_TCK)
t0=$(awk '{print $14+$15}' "/proc/$pid/stat")
"$R/recmesh-loadtest" run "${scenario[@]}" --rate "$rate" --duration "$dur" --warmup 0 --bypass-cache --out "$out/run" > "$out/run.txt" 2>&1 || true
t1=$(awk '{print $14+$15}' "/proc/$pid/stat")
n=$(grep -oE "^[0-9]+ requests measured" "$out/run.txt" | cut -d' ' -f1)
grep -E "offered, |degraded|^\| (latency ms|recommend) " "$out/run.txt" | head -5
echo "recmesh up: CPU $(echo "($t1-$t0)/$tick" | bc -l | cut -c1-6) s, $(echo "($t1-$t0)*1000/$tick/$n" | bc -l | cut -c1-5) ms per request ($n requests)"
