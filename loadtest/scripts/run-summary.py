#!/usr/bin/env python3
"""One line per full fault-suite run, the figures docs/faults.md's tables
give: the suite's own verdict, the highest `Recommend` p99 and its row,
the worst "back to the pre-fault rate", the worst recovery of a faulted
stage (its own fallbacks and any failure; "–" for runs of a suite that
predates the figure), Redis timeouts in the features log (the injected
outage's window aside), strays (tracelib.strays) and the rows the suite
found past the recovery goal:

    loadtest/scripts/run-summary.py NAME WORK_DIR OUT_DIR LOG [...]

NAME WORK_DIR OUT_DIR LOG repeat for more runs. WORK_DIR and OUT_DIR are
the suite's --work-dir and --out; LOG is its output with FAULTS_TRACE=1
(stdout and stderr), which holds the `goals:` verdict and its breaches."""
import json
import os
import re
import sys
from datetime import datetime

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tracelib  # noqa: E402

# Rows: `lead` 2 s, fault 3 s, then recovery; the outage is widened by 1 s
# for timeouts already under way when Redis came back.
OUTAGE = (2000, 6000)
TIMEOUT = re.compile(r"(\S+Z)\s+WARN .*redis unreachable: ")
LATE = re.compile(r"  (.+): recovered after (\d+) ms > \d+ ms$")
NOT_BACK = re.compile(r"  (.+): not recovered by the end of the run$")


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


def verdict(log):
    """The suite's `goals:` line and its breaches, recovery ones shortened
    to "row (N ms)" or "row (not within the run)"."""
    lines = open(log).read().splitlines()
    at = max(i for i, line in enumerate(lines) if line.startswith("goals: "))
    goal = "PASS" if lines[at].startswith("goals: PASS") else "FAIL"
    breaches = []
    for line in lines[at + 1 :]:
        if not line.startswith("  "):
            break
        if m := LATE.match(line):
            breaches.append(f"{m.group(1)} ({m.group(2)} ms)")
        elif m := NOT_BACK.match(line):
            breaches.append(f"{m.group(1)} (not within the run)")
        else:
            breaches.append(line.strip())
    return goal, breaches


def summary(name, work, out, log):
    table = json.load(open(os.path.join(out, "faults.json")))
    goal, breaches = verdict(log)
    top = max(table, key=lambda r: r["recommend_p99_ms"])
    back = [r["recovery_to_lead_ms"] for r in table]
    worst = "not within the run" if None in back else f"{max(back)} ms"
    # The baseline injects nothing: no faulted stage to recover.
    own = [r.get("fault_recovery_ms", "–") for r in table if r["fault"] != "baseline"]
    if "–" in own:
        own_worst = "–"
    elif None in own:
        own_worst = "not within the run"
    else:
        own_worst = f"{max(own)} ms"
    print(
        f"| {name} | {goal} | {top['recommend_p99_ms']:.1f} ({top['fault']}) "
        f"| {worst} | {own_worst} | {redis_timeouts(work, tracelib.rows(log))} | {len(tracelib.strays(log))} "
        f"| {'; '.join(breaches) or '–'} |"
    )


print(
    "| run | goals | highest `Recommend` p99 (row) | worst back to the pre-fault rate "
    "| worst recovery of the faulted stage | Redis timeouts | strays | rows past the recovery goal |"
)
print("|---|---|---|---|---|---|---|---|")
args = sys.argv[1:]
if not args or len(args) % 4:
    sys.exit(__doc__)
for i in range(0, len(args), 4):
    summary(*args[i : i + 4])
