#!/usr/bin/env python3
"""One line per full fault-suite run, the figures docs/faults.md's tables
give: the goals, the highest `Recommend` p99 and its row, the worst "back
to the pre-fault rate", Redis timeouts in the features log (the injected
outage's window aside), strays (degraded answers sent 1 s or more after a
lift, the gateway's SIGTERM row aside) and the rows past the recovery goal:

    loadtest/scripts/run-summary.py NAME WORK_DIR OUT_DIR TRACE.txt [...]

NAME WORK_DIR OUT_DIR TRACE repeat for more runs. WORK_DIR and OUT_DIR are
the suite's --work-dir and --out; TRACE is its FAULTS_TRACE output (the
lines starting with TRACE are enough). The goal check is the suite's own:
p99 ≤ 200 ms, recovery ≤ 5000 ms, no failed `Recommend` with the gateway
up, no lost event, no in-flight failure at SIGTERM."""
import json
import os
import re
import sys
from datetime import datetime

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tracelib  # noqa: E402

P99_MS, RECOVERY_MS = 200.0, 5000
# Rows: `lead` 2 s, fault 3 s, then recovery; the outage is widened by 1 s
# for timeouts already under way when Redis came back.
OUTAGE = (2000, 6000)
TIMEOUT = re.compile(r"(\S+Z)\s+WARN .*redis unreachable: ")


def redis_timeouts(work, rows_):
    starts = [start for start, name in rows_ if name == "redis down"]
    n = 0
    path = os.path.join(work, "features.log")
    for line in open(path) if os.path.exists(path) else []:
        m = TIMEOUT.match(line)
        if not m:
            continue
        t = datetime.fromisoformat(m.group(1)).timestamp() * 1000
        if not any(s + OUTAGE[0] <= t <= s + OUTAGE[1] for s in starts):
            n += 1
    return n


def summary(name, work, out, trace):
    table = json.load(open(os.path.join(out, "faults.json")))
    gateway_row = "sigterm gateway"
    past = []
    ok = True
    for r in table:
        rec = r["recovery_ms"]
        if rec is None or rec > RECOVERY_MS:
            past.append(f"{r['fault']} ({'not within the run' if rec is None else f'{rec} ms'})")
            ok = False
        if r["recommend_p99_ms"] > P99_MS or r["events_lost"] != 0:
            ok = False
        if r["fault"] != gateway_row and r["failed_recommends"] != 0:
            ok = False
        if r["inflight_failed"]:
            ok = False
    top = max(table, key=lambda r: r["recommend_p99_ms"])
    back = [r["recovery_to_lead_ms"] for r in table]
    worst = "not within the run" if None in back else f"{max(back)} ms"
    rows_ = tracelib.rows(trace)
    strays = [
        d for d in tracelib.degraded(trace) if d[1] >= 6000 and d[0] != gateway_row
    ]
    print(
        f"| {name} | {'PASS' if ok else 'FAIL'} | {top['recommend_p99_ms']:.1f} ({top['fault']}) "
        f"| {worst} | {redis_timeouts(work, rows_)} | {len(strays)} | {'; '.join(past) or '–'} |"
    )


print(
    "| run | goals | highest `Recommend` p99 (row) | worst back to the pre-fault rate "
    "| Redis timeouts | strays | rows past the recovery goal |"
)
print("|---|---|---|---|---|---|---|")
args = sys.argv[1:]
if not args or len(args) % 4:
    sys.exit(__doc__)
for i in range(0, len(args), 4):
    summary(*args[i : i + 4])
