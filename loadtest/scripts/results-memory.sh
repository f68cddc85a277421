#!/usr/bin/env bash
# The experiments service's results state under load: the six release
# binaries (start-mesh.sh), 500/s for SECONDS, and every 10 s the users the
# results consumer keeps (recmesh_experiments_results_users) and the
# service's resident memory:
#   loadtest/scripts/results-memory.sh OUTDIR SECONDS [VAR=value ... for the experiments service]
# e.g. RECMESH_RESULTS__ATTRIBUTION_WINDOW_MS=10000 to see lists dropped.
set -euo pipefail
out=$1 dur=$2
shift 2
here=$(dirname "$0")
. "$here/start-mesh.sh"
start_mesh "$out" "$@"
pid=$(printf '%s\n' "${pids[@]}" | sed -n 's/^experiments://p')
"$R/recmesh-loadtest" run --rate 500 --duration "$dur" --warmup 0 --out "$out/run" > "$out/run.txt" 2>&1 &
load=$!
for t in $(seq 10 10 "$dur"); do
  sleep 10
  users=$(curl -s http://127.0.0.1:51055/metrics | awk '/^recmesh_experiments_results_users/ {print $2}')
  rss=$(awk '/^VmRSS/ {print $2 / 1024}' "/proc/$pid/status")
  echo "t=${t}s users_kept=${users:-none} rss_mib=$rss"
done
wait "$load" || true
