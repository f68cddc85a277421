#!/usr/bin/env python3
"""What the measurement scripts read, parsed once: a fault-suite
FAULTS_TRACE output, hiccup.py outputs and service logs written with
RECMESH_LOG=info,recmesh_server::lag=debug. Every time is in ms since the
Unix epoch; a pause or stall is (start, end, where, ms).

    tracelib.py count-stalls WORK_DIR SINCE_MS   # stalls per service log since a time
"""
import glob
import os
import re
import sys
from datetime import datetime

LAG = re.compile(
    r'(\S+Z) DEBUG recmesh_server::lag: runtime woke late service="(\w+)" lag_ms=([\d.]+)'
)
PROBE = re.compile(r"pause cpu=(\d) ended_ms=(\d+) late_ms=([\d.]+)")


def rows(trace):
    """(wall start, name) of each row of a FAULTS_TRACE output."""
    out = []
    for line in open(trace):
        m = re.match(r"TRACE row (.+) starts at (\d+)", line)
        if m:
            out.append((int(m.group(2)), m.group(1)))
    return out


def row_of(rows_, t):
    before = [r for r in rows_ if r[0] <= t]
    return before[-1][1] if before else "?"


def degraded(trace):
    """(row, at_ms, wall ms sent, fallbacks) of each degraded answer traced;
    the load generator starts 50 ms after its row."""
    out, row = [], None
    for line in open(trace):
        m = re.match(r"TRACE row (.+) starts at (\d+)", line)
        if m:
            row = (m.group(1), int(m.group(2)))
            continue
        m = re.match(r"TRACE (\d+) OK (\[.*?\])", line)
        if m and row:
            at = int(m.group(1))
            out.append((row[0], at, row[1] + 50 + at, m.group(2)))
    return out


def strays(trace):
    """The degraded answers sent 1 s or more after their row's fault was
    lifted (5 s into the row), the gateway's SIGTERM row aside."""
    return [d for d in degraded(trace) if d[1] >= 6000 and d[0] != "sigterm gateway"]


def probe_pauses(path):
    """hiccup.py's pauses: where is "cpu<N>"."""
    out = []
    for line in open(path):
        m = PROBE.match(line)
        if m:
            end, late = int(m.group(2)), float(m.group(3))
            out.append((end - late - 1, end, "cpu" + m.group(1), late))
    return out


def lag_stalls(path):
    """A service log's runtime stalls: where is the service."""
    out = []
    for line in open(path):
        m = LAG.match(line)
        if m:
            end, lag = datetime.fromisoformat(m.group(1)).timestamp() * 1000, float(m.group(3))
            out.append((end - lag, end, m.group(2), lag))
    return out


def pauses(path):
    """Either kind, by what the file holds."""
    return probe_pauses(path) + lag_stalls(path)


if __name__ == "__main__" and sys.argv[1:2] == ["count-stalls"]:
    work, since = sys.argv[2], float(sys.argv[3])
    for path in sorted(glob.glob(os.path.join(work, "*.log"))):
        n = sum(1 for s in lag_stalls(path) if s[1] >= since)
        print(f"{os.path.basename(path)[:-4]} stalls>=5ms during the run: {n}")
