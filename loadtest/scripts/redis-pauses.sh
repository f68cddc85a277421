#!/usr/bin/env bash
# Redis stalls on demand: the fault suite's baseline row at 500/s with 40 s
# of recovery, and from 6 s into it the suite's Redis held by `CLIENT PAUSE
# 30 ALL` every 500 ms (76 or so pauses), as reads wait behind a write stuck
# in a slow fsync. The suite's output goes to /tmp/NAME.log, its TRACE lines
# (every degraded answer, with the stage's latency and detail) to
# /tmp/NAME-trace.txt, its work directory is /tmp/NAME.
#   loadtest/scripts/redis-pauses.sh NAME [suite args, e.g. --env features:RECMESH_LOG=warn,recmesh_features::redis=debug]
set -uo pipefail
name=$1
shift
R="${CARGO_TARGET_DIR:-$HOME/.cache/recmesh/target}/release"
rm -rf "/tmp/$name" "/tmp/$name-out"
FAULTS_TRACE=1 timeout 600 "$R/recmesh-loadtest" faults --rate 500 --only baseline --recover 40 \
  --work-dir "/tmp/$name" --out "/tmp/$name-out" \
  --env gateway:RECMESH_SERVER__SHUTDOWN_DELAY_MS=1000 --env gateway:RECMESH_CACHE__TTL_MS=30000 \
  "$@" > "/tmp/$name.log" 2>&1 &
suite=$!
until grep -q "TRACE row baseline" "/tmp/$name.log" 2>/dev/null; do
  kill -0 "$suite" 2>/dev/null || break
  sleep 0.2
done
# redis-server shows its address as its process title.
port=$(ps -eo args | grep "[r]edis-server" | grep -o "127.0.0.1:[0-9]*" | head -1 | cut -d: -f2)
sleep 6
pauses=0
while kill -0 "$suite" 2>/dev/null && [ "$pauses" -lt 78 ]; do
  redis-cli -p "$port" client pause 30 ALL > /dev/null 2>&1 && pauses=$((pauses + 1))
  sleep 0.5
done
wait "$suite"
grep TRACE "/tmp/$name.log" > "/tmp/$name-trace.txt"
echo "$name: $pauses pauses of redis on port $port"
awk '$3 == "OK" && $2 >= 5000' "/tmp/$name-trace.txt" | python3 -c '
import re, sys
lines = list(sys.stdin)
features = [l for l in lines if "features:anonymous" in l]
refused = [l for l in features if "Unavailable" in l or "retry" in l]
print(f"degraded answers after 5 s: {len(lines)}; features:anonymous {len(features)}, "
      f"of which GetUser refused first {len(refused)}, late {len(features) - len(refused)}")'
