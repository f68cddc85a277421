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
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tracelib  # noqa: E402

work, trace, probes = sys.argv[1], sys.argv[2], sys.argv[3:]
rows = tracelib.rows(trace)
late_cpu = [p for path in probes for p in tracelib.probe_pauses(path)]
counts = collections.Counter()
for path in glob.glob(f"{work}/*.log"):
    for start, end, service, lag in tracelib.lag_stalls(path):
        if lag > 1000 or tracelib.row_of(rows, start) == "overload":
            continue
        cpus = {c for a, b, c, _ in late_cpu if a <= end and b >= start}
        kind = {0: "both CPUs on time", 1: "one CPU late", 2: "both CPUs late"}[len(cpus)]
        counts[(service, kind)] += 1
        counts[("all", kind)] += 1
for (service, kind), n in sorted(counts.items()):
    print(f"{service:12} {kind:18} {n}")
