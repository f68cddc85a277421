#!/usr/bin/env python3
"""Which late degraded answers of a fault-suite run came with a pause.
Reads the suite's FAULTS_TRACE output, and pauses from hiccup.py outputs
(a CPU's) or from service logs written with
RECMESH_LOG=info,recmesh_server::lag=debug (a service runtime's "runtime
woke late" lines):

    loadtest/scripts/pauses-vs-strays.py TRACE.txt PAUSES_OR_LOG [...]

A stray is a degraded answer sent 1 s or more after its row's fault was
lifted (the rows' fault lifts 5 s in), the TRACE lines `TRACE <at_ms> OK
[...]`. It "came with a pause" when a pause (its span: `late_ms` before its
end) overlaps the first 30 ms after the request was sent (the row's wall
start + 50 ms + at_ms; the load generator starts 50 ms after the row) widened
by 10 ms before. The same test on the strays shifted by 0.5–5 s gives
the share that a pause would cover by chance."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tracelib  # noqa: E402

strays = tracelib.strays(sys.argv[1])
pauses, summaries = [], []
for path in sys.argv[2:]:
    pauses += tracelib.pauses(path)
    summaries += [line.strip() for line in open(path) if line.startswith("summary")]


def hit(t):
    return [p for p in pauses if p[0] <= t + 30 and p[1] >= t - 10]


with_pause = 0
for row, at, t, fb in strays:
    h = hit(t)
    with_pause += bool(h)
    desc = ", ".join(f"{p[2]} {p[1] - p[0]:.0f} ms ending {p[1] - t:+.0f} ms" for p in h)
    print(f"{row:22} {at:6} ms {fb:40} {'pause: ' + desc if h else 'no pause seen'}")
chance = [bool(hit(t + s)) for _, _, t, _ in strays for s in range(500, 5001, 250)]
print(f"{len(strays)} strays; {with_pause} came with a pause; {len(pauses)} pauses seen; "
      f"by chance {100 * sum(chance) / max(1, len(chance)):.1f}% would")
for s in summaries:
    print(s)
