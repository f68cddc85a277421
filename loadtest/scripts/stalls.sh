#!/usr/bin/env bash
# Runtime stalls per service, the six release binaries as separate processes
# (started by start-mesh.sh: the features store in memory, no Redis), every
# service logging its runtime lag (recmesh_server::lag), 500/s:
#   loadtest/scripts/stalls.sh OUTDIR SECONDS [VAR=value ... for the experiments service]
# then counts the wake-ups 5 ms or more late during the measured run.
set -euo pipefail
out=$1 dur=$2
shift 2
here=$(dirname "$0")
export RECMESH_LOG='info,recmesh_server::lag=debug'
. "$here/start-mesh.sh"
start_mesh "$out" "$@"
"$R/recmesh-loadtest" run --rate 500 --duration 5 --warmup 0 --out "$out/warm" > /dev/null 2>&1 || true
t0=$(date +%s%3N)
"$R/recmesh-loadtest" run --rate 500 --duration "$dur" --warmup 0 --out "$out/run" > "$out/run.txt" 2>&1 || true
python3 "$here/tracelib.py" count-stalls "$out" "$t0"
grep -E "degraded" "$out/run.txt" | head -1
