#!/usr/bin/env python3
"""Were the services' runtime stalls the machine's or their own? For each
"runtime woke late" line (services run with
RECMESH_LOG=info,recmesh_server::lag=debug) of a fault-suite run, whether
the hiccup.py probes on CPU 0 and 1 (run with THRESHOLD_MS=2 beside it)
were late too during the stall. A stall while both probes woke within
2 ms had a CPU free: the time went inside that process. The overload row
and stalls over 1 s (a SIGSTOPped service) are left out.

    loadtest/scripts/stalls-vs-cpus.py WORK_DIR TRACE.txt PROBE.txt [PROBE.txt]
"""
import collections
import glob
import re
import sys
from datetime import datetime

work, trace, probes = sys.argv[1], sys.argv[2], sys.argv[3:]
rows = []
for line in open(trace):
    m = re.match(r"TRACE row (.+) starts at (\d+)", line)
    if m:
        rows.append((int(m.group(2)), m.group(1)))


def row_of(t):
    before = [r for r in rows if r[0] <= t]
    return before[-1][1] if before else "?"


late_cpu = []
for path in probes:
    for line in open(path):
        m = re.match(r"pause cpu=(\d) ended_ms=(\d+) late_ms=([\d.]+)", line)
        if m:
            end = int(m.group(2))
            late_cpu.append((end - float(m.group(3)) - 1, end, int(m.group(1))))
counts = collections.Counter()
for path in glob.glob(f"{work}/*.log"):
    for line in open(path):
        m = re.match(
            r'(\S+Z) DEBUG recmesh_server::lag: runtime woke late service="(\w+)" lag_ms=([\d.]+)',
            line,
        )
        if not m:
            continue
        end = datetime.fromisoformat(m.group(1)).timestamp() * 1000
        lag = float(m.group(3))
        if lag > 1000 or row_of(end - lag) == "overload":
            continue
        cpus = {c for a, b, c in late_cpu if a <= end and b >= end - lag}
        kind = {0: "both CPUs on time", 1: "one CPU late", 2: "both CPUs late"}[len(cpus)]
        counts[(m.group(2), kind)] += 1
        counts[("all", kind)] += 1
for (service, kind), n in sorted(counts.items()):
    print(f"{service:12} {kind:18} {n}")
