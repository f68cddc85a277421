#!/usr/bin/env bash
# The full fault suite at 500/s, N times back to back, with the command of
# docs/faults.md's runs 15-18 (release binaries, trace on, the gateway's
# response cache as shipped, 1 s shutdown delay), then one summary row per
# run (run-summary.py):
#   loadtest/scripts/full-runs.sh N NAME_PREFIX [extra faults args...]
# Each run's work dir, output and log are in /tmp/NAME_PREFIX<i>{,-out,.log}.
# Each service runs WORKERS runtime threads (server.worker_threads; default 1,
# as in start-mesh.sh: six processes share the machine's cores).
# Build first: cargo build --release --workspace --bins
set -euo pipefail
cd "$(dirname "$0")/../.."
n=$1
prefix=$2
shift 2
R="${CARGO_TARGET_DIR:-$HOME/.cache/recmesh/target}/release"
summary=()
for i in $(seq 1 "$n"); do
  name="$prefix$i"
  rm -rf "/tmp/$name" "/tmp/$name-out"
  echo "full-runs: $name starts $(date -u +%H:%M:%S)" >&2
  # The suite exits 1 when a goal is missed; the summary says which.
  FAULTS_TRACE=1 "$R/recmesh-loadtest" faults --rate 500 \
    --work-dir "/tmp/$name" --out "/tmp/$name-out" \
    --env gateway:RECMESH_SERVER__SHUTDOWN_DELAY_MS=1000 \
    --env gateway:RECMESH_CACHE__TTL_MS=30000 \
    --env "RECMESH_SERVER__WORKER_THREADS=${WORKERS:-1}" "$@" > "/tmp/$name.log" 2>&1 || true
  grep -A20 '^goals:' "/tmp/$name.log" >&2 || true
  summary+=("$name" "/tmp/$name" "/tmp/$name-out" "/tmp/$name.log")
done
python3 loadtest/scripts/run-summary.py "${summary[@]}"
