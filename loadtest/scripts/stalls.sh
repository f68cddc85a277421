#!/usr/bin/env bash
# Runtime stalls per service, the six release binaries as separate processes
# (started as cpu-per-service.sh starts them, the features store in memory,
# no Redis), every service logging its runtime lag (recmesh_server::lag):
#   loadtest/scripts/stalls.sh OUTDIR SECONDS [VAR=value ... for the experiments service]
# then counts the wake-ups 5 ms or more late during the measured run.
set -uo pipefail
out=$1 dur=$2; shift 2
R="${CARGO_TARGET_DIR:-$HOME/.cache/recmesh/target}/release"
rm -rf "$out"; mkdir -p "$out"
export RECMESH_LOG='info,recmesh_server::lag=debug'
pids=()
RECMESH_EVENT_LOG__PATH=/dev/shm/sr-events-$$.tsv RECMESH_EVENT_LOG__EXPOSURES_PATH=/dev/shm/sr-exp-$$.jsonl $R/recmesh-features > $out/features.log 2>&1 & pids+=($!)
env RECMESH_STATE_DIR=$out/exp "$@" $R/recmesh-experiments > $out/experiments.log 2>&1 & pids+=($!)
for s in retrieval ranking reranker gateway; do $R/recmesh-$s > $out/$s.log 2>&1 & pids+=($!); done
for _ in $(seq 1 120); do grep -q "serving" $out/gateway.log 2>/dev/null && break; sleep 1; done
sleep 2
$R/recmesh-loadtest run --rate 500 --duration 5 --warmup 0 --out $out/warm > /dev/null 2>&1
date +%s%3N > $out/t0
$R/recmesh-loadtest run --rate 500 --duration $dur --warmup 0 --out $out/run > $out/run.txt 2>&1
date +%s%3N > $out/t1
for p in "${pids[@]}"; do kill -INT $p; done; wait
rm -f /dev/shm/sr-*-$$.*
t0=$(cat $out/t0)
for s in gateway experiments features retrieval ranking reranker; do
  n=$(grep "woke late" $out/$s.log | python3 -c "
import sys,re
from datetime import datetime
t0=$t0
n=0
for l in sys.stdin:
    ts=datetime.fromisoformat(l.split()[0]).timestamp()*1000
    if ts>=t0: n+=1
print(n)")
  echo "$s stalls>=5ms during the run: $n"
done
grep -E "degraded" $out/run.txt | head -1
