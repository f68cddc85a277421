# Sourced by the measurement scripts: starts the six release binaries as
# separate processes on their default ports, the features event log on
# tmpfs, logs in OUT (emptied first); waits until the gateway serves, then
# 2 s more.
#   start_mesh OUT [VAR=value ... for the experiments service]
# Sets R (the binaries' directory) and pids ("name:pid" each); stops them
# (SIGINT, then waits) and removes the tmpfs logs on exit.
# Each process runs WORKERS runtime threads (server.worker_threads; default
# 1: six processes share this machine's cores, and one thread each spent
# 6-15% less CPU per request than two, docs/performance.md; 0 is tokio's
# choice, one per CPU).
R="${CARGO_TARGET_DIR:-$HOME/.cache/recmesh/target}/release"
export RECMESH_SERVER__WORKER_THREADS="${WORKERS:-1}"
pids=()
start_mesh() {
  local out=$1
  shift
  rm -rf "$out"
  mkdir -p "$out"
  RECMESH_EVENT_LOG__PATH=/dev/shm/rm-events-$$.tsv RECMESH_EVENT_LOG__EXPOSURES_PATH=/dev/shm/rm-exp-$$.jsonl \
    "$R/recmesh-features" > "$out/features.log" 2>&1 &
  pids+=("features:$!")
  env RECMESH_STATE_DIR="$out/exp" "$@" "$R/recmesh-experiments" > "$out/experiments.log" 2>&1 &
  pids+=("experiments:$!")
  local s
  for s in retrieval ranking reranker gateway; do
    "$R/recmesh-$s" > "$out/$s.log" 2>&1 &
    pids+=("$s:$!")
  done
  trap 'for p in "${pids[@]}"; do kill -INT "${p#*:}" 2>/dev/null || true; done; wait; rm -f /dev/shm/rm-*-$$.*' EXIT
  for _ in $(seq 1 120); do
    grep -q "serving" "$out/gateway.log" 2>/dev/null && break
    sleep 1
  done
  sleep 2
}
